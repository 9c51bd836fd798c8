"""`AttentionInputs`: the tensors of one call, their validated `Spec`, and the runtime facts a
torch backend also decides on (device, autograd), built once per call."""
from __future__ import annotations

import dataclasses
from typing import Any

import torch

from jax_attn.contract import Spec, validate


@dataclasses.dataclass(frozen=True)
class Call:
    """What routing needs beyond the `Spec`: torch decides kernels at run time, per device."""

    device: str = "cpu"  # "cpu", "cuda", ...; "meta" for shape-only `explain`
    grad: bool = False  # autograd will differentiate through q, k or v
    bias_grad: bool = False  # autograd will differentiate through the float attn_mask
    return_lse: bool = False


@dataclasses.dataclass(frozen=True)
class AttentionInputs:
    """Tensors in the caller's layout; `spec` in bnsd terms; `mask` left-padded to rank 4."""

    q: Any
    k: Any
    v: Any
    mask: Any
    kv_lengths: Any
    spec: Spec
    call: Call

    @classmethod
    def build(cls, q, k, v, *, attn_mask=None, kv_lengths=None, scale=None, is_causal=False,
              layout="bnsd", return_lse=False) -> "AttentionInputs":
        spec = validate(q, k, v, attn_mask=attn_mask, kv_lengths=kv_lengths, scale=scale,
                        is_causal=is_causal, layout=layout)
        for name, x in (("q", q), ("k", k), ("v", v), ("attn_mask", attn_mask), ("kv_lengths", kv_lengths)):
            if x is not None and not isinstance(x, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        devices = {x.device for x in (q, k, v, attn_mask) if x is not None}
        if len(devices) > 1:
            raise ValueError(f"q, k, v and attn_mask must be on one device, got {sorted(map(str, devices))}")
        mask = None if attn_mask is None else attn_mask.reshape(spec.mask_shape)
        if kv_lengths is not None:
            kv_lengths = kv_lengths.to(device=q.device, dtype=torch.int64)
        grad_on = torch.is_grad_enabled()
        call = Call(device=q.device.type,
                    grad=grad_on and any(x.requires_grad for x in (q, k, v)),
                    bias_grad=grad_on and spec.mask_kind == "bias" and attn_mask.requires_grad,
                    return_lse=return_lse)
        return cls(q, k, v, mask, kv_lengths, spec, call)

    def bnsd(self):
        """`(q, k, v)` in `(b, n, s, d)`: strided views, no copies."""
        if self.spec.layout == "bnsd":
            return self.q, self.k, self.v
        return tuple(x.transpose(1, 2) for x in (self.q, self.k, self.v))

    def bsnd(self):
        if self.spec.layout == "bsnd":
            return self.q, self.k, self.v
        return tuple(x.transpose(1, 2) for x in (self.q, self.k, self.v))

    def from_bnsd(self, out):
        return out if self.spec.layout == "bnsd" else out.transpose(1, 2)

    def from_bsnd(self, out):
        return out if self.spec.layout == "bsnd" else out.transpose(1, 2)
