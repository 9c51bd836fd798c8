"""`naive`: attention written out in jnp, the readable reference. Materializes `(b, n, sq, skv)`."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from .. import masking
from .base import Backend


def _precision(dtype):
    # float32/64 inputs get full-precision matmuls (no TF32 on GPUs); half inputs accumulate in f32.
    # The one definition: `chunked` and the processors' ops (`attention.JaxOps`) import it.
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype).itemsize >= 4 else None


class Naive(Backend):
    name = "naive"
    description = "plain jnp: scores, masked softmax, weighted sum; O(sq*skv) memory"
    supports_window = True
    supports_forward_ad = True
    supports_segment_ids = True
    quadratic_memory = True

    def _forward(self, inputs, return_lse):
        spec = inputs.spec
        q, k, v = inputs.bnsd()
        b, n, sq, d = q.shape
        g = spec.groups
        acc_t = jnp.promote_types(q.dtype, jnp.float32)
        prec = _precision(q.dtype)
        qg = q.reshape(b, spec.kv_heads, g, sq, d)
        s = jnp.einsum("bhgqd,bhkd->bhgqk", qg, k, precision=prec,
                       preferred_element_type=acc_t).reshape(b, n, sq, spec.kv_len) * spec.scale
        keep, bias = masking.keep_and_bias(spec, inputs.mask, inputs.kv_lengths,
                                           jnp.arange(sq), jnp.arange(spec.kv_len), segments=inputs.segments)
        s = masking.masked_logits(s, keep, bias)
        nonempty = masking.nonempty_rows(keep, s.shape)  # by visibility: a NaN row is not empty
        m = jax.lax.stop_gradient(jnp.where(nonempty, jnp.max(s, axis=-1, keepdims=True), 0.0))
        e = jnp.exp(s - m)
        if keep is not None:
            e = jnp.where(keep, e, 0.0)
        l = jnp.sum(e, axis=-1, keepdims=True)
        p = e / jnp.where(nonempty, l, 1.0)
        out = jnp.einsum("bhgqk,bhkd->bhgqd", p.reshape(b, spec.kv_heads, g, sq, -1).astype(v.dtype),
                         v, precision=prec, preferred_element_type=acc_t)
        out = inputs.from_bnsd(out.reshape(b, n, sq, -1).astype(q.dtype))
        if not return_lse:
            return out
        lse = jnp.where(nonempty, jnp.log(jnp.where(nonempty, l, 1.0)) + m, -jnp.inf)[..., 0]
        return out, lse.astype(jnp.float32)
