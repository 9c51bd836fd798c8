"""One forward call of the Mosaic kernel or cuDNN, for Nsight Compute (no other GPU kernel runs).

    ncu --clock-control none --section SpeedOfLight --section WarpStateStats -c 1 \
        python benchmarks/profile_forward.py mosaic 1 40 16384 128

Inputs are made on the host and copied over, and the shape needs no padding, so the first
kernel launched is the attention kernel itself (`-c 1` profiles just that one).
"""
import sys

import jax
import jax.numpy as jnp
import numpy as np

from jax_attn.kernels import mosaic_attention

impl, b, n, s, d = sys.argv[1], *map(int, sys.argv[2:6])
x = jax.device_put(np.random.default_rng(0).standard_normal((b, s, n, d)).astype(jnp.bfloat16))
if impl == "mosaic":
    fn = jax.jit(lambda q, k, v: mosaic_attention.mosaic_attention(q, k, v, layout="bsnd"))
else:
    fn = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="cudnn"))
jax.block_until_ready(fn(x, x, x))
