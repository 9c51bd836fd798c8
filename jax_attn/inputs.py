"""`AttentionInputs`: the arrays of one call plus their validated `Spec`, built once per call."""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from .contract import Spec, validate


@dataclasses.dataclass(frozen=True)
class AttentionInputs:
    """What every backend consumes. Arrays stay in the caller's layout; `spec` is in bnsd terms.

    `mask` is the bool mask or the additive bias (per `spec.mask_kind`), left-padded to rank 4 and
    never broadcast to full size.
    """

    q: Any
    k: Any
    v: Any
    mask: Any
    kv_lengths: Any
    spec: Spec

    @classmethod
    def build(cls, q, k, v, *, attn_mask=None, kv_lengths=None, scale=None, is_causal=False,
              layout="bnsd") -> "AttentionInputs":
        spec = validate(q, k, v, attn_mask=attn_mask, kv_lengths=kv_lengths, scale=scale,
                        is_causal=is_causal, layout=layout)
        mask = None
        if attn_mask is not None:
            mask = attn_mask if isinstance(attn_mask, jax.ShapeDtypeStruct) else jnp.asarray(attn_mask)
            if mask.shape != spec.mask_shape:
                mask = (jax.ShapeDtypeStruct(spec.mask_shape, mask.dtype)
                        if isinstance(mask, jax.ShapeDtypeStruct) else mask.reshape(spec.mask_shape))
        if kv_lengths is not None and not isinstance(kv_lengths, jax.ShapeDtypeStruct):
            kv_lengths = jnp.asarray(kv_lengths, jnp.int32)
        return cls(q, k, v, mask, kv_lengths, spec)

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
