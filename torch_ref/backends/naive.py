"""`naive`: attention written out in torch ops, the readable reference. Materializes `(b, n, sq, skv)`."""
from __future__ import annotations

import torch

from .. import masking
from .base import Backend


class Naive(Backend):
    name = "naive"
    description = "plain torch: scores, masked softmax, weighted sum in float32; O(sq*skv) memory"

    def _forward(self, inputs, return_lse):
        spec = inputs.spec
        q, k, v = inputs.bnsd()
        acc = masking.accumulator(q.dtype)
        b, n, sq, d = q.shape
        hk, g, skv = spec.kv_heads, spec.groups, spec.kv_len
        s = torch.einsum("bhgqd,bhkd->bhgqk", q.reshape(b, hk, g, sq, d).to(acc), k.to(acc))
        s = s.reshape(b, n, sq, skv) * spec.scale
        keep, bias = masking.keep_and_bias(spec, inputs.mask, inputs.kv_lengths,
                                           torch.arange(sq, device=q.device), torch.arange(skv, device=q.device))
        s = masking.masked_logits(s, keep, bias)
        m = masking.safe_row_max(s).detach()
        e = torch.exp(s - m)
        l = e.sum(-1, keepdim=True)
        nonempty = l > 0
        p = e / torch.where(nonempty, l, torch.ones_like(l))
        out = torch.einsum("bhgqk,bhkd->bhgqd", p.reshape(b, hk, g, sq, skv), v.to(acc))
        out = inputs.from_bnsd(out.reshape(b, n, sq, -1).to(q.dtype))
        if not return_lse:
            return out
        lse = torch.log(torch.where(nonempty, l, torch.ones_like(l))) + m
        lse = lse.masked_fill(~nonempty, float("-inf"))[..., 0]
        return out, lse.to(torch.float32)
