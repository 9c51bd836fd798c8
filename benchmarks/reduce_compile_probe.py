"""Which program holds the XLA fusion that compiles for minutes at 16k tokens in the `sage` runs.

    PYTHONPATH=. python benchmarks/reduce_compile_probe.py [--out DIR] [--limit S] [b s n d]

On the H200 (rounds 7 and 8) the first 16k-token `sage` check of `benchmarks/sage_device.py`
spent 2 min 40 s compiling one `input_reduce_fusion`. That check compiles two programs: the
user's call (`sage_attention`, jitted) and the simulation it is checked against
(`quantization.sage_reference` on head 0, run op by op as the script does, its key loop a
`lax.scan`). The jnp pre-pass alone compiled at once there (round 7 timed it), so the candidates
are, each in its own process under `--limit` seconds with XLA's HLO dump on:

- `user`: `jax.jit(sage_attention)` at the default SageConfig, lowered and compiled only;
- `sim`: the simulation on head 0, as the script runs it;
- `sim_jit`: the same simulation under one `jax.jit`;
- `mean`, `amax`: K's smoothing mean and V's channel amax alone on head 0's shape (the
  reductions a user's pre-pass runs outside the kernels).

For each it prints the compile (or run) time, or that it ran past the limit; for the slow ones
it copies the optimized HLO modules holding an `input_reduce_fusion` under `--out`, so the
fusion can be read.
"""
import argparse
import glob
import os
import shutil
import subprocess
import sys
import time

CANDIDATES = ("user", "sim", "sim_jit", "mean", "amax")


def build(name, b, s, n, d):
    import jax
    import jax.numpy as jnp

    from jax_attn import quantization as Q
    from jax_attn.arrays import random_normal
    from jax_attn.kernels import sage_attention as S

    cfg = S.SageConfig()
    dp = S.head_dim_padded(d)
    cfg_r = cfg.resolved(dp)
    heads = n if name == "user" else 1
    keys = jax.random.split(jax.random.key(0), 3)
    q, k, v = (random_normal(kk, (b, s, heads, d), jnp.bfloat16) for kk in keys)
    t0 = time.time()
    if name == "user":
        spec = jax.ShapeDtypeStruct(q.shape, q.dtype)
        jax.jit(lambda a, b_, c: S.sage_attention(a, b_, c, layout="bsnd", config=cfg,
                                                  return_lse=True)).lower(spec, spec, spec).compile()
    elif name in ("sim", "sim_jit"):
        sim = lambda a, b_, c: Q.sage_reference(  # noqa: E731
            a, b_, c, layout="bsnd", block_q=cfg_r.block_q, block_k=cfg_r.block_kv,
            **S.sim_flags(cfg_r))
        out, _ = (jax.jit(sim) if name == "sim_jit" else sim)(q, k, v)
        out.block_until_ready()
    elif name == "mean":
        jax.jit(lambda x: Q.smoothing_mean(x, "bsnd")).lower(k).compile()
    elif name == "amax":
        jax.jit(lambda x: Q.v_channel_scale(x.astype(jnp.float32), 1)).lower(v).compile()
    return time.time() - t0


def _last_error(stderr):
    lines = stderr.strip().splitlines() or ["?"]
    return next((ln for ln in reversed(lines) if "Error" in ln), lines[-1])[:200]


def keep_reduce_modules(dump, out, name):
    """Copy the optimized modules of `dump` that hold an input_reduce_fusion to `out`/name."""
    kept = []
    for path in sorted(glob.glob(os.path.join(dump, "*after_optimizations.txt"))):
        with open(path) as f:
            if "input_reduce_fusion" in f.read():
                os.makedirs(os.path.join(out, name), exist_ok=True)
                shutil.copy(path, os.path.join(out, name))
                kept.append(os.path.basename(path))
    return kept


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("shape", nargs="*", type=int, default=[1, 16384, 24, 128])
    ap.add_argument("--out", default="/tmp/reduce_probe")
    ap.add_argument("--limit", type=float, default=60.0)
    ap.add_argument("--only", default=",".join(CANDIDATES))
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(f"{build(args.one, *args.shape):.1f}")
        return
    shape = [str(x) for x in args.shape]
    for name in args.only.split(","):
        dump = f"/tmp/reduce_probe_dump/{name}"
        shutil.rmtree(dump, ignore_errors=True)
        env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") +
                                          f" --xla_dump_to={dump} --xla_dump_hlo_as_text").strip())
        t0 = time.time()
        try:
            run = subprocess.run([sys.executable, __file__, "--one", name, *shape], env=env,
                                 timeout=args.limit, capture_output=True, text=True)
            res = (run.stdout.strip().splitlines() or ["?"])[-1] + " s" if run.returncode == 0 \
                else "error: " + _last_error(run.stderr)
            slow = time.time() - t0 > 30
        except subprocess.TimeoutExpired:
            res, slow = f"over {args.limit:.0f} s", True
        kept = keep_reduce_modules(dump, args.out, name) if slow else []
        print(f"{'x'.join(shape)} {name:8s} {res}" + (f"; kept {kept}" if kept else ""),
              flush=True)


if __name__ == "__main__":
    main()
