"""One forward call of an attention kernel, for Nsight Compute (no other GPU kernel runs first).

    ncu --clock-control none --section SpeedOfLight --section WarpStateStats -c 1 \
        python benchmarks/profile_forward.py mosaic 1 40 16384 128

`impl`: `mosaic` (our Hopper kernel, its default config), `cudnn` (through jax.nn), `fa4` (the
`fa4` backend: FlashAttention-4 through JAX; needs it installed, see fa4_install.sh; its first
call compiles, so profile with `-c 1 -k regex:flash` or skip the first launches). Inputs are made
on the host and copied over, in (b, s, n, d), and the shape needs no padding, so for mosaic and
cudnn the first kernel launched is the attention kernel itself (`-c 1` profiles just that one).
"""
import sys

import jax
import jax.numpy as jnp
import numpy as np

import jax_attn
from jax_attn.kernels import mosaic_attention

impl, b, n, s, d = sys.argv[1], *map(int, sys.argv[2:6])
x = jax.device_put(np.random.default_rng(0).standard_normal((b, s, n, d)).astype(jnp.bfloat16))
if impl == "mosaic":
    fn = jax.jit(lambda q, k, v: mosaic_attention.mosaic_attention(q, k, v, layout="bsnd"))
elif impl == "fa4":
    fn = jax.jit(lambda q, k, v: jax_attn.attention_forward(q, k, v, layout="bsnd", backend="fa4"))
else:
    fn = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="cudnn"))
jax.block_until_ready(fn(x, x, x))
