"""cuDNN through JAX in (b, n, s, d) and (b, s, n, d): does the layout explain torch's lead?

    PYTHONPATH=. python benchmarks/cudnn_layouts.py

In the round-9 bench torch cuDNN's training step ran 5-7% ahead of the `cudnn` backend at
d = 40 and 64. The bench hands JAX rows (b, n, s, d) arrays, which `cudnn` passes to XLA's
binding as `qkv_layout="BNTH"`. Here the same backend is timed, forward and forward+backward, on
the same data in both layouts: `bnsd` (BNTH), `bsnd` (BTNH), and `bnsd->bsnd`, which transposes
(b, n, s, d) inputs to (b, s, n, d) inside the program and the output back, as a wrapper would.
Each row is checked against `xla` on the same inputs first. One process, the best of three
repeats per row.
"""
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, "benchmarks")
from tune_pallas import time_ms  # noqa: E402

import jax_attn  # noqa: E402
from jax_attn.arrays import random_normal  # noqa: E402

SHAPES = [(2, 8, 4096, 40), (2, 10, 4096, 64), (1, 24, 4608, 128), (1, 40, 16384, 128)]
BACKEND = "cudnn"  # (a smoke run on a CPU sets "xla" and small SHAPES)


def variants():
    def attn(layout):
        return lambda q, k, v: jax_attn.attention_forward(q, k, v, layout=layout, backend=BACKEND)

    def via_bsnd(q, k, v):
        t = lambda x: jnp.swapaxes(x, 1, 2)  # noqa: E731
        return t(attn("bsnd")(t(q), t(k), t(v)))

    # name -> (the call, whether it takes (b, s, n, d) arrays)
    return {"bnsd": (attn("bnsd"), False), "bsnd": (attn("bsnd"), True),
            "bnsd->bsnd": (via_bsnd, False)}


def main():
    rows = []
    for b, n, s, d in SHAPES:
        keys = jax.random.split(jax.random.key(0), 4)
        bnsd = [random_normal(kk, (b, n, s, d), jnp.bfloat16) for kk in keys]
        bsnd = [jnp.swapaxes(x, 1, 2) for x in bnsd]
        ref = np.asarray(jax.jit(lambda q, k, v: jax_attn.attention_forward(
            q[:, :2], k[:, :2], v[:, :2], backend="xla"))(*bnsd[:3]), np.float32)
        for name, (fn, takes_bsnd) in variants().items():
            args = bsnd if takes_bsnd else bnsd
            fwd = jax.jit(fn)
            out = np.asarray(fwd(*args[:3]), np.float32)
            out = np.swapaxes(out, 1, 2) if takes_bsnd else out
            err = float(np.linalg.norm(out[:, :2] - ref) / np.linalg.norm(ref))
            fb = jax.jit(lambda q, k, v, do, fn=fn: jax.vjp(fn, q, k, v)[1](do))
            times = {"fwd": [], "fwd+bwd": []}
            for _ in range(3):  # the repeats show the spread
                times["fwd"].append(time_ms(fwd, *args[:3]))
                times["fwd+bwd"].append(time_ms(fb, *args, reps=10, inner=3))
            row = dict(shape=(b, n, s, d), layout=name, err=err,
                       fwd=min(times["fwd"]), fwd_bwd=min(times["fwd+bwd"]))
            rows.append(row)
            print(f"{b}x{n}x{s}x{d} {name:11s} err {err:.1e} fwd {row['fwd']:.3f} ms "
                  f"fwd+bwd {row['fwd_bwd']:.3f} ms  (all: {times})", flush=True)
    print("\n| shape | layout | fwd ms | fwd+bwd ms |\n|---|---|---|---|")
    for r in rows:
        print(f"| {'x'.join(map(str, r['shape']))} | {r['layout']} | {r['fwd']:.3f} | "
              f"{r['fwd_bwd']:.3f} |")


if __name__ == "__main__":
    main()
