"""Attention timed as a model runs it: `n` calls inside one jitted program, each call's output the
next call's q, its q the next k and its k the next v (three distinct buffers, as in a model, and
no pre-pass work is loop-invariant, so XLA can hoist nothing), against
the same backends timed one jitted call at a time (what `sage_device.py --variants` does). The
difference is mostly what dispatching a program costs per call (inside a model's jitted step it
is paid once per step, not once per attention), mixed with cache effects: a buffer is read again
by the next three calls, and small shapes fit in L2 (as do the one-call timing's inputs, called
back to back). Repeated attention drives the inputs towards equal rows; the kernels' work does
not depend on the values.

    PYTHONPATH=. python benchmarks/in_jit_timing.py [--n 20] [--shapes 1,2,3]

Shapes are `sage_device.TIMED` (bsnd, bf16); prints one line per shape and backend, ms per call.
"""
from __future__ import annotations

import argparse
import logging
import pathlib
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import jax_attn  # noqa: E402
from jax_attn.arrays import random_normal  # noqa: E402
from sage_device import TIMED  # noqa: E402
from tune_pallas import time_ms  # noqa: E402

log = logging.getLogger("in_jit_timing")


def main():
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20, help="attention calls per jitted program")
    ap.add_argument("--shapes", default="1,2,3", help="sage_device.TIMED indices")
    ap.add_argument("--backends", default="sage,sage16,cudnn")
    args = ap.parse_args()
    for i in (int(x) for x in args.shapes.split(",")):
        b, n, sq, skv, d = TIMED[i]
        assert sq == skv, "q, k and v rotate through one shape: self-attention shapes only"
        qkv = tuple(random_normal(key, (b, sq, n, d), jnp.bfloat16)
                    for key in jax.random.split(jax.random.key(i), 3))
        ms = {}
        for name in args.backends.split(","):
            def attn(q, k, v, name=name):
                return jax_attn.attention_forward(q, k, v, layout="bsnd", backend=name)

            def step(_, c, attn=attn):
                return attn(*c), c[0], c[1]
            one = jax.jit(attn)
            loop = jax.jit(lambda *c, step=step: jax.lax.fori_loop(0, args.n, step, c))
            try:
                ms[name] = (time_ms(one, *qkv), time_ms(loop, *qkv, reps=10, inner=1) / args.n)
            except Exception as e:  # noqa: BLE001  (one backend failing must not stop the rest)
                log.info("%s %s: ERROR %s: %s", TIMED[i], name, type(e).__name__, str(e)[:300])
        base = ms.get("cudnn")
        for name, (single, inside) in ms.items():
            ratio = "" if base is None else (
                f"  vs cudnn {base[0] / single:.2f}x / {base[1] / inside:.2f}x")
            log.info("%-24s %-7s one call %.3f ms, inside one program %.3f ms per call%s",
                     "x".join(map(str, TIMED[i])), name, single, inside, ratio)


if __name__ == "__main__":
    main()
