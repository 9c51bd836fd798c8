"""Measure block sizes / warps / stages of the Pallas flash-attention kernels and write the table.

On the GPU:   PYTHONPATH=. python benchmarks/tune_pallas.py --out tuned.json
Then here:    python benchmarks/tune_pallas.py --apply tuned.json
              (merges the picks into jax_attn/data/pallas_tuning.json under the device kind they
              were measured on; `--data PATH` writes another file, e.g. the per-user cache
              `jax_attn.data.cache_path("pallas_tuning")`). Keep tuned.json in benchmarks/results/.

Forward candidates are timed on the forward alone; backward candidates on forward + backward with
the best forward config. Candidates that fail to compile (shared memory, registers) are skipped
with their error logged. Each (device, dtype, head-dim bucket) gets the fastest of its candidates.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import pathlib
import statistics
import time

log = logging.getLogger("tune_pallas")

FWD_CANDIDATES = {  # (block_q, block_k, num_warps, num_stages)
    64: [(128, 64, 4, 3), (128, 128, 8, 3), (128, 128, 8, 4), (64, 64, 4, 3), (64, 64, 4, 4),
         (64, 128, 4, 3), (64, 128, 4, 2), (128, 64, 8, 3)],
    128: [(128, 64, 8, 3), (128, 128, 8, 2), (128, 128, 8, 3), (128, 128, 8, 4), (128, 64, 8, 4),
          (64, 128, 4, 3), (64, 64, 4, 3), (128, 128, 4, 3)],
}
BWD_CANDIDATES = {  # (block_q_dkv, block_k_dkv, block_q_dq, block_k_dq, num_warps, num_stages)
    64: [(64, 64, 64, 64, 4, 2), (64, 64, 64, 64, 4, 3), (32, 128, 128, 32, 4, 3),
         (64, 128, 128, 64, 8, 2), (64, 128, 128, 64, 8, 3), (32, 64, 64, 32, 4, 3),
         (64, 128, 128, 64, 4, 2), (128, 128, 128, 128, 8, 2)],
    128: [(64, 64, 64, 64, 8, 2), (64, 64, 64, 64, 4, 2), (32, 128, 128, 32, 8, 2),
          (64, 128, 128, 64, 8, 2), (64, 128, 128, 64, 8, 3), (32, 64, 64, 32, 4, 2),
          (64, 64, 64, 64, 8, 3), (32, 128, 128, 64, 8, 3)],
}
# (b, n, s, d) self-attention shape each bucket is tuned on (the diffusion shapes).
TUNE_SHAPES = {64: (2, 10, 4096, 64), 128: (1, 24, 4608, 128)}


def time_ms(fn, *args, reps=20, inner=5):
    """Median over `reps` of the mean of `inner` back-to-back calls (dispatch stays async)."""
    import jax

    jax.block_until_ready(fn(*args))
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(inner):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) * 1e3 / inner)
    return statistics.median(times)


def tune_bucket(bucket, dtype_name="bfloat16"):
    import jax
    import jax.numpy as jnp

    from jax_attn.arrays import random_normal
    from jax_attn.kernels import configs
    from jax_attn.kernels.flash_attention import flash_attention

    b, n, s, d = TUNE_SHAPES[bucket]
    dtype = jnp.dtype(dtype_name)
    keys = jax.random.split(jax.random.key(0), 4)
    q, k, v, do = (random_normal(kk, (b, s, n, d), dtype) for kk in keys)
    base = configs.default_config(d)

    def fwd_fn(cfg):
        return jax.jit(lambda q, k, v: flash_attention(q, k, v, layout="bsnd", config=cfg))

    def fwd_bwd_fn(cfg):
        def f(q, k, v, do):
            out, vjp = jax.vjp(lambda q, k, v: flash_attention(q, k, v, layout="bsnd", config=cfg),
                               q, k, v)
            return vjp(do)
        return jax.jit(f)

    results = {"fwd": [], "bwd": []}
    best_fwd, best_t = base.fwd, float("inf")
    for c in FWD_CANDIDATES[bucket]:
        cfg = dataclasses.replace(base, fwd=configs.FwdConfig(*c))
        try:
            t = time_ms(fwd_fn(cfg), q, k, v, reps=20, inner=5)
        except Exception as e:  # noqa: BLE001 - a candidate that does not compile is skipped
            log.warning("bucket %d fwd %s failed: %s", bucket, c, str(e).splitlines()[0][:200])
            continue
        log.info("bucket %d fwd %s: %.3f ms", bucket, c, t)
        results["fwd"].append((c, t))
        if t < best_t:
            best_fwd, best_t = cfg.fwd, t
    best_bwd, best_tb = base.bwd, float("inf")
    for c in BWD_CANDIDATES[bucket]:
        cfg = configs.Config(best_fwd, configs.BwdConfig(*c))
        try:
            t = time_ms(fwd_bwd_fn(cfg), q, k, v, do, reps=10, inner=3)
        except Exception as e:  # noqa: BLE001
            log.warning("bucket %d bwd %s failed: %s", bucket, c, str(e).splitlines()[0][:200])
            continue
        log.info("bucket %d fwd+bwd %s: %.3f ms", bucket, c, t)
        results["bwd"].append((c, t))
        if t < best_tb:
            best_bwd, best_tb = cfg.bwd, t
    return configs.Config(best_fwd, best_bwd), results


def run(out_path):
    import jax

    from jax_attn.backends.base import gpu_compute_capability
    from jax_attn.kernels import configs

    device = jax.devices()[0].device_kind
    key = configs.device_key(gpu_compute_capability())
    today = datetime.date.today().isoformat()
    entries, raw = [], {}
    for bucket in TUNE_SHAPES:
        cfg, results = tune_bucket(bucket)
        raw[bucket] = results
        entries.append({"key": [key, "bfloat16", bucket], "fwd": dataclasses.asdict(cfg.fwd),
                        "bwd": dataclasses.asdict(cfg.bwd), "device": device, "measured": today})
        log.info("bucket %d best: %s", bucket, cfg)
    pathlib.Path(out_path).write_text(json.dumps({"entries": entries, "raw": raw}, indent=1))
    return entries


def apply(json_path, data_path=None):
    """Merge a tuning run's picks (`run`'s JSON) into the Pallas tuning data (default the
    package's, `jax_attn/data/pallas_tuning.json`): each entry under the device kind it was
    measured on, keyed `dtype|head-dim bucket`, with its device and date; the first device
    measured for a generation becomes that generation's fallback."""
    from jax_attn import data
    from jax_attn.kernels import configs

    data_path = pathlib.Path(data_path or data.path(configs.DATA))
    for e in json.loads(pathlib.Path(json_path).read_text())["entries"]:
        generation, dtype, bucket = e["key"]
        table = data.read(data_path).get("tables", {}).get(e["device"])
        table = dict(table) if isinstance(table, dict) else {}
        table[f"{dtype}|{bucket}"] = {"fwd": e["fwd"], "bwd": e["bwd"], "device": e["device"],
                                      "date": e["measured"], "source": str(json_path)}
        data.write(data_path, e["device"], table, generation)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="tuned.json")
    p.add_argument("--apply", help="a tuning JSON to merge into the tuning data (no GPU needed)")
    p.add_argument("--data", help="with --apply: the data file to write (default "
                                  "jax_attn/data/pallas_tuning.json)")
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if a.apply:
        apply(a.apply, a.data)
    else:
        run(a.out)
