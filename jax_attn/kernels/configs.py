"""Block sizes, warps and pipeline stages of the Pallas flash-attention kernels.

The measured choices are data: `jax_attn/data/pallas_tuning.json` (written by
`benchmarks/tune_pallas.py --apply`), keyed by the GPU's device kind with the generation's table
as the fallback, read through `jax_attn.data`; every entry carries the device and date it was
measured on. `TUNED` is the dict-like view of it that `get_config` reads. A lookup that finds no
measured entry (a GPU generation nobody tuned, a head-dim bucket nobody tuned, the CPU
interpreter) falls back to `default_config`, sized to fit the shared memory of any GPU from
compute capability 8.0 on.
"""
from __future__ import annotations

import collections.abc
import dataclasses

from .. import data


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
    """The padded head dim the kernel really runs at: a power of two, at least 16 (tensor cores).

    An int, the tuning tables' key; the routing table's head-dim label is `autoselect.head_dim_label`."""
    return max(16, 1 << (max(d, 1) - 1).bit_length())


def default_config(d: int) -> Config:
    """Conservative choice that compiles everywhere; smaller tiles as the head dim grows."""
    dp = head_dim_bucket(d)
    if dp <= 64:
        return Config(FwdConfig(128, 64, 4, 3), BwdConfig(64, 64, 64, 64, 4, 2))
    if dp <= 128:
        return Config(FwdConfig(128, 64, 8, 3), BwdConfig(64, 64, 64, 64, 8, 2))
    return Config(FwdConfig(64, 32, 8, 2), BwdConfig(32, 32, 32, 32, 8, 1))


DATA = "pallas_tuning"  # jax_attn/data/pallas_tuning.json


def _config(entry: dict) -> Config:
    return Config(FwdConfig(**entry["fwd"]), BwdConfig(**entry["bwd"]),
                  device=entry["device"], measured=entry["date"])


class _Tuned(collections.abc.MutableMapping):
    """(generation "sm<major><minor>", dtype, head-dim bucket) -> Config, read from
    `jax_attn/data/pallas_tuning.json`: for a generation, this GPU's own table when it is of that
    generation and was measured, else the generation's table (logged once), so an H100 reads the
    H100's entries and an H200 the sm90 fallback. Iterating lists the generations in the data.
    Assignments are process-local overrides read first (`benchmarks/pallas_gpu.py --tune` puts a
    fresh tuning here); `del` removes an override."""

    def __init__(self):
        self.overrides: dict = {}

    @staticmethod
    def _table(generation: str) -> dict:
        kind, gen = data.device()
        return data.load(DATA, (kind if gen == generation else None, generation))

    def __getitem__(self, key):
        if key in self.overrides:
            return self.overrides[key]
        generation, dtype, bucket = key
        entry = self._table(generation).get(f"{dtype}|{bucket}") if generation else None
        if entry is None:
            raise KeyError(key)
        return _config(entry)

    def __iter__(self):
        keys = dict.fromkeys(self.overrides)
        for generation in filter(data.is_generation, data.tables(DATA)):
            for name in self._table(generation):
                dtype, bucket = name.split("|")
                keys[(generation, dtype, int(bucket))] = None
        return iter(keys)

    def __len__(self):
        return sum(1 for _ in self)

    def __setitem__(self, key, config):
        self.overrides[key] = config

    def __delitem__(self, key):
        del self.overrides[key]

    def __repr__(self):
        return f"TUNED({dict(self.items())!r})"


TUNED = _Tuned()


def device_key(compute_capability: tuple[int, int] | None) -> str | None:
    return None if compute_capability is None else f"sm{compute_capability[0]}{compute_capability[1]}"


def get_config(d: int, dtype: str, compute_capability: tuple[int, int] | None = None) -> Config:
    """The measured config for this GPU (its device kind's, else its generation's: `TUNED`),
    dtype and head dim (float16 borrows bfloat16's), else `default_config(d)`."""
    device, bucket = device_key(compute_capability), head_dim_bucket(d)
    if device is None:  # no GPU: the interpreter
        return default_config(d)
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

