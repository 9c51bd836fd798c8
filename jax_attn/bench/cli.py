"""The `bench` command line: options, their parsing, and the handler that ties a run together.

`add_parser(subparsers)` registers `jax-attn bench` (handler `run`); `main(argv)` is
`python -m jax_attn.bench`. Both share `_add_arguments`, and `shape_arg` / `shape_sets_arg`
make bad `--shape` / `--shapes` values usage errors. The help text is the package docstring.
`run` runs the suite (or only rewrites the routing table), then writes and prints the results.
"""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import pathlib

from .report import _add_ratios, auto_summary, format_table, write_csv, write_plot
from ..routing_writer import predicted_auto, write_routing
from .shapes import SHAPE_SETS
from .suite import run_bench

log = logging.getLogger(__name__)


def _overview() -> str:
    """The package docstring: the description `--help` shows."""
    return importlib.import_module(__package__).__doc__


def shape_arg(text: str) -> tuple[int, ...]:
    """argparse `type=` of `--shape`: "B,N,SQ,SKV,D" (or "BxNxSQxSKVxD") -> five positive ints."""
    try:
        dims = tuple(int(x) for x in text.replace("x", ",").split(","))
    except ValueError:
        dims = ()
    if len(dims) != 5 or min(dims) < 1:
        raise argparse.ArgumentTypeError(f"expected B,N,SQ,SKV,D (five positive integers), got {text!r}")
    return dims


def shape_sets_arg(text: str) -> list[str]:
    """argparse `type=` of `--shapes`: comma-separated names of `SHAPE_SETS`."""
    names = [x.strip() for x in text.split(",")]
    unknown = [x for x in names if x not in SHAPE_SETS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown shape set(s) {', '.join(map(repr, unknown))}; "
                                         f"known: {', '.join(SHAPE_SETS)}")
    return names


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `bench` on an argparse sub-parser set; the handler is `args.run(args)`."""
    p = subparsers.add_parser("bench", help="time every backend (and torch SDPA) on named shapes",
                              description=_overview().split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(p)
    p.set_defaults(run=run)
    return p


def _add_arguments(p) -> None:
    g = p.add_argument_group("what to run")
    g.add_argument("--shapes", type=shape_sets_arg,
                   help=f"comma-separated shape sets: {', '.join(SHAPE_SETS)} "
                        "(default: diffusion on a GPU, tiny on a CPU)")
    g.add_argument("--shape", action="append", type=shape_arg, metavar="B,N,SQ,SKV,D",
                   help="an extra shape (repeatable)")
    g.add_argument("--dtype", choices=("bfloat16", "float16", "float32"),
                   help="override every shape's dtype (default: bfloat16 for sets and --shape on a GPU, "
                        "float32 on a CPU; the tiny set is float32)")
    g.add_argument("--backends", help="comma-separated: JAX backends, auto, tokamax (another JAX "
                                      "library's kernel, a peer row), torch-flash, torch-efficient, "
                                      "torch-cudnn, torch-math (torch SDPA's kernels), torch-fa4 "
                                      "(FlashAttention-4 through torch, where installed), or torch "
                                      "for all of these (default: everything available)")
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
                        "(default path: jax_attn/data/routing.json)")
    r.add_argument("--update-routing", metavar="RESULTS_JSON",
                   help="do not run: write the routing table from a saved --json results file "
                        "(to --routing-table, default jax_attn/data/routing.json)")
    r.add_argument("--routing-table", metavar="PATH", help="where --update-routing writes")
    r.add_argument("--recheck-auto", action="store_true",
                   help="with --write-routing: then time `auto` again, routed by the new table "
                        "(the first auto rows become auto-before)")
    r.add_argument("--recheck-budget", type=float, default=150.0,
                   help="seconds for --recheck-auto (default 150)")


def run(args) -> int:
    """Handler of `jax-attn bench`."""
    from .. import autoselect
    if args.update_routing:
        doc = json.loads(pathlib.Path(args.update_routing).read_text())
        table = write_routing(doc, args.routing_table)
        print(json.dumps({k: table[k] for k in autoselect.TABLE_KEYS.values() if k in table}, indent=1))
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
    parser = argparse.ArgumentParser(prog="jax-attn bench", description=_overview(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return run(args)
