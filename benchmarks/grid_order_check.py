"""Which Mosaic CTAs should run side by side: the two grid orders against cuDNN (one visit).

    PYTHONPATH=. python benchmarks/grid_order_check.py

`MosaicConfig.q_major_grid` False (heads side by side, the measured default) and True (the
sequence tiles of one head side by side, sharing its K/V or Q/dO in L2), forward and
forward+backward, beside cuDNN on the self-attention shapes. Each Mosaic output is checked
against cuDNN's first (relative error); times from `tune_pallas.time_ms`.
"""
import dataclasses
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from tune_pallas import time_ms  # noqa: E402

from jax_attn.kernels import mosaic_attention as M  # noqa: E402



def mosaic(cfg):
    return lambda q, k, v: M.mosaic_attention(q, k, v, layout="bsnd", config=cfg)


impls = {"cudnn": lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="cudnn")}
for b, n, s, d in [(1, 40, 16384, 128), (1, 24, 4608, 128), (2, 10, 4096, 64)]:
    keys = jax.random.split(jax.random.key(s + d), 4)
    q, k, v, do = (jax.random.normal(kk, (b, s, n, d), jnp.bfloat16) for kk in keys)
    default = M.default_config(d)
    impls["mosaic"] = mosaic(default)
    impls["mosaic_q_major"] = mosaic(dataclasses.replace(default, q_major_grid=True))
    ref = np.asarray(impls["cudnn"](q, k, v), np.float32)
    line = [f"{b},{n},{s},{d}"]
    for name, fn in impls.items():
        if name != "cudnn":
            got = np.asarray(fn(q, k, v), np.float32)
            line.append(f"{name} rel err vs cudnn {np.linalg.norm(got - ref) / np.linalg.norm(ref):.1e}")
        fwd = time_ms(jax.jit(fn), q, k, v)
        fb = time_ms(jax.jit(lambda q, k, v, do, fn=fn: jax.vjp(fn, q, k, v)[1](do)), q, k, v, do,
                     reps=5, inner=2)
        line.append(f"{name} fwd {fwd:.3f} bwd {fb - fwd:.3f} ms")
    print(" | ".join(line), flush=True)
