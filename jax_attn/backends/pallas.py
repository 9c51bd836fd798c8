"""`pallas`: our flash-attention kernels in Pallas, forward and backward.

The Triton-lowered kernels (`kernels/flash_attention.py`) serve every GPU and input; on Hopper,
self-attention in bf16/fp16 runs the Mosaic GPU kernels (`kernels/mosaic_attention.py`) where
they measured faster: `routing.pallas_kernel` decides (`JAX_ATTN_PALLAS_KERNEL` overrides), and
`explain()` shows it.

On a machine without an NVIDIA GPU it is unavailable unless `JAX_ATTN_INTERPRET=1`, which runs the
same kernels in Pallas interpret mode on the CPU: slow, for tests and CI only, so it is then never
chosen automatically (`automatic` is False while interpreting).

Segment ids (packed sequences) are served by the Triton kernels, which compare them tile by tile;
the Mosaic kernels do not take them, so `routing.pallas_kernel` sends such calls to Triton.
"""
from __future__ import annotations

import inspect
import os

import jax.numpy as jnp

from ..kernels import mosaic_attention
from ..kernels.flash_attention import flash_attention
from .base import Backend, gpu_compute_capability, platform

ENV_INTERPRET = "JAX_ATTN_INTERPRET"

# Whether the Triton kernel of this build takes segment ids: read from its signature, so a build
# whose kernel lacks them declines such calls with that reason instead of failing inside.
KERNEL_TAKES_SEGMENT_IDS = {"q_segment_ids", "kv_segment_ids"} <= set(
    inspect.signature(flash_attention).parameters)


def interpreting() -> bool:
    """True when the kernels must run in interpret mode: no GPU, and JAX_ATTN_INTERPRET=1."""
    return platform() != "gpu" and os.environ.get(ENV_INTERPRET) == "1"


class Pallas(Backend):
    name = "pallas"
    description = "our Pallas flash-attention kernels (Triton; Mosaic GPU on Hopper); O(s) memory, fused backward"
    platforms = ("gpu",)
    dtypes = ("float16", "bfloat16", "float32")
    head_dims = (1, 256)
    supports_window = True
    supports_segment_ids = KERNEL_TAKES_SEGMENT_IDS
    skips_segment_tiles = KERNEL_TAKES_SEGMENT_IDS  # the Triton kernels loop over spans

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

    def reasons(self, spec, needs=None):
        why = super().reasons(spec, needs)
        if spec.value_dim > 256:
            why.append(f"value head dim {spec.value_dim} is not supported (at most 256)")
        generic = "q_segment_ids/kv_segment_ids are not supported"
        if generic in why:  # say where: the kernel, not this adapter
            why[why.index(generic)] = (f"{generic} (the Triton kernel of this build, "
                                       "kernels/flash_attention.py, takes none)")
        return why

    def _forward(self, inputs, return_lse):
        spec = inputs.spec
        from ..routing import pallas_kernel  # late: routing imports the backends
        if pallas_kernel(spec)[0] == "mosaic":
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
        segments = {}
        if inputs.segments is not None:  # int32 (b, sq) and (b, skv), never expanded to (sq, skv)
            segments = dict(q_segment_ids=inputs.q_segment_ids, kv_segment_ids=inputs.kv_segment_ids)
        return flash_attention(
            inputs.q, inputs.k, inputs.v, bias=bias, key_mask=key_mask,
            kv_lengths=inputs.kv_lengths, is_causal=spec.is_causal, window=spec.window,
            scale=spec.scale, layout=spec.layout, return_lse=return_lse, interpret=interpreting(),
            **segments)

