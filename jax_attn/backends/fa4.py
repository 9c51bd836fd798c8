"""`fa4`: FlashAttention-4's CuTe-DSL kernels (Hopper sm90, Blackwell sm100), forward and backward.

This module declares what the backend serves and maps our contract onto FA4's arguments; the
kernels are reached through `fa4_kernels` (JAX FFI targets that hand XLA's buffers and stream to
FA4). Nothing from FA4, torch or tvm-ffi is imported until a call is traced.

FA4, like every FlashAttention, aligns its causal mask and local window to the bottom-right
corner (key j is visible to query i iff `i + sk - sq - left <= j <= i + sk - sq + right`, with
`sk` the used key length, `seqused_k` included), while ours is top-left. The two agree only
when that offset is zero, so causality and windows are served only with `sq == skv` and no
`kv_lengths`; any other combination is declined with its reason rather than shifted per batch.

Packed sequences (`q_segment_ids`/`kv_segment_ids`) go through FA4's `mask_mod` and block
sparsity on sm90 (`fa4_segments`): that mask_mod carries causality, the window and `kv_lengths`
itself, in our top-left convention, so with segment ids every geometry is exact, whatever sq,
skv and the lengths.
"""
from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util

from ..contract import Spec
from .base import Backend, gpu_compute_capability, platform

REQUIRED_MODULES = (("flash_attn.cute", "flash-attn-4"), ("jax_tvm_ffi", "jax-tvm-ffi"),
                    ("tvm_ffi", "apache-tvm-ffi"), ("torch", "torch (CUDA build)"))


# Head dims whose FA4 sm90 backward matched the float64 reference on an H200 (FA4 4.0.0b36,
# benchmarks/results/2026-11-30-h200-round2/): its d=40 gradients were wrong there (relative error
# 1.0, through torch as well as through JAX), so a gradient at an unverified head dim raises, and
# a preference list differentiates through its next backend instead (`backward_reasons`).
VERIFIED_BACKWARD_HEAD_DIMS = (64, 128)
# FA4 versions whose kernels the segment-id block lists (fa4_segments) were checked against on an
# H200 (benchmarks/results/2026-11-30-h200-round5/fa4seg/).
SEGMENT_IDS_VERIFIED_VERSIONS = ("4.0.0b36",)


@dataclasses.dataclass(frozen=True)
class FA4Args:
    """FA4's mask and scale arguments for one call (`_flash_attn_fwd`/`_flash_attn_bwd` names)."""

    softmax_scale: float
    causal: bool
    window_size_left: int | None
    window_size_right: int | None


def fa4_arguments(spec: Spec) -> FA4Args:
    """Map our scale, causality and window to FA4's. Call only when `mapping_reasons(spec)` is empty."""
    bounds = spec.window_bounds
    # With segment ids the geometry is in our mask_mod: FA4's forward would drop causal/window next
    # to a mask_mod and its backward would skip the mask_mod beside them (fa4_segments docstring).
    if bounds is None or spec.has_segment_ids:
        return FA4Args(float(spec.scale), False, None, None)
    left, right = bounds
    if left is None and right == 0:  # plain causal: FA4's dedicated (non-local) causal kernel
        return FA4Args(float(spec.scale), True, None, None)
    return FA4Args(float(spec.scale), False, left, right)


def mapping_reasons(spec: Spec) -> list[str]:
    """Why our causal/window semantics cannot be handed to FA4 exactly for `spec` (see the docstring)."""
    why = []
    bounds = spec.window_bounds
    if bounds is None:
        return why
    aligned = spec.has_segment_ids  # our own mask_mod applies the geometry, top-left: nothing to align
    if spec.q_len != spec.kv_len and not aligned:
        why.append(f"causal/local_window_size with sq={spec.q_len} != skv={spec.kv_len}: FA4 aligns "
                   "its mask to the bottom-right corner, ours to the top-left")
    if spec.has_kv_lengths and not aligned:
        why.append("causal/local_window_size together with kv_lengths: FA4 aligns its mask to each "
                   "row's used key length (bottom-right), ours to the top-left")
    left, right = bounds
    if (left is not None and left < 0) or (right is not None and right < 0):
        why.append(f"local_window_size {bounds} with a negative side is not passed to FA4")
    return why


