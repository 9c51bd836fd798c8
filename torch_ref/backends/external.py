"""Adapters for optional packages: `flash_attn`, `sageattention`, `xformers`.

Each is available only when its package imports and a CUDA device is present (the routing
DiffSynth-Studio does by probing installed packages); otherwise `reasons` says which is missing.
What each cannot express (masks, `kv_lengths`, `local_window_size`, gradients, the log-sum-exp) is
declared, so routing falls through to `sdpa` or `chunked` with a logged reason instead of a wrong
answer. `query_seq_lengths`, unbatched inputs and padding are handled around every backend.
"""
from __future__ import annotations

import importlib

import torch

from ..inputs import RunContext
from ..masking import EmptyRows
from .base import Backend


class FlashAttn(Backend):
    name = "flash_attn"
    description = "flash_attn.flash_attn_func (Dao-AILab FlashAttention 2), reads (b, s, n, d)"
    package = "flash_attn"
    devices = ("cuda",)
    dtypes = ("float16", "bfloat16")
    head_dims = (1, 256)
    value_dim_differs = False
    supports_bool_mask = supports_bias = supports_bias_grad = supports_kv_lengths = False

    def reasons(self, spec, call=RunContext()):
        why = super().reasons(spec, call)
        if spec.is_causal and spec.q_len != spec.kv_len:
            why.append("is_causal with sq != skv: flash_attn aligns the causal mask bottom-right")
        return why

    def _forward(self, inputs, return_lse):
        flash_attn = importlib.import_module("flash_attn")
        q, k, v = inputs.bsnd()
        spec = inputs.spec
        res = flash_attn.flash_attn_func(q, k, v, softmax_scale=spec.scale, causal=spec.is_causal,
                                         return_attn_probs=return_lse)
        if not return_lse:
            return inputs.from_bsnd(res)
        return inputs.from_bsnd(res[0]), res[1].to(torch.float32)


class SageAttention(Backend):
    name = "sageattention"
    description = "sageattention.sageattn: INT8 Q/K, approximate; inference only, opt-in"
    package = "sageattention"
    devices = ("cuda",)
    dtypes = ("float16", "bfloat16")
    value_dim_differs = False
    supports_bool_mask = supports_bias = supports_bias_grad = supports_kv_lengths = False
    supports_grad = supports_lse = False
    automatic = False  # quantized: results differ beyond our tolerances, so never chosen silently

    def reasons(self, spec, call=RunContext()):
        why = super().reasons(spec, call)
        if spec.head_dim not in (64, 96, 128):
            why.append(f"head dim {spec.head_dim} is not supported (64, 96 or 128)")
        if spec.is_causal and spec.q_len != spec.kv_len:
            why.append("is_causal with sq != skv is not supported")
        return why

    def _forward(self, inputs, return_lse):
        sage = importlib.import_module("sageattention")
        spec = inputs.spec
        q, k, v = inputs.bnsd()
        if spec.groups > 1:
            k, v = (x.repeat_interleave(spec.groups, dim=1) for x in (k, v))
        out = sage.sageattn(q, k, v, tensor_layout="HND", is_causal=spec.is_causal, sm_scale=spec.scale)
        return inputs.from_bnsd(out)


class XFormers(Backend):
    name = "xformers"
    description = "xformers.ops.memory_efficient_attention, reads (b, s, n, d)"
    package = "xformers"
    devices = ("cuda",)
    dtypes = ("float16", "bfloat16", "float32")
    supports_lse = False
    supports_window = True  # folded into its attn_bias

    def _forward(self, inputs, return_lse):
        xops = importlib.import_module("xformers.ops")
        spec = inputs.spec
        q, k, v = inputs.bsnd()
        if spec.groups > 1:
            k, v = (x.repeat_interleave(spec.groups, dim=2) for x in (k, v))
        fix = EmptyRows.fix(spec, inputs.mask, inputs.kv_lengths, q.dtype, q.device)
        if fix.mask is not None:
            bias = _aligned_bias(fix.mask, (spec.batch, spec.heads, spec.q_len, spec.kv_len), q.dtype)
        elif spec.is_causal:
            bias = xops.LowerTriangularMask()  # top-left aligned, as ours
        else:
            bias = None
        out = xops.memory_efficient_attention(q, k, v, attn_bias=bias, scale=spec.scale)
        out, _ = fix.zero(inputs.from_bsnd(out), None, spec.layout)
        return out


def _aligned_bias(mask, shape, dtype):
    """A full float bias whose rows start on 8-element boundaries, as xformers requires."""
    if mask.dtype == torch.bool:
        mask = torch.zeros((), dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))
    b, n, sq, skv = shape
    store = torch.empty(b, n, sq, -(-skv // 8) * 8, dtype=dtype, device=mask.device)[..., :skv]
    store.copy_(mask.expand(shape))  # copy_ keeps the autograd link to a bias that requires grad
    return store
