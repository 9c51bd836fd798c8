"""Block sizes, warps and pipeline stages of the Pallas flash-attention kernels, as data.

`TUNED` is written by `benchmarks/tune_pallas.py` on the device it names; every entry carries the
device and date it was measured on. A lookup that finds no measured entry (another GPU, a head-dim
bucket nobody tuned, the CPU interpreter) falls back to `default_config`, sized to fit the shared
memory of any GPU from compute capability 8.0 on.
"""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class FwdConfig:
    """Forward kernel (and the dQ kernel's shape): one program per `block_q` queries."""

    block_q: int
    block_k: int
    num_warps: int
    num_stages: int


@dataclasses.dataclass(frozen=True)
class BwdConfig:
    """Backward kernels: dK/dV (one program per `block_k_dkv` keys) and dQ (per `block_q_dq`)."""

    block_q_dkv: int
    block_k_dkv: int
    block_q_dq: int
    block_k_dq: int
    num_warps: int
    num_stages: int


@dataclasses.dataclass(frozen=True)
class Config:
    fwd: FwdConfig
    bwd: BwdConfig
    device: str = "default"  # where it was measured
    measured: str = ""  # ISO date of the measurement


def head_dim_bucket(d: int) -> int:
    """The padded head dim the kernel really runs at: a power of two, at least 16 (tensor cores)."""
    return max(16, 1 << (max(d, 1) - 1).bit_length())


def default_config(d: int) -> Config:
    """Conservative choice that compiles everywhere; smaller tiles as the head dim grows."""
    dp = head_dim_bucket(d)
    if dp <= 64:
        return Config(FwdConfig(128, 64, 4, 3), BwdConfig(64, 64, 64, 64, 4, 2))
    if dp <= 128:
        return Config(FwdConfig(128, 64, 8, 3), BwdConfig(64, 64, 64, 64, 8, 2))
    return Config(FwdConfig(64, 32, 8, 2), BwdConfig(32, 32, 32, 32, 8, 1))


# (device key, dtype, head-dim bucket) -> Config. The device key is "sm<major><minor>".
# BEGIN TUNED (written by benchmarks/tune_pallas.py; edit there, not here)
TUNED: dict[tuple[str, str, int], Config] = {
    ('sm90', 'bfloat16', 64): Config(
        FwdConfig(64, 64, 4, 3),
        BwdConfig(64, 64, 64, 64, 4, 3),
        device='NVIDIA H100 80GB HBM3', measured='2026-11-23'),
    ('sm90', 'bfloat16', 128): Config(
        FwdConfig(128, 128, 8, 3),
        BwdConfig(64, 64, 64, 64, 4, 2),
        device='NVIDIA H100 80GB HBM3', measured='2026-11-23'),
}
# END TUNED


def device_key(compute_capability: tuple[int, int] | None) -> str | None:
    return None if compute_capability is None else f"sm{compute_capability[0]}{compute_capability[1]}"


def get_config(d: int, dtype: str, compute_capability: tuple[int, int] | None = None) -> Config:
    """The measured config for this GPU, dtype and head dim (float16 borrows bfloat16's), else
    `default_config(d)`."""
    device, bucket = device_key(compute_capability), head_dim_bucket(d)
    found = TUNED.get((device, str(dtype), bucket))
    if found is None and str(dtype) == "float16":
        # Same element size and tensor-core rate as bf16, so the same tiles fit and win.
        found = TUNED.get((device, "bfloat16", bucket))
    return found or default_config(d)


# Shared memory a block may use (bytes), by compute capability; other GPUs get the smallest.
SHARED_MEMORY = {(9, 0): 232448, (8, 0): 166912}
SHARED_MEMORY_MIN = 101376


def forward_shared_bytes(fwd: FwdConfig, d: int, dv: int, itemsize: int, bias_itemsize: int = 0) -> int:
    """Estimate of the forward kernel's shared memory: the Q tile plus, per pipeline stage, the K
    and V tiles and (with a full bias) the bias tile."""
    dp, dvp = head_dim_bucket(d), head_dim_bucket(dv)
    stage = fwd.block_k * (dp + dvp) * itemsize + fwd.block_q * fwd.block_k * bias_itemsize
    return fwd.block_q * dp * itemsize + fwd.num_stages * stage


def fit_forward(config: Config, d: int, dv: int, itemsize: int, bias_itemsize: int,
                compute_capability: tuple[int, int] | None) -> Config:
    """`config` with a forward that fits the GPU's shared memory once a full bias tile rides along
    in every pipeline stage (tuned entries were measured without one): fewer stages first, then
    narrower key blocks."""
    if compute_capability is None or not bias_itemsize:
        return config
    limit = SHARED_MEMORY.get(tuple(compute_capability), SHARED_MEMORY_MIN)
    fwd = config.fwd
    while forward_shared_bytes(fwd, d, dv, itemsize, bias_itemsize) > limit:
        if fwd.num_stages > 2:
            fwd = dataclasses.replace(fwd, num_stages=fwd.num_stages - 1)
        elif fwd.block_k > 16:
            fwd = dataclasses.replace(fwd, block_k=fwd.block_k // 2)
        else:
            break
    return config if fwd == config.fwd else dataclasses.replace(config, fwd=fwd)

