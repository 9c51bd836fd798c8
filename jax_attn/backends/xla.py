"""`xla`: `jax.nn.dot_product_attention(implementation="xla")`, which XLA fuses on any device.

jax.nn has no segment ids: packed sequences are folded exactly into the bool mask it takes (an
`(b, 1, sq, skv)` array, no more than the scores it holds anyway).

jax.nn's own log-sum-exp output is rounded to the input dtype and has its gradient stopped, so a
call that asks for the lse runs the same masked softmax written out in jnp (`naive`, also compiled
by XLA) to return it in float32, differentiable.
"""
from __future__ import annotations

import jax

from ..masking import EmptyRows
from .base import Backend
from .naive import Naive


class XLA(Backend):
    name = "xla"
    description = "jax.nn.dot_product_attention(implementation='xla'); O(sq*skv) memory"
    value_dim_differs = False  # jax.nn requires v to have k's shape
    supports_window = True
    supports_forward_ad = True
    supports_segment_ids = True  # folded into jax.nn's mask (`EmptyRows.fix`)
    quadratic_memory = True

    def _forward(self, inputs, return_lse):
        if return_lse:
            return Naive()._forward(inputs, return_lse)
        spec = inputs.spec
        fix = EmptyRows.fix(spec, inputs.mask, inputs.kv_lengths, inputs.segments)
        q, k, v = inputs.bsnd()  # jax.nn reads (b, s, n, d)
        window = None
        if spec.window is not None:  # jax.nn wants ints: an unbounded side reaches every key
            window = tuple(spec.q_len + spec.kv_len if w is None else w for w in spec.window)
        out = jax.nn.dot_product_attention(
            q, k, v, bias=fix.bias, mask=fix.mask, scale=spec.scale, is_causal=spec.is_causal,
            key_value_seq_lengths=fix.kv_lengths, local_window_size=window, implementation="xla")
        return fix.zero(inputs.from_bsnd(out), None, spec.layout)[0]
