"""Helpers shared by the shard_map wrapping, Ulysses and the ring.

Mesh axis names and PartitionSpec entries, the sequence/head axes of a layout, padding, and
building and running one device's local attention call. A module of its own so that `sharded`
(which calls `ulysses` and `ring`) and those two (which use these) import without a cycle.
`seq`/`head` are the axes of q, k, v and out in the caller's layout.
"""
from __future__ import annotations

import jax.numpy as jnp

from ..backends.base import lse_without_gradient
from ..inputs import AttentionInputs
from ..routing import choose


def _names(axis) -> tuple[str, ...]:
    if axis is None:
        return ()
    return tuple(axis) if isinstance(axis, (tuple, list)) else (axis,)


def _spec_entry(*axes):
    """One PartitionSpec entry for a dimension split over `axes` (major first), or None."""
    names = sum((_names(a) for a in axes), ())
    return None if not names else names[0] if len(names) == 1 else names


def _axes(layout):
    return (2, 1) if layout == "bnsd" else (1, 2)


def _lse_col(lse, layout):
    """`(b, n, s)` lse as a column broadcastable against `out` in `layout`."""
    return (lse if layout == "bnsd" else jnp.swapaxes(lse, 1, 2))[..., None]


def _local(spec, q, k, v, mask, kv_lengths, is_causal=None, segments=None):
    """AttentionInputs for local blocks, keeping the call's scale and layout.

    `segments`: None, or the `(q_segment_ids, kv_segment_ids)` of exactly these query and key
    blocks (int32 `(b, s)`)."""
    q_ids, kv_ids = (None, None) if segments is None else segments
    return AttentionInputs.build(q, k, v, attn_mask=mask, kv_lengths=kv_lengths, scale=spec.scale,
                                 is_causal=spec.is_causal if is_causal is None else is_causal,
                                 layout=spec.layout, local_window_size=spec.window,
                                 q_segment_ids=q_ids, kv_segment_ids=kv_ids)


def _run(inputs, backend, return_lse):
    """`(out, lse | None)` of one device's local call. A backend whose lse has no gradient gets
    the same guard as a single-device call (`api.attention_forward`): differentiating that lse
    raises instead of reading as a constant."""
    run = choose(inputs.spec, backend)
    res = run(inputs, return_lse)
    if not return_lse:
        return res, None
    out, lse = res
    if not run.supports_lse_grad:
        lse = lse_without_gradient(run.name)(lse)
    return out, lse
