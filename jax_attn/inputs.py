"""`AttentionInputs`: the arrays of one call plus their validated `Spec`, built once per call.

Building also applies the parts of the contract that no backend should have to repeat:
- the masks of a call (`attn_mask`, jax.nn's `bias` and `mask`) merge into one;
- lengths are clamped to `[0, s]` in their own dtype (so `2**32 + 2` or a `uint32` maximum means
  "all", never a wrapped int32) and negatives raise when the value is known;
- padding is made harmless: keys that no query can see and queries past `query_seq_lengths` are
  zeroed, so whatever they hold (uninitialized text-encoder padding, NaN, inf) reaches no output
  and no gradient on any backend. A key visible to some query is data, and its NaN propagates.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from . import masking, visibility
from .contract import Spec, validate


def _concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


INT32_MAX = 2**31 - 1


def _lengths(x, name: str):
    """int32 `(b,)` lengths clamped to `[0, 2**31 - 1]` in the caller's own dtype first (no wrap)."""
    if x is None:
        return None
    if isinstance(x, np.ndarray) or np.isscalar(x):
        x = np.asarray(x)
        visibility.check_lengths(x, name)
        top = min(INT32_MAX, int(np.iinfo(x.dtype).max))
        return jnp.asarray(np.minimum(x, np.asarray(top, x.dtype)).astype(np.int32).reshape(-1))
    if _concrete(x):  # checked in NumPy: inside a trace jnp would stage it
        visibility.check_lengths(np.asarray(x), name)
    x = jnp.asarray(x)
    # Under jit a negative length cannot raise; it clamps to 0 (a row or key set with nothing).
    if jnp.iinfo(x.dtype).max > INT32_MAX:
        x = jnp.minimum(x, INT32_MAX)
    return jnp.maximum(x, 0).astype(jnp.int32).reshape(-1)


def _rank4(x):
    x = jnp.asarray(x)
    return x.reshape((1,) * (4 - x.ndim) + x.shape)


def merge_masks(attn_mask, bias, mask):
    """One mask from `attn_mask`, `bias` and `mask`: bool where all parts are bool (AND), else an
    additive bias (float parts added, keys a bool part drops at -inf). Rank 4, not broadcast."""
    return visibility.merge_masks([None if x is None else _rank4(x) for x in (attn_mask, bias, mask)],
                                  lambda x: x.dtype == jnp.bool_,
                                  lambda keep, add: jnp.where(keep, add, -jnp.inf))


