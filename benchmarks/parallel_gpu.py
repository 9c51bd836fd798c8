"""Sequence parallelism on several GPUs: a correctness check, then scaling on a video-sized call.

For every device count 1, 2, 4, ... up to the GPUs present (and that count itself), on a mesh with
one axis "sp" (the hybrid: two axes, ("ring", "sp"), `--hybrid-ulysses` devices per Ulysses group):
1. correctness: each method (forward, lse and dq/dk/dv) against the float64 reference on a
   small call whose length does not divide by the device count (plain, causal + kv_lengths, and
   packed prompts by segment ids);
2. scaling: the 32k-token video shape `(b, n, s, d) = (1, 24, 32760, 128)` bf16 (a 3-D VAE latent
   of 13 x 45 x 56 patches, self-attention), forward and forward+backward: tokens/s in all, per
   GPU, TFLOP/s per GPU, and per-GPU memory from XLA's compiled memory analysis (arguments +
   outputs + temporaries of the per-device program). 1 device is the plain call, no context.

Methods (`--methods`): "ulysses", "ring", "hybrid" (Ulysses over "sp" x ring over "ring"), and
"ring-recompute": the ring with its per-block backward from global statistics switched off, so
that every block's forward is recomputed and pulled back through its own lse (the backward before
2026-11-24), for an A/B of the two backwards on one local backend. Which backward a row ran is in
its local-backend column: "fwd/bwd (recompute)" or "name (stats)".

Prints a table last; writes `parallel_gpu.json` and `parallel_gpu.md` to `$OUT` (or `--out`).
Runs with whatever devices exist (also CPU, for a smoke test:
`XLA_FLAGS=--xla_force_host_platform_device_count=4 python benchmarks/parallel_gpu.py --seq 1024
--heads 8 --dim 64 --backend chunked`). Stops starting new measurements after `--budget` seconds.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import pathlib
import platform
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run from a checkout
import jax_attn  # noqa: E402
from jax_attn import parallel, reference  # noqa: E402
from jax_attn import routing  # noqa: E402
from jax_attn.arrays import random_normal  # noqa: E402
from jax_attn.backends import BACKENDS  # noqa: E402
from jax_attn.contract import validate  # noqa: E402
from jax_attn.parallel import ring, ring_backward  # noqa: E402

T0 = time.perf_counter()


def say(*a):
    print(*a, flush=True)


def device_counts(n: int) -> list[int]:
    counts, c = [], 1
    while c <= n:
        counts.append(c)
        c *= 2
    return counts + ([n] if counts[-1] != n else [])


def hybrid_shape(p, ulysses):
    """(ring, ulysses) sizes of the hybrid mesh on p devices, or None when p does not split so."""
    u = min(ulysses, p)
    return (p // u, u) if p % u == 0 else None


def make_mesh(method, p, ulysses=2):
    devices = np.array(jax.devices()[:p])
    if method == "hybrid":
        return Mesh(devices.reshape(hybrid_shape(p, ulysses)), ("ring", "sp"))
    return Mesh(devices, ("sp",))


def local_backend(method, p, shape, dtype, backend, mode="fwd", ulysses=2):
    """The backend the local shards are routed to (what each device runs).

    The ring's backward runs each block from the global statistics where the backend has such a
    block backward ("name (stats)"), or where the backend routing gives for lse gradients has one
    ("fwd/bwd (stats)"); otherwise it recomputes each block and needs a differentiable lse, and
    where the forward's backend lacks one, the backward runs the first of the choice (or
    automatic preference) that has it: "fwd/bwd (recompute)".
    """
    b, n, s, d = shape
    ring_like = method in ("ring", "ring-recompute", "hybrid")
    if method == "ulysses":
        local = (b, n // p, s, d)
    elif method in ("ring", "ring-recompute"):
        local = (b, n, -(-s // p), d)
    elif method == "hybrid":
        r, u = hybrid_shape(p, ulysses)
        local = (b, n // u, -(-s // r), d)  # the ring's blocks after the all-to-all
    else:
        local = shape
    x = jax.ShapeDtypeStruct(local, dtype)
    try:
        d = jax_attn.explain(x, x, x, backend=backend)
        if not ring_like or mode == "fwd" or d.backend is None:
            return d.backend
        # The timed calls return no lse (no lse cotangent); a sequence the devices do not divide
        # is padded, and its blocks then carry kv_lengths (as ring._stats_backend sees them).
        padded = local[2] * (p if method != "hybrid" else hybrid_shape(p, ulysses)[0]) != s
        spec = validate(x, x, x, kv_lengths=jnp.full((b,), local[2], jnp.int32) if padded else None)
        if method != "ring-recompute":  # the ring's own choice of block backward
            names, _ = routing.current_choice(backend)
            ring_like_call = ring._Ring(spec, None, p, local[2], local[2], names)
            stats = ring._stats_backend(ring_like_call, spec)
            if stats is not None:
                return f"{d.backend} (stats)" if stats == d.backend else f"{d.backend}/{stats} (stats)"
        if BACKENDS[d.backend].supports_lse_grad:
            return f"{d.backend} (recompute)"
        auto = d.source == "automatic" or backend == "auto"
        ok = [nm for nm in d.candidates if not d.reasons[nm] and BACKENDS[nm].supports_lse_grad
              and (BACKENDS[nm].automatic or not auto)]
        return f"{d.backend}/{ok[0] if ok else 'none'} (recompute)"
    except Exception as e:  # noqa: BLE001 - reported, not fatal
        return f"error: {e}"


@contextlib.contextmanager
def _without_stats_backwards():
    """The ring's backward as it was: every block recomputed (read at trace time, so the jit and
    its compile must happen inside)."""
    saved = dict(ring_backward.STATS_BACKWARDS)
    ring_backward.STATS_BACKWARDS.clear()
    try:
        yield
    finally:
        ring_backward.STATS_BACKWARDS.update(saved)


@contextlib.contextmanager
def context(method, mesh):
    if method == "single":
        yield
    elif method == "hybrid":
        with parallel.sequence_parallel(mesh, "sp", ring_axis="ring"):
            yield
    elif method == "ring-recompute":
        with parallel.sequence_parallel(mesh, "sp", "ring"), _without_stats_backwards():
            yield
    else:
        with parallel.sequence_parallel(mesh, "sp", method):
            yield


# --------------------------------------------------------------------------------------------
# 1. correctness

def correctness_cases(rng):
    """Small bf16 calls (length 1027 divides by no device count) with their float64 answers."""
    b, n, s, d = 2, 8, 1027, 64
    cases = []
    # "plain, out only" returns no lse, so a cuDNN ring's backward runs cuDNN's own block
    # backward from the global statistics (it refuses calls that return the lse).
    # Its 1024 tokens divide by every device count: no padded keys (a mask would send the
    # blocks to pallas's block backward).
    for name in ("plain", "plain, out only", "causal+kv_lengths", "packed (segment ids)"):
        s = 1024 if name == "plain, out only" else 1027
        q, k, v, do = (jnp.asarray(rng.standard_normal((b, n, s, d)), jnp.bfloat16) for _ in range(4))
        causal = name == "causal+kv_lengths"
        lengths = np.array([1000, 517], np.int32) if causal else None
        kw = dict(is_causal=True, kv_lengths=jnp.asarray(lengths)) if causal else {}
        ids = {}
        if name.startswith("packed"):  # prompts of uneven lengths that straddle the device blocks
            cuts = np.sort(rng.choice(np.arange(1, s), (b, 4), replace=False), -1)
            seg = np.stack([np.searchsorted(c, np.arange(s), side="right") for c in cuts]).astype(np.int32)
            ids = dict(q_segment_ids=seg, kv_segment_ids=seg)
            kw = {key: jnp.asarray(x) for key, x in ids.items()}
        ref = reference.attention(q, k, v, None, lengths, causal, return_lse=True, **ids)
        ref += tuple(reference.attention_vjp(q, k, v, do, None, lengths, causal, **ids)[:3])
        cases.append((name, (q, k, v, do), kw, ref))
    return cases


def check_correctness(p, methods, backend, cases, ulysses=2):
    rows = []
    tol = reference.TOLERANCE["bfloat16"]
    for case, (q, k, v, do), kw, ref in cases:
        with_lse = not case.endswith("out only")

        def loss(q, k, v, kw=kw, do=do, with_lse=with_lse):
            res = jax_attn.attention_forward(q, k, v, backend=backend, return_lse=with_lse, **kw)
            out, lse = res if with_lse else (res, ref[1])  # out only: the lse check is moot
            return jnp.sum(out.astype(jnp.float32) * do.astype(jnp.float32)), (out, lse)

        for method in (["single"] if p == 1 else methods):
            row = dict(devices=p, method=method, case=case, shape=list(q.shape[:3]) + [k.shape[2], q.shape[3]])
            if method == "hybrid" and hybrid_shape(p, ulysses) is None:
                continue
            try:
                with context(method, make_mesh(method, p, ulysses)):
                    grads, (out, lse) = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
                errs = {name: reference.relative_error(x, r)
                        for name, x, r in zip(("out", "lse", "dq", "dk", "dv"), (out, lse) + tuple(grads), ref)}
                row.update(errors=errs, ok=all(e <= (tol if name in ("out", "lse") else 2 * tol)
                                               for name, e in errs.items()))
            except Exception as e:  # noqa: BLE001 - recorded, and the run goes on
                row.update(ok=False, error=f"{type(e).__name__}: {e}"[:500])
                traceback.print_exc()
            rows.append(row)
            say(f"  check {p} dev {method:8s} {case:18s} " + ("ok " if row["ok"] else "FAIL ")
                + (" ".join(f"{n_}={e:.1e}" for n_, e in row.get("errors", {}).items()) or row.get("error", "")))
    return rows


# --------------------------------------------------------------------------------------------
# 2. scaling

def memory_gib(compiled):
    try:
        m = compiled.memory_analysis()
        total = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
        total -= getattr(m, "alias_size_in_bytes", 0)
        return total / 2 ** 30, m.temp_size_in_bytes / 2 ** 30
    except Exception:  # noqa: BLE001 - not every platform reports it
        return None, None


def measure(p, method, mode, shape, dtype, backend, min_time, deadline, ulysses=2):
    b, n, s, d = shape
    row = dict(devices=p, method=method, mode=mode, shape=[b, n, s, s, d], dtype=str(jnp.dtype(dtype)),
               backend=backend or "auto",
               local_backend=local_backend(method, p, shape, dtype, backend, mode, ulysses))
    if method == "hybrid":
        row["mesh_ring_x_ulysses"] = list(hybrid_shape(p, ulysses))
    if time.perf_counter() > deadline:
        row["error"] = "skipped: time budget spent"
        return row
    mesh = make_mesh(method, p, ulysses)
    seq_axes = ("ring", "sp") if method == "hybrid" else "sp"  # the hybrid's sequence: ring major
    seq = P(None, None, seq_axes, None) if method != "single" and s % p == 0 else P()
    sharding = NamedSharding(mesh, seq)
    keys = jax.random.split(jax.random.key(0), 3)
    q, k, v = (jax.device_put(random_normal(key, shape, dtype), sharding) for key in keys)

    def attn(q, k, v):
        return jax_attn.attention_forward(q, k, v, backend=backend)

    if mode == "fwd":
        fn = attn
    else:
        def fn(q, k, v):
            return jax.grad(lambda q, k, v: jnp.sum(attn(q, k, v).astype(jnp.float32)), argnums=(0, 1, 2))(q, k, v)

    try:
        t = time.perf_counter()
        with context(method, mesh):
            compiled = jax.jit(fn, out_shardings=sharding if mode == "fwd" else (sharding,) * 3) \
                .lower(q, k, v).compile()
        row["compile_s"] = round(time.perf_counter() - t, 1)
        jax.block_until_ready(compiled(q, k, v))
        iters, elapsed, start = 0, 0.0, time.perf_counter()
        while elapsed < min_time and iters < 48:  # batches of 3 calls in flight, then wait
            jax.block_until_ready([compiled(q, k, v) for _ in range(3)])
            iters += 3
            elapsed = time.perf_counter() - start
        sec = elapsed / iters
        flops = 4.0 * b * n * s * s * d * (1.0 if mode == "fwd" else 3.5)  # fwd: 2 matmuls; bwd: 5
        mem, temp = memory_gib(compiled)
        row.update(ms=round(sec * 1e3, 2), tokens_per_s=round(b * s / sec),
                   tokens_per_s_per_gpu=round(b * s / sec / p), tflops_per_gpu=round(flops / sec / p / 1e12, 1),
                   mem_gib_per_gpu=None if mem is None else round(mem, 3),
                   temp_gib_per_gpu=None if temp is None else round(temp, 3), iters=iters)
    except Exception as e:  # noqa: BLE001
        row["error"] = f"{type(e).__name__}: {e}"[:500]
        traceback.print_exc()
    finally:
        del q, k, v
    return row


def table(rows, base):
    head = ("| GPUs | method | mode | local backend | ms | tokens/s | tokens/s/GPU | scaling | TFLOP/s/GPU "
            "| GiB/GPU |")
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for r in rows:
        r = dict(r, method=r["method"] + (" {}x{}".format(*r["mesh_ring_x_ulysses"])
                                          if "mesh_ring_x_ulysses" in r else ""))
        if "ms" not in r:
            lines.append(f"| {r['devices']} | {r['method']} | {r['mode']} | {r['local_backend']} | "
                         f"{r.get('error', '?')[:60]} | | | | | |")
            continue
        b = base.get(r["mode"])
        eff = f"{r['tokens_per_s'] / (b * r['devices']):.2f}" if b else "-"
        mem = "-" if r["mem_gib_per_gpu"] is None else f"{r['mem_gib_per_gpu']:.2f}"
        lines.append(f"| {r['devices']} | {r['method']} | {r['mode']} | {r['local_backend']} | {r['ms']:.1f} "
                     f"| {r['tokens_per_s']:,} | {r['tokens_per_s_per_gpu']:,} | {eff} | {r['tflops_per_gpu']} "
                     f"| {mem} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=24)
    ap.add_argument("--seq", type=int, default=32760)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--backend", default=None, help="local backend choice (default: automatic)")
    ap.add_argument("--methods", default="ulysses,ring,hybrid",
                    help="comma-separated: ulysses, ring, hybrid, ring-recompute")
    ap.add_argument("--hybrid-ulysses", type=int, default=2,
                    help="devices per Ulysses group in the hybrid (the ring runs over the groups); on "
                         "2 GPUs the default makes a ring of one: Ulysses plus the hybrid's overhead")
    ap.add_argument("--max-devices", type=int, default=None)
    ap.add_argument("--min-time", type=float, default=1.0, help="seconds of timed calls per row")
    ap.add_argument("--budget", type=float, default=250.0, help="start no measurement after this many s")
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument("--out", default=os.environ.get("OUT"), help="folder for the JSON/markdown results")
    args = ap.parse_args(argv)
    deadline = T0 + args.budget
    methods = [m for m in args.methods.split(",") if m]
    n_dev = len(jax.devices()) if args.max_devices is None else min(args.max_devices, len(jax.devices()))
    counts = device_counts(n_dev)
    dtype = jnp.dtype(args.dtype)
    shape = (args.batch, args.heads, args.seq, args.dim)
    meta = dict(date=datetime.date.today().isoformat(), jax=jax.__version__, jax_attn=jax_attn.__version__,
                python=platform.python_version(), platform=jax.default_backend(),
                devices=[str(x.device_kind) for x in jax.devices()[:n_dev]], device_counts=counts,
                shape_bnsd=shape, dtype=str(dtype), backend=args.backend or "auto",
                xla_flags=os.environ.get("XLA_FLAGS", ""))
    say(f"parallel_gpu: {n_dev} x {meta['devices'][0]} ({meta['platform']}), jax {jax.__version__}; "
        f"counts {counts}; shape (b, n, s, d) = {shape} {dtype}")

    checks = []
    if not args.skip_check:
        say("correctness (bf16 vs float64 reference, tolerance "
            f"{reference.TOLERANCE['bfloat16']:.0e}, gradients 2x):")
        cases = correctness_cases(np.random.default_rng(0))
        for p in counts:
            if time.perf_counter() > deadline:
                break
            checks.extend(check_correctness(p, methods, args.backend, cases, args.hybrid_ulysses))

    rows = []
    say("scaling:")
    for p in counts:
        for method in (["single"] if p == 1 else methods):
            if method == "ulysses" and args.heads % p:
                continue
            if method == "hybrid" and (hybrid_shape(p, args.hybrid_ulysses) is None
                                       or args.heads % hybrid_shape(p, args.hybrid_ulysses)[1]):
                continue
            for mode in ("fwd", "fwd+bwd"):
                r = measure(p, method, mode, shape, dtype, args.backend, args.min_time, deadline,
                            args.hybrid_ulysses)
                rows.append(r)
                say("  " + json.dumps(r))
    base = {r["mode"]: r["tokens_per_s"] for r in rows if r["devices"] == 1 and "tokens_per_s" in r}
    for r in rows:
        if base.get(r["mode"]) and "tokens_per_s" in r:
            r["scaling_efficiency"] = round(r["tokens_per_s"] / (base[r["mode"]] * r["devices"]), 3)

    ok = all(c["ok"] for c in checks)
    text = table(rows, base)
    summary = (f"correctness: {sum(c['ok'] for c in checks)}/{len(checks)} ok"
               + ("" if ok else " -- FAILURES: " + ", ".join(
                   f"{c['devices']}/{c['method']}/{c['case']}" for c in checks if not c["ok"])))
    if args.out:
        out = pathlib.Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "parallel_gpu.json").write_text(json.dumps(dict(meta=meta, checks=checks, scaling=rows), indent=1))
        (out / "parallel_gpu.md").write_text(
            f"# Sequence parallelism, {meta['date']}\n\n{n_dev} x {meta['devices'][0]}, jax {jax.__version__}, "
            f"shape (b, n, s, d) = {shape} {dtype}, local backend choice {meta['backend']}.\n"
            f"Scaling = tokens/s / (GPUs x tokens/s on 1 GPU); GiB/GPU from XLA's memory analysis; 'hybrid RxU' "
            f"is a ring of R Ulysses groups of U GPUs.\n\n"
            f"{summary}\n\n{text}\n")
    say(f"\n{summary}  ({time.perf_counter() - T0:.0f} s)")
    say(text)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
