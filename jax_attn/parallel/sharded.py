"""Wrapping one `attention_forward` call in `shard_map`, as a plan lays it over the mesh.

`_sharded` checks that batch, heads (and for Ulysses the heads per group) divide over their axes,
builds the PartitionSpecs of q, k, v, mask, `kv_lengths` and segment ids, and runs the local
backend (`shard_local`), `_ulysses`, `_ring` or `_hybrid` per device. Sequences that do not
divide by the device count are padded at the end to a multiple of it; the padded keys are masked
with `kv_lengths` and the padded query rows sliced off. `_manual` is the same dispatch for a
caller already inside its own `shard_map` (`sequence_parallel(None, ...)`), where the arrays are
the local blocks.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from ..inputs import AttentionInputs
from ..arrays import pad_to
from .layout import _axes, _local, _run, _spec_entry
from .hybrid import _hybrid
from .ring import _ring
from .ulysses import _ulysses

if TYPE_CHECKING:
    from .context import Plan


def _shard_map(f, mesh, in_specs, out_specs):
    """`jax.shard_map` (JAX >= 0.7), else the older `jax.experimental.shard_map`.

    Replication checks are off: backends run custom kernels and custom VJPs the checker cannot see
    through. Inputs not split over an axis still get their cotangents summed over it.
    """
    if hasattr(jax, "shard_map"):
        try:
            return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
        except TypeError:  # a JAX whose jax.shard_map predates the check_vma name
            pass
    from jax.experimental.shard_map import shard_map
    return shard_map(f, mesh, in_specs, out_specs, check_rep=False)


def _sharded(plan: Plan, inputs: AttentionInputs, backend, return_lse):
    spec = inputs.spec
    seq, head = _axes(spec.layout)
    hybrid = plan.method == "hybrid"
    n_u = plan.size(plan.seq_axis)  # the Ulysses (or only) sequence axis
    n_r = plan.size(plan.ring_axis) if hybrid else 1
    n_seq = n_u * n_r  # sequence blocks
    n_batch, n_head = plan.size(plan.batch_axis), plan.size(plan.head_axis)
    where = "shard_local" if plan.method == "local" else f"sequence_parallel({plan.method!r})"
    if spec.batch % n_batch:
        raise ValueError(f"{where}: batch {spec.batch} does not divide over batch_axis "
                         f"{plan.batch_axis!r} of size {n_batch}")
    if spec.heads % n_head or spec.kv_heads % n_head:
        raise ValueError(f"{where}: heads (q {spec.heads}, k/v {spec.kv_heads}) do not divide over "
                         f"head_axis {plan.head_axis!r} of size {n_head}")
    if plan.method in ("ulysses", "hybrid") and (spec.heads // n_head) % n_u:
        raise ValueError(f"sequence_parallel({plan.method!r}): {spec.heads // n_head} heads per device group "
                         f"do not divide over {plan.seq_axis!r} of size {n_u}; use method='ring'")
    if plan.method == "local" and plan.seq_axis is not None and spec.is_causal:
        raise ValueError("shard_local(query_axis=...): is_causal needs each query's position against "
                         "whole keys; use sequence_parallel for causal attention")

    # Pad sequences to a multiple of the device count; padded keys are masked by kv_lengths.
    sq_pad = -(-spec.q_len // n_seq) * n_seq
    kv_split = plan.method != "local"
    skv_pad = -(-spec.kv_len // n_seq) * n_seq if kv_split else spec.kv_len
    q, k, v = pad_to(inputs.q, seq, sq_pad), pad_to(inputs.k, seq, skv_pad), pad_to(inputs.v, seq, skv_pad)
    kv_lengths = inputs.kv_lengths
    if skv_pad != spec.kv_len:
        kv_lengths = (jnp.full((spec.batch,), spec.kv_len, jnp.int32) if kv_lengths is None
                      else jnp.minimum(kv_lengths, spec.kv_len))
    mask = inputs.mask
    if mask is not None:  # neutral padding: padded keys are masked anyway, padded rows dropped
        neutral = True if spec.mask_kind == "bool" else 0
        if mask.shape[2] > 1:
            mask = pad_to(mask, 2, sq_pad, neutral)
        if mask.shape[3] > 1:
            mask = pad_to(mask, 3, skv_pad, neutral)

    b_ax, h_ax, s_ax, r_ax = plan.batch_axis, plan.head_axis, plan.seq_axis, plan.ring_axis
    # Hybrid: ring major, so that each Ulysses group's blocks are one contiguous chunk.
    seq_entry = _spec_entry(r_ax, s_ax) if hybrid else _spec_entry(s_ax)

    def dims(batch, heads, seqlen):
        d = [None] * 4
        d[0], d[head], d[seq] = batch, heads, seqlen
        return P(*d)

    q_spec = dims(_spec_entry(b_ax), _spec_entry(h_ax), seq_entry)
    kv_spec = dims(_spec_entry(b_ax), _spec_entry(h_ax), seq_entry if kv_split else None)
    lse_spec = P(_spec_entry(b_ax), _spec_entry(h_ax), seq_entry)
    args, specs = {"q": q, "k": k, "v": v}, {"q": q_spec, "k": kv_spec, "v": kv_spec}
    if mask is not None:
        # Each device's mask is what its local call sees: Ulysses (and hybrid) split heads over the
        # Ulysses axis and keep every query row (hybrid: the ring's query chunk); ring and local
        # split query rows; key columns stay whole (the ring slices each key block's columns).
        mb, mn, mq, _ = mask.shape
        mask_heads = _spec_entry(h_ax, s_ax) if plan.method in ("ulysses", "hybrid") else _spec_entry(h_ax)
        mask_rows = {"ulysses": None, "hybrid": _spec_entry(r_ax)}.get(plan.method, _spec_entry(s_ax))
        args["mask"] = mask
        specs["mask"] = P(_spec_entry(b_ax) if mb > 1 else None, mask_heads if mn > 1 else None,
                          mask_rows if mq > 1 else None, None)
    if kv_lengths is not None:
        args["kv_lengths"] = kv_lengths
        specs["kv_lengths"] = P(_spec_entry(b_ax))
    if inputs.segments is not None:
        # Padded rows are sliced off and padded keys masked by kv_lengths: any id serves.
        args["segments"] = (pad_to(inputs.q_segment_ids, 1, sq_pad), pad_to(inputs.kv_segment_ids, 1, skv_pad))
        specs["segments"] = (P(_spec_entry(b_ax), seq_entry), P(_spec_entry(b_ax), seq_entry if kv_split else None))

    def body(a):
        lq, lk, lv, lm, ll = a["q"], a["k"], a["v"], a.get("mask"), a.get("kv_lengths")
        segs = a.get("segments")
        if plan.method == "local":
            return _run(_local(spec, lq, lk, lv, lm, ll, segments=segs), backend, return_lse)
        if plan.method == "ulysses":
            return _ulysses(spec, s_ax, n_seq, lq, lk, lv, lm, ll, backend, return_lse, segments=segs)
        if hybrid:
            return _hybrid(spec, s_ax, n_u, r_ax, n_r, lq, lk, lv, lm, ll, backend, return_lse, segs)
        return _ring(spec, s_ax, n_seq, lq, lk, lv, lm, ll, backend, return_lse, segs)

    out_specs = (q_spec, lse_spec if return_lse else None)
    fn = _shard_map(body, plan.mesh, (specs,), out_specs)
    out, lse = fn(args)
    if sq_pad != spec.q_len:
        out = jax.lax.slice_in_dim(out, 0, spec.q_len, axis=seq)
        lse = None if lse is None else lse[:, :, :spec.q_len]
    return (out, lse) if return_lse else out


def _manual(plan: Plan, inputs: AttentionInputs, backend, return_lse):
    """Inside the caller's own shard_map: the inputs are already this device's sequence blocks."""
    if plan.method == "local":
        return None
    spec, axis = inputs.spec, plan.seq_axis
    if inputs.mask is not None and (spec.mask_shape[2] > 1 or spec.mask_shape[3] > 1):
        raise ValueError("sequence_parallel(None, ...): inside a shard_map only masks constant along "
                         "the sequence are accepted (use kv_lengths, or give the mesh so masks can be "
                         "split with the sequence)")
    n_seq = _axis_size(axis)
    if plan.method in ("ulysses", "hybrid") and spec.heads % n_seq:
        raise ValueError(f"sequence_parallel({plan.method!r}): {spec.heads} heads do not divide over "
                         f"{axis!r} of size {n_seq}; use method='ring'")
    args = (inputs.q, inputs.k, inputs.v, inputs.mask, inputs.kv_lengths, backend, return_lse)
    segs = inputs.segments  # the local blocks' ids, like q, k, v
    if plan.method == "hybrid":  # the caller's blocks must be laid ring major, as `_sharded` does
        out, lse = _hybrid(spec, axis, n_seq, plan.ring_axis, _axis_size(plan.ring_axis), *args, segs)
    elif plan.method == "ulysses":
        out, lse = _ulysses(spec, axis, n_seq, *args, segments=segs)
    else:
        out, lse = _ring(spec, axis, n_seq, *args, segs)
    return (out, lse) if return_lse else out


def _axis_size(axis):
    return jax.lax.axis_size(axis) if hasattr(jax.lax, "axis_size") else jax.lax.psum(1, axis)
