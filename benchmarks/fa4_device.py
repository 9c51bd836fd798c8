"""Device probe for the `fa4` backend: every step reported, one failure never stops the rest.

Installs nothing; expects flash-attn-4, jax-tvm-ffi and a CUDA jax/torch to be importable.
    python benchmarks/fa4_device.py --out /tmp/fa4_probe   # writes probe.json and probe.md there
Steps: imports and versions; explain(); forward, lse and gradients under jit vs the float64
reference (bf16/fp16, d 64/128, plain/causal/GQA/kv_lengths/cross/window); then fwd and fwd+bwd
times of fa4 vs cudnn and pallas on the diffusion shapes.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import pathlib
import time
import traceback

import numpy as np

SHAPES = [(2, 8, 4096, 4096, 40), (2, 10, 4096, 4096, 64), (1, 24, 4608, 4608, 128),
          (1, 40, 16384, 16384, 128)]  # (b, n, sq, skv, d)
CASES = ["plain", "causal", "gqa", "lengths", "cross", "window"]

log = logging.getLogger("fa4_device")
RESULTS: dict = {"steps": [], "checks": [], "timings": []}


def step(name, fn, *args, **kw):
    """Run one step; record ok/error with the traceback (printed too) and return its value or None."""
    t = time.perf_counter()
    try:
        value = fn(*args, **kw)
        RESULTS["steps"].append({"step": name, "status": "ok", "s": round(time.perf_counter() - t, 3)})
        log.info("ok   %s (%.1f s)", name, time.perf_counter() - t)
        return value
    except Exception as e:  # noqa: BLE001 - the probe reports every failure and goes on
        tb = traceback.format_exc()
        RESULTS["steps"].append({"step": name, "status": "error", "error": f"{type(e).__name__}: {e}"[:2000],
                                 "traceback": tb[-6000:]})
        log.error("FAIL %s\n%s", name, tb)
        return None


def environment():
    import importlib.metadata as md

    import jax
    env = {"devices": [str(d) for d in jax.devices()], "jax": jax.__version__}
    for pkg in ("jaxlib", "flash-attn-4", "nvidia-cutlass-dsl", "jax-tvm-ffi", "apache-tvm-ffi", "torch",
                "quack-kernels"):
        try:
            env[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            env[pkg] = None
    env["compute_capability"] = getattr(jax.devices()[0], "compute_capability", None)
    RESULTS["env"] = env
    log.info("env %s", env)


def imports():
    import flash_attn.cute.interface  # noqa: F401
    import jax_tvm_ffi  # noqa: F401
    import torch
    import tvm_ffi
    RESULTS["env"]["torch_cuda"] = torch.cuda.is_available()
    RESULTS["env"]["torch_c_dlpack_exchange"] = hasattr(torch.Tensor, "__dlpack_c_exchange_api__")
    RESULTS["env"]["tvm_ffi_convert_func"] = hasattr(tvm_ffi, "convert_func")


def explain():
    import jax
    import jax.numpy as jnp

    import jax_attn
    x = jax.ShapeDtypeStruct((1, 8, 1024, 128), jnp.bfloat16)
    decision = jax_attn.explain(x, x, x, backend="fa4")
    RESULTS["explain"] = str(decision)
    log.info("%s", decision)
    if decision.reasons.get("fa4"):
        raise RuntimeError(f"fa4 declines: {decision.reasons['fa4']}")


def inputs(rng, dtype, case, d):
    import jax.numpy as jnp
    b, n, n_kv, sq, skv, kw = 2, 8, 8, 512, 512, {}
    if case == "causal":
        kw["is_causal"] = True
    elif case == "gqa":
        n_kv = 2
    elif case == "lengths":
        kw["kv_lengths"] = jnp.array([skv, 77], jnp.int32)
    elif case == "cross":
        sq, skv = 384, 77
    elif case == "window":
        kw["local_window_size"] = (64, 32)
    q, k, v, do = (jnp.asarray(rng.standard_normal((b, h, s, d)), dtype)
                   for h, s in ((n, sq), (n_kv, skv), (n_kv, skv), (n, sq)))
    return q, k, v, do, kw


def check(dtype_name, d, case, with_grad):
    import jax
    import jax.numpy as jnp

    import jax_attn
    from jax_attn import reference
    dtype = getattr(jnp, dtype_name)
    q, k, v, do, kw = inputs(np.random.default_rng(0), dtype, case, d)

    def f(q, k, v):
        return jax_attn.attention_forward(q, k, v, backend="fa4", return_lse=True, **kw)

    ref_kw = dict(kv_lengths=kw.get("kv_lengths"), is_causal=kw.get("is_causal", False),
                  window=kw.get("local_window_size"))
    ref_out, ref_lse = reference.attention(q, k, v, return_lse=True, **ref_kw)
    out, lse = jax.jit(f)(q, k, v)
    errs = {"out": reference.relative_error(out, ref_out), "lse": reference.relative_error(lse, ref_lse)}
    if with_grad:
        grads = jax.jit(lambda q, k, v, do: jax.vjp(lambda *a: f(*a)[0], q, k, v)[1](do))(q, k, v, do)
        for name, g, r in zip(("dq", "dk", "dv"), grads, reference.attention_vjp(q, k, v, do, **ref_kw)[:3]):
            errs[name] = reference.relative_error(g, r)
    tol = reference.TOLERANCE[dtype_name]
    ok = all(e <= (tol if n in ("out", "lse") else 2 * tol) for n, e in errs.items())
    row = {"dtype": dtype_name, "d": d, "case": case, "ok": ok, "tol": tol, **errs}
    RESULTS["checks"].append(row)
    log.info("check %s", row)
    if not ok:
        raise AssertionError(f"over tolerance: {row}")


def time_backend(backend, shape, mode, reps=20):
    import jax
    import jax.numpy as jnp

    import jax_attn
    b, n, s, _, d = shape
    key = jax.random.split(jax.random.key(0), 4)
    q, k, v, do = (jax.random.normal(kk, (b, n, s, d), jnp.bfloat16) for kk in key)
    if mode == "fwd":
        fn = jax.jit(lambda q, k, v, do: jax_attn.attention_forward(q, k, v, backend=backend))
    else:
        fn = jax.jit(lambda q, k, v, do: jax.vjp(
            lambda *a: jax_attn.attention_forward(*a, backend=backend), q, k, v)[1](do))
    jax.block_until_ready(fn(q, k, v, do))  # compile (and FA4's first CuTe compile)
    jax.block_until_ready(fn(q, k, v, do))
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn(q, k, v, do))
        times.append(time.perf_counter() - t)
    ms = float(np.median(times) * 1e3)
    flops = 4.0 * b * n * s * s * d * (2.5 if mode != "fwd" else 1.0)
    row = {"backend": backend, "shape": list(shape), "mode": mode, "ms": round(ms, 3),
           "tflops": round(flops / ms / 1e9, 1)}
    RESULTS["timings"].append(row)
    log.info("time %s", row)


def time_layouts(shape, mode):
    """`fa4` on the same inputs in both layouts (bnsd reaches FA4 as strided views, bsnd as is):
    median ms, 10 async calls per sample (one-call samples add host time to sub-ms calls)."""
    import jax
    import jax.numpy as jnp

    import jax_attn
    from jax_attn.bench.timing import median_ms
    b, n, s, _, d = shape
    q, k, v, do = (jax.random.normal(kk, (b, n, s, d), jnp.bfloat16)
                   for kk in jax.random.split(jax.random.key(0), 4))
    row = {"shape": list(shape), "mode": mode}
    for layout in ("bnsd", "bsnd"):
        args = (q, k, v, do) if layout == "bnsd" else tuple(jnp.swapaxes(x, 1, 2) for x in (q, k, v, do))

        def f(q, k, v, do, layout=layout):
            attn = lambda *a: jax_attn.attention_forward(*a, backend="fa4", layout=layout)  # noqa: E731
            return attn(q, k, v) if mode == "fwd" else jax.vjp(attn, q, k, v)[1](do)
        row[layout] = round(median_ms(jax.jit(f), *args, calls=10), 4)
    RESULTS.setdefault("layouts", []).append(row)
    log.info("layouts %s", row)


def markdown() -> str:
    lines = ["# fa4 device probe", "", f"env: `{json.dumps(RESULTS.get('env', {}))}`", "",
             "| step | status |", "|---|---|"]
    lines += [f"| {s['step']} | {s['status']}{': ' + s['error'][:120] if s['status'] != 'ok' else ''} |"
              for s in RESULTS["steps"]]
    lines += ["", "| shape (b,n,s,s,d) | mode | " + " | ".join(("fa4", "cudnn", "pallas")) + " |", "|---|---|---|---|---|"]
    for shape in SHAPES:
        for mode in ("fwd", "fwd+bwd"):
            cells = []
            for backend in ("fa4", "cudnn", "pallas"):
                hit = [t for t in RESULTS["timings"] if t["backend"] == backend and t["mode"] == mode
                       and t["shape"] == list(shape)]
                cells.append(f"{hit[0]['ms']} ms ({hit[0]['tflops']} TF/s)" if hit else "-")
            lines.append(f"| {shape} | {mode} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for probe.json and probe.md")
    parser.add_argument("--skip-timing", action="store_true")
    parser.add_argument("--grad", default="1", help="0: forward checks only")
    parser.add_argument("--dtypes", default="bfloat16,float16", help="of the checks")
    parser.add_argument("--layout-timing", action="store_true",
                        help="fa4 on (b, n, s, d) and (b, s, n, d) inputs, 10 calls per sample")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("jax_attn").setLevel(logging.INFO)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.6")  # room for torch's FA4 scratch

    def save():
        (out / "probe.json").write_text(json.dumps(RESULTS, indent=1, default=str))
        (out / "probe.md").write_text(markdown())

    step("environment", environment)
    step("imports", imports)
    step("explain", explain)
    # Forward alone first: if the FFI route breaks, this names the step where it breaks.
    step("forward bfloat16 d=64 plain", check, "bfloat16", 64, "plain", False)
    step("forward+grad bfloat16 d=64 plain", check, "bfloat16", 64, "plain", args.grad == "1")
    save()
    for dtype in args.dtypes.split(","):
        for d in (64, 128):
            for case in CASES:
                step(f"check {dtype} d={d} {case}", check, dtype, d, case, args.grad == "1")
    save()
    if not args.skip_timing:
        for shape in SHAPES:
            for mode in ("fwd", "fwd+bwd"):
                for backend in ("fa4", "cudnn", "pallas"):
                    step(f"time {backend} {shape} {mode}", time_backend, backend, shape, mode)
                save()
    if args.layout_timing:
        for shape in SHAPES[1:]:
            for mode in ("fwd", "fwd+bwd"):
                step(f"layouts {shape} {mode}", time_layouts, shape, mode)
            save()
    save()
    print(markdown())
    for row in RESULTS.get("layouts", []):
        print("layouts", row)


if __name__ == "__main__":
    main()
