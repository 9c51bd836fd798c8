"""8-bit attention peers on the GPU: our `sage` beside cuDNN's FP8 attention (through JAX's
binding) and SageAttention 1 (`sageattention` 1.0.6, torch + Triton: INT8 Q K^T, FP16 P V).

1. Accuracy against float64 (host NumPy, 4 heads, 1024 tokens), the two input families of
   tests/test_sage.py (standard normal; heavy-tailed Q with a per-channel K offset), d = 64 and
   128: our kernel, cuDNN FP8, `sageattention` through torch_ref's adapter
   (`torch_ref.attention_forward(backend="sageattention")`, the cross-framework comparison), and
   cuDNN bf16 as the 16-bit yardstick. Worst-head cosine and relative L1.
2. Speed (10 calls dispatched back to back per timing sample), bf16 inputs, quantization counted
   in every 8-bit figure: our `sage`, cuDNN FP8 (amax
   scaling and casts included; its kernel alone as a second row), `sageattention`, cuDNN bf16
   (JAX) and torch SDPA's cuDNN kernel.

cuDNN FP8 scaling here: one scale per tensor (JAX's binding takes scalars): Q, K, V by
448 / amax, P by 448 (it lies in [0, 1]), the output by 448 / amax(V) (|out| <= max |V|); the FP8
output is dequantized to bf16. Every step is in try/except; a table is printed last and
`sage_peers.json` goes to `--out` (default `$OUT`).

    PYTHONPATH=. python benchmarks/sage_peers.py --out $OUT
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import pathlib
import sys
import time
import traceback

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run from a checkout

log = logging.getLogger("sage_peers")
SHAPES = [(1, 24, 16384, 128), (1, 24, 4608, 128), (2, 10, 4096, 64), (2, 8, 4096, 40)]  # (b, n, s, d)
E4M3_MAX = 448.0


def cudnn_fp8(q, k, v, scale, kernel_only=False):
    """cuDNN FP8 attention (bnsd) of bf16 q, k, v with per-tensor scales; bf16 out.

    `kernel_only`: q, k, v are already FP8 and the scales given as a 4th argument."""
    import jax.numpy as jnp
    from jax._src.cudnn import fused_attention_stablehlo as F

    def quant(x):
        amax = jnp.maximum(jnp.max(jnp.abs(x.astype(jnp.float32))), 1e-6)
        return (x.astype(jnp.float32) * (E4M3_MAX / amax)).astype(jnp.float8_e4m3fn), amax / E4M3_MAX

    (q8, dq), (k8, dk), (v8, dv) = quant(q), quant(k), quant(v)
    one = lambda x: jnp.reshape(jnp.asarray(x, jnp.float32), (1, 1, 1, 1))  # noqa: E731
    params = {key: one(1.0) for key in F.fp8_params_keys}
    params.update(descale_q=one(dq), descale_k=one(dk), descale_v=one(dv), descale_s=one(1 / E4M3_MAX),
                  scale_s=one(E4M3_MAX), scale_o=one(1 / dv), descale_o=one(dv))
    out, _, _ = F.dot_product_attention(q8, k8, v8, fp8_params=params, scale=scale, qkv_layout="BNTH",
                                        use_fp8=True)
    return (out.astype(jnp.float32) * dv).astype(jnp.bfloat16)


def _family(name, b, n, s, d, seed=0):
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal((b, n, s, d)).astype(np.float32) for _ in range(3))
    if name == "outlier":
        q = rng.standard_t(3, (b, n, s, d)).astype(np.float32)
        k = k + 8.0 * rng.standard_normal((1, 1, 1, d)).astype(np.float32)
    return q, k, v


def accuracy(results):
    import jax
    import jax.numpy as jnp

    import jax_attn
    import torch
    import torch_ref
    from jax_attn import quantization as Q
    from jax_attn import reference
    for fam in ("normal", "outlier"):
        for d in (64, 128):
            key = f"{fam} d={d} s=1024"
            row = results["accuracy"].setdefault(key, {})
            q, k, v = _family(fam, 1, 4, 1024, d)
            qb, kb, vb = (jnp.asarray(x, jnp.bfloat16) for x in (q, k, v))
            f64 = [np.asarray(x.astype(jnp.float32), np.float64) for x in (qb, kb, vb)]
            ref = np.concatenate([reference.attention(*(x[:, h:h + 1] for x in f64)) for h in range(4)], 1)
            tq, tk, tv = (torch.from_numpy(x).to("cuda", torch.bfloat16) for x in (q, k, v))
            runs = {
                "sage (ours)": lambda: jax_attn.attention_forward(qb, kb, vb, backend="sage"),
                "cudnn fp8": lambda: jax.jit(cudnn_fp8, static_argnums=3)(qb, kb, vb, d ** -0.5),
                "sageattention 1.0.6": lambda: torch_ref.attention_forward(tq, tk, tv, backend="sageattention")
                .float().cpu().numpy(),
                "cudnn bf16": lambda: jax_attn.attention_forward(qb, kb, vb, backend="cudnn"),
            }
            for name, fn in runs.items():
                try:
                    row[name] = Q.accuracy(np.asarray(fn(), np.float64), ref)
                    log.info("%s %s: cos_min %.6f rel_l1_max %.4f", key, name, row[name]["cos_min"],
                             row[name]["rel_l1_max"])
                except Exception as e:  # noqa: BLE001
                    row[name] = {"error": f"{type(e).__name__}: {e}"[:1500]}
                    log.error("%s %s: %s", key, name, traceback.format_exc()[-2500:])


def timing(results, budget, t0):
    import jax
    import jax.numpy as jnp
    from jax_attn.arrays import random_normal
    import torch

    import jax_attn
    from jax_attn.bench.timing import median_ms as _median_ms

    def median_ms(fn, *args, sync=None):  # 10 calls dispatched back to back per sample
        return _median_ms(fn, *args, sync=sync, calls=10)

    sync = torch.cuda.synchronize
    for b, n, s, d in SHAPES:
        key = f"{b}x{n}x{s}x{d}"
        row = results["timing"].setdefault(key, {})
        flops = 4.0 * b * n * s * s * d
        ks = jax.random.split(jax.random.key(0), 3)
        q, k, v = (random_normal(kk, (b, n, s, d), jnp.bfloat16) for kk in ks)
        tq, tk, tv = (torch.randn(b, n, s, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        scale = d ** -0.5
        fp8 = jax.jit(cudnn_fp8, static_argnums=3)
        from jax._src.cudnn import fused_attention_stablehlo as F

        def fp8_kernel_args():
            e = lambda x: x.astype(jnp.float8_e4m3fn)  # noqa: E731
            one = jnp.ones((1, 1, 1, 1), jnp.float32)
            return e(q), e(k), e(v), {key_: one for key_ in F.fp8_params_keys}

        kernel = jax.jit(lambda a, b_, c, p: F.dot_product_attention(
            a, b_, c, fp8_params=p, scale=scale, qkv_layout="BNTH", use_fp8=True)[0])
        runs = {
            "sage (ours)": lambda: median_ms(jax.jit(lambda a, b_, c: jax_attn.attention_forward(
                a, b_, c, backend="sage")), q, k, v),
            "cudnn fp8": lambda: median_ms(fp8, q, k, v, scale),
            "cudnn fp8 kernel only": lambda: median_ms(kernel, *fp8_kernel_args()),
            "sageattention 1.0.6": lambda: median_ms(lambda: __import__("sageattention").sageattn(
                tq, tk, tv, tensor_layout="HND", sm_scale=scale), sync=sync),
            "cudnn bf16 (jax)": lambda: median_ms(jax.jit(lambda a, b_, c: jax_attn.attention_forward(
                a, b_, c, backend="cudnn")), q, k, v),
            "torch sdpa cudnn bf16": lambda: median_ms(_torch_cudnn, tq, tk, tv, sync=sync),
        }
        for name, fn in runs.items():
            if time.perf_counter() - t0 > budget:
                row[name] = {"error": "skipped (budget)"}
                continue
            try:
                ms = fn()
                row[name] = {"ms": ms, "tflops": flops / ms / 1e9}
                log.info("%s %s: %.3f ms %.0f TFLOP/s", key, name, ms, flops / ms / 1e9)
            except Exception as e:  # noqa: BLE001
                row[name] = {"error": f"{type(e).__name__}: {e}"[:1500]}
                log.error("%s %s: %s", key, name, traceback.format_exc()[-2500:])


def _torch_cudnn(q, k, v):
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)


def table(results):
    lines = ["accuracy vs float64 (worst head): cos / rel L1"]
    for key, row in results["accuracy"].items():
        lines.append(f"  {key:20s} " + "  ".join(
            f"{nm}: {a['cos_min']:.5f}/{a['rel_l1_max']:.4f}" if "cos_min" in a else f"{nm}: error"
            for nm, a in row.items()))
    lines.append("speed, ms (x cuDNN bf16 through JAX: above 1 is faster)")
    for key, row in results["timing"].items():
        base = row.get("cudnn bf16 (jax)", {}).get("ms")
        lines.append(f"  {key:16s} " + "  ".join(
            f"{nm}: {e['ms']:.3f}" + (f" ({base / e['ms']:.2f}x)" if base else "") if "ms" in e else f"{nm}: -"
            for nm, e in row.items()))
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT"))
    ap.add_argument("--budget", type=float, default=150.0, help="start no timing after this many s")
    ap.add_argument("--steps", default="accuracy,timing", help="comma-separated: accuracy, timing")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import jax
    t0 = time.perf_counter()
    results = {"device": str(jax.devices()[0].device_kind), "jax": jax.__version__, "accuracy": {}, "timing": {}}
    try:
        import sageattention  # noqa: F401
        results["sageattention"] = getattr(sageattention, "__version__", "1.0.6 (wheel)")
    except ImportError as e:
        results["sageattention"] = f"not importable: {e}"
    for step, fn in (("accuracy", lambda: accuracy(results)), ("timing", lambda: timing(results, args.budget, t0))):
        if step not in args.steps.split(","):
            continue
        try:
            fn()
        except Exception:  # noqa: BLE001
            log.error("step %s failed:\n%s", step, traceback.format_exc())
    text = table(results)
    if args.out:
        out = pathlib.Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "sage_peers.json").write_text(json.dumps(results, indent=1))
        (out / "sage_peers.txt").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
