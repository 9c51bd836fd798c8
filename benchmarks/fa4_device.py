"""Device probe for the `fa4` backend: every step reported, one failure never stops the rest.

Installs nothing; expects flash-attn-4, jax-tvm-ffi and a CUDA jax/torch to be importable.
    python benchmarks/fa4_device.py --out /tmp/fa4_probe   # writes probe.json and probe.md there
Steps: imports and versions; explain(); forward, lse and gradients under jit vs the float64
reference (bf16/fp16, d 64/128, plain/causal/GQA/kv_lengths/cross/window); then fwd and fwd+bwd
times of fa4 vs cudnn and pallas on the diffusion shapes.

    python benchmarks/fa4_device.py --segments --out /tmp/fa4_segments   # writes segments.json
`--segments` runs only packed prompts (segment ids; fa4's mask_mod + block sparsity): b=2, n=8,
bf16, s 2048/8192, d 64/128, 3-6 uneven segments per row with sorted ids, plus one case of
unsorted ids and one where some query ids have no key; fa4 vs the float64 reference (first head
or two: out, lse, dq, dk, dv), then median ms (10 calls per sample) of fa4 with ids, fa4 without
ids and pallas with ids, forward and forward+backward, the long prompts first while `--budget`
lasts; a table is printed last.
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
    from jax_attn.arrays import random_normal
    b, n, s, _, d = shape
    key = jax.random.split(jax.random.key(0), 4)
    q, k, v, do = (random_normal(kk, (b, n, s, d), jnp.bfloat16) for kk in key)
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
    from jax_attn.arrays import random_normal
    from jax_attn.bench.timing import median_ms
    b, n, s, _, d = shape
    q, k, v, do = (random_normal(kk, (b, n, s, d), jnp.bfloat16)
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


# ---------------------------------------------------------------------------------------------
# --segments: packed prompts through fa4 (mask_mod + block sparsity) vs float64, then timings.

# (name, s, d, ids): "sorted" contiguous uneven segments, self-attention; "unsorted" the same ids
# shuffled over the positions; "keyless" sorted, with one query segment renamed to an id no key has.
SEGMENT_CASES = [("sorted s=2048 d=64", 2048, 64, "sorted"), ("sorted s=2048 d=128", 2048, 128, "sorted"),
                 ("sorted s=8192 d=64", 8192, 64, "sorted"), ("sorted s=8192 d=128", 8192, 128, "sorted"),
                 ("unsorted s=2048 d=64", 2048, 64, "unsorted"), ("keyless s=2048 d=128", 2048, 128, "keyless")]
SEGMENT_BACKENDS = (("fa4+ids", "fa4", True), ("fa4 no ids", "fa4", False), ("pallas+ids", "pallas", True))


def segment_inputs(s, d, kind, b=2, n=8):
    """bf16 q, k, v, do (b, n, s, d) and int32 (q_ids, kv_ids) (b, s)."""
    import jax.numpy as jnp
    rng = np.random.default_rng(s + d)
    rows = []
    for _ in range(b):
        cuts = np.sort(rng.choice(np.arange(64, s - 64), rng.integers(3, 7) - 1, replace=False))
        rows.append(np.searchsorted(cuts, np.arange(s), side="right"))
    kv_ids = np.asarray(rows, np.int32)
    if kind == "unsorted":
        kv_ids = np.stack([rng.permutation(row) for row in kv_ids]).astype(np.int32)
    q_ids = kv_ids.copy()
    if kind == "keyless":
        q_ids[0][q_ids[0] == 1] = 99  # segment 1 of row 0: its queries see no key (zeros, lse -inf)
    q, k, v, do = (jnp.asarray(rng.standard_normal((b, n, s, d)), jnp.bfloat16) for _ in range(4))
    return q, k, v, do, q_ids, kv_ids


def segment_reference(q, k, v, do, q_ids, kv_ids, kind):
    """float64 out, lse, dq, dk, dv. Sorted self-attention ids are block-diagonal exactly, so
    those are computed one segment at a time (the reference's cost is quadratic in s)."""
    from jax_attn import reference
    q, k, v, do = (np.asarray(x, np.float64) for x in (q, k, v, do))
    if kind != "sorted":
        out, lse = reference.attention(q, k, v, return_lse=True, q_segment_ids=q_ids, kv_segment_ids=kv_ids)
        return (out, lse, *reference.attention_vjp(q, k, v, do, q_segment_ids=q_ids, kv_segment_ids=kv_ids)[:3])
    res = [np.zeros_like(q), np.zeros(q.shape[:3]), np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)]
    for row in range(q.shape[0]):
        for seg in np.unique(q_ids[row]):
            at = np.flatnonzero(q_ids[row] == seg)
            part = [x[row:row + 1, :, at] for x in (q, k, v, do)]
            out, lse = reference.attention(*part[:3], return_lse=True)
            for x, value in zip(res, (out, lse, *reference.attention_vjp(*part)[:3])):
                x[row:row + 1, :, at] = value
    return res


