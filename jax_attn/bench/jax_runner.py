"""JAX rows: reasons, compile and memory analysis, the gate, then timing, for one backend.

`jax_reasons` asks `explain` why a backend cannot serve a shape (and what `auto` picks);
`measure_jax` compiles ahead of time, reads the program's `memory_analysis()`, skips programs
that would not fit the device, runs the correctness gate and times the call (Python loop or
in-program loop). `program_fingerprint` hashes the optimized HLO so `auto` and the backend it
routed to can be recognized as the very same program. `OTHER_JAX` adds rows for other JAX
libraries' attention (tokamax), timed the same way as peers: never routed to, and outside
`ratio_jax` (what the routing orders by).
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
import math
import re
import time

import numpy as np

from .device_info import _device_memory_limit
from ..arrays import random_normal
from .gate import _check_slices, _reference_errors, _short_message, _tolerance
from .shapes import GiB, Shape
from .timing import NO_HOISTING, _jax_looped, _time_samples, _timing_fields

log = logging.getLogger(__name__)


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
            self.sets.append(tuple(random_normal(kk, s, dt) for kk, s in zip(sub, (qs, ks, ks, qs))))
        jax.block_until_ready(self.sets)
        rows, pairs = _check_slices(shape)
        q, k, v, do = self.sets[0]
        f32 = lambda x: np.asarray(x.astype(jnp.float32), np.float64)
        self.host = {bh: (f32(q[bh]), f32(k[bh]), f32(v[bh]), f32(do[bh])) for bh in pairs}
        mask = np.zeros((shape.b, shape.n, shape.sq, 1), bool)
        for bh in pairs:
            mask[bh][rows] = True
        # The check's cotangent: do on the sampled rows, zero elsewhere (see `gate`).
        self.do_check = jnp.where(jnp.asarray(mask), do, jnp.zeros((), dt))
        self._bsnd = None  # the sets in (b, s, n, d), made on first use (`_sets`)

    def args(self, i: int, mode: str, layout: str = "bnsd"):
        q, k, v, do = self._sets(layout)[i % len(self.sets)]
        return (q, k, v) if mode == "fwd" else (q, k, v, do)

    def check_cotangent(self, layout: str = "bnsd"):
        return self.do_check if layout == "bnsd" else _swap(self.do_check)

    def _sets(self, layout: str):
        """The sets in `layout`: (b, s, n, d) ones transposed once (on first use), untimed."""
        if layout == "bnsd":
            return self.sets
        if self._bsnd is None:
            self._bsnd = [tuple(map(_swap, s)) for s in self.sets]
        return self._bsnd


def _swap(x):  # (b, n, s, d) <-> (b, s, n, d)
    import jax.numpy as jnp
    return jnp.swapaxes(x, 1, 2)


def _tokamax_attention():
    """tokamax's Pallas Mosaic GPU attention on Hopper (its `mosaic` implementation)."""
    from .tokamax_compat import prepare
    return functools.partial(prepare().dot_product_attention, implementation="mosaic")


# Attention from other JAX libraries, timed as peers beside our backends (never routed to):
# row name -> (module, a function returning the call). Their calls take (b, s, n, d) arrays, the
# layout they read natively, so the bench hands them inputs transposed once, untimed.
OTHER_JAX = {"tokamax": ("tokamax", _tokamax_attention)}
OTHER_JAX_FRAMEWORK = "jax-other"  # the rows' `framework`


def other_jax_reasons(name: str) -> list[str]:
    """Why another library's row cannot run here (empty when it can): its package, a GPU."""
    import jax
    module = OTHER_JAX[name][0]
    why = [] if importlib.util.find_spec(module) else [f"{module} is not installed"]
    if jax.default_backend() != "gpu":
        why.append(f"{name}'s kernels need a GPU; the default JAX platform is {jax.default_backend()}")
    return why


def _jax_fn(name: str, mode: str):
    import jax

    from ..api import attention_forward

    if name in OTHER_JAX:
        fwd = OTHER_JAX[name][1]()
    else:
        def fwd(q, k, v):
            return attention_forward(q, k, v, backend=name)

    if mode == "fwd":
        return fwd

    def fwd_bwd(q, k, v, do):
        _, vjp = jax.vjp(fwd, q, k, v)
        return vjp(do)

    return fwd_bwd


def jax_reasons(name: str, shape: Shape) -> tuple[list[str], dict | None]:
    """Why `name` cannot serve `shape` (empty when it can), and for `auto`, what it picks per mode
    (`{"fwd": ..., "fwd+bwd": ...}`: a forward alone is a call nothing differentiates)."""
    import jax

    from ..api import explain
    from ..backends import BACKENDS
    from ..routing import BackendError
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
        from ..routing import pallas_kernel
        return pallas_kernel(shape.spec())[0]
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
    layout = "bsnd" if name in OTHER_JAX else "bnsd"
    args0 = inputs.args(0, mode, layout)
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
        check_args = args0 if mode == "fwd" else args0[:3] + (inputs.check_cotangent(layout),)
        res = compiled(*check_args)
        if layout == "bsnd":  # the gate slices (b, n, s, d)
            res = jax.tree.map(_swap, res)
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
            out = compiled(*inputs.args(i, mode, layout))
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
    sets = tuple(inputs.args(i, mode, layout) for i in range(n_sets))
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
