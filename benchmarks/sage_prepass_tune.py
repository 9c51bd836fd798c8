"""Time the `sage` pre-pass on the GPU: its parts, the jnp and Pallas versions, and the Pallas
row kernel's block sizes, beside a copy of Q (what memory bandwidth allows).

    PYTHONPATH=. python benchmarks/sage_prepass_tune.py --out $OUT/prepass_tune

bf16 (b, s, n, d) inputs; each timing is `tune_pallas.time_ms` (median of 20 samples of 5 calls).
Rows: `copy_q` (Q * 2: one read and one write of Q), `k_mean` (the smoothing mean), `jnp`
(`quantization.quantize`, 16-bit P V: Q and K only), `pallas` (`sage_prepass.quantize`, same),
and `rows q R/W` (`quantize_rows` on Q alone with R rows per program and W warps). A table is
printed last; everything goes to prepass_tune.json.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).parent))

SHAPES = [(1, 24, 4608, 128), (1, 24, 16384, 128), (2, 10, 4096, 64)]
BLOCKS = [(32, 2), (64, 4), (64, 8), (128, 4), (128, 8), (256, 8)]
log = logging.getLogger("sage_prepass_tune")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="prepass_tune")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes in interpret mode (a CPU check)")
    args = ap.parse_args()
    shapes = [(1, 2, 256, 64)] if args.smoke else SHAPES
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import jax
    import jax.numpy as jnp

    from jax_attn import quantization as Q
    from jax_attn.arrays import random_normal
    from jax_attn.kernels import sage_prepass as P
    from tune_pallas import time_ms

    results = {"device": str(jax.devices()[0].device_kind), "jax": jax.__version__, "rows": {}}
    for b, n, s, d in shapes:
        key = f"{b}x{n}x{s}x{d}"
        ks = jax.random.split(jax.random.key(0), 3)
        q, k, v = (random_normal(kk, (b, s, n, d), jnp.bfloat16) for kk in ks)
        dp = 64 if d <= 64 else 128
        pad = -(-s // 128) * 128
        kw = dict(layout="bsnd", scale=1 / math.sqrt(d), dp=dp, sq_pad=pad, skv_pad=pad,
                  pv_dtype=jnp.bfloat16)
        interp = dict(interpret=True) if args.smoke else {}
        mean = jax.jit(lambda k: Q.smoothing_mean(k, "bsnd"))(k)
        runs = {
            "copy_q": (jax.jit(lambda x: x * 2), (q,)),
            "k_mean": (jax.jit(lambda k: Q.smoothing_mean(k, "bsnd")), (k,)),
            "jnp": (jax.jit(lambda q, k, v: Q.quantize(q, k, v, q_rows=1, k_rows=1, **kw)), (q, k, v)),
            "pallas": (jax.jit(lambda q, k, v: P.quantize(q, k, v, **kw, **interp)), (q, k, v)),
        }
        for rows, warps in BLOCKS:
            runs[f"rows q {rows}/{warps}"] = (jax.jit(
                lambda x, m, rows=rows, warps=warps: P.quantize_rows(
                    x, m, layout="bsnd", rows_pad=pad, dp=dp, groups=1, row_factor=0.1,
                    shift_factor=0.1, block_rows=rows, num_warps=warps, **interp)), (q, mean))
        row = results["rows"].setdefault(key, {})
        for name, (fn, a) in runs.items():
            try:
                row[name] = time_ms(fn, *a)
                log.info("%s %s: %.4f ms", key, name, row[name])
            except Exception as e:  # noqa: BLE001  (one failure must not stop the sweep)
                row[name] = None
                log.info("%s %s: ERROR %s: %s", key, name, type(e).__name__, str(e)[:300])
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "prepass_tune.json").write_text(json.dumps(results, indent=1))
    names = list(next(iter(results["rows"].values())))
    log.info("\n=== sage pre-pass, ms (%s, jax %s) ===", results["device"], results["jax"])
    log.info("%-16s" + " %20s" * len(results["rows"]), "", *results["rows"])
    for name in names:
        log.info("%-16s" + " %20s" * len(results["rows"]), name,
                 *(f"{r[name]:.4f}" if r.get(name) else "err" for r in results["rows"].values()))


if __name__ == "__main__":
    main()
