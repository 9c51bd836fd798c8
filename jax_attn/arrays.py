"""Array helpers the backends, kernels and parallel paths share."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def pad_to(x, axis: int, size: int, value=0):
    """`x` padded at the end of `axis` with `value` up to `size` (unchanged when already that long);
    `value="edge"` repeats the last entry (sorted segment ids stay sorted)."""
    if x.shape[axis] >= size:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    if isinstance(value, str) and value == "edge":
        return jnp.pad(x, widths, mode="edge")
    return jnp.pad(x, widths, constant_values=value)


def random_normal(key, shape, dtype=jnp.float32):
    """Standard-normal samples drawn in float32, then rounded to `dtype`.

    `jax.random.normal(key, shape, jnp.bfloat16)` draws its uniforms with bfloat16's 8 bits: its
    samples take only 128 distinct values (none beyond 2.9, mean -0.012), and float16 only 1024.
    On such inputs a quantizer's rounding errors repeat instead of averaging out: the FP8 P V of
    `sage` measured a relative L1 of 0.13 against float64 where normal inputs give 0.04. Every
    benchmark and gate input goes through here."""
    return jax.random.normal(key, shape, jnp.promote_types(dtype, jnp.float32)).astype(dtype)
