"""Ulysses sequence parallelism: sequence shards -> head shards -> local attention -> back.

One `all_to_all` turns sequence shards into head shards, each device attends over the whole
sequence for `n / P` heads, and a second `all_to_all` turns the result back. Needs the heads (per
batch/head shard) divisible by the axis size `P` (k/v heads of GQA/MQA are repeated until they
split). Masks and `kv_lengths` apply unchanged, since each device sees every key; segment ids
(int32 `(b, s/P)` per device, a few bytes a token) are all-gathered to the whole sequence. Two collectives
per call, whatever `P`: the cheaper method when the head count allows it.

`inner` replaces the local call on the head shards: the hybrid method (`hybrid.py`) runs a ring
there, over a second mesh axis, on sequence chunks that are then only part of the sequence.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from .layout import _axes, _local, _run


def _ulysses(spec, axis, n_seq, q, k, v, mask, kv_lengths, backend, return_lse, inner=None,
             segments=None):
    seq, head = _axes(spec.layout)
    n_kv = k.shape[head]
    if n_kv % n_seq:  # GQA/MQA with too few k/v heads: repeat each until they split evenly
        groups = q.shape[head] // n_kv
        r = next(r for r in range(1, groups + 1) if groups % r == 0 and (n_kv * r) % n_seq == 0)
        k, v = jnp.repeat(k, r, axis=head), jnp.repeat(v, r, axis=head)

    def to_heads(x):
        return jax.lax.all_to_all(x, axis, split_axis=head, concat_axis=seq, tiled=True)

    q, k, v = to_heads(q), to_heads(k), to_heads(v)
    if segments is not None:  # the ids of the sequence the heads now span
        segments = tuple(jax.lax.all_gather(x, axis, axis=1, tiled=True) for x in segments)
    if inner is None:
        out, lse = _run(_local(spec, q, k, v, mask, kv_lengths, segments=segments), backend, return_lse)
    else:
        out, lse = inner(q, k, v, mask, kv_lengths, segments)
    out = jax.lax.all_to_all(out, axis, split_axis=seq, concat_axis=head, tiled=True)
    if lse is not None:
        lse = jax.lax.all_to_all(lse, axis, split_axis=2, concat_axis=1, tiled=True)
    return out, lse
