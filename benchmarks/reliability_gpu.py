"""GPU timings for the reliability round: what each fix costs, and what the window saves.

Each row times one call against its peer in the same process (bf16, `(b, n, s, d)`, median of
jitted calls after warm-up; forward, or forward+backward through q, k, v [and the bias]):
- window: `pallas` (Triton kernels skip key blocks outside the window) and `cudnn` (its sliding
  window) against the same call without a window;
- padding: a call with `kv_lengths` as `attention_forward` runs it (keys no query sees are zeroed
  first) against the same backend on inputs that skip that step;
- bias gradient: forward+backward also through a float bias against through q, k, v only.

    PYTHONPATH=. python benchmarks/reliability_gpu.py --json $OUT/reliability.json
"""
from __future__ import annotations

import argparse
import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

import jax_attn
from jax_attn import routing
from jax_attn.bench import environment
from jax_attn.bench.timing import median_ms
from jax_attn.inputs import AttentionInputs

log = logging.getLogger(__name__)


def arrays(rng, b, n, sq, skv, d, dtype=jnp.bfloat16):
    def normal(*shape):
        return jnp.asarray(rng.standard_normal(shape, np.float32), dtype)
    return normal(b, n, sq, d), normal(b, n, skv, d), normal(b, n, skv, d)


def timed(fn, q, k, v, extra=(), grad=False):
    """ms of `fn(q, k, v, *extra)` (forward) or of its gradient through every argument."""
    if grad:
        argnums = tuple(range(3 + len(extra)))
        f = jax.jit(jax.grad(lambda *a: jnp.sum(fn(*a).astype(jnp.float32)), argnums=argnums))
    else:
        f = jax.jit(fn)
    return median_ms(f, q, k, v, *extra, repeats=20, warmup=2)


def unzeroed(backend, **kw):
    """`attention_forward` minus the padding step: the backend on the inputs as given."""
    def call(q, k, v):
        inputs = AttentionInputs.build(q, k, v, local_blocks=True, **kw)
        return routing.choose(inputs.spec, backend)(inputs)
    return call


def row(group, case, backend, mode, baseline, base_ms, ms):
    return {"group": group, "case": case, "backend": backend, "mode": mode, "baseline": baseline,
            "baseline_ms": base_ms, "ms": ms, "ratio": ms / base_ms}


def window_rows(rng):
    """Block skipping on 16k tokens: a window against the same call without one."""
    q, k, v = arrays(rng, 1, 16, 16384, 16384, 64)
    out = []
    for backend, windows in (("pallas", [(256, 256), (1024, 0)]), ("cudnn", [(1024, 0)])):
        for w in windows:
            causal = w[1] == 0
            for grad in (False, True):
                base = timed(lambda q, k, v: jax_attn.attention_forward(
                    q, k, v, backend=backend, is_causal=causal), q, k, v, grad=grad)
                ms = timed(lambda q, k, v: jax_attn.attention_forward(
                    q, k, v, backend=backend, is_causal=causal, local_window_size=w), q, k, v, grad=grad)
                out.append(row("window", f"1x16x16384 d64, window {w}", backend, "fwd+bwd" if grad else "fwd",
                               "causal" if causal else "full", base, ms))
    return out


def padding_rows(rng):
    """Zeroing keys no query sees, for self- and cross-attention with kv_lengths."""
    out = []
    for label, skv, lengths in (("self 2x10x4096 d64", 4096, [4096, 3000]),
                                ("cross 2x10x4096x77 d64", 77, [77, 12])):
        q, k, v = arrays(rng, 2, 10, 4096, skv, 64)
        kl = jnp.asarray(lengths, jnp.int32)
        for backend in ("pallas", "cudnn"):
            for grad in (False, True):
                base = timed(unzeroed(backend, kv_lengths=kl), q, k, v, grad=grad)
                ms = timed(lambda q, k, v: jax_attn.attention_forward(q, k, v, kv_lengths=kl, backend=backend),
                           q, k, v, grad=grad)
                out.append(row("padding", f"{label}, kv_lengths", backend, "fwd+bwd" if grad else "fwd",
                               "not zeroed", base, ms))
    return out


def bias_rows(rng):
    """Forward+backward through a per-key or full bias too, against through q, k, v only."""
    q, k, v = arrays(rng, 2, 10, 4096, 4096, 64)
    out = []
    for label, shape in (("per-key (2,1,1,4096)", (2, 1, 1, 4096)), ("full (1,10,4096,4096)", (1, 10, 4096, 4096))):
        bias = jnp.asarray(rng.standard_normal(shape, np.float32), jnp.bfloat16)
        for backend in ("pallas", "cudnn"):
            def fn(q, k, v, b=bias, backend=backend):
                return jax_attn.attention_forward(q, k, v, attn_mask=b, backend=backend)
            base = timed(fn, q, k, v, grad=True)
            ms = timed(fn, q, k, v, extra=(bias,), grad=True)
            out.append(row("bias grad", f"2x10x4096 d64, bias {label}", backend, "fwd+bwd", "q, k, v only",
                           base, ms))
    return out


GROUPS = (window_rows, padding_rows, bias_rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", help="write the rows and the environment here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    rng = np.random.default_rng(0)
    results = []
    for group in tqdm(GROUPS, desc="reliability timings", unit="group"):
        try:
            results += group(rng)
        except Exception as e:  # one failing group must not hide the others' numbers
            log.error("%s failed: %s: %s", group.__name__, type(e).__name__, str(e).splitlines()[0][:300])
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": environment(), "rows": results}, f, indent=1)
    print(f"{'group':10s} {'case':42s} {'backend':7s} {'mode':8s} {'baseline':12s} {'base ms':>8s} "
          f"{'ms':>8s} {'ratio':>6s}")
    for r in results:
        print(f"{r['group']:10s} {r['case']:42s} {r['backend']:7s} {r['mode']:8s} {r['baseline']:12s} "
              f"{r['baseline_ms']:8.3f} {r['ms']:8.3f} {r['ratio']:6.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
