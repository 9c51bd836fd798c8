"""How a call is timed: samples and their median, in-program loops, CUDA graph capture.

Timing as the field does it: warm-up, a device sync around each sample, the median of at least
`--min-runs` samples (`_time_samples`); inputs rotated among several sets when one set is
smaller than twice the L2 cache (`_n_sets`); calls shorter than `--short-us` are repeated inside
one compiled program (`_jax_looped`, compiled with `NO_HOISTING`) or one CUDA graph
(`_torch_graph`), so launch overhead stays out of the number. Framework-neutral pieces live here
so JAX and torch rows are timed by the same rules.

This is the package's one timer: `median_ms` (a plain "call, sync, repeat" median for one-off
comparisons: `jax-attn check`, `benchmarks/reliability_gpu.py`) samples through the same
`_time_samples` as the bench rows, so every number the project prints is a median taken one way.
"""
from __future__ import annotations

import dataclasses
import math
import statistics
import time

from .shapes import Shape


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


def _block(x):
    import jax
    return jax.block_until_ready(x)


def time_call(fn, *args, repeats: int = 20, warmup: int = 2, sync=None, calls: int = 1) -> Timing:
    """Time `fn(*args)`: `warmup` calls, then `repeats` samples of `calls` back-to-back calls
    each, ended by `sync` (default `jax.block_until_ready`; pass torch's synchronize for torch).

    No input rotation and no in-program loop. With `calls=1` the figure includes the launch and
    the wait, which is right for comparing two variants of one call side by side; `calls > 1`
    lets dispatch run ahead of the GPU as a model's step does, so sub-millisecond kernels are
    timed without one sync each (what a table of kernel speeds needs, short of `jax-attn bench`)."""
    if calls < 1:
        raise ValueError(f"time_call: calls must be >= 1, got {calls}")
    sync = sync or _block
    for _ in range(max(0, warmup)):
        sync(fn(*args))

    def sample(_k):
        t = time.perf_counter()
        for _ in range(calls - 1):
            fn(*args)
        sync(fn(*args))
        return time.perf_counter() - t, calls

    how = "python loop, 1 call per sample" if calls == 1 else f"python loop, {calls} async calls per sample"
    return _time_samples(sample, 1.0, max(1, repeats), 0.0, 0.0, float("inf"), how)


def median_ms(fn, *args, repeats: int = 20, warmup: int = 2, sync=None, calls: int = 1) -> float:
    """Median milliseconds of `fn(*args)` (see `time_call`)."""
    return time_call(fn, *args, repeats=repeats, warmup=warmup, sync=sync, calls=calls).ms


def _timing_fields(t: Timing) -> dict:
    return {"ms": t.ms, "runs": t.runs, "calls_per_sample": t.per_sample, "timing": t.method,
            "spread": round(t.spread, 4)}


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


def _n_sets(shape: Shape, mode: str, l2: int, cap: int) -> int:
    return max(1, min(cap, math.ceil(2 * l2 / shape.set_bytes(mode))))
