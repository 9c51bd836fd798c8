"""`jax-attn tune`: measure this machine's GPU on your shapes and route `auto` by the result.

The shipped routing data (`jax_attn/data/routing.json`) holds tables for the GPUs we measured;
any other GPU gets its generation's table or the generic rule. `tune` measures the one you have:
every JAX backend that automatic selection may take here (available, not lossy), on your shapes
(default: the bench's diffusion set on a GPU, its tiny set on a CPU), forward (inference) and
forward+backward (training), each row checked against the float64 reference before it is timed
(the bench's runners: `jax_attn.bench`). The orders per bucket (`routing_writer`) go to the
per-user cache, `$JAX_ATTN_CACHE/routing.json` (default `~/.cache/jax_attn/routing.json`), under
this GPU's device kind, which `auto` reads before the shipped data. A bucket measured before and
not measured now keeps its earlier order; a new device's buckets not measured keep what `auto`
used before (the source says which: `inherited`), since a device's table is read as a whole.

`--write-shipped PATH` writes a keyed routing document instead (the package's own data, for a
GPU we ship a table for: `benchmarks/h200_routing.sh`); there nothing is inherited from another
GPU. `--dry-run` prints the plan and measures nothing.

Never written: lossy backends (`sage`, `sage16`) unless `--lossy`, backends this machine cannot
run or that automatic selection may not take here (`pallas` in interpret mode), buckets the time
budget cut short. `--lossy` also measures the lossy backends (forward; each row through the same
float64 gate, at the dtype's tolerance) and writes, per bucket, the forward order with them
among the exact ones: what `backend="auto+8bit"` reads. `auto` itself still never takes them.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import pathlib
import time

log = logging.getLogger(__name__)

# The user-facing mode names and the bench's measured modes they stand for.
MODES = {"inference": "fwd", "train": "fwd+bwd"}
# Sampling: the bench's defaults, a little shorter (routing needs orders, not a published table);
# `--quick` trades precision for a run of about a minute.
TIMING = {"min_runs": 20, "measure_s": 0.25, "sample_ms": 10.0}
QUICK_TIMING = {"min_runs": 5, "measure_s": 0.05, "sample_ms": 5.0}


def modes_arg(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in names if x not in MODES]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {', '.join(MODES)}, got {text!r}")
    return list(dict.fromkeys(names))


def dtypes_arg(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    known = ("bfloat16", "float16", "float32")
    bad = [x for x in names if x not in known]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {', '.join(known)}, got {text!r}")
    return list(dict.fromkeys(names))


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `tune` on an argparse sub-parser set; the handler is `args.run(args)`."""
    from .bench.cli import shape_arg
    p = subparsers.add_parser("tune", help="measure this GPU on your shapes; auto then routes by it",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", action="append", type=shape_arg, metavar="B,N,SQ,SKV,D",
                   help="a shape to measure (repeatable; default: the diffusion set on a GPU, tiny on a CPU)")
    p.add_argument("--dtype", type=dtypes_arg, metavar="DTYPE[,DTYPE]",
                   help="bfloat16, float16, float32, comma-separated (default: bfloat16 on a GPU, "
                        "float32 on a CPU)")
    p.add_argument("--modes", type=modes_arg, default=list(MODES), metavar="MODE[,MODE]",
                   help="inference (forward) and/or train (forward+backward) (default: both)")
    p.add_argument("--backends", help="comma-separated JAX backends to measure (default: every one auto may "
                                      "pick here; others are measured but not written)")
    p.add_argument("--lossy", action="store_true",
                   help="also measure the lossy (8-bit) backends, for the opt-in backend='auto+8bit'")
    p.add_argument("--quick", action="store_true", help="fewer samples per row: about a minute, rougher orders")
    p.add_argument("--budget", type=float, default=480.0,
                   help="seconds; rows not started by then are left out, and so are their buckets (default 480)")
    p.add_argument("--dry-run", action="store_true", help="print the plan; measure and write nothing")
    p.add_argument("--write-shipped", metavar="PATH",
                   help="write into this keyed routing document (e.g. jax_attn/data/routing.json) "
                        "instead of the per-user cache")
    p.add_argument("--expect-device", metavar="KIND",
                   help="refuse to run unless JAX's device kind is exactly this (e.g. 'NVIDIA H200')")
    p.add_argument("--json", help="also write the bench results document here")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=run)
    return p


