"""End to end: one denoising step of realistic diffusion models, with each attention implementation.

What a user decides by: how much faster a whole model step gets, not one attention call. Models
(random weights, bf16, `jax_attn.models`):
- `dit`: a Flux-sized DiT (`JointDiT`: hidden 3072, 24 heads of 128, 19 joint text+image blocks,
  3.3B parameters), batch 1, 512 text tokens with 4096 (1024x1024 px) and 16384 (2048x2048 px)
  image tokens;
- `unet`: an SDXL-sized UNet (`UNet`, 2.6B parameters) at 1024x1024 px (latent 128x128), batch 2
  (a classifier-free-guidance pair), 77 text tokens of width 2048.
Steps: `fwd` (inference: the model's forward) and `train` (the loss's forward and backward, the
gradients of every weight, no optimizer update; the DiT recomputes each block in the backward
pass, as large-DiT training does, so 16k tokens fit with any implementation).

Each model's attention is a function argument, so the same weights run with every implementation
(`IMPLS`) and with a stand-in that does no attention (`q + mean over keys of (k + v)`: the output
shape of attention, and it keeps the q/k/v projections live). Attention share =
(step - stand-in step) / step: the time attention itself adds, its layout copies included, the
projections around it excluded.

Timing: compile (lower + compile) and the first run are timed and reported apart; then the median
of `--runs` runs, each ended by `block_until_ready`. One program per model, size, step and
implementation; the programs of one (model, size, step) are compiled concurrently
(`--compile-workers`), so a program's compile seconds are wall time shared with the others; the
transformer blocks run under `lax.scan`, so compile time does not grow with depth. A `--budget-s`
stops starting new groups (forward steps run first).

Writes `end_to_end.json` and `end_to_end.md` to `--out` (or `$OUT`); prints the table last.
`--quick`: tiny models on any device, in seconds (the tests run it on the CPU).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import logging
import os
import pathlib
import statistics
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from tqdm import tqdm

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run from a checkout
import jax_attn  # noqa: E402
from jax_attn.arrays import random_normal  # noqa: E402
from jax_attn.bench.device_info import environment  # noqa: E402
from jax_attn.models.dit_large import JointDiT, JointDiTConfig  # noqa: E402
from jax_attn.models.unet import UNet, UNetConfig  # noqa: E402

log = logging.getLogger("end_to_end")

FULL_DIT_DEPTH = 19  # the depth the DiT numbers are about; a shallower run says so, and scales
BASELINE = "jax.nn"
STANDIN = "stand-in"


# ---- attention implementations, all (b, s, n, d) -> (b, s, n, d) ------------------------------
def _on_gpu() -> str | None:
    return None if jax.default_backend() == "gpu" else "needs an NVIDIA GPU"


def _jax_attn_backend(name: str) -> Callable[[], str | None]:
    def reason():
        if name == "pallas" and _on_gpu():  # on a CPU it is the interpret-mode test path only
            return _on_gpu()
        return None if name in jax_attn.available_backends() else f"backend {name!r} unavailable here"
    return reason


@dataclasses.dataclass(frozen=True)
class Impl:
    fn: Callable
    unavailable: Callable[[], str | None]  # a reason, or None when it can run here
    default: bool  # in the default set


IMPLS = {
    "jax.nn": Impl(lambda q, k, v: jax.nn.dot_product_attention(q, k, v), lambda: None, True),
    "jax.nn-cudnn": Impl(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="cudnn"),
                         _on_gpu, True),
    "jax-attn-auto": Impl(lambda q, k, v: jax_attn.attention_forward(q, k, v, layout="bsnd"),
                          lambda: None, True),
    "jax-attn-pallas": Impl(lambda q, k, v: jax_attn.attention_forward(q, k, v, layout="bsnd",
                                                                       backend="pallas"),
                            _jax_attn_backend("pallas"), False),
    "jax-attn-cudnn": Impl(lambda q, k, v: jax_attn.attention_forward(q, k, v, layout="bsnd",
                                                                      backend="cudnn"),
                           _jax_attn_backend("cudnn"), False),
}


def standin_attention(q, k, v):
    """No attention: attention's output shape and dtype, k and v still used (so still computed)."""
    return q + jnp.mean(k + v, axis=1, keepdims=True)


