"""H100/H200 check and timing of the `sage` backend (8-bit INT8 QK / FP8 PV attention), one visit.

    PYTHONUNBUFFERED=1 PYTHONPATH=. python benchmarks/sage_device.py --out $OUT [--quick]

1. Lowering smoke test: the kernel on a tiny shape per head dim (40, 64, 80, 128), both layouts,
   with and without a mask, `two_level_pv` on and off; kernel vs the jnp simulation
   (`jax_attn.quantization.sage_reference`, same quantized bits) must agree tightly.
2. Accuracy table: kernel, simulation and cuDNN bf16 against a float64 reference (computed
   on the host in NumPy, first heads only) on the two input families of tests/test_sage.py
   (standard normal; heavy-tailed Q + per-channel K offset), d = 64 and 128, 2048 tokens:
   worst-head cosine and relative L1.
3. Timing, bf16, (b, s, n, d) inputs: sage (quantization pre-pass included: the timed function is
   the whole `attention_forward(backend="sage")`), the pre-pass alone, and
   `attention_forward(backend="cudnn")`; median of many runs. TFLOP/s = 4*b*n*sq*skv*d / time.
Every step is in try/except, so one failure still lets the rest run. A table is printed last;
everything goes to $OUT/sage.json.

    PYTHONUNBUFFERED=1 PYTHONPATH=. python benchmarks/sage_device.py --out $OUT --variants

`--variants` instead (about 2-3 minutes): on 1x24x4608x4608x128 and 2x10x4096x4096x64 (bsnd,
bf16), each `VARIANTS` SageConfig is first checked against its own simulation (head 0, same
bits; timing is skipped on a mismatch) and scored against float64 (head 0), then timed (whole
call, pre-pass included), with the pre-pass alone and cuDNN; a table is printed last. Variants
are skipped once `--budget` seconds have passed, so the table always comes out.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import pathlib
import sys
import time
import traceback

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).parent))

TIMED = [(1, 24, 16384, 16384, 128), (1, 24, 4608, 4608, 128), (2, 10, 4096, 4096, 64),
         (2, 8, 4096, 4096, 40)]
SMOKE = [(1, 2, 1, 200, 300, 40), (1, 2, 2, 256, 256, 64), (2, 4, 2, 130, 520, 80),
         (1, 2, 1, 256, 384, 128)]


def _family(name, shape_q, shape_kv, seed=0):
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal(s).astype(np.float32) for s in (shape_q, shape_kv, shape_kv))
    if name == "outlier":
        q = rng.standard_t(3, shape_q).astype(np.float32)
        k = k + 8.0 * rng.standard_normal((1, 1, 1, shape_kv[-1])).astype(np.float32)
    return q, k, v


def smoke(results, log, variant=None, shapes=None):
    """`variant`: a `_variants()` name run instead of the default config (masked calls only);
    `shapes`: SMOKE indices (default all)."""
    import dataclasses

    import jax.numpy as jnp

    from jax_attn import quantization as Q
    from jax_attn import reference
    from jax_attn.kernels import sage_attention as S
    from jax_attn.kernels.sage_forward import SageConfig
    for b, n, n_kv, sq, skv, d in [SMOKE[i] for i in (shapes or range(len(SMOKE)))]:
        for layout in ("bnsd", "bsnd"):
            for masked in (False, True) if variant is None else (True,):
                for two_level in (True, False):
                    base = SageConfig() if variant is None else _variants()[variant]
                    cfg = dataclasses.replace(base, two_level_pv=two_level)
                    key = (f"smoke {variant or ''} {b}x{n}/{n_kv}x{sq}x{skv}x{d} {layout} "
                           f"mask={masked} two_level={two_level}")
                    try:
                        q, k, v = _family("normal", (b, n, sq, d), (b, n_kv, skv, d), seed=sq)
                        t = (lambda x: x) if layout == "bnsd" else (lambda x: np.swapaxes(x, 1, 2))
                        q, k, v = (jnp.asarray(t(x), jnp.bfloat16) for x in (q, k, v))
                        km = (np.random.default_rng(1).random((b, 1, 1, skv)) > 0.3) if masked else None
                        lens = jnp.asarray([skv - 7] * b, jnp.int32) if masked else None
                        out, lse = S.sage_attention(q, k, v, layout=layout, key_mask=km, kv_lengths=lens,
                                                    return_lse=True, config=cfg)
                        cfg_r = cfg.resolved(64 if d <= 64 else 128)
                        so, slse = Q.sage_reference(q, k, v, layout=layout, kv_lengths=lens,
                                                    key_mask=None if km is None else jnp.asarray(km)[:, :, 0],
                                                    block_k=cfg_r.block_kv, **S.sim_flags(cfg_r))
                        o, s_ = np.asarray(out, np.float32), np.asarray(so, np.float32)
                        err = float(np.abs(o - s_).max() / max(np.abs(s_).max(), 1e-6))
                        fin = np.isfinite(np.asarray(slse))
                        lerr = float(np.abs(np.asarray(lse)[fin] - np.asarray(slse)[fin]).max())
                        ok = err < 2e-2 and lerr < 1e-2
                        # and both against float64 (what a gap to the simulation costs)
                        f64 = [t(np.asarray(jnp.asarray(x, jnp.float32), np.float64))
                               for x in (q, k, v)]  # t: bsnd <-> bnsd, its own inverse
                        ref, ref_lse = reference.attention(*f64, attn_mask=km, kv_lengths=lens,
                                                           return_lse=True)
                        fin64 = np.isfinite(ref_lse)
                        vs64 = {n_: (Q.accuracy(t(np.asarray(x, np.float64)), ref)["rel_l1_max"],
                                     float(np.abs(np.asarray(lx)[fin64] - ref_lse[fin64]).max()))
                                for n_, x, lx in (("kernel", out, lse), ("sim", so, slse))}
                        results["smoke"][key] = {"max_rel_vs_sim": err, "lse_err": lerr, "ok": ok,
                                                 "vs_f64": vs64}
                        log(f"{key}: max|kernel-sim|/max|sim| {err:.2e} lse {lerr:.2e} {'OK' if ok else 'FAIL'}"
                            + "".join(f" | {n_} vs f64 relL1 {a:.4f} lse {b_:.2e}"
                                      for n_, (a, b_) in vs64.items()))
                    except Exception as e:  # noqa: BLE001
                        results["smoke"][key] = {"error": f"{type(e).__name__}: {e}"}
                        log(f"{key}: ERROR\n{traceback.format_exc()}")


def accuracy(results, log, s):
    import jax
    import jax.numpy as jnp

    import jax_attn
    from jax_attn import quantization as Q
    from jax_attn import reference
    from jax_attn.kernels import sage_attention as S
    from jax_attn.kernels.sage_forward import SageConfig
    for fam in ("normal", "outlier"):
        for d in (64, 128):
            key = f"{fam} d={d} s={s}"
            try:
                q, k, v = _family(fam, (1, 4, s, d), (1, 4, s, d))
                qb, kb, vb = (jnp.asarray(x, jnp.bfloat16) for x in (q, k, v))
                f64 = [np.asarray(x.astype(jnp.float32), np.float64) for x in (qb, kb, vb)]
                ref = np.concatenate([reference.attention(*(x[:, h:h + 1] for x in f64)) for h in range(4)], 1)
                row = {}
                for name in ("sage", "sage16"):
                    got = jax_attn.attention_forward(qb, kb, vb, backend=name)
                    row[f"{name} kernel"] = Q.accuracy(np.asarray(got, np.float64), ref)
                for name, cfg in (("simulation", SageConfig()), ("simulation16", SageConfig(pv_bits=16))):
                    cfg = cfg.resolved(d)  # the kernel's defaults at this head dim
                    sim = Q.sage_reference(qb, kb, vb, block_q=cfg.block_q, block_k=cfg.block_kv,
                                           **S.sim_flags(cfg))[0]
                    row[name] = Q.accuracy(np.asarray(sim, np.float64), ref)
                cud = jax.jit(lambda a, b_, c: jax_attn.attention_forward(a, b_, c, backend="cudnn"))(qb, kb, vb)
                row["cudnn bf16"] = Q.accuracy(np.asarray(cud, np.float64), ref)
                results["accuracy"][key] = row
                for name, a in row.items():
                    log(f"{key} {name}: cos_min {a['cos_min']:.6f} rel_l1_max {a['rel_l1_max']:.4f}")
            except Exception as e:  # noqa: BLE001
                results["accuracy"][key] = {"error": f"{type(e).__name__}: {e}"}
                log(f"{key}: ERROR\n{traceback.format_exc()}")


def timing(results, log, shapes):
    import jax
    import jax.numpy as jnp

    import jax_attn
    from jax_attn import quantization as Q
    from jax_attn.arrays import random_normal
    from tune_pallas import time_ms
    for b, n, sq, skv, d in shapes:
        key = f"{b}x{n}x{sq}x{skv}x{d}"
        flops = 4.0 * b * n * sq * skv * d
        ks = jax.random.split(jax.random.key(0), 3)
        q = random_normal(ks[0], (b, sq, n, d), jnp.bfloat16)
        k = random_normal(ks[1], (b, skv, n, d), jnp.bfloat16)
        v = random_normal(ks[2], (b, skv, n, d), jnp.bfloat16)
        row = results["timing"].setdefault(key, {})
        dp = 64 if d <= 64 else 128
        runs = {
            "sage": jax.jit(lambda a, b_, c: jax_attn.attention_forward(a, b_, c, layout="bsnd", backend="sage")),
            "sage_prepass": jax.jit(lambda a, b_, c: Q.quantize(
                a, b_, c, layout="bsnd", scale=1 / math.sqrt(d), q_rows=1, k_rows=1, dp=dp,
                sq_pad=-(-sq // 128) * 128, skv_pad=-(-skv // 128) * 128)),
            "cudnn": jax.jit(lambda a, b_, c: jax_attn.attention_forward(a, b_, c, layout="bsnd", backend="cudnn")),
        }
        for name, fn in runs.items():
            try:
                ms = time_ms(fn, q, k, v, reps=10 if sq >= 16384 else 20)
                row[name] = {"ms": ms, "tflops": flops / ms / 1e9}
                log(f"{key} {name}: {ms:.3f} ms {flops / ms / 1e9:.0f} TFLOP/s")
            except Exception as e:  # noqa: BLE001
                row[name] = {"error": f"{type(e).__name__}: {e}"}
                log(f"{key} {name}: ERROR\n{traceback.format_exc()}")


def _variants():
    from jax_attn.kernels.sage_forward import OLD_CONFIG, SageConfig
    return {
        "old": OLD_CONFIG,  # as first measured: P via smem, plain softmax, two-level, 128 keys
        "default": SageConfig(),  # P in registers, fused softmax, keys and two-level by head dim
        "default_1level": SageConfig(two_level_pv=False),
        "default_2level": SageConfig(two_level_pv=True),
        "smem_fused": SageConfig(p_in_registers=False),
        "regs_plain": SageConfig(fused_softmax=False),
        "default_bk128": SageConfig(block_kv=128),  # at d = 128 the default before round 17
        "bk256": SageConfig(block_kv=256),  # d = 128: half the barrier passes and O rescales per key
        "free": SageConfig(pingpong=False),  # no turn-taking between the compute warpgroups
        "pv16_free": SageConfig(pv_bits=16, pingpong=False),
        # one K scale per key block, folded into exp2's FMA (SageConfig.k_scale_per_tile)
        "ktile": SageConfig(k_scale_per_tile=True),
        "pv16_ktile": SageConfig(pv_bits=16, k_scale_per_tile=True),
        "free_ktile": SageConfig(pingpong=False, k_scale_per_tile=True),
        "1level_stages3": SageConfig(two_level_pv=False, stages=3),
        # intra-warpgroup overlap (SageConfig.overlap: 128-key blocks unless given)
        "overlap": SageConfig(overlap=True),
        "overlap_1level": SageConfig(overlap=True, two_level_pv=False),
        "overlap_2level": SageConfig(overlap=True, two_level_pv=True),
        "vxla": SageConfig(v_pallas=False),  # the FP8 V^T by XLA's transpose, not the Pallas pass
        # d < dp: the kernel writes dp columns and XLA slices d off (the default until round 19)
        "wide_output": SageConfig(narrow_output=False),
        "pv16": SageConfig(pv_bits=16),  # only Q K^T in 8 bits: the accurate variant (sage16)
        "pv16_overlap": SageConfig(pv_bits=16, overlap=True),
        "pv16_stages3": SageConfig(pv_bits=16, stages=3),
        # P's row sum on the tensor cores (SageConfig.rowsum_mma: ones beside V^T; round 16)
        "rowsum": SageConfig(rowsum_mma=True),  # the default since round 16
        "no_rowsum": SageConfig(rowsum_mma=False),  # the row sum by the softmax's adds
        "magic": SageConfig(magic_acc=True),  # S's accumulator starts at MAGIC_I (round 16)
        "pv16_magic": SageConfig(pv_bits=16, magic_acc=True),
        "no_magic": SageConfig(magic_acc=False),  # the default before magic_acc was by head dim
        "rowsum_2level": SageConfig(rowsum_mma=True, two_level_pv=True),
        "rowsum_1level": SageConfig(rowsum_mma=True, two_level_pv=False),
        # d = 128 with 256-key blocks and MAGIC_I: the default since round 17
        "bk256_magic": SageConfig(block_kv=256, magic_acc=True),
        # (three compute warpgroups, `wg3*`, timed in rounds 17 and 18: slower everywhere, and
        # gone from SageConfig since)
        # (round 20 timed SageConfig.paired_issue and named_sched here: slower, reverted; their
        # patches are in results/2026-12-02-h200-round20/)
        # a persistent grid: one CTA per SM looping over query tiles (SageConfig.persistent,
        # the default since round 21), and one CTA per tile (the default before)
        "persistent": SageConfig(persistent=True),
        "pv16_persistent": SageConfig(pv_bits=16, persistent=True),
        "grid_per_tile": SageConfig(persistent=False),
        "pv16_grid_per_tile": SageConfig(pv_bits=16, persistent=False),
        "stages3": SageConfig(stages=3),  # d <= 64: three K/V slots (d = 128's exceed shared memory)
    }


def variants(results, log, t0, budget, only=None, shapes=None, prepass=True):
    """`only`: the variant names to run (default all); `shapes`: TIMED indices (default 1, 2);
    `prepass`: also time the pre-passes alone."""
    import jax
    import jax.numpy as jnp

    import jax_attn
    from jax_attn import quantization as Q
    from jax_attn import reference
    from jax_attn.arrays import random_normal
    from jax_attn.kernels import sage_attention as S
    from jax_attn.kernels import sage_prepass as P
    from jax_attn.kernels.sage_forward import SageConfig
    from tune_pallas import time_ms
    res = results.setdefault("variants", {})
    for b, n, sq, skv, d in [TIMED[i] for i in (shapes or (1, 2))]:
        key = f"{b}x{n}x{sq}x{skv}x{d}"
        row = res.setdefault(key, {})
        flops = 4.0 * b * n * sq * skv * d
        ks = jax.random.split(jax.random.key(0), 3)
        q = random_normal(ks[0], (b, sq, n, d), jnp.bfloat16)
        k = random_normal(ks[1], (b, skv, n, d), jnp.bfloat16)
        v = random_normal(ks[2], (b, skv, n, d), jnp.bfloat16)
        h0 = [x[:1, :, :1] for x in (q, k, v)]  # head 0 of batch 0, for the checks
        try:
            if sq > 8192:  # the float64 reference's compile takes minutes here: simulation only
                raise RuntimeError("skipped above 8192 tokens")
            ref, ref_lse = reference.attention(
                *(np.swapaxes(np.asarray(x.astype(jnp.float32), np.float64), 1, 2) for x in h0),
                return_lse=True)
        except Exception as e:  # noqa: BLE001
            ref = ref_lse = None
            log(f"{key} float64 reference: ERROR {type(e).__name__}: {e}")
        dp = 64 if d <= 64 else 128
        extra = {
            "cudnn": jax.jit(lambda a, b_, c: jax_attn.attention_forward(a, b_, c, layout="bsnd", backend="cudnn")),
        }
        # The pre-passes: jnp and the Pallas one sage_attention runs, for FP8 and for the 16-bit
        # P V (V left alone).
        shape_kw = dict(layout="bsnd", scale=1 / math.sqrt(d), dp=dp, sq_pad=-(-sq // 128) * 128,
                        skv_pad=-(-skv // 256) * 256)
        for name, quantize in (("prepass", functools.partial(Q.quantize, q_rows=1, k_rows=1)),
                               ("prepass_pallas", P.quantize)) if prepass else ():
            for suffix, v_kw in (("", dict(v_key_perm=True)), ("16", dict(pv_dtype=jnp.bfloat16))):
                extra[name.replace("prepass", "prepass" + suffix)] = jax.jit(
                    functools.partial(quantize, **shape_kw, **v_kw))
        # FP8 V through the Pallas V pass too (sage_prepass.quantize_v), against XLA's transpose,
        # with K's one scale per key tile: the pre-pass `sage` runs by default (before round 19
        # this timed the per-token K scale)
        if prepass:
            extra["prepass_pallas_v"] = jax.jit(functools.partial(
                P.quantize, **shape_kw, v_key_perm=True, v_pallas=True,
                k_rows=SageConfig().resolved(dp).block_kv))
        for name, fn in extra.items():
            try:
                ms = time_ms(fn, q, k, v, reps=20)
                row[name] = {"ms": ms}
                log(f"{key} {name}: {ms:.3f} ms")
            except Exception as e:  # noqa: BLE001
                row[name] = {"error": f"{type(e).__name__}: {e}"}
                log(f"{key} {name}: ERROR {type(e).__name__}: {e}")
        for name, cfg in _variants().items():
            if only and name not in only:
                continue
            if time.time() - t0 > budget:
                row[name] = {"error": "skipped: out of time"}
                log(f"{key} {name}: skipped (time budget)")
                continue
            ent = row.setdefault(name, {})
            try:
                cfg_r = cfg.resolved(dp)
                fn = jax.jit(lambda a, b_, c, cfg=cfg: S.sage_attention(a, b_, c, layout="bsnd", config=cfg,
                                                                      return_lse=True))
                out, lse = fn(q, k, v)
                so, slse = Q.sage_reference(*h0, layout="bsnd", block_q=cfg_r.block_q,
                                            block_k=cfg_r.block_kv, **S.sim_flags(cfg_r))
                o0 = np.asarray(out[:1, :, :1], np.float32)
                s0 = np.asarray(so, np.float32)
                err = float(np.abs(o0 - s0).max() / max(np.abs(s0).max(), 1e-6))
                lerr = float(np.abs(np.asarray(lse[:1, :1]) - np.asarray(slse)).max())
                ent.update(max_rel_vs_sim=err, lse_err=lerr, ok=err < 2e-2 and lerr < 1e-2)
                if ref is not None:
                    a = Q.accuracy(np.swapaxes(o0.astype(np.float64), 1, 2), ref)
                    ent.update(cos=a["cos_min"], rel_l1=a["rel_l1_max"],
                               lse_f64=float(np.abs(np.asarray(lse[:1, :1], np.float64)
                                                    - ref_lse).max()))
                log(f"{key} {name} {cfg_r}: vs sim {err:.2e} lse {lerr:.2e} "
                    f"lse vs f64 {ent.get('lse_f64', float('nan')):.2e} "
                    f"vs f64 cos {ent.get('cos', float('nan')):.6f} rel_l1 {ent.get('rel_l1', float('nan')):.4f}"
                    f" {'OK' if ent['ok'] else 'MISMATCH (not timed)'}")
                if ent["ok"]:
                    ms = time_ms(lambda a, b_, c: fn(a, b_, c)[0], q, k, v, reps=20)
                    ent.update(ms=ms, tflops=flops / ms / 1e9)
                    log(f"{key} {name}: {ms:.3f} ms {flops / ms / 1e9:.0f} TFLOP/s")
            except Exception as e:  # noqa: BLE001
                ent["error"] = f"{type(e).__name__}: {e}"[:2000]
                log(f"{key} {name}: ERROR\n{traceback.format_exc()[-3000:]}")


def segments(results, log, s=2048, n=4, interpret=False):
    """Packed prompts (segment ids) through the compiled kernel, FP8 and 16-bit P V, against the
    float64 reference and the simulation (head 0)."""
    import jax
    import jax.numpy as jnp

    from jax_attn import quantization as Q
    from jax_attn import reference
    from jax_attn.kernels import sage_attention as S
    from jax_attn.kernels.sage_forward import SageConfig
    rng = np.random.default_rng(11)
    res = results.setdefault("segments", {})
    for d in (64, 128):
        b = 2
        cuts = np.sort(rng.choice(np.arange(1, s), (b, 5), replace=False), -1)
        ids = np.stack([np.searchsorted(c, np.arange(s), side="right") for c in cuts]).astype(np.int32)
        q, k, v = (jnp.asarray(rng.standard_normal((b, n, s, d)), jnp.bfloat16) for _ in range(3))
        f64 = [np.asarray(x[:, :1].astype(jnp.float32), np.float64) for x in (q, k, v)]
        ref = reference.attention(*f64, q_segment_ids=ids, kv_segment_ids=ids)
        for name, cfg in (("fp8", SageConfig()), ("pv16", SageConfig(pv_bits=16))):
            key = f"d{d} {name}"
            try:
                out = jax.jit(lambda q, k, v, i, cfg=cfg: S.sage_attention(
                    q, k, v, config=cfg, q_segment_ids=i, kv_segment_ids=i,
                    interpret=interpret))(q, k, v, jnp.asarray(ids))
                cfg_r = cfg.resolved(d)
                sim, _ = Q.sage_reference(*(x[:, :1] for x in (q, k, v)), block_q=cfg_r.block_q,
                                          block_k=cfg_r.block_kv, q_segment_ids=ids,
                                          kv_segment_ids=ids, **S.sim_flags(cfg_r))
                o0 = np.asarray(out[:, :1], np.float64)
                acc = Q.accuracy(o0, ref)
                vs_sim = float(np.abs(o0 - np.asarray(sim, np.float64)).max() / np.abs(sim).max())
                res[key] = dict(cos=acc["cos_min"], rel_l1=acc["rel_l1_max"], vs_sim=vs_sim)
                log(f"segments {key}: cos {acc['cos_min']:.5f} rel_l1 {acc['rel_l1_max']:.4f} "
                    f"vs sim {vs_sim:.1e}")
            except Exception as e:  # noqa: BLE001
                res[key] = {"error": f"{type(e).__name__}: {e}"[:2000]}
                log(f"segments {key}: ERROR\n{traceback.format_exc()[-3000:]}")


EXTRAS = ("prepass", "prepass16", "prepass_pallas", "prepass16_pallas", "prepass_pallas_v", "cudnn")


def variants_table(results, log):
    log(f"{'shape':22s} {'variant':16s} {'ms':>7s} {'kernel':>7s} {'x cudnn':>8s} {'vs sim':>8s} "
        f"{'cos f64':>8s} {'relL1':>7s}")
    for key, row in results.get("variants", {}).items():
        ms = {n: row.get(n, {}).get("ms") or float("nan") for n in EXTRAS}
        cud = row.get("cudnn", {}).get("ms")
        log(f"{key:22s} pre-pass ms: FP8 P V {ms['prepass']:.3f} (jnp), {ms['prepass_pallas']:.3f} "
            f"(Pallas), {ms['prepass_pallas_v']:.3f} (Pallas, V too); 16-bit P V {ms['prepass16']:.3f} (jnp), {ms['prepass16_pallas']:.3f} "
            f"(Pallas); cudnn {ms['cudnn']:.3f} ms")
        pre8 = row.get("prepass_pallas", {}).get("ms")  # what sage_attention runs
        pre16 = row.get("prepass16_pallas", {}).get("ms")
        for name, e in row.items():
            if name in EXTRAS:
                continue
            pre = pre16 if name.startswith("pv16") else pre8
            if "error" in e and "ms" not in e:
                log(f"{key:22s} {name:16s} {'err':>7s}  {e['error'][:60]}")
                continue
            ms = e.get("ms")
            f = lambda x, w, p: f"{x:{w}.{p}f}" if x is not None else f"{'-':>{w}s}"  # noqa: E731
            log(f"{key:22s} {name:16s} {f(ms, 7, 3)} {f(ms - pre if ms and pre else None, 7, 3)} "
                f"{f(cud / ms if ms and cud else None, 8, 2)} {e.get('max_rel_vs_sim', float('nan')):8.1e} "
                f"{e.get('cos', float('nan')):8.5f} {e.get('rel_l1', float('nan')):7.4f}"
                + ("" if e.get("ok", True) else "  MISMATCH"))


def _smoke_summary(results, label):
    bad = [k for k, r in results["smoke"].items() if not r.get("ok")]
    return (f"{label}: {len(results['smoke']) - len(bad)}/{len(results['smoke'])} ok"
            + (f"; failing: {bad[:4]}" if bad else ""))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="sage_out")
    ap.add_argument("--quick", action="store_true", help="smaller accuracy size, two timed shapes")
    ap.add_argument("--variants", action="store_true",
                    help="only: SageConfig variants (checked, then timed), pre-pass, cuDNN")
    ap.add_argument("--budget", type=float, default=150.0,
                    help="--variants: seconds after which remaining variants are skipped")
    ap.add_argument("--only", default="", help="--variants: comma-separated variant names")
    ap.add_argument("--segments", action="store_true",
                    help="only: packed prompts (segment ids), FP8 and 16-bit P V, vs float64")
    ap.add_argument("--shapes", default="1,2", help="--variants: TIMED indices, e.g. 0,1,2,3")
    ap.add_argument("--skip-prepass", action="store_true",
                    help="--variants: no pre-pass-alone rows (the jnp one compiles for minutes at 16k)")
    ap.add_argument("--smoke-variant", default="",
                    help="only: the smoke test (masked calls) with this `_variants()` config")
    ap.add_argument("--smoke-shapes", default="", help="--smoke-variant: SMOKE indices, e.g. 3")
    ap.add_argument("--accuracy", action="store_true",
                    help="only: the accuracy table (sage, sage16, their simulations, cuDNN vs float64)")
    args = ap.parse_args()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import jax
    results = {"device": str(jax.devices()[0]), "jax": jax.__version__, "smoke": {}, "accuracy": {},
               "timing": {}}
    lines = []

    def log(msg):
        print(msg, flush=True)
        lines.append(msg)

    t0 = time.time()
    if args.segments:
        segments(results, log)
        (out / "sage.json").write_text(json.dumps(results, indent=1))
        (out / "log.txt").write_text("\n".join(lines))
        return
    if args.smoke_variant:
        smoke(results, log, args.smoke_variant,
              [int(x) for x in args.smoke_shapes.split(",") if x] or None)
        log(_smoke_summary(results, f"smoke {args.smoke_variant}"))
        (out / "sage.json").write_text(json.dumps(results, indent=1))
        (out / "log.txt").write_text("\n".join(lines))
        return
    if args.accuracy:
        accuracy(results, log, 1024 if args.quick else 2048)
        (out / "sage.json").write_text(json.dumps(results, indent=1))
        return
    if args.variants:
        try:
            variants(results, log, t0, args.budget, only=[x for x in args.only.split(",") if x],
                     shapes=[int(x) for x in args.shapes.split(",")], prepass=not args.skip_prepass)
        except Exception:  # noqa: BLE001
            log(f"variants failed:\n{traceback.format_exc()}")
        (out / "sage.json").write_text(json.dumps(results, indent=1))
        log(f"\n=== variants ({time.time() - t0:.0f} s, {results['device']}, jax {results['jax']}) ===")
        variants_table(results, log)
        (out / "log.txt").write_text("\n".join(lines))
        return
    for step, fn in (("smoke", lambda: smoke(results, log)),
                     ("accuracy", lambda: accuracy(results, log, 1024 if args.quick else 2048)),
                     ("timing", lambda: timing(results, log, TIMED[1:3] if args.quick else TIMED))):
        try:
            fn()
        except Exception:  # noqa: BLE001
            log(f"step {step} failed:\n{traceback.format_exc()}")
        (out / "sage.json").write_text(json.dumps(results, indent=1))
    log(f"\n=== summary ({time.time() - t0:.0f} s, {results['device']}, jax {results['jax']}) ===")
    log(_smoke_summary(results, "smoke"))
    for key, row in results["accuracy"].items():
        log(f"{key:22s} " + "  ".join(f"{n}: {a['cos_min']:.5f}/{a['rel_l1_max']:.4f}" if "cos_min" in a else f"{n}: err"
                                      for n, a in row.items() if isinstance(a, dict)))
    log(f"{'shape':26s} {'sage ms':>9s} {'prepass':>9s} {'cudnn ms':>9s} {'speedup':>8s}")
    for key, row in results["timing"].items():
        ms = {n: row.get(n, {}).get("ms") for n in ("sage", "sage_prepass", "cudnn")}
        fmt = lambda x: f"{x:9.3f}" if x else f"{'err':>9s}"  # noqa: E731
        sp = f"{ms['cudnn'] / ms['sage']:8.2f}" if ms["sage"] and ms["cudnn"] else f"{'-':>8s}"
        log(f"{key:26s} {fmt(ms['sage'])} {fmt(ms['sage_prepass'])} {fmt(ms['cudnn'])} {sp}")
    (out / "sage.json").write_text(json.dumps(results, indent=1))
    (out / "log.txt").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