def segment_check(name, s, d, kind):
    import jax

    import jax_attn
    from jax_attn import reference
    from jax_attn.backends import fa4_segments
    from jax_attn.contract import validate
    q, k, v, do, q_ids, kv_ids = segment_inputs(s, d, kind)
    ids = dict(q_segment_ids=q_ids, kv_segment_ids=kv_ids)

    @jax.jit
    def run(q, k, v, do):
        def f(q, k, v):
            return jax_attn.attention_forward(q, k, v, backend="fa4", return_lse=True, **ids)
        out, vjp, lse = jax.vjp(f, q, k, v, has_aux=True)
        return (out, lse, *vjp(do))

    got = jax.block_until_ready(run(q, k, v, do))
    heads = 2 if s <= 2048 else 1
    want = segment_reference(*(x[:, :heads] for x in (q, k, v, do)), q_ids, kv_ids, kind)
    errs = {label: reference.relative_error(np.asarray(g[:, :heads], np.float64), w)
            for label, g, w in zip(("out", "lse", "dq", "dk", "dv"), got, want)}
    plan = fa4_segments.plan(validate(q, k, v, **ids))
    partial, _, full, _ = (np.asarray(x) for x in fa4_segments.forward_blocks(
        jax.numpy.asarray(q_ids), jax.numpy.asarray(kv_ids), None, plan))
    tiles = (partial.sum() + full.sum()) / (partial.size * -(-s // plan.fwd_block[1]))
    tol = reference.TOLERANCE["bfloat16"]
    ok = all(e <= (tol if n in ("out", "lse") else 2 * tol) for n, e in errs.items())
    if kind == "keyless":  # the keyless queries: exact zeros and -inf
        keyless = q_ids[0] == 99
        ok = ok and bool(np.isneginf(np.asarray(got[1])[0][:, keyless]).all()
                         and not np.asarray(got[0], np.float32)[0][:, keyless].any())
    row = {"case": name, "ok": ok, "tol": tol, "heads_checked": heads, "tiles_visited": round(float(tiles), 3),
           "fwd_block": plan.fwd_block, "bwd_block": plan.bwd_block, **errs}
    RESULTS.setdefault("segment_checks", []).append(row)
    log.info("segments check %s", row)
    if not ok:
        raise AssertionError(f"over tolerance: {row}")


def segment_time(name, s, d, kind, mode):
    import jax

    import jax_attn
    from jax_attn.bench.timing import median_ms
    q, k, v, do, q_ids, kv_ids = segment_inputs(s, d, kind)
    ids = (jax.numpy.asarray(q_ids), jax.numpy.asarray(kv_ids))
    row = {"case": name, "mode": mode}
    for label, backend, with_ids in SEGMENT_BACKENDS:
        def f(q, k, v, do, q_ids, kv_ids, backend=backend, with_ids=with_ids):
            kw = dict(q_segment_ids=q_ids, kv_segment_ids=kv_ids) if with_ids else {}
            attn = lambda *a: jax_attn.attention_forward(*a, backend=backend, **kw)  # noqa: E731
            return attn(q, k, v) if mode == "fwd" else jax.vjp(attn, q, k, v)[1](do)
        try:
            row[label] = round(median_ms(jax.jit(f), q, k, v, do, *ids, repeats=10, calls=10), 4)
        except Exception as e:  # noqa: BLE001 - one backend failing leaves the others' numbers
            row[label] = f"error: {type(e).__name__}: {e}"[:300]
            log.error("segments time %s %s %s\n%s", name, mode, label, traceback.format_exc())
    RESULTS.setdefault("segment_timings", []).append(row)
    log.info("segments time %s", row)


def segment_table() -> str:
    checks = {c["case"]: c for c in RESULTS.get("segment_checks", [])}
    lines = ["| case | tiles visited | check (max rel err) | mode | " + " | ".join(
        f"{label} ms" for label, _, _ in SEGMENT_BACKENDS) + " | fa4+ids / fa4 |", "|---|---|---|---|---|---|---|---|"]
    for name, *_ in SEGMENT_CASES:
        c = checks.get(name)
        check = ("-" if c is None else ("ok " if c["ok"] else "FAIL ") + "%.1e" % max(
            c[e] for e in ("out", "lse", "dq", "dk", "dv")))
        rows = [t for t in RESULTS.get("segment_timings", []) if t["case"] == name] or [{"mode": "-"}]
        for t in rows:
            cells = [str(t.get(label, "-")) for label, _, _ in SEGMENT_BACKENDS]
            ratio = (f"{t['fa4+ids'] / t['fa4 no ids']:.2f}" if all(
                isinstance(t.get(x), float) for x in ("fa4+ids", "fa4 no ids")) else "-")
            lines.append(f"| {name} | {c['tiles_visited'] if c else '-'} | {check} | {t['mode']} | "
                         + " | ".join(cells) + f" | {ratio} |")
    return "\n".join(lines)


def segments_main(out: pathlib.Path, budget_s: float, check: bool = True):
    """The `--segments` run: every step its own `step`, timings only while within `budget_s`."""
    t0 = time.perf_counter()

    def save():
        (out / "segments.json").write_text(json.dumps(RESULTS, indent=1, default=str))

    for name, s, d, kind in SEGMENT_CASES if check else ():
        step(f"segments check {name}", segment_check, name, s, d, kind)
        save()
    # The long prompts first: where skipping tiles matters, and what a short budget should keep.
    for name, s, d, kind in sorted(SEGMENT_CASES, key=lambda case: -case[1]):
        if kind != "sorted":
            continue
        for mode in ("fwd", "fwd+bwd"):
            if time.perf_counter() - t0 > budget_s:
                log.warning("segments: budget of %.0f s spent, %s %s not timed", budget_s, name, mode)
                continue
            step(f"segments time {name} {mode}", segment_time, name, s, d, kind, mode)
        save()
    save()
    print(segment_table())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for probe.json and probe.md")
    parser.add_argument("--skip-timing", action="store_true")
    parser.add_argument("--grad", default="1", help="0: forward checks only")
    parser.add_argument("--dtypes", default="bfloat16,float16", help="of the checks")
    parser.add_argument("--layout-timing", action="store_true",
                        help="fa4 on (b, n, s, d) and (b, s, n, d) inputs, 10 calls per sample")
    parser.add_argument("--segments", action="store_true",
                        help="only: packed prompts (segment ids) vs float64, then fa4/pallas timings")
    # On an H200 the checks took 85 s and the timings 11-13 s per s=8192 step, 2 s per s=2048
    # step (those are host-bound): 125 s times the long prompts and keeps the run near 2.4 min.
    parser.add_argument("--budget", type=float, default=125.0,
                        help="--segments: start no timing after this many seconds (170: all of them)")
    parser.add_argument("--skip-check", action="store_true", help="--segments: timings only")
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
    if args.segments:
        segments_main(out, args.budget, check=not args.skip_check)
        return
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
