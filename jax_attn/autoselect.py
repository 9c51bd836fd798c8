"""Automatic selection: an ordered preference of backends for a call, from measured data.

`routing_table.json` (written by `python -m jax_attn bench --update-routing`) maps a bucket
(platform/GPU, dtype, head-dim bucket, sequence bucket) to backends ordered fastest first, once
for training (`preferences`: measured forward+backward) and once for calls that nothing
differentiates (`preferences_forward`: measured forward; missing = the training order).
Buckets it does not cover use the rules below. Backends that cannot serve are skipped by the
router, so a preference only orders; it never forces.
"""
from __future__ import annotations

import functools
import json
import pathlib

from .backends.base import gpu_compute_capability, platform
from .contract import Spec

TABLE_PATH = pathlib.Path(__file__).with_name("routing_table.json")
# Above this many score bytes (b*n*sq*skv*4) the materializing backends are not chosen.
SCORE_BYTES_BUDGET = 1 << 30


def head_dim_bucket(d: int) -> str:
    return "d<=64" if d <= 64 else "d<=128" if d <= 128 else "d>128"


def seq_bucket(skv: int) -> str:
    return "skv<=512" if skv <= 512 else "skv<=8192" if skv <= 8192 else "skv>8192"


def device_key() -> str:
    cc = gpu_compute_capability()
    return f"sm{cc[0]}{cc[1]}" if cc else platform()


def bucket_key(device: str, dtype: str, head_dim: int, kv_len: int) -> str:
    return "|".join((device, dtype, head_dim_bucket(head_dim), seq_bucket(kv_len)))


def bucket(spec: Spec) -> str:
    return bucket_key(device_key(), spec.dtype, spec.head_dim, spec.kv_len)


# Mode -> the routing-table key holding its orders.
TABLE_KEYS = {"train": "preferences", "forward": "preferences_forward"}


def orders(doc: dict, mode: str) -> dict:
    """Bucket -> backends of a routing-table document for `mode`; a bucket without a forward
    order uses its training one."""
    if mode not in TABLE_KEYS:
        raise ValueError(f"mode must be one of {tuple(TABLE_KEYS)}, got {mode!r}")
    train = doc.get(TABLE_KEYS["train"], {})
    return train if mode == "train" else {**train, **doc.get(TABLE_KEYS[mode], {})}


@functools.lru_cache(maxsize=None)
def table(mode: str = "train") -> dict:
    """Bucket -> backends, fastest first, for `mode` ("train" or "forward") on this machine."""
    return orders(json.loads(TABLE_PATH.read_text()) if TABLE_PATH.exists() else {}, mode)


def preference(spec: Spec, mode: str = "train") -> list[str]:
    """Backends to try, best first, for `spec` on this machine; `mode` "train" when the call is
    differentiated, "forward" when nothing differentiates it. Measured orders first; backends
    that hold the whole score matrix (`quadratic_memory`) go last when it would exceed
    `SCORE_BYTES_BUDGET`."""
    from .backends import BACKENDS  # late: the registry imports the kernels
    measured = table(mode).get(bucket(spec))
    if measured:
        order = list(measured)
    elif platform() == "gpu":
        order = ["cudnn", "pallas", "xla", "chunked"]
    else:
        order = ["xla", "chunked"]
    order += [n for n in BACKENDS if n not in order]
    if spec.batch * spec.heads * spec.q_len * spec.kv_len * 4 > SCORE_BYTES_BUDGET:
        order = ([n for n in order if not BACKENDS[n].quadratic_memory]
                 + [n for n in order if BACKENDS[n].quadratic_memory])
    return order
