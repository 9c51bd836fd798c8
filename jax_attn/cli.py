"""`python -m jax_attn` / `jax-attn`: `info`, `check`, `bench` and `tune`."""
from __future__ import annotations

import argparse
import concurrent.futures
import functools
import json
import logging
import os
import platform as py_platform
import sys

import jax
import jax.numpy as jnp

from . import cases as case_data  # `cases` names lists of them below
from . import reference
from .api import attention_forward, available_backends
from .backends import BACKENDS
from .cases import CASES, Case  # noqa: F401  (`cli.CASES`, as before)
from .contract import validate

log = logging.getLogger(__name__)


def _versions() -> dict:
    out = {"python": py_platform.python_version(), "jax": jax.__version__}
    try:
        import jaxlib
        out["jaxlib"] = jaxlib.__version__
    except ImportError:
        pass
    for mod in ("flax", "torch"):
        try:
            out[mod] = __import__(mod).__version__
        except ImportError:
            out[mod] = "not installed"
    try:
        from jax._src.lib import cuda_versions
        if cuda_versions and jax.default_backend() == "gpu":
            out["cudnn"] = str(cuda_versions.cudnn_get_version())
    except Exception:
        pass
    return out


def _table(rows, headers) -> str:
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(headers)]
    fmt = "  ".join(f"{{:{w}}}" for w in widths)
    return "\n".join([fmt.format(*headers), fmt.format(*("-" * w for w in widths))]
                     + [fmt.format(*map(str, r)) for r in rows])


def cmd_info(args) -> int:
    for k, v in _versions().items():
        print(f"{k:8s} {v}")
    print("devices ", ", ".join(f"{d.platform}:{d.device_kind}" for d in jax.devices()))
    rows = []
    for name, b in BACKENDS.items():
        why = b.unavailable()
        rows.append((name, "yes" if not why else "no", "; ".join(why) or b.description))
    print()
    print(_table(rows, ("backend", "available", "why not / what")))
    return 0


def _median_ms(fn, *xs) -> float:
    """`check`'s timing column: a rough figure beside the errors, so few samples (the package's
    one timer, `jax_attn.bench.timing`)."""
    from .bench.timing import median_ms
    return median_ms(fn, *xs, repeats=5, warmup=1)


@functools.lru_cache(maxsize=None)
def _reference(case: Case, dtype: str, seed: int):
    """Inputs (`jax_attn.cases.inputs`, as jnp) and float64 reference results for one case, shared
    by every backend checked on it."""
    q, k, v, kw = case_data.inputs(case, dtype, seed, jnp.asarray)
    d_out = jnp.asarray(case_data.output_cotangent(case, seed), dtype)
    ref, ref_lse, ref_grads = case_data.expected(case, q, k, v, d_out, **kw)
    return (q, k, v, kw), (ref, ref_lse, ref_grads, d_out)


