"""`sdpa`: `torch.nn.functional.scaled_dot_product_attention`, and its inner kernels by name.

`sdpa` lets torch pick its kernel; `sdpa_math`, `sdpa_flash`, `sdpa_efficient` and `sdpa_cudnn`
pin one through `torch.nn.attention.sdpa_kernel`. Their declared limits are the documented ones;
when torch still refuses, the error carries torch's own reasons (its warnings).
Masks, `kv_lengths`, the window, segment ids (packed sequences) and empty rows are folded into the
one `attn_mask` sdpa takes (`EmptyRows`).
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from jax_attn.routing import BackendError

from ..inputs import RunContext
from ..masking import EmptyRows
from .base import Backend


class SDPA(Backend):
    name = "sdpa"
    description = "torch.nn.functional.scaled_dot_product_attention, torch picks the kernel"
    kernel: SDPBackend | None = None  # None: torch's own choice
    supports_lse = False  # sdpa does not return the log-sum-exp
    supports_window = True  # folded into its attn_mask
    supports_segment_ids = True  # folded into its attn_mask
    native_gqa = True  # reads grouped k/v itself (`enable_gqa`); else k/v heads are repeated

    def _forward(self, inputs, return_lse):
        spec = inputs.spec
        q, k, v = inputs.bnsd()  # transposed views for bsnd: sdpa reads strides
        fix = EmptyRows.fix(spec, inputs.mask, inputs.kv_lengths, q.dtype, q.device, inputs.segments)
        kw = dict(attn_mask=fix.mask, is_causal=spec.is_causal and not fix.causal_in_mask, scale=spec.scale)
        if spec.groups > 1 and self.native_gqa:
            kw["enable_gqa"] = True
        elif spec.groups > 1:
            k, v = (x.repeat_interleave(spec.groups, dim=1) for x in (k, v))
        if self.kernel is None:
            out = F.scaled_dot_product_attention(q, k, v, **kw)
        else:
            with warnings.catch_warnings(record=True) as caught, sdpa_kernel(self.kernel):
                warnings.simplefilter("always")
                try:
                    out = F.scaled_dot_product_attention(q, k, v, **kw)
                except RuntimeError as e:
                    detail = "; ".join(str(w.message) for w in caught) or str(e)
                    raise BackendError(f"{self.name}: torch refused the call: {detail}") from e
        out, _ = fix.zero(inputs.from_bnsd(out), None, spec.layout)
        return out


class SDPAMath(SDPA):
    name = "sdpa_math"
    description = "sdpa pinned to its math kernel (any device, dtype and mask)"
    kernel = SDPBackend.MATH


class SDPAFlash(SDPA):
    name = "sdpa_flash"
    description = "sdpa pinned to its flash kernel"
    kernel = SDPBackend.FLASH_ATTENTION
    value_dim_differs = False
    supports_bias_grad = False

    def reasons(self, spec, call=RunContext()):
        why = super().reasons(spec, call)
        if call.device == "cuda":
            if spec.dtype not in ("float16", "bfloat16"):
                why.append(f"dtype {spec.dtype} is not supported on CUDA (supports float16, bfloat16)")
            if spec.head_dim > 256:
                why.append(f"head dim {spec.head_dim} is not supported on CUDA (at most 256)")
            if spec.mask_kind != "none" or spec.has_kv_lengths or spec.has_segment_ids:
                why.append("an attn_mask (or kv_lengths, segment ids) is not supported on CUDA")
            if spec.window is not None:
                why.append("local_window_size is not supported on CUDA (it needs an attn_mask)")
        return why


class SDPAEfficient(SDPA):
    name = "sdpa_efficient"
    description = "sdpa pinned to its memory-efficient kernel (CUDA)"
    kernel = SDPBackend.EFFICIENT_ATTENTION
    native_gqa = False
    devices = ("cuda",)
    dtypes = ("float16", "bfloat16", "float32")


class SDPACuDNN(SDPA):
    name = "sdpa_cudnn"
    description = "sdpa pinned to its cuDNN kernel (CUDA)"
    kernel = SDPBackend.CUDNN_ATTENTION
    native_gqa = False
    devices = ("cuda",)
    dtypes = ("float16", "bfloat16")
    value_dim_differs = False
    head_dims = (1, 128)
