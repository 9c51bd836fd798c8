"""`jax-attn bench`: time every backend on named shape sets and feed the measurements to routing.

For each shape and each implementation (every available JAX backend, `auto` as its own row, and
torch SDPA's kernels when torch is installed), forward and forward+backward:

1. Reasons first: a backend that cannot serve the shape shows `explain`'s reasons, not a number.
2. Compile once (ahead of time) and read the program's `memory_analysis()`: its temp bytes are the
   memory a backend needs beyond inputs and outputs (quadratic in sequence length for `xla` and
   `naive`, linear for `chunked`, `pallas`, `cudnn`). A program that would not fit the device is
   reported, not run.
3. Correctness before timing: sampled query rows of two (batch, head) slices against the float64
   NumPy reference (`jax_attn.reference`). For the backward, the output cotangent is zero except
   on those rows, so the reference on the sub-problem gives the exact dq of those rows and the
   full dk, dv of those slices, at any sequence length.
4. Timing as the field does it: warm-up, a device sync around each sample, the median of at least
   `--min-runs` samples; inputs rotated among several sets when one set is smaller than twice the
   L2 cache; calls shorter than `--short-us` are repeated inside one compiled program (a
   `fori_loop`, JAX) or one CUDA graph (torch), so launch overhead stays out of the number.

5. `auto` against the fastest JAX backend: each compiled program is fingerprinted (its optimized
   HLO without source metadata). When `auto` compiles to the very program of the fastest backend,
   their difference is timing noise (a few percent on calls of tens of microseconds), and the
   summary counts it as equal, showing the measured ratio beside it.

Results: a table (ms, TFLOP/s, ratio to the fastest row of the same shape), `--json`, `--csv`,
`--plot` (PNG bars of TFLOP/s), and `--write-routing` / `--update-routing`, which turn a run into
`jax_attn/routing_table.json` (see `routing_from_results`).

CLI entry points: `add_parser(subparsers)` (sets `run` as the sub-command's handler) and
`main(argv)` for running this module alone.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import datetime
import hashlib
import json
import logging
import math
import os
import pathlib
import platform as py_platform
import re
import statistics
import subprocess
import sys
import time
import warnings

import numpy as np

log = logging.getLogger(__name__)

TORCH_KERNELS = {"torch-flash": "FLASH_ATTENTION", "torch-efficient": "EFFICIENT_ATTENTION",
                 "torch-cudnn": "CUDNN_ATTENTION", "torch-math": "MATH"}
QUADRATIC = ("xla", "naive")  # backends that materialize the (b, n, sq, skv) scores
MODES = ("fwd", "fwd+bwd")
MiB, GiB = 2.0 ** 20, 2.0 ** 30
CHECK_ROWS = 64  # query rows per sampled (batch, head) slice in the correctness gate


@dataclasses.dataclass(frozen=True)
class Shape:
    """One benchmark shape, `(b, n, sq, skv, d)` with `n_kv = n` and `dv = d`, in `(b, n, s, d)`."""

    b: int
    n: int
    sq: int
    skv: int
    d: int
    dtype: str = "bfloat16"

    @property
    def name(self) -> str:
        return f"{self.b}x{self.n}x{self.sq}x{self.skv}x{self.d}"

    def spec(self):
        from .contract import Spec
        return Spec(self.b, self.n, self.n, self.sq, self.skv, self.d, self.d, self.dtype,
                    scale=1.0 / math.sqrt(self.d))

    def flops(self, mode: str) -> float:
        """Matmul FLOPs: 4*b*n*sq*skv*d forward; forward+backward 3.5x that (backward is 2.5x)."""
        spec = self.spec()
        return spec.flops(False) + (spec.flops(True) if mode == "fwd+bwd" else 0.0)

    def set_bytes(self, mode: str) -> int:
        """Bytes one call reads and writes at least (q, k, v, out; plus dout and dq, dk, dv)."""
        item = 4 if self.dtype == "float32" else 8 if self.dtype == "float64" else 2
        qo = 2 * self.b * self.n * self.sq * self.d
        kv = 2 * self.b * self.n * self.skv * self.d
        return item * ((qo + kv) * (2 if mode == "fwd+bwd" else 1) + (qo // 2 if mode == "fwd+bwd" else 0))

    def score_bytes(self) -> int:
        return self.b * self.n * self.sq * self.skv * 4


SHAPE_SETS = {
    # Stable Diffusion 1.x/2.x (d=40, 64) self- and cross-attention at 64x64 latents, SD3/Flux-like
    # joint attention (d=128), and a video/high-resolution 16k-token sequence.
    "diffusion": [Shape(2, 8, 4096, 4096, 40), Shape(2, 8, 4096, 77, 40), Shape(2, 10, 4096, 4096, 64),
                  Shape(2, 10, 4096, 77, 64), Shape(1, 24, 4608, 4608, 128), Shape(1, 40, 16384, 16384, 128)],
    # Seconds on a CPU: for CI and smoke tests.
    "tiny": [Shape(1, 2, 128, 128, 32, "float32"), Shape(1, 2, 128, 77, 40, "float32"),
             Shape(2, 2, 256, 256, 64, "float32")],
    # Memory against sequence length (use with --memory-only): linear vs quadratic backends.
    "seqsweep": [Shape(1, 8, s, s, 64) for s in (1024, 2048, 4096, 8192, 16384)],
}


# ------------------------------------------------------------------------------------------------
# Environment

def environment() -> dict:
    """Device, driver and library versions, for the results file."""
    import jax

    from . import autoselect
    dev = jax.devices()[0]
    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "host": py_platform.node(), "python": py_platform.python_version(),
           "platform": dev.platform, "device": getattr(dev, "device_kind", str(dev)),
           "device_count": jax.device_count(), "device_key": autoselect.device_key(),
           "jax": jax.__version__}
    try:
        import jaxlib
        env["jaxlib"] = jaxlib.__version__
    except ImportError:
        pass
    try:
        from jax._src.lib import cuda_versions
        if cuda_versions and dev.platform == "gpu":
            env["jax_cudnn"] = str(cuda_versions.cudnn_get_version())
            env["jax_cuda_runtime"] = str(cuda_versions.cuda_runtime_get_version())
    except Exception:  # private module; versions are informative only
        pass
    try:
        import torch
        env["torch"] = torch.__version__
        if torch.cuda.is_available():
            env["torch_cuda"] = torch.version.cuda
            env["torch_cudnn"] = str(torch.backends.cudnn.version())
            env["torch_device"] = torch.cuda.get_device_name(0)
    except ImportError:
        env["torch"] = "not installed"
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
        if smi.returncode == 0 and smi.stdout.strip():
            name, driver, mem, clk = (x.strip() for x in smi.stdout.strip().splitlines()[0].split(","))
            env.update(gpu=name, driver=driver, gpu_memory=mem, max_sm_clock=clk)
    except (OSError, subprocess.SubprocessError, ValueError):
        pass
    return env


def _device_memory_limit() -> int | None:
    import jax
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:
        return None
    return stats.get("bytes_limit") if stats else None


def _l2_bytes() -> int:
    """L2 size of the GPU (torch knows it), 50 MB (H100) if unknown; 4 MiB on a CPU."""
    import jax
    if jax.default_backend() != "gpu":
        return 4 << 20
    try:
        import torch
        if torch.cuda.is_available():
            return int(torch.cuda.get_device_properties(0).L2_cache_size)
    except Exception:
        pass
    return 50 << 20


def _short_message(e: BaseException) -> str:
    lines = [x for x in str(e).splitlines() if x.strip()]
    return f"{type(e).__name__}: {lines[0][:200] if lines else ''}"


# ------------------------------------------------------------------------------------------------
# Timing

@dataclasses.dataclass
class Timing:
    ms: float
    runs: int
    per_sample: int  # calls per sample
    method: str
    spread: float  # (p90 - p10) / median of the samples


def _time_samples(sample, est_s: float, min_runs: int, measure_s: float, sample_s: float,
                  deadline: float, method: str) -> Timing:
    """Median of per-call times; `sample(k)` runs about k calls and returns (seconds, calls)."""
    k = max(1, int(round(sample_s / max(est_s, 1e-9))))
    times = []
    t_end = time.perf_counter() + measure_s
    while len(times) < min_runs or (time.perf_counter() < t_end and len(times) < 1000):
        secs, calls = sample(k)
        times.append(secs / calls)
        if len(times) >= min_runs and time.perf_counter() > deadline:
            break
    times.sort()
    med = statistics.median(times)
    p10, p90 = times[len(times) // 10], times[-1 - len(times) // 10]
    return Timing(med * 1e3, len(times), calls, method, (p90 - p10) / med if med else 0.0)


# ------------------------------------------------------------------------------------------------
# Correctness gate (float64 reference on sampled rows)

def _check_slices(shape: Shape):
    rows = np.unique(np.linspace(0, shape.sq - 1, min(CHECK_ROWS, shape.sq)).astype(int))
    pairs = sorted({(0, 0), (shape.b - 1, shape.n - 1)})
    return rows, pairs


def _reference_errors(shape: Shape, mode: str, host_inputs, host_results) -> float:
    """Largest relative error over the sampled slices; `host_*` are dicts keyed by (b, h)."""
    from . import reference
    rows, pairs = _check_slices(shape)
    worst = 0.0
    for bh in pairs:
        q, k, v, do = host_inputs[bh]
        q_rows = q[rows][None, None]
        k_, v_ = k[None, None], v[None, None]
        if mode == "fwd":
            ref = reference.attention(q_rows, k_, v_)[0, 0]
            worst = max(worst, reference.relative_error(host_results[bh][0], ref))
        else:
            dq, dk, dv = (g[0, 0] for g in reference.attention_vjp(q_rows, k_, v_, do[rows][None, None])[:3])
            got_dq, got_dk, got_dv = host_results[bh]
            worst = max(worst, reference.relative_error(got_dq, dq), reference.relative_error(got_dk, dk),
                        reference.relative_error(got_dv, dv))
    return worst


def _tolerance(shape: Shape, mode: str) -> float:
    from . import reference
    return reference.TOLERANCE[shape.dtype] * (2 if mode == "fwd+bwd" else 1)


# ------------------------------------------------------------------------------------------------
# JAX implementations

class JaxInputs:
    """`n_sets` random input sets for one shape on the default device (never zeros)."""

    def __init__(self, shape: Shape, n_sets: int, seed: int):
        import jax
        import jax.numpy as jnp
        self.shape = shape
        dt = jnp.dtype(shape.dtype)
        qs, ks = (shape.b, shape.n, shape.sq, shape.d), (shape.b, shape.n, shape.skv, shape.d)
        self.sets = []
        key = jax.random.key(seed)
        for _ in range(n_sets):
            key, *sub = jax.random.split(key, 5)
            self.sets.append(tuple(jax.random.normal(kk, s, dt) for kk, s in zip(sub, (qs, ks, ks, qs))))
        jax.block_until_ready(self.sets)
        rows, pairs = _check_slices(shape)
        q, k, v, do = self.sets[0]
        f32 = lambda x: np.asarray(x.astype(jnp.float32), np.float64)
        self.host = {bh: (f32(q[bh]), f32(k[bh]), f32(v[bh]), f32(do[bh])) for bh in pairs}
        mask = np.zeros((shape.b, shape.n, shape.sq, 1), bool)
        for bh in pairs:
            mask[bh][rows] = True
        # The check's cotangent: do on the sampled rows, zero elsewhere (see the module docstring).
        self.do_check = jnp.where(jnp.asarray(mask), do, jnp.zeros((), dt))

    def args(self, i: int, mode: str):
        q, k, v, do = self.sets[i % len(self.sets)]
        return (q, k, v) if mode == "fwd" else (q, k, v, do)


def _jax_fn(name: str, mode: str):
    import jax

    from .api import attention_forward

    def fwd(q, k, v):
        return attention_forward(q, k, v, backend=name)

    if mode == "fwd":
        return fwd

    def fwd_bwd(q, k, v, do):
        _, vjp = jax.vjp(fwd, q, k, v)
        return vjp(do)

    return fwd_bwd


# The timing loop's body is loop-invariant by design; XLA would hoist it out of the loop (seen on
# the CPU, where the optimization barrier below alone did not stop it), so those passes are off
# for that one program. `measure_jax` also checks that 2x the iterations take about 2x the time.
NO_HOISTING = {"xla_disable_hlo_passes":
               "while-loop-invariant-code-motion,while-loop-expensive-invariant-code-motion"}


def _jax_looped(fn, n_sets: int):
    """One program that runs `fn` on each of `n_sets` input sets, `iters` times over.

    Compile it with `NO_HOISTING`. An optimization barrier also ties each call's inputs to the
    previous call's output, so the calls run one after another, as separate calls would.
    """
    import jax

    def looped(sets, iters):
        def body(_, outs):
            # Every call's output is carried out of the loop: a call whose output were overwritten
            # unused would be dead code, and XLA removed it (seen on an H100: 1 call in 8 timed).
            prev, new = outs[-1], []
            for s in sets:
                s, prev = jax.lax.optimization_barrier((s, prev))
                prev = fn(*s)
                new.append(prev)
            return tuple(new)

        out = jax.eval_shape(fn, *sets[0])
        init = tuple(jax.tree.map(lambda s: jax.numpy.zeros(s.shape, s.dtype), out) for _ in sets)
        return jax.lax.fori_loop(0, iters, body, init)

    return jax.jit(looped)


def jax_reasons(name: str, shape: Shape) -> tuple[list[str], dict | None]:
    """Why `name` cannot serve `shape` (empty when it can), and for `auto`, what it picks per mode
    (`{"fwd": ..., "fwd+bwd": ...}`: a forward alone is a call nothing differentiates)."""
    import jax

    from .api import explain
    from .backends import BACKENDS
    from .routing import BackendError
    qs = jax.ShapeDtypeStruct((shape.b, shape.n, shape.sq, shape.d), shape.dtype)
    ks = jax.ShapeDtypeStruct((shape.b, shape.n, shape.skv, shape.d), shape.dtype)
    try:
        d = explain(qs, ks, ks, backend=name)
    except BackendError as e:
        return [str(e)], None
    if name == "auto":
        return ([] if d.backend else ["no backend can serve it"]), {
            "fwd": d.forward_only or d.backend, "fwd+bwd": d.backend}
    return list(d.reasons[name]) or ([] if BACKENDS[name] else ["unknown"]), None


def _pallas_kernel(shape: Shape) -> str | None:
    """Which kernel the `pallas` backend runs for `shape` here ("triton" or "mosaic")."""
    try:
        from .backends.pallas import _use_mosaic
        return "mosaic" if _use_mosaic(shape.spec()) else "triton"
    except Exception as e:  # noqa: BLE001 - a label, not worth failing a row for
        log.debug("bench: pallas kernel choice unknown: %s", e)
        return None


def measure_jax(name: str, shape: Shape, mode: str, inputs: JaxInputs, opts, method: str | None = None) -> dict:
    """Compile, check and time one JAX row. `method` ("loop" or "python") forces the timing
    method; `auto` gets the one its chosen backend got, so the two are timed alike."""
    import jax
    import jax.numpy as jnp
    row = {"kernel": _pallas_kernel(shape)} if name == "pallas" else {}
    fn = _jax_fn(name, mode)
    args0 = inputs.args(0, mode)
    t0 = time.perf_counter()
    try:
        compiled = jax.jit(fn).lower(*args0).compile()
    except Exception as e:  # noqa: BLE001 - a failure to compile is a result, with its message
        return {"status": "error", "note": "compile: " + _short_message(e)}
    row["compile_s"] = round(time.perf_counter() - t0, 2)
    row["program"] = program_fingerprint(compiled)
    try:
        mem = compiled.memory_analysis()
        row["temp_bytes"] = int(mem.temp_size_in_bytes)
        need = int(getattr(mem, "peak_memory_in_bytes", 0) or 0) or int(
            mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes)
        row["peak_bytes"] = need
    except Exception:  # noqa: BLE001 - not every platform reports it
        need = None
    limit = _device_memory_limit()
    if need and limit and need > 0.92 * limit:
        return {**row, "status": "skip",
                "note": f"needs {need / GiB:.1f} GiB of device memory; {limit / GiB:.1f} GiB available"}
    if opts.memory_only:
        return {**row, "status": "memory"}

    # Correctness gate.
    try:
        check_args = args0 if mode == "fwd" else args0[:3] + (inputs.do_check,)
        res = compiled(*check_args)
        finite = bool(jax.tree.reduce(lambda a, b: a & b, jax.tree.map(lambda x: jnp.isfinite(x).all(), res)))
        rows, pairs = _check_slices(shape)
        to_host = lambda x: np.asarray(x.astype(jnp.float32), np.float64)
        if mode == "fwd":
            got = {bh: (to_host(res[bh][rows]),) for bh in pairs}
        else:
            got = {bh: (to_host(res[0][bh][rows]), to_host(res[1][bh]), to_host(res[2][bh])) for bh in pairs}
        del res
    except Exception as e:  # noqa: BLE001
        return {**row, "status": "error", "note": "run: " + _short_message(e)}
    err = _reference_errors(shape, mode, inputs.host, got) if finite else float("inf")
    row.update(err=err, tol=_tolerance(shape, mode))
    if not err <= row["tol"]:
        return {**row, "status": "FAIL", "note": f"relative error {err:.2e} over tolerance {row['tol']:.0e}"
                + ("" if finite else " (non-finite output)")}

    # Timing.
    n_sets = len(inputs.sets)

    def plain(k):  # the previous sample ended with a sync, so the device is idle here
        t = time.perf_counter()
        out = None
        for i in range(k):
            out = compiled(*inputs.args(i, mode))
        jax.block_until_ready(out)
        return time.perf_counter() - t, k

    plain(2)  # warm-up
    # The best of three short runs: one slow run (a cold clock, the host busy) must not pick the
    # Python loop for a call that is really short (seen on an H100: 56 us timed, 15 us in-program).
    est = min(plain(5)[0] for _ in range(3)) / 5
    if method is None:
        short = opts.inner_loop == "always" or (opts.inner_loop == "auto" and est * 1e6 < opts.short_us)
        method = "loop" if short else "python"
    if method == "python":
        t = _time_samples(plain, est, opts.min_runs, opts.measure_s, opts.sample_s, opts.deadline,
                          f"python loop, {n_sets} input set(s)")
        return {**row, "status": "ok", "method": method, **_timing_fields(t)}
    sets = tuple(inputs.args(i, mode) for i in range(n_sets))
    try:
        looped = _jax_looped(fn, n_sets).lower(sets, 1).compile(compiler_options=NO_HOISTING)
    except Exception as e:  # noqa: BLE001
        return {**row, "status": "error", "note": "compile (timing loop): " + _short_message(e)}

    def in_program(k):
        iters = max(1, -(-k // n_sets))
        t = time.perf_counter()
        jax.block_until_ready(looped(sets, iters))
        return time.perf_counter() - t, iters * n_sets

    jax.block_until_ready(looped(sets, 2))  # warm-up
    # Guard: twice the iterations must take clearly longer, or the compiler has hoisted the call.
    k1 = n_sets * max(1, math.ceil(opts.sample_s / 2 / max(est, 1e-9) / n_sets))
    one = min(in_program(k1), in_program(k1))
    two = min(in_program(2 * k1), in_program(2 * k1))
    if two[0] < 1.3 * one[0]:
        log.warning("bench: %s %s %s: the in-program loop did not scale (%.3g s for %d calls, %.3g s for "
                    "%d); timing with a Python loop", shape.name, name, mode, one[0], one[1], two[0], two[1])
        t = _time_samples(plain, est, opts.min_runs, opts.measure_s, opts.sample_s, opts.deadline,
                          f"python loop (in-program loop optimized away), {n_sets} input set(s)")
        return {**row, "status": "ok", "method": "python", **_timing_fields(t)}
    t = _time_samples(in_program, two[0] / two[1], opts.min_runs, opts.measure_s, opts.sample_s,
                      opts.deadline, f"in-program loop, {n_sets} input set(s)")
    return {**row, "status": "ok", "method": method, **_timing_fields(t)}


def program_fingerprint(compiled) -> str | None:
    """A hash of the optimized HLO, source metadata and module name left out: two calls that
    compile to the same program (say `auto` and the backend it routed to) get the same one."""
    try:
        text = compiled.as_text()
    except Exception:  # noqa: BLE001 - a platform without HLO text: no fingerprint
        return None
    text = re.split(r"^(?:FileNames|FunctionNames|FileLocations|StackFrames)\s*$", text,
                    maxsplit=1, flags=re.M)[0]  # the source-location tables at the end
    text = re.sub(r",?\s*metadata=\{[^{}]*\}", "", text)
    text = re.sub(r"^HloModule [^ ,]+", "HloModule", text, flags=re.M)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _timing_fields(t: Timing) -> dict:
    return {"ms": t.ms, "runs": t.runs, "calls_per_sample": t.per_sample, "timing": t.method,
            "spread": round(t.spread, 4)}


# ------------------------------------------------------------------------------------------------
# torch SDPA implementations

def torch_kernels(wanted=None) -> list[str]:
    """The torch SDPA rows to run: all four when torch is installed (each reports if it cannot)."""
    try:
        import torch  # noqa: F401
        from torch.nn.attention import SDPBackend  # noqa: F401
    except ImportError:
        return []
    return [k for k in TORCH_KERNELS if wanted is None or k in wanted]


class TorchInputs:
    def __init__(self, shape: Shape, n_sets: int, seed: int):
        import torch
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        dt = getattr(torch, shape.dtype)
        gen = torch.Generator(device=self.device).manual_seed(seed)
        qs, ks = (shape.b, shape.n, shape.sq, shape.d), (shape.b, shape.n, shape.skv, shape.d)
        self.sets = [tuple(torch.randn(s, generator=gen, device=self.device, dtype=dt)
                           for s in (qs, ks, ks, qs)) for _ in range(n_sets)]
        for s in self.sets:
            for x in s[:3]:
                x.requires_grad_(True)
        rows, pairs = _check_slices(shape)
        q, k, v, do = self.sets[0]
        f64 = lambda x: x.detach().double().cpu().numpy()
        self.host = {bh: (f64(q[bh]), f64(k[bh]), f64(v[bh]), f64(do[bh])) for bh in pairs}
        mask = torch.zeros((shape.b, shape.n, shape.sq, 1), dtype=torch.bool, device=self.device)
        for bh in pairs:
            mask[bh[0], bh[1], torch.as_tensor(rows, device=self.device)] = True
        self.do_check = torch.where(mask, do, torch.zeros((), dtype=dt, device=self.device))

    def sync(self):
        import torch
        if self.device == "cuda":
            torch.cuda.synchronize()


def _torch_call(kernel: str, mode: str):
    import torch
    from torch.nn.attention import SDPBackend
    sdpa = torch.nn.functional.scaled_dot_product_attention
    backend = getattr(SDPBackend, TORCH_KERNELS[kernel])

    def call(q, k, v, do=None):
        with torch.nn.attention.sdpa_kernel(backend):
            out = sdpa(q, k, v)
        if mode == "fwd":
            return out
        return torch.autograd.grad(out, (q, k, v), do)

    return call


def measure_torch(kernel: str, shape: Shape, mode: str, inputs: TorchInputs, opts) -> dict:
    import torch
    call = _torch_call(kernel, mode)
    cuda = inputs.device == "cuda"
    if kernel == "torch-math" and cuda:
        free = torch.cuda.mem_get_info()[0]
        need = shape.score_bytes() * (2 if mode == "fwd" else 4)
        if need > 0.9 * free:
            return {"status": "skip", "note": f"math materializes the scores: about {need / GiB:.0f} GiB, "
                                              f"{free / GiB:.0f} GiB free"}
    q, k, v, do = inputs.sets[0]
    row = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            with torch.no_grad() if mode == "fwd" else contextlib.nullcontext():
                res = call(q, k, v, inputs.do_check)
            inputs.sync()
            if cuda:
                out_bytes = sum(x.numel() * x.element_size() for x in (res if mode != "fwd" else [res]))
                row["temp_bytes"] = int(max(torch.cuda.max_memory_allocated() - base - out_bytes, 0))
        except Exception as e:  # noqa: BLE001 - a kernel that cannot run reports why
            why = "; ".join(dict.fromkeys(str(w.message).splitlines()[0][:160] for w in caught))
            if cuda and isinstance(e, torch.cuda.OutOfMemoryError):
                torch.cuda.empty_cache()
            return {"status": "skip", "note": (why + "; " if why else "") + _short_message(e)}
    rows, pairs = _check_slices(shape)
    to_host = lambda x: x.detach().double().cpu().numpy()
    if mode == "fwd":
        got = {bh: (to_host(res[bh][rows]),) for bh in pairs}
        finite = bool(torch.isfinite(res).all())
    else:
        got = {bh: (to_host(res[0][bh][rows]), to_host(res[1][bh]), to_host(res[2][bh])) for bh in pairs}
        finite = all(bool(torch.isfinite(g).all()) for g in res)
    del res
    err = _reference_errors(shape, mode, inputs.host, got) if finite else float("inf")
    row.update(err=err, tol=_tolerance(shape, mode))
    if not err <= row["tol"]:
        return {**row, "status": "FAIL", "note": f"relative error {err:.2e} over tolerance {row['tol']:.0e}"}

    n_sets = len(inputs.sets)

    def body(i):
        s = inputs.sets[i % n_sets]
        with torch.no_grad() if mode == "fwd" else contextlib.nullcontext():
            return call(*s[:3], s[3])

    def eager(k):
        inputs.sync()
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for i in range(k):
                body(i)
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3, k
        t = time.perf_counter()
        for i in range(k):
            body(i)
        return time.perf_counter() - t, k

    eager(2)
    est = eager(5)
    est_s = est[0] / est[1]
    method = f"eager, {n_sets} input set(s)"
    sample = eager
    if cuda and est_s * 1e6 < opts.short_us and opts.inner_loop != "never":
        try:
            sample, method = _torch_graph(body, n_sets, est_s, opts), f"CUDA graph, {n_sets} input set(s)"
        except Exception as e:  # noqa: BLE001 - fall back to eager timing, and say so
            log.info("bench: CUDA graph capture failed for %s (%s); timing eagerly", kernel, e)
            method += " (graph capture failed: launch overhead included)"
    t = _time_samples(sample, est_s, opts.min_runs, opts.measure_s, opts.sample_s, opts.deadline, method)
    return {**row, "status": "ok", **_timing_fields(t)}


def _torch_graph(body, n_sets: int, est_s: float, opts):
    """A CUDA graph of enough calls to fill one sample; returns a `sample(k)` that replays it."""
    import torch
    calls = max(n_sets, int(round(opts.sample_s / max(est_s, 1e-9) / n_sets)) * n_sets)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i in range(3):
            body(i)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            body(i)
    graph.replay()
    torch.cuda.synchronize()

    def sample(_k):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3, calls

    return sample


# ------------------------------------------------------------------------------------------------
# The run

def parse_shape(text: str, dtype: str) -> Shape:
    try:
        b, n, sq, skv, d = (int(x) for x in text.replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shape wants b,n,sq,skv,d (five integers), got {text!r}") from None
    if min(b, n, sq, skv, d) < 1:
        raise argparse.ArgumentTypeError(f"--shape: every size must be positive, got {text!r}")
    return Shape(b, n, sq, skv, d, dtype)


def select_shapes(args) -> list[Shape]:
    import jax
    default_dtype = args.dtype or ("bfloat16" if jax.default_backend() == "gpu" else "float32")
    shapes = []
    for name in (args.shapes.split(",") if args.shapes else []):
        name = name.strip()
        if name not in SHAPE_SETS:
            raise SystemExit(f"--shapes: unknown set {name!r}; known: {', '.join(SHAPE_SETS)}")
        shapes += [dataclasses.replace(s, dtype=args.dtype) if args.dtype else s for s in SHAPE_SETS[name]]
    shapes += [parse_shape(s, default_dtype) for s in args.shape or ()]
    if not shapes:
        shapes = list(SHAPE_SETS["diffusion" if jax.default_backend() == "gpu" else "tiny"])
    return list(dict.fromkeys(shapes))


def select_impls(args) -> list[str]:
    """JAX backends (available ones; interpreted Pallas only when named), `auto`, torch kernels."""
    from .backends import BACKENDS
    from .backends.pallas import interpreting
    wanted = None
    if args.backends:
        wanted = []
        for x in args.backends.split(","):
            x = x.strip()
            wanted += list(TORCH_KERNELS) if x == "torch" else [x]
        unknown = [x for x in wanted if x not in BACKENDS and x not in TORCH_KERNELS and x != "auto"]
        if unknown:
            raise SystemExit(f"--backends: unknown {', '.join(unknown)}; known: {', '.join(BACKENDS)}, auto, "
                             f"torch ({', '.join(TORCH_KERNELS)})")
    impls = []
    for name, b in BACKENDS.items():
        if wanted is not None and name not in wanted:
            continue
        if wanted is None and (b.unavailable() or (name == "pallas" and interpreting())):
            continue  # unavailable ones are listed under "not benchmarked"; interpret mode is for tests
        impls.append(name)
    if wanted is None or "auto" in wanted:
        impls.append("auto")
    if not args.no_torch and not args.memory_only:
        impls += torch_kernels(None if wanted is None else set(wanted))
    return impls


def _n_sets(shape: Shape, mode: str, l2: int, cap: int) -> int:
    return max(1, min(cap, math.ceil(2 * l2 / shape.set_bytes(mode))))


def run_bench(args, impls=None, methods=None, budget=None) -> dict:
    """Run the benchmark described by parsed `args`; returns the results document.

    `impls` overrides the implementations, `methods` carries timing methods from an earlier run
    (for `auto` to be timed like its pick), `budget` overrides `--budget`.
    """
    import jax
    from tqdm import tqdm

    from .backends import BACKENDS

    jax.devices()  # JAX first: it must load its CUDA libraries before torch is imported
    shapes, impls = select_shapes(args), impls or select_impls(args)
    methods = {} if methods is None else methods  # (shape, mode, backend) -> timing method, for `auto`
    budget = args.budget if budget is None else budget
    modes = ["fwd"] + ([] if args.no_backward else ["fwd+bwd"])
    on_gpu = jax.default_backend() == "gpu"
    opts = argparse.Namespace(
        memory_only=args.memory_only, inner_loop=args.inner_loop, short_us=args.short_us,
        min_runs=args.min_runs, measure_s=args.measure_s, sample_s=args.sample_ms / 1e3,
        deadline=time.perf_counter() + budget if budget else float("inf"))
    l2 = args.l2_mb * 2 ** 20 if args.l2_mb else _l2_bytes()
    env = environment()
    not_run = {n: "; ".join(b.unavailable()) for n, b in BACKENDS.items()
               if n not in impls and b.unavailable()}
    results = []
    bar = tqdm(total=len(shapes) * len(impls) * len(modes), desc="bench", unit="run", disable=args.quiet,
               file=sys.stderr, dynamic_ncols=True)
    for shape in shapes:
        jax_in = torch_in = None
        for name in impls:
            framework = "torch" if name in TORCH_KERNELS else "jax"
            picked = None
            if framework == "jax":
                why, picked = jax_reasons(name, shape)
            else:
                why = []
            if name in QUADRATIC and not why and on_gpu:
                limit = _device_memory_limit()
                if limit and shape.score_bytes() > 0.5 * limit:  # compiling it would autotune huge GEMMs
                    why = [f"its float32 score matrix alone is {shape.score_bytes() / GiB:.1f} GiB "
                           f"(device: {limit / GiB:.0f} GiB)"]
            for mode in modes:
                bar.set_postfix_str(f"{shape.name} {name} {mode}", refresh=True)
                row = {"shape": shape.name, "b": shape.b, "n": shape.n, "sq": shape.sq, "skv": shape.skv,
                       "d": shape.d, "dtype": shape.dtype, "impl": name, "framework": framework,
                       "mode": mode, "flops": shape.flops(mode)}
                if picked:
                    row["auto_choice"] = picked.get(mode, picked["fwd+bwd"])
                if why:
                    row.update(status="skip", note="; ".join(why))
                elif time.perf_counter() > opts.deadline:
                    row.update(status="skip", note=f"not run: the time budget of {budget:.0f} s was used up")
                else:
                    try:
                        if framework == "jax":
                            if jax_in is None:  # sized for the forward: the most sets
                                jax_in = JaxInputs(shape, _n_sets(shape, "fwd", l2, args.max_sets), args.seed)
                            method = (methods.get((shape, mode, row.get("auto_choice")))
                                      if opts.inner_loop == "auto" else None)
                            row.update(measure_jax(name, shape, mode, jax_in, opts, method))
                            if row.get("method"):
                                methods[(shape, mode, name)] = row["method"]
                        else:
                            if torch_in is None:
                                torch_in = TorchInputs(shape, _n_sets(shape, "fwd", l2, args.max_sets), args.seed)
                            row.update(measure_torch(name, shape, mode, torch_in, opts))
                    except Exception as e:  # noqa: BLE001 - one broken row must not end the run
                        log.exception("bench: %s %s %s failed", shape.name, name, mode)
                        row.update(status="error", note=_short_message(e))
                if row.get("ms"):
                    row["tflops"] = row["flops"] / (row["ms"] * 1e-3) / 1e12
                results.append(row)
                bar.update()
        del jax_in, torch_in
        _release_torch_memory()
    bar.close()
    _add_ratios(results)
    return {"meta": {**env, "command": " ".join(sys.argv), "shapes": [s.name for s in shapes],
                     "impls": impls, "modes": modes, "l2_bytes": l2, "not_benchmarked": not_run,
                     "method": {"min_runs": args.min_runs, "measure_s": args.measure_s,
                                "sample_ms": args.sample_ms, "short_us": args.short_us}},
            "results": results, "_methods": methods}


def _release_torch_memory():
    try:
        import torch
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


def _add_ratios(results: list[dict]) -> None:
    """`ratio`: time over the fastest row of the same shape and mode (`auto` itself excluded);
    `ratio_jax`: over the fastest JAX backend (the target `auto` is held to)."""
    groups: dict = {}
    for r in results:
        groups.setdefault((r["shape"], r["dtype"], r["mode"]), []).append(r)
    for rows in groups.values():
        timed = [r for r in rows if r.get("status") == "ok" and not r["impl"].startswith("auto")]
        best = min((r["ms"] for r in timed), default=None)
        best_jax = min((r["ms"] for r in timed if r["framework"] == "jax"), default=None)
        for r in rows:
            if r.get("status") == "ok" and best:
                r["ratio"] = r["ms"] / best
                if best_jax:
                    r["ratio_jax"] = r["ms"] / best_jax


# ------------------------------------------------------------------------------------------------
# Output

def _fmt(x, spec):
    return "" if x is None else format(x, spec)


def format_table(doc: dict) -> str:
    """The full table: one line per shape and implementation, forward and forward+backward."""
    by = {}
    for r in doc["results"]:
        by.setdefault((r["shape"], r["dtype"], r["impl"]), {})[r["mode"]] = r
    lines = []
    header = ("shape (b x n x sq x skv x d)", "dtype", "impl", "fwd ms", "TF/s", "x best", "f+b ms", "TF/s",
              "x best", "temp MiB fwd/f+b", "note")
    table = []
    for (shape, dtype, impl), modes in by.items():
        f, b = modes.get("fwd", {}), modes.get("fwd+bwd", {})
        temp = "/".join(_fmt(m.get("temp_bytes") and m["temp_bytes"] / MiB, ".0f") if "temp_bytes" in m else "-"
                        for m in (f, b) if m)
        notes = []
        for m in (f, b):
            if m and m.get("status") not in ("ok", "memory"):
                notes.append(f"{m['mode']}: {m['status']}: {m.get('note', '')}")
        if f.get("auto_choice"):
            notes.insert(0, f"-> {f['auto_choice']}")
        if (f or b).get("kernel"):
            notes.insert(0, f"kernel: {(f or b)['kernel']}")
        note = "; ".join(notes)
        if notes and len(modes) == 2 and f.get("note") and f.get("note") == b.get("note"):
            note = (f"-> {f['auto_choice']}; " if f.get("auto_choice") else "") + f"{f['status']}: {f['note']}"
        table.append((shape, dtype, impl, _fmt(f.get("ms"), ".3f"), _fmt(f.get("tflops"), ".1f"),
                      _fmt(f.get("ratio"), ".2f"), _fmt(b.get("ms"), ".3f"), _fmt(b.get("tflops"), ".1f"),
                      _fmt(b.get("ratio"), ".2f"), temp, note[:120]))
    widths = [max(len(h), *(len(str(row[i])) for row in table)) if table else len(h)
              for i, h in enumerate(header)]
    widths[-1] = len(header[-1])
    fmt = "  ".join(f"{{:{w}}}" for w in widths)
    lines.append(fmt.format(*header))
    lines.append(fmt.format(*("-" * w for w in widths)))
    prev = None
    for row in table:
        if prev is not None and row[0] != prev:
            lines.append("")
        prev = row[0]
        lines.append(fmt.format(*row).rstrip())
    return "\n".join(lines)


def auto_summary(doc: dict, target: float = 1.03) -> tuple[str, bool]:
    """Per shape: the fastest JAX backend forward and forward+backward, and how `auto` compares."""
    by = {}
    for r in doc["results"]:
        by.setdefault((r["shape"], r["dtype"]), []).append(r)
    lines, ok_all, any_auto = [], True, False
    for (shape, dtype), rows in by.items():
        parts = [f"{shape} {dtype}:"]
        for mode in doc["meta"]["modes"]:
            timed = [r for r in rows if r["mode"] == mode and r.get("status") == "ok"
                     and r["framework"] == "jax" and not r["impl"].startswith("auto")]
            auto = next((r for r in rows if r["mode"] == mode and r["impl"] == "auto"), None)
            if not timed:
                parts.append(f"{mode}: nothing timed")
                continue
            best = min(timed, key=lambda r: r["ms"])
            txt = f"{mode}: best {best['impl']} {best['ms']:.3f} ms"
            if auto is not None:
                any_auto = True
                if auto.get("status") == "ok":
                    ratio = auto["ratio_jax"]
                    txt += f", auto ({auto.get('auto_choice')}) x{ratio:.3f}"
                    if auto.get("program") and auto["program"] == best.get("program"):
                        txt += " (same compiled program as the best: equal)"
                    elif ratio > target:
                        ok_all = False
                        txt += " MISS"
                else:
                    ok_all = False
                    txt += f", auto {auto.get('status')}"
            parts.append(txt)
        lines.append("  ".join(parts))
    if any_auto:
        lines.append(f"auto within {100 * (target - 1):.0f}% of the fastest JAX backend on every shape and mode: "
                     f"{'yes' if ok_all else 'NO'}")
    return "\n".join(lines), ok_all


CSV_FIELDS = ("shape", "b", "n", "sq", "skv", "d", "dtype", "impl", "framework", "auto_choice", "mode", "status",
              "method", "ms", "tflops", "ratio", "ratio_jax", "flops", "temp_bytes", "peak_bytes", "err", "tol", "runs",
              "calls_per_sample", "spread", "timing", "compile_s", "program", "note")


def write_csv(doc: dict, path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in doc["results"]:
            w.writerow(r)


def write_plot(doc: dict, path) -> None:
    """Bars of TFLOP/s per shape (groups) and implementation (colors), one panel per mode."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    modes = doc["meta"]["modes"]
    shapes = list(dict.fromkeys(r["shape"] + (f" {r['dtype']}" if r["dtype"] != "bfloat16" else "")
                                for r in doc["results"]))
    impls = [i for i in doc["meta"]["impls"]  # `auto-before` is a diagnostic: table and JSON only
             if i != "auto-before" and any(r["impl"] == i and r.get("tflops") for r in doc["results"])]
    fig, axes = plt.subplots(len(modes), 1, squeeze=False,
                             figsize=(max(9, 0.25 * len(shapes) * max(1, len(impls)) + 2), 4.2 * len(modes)))
    width = 0.8 / max(1, len(impls))
    cmap = plt.get_cmap("tab10")
    for ax, mode in zip(axes[:, 0], modes):
        for j, impl in enumerate(impls):
            vals = []
            for s in shapes:
                r = next((r for r in doc["results"] if r["mode"] == mode and r["impl"] == impl and
                          r["shape"] + (f" {r['dtype']}" if r["dtype"] != "bfloat16" else "") == s), None)
                vals.append(r.get("tflops") or 0.0 if r else 0.0)
            xs = np.arange(len(shapes)) + (j - (len(impls) - 1) / 2) * width
            ax.bar(xs, vals, width, label=impl, color="black" if impl == "auto" else cmap(j % 10),
                   hatch="//" if impl in TORCH_KERNELS else None, edgecolor="white", linewidth=0.3)
        ax.set_xticks(np.arange(len(shapes)), shapes, fontsize=8)
        ax.set_ylabel("TFLOP/s")
        ax.set_title(f"{mode}  (b x n x sq x skv x d; missing bar = cannot serve / skipped)", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    axes[0, 0].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.005, 1.0))
    meta = doc["meta"]
    fig.suptitle(f"jax-attn bench: {meta.get('gpu') or meta.get('device')}, jax {meta.get('jax')}, "
                 f"torch {meta.get('torch', '-')}, {meta.get('date', '')[:10]}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------
# Routing table from measurements

# The routing mode each measured mode orders: training reads forward+backward, inference (calls
# nothing differentiates) reads forward.
ROUTING_MODES = {"fwd+bwd": "train", "fwd": "forward"}


def routing_from_results(doc: dict, tie: float = 0.01) -> dict:
    """Preferences per bucket and mode from a bench results document.

    For every (shape, mode) a JAX backend served correctly, its time over the fastest JAX backend
    of that shape and mode. Within a bucket (device, dtype, head-dim bucket, sequence bucket) and
    mode the backends are ordered by their worst such ratio over the bucket's shapes (the 3%
    target is per shape and mode), then by the geometric mean; worst ratios within `tie` of each
    other count as equal. Backends that failed the correctness gate in a bucket are left out of
    its preferences. `preferences` (training) orders by forward+backward, `preferences_forward`
    (inference) by forward; a bucket measured forward only gets its training order from forward.
    """
    from . import autoselect
    device = doc["meta"]["device_key"]
    _add_ratios(doc["results"])
    entries: dict = {}
    failed: dict = {}
    for r in doc["results"]:
        if r["framework"] != "jax" or r["impl"].startswith("auto"):
            continue
        key = autoselect.bucket_key(device, r["dtype"], r["d"], r["skv"])
        if r.get("status") in ("FAIL", "error"):
            failed.setdefault(key, set()).add(r["impl"])
        elif r.get("status") == "ok" and "ratio_jax" in r and r["mode"] in ROUTING_MODES:
            entries.setdefault((key, r["mode"]), {}).setdefault(r["impl"], []).append(r["ratio_jax"])
    prefs = {name: {} for name in autoselect.TABLE_KEYS.values()}
    scores: dict = {}
    for (key, mode), per in sorted(entries.items()):
        stats = {n: {"worst": max(v), "geomean": math.exp(sum(map(math.log, v)) / len(v)), "entries": len(v)}
                 for n, v in per.items() if n not in failed.get(key, ())}
        # Worst ratios quantized to steps of `tie`: near-equal ones are ordered by the geomean.
        order = sorted(stats, key=lambda n: (round(math.log(stats[n]["worst"]) / math.log1p(tie)),
                                             stats[n]["geomean"]))
        prefs[autoselect.TABLE_KEYS[ROUTING_MODES[mode]]][key] = order
        scores.setdefault(key, {})[mode] = {n: {k: round(v, 4) if isinstance(v, float) else v
                                                for k, v in stats[n].items()} for n in order}
    for key, names in failed.items():
        if key in scores:
            scores[key]["failed"] = sorted(names)
    train, forward = (prefs[autoselect.TABLE_KEYS[m]] for m in ("train", "forward"))
    for key, order in forward.items():  # measured forward only
        train.setdefault(key, order)
    meta = doc["meta"]
    return {"comment": "Written by `python -m jax_attn bench --write-routing/--update-routing`; "
                       "autoselect.py reads `preferences` (training: forward+backward) and "
                       "`preferences_forward` (inference), bucket -> backends, fastest first.",
            "source": {k: meta.get(k) for k in ("date", "device", "gpu", "driver", "device_key", "jax", "jaxlib",
                                                "jax_cudnn", "torch", "command") if meta.get(k)},
            **{name: dict(sorted(v.items())) for name, v in prefs.items()}, "scores": scores}


def predicted_auto(doc: dict, table: dict) -> str:
    """What `auto` would get with routing `table`, per shape and mode, from the rows of `doc`."""
    from . import autoselect
    device = doc["meta"]["device_key"]
    lines = []
    by = {}
    for r in doc["results"]:
        if r["framework"] == "jax" and not r["impl"].startswith("auto"):
            by.setdefault((r["shape"], r["dtype"], r["mode"]), {})[r["impl"]] = r
    for (shape, dtype, mode), rows in by.items():
        any_row = next(iter(rows.values()))
        key = autoselect.bucket_key(device, dtype, any_row["d"], any_row["skv"])
        order = autoselect.orders(table, ROUTING_MODES.get(mode, "train")).get(key, [])
        pick = next((n for n in order if rows.get(n, {}).get("status") == "ok"), None)
        ratio = rows[pick].get("ratio_jax") if pick else None
        lines.append(f"  {shape} {dtype} {mode}: {pick or '-'}" + (f" x{ratio:.3f}" if ratio else ""))
    return "\n".join(lines)


def write_routing(doc: dict, path=None, merge: bool = True) -> dict:
    """Write the routing table for `doc` to `path` (default: the package's table); returns it.

    With `merge`, buckets of other devices already in the file are kept.
    """
    from . import autoselect
    path = pathlib.Path(path or autoselect.TABLE_PATH)
    table = routing_from_results(doc)
    if merge and path.exists():
        old = json.loads(path.read_text() or "{}")
        device = doc["meta"]["device_key"] + "|"
        for name in (*autoselect.TABLE_KEYS.values(), "scores"):
            kept = {k: v for k, v in old.get(name, {}).items() if not k.startswith(device)}
            table[name] = dict(sorted({**kept, **table[name]}.items()))
        if old.get("source") and old["source"].get("device_key") != doc["meta"]["device_key"]:
            table["other_sources"] = [old["source"]] + old.get("other_sources", [])
    path.write_text(json.dumps(table, indent=1) + "\n")
    autoselect.table.cache_clear()
    return table


# ------------------------------------------------------------------------------------------------
# CLI

def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `bench` on an argparse sub-parser set; the handler is `args.run(args)`."""
    p = subparsers.add_parser("bench", help="time every backend (and torch SDPA) on named shapes",
                              description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(p)
    p.set_defaults(run=run)
    return p


def _add_arguments(p) -> None:
    g = p.add_argument_group("what to run")
    g.add_argument("--shapes", help=f"comma-separated shape sets: {', '.join(SHAPE_SETS)} "
                                    "(default: diffusion on a GPU, tiny on a CPU)")
    g.add_argument("--shape", action="append", metavar="B,N,SQ,SKV,D", help="an extra shape (repeatable)")
    g.add_argument("--dtype", choices=("bfloat16", "float16", "float32"),
                   help="override every shape's dtype (default: bfloat16 for sets and --shape on a GPU, "
                        "float32 on a CPU; the tiny set is float32)")
    g.add_argument("--backends", help="comma-separated: JAX backends, auto, torch-flash, torch-efficient, "
                                      "torch-cudnn, torch-math, or torch for all four (default: everything available)")
    g.add_argument("--no-torch", action="store_true", help="skip torch SDPA rows")
    g.add_argument("--no-backward", action="store_true", help="forward only")
    g.add_argument("--memory-only", action="store_true",
                   help="compile and report memory (temp bytes) only: no correctness check, no timing")
    t = p.add_argument_group("timing")
    t.add_argument("--min-runs", type=int, default=20, help="samples per measurement, at least (default 20)")
    t.add_argument("--measure-s", type=float, default=0.4,
                   help="keep sampling a measurement for this long beyond --min-runs (default 0.4)")
    t.add_argument("--sample-ms", type=float, default=10.0,
                   help="calls per sample are chosen to fill this long, to amortize the sync (default 10)")
    t.add_argument("--short-us", type=float, default=100.0,
                   help="calls shorter than this are timed inside one program / CUDA graph (default 100)")
    t.add_argument("--inner-loop", choices=("auto", "always", "never"), default="auto",
                   help="force or forbid the in-program timing loop (default: by --short-us)")
    t.add_argument("--l2-mb", type=float, help="cache size that input rotation defeats (default: the GPU's L2)")
    t.add_argument("--max-sets", type=int, default=8, help="input sets to rotate among, at most (default 8)")
    t.add_argument("--budget", type=float, default=400.0,
                   help="seconds; rows not started by then are reported as skipped (default 400, 0 = none)")
    t.add_argument("--seed", type=int, default=0)
    o = p.add_argument_group("output")
    o.add_argument("--json", help="write the results document here")
    o.add_argument("--csv", help="write one row per measurement here")
    o.add_argument("--plot", help="write a PNG bar chart of TFLOP/s here")
    o.add_argument("--quiet", action="store_true", help="no progress bar")
    r = p.add_argument_group("routing")
    r.add_argument("--write-routing", nargs="?", const="", metavar="PATH",
                   help="after the run, write the routing table from its results "
                        "(default path: jax_attn/routing_table.json)")
    r.add_argument("--update-routing", metavar="RESULTS_JSON",
                   help="do not run: write the routing table from a saved --json results file "
                        "(to --routing-table, default jax_attn/routing_table.json)")
    r.add_argument("--routing-table", metavar="PATH", help="where --update-routing writes")
    r.add_argument("--recheck-auto", action="store_true",
                   help="with --write-routing: then time `auto` again, routed by the new table "
                        "(the first auto rows become auto-before)")
    r.add_argument("--recheck-budget", type=float, default=150.0,
                   help="seconds for --recheck-auto (default 150)")


def run(args) -> int:
    """Handler of `jax-attn bench`."""
    from . import autoselect
    if args.update_routing:
        doc = json.loads(pathlib.Path(args.update_routing).read_text())
        table = write_routing(doc, args.routing_table)
        print(json.dumps({k: table[k] for k in autoselect.TABLE_KEYS.values()}, indent=1))
        print("predicted auto picks (from the measured rows):")
        print(predicted_auto(doc, table))
        return 0
    if args.recheck_auto and args.write_routing is None:
        raise SystemExit("--recheck-auto needs --write-routing")
    # torch and JAX share the GPU: JAX must not grab 75% of it up front.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    doc = run_bench(args)
    methods = doc.pop("_methods")
    if args.write_routing is not None:
        path = pathlib.Path(args.write_routing or args.routing_table or autoselect.TABLE_PATH)
        table = write_routing(doc, path)
        print(f"routing table written to {path}; predicted auto picks:")
        print(predicted_auto(doc, table))
        if args.recheck_auto:  # time `auto` again, routed by the table just written
            autoselect.TABLE_PATH = path  # this process only
            autoselect.table.cache_clear()
            again = run_bench(args, impls=["auto"], methods=methods, budget=args.recheck_budget)
            again.pop("_methods")
            for r in doc["results"]:
                if r["impl"] == "auto":
                    r["impl"] = "auto-before"
            doc["results"] += again["results"]
            doc["meta"]["impls"] = [("auto-before" if i == "auto" else i) for i in doc["meta"]["impls"]] + ["auto"]
            doc["meta"]["recheck"] = f"auto re-timed with the routing table written to {path}"
            _add_ratios(doc["results"])
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(doc, indent=1, default=str) + "\n")
    if args.csv:
        write_csv(doc, args.csv)
    if args.plot:
        try:
            write_plot(doc, args.plot)
        except Exception as e:  # noqa: BLE001 - the numbers matter more than the picture
            log.warning("bench: plot failed: %s", e)
    meta = doc["meta"]
    print()
    print(format_table(doc))
    if meta["not_benchmarked"]:
        print("\nnot benchmarked: " + "; ".join(f"{n} ({w})" for n, w in meta["not_benchmarked"].items()))
    print(f"\n{meta.get('gpu') or meta['device']} | jax {meta['jax']} | torch {meta.get('torch', '-')}"
          + (f" | driver {meta['driver']}" if meta.get("driver") else ""))
    bad = [r for r in doc["results"] if r.get("status") in ("FAIL", "error")]
    if bad:
        print(f"{len(bad)} row(s) failed: " + "; ".join(f"{r['shape']} {r['impl']} {r['mode']}" for r in bad[:8]))
    summary, _ = auto_summary(doc)
    print(summary)
    return 1 if any(r.get("status") == "FAIL" for r in bad) else 0


def main(argv=None) -> int:
    """`python -m jax_attn.bench ...` (the same as `python -m jax_attn bench ...`)."""
    parser = argparse.ArgumentParser(prog="jax-attn bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
