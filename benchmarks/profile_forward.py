"""One attention call on the GPU, for Nsight Compute (no other attention kernel runs first).

    ncu --clock-control none --section SpeedOfLight --section WarpStateStats -c 1 \
        python benchmarks/profile_forward.py mosaic 1 40 16384 128 [fwd|bwd] [CONFIG]

`impl`: `mosaic` (our Hopper kernel, its default config), `cudnn` (through jax.nn), `fa4` (the
`fa4` backend: FlashAttention-4 through JAX; needs it installed, see fa4_install.sh; its first
call compiles, so profile with `-k regex:flash`), `sage` / `sage16` (the 8-bit backends; their
pre-pass kernels run first, so filter with `-k regex:mosaic`). `bwd` differentiates the call
(forward, then the backward's kernels: filter and count with `-k`/`-c`). Inputs are made on the
host and copied over, in (b, s, n, d), and the shape needs no padding, so for mosaic and cudnn
the first kernel launched is the forward itself (`-c 1` profiles just that one). `CONFIG`:
JSON of `MosaicConfig` fields changed from the head dim's default, e.g. '{"bwd_fused": true}'
for the one-kernel backward, or for sage / sage16 of `SageConfig` fields (then the kernel is
called directly, not through the backend), e.g. '{"block_kv": 128}'.
"""
import dataclasses
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

import jax_attn
from jax_attn.kernels import mosaic_attention

impl, b, n, s, d = sys.argv[1], *map(int, sys.argv[2:6])
mode = sys.argv[6] if len(sys.argv) > 6 else "fwd"
changes = {k: tuple(x) if isinstance(x, list) else x  # JSON lists: the tuple fields
           for k, x in (json.loads(sys.argv[7]) if len(sys.argv) > 7 else {}).items()}
x = jax.device_put(np.random.default_rng(0).standard_normal((b, s, n, d)).astype(jnp.bfloat16))
if impl == "mosaic":
    config = dataclasses.replace(mosaic_attention.default_config(d), **changes)
    attn = lambda q, k, v: mosaic_attention.mosaic_attention(q, k, v, layout="bsnd", config=config)  # noqa: E731
elif impl == "cudnn":
    attn = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="cudnn")  # noqa: E731
elif impl in ("sage", "sage16") and changes:  # a SageConfig other than the backend's
    from jax_attn.kernels import sage_attention
    config = dataclasses.replace(sage_attention.SageConfig(pv_bits=16 if impl == "sage16" else 8),
                                 **changes)
    attn = lambda q, k, v: sage_attention.sage_attention(q, k, v, layout="bsnd", config=config)  # noqa: E731
else:  # fa4, sage, sage16: through the library's backend of that name
    attn = lambda q, k, v: jax_attn.attention_forward(q, k, v, layout="bsnd", backend=impl)  # noqa: E731
if mode == "bwd":
    fn = jax.jit(jax.grad(lambda q, k, v: attn(q, k, v).astype(jnp.float32).sum(), argnums=(0, 1, 2)))
else:
    fn = jax.jit(attn)
jax.block_until_ready(fn(x, x, x))
