"""`pallas`: our flash-attention kernels in Pallas, forward and backward.

The Triton-lowered kernels (`kernels/flash_attention.py`) serve every GPU and input; on Hopper,
self-attention in bf16/fp16 runs the Mosaic GPU kernels (`kernels/mosaic_attention.py`) where
they measured faster (`_use_mosaic`, `JAX_ATTN_PALLAS_KERNEL`).

On a machine without an NVIDIA GPU it is unavailable unless `JAX_ATTN_INTERPRET=1`, which runs the
same kernels in Pallas interpret mode on the CPU: slow, for tests and CI only, so it is then never
chosen automatically (`automatic` is False while interpreting).
"""
from __future__ import annotations

import logging
import os

import jax.numpy as jnp

from ..kernels import flash_attention, mosaic_attention
from .base import Backend, gpu_compute_capability, platform

log = logging.getLogger(__name__)

ENV_INTERPRET = "JAX_ATTN_INTERPRET"
# Which kernel serves `pallas` on Hopper: "triton", "mosaic" (the Mosaic GPU kernel, where the
# inputs qualify) or "auto" (default: Mosaic only in the shape buckets measured faster, see
# mosaic_attention.FASTER_THAN_TRITON_SM90). Elsewhere it is always the Triton kernel.
ENV_KERNEL = "JAX_ATTN_PALLAS_KERNEL"


def interpreting() -> bool:
    """True when the kernels must run in interpret mode: no GPU, and JAX_ATTN_INTERPRET=1."""
    return platform() != "gpu" and os.environ.get(ENV_INTERPRET) == "1"


class Pallas(Backend):
    name = "pallas"
    description = "our Pallas flash-attention kernels (Triton; Mosaic GPU on Hopper); O(s) memory, fused backward"
    platforms = ("gpu",)
    dtypes = ("float16", "bfloat16", "float32")
    head_dims = (1, 256)
    bias_grad = False  # the bias is a constant to the backward kernels

    @property
    def automatic(self) -> bool:
        # Interpret mode is orders of magnitude slower than any other backend.
        return not interpreting()

    def unavailable(self) -> list[str]:
        if interpreting():
            return []
        if platform() != "gpu":
            return [f"no GPU: the default JAX platform is {platform()}; set {ENV_INTERPRET}=1 to "
                    "run in Pallas interpret mode (slow; tests only)"]
        cc = gpu_compute_capability()
        if cc is not None and cc < (8, 0):
            return [f"needs an NVIDIA GPU of compute capability 8.0 or newer, found {cc[0]}.{cc[1]}"]
        return []

    def reasons(self, spec):
        why = super().reasons(spec)
        if spec.value_dim > 256:
            why.append(f"value head dim {spec.value_dim} is not supported (at most 256)")
        return why

    def _forward(self, inputs, return_lse):
        spec = inputs.spec
        if _use_mosaic(spec):
            return mosaic_attention.mosaic_attention(
                inputs.q, inputs.k, inputs.v, kv_lengths=inputs.kv_lengths,
                key_mask=inputs.mask if spec.mask_kind == "bool" else None, scale=spec.scale,
                layout=spec.layout, return_lse=return_lse)
        bias = key_mask = None
        if spec.mask_kind == "bool" and spec.per_key_mask:
            key_mask = inputs.mask  # read as a (b, n|1, skv) vector, never expanded over queries
        elif spec.mask_kind == "bool":
            # A full bool mask becomes a 0/-inf bias read tile by tile; bf16 holds both exactly.
            bias = jnp.where(inputs.mask, 0.0, -jnp.inf).astype(jnp.bfloat16)
        elif spec.mask_kind == "bias":
            bias = inputs.mask
        return flash_attention(
            inputs.q, inputs.k, inputs.v, bias=bias, key_mask=key_mask,
            kv_lengths=inputs.kv_lengths, is_causal=spec.is_causal, scale=spec.scale,
            layout=spec.layout, return_lse=return_lse, interpret=interpreting())


def _use_mosaic(spec) -> bool:
    """Trace-time choice between the Triton and the Mosaic GPU kernel (logged)."""
    mode = os.environ.get(ENV_KERNEL, "auto").strip().lower() or "auto"
    if mode not in ("auto", "triton", "mosaic"):
        raise ValueError(f"{ENV_KERNEL} must be triton, mosaic or auto, got {mode!r}")
    if mode == "triton" or interpreting():
        return False
    cc = gpu_compute_capability()
    why = mosaic_attention.unsupported(
        dtype=spec.dtype, d=spec.head_dim, dv=spec.value_dim, is_causal=spec.is_causal,
        has_full_bias=(spec.mask_kind == "bias"
                       or (spec.mask_kind == "bool" and not spec.per_key_mask)))
    if cc is None or cc[0] != 9:
        why.append("not a Hopper (sm90) GPU")
    bucket = mosaic_attention.shape_bucket(spec.head_dim, spec.q_len, spec.kv_len)
    if not why and mode == "auto" and not mosaic_attention.FASTER_THAN_TRITON_SM90.get(bucket):
        why.append(f"bucket {bucket} not measured faster than Triton")
    use = not why
    if mode == "mosaic" and why:
        log.warning("%s=mosaic, but the Mosaic kernel cannot serve these inputs (%s): using Triton",
                    ENV_KERNEL, "; ".join(why))
    else:
        log.info("pallas kernel (%s=%s): %s%s", ENV_KERNEL, mode, "mosaic" if use else "triton",
                 "" if use else f" ({'; '.join(why)})")
    return use
