"""`AttentionInputs`: the arrays of one call plus their validated `Spec`, built once per call.

Building also applies the parts of the contract that no backend should have to repeat:
- the masks of a call (`attn_mask`, jax.nn's `bias` and `mask`) merge into one;
- lengths are clamped to `[0, s]` in their own dtype (so `2**32 + 2` or a `uint32` maximum means
  "all", never a wrapped int32) and negatives raise when the value is known;
- segment ids (packed sequences) become int32 `(b, s)` arrays that compare equal exactly where
  the caller's did (wider ids are renumbered, never wrapped);
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


def _renumber(q_ids, kv_ids):
    """Both id arrays `(b, s*)` renumbered per sample to int32 ranks `0, 1, ...` in value order:
    equal exactly where the originals were. Sorting, so it runs under jit (64-bit traced ids
    exist only with x64 enabled)."""
    sq = q_ids.shape[1]
    ids = jnp.concatenate([q_ids, kv_ids], axis=1)
    order = jnp.argsort(ids, axis=1)
    srt = jnp.take_along_axis(ids, order, 1)
    rank = jnp.concatenate([jnp.zeros_like(srt[:, :1], jnp.int32),
                            jnp.cumsum(srt[:, 1:] != srt[:, :-1], axis=1, dtype=jnp.int32)], axis=1)
    rank = jnp.take_along_axis(rank, jnp.argsort(order, axis=1), 1)
    return rank[:, :sq], rank[:, sq:]


def _segment_ids(q_ids, kv_ids, batch: int, renumber: bool = True):
    """int32 `(batch, s)` segment ids comparing equal exactly where the given ones do, or (None, None).

    Only equality matters. A cast to int32 keeps it when each dtype's range fits in int32, when
    both share one 32-bit dtype (uint32 to int32 is one-to-one), or when the values are known and
    fit; otherwise the ids are renumbered (NumPy ids in NumPy, before they reach JAX: jnp.asarray
    would wrap int64 ids past int32 with x64 disabled and could merge two segments; 64-bit JAX ids,
    which exist only with x64 enabled, by a sort that runs under jit). What none of those can serve
    (a uint32 traced against another dtype with x64 disabled) raises instead of guessing.
    `renumber=False` (the ids are one device's blocks, whose numbering would not agree with the
    other devices') raises where a renumbering would be needed."""
    if q_ids is None:
        return None, None
    names = ("q_segment_ids", "kv_segment_ids")
    ids = [(x if isinstance(x, jax.Array) else np.asarray(x)).reshape(batch, -1) for x in (q_ids, kv_ids)]
    dtypes = [np.dtype(x.dtype) for x in ids]
    in_range = lambda dt: np.iinfo(dt).min >= -2**31 and np.iinfo(dt).max <= INT32_MAX  # noqa: E731
    fits = lambda x: x.size == 0 or (int(x.min()) >= -2**31 and int(x.max()) <= INT32_MAX)  # noqa: E731
    if (all(in_range(dt) for dt in dtypes) or (dtypes[0] == dtypes[1] and dtypes[0].itemsize <= 4)
            or all(in_range(dt) or (_concrete(x) and fits(np.asarray(x))) for x, dt in zip(ids, dtypes))):
        return tuple(jnp.asarray(x).astype(jnp.int32) for x in ids)
    if not renumber:
        raise TypeError(f"q_segment_ids ({dtypes[0]}) and kv_segment_ids ({dtypes[1]}) do not fit in int32, "
                        "and inside a shard_map (sequence_parallel(None, ...)) each device would renumber "
                        "its own blocks differently: give int32 ids (or a dtype whose range fits int32)")
    if all(isinstance(x, np.ndarray) for x in ids):
        # Python ints compare exactly whatever the mix of dtypes (int64 with uint64 included).
        _, rank = np.unique(np.concatenate([x.ravel().astype(object) for x in ids]), return_inverse=True)
        rank = rank.astype(np.int32).reshape(-1)
        cut = ids[0].size
        return jnp.asarray(rank[:cut].reshape(ids[0].shape)), jnp.asarray(rank[cut:].reshape(ids[1].shape))
    if jax.config.jax_enable_x64 and (dtypes[0] == dtypes[1] or np.dtype(np.uint64) not in dtypes):
        return _renumber(*(jnp.asarray(x).astype(jnp.int64) for x in ids))
    name = names[0] if not in_range(dtypes[0]) else names[1]
    raise TypeError(f"{name} ({dtypes[names.index(name)]}) cannot be compared exactly with "
                    f"{names[1 - names.index(name)]} ({dtypes[1 - names.index(name)]}) here: give both one "
                    "dtype, or ids that fit in int32")


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
    `q_segment_ids (b, sq)` and `kv_segment_ids (b, skv)`: int32, both or neither (`segments`).
    """

    q: Any
    k: Any
    v: Any
    mask: Any
    kv_lengths: Any
    spec: Spec
    q_lengths: Any = None
    q_segment_ids: Any = None
    kv_segment_ids: Any = None

    @classmethod
    def build(cls, q, k, v, *, attn_mask=None, kv_lengths=None, scale=None, is_causal=False,
              layout="bnsd", bias=None, mask=None, query_seq_lengths=None,
              local_window_size=None, q_segment_ids=None, kv_segment_ids=None,
              local_blocks: bool = False, ids_per_device: bool = False) -> "AttentionInputs":
        """Validate and normalize one call. `local_blocks=True`: the arrays may be one device's
        blocks of longer sequences, so positions are unknown here and `padding_zeroed` is left to
        the caller (sequence parallelism applies it per device, in local coordinates).
        `ids_per_device=True`: the segment ids are one device's blocks (inside the caller's
        `shard_map`), so they are never renumbered (see `_segment_ids`)."""
        named = (("q", q), ("k", k), ("v", v), ("attn_mask", attn_mask), ("bias", bias), ("mask", mask),
                 ("kv_lengths", kv_lengths), ("query_seq_lengths", query_seq_lengths),
                 ("q_segment_ids", q_segment_ids), ("kv_segment_ids", kv_segment_ids))
        for name, x in named:
            if isinstance(x, jax.ShapeDtypeStruct):
                raise TypeError(f"{name} is a jax.ShapeDtypeStruct: attention_forward computes on arrays; "
                                "use jax_attn.explain(...) to route shapes")
        spec = validate(q, k, v, attn_mask=attn_mask, kv_lengths=kv_lengths, scale=scale,
                        is_causal=is_causal, layout=layout, bias=bias, mask=mask,
                        query_seq_lengths=query_seq_lengths, local_window_size=local_window_size,
                        q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids)
        if spec.unbatched:
            q, k, v = (jnp.asarray(x)[None] for x in (q, k, v))
        merged = merge_masks(attn_mask, bias, mask)
        q_ids, kv_ids = _segment_ids(q_segment_ids, kv_segment_ids, spec.batch, renumber=not ids_per_device)
        inputs = cls(q, k, v, merged, _lengths(kv_lengths, "kv_lengths"), spec,
                     _lengths(query_seq_lengths, "query_seq_lengths"), q_ids, kv_ids)
        return inputs if local_blocks else inputs.padding_zeroed()

    @property
    def segments(self):
        """`(q_segment_ids, kv_segment_ids)`, or None for a call without packed sequences."""
        return None if self.q_segment_ids is None else (self.q_segment_ids, self.kv_segment_ids)

    def padding_zeroed(self) -> "AttentionInputs":
        """A new `AttentionInputs` (this one is left as it is): lengths clamped to the sequences;
        keys no query sees and padding queries zeroed (see the module docstring)."""
        spec, q, k, v = self.spec, self.q, self.k, self.v
        clamp = lambda x, s: None if x is None else jnp.minimum(x, s)  # noqa: E731
        kv_lengths, q_lengths = clamp(self.kv_lengths, spec.kv_len), clamp(self.q_lengths, spec.q_len)
        seen = masking.seen_keys(spec, self.mask, kv_lengths, q_lengths,
                                 self.q_segment_ids, self.kv_segment_ids)  # (b|1, n_kv|1, skv)
        if seen is not None:
            seen = seen[..., None] if spec.layout == "bnsd" else jnp.swapaxes(seen, 1, 2)[..., None]
            k = jnp.where(seen, k, jnp.zeros((), k.dtype))
            v = jnp.where(seen, v, jnp.zeros((), v.dtype))
        if q_lengths is not None:
            q = jnp.where(_valid_rows(spec, q_lengths), q, jnp.zeros((), q.dtype))
        return dataclasses.replace(self, q=q, k=k, v=v, kv_lengths=kv_lengths, q_lengths=q_lengths)

    def _valid_rows(self):
        """bool, broadcastable to `out` in the caller's layout: queries before `query_seq_lengths`."""
        return _valid_rows(self.spec, self.q_lengths)

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


def _valid_rows(spec: Spec, q_lengths):
    """bool, broadcastable to `out` in `spec.layout`: queries before `q_lengths`."""
    valid = jnp.arange(spec.q_len)[None, :] < q_lengths[:, None]  # (b, sq)
    return valid[:, None, :, None] if spec.layout == "bnsd" else valid[:, :, None, None]
