"""Probe, one GPU: can cuDNN's backward kernel serve the ring's block backward from global statistics?

The ring's backward takes each key block's gradients from the *global* `(out, lse)`
(`jax_attn/parallel/ring_backward.py`). `pallas` does it with the Triton backward kernels; cuDNN
has none registered, because JAX's public binding offers no way to hand its backward kernel
statistics other than its own forward's. Its private custom-VJP rule does take them as residuals:
`activation` (cuDNN's softmax statistic, the natural-log lse `(b, n, sq)` that the `cudnn` backend
already returns as its lse) and `fwd_output` (from which it forms `rowsum(dO * out)`). Fed the
global lse and out, it should return block j's exact share, when the lse has no cotangent.

This script checks that on a GPU before anything is registered (`STATS_BACKWARDS` stays as it is):
1. correctness: a sequence split into two key blocks, bf16; the sum of the blocks' dq and the
   blocks' dk/dv against the float64 reference, plain and causal (the diagonal block causal, the
   other full), and against `pallas`'s block backward;
2. speed: one block's backward at (1, 24, 16384, 16384, 128) bf16, cuDNN against `pallas`.
Prints a table last; `ring_cudnn_probe.json` to `--out` (default `$OUT`).

    PYTHONPATH=. python benchmarks/ring_cudnn_probe.py --out $OUT
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import pathlib
import sys
import traceback

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run from a checkout
from jax_attn import reference  # noqa: E402
from jax_attn.arrays import random_normal  # noqa: E402
from jax_attn.bench.timing import median_ms  # noqa: E402
from jax_attn.inputs import AttentionInputs  # noqa: E402
from jax_attn.parallel.ring_backward import (  # noqa: E402
    cudnn_block_grads, cudnn_stats_refusal, delta, pallas_block_grads)

log = logging.getLogger("ring_cudnn_probe")
CHECK_SHAPE = (1, 4, 1024, 128)  # (b, n, s, d) of the correctness check, two key blocks of s / 2


def cudnn_grads(q, k, v, out, lse, d_out, scale, causal=False, layout="bnsd"):
    """`(dq, dk, dv)` of one key block from the global `out`/`lse` (no lse cotangent) by the
    library's `ring_backward.cudnn_block_grads` (cuDNN's backward through JAX's private VJP
    rule); bnsd in and out, run in `layout`."""
    t = (lambda x: x) if layout == "bnsd" else (lambda x: jnp.swapaxes(x, 1, 2))
    inputs = AttentionInputs.build(t(q), t(k), t(v), scale=scale, is_causal=causal, layout=layout)
    why = cudnn_stats_refusal(inputs.spec, False)
    if why is not None:
        raise RuntimeError(f"refused: {why}")
    return tuple(t(g) for g in cudnn_block_grads(inputs, t(out), lse, t(d_out), None, None)[:3])


def cudnn_bsnd_grads(q, k, v, out, lse, d_out, scale, causal=False):
    return cudnn_grads(q, k, v, out, lse, d_out, scale, causal, layout="bsnd")


def pallas_grads(q, k, v, out, lse, d_out, scale, causal=False):
    inputs = AttentionInputs.build(q, k, v, scale=scale, is_causal=causal)
    dq, dk, dv, _ = pallas_block_grads(inputs, out, lse, d_out, delta(out, d_out, None, "bnsd"), None)
    return dq, dk, dv


def check(results, causal):
    rng = np.random.default_rng(0)
    b, n, s, d = CHECK_SHAPE
    half = s // 2
    q, k, v, do = (jnp.asarray(rng.standard_normal((b, n, s, d)), jnp.bfloat16) for _ in range(4))
    f64 = [np.asarray(x, np.float64) for x in (q, k, v, do)]
    out, lse = reference.attention(*f64[:3], is_causal=causal, return_lse=True)
    want = reference.attention_vjp(*f64, is_causal=causal)[:3]
    out_b, lse_b = jnp.asarray(out, jnp.bfloat16), jnp.asarray(lse, jnp.float32)
    scale = d ** -0.5
    for name, fn in (("cudnn", cudnn_grads), ("cudnn-bsnd", cudnn_bsnd_grads),
                     ("pallas", pallas_grads)):
        key = f"{name} {'causal' if causal else 'plain'}"
        try:
            dq = 0.0
            dks, dvs = [], []
            # Query block = all rows; key blocks 0 and 1. Causal: rows of the first half see only
            # key block 0, so it is run on the first half as a diagonal block and on the second
            # half in full; key block 1 is the diagonal block of the second half.
            if not causal:
                for j in (0, 1):
                    sl = slice(j * half, (j + 1) * half)
                    g = jax.jit(fn, static_argnums=(6, 7))(q, k[:, :, sl], v[:, :, sl], out_b, lse_b, do, scale, False)
                    dq = dq + g[0]
                    dks.append(g[1])
                    dvs.append(g[2])
                dq_all = dq
            else:
                top, bot = slice(0, half), slice(half, s)
                rows = lambda x, r: x[:, :, r]  # noqa: E731
                g00 = jax.jit(fn, static_argnums=(6, 7))(rows(q, top), k[:, :, top], v[:, :, top], rows(out_b, top),
                                                         lse_b[:, :, top], rows(do, top), scale, True)
                g10 = jax.jit(fn, static_argnums=(6, 7))(rows(q, bot), k[:, :, top], v[:, :, top], rows(out_b, bot),
                                                         lse_b[:, :, bot], rows(do, bot), scale, False)
                g11 = jax.jit(fn, static_argnums=(6, 7))(rows(q, bot), k[:, :, bot], v[:, :, bot], rows(out_b, bot),
                                                         lse_b[:, :, bot], rows(do, bot), scale, True)
                dq_all = jnp.concatenate([g00[0], g10[0] + g11[0]], axis=2)
                dks, dvs = [g00[1] + g10[1], g11[1]], [g00[2] + g10[2], g11[2]]
            got = (dq_all, jnp.concatenate(dks, 2), jnp.concatenate(dvs, 2))
            errs = {f"d{x}": reference.relative_error(np.asarray(g, np.float64), w) for x, g, w in zip("qkv", got, want)}
            results["check"][key] = errs
            log.info("%s: %s", key, " ".join(f"{a}={e:.2e}" for a, e in errs.items()))
        except Exception as e:  # noqa: BLE001
            results["check"][key] = {"error": f"{type(e).__name__}: {e}"[:1500]}
            log.error("%s: %s", key, traceback.format_exc()[-2500:])


def timing(results):
    b, n, s, d = 1, 24, 16384, 128
    ks = jax.random.split(jax.random.key(0), 6)
    q, k, v, out, do = (random_normal(kk, (b, n, s, d), jnp.bfloat16) for kk in ks[:5])
    lse = jax.random.normal(ks[5], (b, n, s), jnp.float32) + 10.0
    for name, fn in (("cudnn", cudnn_grads), ("pallas", pallas_grads)):
        try:
            f = jax.jit(fn, static_argnums=(6, 7))
            results["timing"][name] = median_ms(f, q, k, v, out, lse, do, d ** -0.5, False, calls=5)
            log.info("block backward %s: %.3f ms", name, results["timing"][name])
        except Exception as e:  # noqa: BLE001
            results["timing"][name] = f"{type(e).__name__}: {e}"[:1500]
            log.error("timing %s: %s", name, traceback.format_exc()[-2500:])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    results = {"device": str(jax.devices()[0].device_kind), "jax": jax.__version__, "check": {}, "timing": {}}
    for causal in (False, True):
        check(results, causal)
    timing(results)
    tol = 2 * reference.TOLERANCE["bfloat16"]
    lines = [f"tolerance (bf16 gradients): {tol:.0e}"]
    for key, errs in results["check"].items():
        ok = "error" not in errs and all(e <= tol for e in errs.values())
        lines.append(f"  {key:16s} {'ok  ' if ok else 'FAIL'} {errs}")
    lines.append(f"block backward 1x24x16384x16384x128 bf16, ms: {results['timing']}")
    if args.out:
        out = pathlib.Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "ring_cudnn_probe.json").write_text(json.dumps(results, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