@dataclasses.dataclass
class Plan:
    kind: str  # device kind: the key the table goes under
    generation: str | None
    shapes: list  # of bench.shapes.Shape
    modes: list  # bench modes ("fwd", "fwd+bwd")
    backends: list  # JAX backends to measure
    left_out: dict  # backend -> why it is not written
    target: pathlib.Path
    shipped: bool

    def describe(self) -> str:
        names = {v: k for k, v in MODES.items()}
        lines = [f"device:   {self.kind}" + (f" ({self.generation})" if self.generation else ""),
                 f"shapes:   {', '.join(f'{s.name} {s.dtype}' for s in self.shapes)}",
                 f"modes:    {', '.join(names[m] for m in self.modes)}",
                 f"measure:  {', '.join(self.backends) or 'nothing'}"]
        lines += [f"left out: {n} ({why})" for n, why in self.left_out.items()]
        lines.append(f"write to: {self.target} under {self.kind!r}"
                     + (" (shipped data)" if self.shipped else " (per-user cache, read before the shipped data)"))
        return "\n".join(lines)


def routable(name: str, lossy: bool = False) -> str | None:
    """Why `auto` (with `lossy`, `auto+8bit`) may not take backend `name` on this machine (None:
    it may)."""
    from .backends import BACKENDS
    from .backends.pallas import interpreting
    from .bench.report import is_lossy
    backend = BACKENDS.get(name)
    if backend is None:
        return "unknown backend"
    if is_lossy(name) and not lossy:
        return "lossy: auto never picks it (--lossy measures it for auto+8bit)"
    why = backend.unavailable()
    if why:
        return "unavailable: " + "; ".join(why)
    if is_lossy(name) and interpreting():
        return "Pallas interpret mode (tests only): its timings route nothing"
    if not backend.automatic and not is_lossy(name):
        return "automatic selection may not take it here"
    return None


def plan(args) -> Plan:
    import jax

    from . import data
    from .backends import BACKENDS
    from .bench.shapes import SHAPE_SETS, Shape
    on_gpu = jax.default_backend() == "gpu"
    kind, generation = data.device()
    kind = kind or jax.default_backend()
    default_dtypes = ["bfloat16"] if on_gpu else ["float32"]
    base = ([(s.b, s.n, s.sq, s.skv, s.d) for s in SHAPE_SETS["diffusion" if on_gpu else "tiny"]]
            if not args.shape else list(args.shape))
    shapes = list(dict.fromkeys(Shape(*dims, dtype) for dtype in args.dtype or default_dtypes for dims in base))
    if args.backends:
        wanted = [x.strip() for x in args.backends.split(",") if x.strip()]
        unknown = [x for x in wanted if x not in BACKENDS]
        if unknown:
            raise SystemExit(f"--backends: unknown {', '.join(unknown)}; known: {', '.join(BACKENDS)}")
    else:
        wanted = list(BACKENDS)
    # Measured: what this machine can run; written: only what `auto` may take (the rest is timed
    # when named, for comparison, and says why it is not written).
    lossy = getattr(args, "lossy", False)
    left_out = {n: routable(n, lossy) for n in wanted if routable(n, lossy)}
    backends = [n for n in wanted if not BACKENDS[n].unavailable()
                and (lossy or not BACKENDS[n].lossy) and (args.backends or n not in left_out)]
    target = pathlib.Path(args.write_shipped) if args.write_shipped else data.cache_path("routing")
    return Plan(kind, generation, shapes, [MODES[m] for m in args.modes], backends, left_out, target,
                bool(args.write_shipped))


