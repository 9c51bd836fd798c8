"""The run: every shape x implementation x mode into one results document.

`select_impls` picks the implementations (available JAX backends, `auto` as its own row, torch
SDPA's kernels); `run_bench` walks the grid, asks each backend's reasons first, sizes and
creates the inputs once per shape, hands each row to its framework's runner, honours the time
budget and adds the ratios. It returns the document the report and the routing writer read.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time

from .device_info import _device_memory_limit, _l2_bytes, environment
from .gate import _short_message
from .jax_runner import OTHER_JAX, OTHER_JAX_FRAMEWORK, JaxInputs, jax_reasons, measure_jax, other_jax_reasons
from .report import _add_ratios
from .shapes import GiB, select_shapes
from .timing import _n_sets
from .torch_runner import TORCH_KERNELS, TorchInputs, _release_torch_memory, measure_torch, torch_kernels

log = logging.getLogger(__name__)

QUADRATIC = ("xla", "naive")  # backends that materialize the (b, n, sq, skv) scores


def select_impls(args) -> list[str]:
    """JAX backends (available ones; interpreted Pallas only when named), `auto`, other JAX
    libraries' attention (`OTHER_JAX`, where they can run, or named), torch kernels."""
    from ..backends import BACKENDS
    from ..backends.pallas import interpreting
    wanted = None
    if args.backends:
        wanted = []
        for x in args.backends.split(","):
            x = x.strip()
            wanted += list(TORCH_KERNELS) if x == "torch" else [x]
        unknown = [x for x in wanted if x not in BACKENDS and x not in TORCH_KERNELS
                   and x not in OTHER_JAX and x != "auto"]
        if unknown:
            raise SystemExit(f"--backends: unknown {', '.join(unknown)}; known: {', '.join(BACKENDS)}, auto, "
                             f"{', '.join(OTHER_JAX)}, torch ({', '.join(TORCH_KERNELS)})")
    impls = []
    for name, b in BACKENDS.items():
        if wanted is not None and name not in wanted:
            continue
        if wanted is None and (b.unavailable() or (name == "pallas" and interpreting())):
            continue  # unavailable ones are listed under "not benchmarked"; interpret mode is for tests
        if wanted is None and b.lossy:
            continue  # 8-bit: held to its own accuracy bar (benchmarks/sage_device.py), timed when named
        impls.append(name)
    if wanted is None or "auto" in wanted:
        impls.append("auto")
    if not args.memory_only:
        impls += [n for n in OTHER_JAX
                  if (n in wanted if wanted is not None else not other_jax_reasons(n))]
    if not args.no_torch and not args.memory_only:
        impls += torch_kernels(None if wanted is None else set(wanted))
    return impls


# A row's `reason` when the time budget, not the backend, left it unmeasured: readers that turn
# rows into decisions (the routing writer via `jax-attn tune`) must not read it as "cannot serve".
BUDGET_SKIP = "budget"


def run_bench(args, impls=None, methods=None, budget=None, shapes=None, modes=None, desc="bench") -> dict:
    """Run the benchmark described by parsed `args`; returns the results document.

    `impls` overrides the implementations, `methods` carries timing methods from an earlier run
    (for `auto` to be timed like its pick), `budget` overrides `--budget`, `shapes` (a list of
    `Shape`) and `modes` (of `MODES`) override the options' shapes and modes, `desc` labels the
    progress bar.
    """
    import jax
    from tqdm import tqdm

    from ..backends import BACKENDS

    jax.devices()  # JAX first: it must load its CUDA libraries before torch is imported
    shapes, impls = shapes or select_shapes(args), impls or select_impls(args)
    methods = {} if methods is None else methods  # (shape, mode, backend) -> timing method, for `auto`
    budget = args.budget if budget is None else budget
    modes = list(modes or ["fwd"] + ([] if args.no_backward else ["fwd+bwd"]))
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
    bar = tqdm(total=len(shapes) * len(impls) * len(modes), desc=desc, unit="run", disable=args.quiet,
               file=sys.stderr, dynamic_ncols=True)
    for shape in shapes:
        jax_in = torch_in = None
        for name in impls:
            framework = ("torch" if name in TORCH_KERNELS
                         else OTHER_JAX_FRAMEWORK if name in OTHER_JAX else "jax")
            picked = None
            if framework == "jax":
                why, picked = jax_reasons(name, shape)
            elif framework == OTHER_JAX_FRAMEWORK:
                why = other_jax_reasons(name)
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
                    row.update(status="skip", reason=BUDGET_SKIP,
                               note=f"not run: the time budget of {budget:.0f} s was used up")
                else:
                    try:
                        if framework in ("jax", OTHER_JAX_FRAMEWORK):
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
