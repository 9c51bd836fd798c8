"""Configuration of the Hopper Mosaic GPU attention kernels (`mosaic_attention.py`).

What the kernels can serve and how they are tuned: the guarded import of the Mosaic GPU Pallas
dialect (`available`), `MosaicConfig` and its per-head-dim defaults, the head dims the kernels run
at (`head_dim_padded`: 64, 128 or 256; the forward also 48, `MosaicCall.fwd_dp`), the shape buckets where the Mosaic forward measured faster
than the Triton kernel (`FASTER_THAN_TRITON_SM90`, read by the `pallas` backend's automatic
choice; the measurements are data, `jax_attn/data/mosaic_routing.json`), `unsupported`, and
`MosaicCall`, the hashable description of one call that the forward, the backward kernels and
the custom VJP share (`_Static` is its former name, kept as an alias).
"""
from __future__ import annotations

import collections.abc
import dataclasses
import math

import jax.numpy as jnp

from .. import data

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)

try:  # Mosaic GPU is experimental; a JAX without it must still import jax_attn.
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu
    _IMPORT_ERROR = None
except Exception as e:  # pragma: no cover - depends on the installed JAX
    pl = plgpu = None
    _IMPORT_ERROR = f"{type(e).__name__}: {e}"


def available() -> str | None:
    """None when the Mosaic GPU Pallas dialect can be imported, else why not."""
    return _IMPORT_ERROR


# ---------------------------------------------------------------------------------------------
# Configuration


@dataclasses.dataclass(frozen=True)
class MosaicConfig:
    block_q: int = 64  # query rows per compute warpgroup (a CTA has `compute_warpgroups`)
    block_kv: int = 128  # keys per pipeline step
    stages: int = 2  # shared-memory slots of K/V in flight
    # Which CTAs run side by side (Mosaic launches the last grid dimension as CUDA's x). True:
    # the sequence tiles of one head, so they share its K/V (forward, dQ) or Q/dO (dK/dV) in L2.
    # False: the heads, whose K/V re-read from DRAM once they outgrow L2. Measurements and the
    # profile: benchmarks/results/2026-11-23-h100-mosaic-grid/README.md.
    q_major_grid: bool = True
    bwd_stages: int = 2  # shared-memory slots of the tiles the backward kernels stream
    # One backward kernel instead of two: the dK/dV kernel also adds each tile's dQ share into
    # a float32 dQ with TMA reduce-adds (5 matmuls per tile instead of 7; `mosaic_backward`).
    # Off: on the H200 (benchmarks/results/2026-12-01-h200-round8/, once its register spills
    # were gone) forward+backward at d = 128 is 3-6% behind the two kernels at 4608 tokens
    # (1.928 ms against 1.879 in that run, 1.814-1.823 in round 7) and 1.5% ahead at 16k
    # (36.39 against 36.95): the kernel is bound by L2, where its reduce-adds land. At d = 64
    # and 40 the runs disagree (round 7: level at 64, 5% faster at 40; round 8: 7% faster at
    # 64 against a first row that also timed its forward slow, level at 40). And its float32
    # dQ sums in arrival order (not bitwise reproducible from run to run).
    bwd_fused: bool = False
    # Fused at d = 128: the two warpgroups split dQ's columns instead of its keys, so each step
    # adds one 64x128 float32 tile per CTA instead of two (one barrier per step more). On the
    # H200 (round 8, no spills) 1.902 ms at 4608 tokens and 36.83 at 16k: between the two.
    bwd_dq_split: bool = False
    # The backward kernels' registers per thread, (compute, producer) warpgroups, as
    # `fwd_registers` (2 x 128 x compute + 128 x producer <= 65536).
    bwd_registers: tuple[int, int] = (232, 40)
    # Intra-warpgroup overlap in the forward (FlashAttention-3's second technique): each step
    # issues S = Q K^T of the next key block and O += P V of this one back to back, waits for
    # the first only, and runs the next block's softmax while P V is on the tensor cores. It
    # holds two P tiles and an S tile live beside O, so it wants 128-key blocks.
    overlap: bool = False
    # With overlap, the warpgroups' turns on the tensor cores through hardware named barriers
    # (`bar.sync` / `bar.arrive`, inline PTX through `plgpu.inline_mgpu`, as FA3/FA4 and
    # tokamax's Pallas kernel do) instead of shared-memory mbarriers, which the waiting
    # warpgroup polls. Off: correct on the H200 but within +-3% of the mbarrier turns, and the
    # long-scoreboard stalls it was meant to remove barely move (2.58 -> 2.48 cycles per
    # instruction at 16k tokens, FA4 0.77; benchmarks/results/2026-12-01-h200-round9/).
    # Interpret mode keeps mbarriers.
    named_turns: bool = False
    # The forward's registers per thread, (compute, producer) warpgroups: compute_warpgroups x
    # 128 x compute + 128 x producer must fit the SM's 65536 (FA4 runs 240 / 24 with overlap).
    fwd_registers: tuple[int, int] = (232, 40)
    # The forward runs head dims 33-48 at 48 instead of 64 (d = 40: a quarter less tensor work,
    # as FA4 does), its shared-memory tiles swizzled at 32 bytes; the backward still runs them
    # at 64. Only 48 is verified on an H200, so smaller head dims stay at 64.
    narrow_head_dim: bool = False
    # Compute warpgroups of the forward (a CTA covers this many x block_q queries): 3 needs
    # `overlap` (their turns go round robin) and registers to match, e.g. (160, 32) as FA4's
    # 192-row tiles at d <= 64. The backward keeps two.
    compute_warpgroups: int = 2

    def __post_init__(self):
        if self.compute_warpgroups < 1:
            raise ValueError(f"MosaicConfig.compute_warpgroups must be >= 1, got "
                             f"{self.compute_warpgroups}")
        for name in ("fwd_registers", "bwd_registers"):
            regs = tuple(getattr(self, name))
            object.__setattr__(self, name, regs)  # hashable (JSON gives lists)
            if len(regs) != 2 or any(r % 8 or not 24 <= r <= 256 for r in regs):
                raise ValueError(f"MosaicConfig.{name} must be two multiples of 8 in 24..256, "
                                 f"got {regs}")
        # The forward's sum depends on compute_warpgroups (checked where it launches); the
        # backward always runs two.
        if 128 * (2 * self.bwd_registers[0] + self.bwd_registers[1]) > 65536:
            raise ValueError(f"MosaicConfig.bwd_registers={self.bwd_registers}: 2 compute "
                             "warpgroups and a producer exceed the SM's 65536 registers")