# ---- workloads ---------------------------------------------------------------------------------
@dataclasses.dataclass
class Workload:
    model: str  # "dit" | "unet"
    size: str  # label of the input size
    inputs: tuple  # model inputs after the weights
    target: jax.Array  # the training loss's target
    attention: list  # [{kind, b, sq, skv, n, d, count}] per forward
    call_kw: dict  # extra keyword arguments of the model call, per step kind


def dit_config(args) -> JointDiTConfig:
    if args.quick:
        return JointDiTConfig(hidden=64, heads=4, depth=2, in_channels=16, text_dim=32)
    return JointDiTConfig(depth=args.dit_depth)


def unet_config(args) -> UNetConfig:
    if args.quick:
        return UNetConfig(sample_size=16, channels=(32, 64), transformer_depth=(1, 1),
                          layers_per_block=1, dim_head=16, context_dim=32, groups=8)
    return UNetConfig()


def dit_workloads(cfg: JointDiTConfig, args, key) -> list[Workload]:
    n_txt = 16 if args.quick else args.text_tokens
    out = []
    for n_img in args.dit_tokens:
        k1, k2, k3, key = jax.random.split(key, 4)
        img = random_normal(k1, (1, n_img, cfg.in_channels), cfg.dtype)
        txt = random_normal(k2, (1, n_txt, cfg.text_dim), cfg.dtype)
        s = n_img + n_txt
        out.append(Workload(
            "dit", f"{n_img} img + {n_txt} txt tokens", (img, txt, jnp.full((1,), 500.0)),
            random_normal(k3, img.shape, jnp.float32),
            [dict(kind="joint self", b=1, sq=s, skv=s, n=cfg.heads, d=cfg.dim_head, count=cfg.depth)],
            {"fwd": {}, "train": {"remat": True}}))
    return out


def unet_workloads(cfg: UNetConfig, args, key) -> list[Workload]:
    n_txt, b = (8 if args.quick else 77), 2
    k1, k2, k3 = jax.random.split(key, 3)
    lat = random_normal(k1, (b, cfg.sample_size, cfg.sample_size, cfg.in_channels), cfg.dtype)
    ctx = random_normal(k2, (b, n_txt, cfg.context_dim), cfg.dtype)
    px = cfg.sample_size * 8
    return [Workload("unet", f"{px}x{px} px, latent {cfg.sample_size}x{cfg.sample_size}, b={b}",
                     (lat, jnp.full((b,), 500.0), ctx), random_normal(k3, lat.shape, jnp.float32),
                     cfg.attention_calls(b, n_txt), {"fwd": {}, "train": {}})]


# ---- measuring ---------------------------------------------------------------------------------
def step_fn(graphdef, step: str, attn_fn, call_kw: dict):
    """The program to time: `f(weights, *inputs)` (fwd) or `f(weights, inputs, target)` (train)."""
    def forward(weights, *inputs):
        return nnx.merge(graphdef, weights)(*inputs, attn_fn=attn_fn, **call_kw)

    if step == "fwd":
        return forward

    def loss(weights, inputs, target):
        pred = forward(weights, *inputs)
        return jnp.mean(jnp.square(pred.astype(jnp.float32) - target))

    return jax.value_and_grad(loss)


def compile_group(programs: list, workers: int) -> list:
    """Lower each `(fn, args)` in turn (tracing is Python), then compile them `workers` at a time
    (XLA compiles outside the GIL). Returns `(compiled, seconds)` or the exception, per program."""
    def one(lowered, t_lower):
        t0 = time.perf_counter()
        try:
            return lowered.compile(), t_lower + time.perf_counter() - t0
        except Exception as e:  # reported in the program's row
            return e

    jobs = []
    for fn, args in programs:
        t0 = time.perf_counter()
        try:
            jobs.append((jax.jit(fn).lower(*args), time.perf_counter() - t0))
        except Exception as e:  # a backend refusing a shape fails here, at trace time
            jobs.append(e)
    with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
        futures = [j if isinstance(j, Exception) else pool.submit(one, *j) for j in jobs]
        return [f if isinstance(f, Exception) else f.result() for f in futures]


def time_compiled(compiled, args: tuple, runs: int) -> dict:
    """The first run, then the median of `runs` timed runs (ms), each synchronized."""
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    first_s = time.perf_counter() - t0
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
    row = {"status": "ok", "ms": statistics.median(times) * 1e3, "min_ms": min(times) * 1e3,
           "max_ms": max(times) * 1e3, "runs": runs, "first_run_s": first_s}
    try:
        row["temp_gib"] = compiled.memory_analysis().temp_size_in_bytes / 2 ** 30
    except Exception:  # not every platform reports it; informative only
        pass
    return row


