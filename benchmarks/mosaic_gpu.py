"""H100 correctness and timing of the Mosaic GPU flash-attention kernel, in one device visit.

    PYTHONUNBUFFERED=1 PYTHONPATH=. python benchmarks/mosaic_gpu.py --out $OUT \
        [--quick-small] [--budget SECONDS] [--triton-bwd] [--tune [--tune-first]] [--quick]

1. Correctness on small feature shapes (odd lengths, head dims 40/64/80/96/128/256, GQA,
   kv_lengths with an empty row, per-key bool masks, both layouts, bf16 and fp16) against the
   float64 NumPy reference `jax_attn.reference`: out, lse, and dq/dk/dv under cotangents on both
   out and lse (the default backward: the Mosaic kernels up to d = 128, else the Triton ones fed
   with the Mosaic lse).
2. With --tune: forward and forward+backward timing of the Mosaic configs in TUNE (forward
   pipeline, backward pipeline depth, launch order) and of cuDNN on the d = 64 and d = 128
   self-attention shapes, after the main table (with --tune-first: before it, and each bucket's
   config fastest forward+backward is used for it). `--quick --skip-small --tune`: the tuning alone.
3. Correctness on the diffusion set against a float32 XLA reference on the GPU (first two heads).
4. Timing, bf16, inputs in (b, s, n, d) (cuDNN's layout): Mosaic (ours), the Triton `pallas`
   kernel, and `jax.nn.dot_product_attention(implementation="cudnn")`; forward and
   forward+backward; median of many runs (benchmarks/tune_pallas.time_ms). Mosaic also in bnsd.
   FLOPs: 4*b*n*sq*skv*d forward, 2.5x that backward ("bwd" = (fwd+bwd) - fwd).
With --triton-bwd the Triton backward behind the Mosaic forward (`backward="triton"`) is checked
on the small shapes too and timed as the `mosaic_tbwd` rows. --budget stops starting new timings
after that many seconds (the checks still run). A short table is printed last; everything is
logged to $OUT/log.txt and $OUT/bench.json.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import pathlib
import sys
import time
import traceback

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).parent))

log = logging.getLogger("mosaic_gpu")
QUICK_SMALL = [False]
TRITON_BWD = [False]  # --triton-bwd: also check and time the Triton backward behind Mosaic
DEADLINE = [float("inf")]  # time.time() after which remaining timings are skipped (--budget)


def out_of_time():
    return time.time() > DEADLINE[0]

# The diffusion set, the target shapes (d = 64, 128 self-attention) first.
SHAPES = [(2, 10, 4096, 4096, 64), (1, 24, 4608, 4608, 128), (2, 10, 4096, 77, 64),
          (1, 40, 16384, 16384, 128), (2, 8, 4096, 4096, 40), (2, 8, 4096, 77, 40)]

# --tune: per head-dim bucket, MosaicConfig fields changed from `default_config(d)` ({} = the
# default itself), each timed forward and forward+backward on the bucket's shapes. Covers the
# forward pipeline, the backward's pipeline depth and the launch order.
TUNE = {
    64: [{}, {"block_kv": 128}, {"bwd_stages": 3}, {"q_major_grid": False}],
    128: [{}, {"bwd_stages": 2}, {"q_major_grid": False}],
}
TUNE_SHAPES = {64: [(2, 10, 4096, 4096, 64)],
               128: [(1, 24, 4608, 4608, 128), (1, 40, 16384, 16384, 128)]}
# --tune-set overlap: the forward's intra-warpgroup overlap (MosaicConfig.overlap) against the
# default pipeline, on every self-attention shape of the FA4 comparison (d = 40 runs at 64).
TUNE_SETS = {
    "default": (TUNE, TUNE_SHAPES),
    "overlap": ({64: [{}, {"overlap": True, "block_kv": 128},
                      {"overlap": True, "block_kv": 128, "fwd_registers": (240, 24)}],
                 128: [{}, {"overlap": True}, {"overlap": True, "fwd_registers": (240, 24)},
                       {"overlap": True, "stages": 3, "fwd_registers": (240, 24)}]},
                {64: [(2, 10, 4096, 4096, 64), (2, 8, 4096, 4096, 40)],
                 128: [(1, 24, 4608, 4608, 128), (1, 40, 16384, 16384, 128)]}),
    # --tune-set narrow: d = 40 at 48 (MosaicConfig.narrow_head_dim) against 64
    "narrow": ({64: [{}, {"narrow_head_dim": True}, {"narrow_head_dim": True, "block_kv": 128},
                     {"narrow_head_dim": True, "overlap": True, "block_kv": 128}]},
               {64: [(2, 8, 4096, 4096, 40), (2, 8, 4096, 77, 40)]}),
    # --tune-set wgs3: three compute warpgroups (192-row tiles, FA4's shape at d <= 64)
    "wgs3": ({64: [{}, {"overlap": True, "compute_warpgroups": 3, "fwd_registers": (160, 32),
                        "block_kv": 128},
                   {"overlap": True, "compute_warpgroups": 3, "fwd_registers": (152, 56),
                    "block_kv": 128},
                   {"overlap": True, "compute_warpgroups": 3, "fwd_registers": (160, 32),
                    "block_kv": 64}]},
             {64: [(2, 10, 4096, 4096, 64), (2, 8, 4096, 4096, 40)]}),
    # --tune-set fused: the one-kernel backward (MosaicConfig.bwd_fused; at d = 128 also with
    # the warpgroups splitting dQ's columns) against the dQ and dK/dV kernels
    "fused": ({64: [{}, {"bwd_fused": True}],
               128: [{}, {"bwd_fused": True}, {"bwd_fused": True, "bwd_dq_split": True}]},
              {64: [(2, 10, 4096, 4096, 64), (2, 8, 4096, 4096, 40)],
               128: [(1, 24, 4608, 4608, 128), (1, 40, 16384, 16384, 128)]}),
    # --tune-set unspilled: the fused backward once its loop-invariant tile descriptors stopped
    # spilling registers (round 8), in each form, against the two kernels (that run also timed
    # a form with dQ in 64-column chunks, since removed: no faster)
    "unspilled": ({64: [{}, {"bwd_fused": True}],
                   128: [{}, {"bwd_fused": True}, {"bwd_fused": True, "bwd_dq_split": True}]},
                  {64: [(2, 10, 4096, 4096, 64), (2, 8, 4096, 4096, 40)],
                   128: [(1, 24, 4608, 4608, 128), (1, 40, 16384, 16384, 128)]}),
    # --tune-set named: the overlap path's turns on hardware named barriers
    # (MosaicConfig.named_turns) against its shared-memory mbarriers (forward; --fwd-only)
    "named": ({64: [{"overlap": True, "block_kv": 128},
                    {"overlap": True, "block_kv": 128, "named_turns": True}],
               128: [{}, {"named_turns": True}, {"named_turns": True, "fwd_registers": (240, 24)}]},
              {64: [(2, 10, 4096, 4096, 64), (2, 8, 4096, 4096, 40)],
               128: [(1, 24, 4608, 4608, 128), (1, 40, 16384, 16384, 128)]}),
    # --tune-set split: the fused backward with dQ's columns split, at d = 128 alone
    "split": ({128: [{}, {"bwd_fused": True, "bwd_dq_split": True}]},
              {128: [(1, 24, 4608, 4608, 128), (1, 40, 16384, 16384, 128)]}),
}
FWD_ONLY = [False]  # --fwd-only: the tuning times the forward alone
SMALL_CONFIG = [{}]  # --small-config JSON: MosaicConfig fields changed in the small checks


def rel(a, r):
    a = np.asarray(a, np.float64)
    r = np.asarray(r, np.float64)
    if not np.all(np.isfinite(a)):
        return float("nan")
    return float(np.linalg.norm(a - r) / max(np.linalg.norm(r), 1e-30))


def check_small():
    import jax
    import jax.numpy as jnp

    from jax_attn import reference as R
    from jax_attn.kernels.mosaic_attention import mosaic_attention

    rng = np.random.default_rng(1)
    cases = [  # b, n, n_kv, sq, skv, d, kwargs
        (1, 2, 2, 77, 33, 40, {}),
        (2, 4, 2, 333, 77, 64, {}),
        (2, 4, 1, 1, 4097, 128, {"kv_lengths": [0, 1000]}),
        (2, 2, 2, 200, 300, 80, {"key_mask": True, "layout": "bsnd"}),
        (1, 2, 2, 100, 130, 96, {"key_mask": "heads"}),
        (1, 2, 2, 256, 256, 256, {}),
        (2, 4, 2, 130, 260, 256, {"kv_lengths": [30, 260], "layout": "bsnd"}),
        (1, 2, 1, 512, 1024, 128, {"layout": "bsnd"}),
    ]
    runs = [(jnp.bfloat16, 2e-2, c) for c in cases if c[5] != 96] + [(jnp.float16, 5e-3, cases[4])]
    if QUICK_SMALL[0]:  # one short device visit: the features that stress the kernel most
        runs = [runs[0], runs[2], runs[3], runs[4], runs[-1]]
    runs = [(dt, tol, c, "auto") for dt, tol, c in runs]
    if SMALL_CONFIG[0]:
        import dataclasses

        from jax_attn.kernels.mosaic_attention import default_config
        runs = [(dt, tol, (*c[:-1], dict(c[-1], config=dataclasses.replace(
            default_config(c[5]), **SMALL_CONFIG[0]))), bwd) for dt, tol, c, bwd in runs]
    if TRITON_BWD[0]:  # the same features through the Triton backward (d <= 128; above, default)
        runs += [(dt, tol, c, "triton") for dt, tol, c, _ in runs if c[5] <= 128]
    rows = []
    for dtype, tol, (b, n, nkv, sq, skv, d, kw), bwd in runs:
        kw = dict(kw, backward=bwd)
        layout = kw.pop("layout", "bnsd")
        q = rng.standard_normal((b, n, sq, d))
        k = rng.standard_normal((b, nkv, skv, d))
        v = rng.standard_normal((b, nkv, skv, d))
        do = rng.standard_normal((b, n, sq, d))
        dl = rng.standard_normal((b, n, sq))
        q, k, v, do = (np.asarray(jnp.asarray(x, dtype).astype(jnp.float32), np.float64)
                       for x in (q, k, v, do))
        am = None
        km = kw.pop("key_mask", False)
        if km:
            am = rng.random((b, n if km == "heads" else 1, 1, skv)) > 0.3
            am[..., :3] = False
            kw["key_mask"] = jnp.asarray(am)
        kvl = kw.get("kv_lengths")
        if kvl is not None:
            kw["kv_lengths"] = jnp.asarray(kvl, jnp.int32)
        t = (lambda x: x) if layout == "bnsd" else (lambda x: np.swapaxes(x, 1, 2))
        name = (f"{jnp.dtype(dtype).name} b{b} n{n}/{nkv} sq{sq} skv{skv} d{d} {layout} "
                f"{sorted(set(kw) - {'backward', 'config'})} bwd={bwd} {SMALL_CONFIG[0] or ''}")
        try:
            def fb(q, k, v, do, dl):
                (o, lse), vjp = jax.vjp(
                    lambda q, k, v: mosaic_attention(q, k, v, layout=layout, return_lse=True, **kw),
                    q, k, v)
                return (o, lse), vjp((do, dl))
            args = [jnp.asarray(t(x), dtype) for x in (q, k, v, do)]
            (o, lse), (dq, dk, dvv) = jax.jit(fb)(*args, jnp.asarray(dl, jnp.float32))
            ro, rl = R.attention(q, k, v, attn_mask=am, kv_lengths=kvl, return_lse=True)
            rdq, rdk, rdv, _ = R.attention_vjp(q, k, v, do, attn_mask=am, kv_lengths=kvl)
            p = R.probabilities(q, k, attn_mask=am, kv_lengths=kvl)
            g, sc = n // nkv, 1 / math.sqrt(d)
            dsl = p * dl[..., None]
            rdq = rdq + np.einsum("bnqk,bnkd->bnqd", dsl, np.repeat(k, g, 1)) * sc
            rdk = rdk + (np.einsum("bnqk,bnqd->bnkd", dsl, q) * sc).reshape(
                b, nkv, g, skv, d).sum(2)
            f32 = lambda x: t(np.asarray(jnp.asarray(x, jnp.float32)))  # noqa: E731
            lse = np.asarray(lse)
            fin = np.isfinite(rl)
            lse_err = float(np.abs(lse[fin] - rl[fin]).max()) if fin.any() else 0.0
            if not np.array_equal(np.isneginf(lse), np.isneginf(rl)):
                lse_err = float("nan")
            errs = [rel(f32(o), ro), lse_err, rel(f32(dq), rdq), rel(f32(dk), rdk),
                    rel(f32(dvv), rdv)]
            ok = all(e <= tol * (5 if i == 1 else 1) for i, e in enumerate(errs))
        except Exception as e:  # noqa: BLE001
            log.error("%s failed:\n%s", name, traceback.format_exc())
            errs, ok = [_short(e)], False
        log.info("small %s %s: o/lse/dq/dk/dv %s", "PASS" if ok else "FAIL", name, errs)
        rows.append((name, ok, errs))
    return rows


def _short(e):
    """The informative end of a (often very long) compiler error."""
    lines = [x for x in str(e).strip().splitlines() if x.strip()]
    return (" | ".join(lines[:1] + lines[-3:]) if lines else repr(e))[:600]


def tune(tune_set="default"):
    """Time every config of the tune set (TUNE_SETS) of each bucket, forward and (unless
    --fwd-only) forward+backward, on its shapes.

    Returns ({bucket: the config fastest forward+backward on the bucket's first shape}, rows)."""
    import dataclasses

    import jax
    import jax.numpy as jnp

    from jax_attn.arrays import random_normal
    from jax_attn.kernels import mosaic_attention as M
    from tune_pallas import time_ms

    best = {}
    results = []
    changes_of, shapes_of = TUNE_SETS[tune_set]
    for bucket, changes in changes_of.items():
        for i, (b, n, sq, skv, d) in enumerate(shapes_of[bucket]):
            keys = jax.random.split(jax.random.key(7), 4)
            q, k, v, do = (random_normal(kk, (b, s, n, d), jnp.bfloat16)
                           for kk, s in zip(keys, (sq, skv, skv, sq)))
            flops = 4.0 * b * n * sq * skv * d
            h = slice(0, 2)  # each config's output against float32 XLA on two heads
            ref, ref_vjp = jax.vjp(
                lambda *a: jax.nn.dot_product_attention(*a, implementation="xla"),
                *(x[:, :, h].astype(jnp.float32) for x in (q, k, v)))
            ref = np.asarray(ref)
            ref_grads = None if FWD_ONLY[0] else [
                np.asarray(g_) for g_ in ref_vjp(do[:, :, h].astype(jnp.float32))]
            del ref_vjp
            for change in changes + ["cudnn"]:  # cuDNN in the same run, for the ratio
                if out_of_time():
                    break
                cfg = None if change == "cudnn" else dataclasses.replace(M.default_config(d),
                                                                         **change)
                row = {"shape": (b, n, sq, skv, d), "change": change, "config": str(cfg)}
                try:
                    def fwd(q, k, v, cfg=cfg):
                        if cfg is None:
                            return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
                        return M.mosaic_attention(q, k, v, layout="bsnd", config=cfg)

                    def fb(q, k, v, do, fwd=fwd):
                        return jax.vjp(fwd, q, k, v)[1](do)
                    fwd_jit = jax.jit(fwd)
                    row["rel err"] = rel(np.asarray(fwd_jit(q, k, v)[:, :, h], np.float32), ref)
                    row["fwd ms"] = time_ms(fwd_jit, q, k, v)
                    row["fwd TFLOP/s"] = flops / row["fwd ms"] / 1e9
                    if not FWD_ONLY[0]:
                        fb_jit = jax.jit(fb)
                        # dq, dk, dv of two heads against float32 XLA's (the worst of the three)
                        row["grad rel err"] = max(
                            rel(np.asarray(g_[:, :, h], np.float32), r_)
                            for g_, r_ in zip(fb_jit(q, k, v, do), ref_grads))
                        row["fwd+bwd ms"] = time_ms(fb_jit, q, k, v, do, reps=10, inner=3)
                    log.info("tune %s %s: rel err %.1e (grads %s), fwd %.3f ms (%.0f TFLOP/s), "
                             "fwd+bwd %s ms", row["shape"], change, row["rel err"],
                             row.get("grad rel err"), row["fwd ms"], row["fwd TFLOP/s"],
                             row.get("fwd+bwd ms"))
                    if not FWD_ONLY[0] and cfg is not None and i == 0 and (
                            bucket not in best or row["fwd+bwd ms"] < best[bucket][1]):
                        best[bucket] = (cfg, row["fwd+bwd ms"])
                except Exception as e:  # noqa: BLE001
                    row["error"] = _short(e)
                    log.warning("tune %s %s failed: %s", row["shape"], change, row["error"])
                results.append(row)
    return {k: v[0] for k, v in best.items()}, results


def tune_table(rows):
    """The tuning rows as a table, each against cuDNN on the same shape in the same run."""
    ref = {tuple(r["shape"]): r for r in rows if r["change"] == "cudnn"}
    out = ["| b,n,sq,skv,d | change | rel err | grad rel err | fwd TFLOP/s | fwd ms | fwd vs cuDNN "
           "| fwd+bwd ms | fwd+bwd vs cuDNN |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        c = ref.get(tuple(r["shape"]), {})
        cells = [f"{r['rel err']:.1e}" if "rel err" in r else "-",
                 f"{r['grad rel err']:.1e}" if "grad rel err" in r else "-",
                 f"{r['fwd TFLOP/s']:.0f}" if "fwd TFLOP/s" in r else "-"]
        for key in ("fwd ms", "fwd+bwd ms"):
            cells.append(f"{r[key]:.3f}" if key in r else r.get("error", "-")[:60])
            cells.append(f"{c[key] / r[key]:.3f}x" if key in r and key in c else "-")
        out.append(f"| {','.join(map(str, r['shape']))} | {r['change']} | " + " | ".join(cells)
                   + " |")
    return "\n".join(out)


def check_shape(q, k, v, do, fn):
    import jax
    import jax.numpy as jnp

    def ref(q, k, v):
        return jax.nn.dot_product_attention(q.astype(jnp.float32), k.astype(jnp.float32),
                                            v.astype(jnp.float32), implementation="xla")

    h = slice(0, 2)
    o, vjp = jax.vjp(fn, q, k, v)
    grads = vjp(do)
    ro, rvjp = jax.vjp(ref, q[:, :, h], k[:, :, h], v[:, :, h])
    rgrads = rvjp(do[:, :, h].astype(jnp.float32))
    return [rel(np.asarray(o[:, :, h], np.float32), np.asarray(ro))] + [
        rel(np.asarray(g[:, :, h], np.float32), np.asarray(r)) for g, r in zip(grads, rgrads)]


def bench(best):
    import jax
    import jax.numpy as jnp

    from jax_attn.arrays import random_normal
    from jax_attn.kernels.flash_attention import flash_attention
    from jax_attn.kernels import mosaic_attention as M
    from tune_pallas import time_ms

    rows = []
    for b, n, sq, skv, d in SHAPES:
        keys = jax.random.split(jax.random.key(sq + skv + d), 4)
        q = random_normal(keys[0], (b, sq, n, d), jnp.bfloat16)
        k = random_normal(keys[1], (b, skv, n, d), jnp.bfloat16)
        v = random_normal(keys[2], (b, skv, n, d), jnp.bfloat16)
        do = random_normal(keys[3], (b, sq, n, d), jnp.bfloat16)
        flops = 4.0 * b * n * sq * skv * d
        cfg = best.get(M.head_dim_padded(d))
        impls = {
            "mosaic": lambda q, k, v: M.mosaic_attention(q, k, v, layout="bsnd", config=cfg),
            "triton": lambda q, k, v: flash_attention(q, k, v, layout="bsnd"),
            "cudnn": lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="cudnn"),
        }
        if TRITON_BWD[0] and M.head_dim_padded(d) <= 128:  # the Triton backward behind Mosaic
            impls["mosaic_tbwd"] = lambda q, k, v: M.mosaic_attention(q, k, v, layout="bsnd",
                                                                      config=cfg, backward="triton")
        shape = (b, n, sq, skv, d)
        try:
            errs = check_shape(q, k, v, do, impls["mosaic"])
        except Exception as e:  # noqa: BLE001
            log.error("check %s failed:\n%s", shape, traceback.format_exc())
            errs = [str(e).splitlines()[0][:120]]
        log.info("check %s mosaic rel err out, dq, dk, dv vs f32 XLA: %s", shape, errs)
        for name, fn in impls.items():
            if out_of_time():
                log.warning("out of time: skipping %s %s", shape, name)
                continue
            row = {"shape": shape, "impl": name, "check": errs if name == "mosaic" else None,
                   "config": str(cfg) if name == "mosaic" else None}
            for mode in ("fwd", "fwd+bwd"):
                try:
                    if mode == "fwd":
                        row[mode] = time_ms(jax.jit(fn), q, k, v)
                    else:
                        def fb(q, k, v, do, fn=fn):
                            return jax.vjp(fn, q, k, v)[1](do)
                        row[mode] = time_ms(jax.jit(fb), q, k, v, do, reps=10, inner=3)
                except Exception as e:  # noqa: BLE001
                    row[mode + "_error"] = _short(e)
                    log.warning("%s %s %s failed: %s", shape, name, mode, row[mode + "_error"])
            if "fwd" in row:
                row["fwd_tflops"] = flops / row["fwd"] / 1e9
            if "fwd" in row and "fwd+bwd" in row:
                row["bwd"] = row["fwd+bwd"] - row["fwd"]
                row["bwd_tflops"] = 2.5 * flops / row["bwd"] / 1e9
            log.info("bench %s", json.dumps(row))
            rows.append(row)
        # The same kernel reading (b, n, s, d) in place (forward only).
        try:
            qb, kb, vb = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))
            t = time_ms(jax.jit(lambda q, k, v: M.mosaic_attention(q, k, v, layout="bnsd",
                                                                   config=cfg)), qb, kb, vb)
            row = {"shape": shape, "impl": "mosaic_bnsd", "fwd": t, "fwd_tflops": flops / t / 1e9}
        except Exception as e:  # noqa: BLE001
            row = {"shape": shape, "impl": "mosaic_bnsd", "fwd_error": str(e).splitlines()[0][:160]}
        log.info("bench %s", json.dumps(row))
        rows.append(row)
    return rows