def head_dim_padded(d: int) -> int | None:
    """The head dim the kernel runs at, or None when it is not supported (d > 256)."""
    for dp in (64, 128, 256):
        if d <= dp:
            return dp
    return None


def default_config(d: int) -> MosaicConfig:
    dp = head_dim_padded(d)
    if dp == 256:  # 64x256 f32 accumulator = 128 registers/thread; keep S and smem small
        return MosaicConfig(block_q=64, block_kv=64, stages=2)
    # Chosen with `benchmarks/mosaic_gpu.py --tune`: 256-key blocks at d = 64 (half the barrier
    # passes per key, no register spills), backward pipeline depth 4 at d = 64 and 3 at d = 128
    # (4 would not leave shared memory to spare). Measurements:
    # benchmarks/results/2026-11-23-h100-mosaic-grid/README.md and
    # benchmarks/results/2026-11-23-h100-mosaic-bwd/README.md.
    # Intra-warpgroup overlap at d = 128 only: on an H200 it lifts the forward 3-4% (4608 and
    # 16k tokens); at d = 64 and 40 it is 5-15% slower (its 128-key blocks lose to 256 without
    # it). benchmarks/results/2026-11-30-h200-round4/README.md.
    # Narrow head dims (33-48 at 48): d = 40 at 48 is 8% faster forward (same results README);
    # the forward is softmax-bound there, so not the 25% of the matmuls.
    if dp == 64:
        return MosaicConfig(block_q=64, block_kv=256, stages=2, bwd_stages=4,
                            narrow_head_dim=True)
    return MosaicConfig(block_q=64, block_kv=128, stages=2, bwd_stages=3, overlap=True)