@dataclasses.dataclass(frozen=True)
class AttentionInputs:
    """What every backend consumes. Arrays stay in the caller's layout (with a batch axis of 1 added
    to unbatched inputs); `spec` is in bnsd terms.

    `mask` is the merged bool mask or additive bias (per `spec.mask_kind`), left-padded to rank 4
    and never broadcast to full size. `q_lengths` is applied around the backends (`finish`).
    """

    q: Any
    k: Any
    v: Any
    mask: Any
    kv_lengths: Any
    spec: Spec
    q_lengths: Any = None

    @classmethod
    def build(cls, q, k, v, *, attn_mask=None, kv_lengths=None, scale=None, is_causal=False,
              layout="bnsd", bias=None, mask=None, query_seq_lengths=None,
              local_window_size=None, local_blocks: bool = False) -> "AttentionInputs":
        """Validate and normalize one call. `local_blocks=True`: the arrays may be one device's
        blocks of longer sequences, so positions are unknown here and `padding_zeroed` is left to
        the caller (sequence parallelism applies it per device, in local coordinates)."""
        named = (("q", q), ("k", k), ("v", v), ("attn_mask", attn_mask), ("bias", bias), ("mask", mask),
                 ("kv_lengths", kv_lengths), ("query_seq_lengths", query_seq_lengths))
        for name, x in named:
            if isinstance(x, jax.ShapeDtypeStruct):
                raise TypeError(f"{name} is a jax.ShapeDtypeStruct: attention_forward computes on arrays; "
                                "use jax_attn.explain(...) to route shapes")
        spec = validate(q, k, v, attn_mask=attn_mask, kv_lengths=kv_lengths, scale=scale,
                        is_causal=is_causal, layout=layout, bias=bias, mask=mask,
                        query_seq_lengths=query_seq_lengths, local_window_size=local_window_size)
        if spec.unbatched:
            q, k, v = (jnp.asarray(x)[None] for x in (q, k, v))
        merged = merge_masks(attn_mask, bias, mask)
        inputs = cls(q, k, v, merged, _lengths(kv_lengths, "kv_lengths"), spec,
                     _lengths(query_seq_lengths, "query_seq_lengths"))
        return inputs if local_blocks else inputs.padding_zeroed()

    def padding_zeroed(self) -> "AttentionInputs":
        """Lengths clamped to the sequences; keys no query sees and padding queries zeroed (see
        the module docstring)."""
        spec, q, k, v = self.spec, self.q, self.k, self.v
        clamp = lambda x, s: None if x is None else jnp.minimum(x, s)  # noqa: E731
        self = dataclasses.replace(self, kv_lengths=clamp(self.kv_lengths, spec.kv_len),
                                   q_lengths=clamp(self.q_lengths, spec.q_len))
        seen = masking.seen_keys(spec, self.mask, self.kv_lengths, self.q_lengths)  # (b|1, n_kv|1, skv)
        if seen is not None:
            seen = seen[..., None] if spec.layout == "bnsd" else jnp.swapaxes(seen, 1, 2)[..., None]
            k = jnp.where(seen, k, jnp.zeros((), k.dtype))
            v = jnp.where(seen, v, jnp.zeros((), v.dtype))
        if self.q_lengths is not None:
            q = jnp.where(self._valid_rows(), q, jnp.zeros((), q.dtype))
        return dataclasses.replace(self, q=q, k=k, v=v)

    def _valid_rows(self):
        """bool, broadcastable to `out` in the caller's layout: queries before `query_seq_lengths`."""
        valid = jnp.arange(self.spec.q_len)[None, :] < self.q_lengths[:, None]  # (b, sq)
        return valid[:, None, :, None] if self.spec.layout == "bnsd" else valid[:, :, None, None]

    def finish(self, result, return_lse: bool):
        """A backend's result as the caller gets it: padding queries zeroed (lse -inf), the batch
        axis of unbatched inputs removed."""
        out, lse = result if return_lse else (result, None)
        if self.q_lengths is not None:
            out = jnp.where(self._valid_rows(), out, jnp.zeros((), out.dtype))
            if lse is not None:
                valid = jnp.arange(self.spec.q_len)[None, None, :] < self.q_lengths[:, None, None]
                lse = jnp.where(valid, lse, -jnp.inf)
        if self.spec.unbatched:
            out, lse = out[0], None if lse is None else lse[0]
        return (out, lse) if return_lse else out

    def bnsd(self):
        """`(q, k, v)` in `(b, n, s, d)`; a transpose only when the caller used `bsnd`."""
        if self.spec.layout == "bnsd":
            return self.q, self.k, self.v
        return tuple(jnp.swapaxes(x, 1, 2) for x in (self.q, self.k, self.v))

    def bsnd(self):
        """`(q, k, v)` in `(b, s, n, d)`; a transpose only when the caller used `bnsd`."""
        if self.spec.layout == "bsnd":
            return self.q, self.k, self.v
        return tuple(jnp.swapaxes(x, 1, 2) for x in (self.q, self.k, self.v))

    def from_bnsd(self, out):
        """Return a `(b, n, s, dv)` result in the caller's layout."""
        return out if self.spec.layout == "bnsd" else jnp.swapaxes(out, 1, 2)

    def from_bsnd(self, out):
        return out if self.spec.layout == "bsnd" else jnp.swapaxes(out, 1, 2)