def _error(e: BaseException) -> str:
    text = str(e).strip()
    return f"error: {type(e).__name__}: {text.splitlines()[0][:200] if text else ''}"


def auto_choices(attention: list) -> list[str]:
    """What jax-attn `auto` runs for each attention shape (inference / training)."""
    out = []
    for a in attention:
        q = jax.ShapeDtypeStruct((a["b"], a["sq"], a["n"], a["d"]), jnp.bfloat16)
        kv = jax.ShapeDtypeStruct((a["b"], a["skv"], a["n"], a["d"]), jnp.bfloat16)
        try:
            d = jax_attn.explain(q, kv, kv, layout="bsnd")
            out.append(f"{a['kind']} (b={a['b']}, s={a['sq']}, skv={a['skv']}, n={a['n']}, d={a['d']}): "
                       f"{d.forward_only or d.backend} (fwd) / {d.backend} (train)")
        except Exception as e:  # an explanation is informative only
            out.append(f"{a['kind']}: explain failed: {e}")
    return out


def plan(args, workloads: dict) -> list[tuple]:
    """Groups `(model, workload, step, impls)` in run order: forward steps first (a budget cut
    drops training first), the stand-in first in each group."""
    impls = [STANDIN] + args.impls
    return [(m, w, step, impls) for step in args.steps for m in args.models for w in workloads[m]]


def build(cls, cfg, seed: int):
    """`(graphdef, weights)` of a randomly initialized model, made by one compiled program
    (built op by op, a 2.6B-parameter model dispatches thousands of small programs). The weights
    only need realistic scale, so the key is the cheap `unsafe_rbg` generator, not threefry
    (whose hundreds of draws took XLA's CPU compiler 2.5x as long)."""
    def make():
        return cls(cfg, rngs=nnx.Rngs(jax.random.key(seed, impl="unsafe_rbg")))

    graphdef = nnx.graphdef(nnx.eval_shape(make))
    weights = jax.jit(lambda: nnx.state(make()))()
    return graphdef, weights


def run(args) -> dict:
    t_start = time.perf_counter()
    env = environment()
    log.info("device %s, jax %s", env.get("device"), env.get("jax"))
    skipped = {name: IMPLS[name].unavailable() for name in args.impls}
    skipped = {k: v for k, v in skipped.items() if v}
    args.impls = [n for n in args.impls if n not in skipped]
    for name, why in skipped.items():
        log.info("not run: %s (%s)", name, why)

    models, workloads = {}, {}
    key = jax.random.key(args.seed)
    for m in args.models:
        t0 = time.perf_counter()
        cfg = dit_config(args) if m == "dit" else unet_config(args)
        graphdef, weights = build(JointDiT if m == "dit" else UNet, cfg, args.seed)
        n_params = sum(x.size for x in jax.tree.leaves(weights))
        key, sub = jax.random.split(key)
        workloads[m] = (dit_workloads if m == "dit" else unet_workloads)(cfg, args, sub)
        jax.block_until_ready(weights)
        models[m] = dict(graphdef=graphdef, weights=weights, config=dataclasses.asdict(cfg),
                         params=n_params, init_s=time.perf_counter() - t0)
        log.info("%s: %.1fM parameters, built in %.1f s", m, n_params / 1e6, models[m]["init_s"])

    rows, groups = [], plan(args, workloads)
    for m, w, step, impls in tqdm(groups, desc="end-to-end", unit="group", file=sys.stderr):
        group = [dict(model=m, size=w.size, step=step, impl=impl) for impl in impls]
        rows += group
        if time.perf_counter() - t_start > args.budget_s:
            for row in group:
                row["status"] = f"skipped: past the {args.budget_s:.0f} s budget"
            continue
        weights = models[m]["weights"]
        call_args = (weights,) + w.inputs if step == "fwd" else (weights, w.inputs, w.target)
        fns = [step_fn(models[m]["graphdef"], step,
                       standin_attention if impl == STANDIN else IMPLS[impl].fn, w.call_kw[step])
               for impl in impls]
        t0 = time.perf_counter()
        built = compile_group([(fn, call_args) for fn in fns], args.compile_workers)
        log.info("%s %s %s: %d programs compiled in %.1f s", m, w.size, step, len(fns),
                 time.perf_counter() - t0)
        for row, b in zip(group, built):
            if isinstance(b, Exception):
                row["status"] = _error(b)
                log.warning("%s %s %s %s failed to compile: %s", m, w.size, step, row["impl"], row["status"])
                continue
            compiled, row["compile_s"] = b
            try:
                row.update(time_compiled(compiled, call_args, args.runs))
                log.info("%s %s %s %s: %.2f ms", m, w.size, step, row["impl"], row["ms"])
            except Exception as e:  # out of memory at run time: a row, not a crash
                row["status"] = _error(e)
                log.warning("%s %s %s %s failed: %s", m, w.size, step, row["impl"], row["status"])
            del compiled  # frees the executable before the next one runs
    add_ratios(rows)
    return {
        "environment": env, "quick": args.quick, "runs": args.runs,
        "compile_workers": args.compile_workers, "budget_s": args.budget_s,
        "models": {m: {k: v for k, v in d.items() if k not in ("graphdef", "weights")}
                   for m, d in models.items()},
        "attention": {m: {w.size: dict(calls=w.attention, auto=auto_choices(w.attention))
                          for w in ws} for m, ws in workloads.items()},
        "not_run": skipped, "rows": rows, "total_s": time.perf_counter() - t_start,
        "full_dit_depth": FULL_DIT_DEPTH,
    }


