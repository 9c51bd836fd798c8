"""Automatic selection: an ordered preference of backends for a call, from measured data.

The routing data, `jax_attn/data/routing.json` (written by `python -m jax_attn bench
--write-routing/--update-routing`, `jax_attn/routing_writer.py`), holds one table per GPU device
kind, read through `jax_attn.data` (the per-user cache first; an unmeasured GPU gets its
generation's table, with a logged note). A table maps a bucket (platform/GPU generation, dtype,
head-dim bucket, sequence bucket) to backends ordered fastest first, once for training
(`preferences`: measured forward+backward) and once for calls that nothing differentiates
(`preferences_forward`: measured forward; missing = the training order), and, where `jax-attn
tune --lossy` measured lossy backends (8-bit) that passed the float64 gate, once for calls
nothing differentiates with those among them (`preferences_forward_lossy`: what the opt-in
`backend="auto+8bit"` reads; missing = the forward order, no lossy backend).
Buckets it does not cover use the rules below. Backends that cannot serve are skipped by the
router, so a preference only orders; it never forces.
"""
from __future__ import annotations

import functools
import itertools
import pathlib
import warnings

from . import data
from .backends.base import gpu_compute_capability, platform
from .contract import Spec

# The routing data. Pointed at another file (`bench --write-routing PATH` output, tests), that
# file is read instead: one device's table as it is, or a document keyed by device kind.
TABLE_PATH = data.path("routing")
# Packed calls (segment ids) among the backends that skip other segments' tiles: pallas first.
# FA4 with ids took 0.9-1.4x pallas's time at 8192 tokens but 4-5x at 2048, where its Python
# interface's per-call work dominates (H200, 2026-11-30, results/2026-11-30-h200-round5/fa4seg);
# the unpacked tables, which put fa4 first at d <= 128, do not measure this.
PACKED_ORDER = ("pallas", "fa4")
# Above this many score bytes (b*n*sq*skv*4) the materializing backends are not chosen.
SCORE_BYTES_BUDGET = 1 << 30


def head_dim_label(d: int) -> str:
    """The head-dim part of a routing-table key ("d<=64", "d<=128", "d>128"): a label, unlike
    `kernels.configs.head_dim_bucket`, which is the padded head dim a kernel runs at."""
    return "d<=64" if d <= 64 else "d<=128" if d <= 128 else "d>128"


def head_dim_bucket(d: int) -> str:
    """Deprecated name of `head_dim_label` (it clashed with `kernels.configs.head_dim_bucket`)."""
    warnings.warn("jax_attn.autoselect.head_dim_bucket is renamed head_dim_label", DeprecationWarning,
                  stacklevel=2)
    return head_dim_label(d)


def seq_bucket(skv: int) -> str:
    return "skv<=512" if skv <= 512 else "skv<=8192" if skv <= 8192 else "skv>8192"


def device_key() -> str:
    cc = gpu_compute_capability()
    return f"sm{cc[0]}{cc[1]}" if cc else platform()


def bucket_key(device: str, dtype: str, head_dim: int, kv_len: int) -> str:
    return "|".join((device, dtype, head_dim_label(head_dim), seq_bucket(kv_len)))


def bucket(spec: Spec) -> str:
    return bucket_key(device_key(), spec.dtype, spec.head_dim, spec.kv_len)


# Mode -> the routing-table key holding its orders.
TABLE_KEYS = {"train": "preferences", "forward": "preferences_forward",
              "lossy": "preferences_forward_lossy"}


def orders(doc: dict, mode: str) -> dict:
    """Bucket -> backends of a routing-table document for `mode`; a bucket without a forward
    order uses its training one."""
    if mode not in TABLE_KEYS:
        raise ValueError(f"mode must be one of {tuple(TABLE_KEYS)}, got {mode!r}")
    if mode == "lossy":  # measured with lossy backends, or nothing: no fallback order
        return doc.get(TABLE_KEYS[mode], {})
    train = doc.get(TABLE_KEYS["train"], {})
    return train if mode == "train" else {**train, **doc.get(TABLE_KEYS[mode], {})}


