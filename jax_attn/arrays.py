"""Array helpers the backends, kernels and parallel paths share."""
from __future__ import annotations

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