def table(rows):
    ref = {(tuple(r["shape"]), "cudnn"): r for r in rows if r["impl"] == "cudnn"}
    tri = {(tuple(r["shape"]), "triton"): r for r in rows if r["impl"] == "triton"}
    out = ["| b,n,sq,skv,d | impl | fwd ms | fwd TFLOP/s | fwd vs cuDNN | fwd vs Triton | bwd ms | "
           "bwd TFLOP/s | bwd vs cuDNN | note |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        c = ref.get((tuple(r["shape"]), "cudnn"), {})
        tr = tri.get((tuple(r["shape"]), "triton"), {})

        def f(key, fmt="{:.3f}"):
            return fmt.format(r[key]) if key in r else "-"

        def ratio(other, key):
            return f"{other[key] / r[key]:.2f}x" if key in r and key in other else "-"
        note = r.get("fwd_error") or r.get("fwd+bwd_error") or ""
        if r.get("check"):
            note = "rel err o/dq/dk/dv " + "/".join(
                f"{e:.1e}" if isinstance(e, float) else str(e) for e in r["check"])
        out.append(f"| {','.join(map(str, r['shape']))} | {r['impl']} | {f('fwd')} | "
                   f"{f('fwd_tflops', '{:.0f}')} | {ratio(c, 'fwd')} | {ratio(tr, 'fwd')} | "
                   f"{f('bwd')} | {f('bwd_tflops', '{:.0f}')} | {ratio(c, 'bwd')} | {note[:90]} |")
    return "\n".join(out)


def main():
    from pallas_gpu import versions

    p = argparse.ArgumentParser()
    p.add_argument("--out", default=".")
    p.add_argument("--tune", action="store_true")
    p.add_argument("--quick", action="store_true", help="small checks (+ tuning) only")
    p.add_argument("--skip-small", action="store_true")
    p.add_argument("--triton-bwd", action="store_true",
                   help="also the Triton backward behind the Mosaic forward (checks and timings)")
    p.add_argument("--quick-small", action="store_true", help="5 small checks, not 9")
    p.add_argument("--tune-first", action="store_true", help="bench with the tuned configs")
    p.add_argument("--budget", type=float, default=0, help="seconds; skip timings after it")
    p.add_argument("--tune-set", default="default", choices=sorted(TUNE_SETS))
    p.add_argument("--fwd-only", action="store_true", help="the tuning times forwards only")
    p.add_argument("--small-config", default="{}",
                   help='JSON MosaicConfig fields for the small checks, e.g. {"overlap": true}')
    a = p.parse_args()
    QUICK_SMALL[0] = a.quick_small
    FWD_ONLY[0] = a.fwd_only
    SMALL_CONFIG[0] = json.loads(a.small_config)
    TRITON_BWD[0] = a.triton_bwd
    if a.budget:
        DEADLINE[0] = time.time() + a.budget
    out = pathlib.Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s",
                        handlers=[logging.FileHandler(out / "log.txt"), logging.StreamHandler()])
    info = versions()
    log.info("versions %s", info)
    small = [] if a.skip_small else check_small()
    if a.tune_first:
        best, tuned = tune(a.tune_set) if a.tune else ({}, [])
        log.info("best configs %s", best)
    else:
        best, tuned = {}, []
    rows = [] if a.quick else bench(best)
    if a.tune and not a.tune_first:  # after the main table, with whatever time is left
        _, tuned = tune(a.tune_set)
    (out / "bench.json").write_text(json.dumps(
        {"versions": info, "rows": rows, "small": small, "tune": tuned,
         "best": {k: str(v) for k, v in best.items()}}, indent=1, default=str))
    text = table(rows)
    (out / "table.md").write_text(text + "\n")
    print("\nversions:", info)
    if tuned:
        print(tune_table(tuned))
    for r in rows:
        if r["impl"] == "mosaic" and (r.get("fwd_error") or r.get("fwd+bwd_error")):
            print("ERROR", r["shape"], r.get("fwd_error"), r.get("fwd+bwd_error"))
    print("small checks:", sum(ok for _, ok, _ in small), "/", len(small), "passed;",
          [(n, e) for n, ok, e in small if not ok])
    print(text)


if __name__ == "__main__":
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    main()
