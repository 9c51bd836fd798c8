"""GPU correctness and timing of the Pallas flash-attention kernel, in one run.

    PYTHONUNBUFFERED=1 PYTHONPATH=. python benchmarks/pallas_gpu.py --out $OUT [--tune]

1. Correctness of forward, lse and gradients (lse cotangent included) on small shapes covering
   every feature, against the float64 NumPy reference (`jax_attn.reference`).
2. Correctness on the diffusion shapes against a float32 XLA reference on the GPU (two heads).
3. Timing, bf16, inputs in (b, s, n, d): ours, `jax.nn.dot_product_attention` cudnn and xla, and
   JAX's reference Pallas kernel `jax.experimental.pallas.ops.gpu.attention.mha`; forward and
   forward+backward, median of many runs. FLOPs: 4*b*n*sq*skv*d forward, 2.5x that backward.
With --tune, benchmarks/tune_pallas.py runs first and its picks are used (and saved as JSON).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import pathlib
import subprocess
import sys
import traceback

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).parent))

log = logging.getLogger("pallas_gpu")

SHAPES = [(2, 8, 4096, 4096, 40), (2, 8, 4096, 77, 40), (2, 10, 4096, 4096, 64),
          (2, 10, 4096, 77, 64), (1, 24, 4608, 4608, 128), (1, 40, 16384, 16384, 128)]


def rel(a, r):
    a = np.asarray(a, np.float64)
    r = np.asarray(r, np.float64)
    if not np.all(np.isfinite(a)):
        return float("nan")
    return float(np.linalg.norm(a - r) / max(np.linalg.norm(r), 1e-30))


def check_small():
    """Every feature at small odd shapes vs the float64 reference; returns rows of errors."""
    import jax
    import jax.numpy as jnp

    from jax_attn import reference as R
    from jax_attn.kernels.flash_attention import flash_attention

    rng = np.random.default_rng(1)
    cases = [  # b, n, n_kv, sq, skv, d, dv, kwargs
        (1, 2, 2, 77, 33, 40, 40, {}),
        (2, 4, 2, 333, 77, 64, 64, {"is_causal": True}),
        (2, 4, 1, 1, 4097, 128, 128, {"kv_lengths": [0, 1000]}),
        (2, 2, 2, 200, 300, 72, 40, {"key_mask": True, "layout": "bsnd"}),
        (1, 2, 2, 100, 130, 96, 96, {"bias": True, "is_causal": True}),
        (1, 2, 2, 64, 64, 256, 256, {}),
        (1, 2, 2, 50, 70, 8, 8, {"kv_lengths": [30]}),
    ]
    rows = []
    # bf16 on every case; float32 (full-precision dots, no TF32) on three.
    runs = [(jnp.bfloat16, 2e-2, c) for c in cases] + [(jnp.float32, 1e-4, c) for c in cases[1:4]]
    for dtype, tol, (b, n, nkv, sq, skv, d, dv, kw) in runs:
        if True:
            kw = dict(kw)
            layout = kw.pop("layout", "bnsd")
            q = rng.standard_normal((b, n, sq, d))
            k = rng.standard_normal((b, nkv, skv, d))
            v = rng.standard_normal((b, nkv, skv, dv))
            do = rng.standard_normal((b, n, sq, dv))
            dl = rng.standard_normal((b, n, sq))
            am = None
            if kw.pop("key_mask", False):
                am = rng.random((b, 1, 1, skv)) > 0.3
                kw["key_mask"] = jnp.asarray(am)
            if kw.pop("bias", False):
                am = rng.standard_normal((b, n, sq, skv))
                am[:, :, 5, :] = -np.inf
                am[:, :, :, 7] = -np.inf
                kw["bias"] = jnp.asarray(am, jnp.float32)
            kvl = kw.get("kv_lengths")
            if kvl is not None:
                kw["kv_lengths"] = jnp.asarray(kvl, jnp.int32)
            t = (lambda x: x) if layout == "bnsd" else (lambda x: np.swapaxes(x, 1, 2))
            name = f"{jnp.dtype(dtype).name} b{b} n{n}/{nkv} sq{sq} skv{skv} d{d}/{dv} {layout} {sorted(kw)}"
            try:
                f = jax.jit(lambda q, k, v, do, dl: _vjp(flash_attention, q, k, v, do, dl, layout, kw))
                (o, lse), (dq, dk, dvv) = f(*(jnp.asarray(t(x), dtype) for x in (q, k, v, do)),
                                           jnp.asarray(dl, jnp.float32))
                causal = kw.get("is_causal", False)
                ro, rl = R.attention(q, k, v, attn_mask=am, kv_lengths=kvl, is_causal=causal,
                                     return_lse=True)
                rdq, rdk, rdv, _ = R.attention_vjp(q, k, v, do, attn_mask=am, kv_lengths=kvl,
                                                   is_causal=causal)
                p = R.probabilities(q, k, attn_mask=am, kv_lengths=kvl, is_causal=causal)
                g, sc = n // nkv, 1 / math.sqrt(d)
                dsl = p * dl[..., None]
                rdq = rdq + np.einsum("bnqk,bnkd->bnqd", dsl, np.repeat(k, g, 1)) * sc
                rdk = rdk + (np.einsum("bnqk,bnqd->bnkd", dsl, q) * sc).reshape(b, nkv, g, skv, d).sum(2)
                f32 = lambda x: t(np.asarray(jnp.asarray(x, jnp.float32)))  # noqa: E731
                lse = np.asarray(lse)
                fin = np.isfinite(rl)
                lse_err = (float(np.abs(lse[fin] - rl[fin]).max()) if fin.any() else 0.0)
                if not np.array_equal(np.isneginf(lse), np.isneginf(rl)):
                    lse_err = float("nan")
                errs = [rel(f32(o), ro), lse_err, rel(f32(dq), rdq), rel(f32(dk), rdk), rel(f32(dvv), rdv)]
                ok = all(e <= tol * (10 if i == 1 else 1) for i, e in enumerate(errs))
            except Exception as e:  # noqa: BLE001 - report and go on with the other cases
                log.error("%s failed:\n%s", name, traceback.format_exc())
                errs, ok = [str(e).splitlines()[0][:80]], False
            log.info("small %s %s: %s", "PASS" if ok else "FAIL", name, errs)
            rows.append((name, ok, errs))
    return rows


def _vjp(fn, q, k, v, do, dl, layout, kw):
    import jax

    (o, lse), vjp = jax.vjp(lambda q, k, v: fn(q, k, v, layout=layout, return_lse=True, **kw), q, k, v)
    return (o, lse), vjp((do, dl))


def check_shape(shape, q, k, v, do, ours_fn):
    """Ours vs a float32 XLA reference on the first two heads (bounded memory at 16k)."""
    import jax
    import jax.numpy as jnp

    def ref(q, k, v):
        return jax.nn.dot_product_attention(q.astype(jnp.float32), k.astype(jnp.float32),
                                            v.astype(jnp.float32), implementation="xla")

    h = slice(0, 2)
    o, vjp = jax.vjp(ours_fn, q, k, v)
    grads = vjp(do)
    ro, rvjp = jax.vjp(ref, q[:, :, h], k[:, :, h], v[:, :, h])
    rgrads = rvjp(do[:, :, h].astype(jnp.float32))
    return [rel(np.asarray(o[:, :, h], np.float32), np.asarray(ro))] + [
        rel(np.asarray(g[:, :, h], np.float32), np.asarray(r)) for g, r in zip(grads, rgrads)]


def bench(args):
    import jax
    import jax.numpy as jnp
    from jax_attn.arrays import random_normal
    from jax.experimental.pallas.ops.gpu import attention as jax_pallas

    from jax_attn.kernels.flash_attention import flash_attention
    from tune_pallas import time_ms

    rows = []
    for b, n, sq, skv, d in SHAPES:
        keys = jax.random.split(jax.random.key(sq + skv + d), 4)
        q = random_normal(keys[0], (b, sq, n, d), jnp.bfloat16)
        k = random_normal(keys[1], (b, skv, n, d), jnp.bfloat16)
        v = random_normal(keys[2], (b, skv, n, d), jnp.bfloat16)
        do = random_normal(keys[3], (b, sq, n, d), jnp.bfloat16)
        flops = 4.0 * b * n * sq * skv * d
        impls = {
            "ours": lambda q, k, v: flash_attention(q, k, v, layout="bsnd"),
            "cudnn": lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="cudnn"),
            "xla": lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="xla"),
            "jax_pallas": lambda q, k, v: jax_pallas.mha(q, k, v, None, sm_scale=1 / math.sqrt(d)),
        }
        shape = (b, n, sq, skv, d)
        try:
            errs = check_shape(shape, q, k, v, do, impls["ours"])
        except Exception as e:  # noqa: BLE001
            log.error("check %s failed:\n%s", shape, traceback.format_exc())
            errs = [str(e).splitlines()[0][:80]]
        log.info("check %s rel err out, dq, dk, dv vs f32 XLA: %s", shape, errs)
        for name, fn in impls.items():
            row = {"shape": shape, "impl": name, "check": errs if name == "ours" else None}
            logits_gb = b * n * sq * skv * 4 / 1e9
            if name == "xla" and logits_gb > 8:
                row["error"] = f"skipped: the (b,n,sq,skv) f32 logits alone take {logits_gb:.0f} GB"
                rows.append(row)
                continue
            for mode in ("fwd", "fwd+bwd"):
                try:
                    if mode == "fwd":
                        f = jax.jit(fn)
                        t = time_ms(f, q, k, v)
                    else:
                        def fb(q, k, v, do, fn=fn):
                            return jax.vjp(fn, q, k, v)[1](do)
                        t = time_ms(jax.jit(fb), q, k, v, do, reps=10, inner=3)
                    row[mode] = t
                except Exception as e:  # noqa: BLE001
                    msg = str(e).strip().splitlines()
                    row[mode + "_error"] = (msg[0] if msg else repr(e))[:160]
                    log.warning("%s %s %s failed: %s", shape, name, mode, row[mode + "_error"])
            if "fwd" in row:
                row["fwd_tflops"] = flops / row["fwd"] / 1e9
            if "fwd" in row and "fwd+bwd" in row:
                row["bwd"] = row["fwd+bwd"] - row["fwd"]
                row["bwd_tflops"] = 2.5 * flops / row["bwd"] / 1e9
            log.info("bench %s", json.dumps(row))
            rows.append(row)
    return rows


def table(rows):
    ref = {(tuple(r["shape"]), "cudnn"): r for r in rows if r["impl"] == "cudnn"}
    out = ["| b,n,sq,skv,d | impl | fwd ms | fwd TFLOP/s | fwd vs cuDNN | bwd ms | bwd TFLOP/s | "
           "bwd vs cuDNN | note |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        c = ref.get((tuple(r["shape"]), "cudnn"), {})

        def f(key, fmt="{:.3f}"):
            return fmt.format(r[key]) if key in r else "-"

        def ratio(key):
            return f"{c[key] / r[key]:.2f}x" if key in r and key in c else "-"
        note = r.get("error") or r.get("fwd_error") or r.get("fwd+bwd_error") or ""
        if r.get("check"):
            note = "rel err o/dq/dk/dv " + "/".join(
                f"{e:.1e}" if isinstance(e, float) else str(e) for e in r["check"])
        out.append(f"| {','.join(map(str, r['shape']))} | {r['impl']} | {f('fwd')} | "
                   f"{f('fwd_tflops', '{:.0f}')} | {ratio('fwd')} | {f('bwd')} | "
                   f"{f('bwd_tflops', '{:.0f}')} | {ratio('bwd')} | {note[:90]} |")
    return "\n".join(out)


def versions():
    import jax
    import jaxlib

    info = {"jax": jax.__version__, "jaxlib": jaxlib.__version__,
            "device": jax.devices()[0].device_kind}
    try:
        from jax._src.lib import cuda_versions
        info["cudnn"] = cuda_versions.cudnn_get_version()
    except Exception as e:  # noqa: BLE001
        info["cudnn"] = f"unknown ({e})"
    try:
        info["driver"] = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version,name", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=30).stdout.strip()
    except Exception as e:  # noqa: BLE001
        info["driver"] = f"unknown ({e})"
    return info


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=".")
    p.add_argument("--tune", action="store_true")
    p.add_argument("--skip-small", action="store_true")
    a = p.parse_args()
    out = pathlib.Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s",
                        handlers=[logging.FileHandler(out / "log.txt"), logging.StreamHandler()])
    info = versions()
    log.info("versions %s", info)
    small = [] if a.skip_small else check_small()
    if a.tune:
        import tune_pallas

        from jax_attn.kernels import configs
        for e in tune_pallas.run(out / "tuned.json"):
            configs.TUNED[tuple(e["key"])] = configs.Config(
                configs.FwdConfig(**e["fwd"]), configs.BwdConfig(**e["bwd"]), e["device"], e["measured"])
    rows = bench(a)
    (out / "bench.json").write_text(json.dumps({"versions": info, "rows": rows,
                                                "small": small}, indent=1, default=str))
    text = table(rows)
    (out / "table.md").write_text(text + "\n")
    print("\nversions:", info)
    print("small checks:", sum(ok for _, ok, _ in small), "/", len(small), "passed;",
          [n for n, ok, _ in small if not ok])
    print(text)


if __name__ == "__main__":
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    main()