def _sm100_head_dims_ok(d: int, dv: int) -> bool:
    # FA4's sm100 kernels: both dims <= 128, or its two special shapes (mirrors interface.py).
    return (d <= 128 and dv <= 128) or (d, dv) in ((192, 128), (256, 256))


class FA4(Backend):
    name = "fa4"
    description = "FlashAttention-4 CuTe-DSL kernels (sm90/sm100) through JAX FFI; fwd + bwd"
    platforms = ("gpu",)
    dtypes = ("float16", "bfloat16")
    head_dims = (8, 256)
    head_dim_multiple = 8  # FA4 needs 16-byte rows: 8 half-precision elements
    value_dim_differs = False  # FA4 allows it on sm90, but only d == dv is tested here
    supports_bool_mask = False
    supports_bias = False
    supports_bias_grad = False
    supports_causal = True  # exact only with sq == skv: see `mapping_reasons`
    supports_kv_lengths = True  # as FA4's seqused_k
    supports_lse_grad = False  # the backward takes no lse cotangent here
    supports_window = True  # exact only with sq == skv: see `mapping_reasons`
    # Packed sequences on sm90 (`reasons`): FA4's mask_mod, with block sparsity skipping the tiles
    # where no query and key share a segment (fa4_segments).
    supports_segment_ids = True
    skips_segment_tiles = True
    automatic = True  # auto takes it only where a routing table measured it first (unmeasured buckets list it last)

    def unavailable(self) -> list[str]:
        why = super().unavailable()
        if why:
            return why
        missing = [f"{pip} ({mod} is not importable)" for mod, pip in REQUIRED_MODULES
                   if not _importable(mod)]
        if missing:
            return ["needs the packages " + ", ".join(missing) + "; pip install 'jax-attn[fa4]'"]
        cc = gpu_compute_capability()
        if cc is None:
            return ["needs an NVIDIA GPU (compute capability unknown)"]
        if cc[0] not in (9, 10):
            return [f"FA4's kernels here serve compute capability 9.x (Hopper) or 10.x (Blackwell); "
                    f"this GPU is {cc[0]}.{cc[1]}"]
        return []

    def reasons(self, spec, needs=None):
        why = super().reasons(spec, needs)
        why += mapping_reasons(spec)
        cc = gpu_compute_capability() if platform() == "gpu" else None
        if cc is not None and cc[0] == 10 and not _sm100_head_dims_ok(spec.head_dim, spec.value_dim):
            why.append(f"head dims ({spec.head_dim}, {spec.value_dim}) are not served by FA4 on sm100 "
                       "(<= 128, or (192, 128), or (256, 256))")
        if spec.has_segment_ids and cc is not None:
            if cc[0] != 9:
                why.append(f"q_segment_ids/kv_segment_ids are served on sm90 (Hopper) only: the "
                           f"block-sparse tile sizes of FA4's sm100 kernels (q_stage 2, coarse kv "
                           f"blocks) are not mapped here; this GPU is {cc[0]}.{cc[1]}")
            version = installed_version()
            if version is not None and version not in SEGMENT_IDS_VERIFIED_VERSIONS:
                # The block lists rely on FA4 internals (tile sizes, the order it walks the lists,
                # which block masks the sequence end): a different FA4 could skip or over-read
                # keys without an error, so only the versions checked on a GPU take them.
                why.append(f"q_segment_ids/kv_segment_ids are served with flash-attn-4 "
                           f"{', '.join(SEGMENT_IDS_VERIFIED_VERSIONS)} only (installed: {version}): "
                           "the block-sparse tile lists follow that version's kernels")
        return why

    def backward_reasons(self, spec):
        if spec.head_dim in VERIFIED_BACKWARD_HEAD_DIMS:
            return []
        return [f"its backward at head dim {spec.head_dim} is not verified (FA4 4.0.0b36's sm90 backward "
                f"gave wrong gradients at d=40 on an H200; verified: {VERIFIED_BACKWARD_HEAD_DIMS})"]

    def _forward(self, inputs, return_lse):
        from . import fa4_kernels  # late: imports FA4, torch and tvm-ffi
        return fa4_kernels.forward(inputs, fa4_arguments(inputs.spec), return_lse)


def installed_version() -> str | None:
    """flash-attn-4's installed version, or None when it is not installed."""
    try:
        return importlib.metadata.version("flash-attn-4")
    except importlib.metadata.PackageNotFoundError:
        return None


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package missing, or a broken install
        return False