def add_ratios(rows: list[dict]) -> None:
    """Speedup vs jax.nn and attention share (vs the stand-in), per (model, size, step)."""
    groups = {}
    for r in rows:
        groups.setdefault((r["model"], r["size"], r["step"]), {})[r["impl"]] = r
    for g in groups.values():
        base, stand = g.get(BASELINE, {}).get("ms"), g.get(STANDIN, {}).get("ms")
        for impl, r in g.items():
            if "ms" not in r or impl == STANDIN:
                continue
            if base:
                r["speedup_vs_jax_nn"] = base / r["ms"]
            if stand:
                # Not clamped: a negative share says attention costs less than the timing noise.
                r["attention_share"] = (r["ms"] - stand) / r["ms"]


# ---- report ------------------------------------------------------------------------------------
def _f(x, spec, none="—"):
    return none if x is None else format(x, spec)


def table(doc: dict) -> str:
    depth = doc["models"].get("dit", {}).get("config", {}).get("depth")
    scale = depth and not doc["quick"] and depth != doc["full_dit_depth"]
    head = ["model", "size", "step", "attention", "step ms", "vs jax.nn", "attention share",
            "compile s", "first run s"]
    if scale:
        head.insert(5, f"est. ms at {doc['full_dit_depth']} blocks")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in doc["rows"]:
        if r.get("status") != "ok":
            cells = [r["model"], r["size"], r["step"], r["impl"], r["status"]] + [""] * (len(head) - 5)
        else:
            impl = "stand-in (no attention)" if r["impl"] == STANDIN else r["impl"]
            cells = [r["model"], r["size"], r["step"], impl, _f(r["ms"], ".2f"),
                     _f(r.get("speedup_vs_jax_nn"), ".2f") + ("x" if "speedup_vs_jax_nn" in r else ""),
                     _f(100 * r["attention_share"], ".0f") + "%" if "attention_share" in r else "—",
                     _f(r["compile_s"], ".1f"), _f(r["first_run_s"], ".2f")]
            if scale:
                est = r["ms"] * doc["full_dit_depth"] / depth if r["model"] == "dit" else None
                cells.insert(5, _f(est, ".1f", ""))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def notes(doc: dict) -> str:
    env = doc["environment"]
    lines = [f"# End-to-end diffusion step, {env['date']}", "",
             f"Device: {env.get('gpu') or env.get('device')} ({env.get('platform')}); "
             f"jax {env.get('jax')}, jaxlib {env.get('jaxlib', '?')}, cuDNN {env.get('jax_cudnn', 'n/a')}"
             + (f", driver {env['driver']}" if "driver" in env else "") + ".", ""]
    for m, d in doc["models"].items():
        lines.append(f"- `{m}`: {d['params'] / 1e6:,.1f}M parameters, {d['config']['dtype']}, "
                     f"random weights; config {json.dumps(d['config'])}")
    if "dit" in doc["models"] and not doc["quick"]:
        depth = doc["models"]["dit"]["config"]["depth"]
        if depth != doc["full_dit_depth"]:
            lines.append(f"- The DiT ran {depth} blocks; the est. column scales its whole step by "
                         f"{doc['full_dit_depth']}/{depth} (embeddings and output layer are <1% of it).")
    lines += [
        "- step: `fwd` = one forward of the model (one denoising step, one model call); `train` = "
        "the loss's forward + backward, gradients of all weights, no optimizer update (DiT: each "
        "block recomputed in the backward pass).",
        f"- step ms: median of {doc['runs']} timed runs, each ended by `block_until_ready`; compile "
        "and the first run are timed apart and not included (compile s: lower + compile, wall time "
        f"while up to {doc['compile_workers']} programs of the group compiled at once).",
        "- vs jax.nn: step time of `jax.nn.dot_product_attention` (default implementation, which is "
        "XLA's) over this row's.",
        "- attention share: (step - stand-in step) / step, where the stand-in replaces every "
        "attention call by `q + mean over keys of (k + v)` (same output shape, q/k/v projections "
        "still computed). It is the time attention adds to the step (below 0: within timing noise).",
        f"- not run: {', '.join(f'{k} ({v})' for k, v in doc['not_run'].items()) or 'none'}.",
        "", "Attention calls per forward, and what jax-attn `auto` picks (inference / training):"]
    for m, sizes in doc["attention"].items():
        for size, a in sizes.items():
            calls = "; ".join(f"{c['count']}x {c['kind']} (b={c['b']}, sq={c['sq']}, skv={c['skv']}, "
                              f"n={c['n']}, d={c['d']})" for c in a["calls"])
            lines.append(f"- {m}, {size}: {calls}")
            lines += [f"  - auto: {x}" for x in a["auto"]]
    lines.append(f"\nTotal wall time {doc['total_s']:.0f} s.")
    return "\n".join(lines)


