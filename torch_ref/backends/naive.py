"""`naive`: attention written out in torch ops, the readable reference. Materializes `(b, n, sq, skv)`."""
from __future__ import annotations

import torch

from .. import masking
from .base import Backend


class Naive(Backend):
    name = "naive"
    description = "plain torch: scores, masked softmax, weighted sum in float32; O(sq*skv) memory"
    supports_window = True
    supports_segment_ids = True

    def _forward(self, inputs, return_lse):
        spec = inputs.spec
        q, k, v = inputs.bnsd()
        acc = masking.accumulator(q.dtype)
        b, n, sq, d = q.shape
        hk, g, skv = spec.kv_heads, spec.groups, spec.kv_len
        s = torch.einsum("bhgqd,bhkd->bhgqk", q.reshape(b, hk, g, sq, d).to(acc), k.to(acc))
        s = s.reshape(b, n, sq, skv) * spec.scale
        keep, bias = masking.keep_and_bias(spec, inputs.mask, inputs.kv_lengths,
                                           torch.arange(sq, device=q.device), torch.arange(skv, device=q.device),
                                           inputs.segments)
        s = masking.masked_logits(s, keep, bias)
        nonempty = masking.nonempty_rows(keep, s.shape, q.device)[..., None]  # a NaN row is not empty
        zero = torch.zeros((), dtype=s.dtype, device=q.device)
        m = torch.where(nonempty, s.amax(-1, keepdim=True), zero).detach()
        e = torch.exp(s - m)
        if keep is not None:
            e = torch.where(keep, e, zero)
        l = e.sum(-1, keepdim=True)
        p = e / torch.where(nonempty, l, torch.ones_like(l))
        out = torch.einsum("bhgqk,bhkd->bhgqd", p.reshape(b, hk, g, sq, skv), v.to(acc))
        out = inputs.from_bnsd(out.reshape(b, n, sq, -1).to(q.dtype))
        if not return_lse:
            return out
        lse = torch.where(nonempty, torch.log(torch.where(nonempty, l, torch.ones_like(l))) + m,
                          torch.full((), float("-inf"), dtype=l.dtype, device=q.device))[..., 0]
        return out, lse.to(torch.float32)