def routing_table() -> dict:
    """This machine's routing table (`source`, `preferences`, `preferences_forward`, `scores`):
    its device kind's, else its generation's, else `{}`."""
    if pathlib.Path(TABLE_PATH).resolve() == data.path("routing"):
        return data.load("routing")
    doc = data.read(TABLE_PATH)
    return data.lookup(doc["tables"], data.device(), str(TABLE_PATH)) if "tables" in doc else doc


@functools.lru_cache(maxsize=None)
def table(mode: str = "train") -> dict:
    """Bucket -> backends, fastest first, for `mode` ("train" or "forward") on this machine."""
    return orders(routing_table(), mode)


def lossy_unranked(spec: Spec) -> str | None:
    """Why `auto+8bit` routes `spec` as `auto` (None: this machine's routing data ranks lossy
    backends for its bucket, and `preference(spec, "lossy")` puts them first)."""
    if spec.has_segment_ids:
        return "packed calls (segment ids) route as auto: the 8-bit kernels were timed unpacked"
    if not table("lossy").get(bucket(spec)):
        return (f"no lossy backend measured for bucket {bucket(spec)} on this GPU "
                "(`python -m jax_attn tune --lossy` measures them): routed as auto")
    return None


def preference(spec: Spec, mode: str = "train") -> list[str]:
    """Backends to try, best first, for `spec` on this machine; `mode` "train" when the call is
    differentiated, "forward" when nothing differentiates it, "lossy" for the same with the
    lossy backends the data ranked (`auto+8bit`; the forward order where none were measured,
    and never a lossy backend the data did not rank). Measured orders first; backends
    that hold the whole score matrix (`quadratic_memory`) go last when it would exceed
    `SCORE_BYTES_BUDGET`; with segment ids, backends that skip other segments' tiles go first."""
    from .backends import BACKENDS  # late: the registry imports the kernels
    if mode == "lossy":
        forward = preference(spec, "forward")
        if lossy_unranked(spec):
            return forward
        # The lossy backends the data put ahead of every exact one, then the forward order as
        # it stands now (a lossy order may be older than it).
        measured = table("lossy")[bucket(spec)]
        ahead = list(itertools.takewhile(lambda n: n in BACKENDS and BACKENDS[n].lossy, measured))
        return ahead + forward
    measured = table(mode).get(bucket(spec))
    if measured:
        order = [n for n in measured if n in BACKENDS]
    elif platform() == "gpu":
        order = ["cudnn", "pallas", "xla", "chunked"]
    else:
        order = ["xla", "chunked"]
    ranked = set(order)  # measured (or the default order); the rest is appended unmeasured
    # (lossy ones only where ranked: `auto+8bit` may take what this order holds)
    order += [n for n in BACKENDS if n not in order and not BACKENDS[n].lossy]
    if spec.batch * spec.heads * spec.q_len * spec.kv_len * 4 > SCORE_BYTES_BUDGET:
        order = ([n for n in order if not BACKENDS[n].quadratic_memory]
                 + [n for n in order if BACKENDS[n].quadratic_memory])
    if spec.has_segment_ids:
        # The measured orders are for unpacked calls. With segment ids, cuDNN and XLA take a full
        # (sq, skv) mask and do every tile: 4-6x slower than the Triton kernels on 4 packed
        # prompts of 4096 tokens (H200, 2026-11-30, benchmarks/packed_gpu.py).
        # Only those the order ranked (an unmeasured or failed one stays where it was), among
        # them the measured packed order (PACKED_ORDER) rather than the unpacked one.
        skipping = sorted((n for n in order if BACKENDS[n].skips_segment_tiles and n in ranked),
                          key=lambda n: PACKED_ORDER.index(n) if n in PACKED_ORDER else len(PACKED_ORDER))
        order = skipping + [n for n in order if n not in skipping]
    return order
