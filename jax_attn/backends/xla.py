"""`xla`: `jax.nn.dot_product_attention(implementation="xla")`, which XLA fuses on any device."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from ..masking import EmptyRows
from .base import Backend


class XLA(Backend):
    name = "xla"
    description = "jax.nn.dot_product_attention(implementation='xla'); O(sq*skv) memory"
    value_dim_differs = False  # jax.nn requires v to have k's shape

    def _forward(self, inputs, return_lse):
        spec = inputs.spec
        fix = EmptyRows.fix(spec, inputs.mask, inputs.kv_lengths)
        q, k, v = inputs.bsnd()  # jax.nn reads (b, s, n, d)
        mask = fix.mask if spec.mask_kind != "none" else None
        bias = fix.bias if spec.mask_kind == "bias" else None
        kv_lengths = fix.kv_lengths if spec.has_kv_lengths else None
        res = jax.nn.dot_product_attention(
            q, k, v, bias=bias, mask=mask, scale=spec.scale, is_causal=spec.is_causal,
            key_value_seq_lengths=kv_lengths, implementation="xla", return_residual=return_lse)
        out, lse = res if return_lse else (res, None)
        if lse is not None:  # jax.nn returns it as (b, sq, n)
            lse = jnp.swapaxes(lse, 1, 2).astype(jnp.float32)
        out, lse = fix.zero(inputs.from_bsnd(out), lse, spec.layout)
        return (out, lse) if return_lse else out