class _FasterThanTriton(collections.abc.Mapping):
    """Shape bucket -> whether the Mosaic forward measured faster than the Triton kernel, read
    from `jax_attn/data/mosaic_routing.json`: this GPU's own table when it is a measured Hopper,
    else the sm90 table (logged once on an unmeasured Hopper). Keys: (padded head dim, kind),
    kind as `shape_bucket` says ("cross", "short_q", "self"). The `pallas` backend's automatic
    choice (JAX_ATTN_PALLAS_KERNEL=auto) uses Mosaic only for buckets that map to True; an
    unlisted bucket was not measured and stays on Triton."""

    @staticmethod
    def _table() -> dict:
        kind, generation = data.device()
        return data.load(MOSAIC_DATA, (kind if generation == "sm90" else None, "sm90"))

    def __getitem__(self, bucket):
        entry = self._table().get("|".join(map(str, bucket)))
        if entry is None:
            raise KeyError(bucket)
        return bool(entry["faster"])

    def __iter__(self):
        for name in self._table():
            dp, kind = name.split("|")
            yield int(dp), kind

    def __len__(self):
        return len(self._table())

    def __repr__(self):
        return f"FASTER_THAN_TRITON_SM90({dict(self.items())!r})"


MOSAIC_DATA = "mosaic_routing"  # jax_attn/data/mosaic_routing.json
FASTER_THAN_TRITON_SM90 = _FasterThanTriton()


def shape_bucket(d: int, sq: int, skv: int) -> tuple[int | None, str]:
    """(padded head dim, kind): kind "cross" for fewer than 256 keys, else "short_q" for fewer
    than 128 queries (a CTA computes 128 query rows, so a short query block wastes most of it),
    else "self"."""
    kind = "cross" if skv < 256 else "short_q" if sq < 128 else "self"
    return head_dim_padded(d), kind


def unsupported(*, dtype, d, dv, has_full_bias, is_causal) -> list[str]:
    """Why the Mosaic kernel cannot serve these inputs (empty when it can)."""
    why = []
    if _IMPORT_ERROR is not None:
        why.append(f"Mosaic GPU Pallas is not importable ({_IMPORT_ERROR})")
    if jnp.dtype(dtype).name not in ("bfloat16", "float16"):
        why.append(f"dtype {jnp.dtype(dtype).name} (the Mosaic kernel takes bfloat16/float16)")
    if head_dim_padded(d) is None:
        why.append(f"head dim {d} > 256")
    if dv != d:
        why.append(f"dv ({dv}) != d ({d})")
    if has_full_bias:
        why.append("a full (sq, skv) mask or bias (the Mosaic kernel reads per-key masks only)")
    if is_causal:
        why.append("causal masking (not implemented in the Mosaic kernel)")
    return why


# ---------------------------------------------------------------------------------------------
# Static description of one call (hashable: a custom_vjp nondiff argument)


@dataclasses.dataclass(frozen=True)
class MosaicCall:
    """Everything one call of the Mosaic kernels specializes on (shapes, masks, tuning)."""

    scale: float
    layout: str
    sq: int
    skv: int
    d: int
    groups: int
    key_bias_dims: tuple[bool, bool] | None  # kernel key bias: (varies over b, varies over n)
    orig_key_bias_dims: tuple[bool, bool] | None  # the caller's mask, for the backward
    has_kv_lengths: bool
    config: MosaicConfig
    interpret: bool
    backward: str  # "mosaic" or "triton"

    @property
    def dp(self):
        return head_dim_padded(self.d)

    @property
    def fwd_dp(self):
        """The head dim the forward kernel runs at (`MosaicConfig.narrow_head_dim`)."""
        if self.config.narrow_head_dim and 32 < self.d <= 48:
            return 48
        return self.dp

    @property
    def sq_pad(self):
        t = self.config.compute_warpgroups * self.config.block_q
        return -(-self.sq // t) * t

    @property
    def skv_pad(self):
        t = self.config.block_kv
        return -(-self.skv // t) * t


def smem_swizzle(dp: int, itemsize: int = 2) -> int:
    """The widest TMA/wgmma swizzle (bytes) whose span divides a row of `dp` elements: 128 for
    d = 64, 128, 256; 64 at d = 32; 32 at d = 16 and 48 (a 96-byte row)."""
    for swizzle in (128, 64, 32):
        if (dp * itemsize) % swizzle == 0:
            return swizzle
    raise ValueError(f"no swizzle divides a row of {dp} x {itemsize} bytes")


_Static = MosaicCall  # the former name, still imported by callers outside this package's kernels


def _grid(cfg, batch, heads, tiles):
    """The grid (or its names) in launch order; the last dimension varies fastest (CUDA's x).

    q_major_grid: (batch, heads, tiles), tiles fastest. Else (tiles, heads, batch).
    """
    return (batch, heads, tiles) if cfg.q_major_grid else (tiles, heads, batch)