def write(doc: dict, out: pathlib.Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "end_to_end.json").write_text(json.dumps(doc, indent=1, default=str))
    (out / "end_to_end.md").write_text(notes(doc) + "\n\n" + table(doc) + "\n")
    log.info("wrote %s and %s", out / "end_to_end.json", out / "end_to_end.md")


# ---- CLI ---------------------------------------------------------------------------------------
def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny models, seconds on a CPU (tests)")
    p.add_argument("--out", default=os.environ.get("OUT"), help="folder for end_to_end.{json,md}")
    p.add_argument("--models", default="dit,unet", help="comma-separated: dit, unet")
    p.add_argument("--steps", default=None, help="comma-separated: fwd, train (default both; quick: fwd)")
    p.add_argument("--impls", default="default",
                   help=f"comma-separated of {', '.join(IMPLS)}; 'default' = "
                        f"{', '.join(n for n, i in IMPLS.items() if i.default)}; 'all'")
    p.add_argument("--dit-tokens", type=_ints, default=[4096, 16384], help="image tokens, comma-separated")
    p.add_argument("--text-tokens", type=int, default=512)
    p.add_argument("--dit-depth", type=int, default=FULL_DIT_DEPTH)
    p.add_argument("--runs", type=int, default=None, help="timed runs per program (default 5; quick 2)")
    p.add_argument("--budget-s", type=float, default=270.0,
                   help="start no new measurement after this many seconds")
    p.add_argument("--compile-workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="programs of one group compiled at once (1 = one after another)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    # Quick mode is the test's smoke run: training programs would triple its compile time on a CPU.
    args.steps = [s for s in (args.steps or ("fwd" if args.quick else "fwd,train")).split(",") if s]
    if set(args.models) - {"dit", "unet"} or set(args.steps) - {"fwd", "train"}:
        p.error("--models takes dit, unet; --steps takes fwd, train")
    if args.impls == "default":
        args.impls = [n for n, i in IMPLS.items() if i.default]
    elif args.impls == "all":
        args.impls = list(IMPLS)
    else:
        args.impls = [n for n in args.impls.split(",") if n]
        if bad := sorted(set(args.impls) - set(IMPLS)):
            p.error(f"unknown --impls {bad}; known: {', '.join(IMPLS)}")
    if BASELINE not in args.impls:
        args.impls.insert(0, BASELINE)  # every speedup is against it
    if args.quick:
        args.dit_tokens = [64]
    if args.runs is None:
        args.runs = 2 if args.quick else 5
    return args


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = parse_args(argv)
    doc = run(args)
    if args.out:
        write(doc, pathlib.Path(args.out))
    print(notes(doc) + "\n")
    print(table(doc), flush=True)
    return 0 if any(r.get("status") == "ok" for r in doc["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