def measure(p: Plan, args) -> dict:
    """The bench's runners over the plan's shapes, backends and modes: its results document."""
    from .bench.suite import run_bench
    timing = QUICK_TIMING if args.quick else TIMING
    bench_args = argparse.Namespace(
        shapes=None, shape=None, dtype=None, backends=None, no_torch=True, no_backward=False,
        memory_only=False, short_us=100.0, inner_loop="auto", l2_mb=None, max_sets=8,
        budget=args.budget, seed=0, quiet=args.quiet, **timing)
    # JAX alone holds the GPU here (no torch rows): its preallocation is harmless, but keep the
    # bench's setting so the two commands measure under the same memory conditions.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    from .backends import BACKENDS
    exact = [n for n in p.backends if not BACKENDS[n].lossy]
    lossy = [n for n in p.backends if BACKENDS[n].lossy]
    t0 = time.perf_counter()
    doc = run_bench(bench_args, impls=exact, shapes=p.shapes, modes=p.modes, desc="tune")
    if lossy and "fwd" not in p.modes:
        log.warning("tune: --lossy measures forward (inference) only; add inference to --modes")
    elif lossy:  # forward-only kernels: their forward, beside the exact ones', in what is left
        left = max(0.0, args.budget - (time.perf_counter() - t0))
        doc["results"] += run_bench(bench_args, impls=lossy, shapes=p.shapes, modes=["fwd"],
                                    budget=left, desc="tune (lossy)")["results"]
    doc.pop("_methods", None)
    return doc


def tuned_table(doc: dict, p: Plan, base: dict) -> dict:
    """The table to write: the measured orders, backends `auto` may not take left out, laid over
    `base` (see `routing_writer.merge_tables`)."""
    from . import autoselect
    from .routing_writer import merge_tables, routing_from_results
    table = routing_from_results(doc)
    table.pop("comment", None)  # the document's comment says it
    for name in autoselect.TABLE_KEYS.values():
        if name not in table:  # the lossy order, where nothing lossy was measured
            continue
        table[name] = {k: [n for n in order if n not in p.left_out] for k, order in table[name].items()}
        table[name] = {k: v for k, v in table[name].items() if v}
    table["source"]["tool"] = "jax-attn tune" + (" --quick" if doc["meta"].get("quick") else "")
    if p.left_out:
        table["source"]["not_written"] = dict(p.left_out)
    return merge_tables(base, table) if base else table


def write(doc: dict, p: Plan) -> dict:
    """Write the tuned table to the plan's target (and forget what `auto` read before); returns it."""
    from . import autoselect, data
    old = data.read(p.target).get("tables", {}).get(p.kind)
    if isinstance(old, dict):
        base = old  # this device's earlier tune (or shipped entry)
    elif p.shipped:
        base = {}  # shipped data holds measurements of this GPU only
    else:  # first tune here: what auto used until now fills the buckets not measured
        base = data.lookup(data.tables("routing"), (p.kind, p.generation), "routing")
    table = tuned_table(doc, p, base)
    # The cache gets no generation alias: it would change other GPUs' fallback; the shipped data
    # gets one only if its generation has no table yet (`data.write`).
    data.write(p.target, p.kind, table, p.generation if p.shipped else None,
               comment=None if p.target.exists() else
               "Per-user routing, written by `python -m jax_attn tune`; read before jax_attn/data/routing.json.")
    autoselect.table.cache_clear()  # `data.write` cleared the loader's caches; this is autoselect's own
    return table