def compile_case(name: str, case: Case, dtype: str, seed: int = 0):
    """Compile backend `name`'s forward (with lse) and gradient for `case`; returns a function that
    runs them against the float64 reference and gives the result row. Compiling is the slow part
    and releases the GIL, so `check` compiles its cases on several threads."""
    row = {"backend": name, "case": case.name, "dtype": dtype}
    swap = (lambda x: jnp.swapaxes(x, 1, 2)) if case.layout == "bsnd" else (lambda x: x)
    (q, k, v, kw), (ref, ref_lse, ref_grads, d_out) = _reference(case, dtype, seed)  # q, k, v in bnsd
    spec = validate(*map(swap, (q, k, v)), **kw)
    why = BACKENDS[name].reasons(spec)
    if why:
        return lambda: {**row, "status": "skip", "note": "; ".join(why)}
    crashed = lambda e: {**row, "status": "FAIL", "note": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"}

    def run(q, k, v, bias=None, **extra):  # bnsd in and out, whatever layout the backend is given
        args = kw if bias is None else {**kw, "attn_mask": bias}
        res = attention_forward(swap(q), swap(k), swap(v), backend=name, **args, **extra)
        return (swap(res[0]), res[1]) if extra else swap(res)

    # Differentiated: q, k, v, and the float bias when the case has one.
    diff = (q, k, v) + ((kw["attn_mask"],) if case.bias_grad else ())
    try:
        fwd = jax.jit(lambda q, k, v: run(q, k, v, return_lse=True)).lower(q, k, v).compile()
        grad = jax.jit(jax.grad(lambda *a: jnp.sum(run(*a).astype(jnp.float32) * d_out),
                                argnums=tuple(range(len(diff))))).lower(*diff).compile()
    except Exception as e:  # a crash is a failure, reported with its message
        error = e  # the except clause unbinds `e` on leaving; the lambda runs later
        return lambda: crashed(error)

    def evaluate() -> dict:
        try:
            out, lse = fwd(q, k, v)
            grads = grad(*diff)
        except Exception as e:  # noqa: BLE001
            return crashed(e)
        out_err = reference.relative_error(out, ref)
        lse_err = reference.relative_error(lse, ref_lse)
        grad_err = max(reference.relative_error(g, r) for g, r in zip(grads, ref_grads))
        tol = reference.TOLERANCE[dtype]
        ok = out_err <= tol and lse_err <= tol and grad_err <= 2 * tol
        return {**row, "status": "pass" if ok else "FAIL", "out_err": out_err, "lse_err": lse_err,
                "grad_err": grad_err, "tol": tol, "fwd_ms": _median_ms(fwd, q, k, v),
                "fwd_bwd_ms": _median_ms(grad, *diff), "note": "bias grad checked" if case.bias_grad else ""}

    return evaluate


def _check_dtypes(args) -> tuple[str, ...]:
    default = ("float32",) if jax.default_backend() == "cpu" else ("bfloat16", "float16", "float32")
    return tuple(args.dtype or default)


def cmd_check(args) -> int:
    from tqdm import tqdm

    on_cpu = jax.default_backend() == "cpu"
    dtypes = _check_dtypes(args)
    names = args.backends.split(",") if args.backends else available_backends()
    unknown = [n for n in names if n not in BACKENDS]
    if unknown:
        print(f"--backends: unknown {unknown}; known: {', '.join(BACKENDS)}", file=sys.stderr)
        return 2
    cases = [c.scaled(args.shrink or (8 if on_cpu else 1)) for c in CASES]
    jobs = [(n, c, dt) for dt in dtypes for c in cases for n in names]
    for c in cases:  # the references first, one per case and dtype, so threads only compile
        for dt in dtypes:
            _reference(c, dt, args.seed)
    # Compile on threads, then run and time one case at a time so timings do not overlap.
    with concurrent.futures.ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        pending = [pool.submit(compile_case, n, c, dt, args.seed) for n, c, dt in jobs]
        results = []
        with tqdm(zip(jobs, pending), total=len(jobs), desc="check", unit="run", disable=args.quiet) as bar:
            for (n, c, dt), compiled in bar:
                bar.set_postfix_str(f"{n} | {c.name} | {dt}")  # a slow compile shows where it is
                results.append(compiled.result()())
    results += _torch_rows(cases, args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"versions": _versions(), "devices": [str(d) for d in jax.devices()],
                       "results": results}, f, indent=1)
    fmt = lambda r, key: f"{r[key]:.1e}" if key in r else ""
    ms = lambda r, key: f"{r[key]:.2f}" if key in r else ""
    rows = [(r["backend"], r["case"], r["dtype"], r["status"], fmt(r, "out_err"), fmt(r, "grad_err"),
             fmt(r, "tol"), ms(r, "fwd_ms"), ms(r, "fwd_bwd_ms"), r.get("note", "")[:90]) for r in results]
    print(_table(rows, ("backend", "case", "dtype", "status", "out err", "grad err", "tol", "fwd ms",
                        "fwd+bwd ms", "note")))
    failed = [r for r in results if r["status"] == "FAIL"]
    print(f"\n{len(results) - len(failed)} passed or skipped, {len(failed)} failed")
    return 1 if failed else 0


def _torch_rows(cases, args) -> list:
    """Rows comparing `torch_ref` with the float64 reference, when torch is installed."""
    if args.no_torch:
        return []
    try:
        from torch_ref.check import compare_with_reference
    except ImportError as e:
        log.info("check: torch_ref comparison skipped (%s)", e)
        return []
    return compare_with_reference(cases, seed=args.seed, dtypes=_check_dtypes(args))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="jax-attn", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, devices and which backends this machine has")
    p = sub.add_parser("check", help="every available backend vs the float64 reference")
    p.add_argument("--backends", help="comma-separated backends (default: all available)")
    p.add_argument("--dtype", action="append", choices=("float32", "bfloat16", "float16"),
                   help="dtype to check (repeatable; default float32 on CPU, all three on GPU)")
    p.add_argument("--shrink", type=int, help="divide the sequence lengths by this (default 8 on CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the results here")
    p.add_argument("--no-torch", action="store_true", help="skip the torch_ref comparison")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    try:
        from . import bench, tune
        bench.add_parser(sub)
        tune.add_parser(sub)
    except ImportError as e:
        log.debug("bench and tune commands unavailable: %s", e)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if args.command == "info":
        return cmd_info(args)
    if args.command == "check":
        return cmd_check(args)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
