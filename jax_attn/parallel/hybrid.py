"""Ulysses x ring over two mesh axes: all-to-all within a group of devices, a ring across groups.

The sequence is split over `(ring_axis, ulysses_axis)`, ring major: the device at ring index r and
Ulysses index u holds sequence block `r * U + u`. Ulysses' all-to-all over `ulysses_axis` gathers
the U blocks of its group, which are contiguous, so every device then holds sequence chunk r
(`s / R` positions) for `n / U` heads; ring attention over `ring_axis` runs on those chunks (its
block index is r, which is what its causal skipping and `kv_lengths` offsets need), and the
second all-to-all returns sequence blocks. Heads must divide by U only, not by U x R, and the
ring has R steps, not U x R: the all-to-all stays on the fast links of a group (one host's
NVLink), the ring's point-to-point transfers cross the slower ones and overlap compute.
"""
from __future__ import annotations

from .ring import _ring
from .ulysses import _ulysses


def _hybrid(spec, u_axis, n_u, r_axis, n_r, q, k, v, mask, kv_lengths, backend, return_lse,
            segments=None):
    """Per device inside the shard_map: q, k, v are sequence block `r * n_u + u`.

    `mask`, when given, holds this device's heads (after the all-to-all) and query chunk r, with
    every key column: the ring slices the columns of each key block itself. `segments`, when
    given, are this device's ids, like q, k, v: Ulysses gathers them to chunk r, the ring rotates
    the key chunk's ids with its keys.
    """
    def ring(q, k, v, mask, kv_lengths, segments):
        return _ring(spec, r_axis, n_r, q, k, v, mask, kv_lengths, backend, return_lse, segments)

    return _ulysses(spec, u_axis, n_u, q, k, v, mask, kv_lengths, backend, return_lse, inner=ring,
                    segments=segments)