def report(doc: dict, table: dict, p: Plan) -> str:
    """What was measured, what failed or was cut, the orders written and `auto`'s picks."""
    from . import autoselect
    from .bench.suite import BUDGET_SKIP
    from .routing_writer import ROUTING_MODES, predicted_auto
    names = {v: k for k, v in MODES.items()}
    lines = []
    bad = [r for r in doc["results"] if r.get("status") in ("FAIL", "error")]
    cut = [r for r in doc["results"] if r.get("reason") == BUDGET_SKIP]
    ok = [r for r in doc["results"] if r.get("status") == "ok"]
    lines.append(f"measured {len(ok)} row(s) on {p.kind}: {len(p.shapes)} shape(s) x {len(p.backends)} backend(s) x "
                 f"{len(p.modes)} mode(s)")
    for r in bad:
        lines.append(f"  {r['status']}: {r['shape']} {r['dtype']} {r['impl']} {r['mode']}: {r.get('note', '')}")
    if cut:
        lines.append(f"  {len(cut)} row(s) not run: the --budget of {doc['meta'].get('budget')} s ended; their buckets "
                     "keep their earlier orders (rerun with a larger --budget or fewer shapes)")
    measured = {autoselect.bucket_key(doc["meta"]["device_key"], r["dtype"], r["d"], r["skv"]) for r in ok}
    lines.append("orders written (x: the backend's worst time over the fastest, over the bucket's shapes):")
    for mode in p.modes:
        key = autoselect.TABLE_KEYS[ROUTING_MODES[mode]]
        for bucket, order in table.get(key, {}).items():
            sc = table["scores"].get(bucket, {}).get(mode, {})
            if bucket not in measured or not sc:
                continue
            ranked = " > ".join(f"{n} x{sc[n]['worst']:.2f}" if n in sc else n for n in order)  # worst ratio
            lines.append(f"  {names[mode]:9s} {bucket}: {ranked}")
    for bucket, order in table.get(autoselect.TABLE_KEYS["lossy"], {}).items():
        sc = {**table["scores"].get(bucket, {}).get("fwd", {}),
              **table["scores"].get(bucket, {}).get("fwd_lossy", {})}
        if bucket in measured and sc:
            ranked = " > ".join(f"{n} x{sc[n]['worst']:.2f}" if n in sc else n for n in order)
            lines.append(f"  auto+8bit {bucket}: {ranked}")
    inherited = table.get("source", {}).get("inherited")
    if inherited:
        lines.append(f"kept from before (not measured now): {', '.join(inherited['buckets'])}"
                     + (f" (measured on {inherited['device']})" if inherited.get("device") else ""))
    lines.append("auto's picks with this table (per shape and mode):")
    lines.append(predicted_auto(doc, table))
    return "\n".join(lines)


def verify(p: Plan, table: dict) -> list[str]:
    """Warnings when `auto` in this process would not read what was just written."""
    from . import autoselect, data
    data.clear_cache()
    autoselect.table.cache_clear()
    warnings = []
    if os.environ.get("JAX_ATTN_BACKEND", "auto").strip() not in ("", "auto"):
        warnings.append(f"JAX_ATTN_BACKEND={os.environ['JAX_ATTN_BACKEND']} is set: it overrides auto")
    if p.shipped:
        return warnings
    if pathlib.Path(autoselect.TABLE_PATH).resolve() != data.path("routing"):
        warnings.append(f"autoselect.TABLE_PATH points at {autoselect.TABLE_PATH}: auto reads that, not the cache")
    elif autoselect.routing_table().get("source", {}).get("date") != table["source"].get("date"):
        warnings.append("auto does not read the table just written (another cache directory?)")
    return warnings


def run(args) -> int:
    """Handler of `jax-attn tune`."""
    from . import data
    p = plan(args)
    if args.expect_device and p.kind != args.expect_device:
        print(f"tune: this device is {p.kind!r}, not {args.expect_device!r} (--expect-device); nothing measured")
        return 2
    print(p.describe())
    if args.dry_run:
        return 0
    if not p.backends:
        print("tune: no backend to measure")
        return 2
    t0 = time.perf_counter()
    doc = measure(p, args)
    doc["meta"].update(quick=bool(args.quick), budget=args.budget, tool="jax-attn tune")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(doc, indent=1, default=str) + "\n")
    if not any(r.get("status") == "ok" for r in doc["results"]):
        print("tune: nothing was measured; nothing written")
        return 1
    table = write(doc, p)
    print(report(doc, table, p))
    print(f"written: {p.target} under {p.kind!r} ({time.perf_counter() - t0:.0f} s)"
          + ("" if p.shipped else f"; auto reads it first (remove the file, or its {p.kind!r} entry, to undo)"))
    for w in verify(p, table):
        log.warning("tune: %s", w)
    data.clear_cache()
    from .bench.report import is_lossy
    # a lossy backend failing the float64 gate is an expected outcome (it is then not written)
    return 1 if any(r.get("status") == "FAIL" and not is_lossy(r["impl"]) for r in doc["results"]) else 0
