"""diffusers' sliced attention: a few of the `b * n` score matrices at a time."""
from __future__ import annotations

from .base import AttnProcessorBase, _project


class SlicedAttnProcessor(AttnProcessorBase):
    """diffusers' sliced attention: materialized scores, `slice_size` of the `b*n` maps at a time.

    Peak memory `slice_size * sq * skv` scores instead of `b * n * sq * skv`; the loop is unrolled
    at trace time (`ceil(b*n / slice_size)` matmul pairs). Uses `get_attention_scores`, so it does
    not use the fast backend: prefer `AttnProcessor` unless you need the diffusers behavior.
    """

    def __init__(self, slice_size: int):
        if not isinstance(slice_size, int) or isinstance(slice_size, bool) or slice_size < 1:
            raise ValueError(f"slice_size must be a positive int, got {slice_size!r}")
        self.slice_size = slice_size

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 kv_lengths=None):
        q, k, v = _project(attn, hidden_states, encoder_hidden_states)
        b, n, sq, d = q.shape
        skv = k.shape[2]
        mask = attn.prepare_attention_mask(attention_mask, skv, b, kv_lengths=kv_lengths)
        q, k, v = (x.reshape((b * n, x.shape[2], x.shape[3])) for x in (q, k, v))
        outs = []
        for i in range(0, b * n, self.slice_size):
            j = min(i + self.slice_size, b * n)
            m = None if mask is None else mask[i:j]
            probs = attn.get_attention_scores(q[i:j], k[i:j], m)
            outs.append(attn.ops.matmul(attn.ops.cast(probs, v.dtype), v[i:j]))
        out = attn.batch_to_head_dim(attn.ops.concatenate(outs, 0))
        return attn.to_out[1](attn.to_out[0](out))
