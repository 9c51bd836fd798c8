"""Attention over several devices, on JAX's own SPMD machinery (`Mesh`, `shard_map`, collectives).

Inputs sharded over batch and/or heads (a `NamedSharding`, under `jit`) need no context: every
backend then runs shard-local with no all-gather of q, k, v, forward and backward. `xla`,
`chunked` and `naive` are plain jnp, which XLA's partitioner splits by itself; the `pallas` Triton
kernel carries its own `custom_partitioning` rules (`jax_attn/kernels/sharding.py`: batch/heads
stay split, GQA when the head shards divide `n_kv`, sequences and head dims gathered with a logged
warning); `cudnn` goes through JAX's cuDNN binding, which has partitioning rules of its own (batch
and heads only: JAX rejects sequence-sharded inputs there). Checked on 8 CPU devices by the
compiled HLO, under Shardy and GSPMD (tests/test_pallas_sharding.py; cudnn only by JAX's source).
The Mosaic GPU variant of `pallas` (`JAX_ATTN_PALLAS_KERNEL`) is not wrapped: give it
`shard_local`.

Two contexts change what `attention_forward` does with the arrays it is given; outside them it
costs one context-variable lookup and nothing else.

- `shard_local(mesh, batch_axis=..., head_axis=...)`: q, k, v (and masks, `kv_lengths`) are split
  over batch and/or heads; each device runs the chosen backend on its own shard inside
  `shard_map`: explicit, and it serves any kernel, including ones without partitioning rules.
  `query_axis=` also splits the queries along the sequence while keys and values stay whole on
  every device: cross-attention to text tokens in a sequence-parallel model (no backend's own
  rules do that: they gather a sharded sequence).
- `sequence_parallel(mesh, axis_name, method=...)`: q, k, v are split along the sequence over
  `axis_name` (and optionally over batch/heads as above).
  * "ulysses": one `all_to_all` turns sequence shards into head shards, each device attends over
    the whole sequence for `n / P` heads, and a second `all_to_all` turns the result back. Needs
    the heads (per batch/head shard) divisible by the axis size `P`. Masks and `kv_lengths` apply
    unchanged, since each device sees every key.
  * "ring": each device keeps its query block and the key/value blocks travel round the ring with
    `ppermute`; the per-block results are merged with their log-sum-exps. Works for any head
    count; memory per device stays O(s / P) in both directions (the backward is a second ring,
    carrying dk/dv with the blocks). Needs a local backend whose lse is differentiable for
    gradients (see `_grad_backend`).

Sequences that do not divide by the device count are padded at the end to a multiple of it; the
padded keys are masked with `kv_lengths` and the padded query rows sliced off.

`sequence_parallel(None, axis_name, ...)` is for code already inside a `shard_map` (or `pmap`)
over `axis_name`: the arrays given are then the local sequence blocks, all of one length.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import logging
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from .backends import BACKENDS, Needs
from .inputs import AttentionInputs
from .routing import choose, current_choice, decide

log = logging.getLogger(__name__)

METHODS = ("ulysses", "ring")
_context: contextvars.ContextVar = contextvars.ContextVar("jax_attn_parallel", default=None)
_logged: set = set()


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


def _names(axis) -> tuple[str, ...]:
    if axis is None:
        return ()
    return tuple(axis) if isinstance(axis, (tuple, list)) else (axis,)


def _spec_entry(*axes):
    """One PartitionSpec entry for a dimension split over `axes` (major first), or None."""
    names = sum((_names(a) for a in axes), ())
    return None if not names else names[0] if len(names) == 1 else names


@dataclasses.dataclass(frozen=True)
class Plan:
    """How the arrays of an `attention_forward` call are laid over a mesh.

    `method` is "local" (`shard_local`), "ulysses" or "ring" (`sequence_parallel`); `seq_axis`
    splits q, k, v along the sequence (queries only for "local"). `mesh` None means the caller is
    already inside a `shard_map` over `seq_axis`.
    """

    mesh: Any
    method: str
    seq_axis: Any = None
    batch_axis: Any = None
    head_axis: Any = None

    def size(self, axis) -> int:
        return math.prod(self.mesh.shape[a] for a in _names(axis))


@contextlib.contextmanager
def _use(plan: Plan):
    token = _context.set(plan)
    try:
        yield plan
    finally:
        _context.reset(token)


def _check_axes(mesh, **axes):
    if mesh is None:
        return
    used = []
    for what, axis in axes.items():
        for a in _names(axis):
            if a not in mesh.shape:
                raise ValueError(f"{what} {a!r} is not an axis of the mesh (axes: {', '.join(mesh.axis_names)})")
            if a in used:
                raise ValueError(f"mesh axis {a!r} is named twice; each may split one dimension")
            used.append(a)


def sequence_parallel(mesh, axis_name, method: str = "ulysses", *, batch_axis=None, head_axis=None):
    """Treat q, k, v of every `attention_forward` traced in this block as split along the sequence.

    Args:
      mesh: the `jax.sharding.Mesh` the arrays live on, or None when called inside a `shard_map`
        over `axis_name` (the arrays are then the local blocks).
      axis_name: the mesh axis (or tuple of axes) the sequence is split over, for q and k/v alike.
      method: "ulysses" (all-to-all to head shards; heads must divide by the axis size) or "ring"
        (k/v blocks passed round with `ppermute`, merged by log-sum-exp; any head count).
      batch_axis, head_axis: mesh axes the batch and heads are also split over (data/tensor
        parallelism); those dimensions must divide by the axis sizes.

    Any local backend serves each device's share (the `backend=` argument or `use_backend`
    context chooses it as usual, for the local shapes). Runs under `jit`; differentiable.
    Innermost context wins (also against `shard_local`).
    """
    if method not in METHODS:
        raise ValueError(f"sequence_parallel: method must be one of {METHODS}, got {method!r}")
    if axis_name is None:
        raise ValueError("sequence_parallel: axis_name names the mesh axis the sequence is split over")
    if mesh is None and (batch_axis is not None or head_axis is not None):
        raise ValueError("sequence_parallel: batch_axis/head_axis need a mesh (inside a shard_map the "
                         "arrays are already local)")
    _check_axes(mesh, axis_name=axis_name, batch_axis=batch_axis, head_axis=head_axis)
    return _use(Plan(mesh, method, axis_name, batch_axis, head_axis))


def shard_local(mesh, *, batch_axis=None, head_axis=None, query_axis=None):
    """Run every `attention_forward` traced in this block shard by shard, with no communication.

    q, k, v (and a mask or `kv_lengths` with those dimensions) are split over `batch_axis` and/or
    `head_axis` of `mesh`; each device calls the backend on its own shard inside `shard_map`.
    Batch/head-sharded inputs stay local without this too (XLA splits the jnp backends; the
    `pallas` Triton kernel and JAX's cuDNN binding have partitioning rules), so it matters for
    `query_axis`, for kernels without such rules (the Mosaic GPU variant of `pallas`), and to fix
    the split whatever sharding propagation would choose.
    `query_axis` splits the queries along the sequence too, with k/v whole on every device
    (cross-attention to a short text sequence in a sequence-parallel model); not with causal.
    """
    if batch_axis is None and head_axis is None and query_axis is None:
        raise ValueError("shard_local: name at least one of batch_axis, head_axis, query_axis")
    _check_axes(mesh, batch_axis=batch_axis, head_axis=head_axis, query_axis=query_axis)
    return _use(Plan(mesh, "local", query_axis, batch_axis, head_axis))


def current_plan() -> Plan | None:
    """The innermost `sequence_parallel` / `shard_local` plan in force, or None."""
    return _context.get()


def sequence_parallel_forward(inputs: AttentionInputs, backend, return_lse):
    """The multi-device result when a `sequence_parallel` or `shard_local` context is active, else None."""
    plan = _context.get()
    if plan is None:
        return None
    spec = inputs.spec
    split_seq = plan.method != "local" or plan.seq_axis is not None or plan.mesh is None
    if split_seq and (spec.window is not None or spec.has_q_lengths):
        raise ValueError("local_window_size and query_seq_lengths need whole sequences on each device: "
                         "they are not supported under sequence_parallel or shard_local(query_axis=...)")
    if plan.mesh is None:
        return _manual(plan, inputs, backend, return_lse)
    return _sharded(plan, inputs, backend, return_lse)


# ---------------------------------------------------------------------------------------------
# Layout helpers. `seq`/`head` are the axes of q, k, v and out in the caller's layout.

def _axes(layout):
    return (2, 1) if layout == "bnsd" else (1, 2)


def _pad(x, axis, size, value=0):
    if x.shape[axis] >= size:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths, constant_values=value)


def _lse_col(lse, layout):
    """`(b, n, s)` lse as a column broadcastable against `out` in `layout`."""
    return (lse if layout == "bnsd" else jnp.swapaxes(lse, 1, 2))[..., None]


def _local(spec, q, k, v, mask, kv_lengths, is_causal=None):
    """AttentionInputs for local blocks, keeping the call's scale and layout."""
    return AttentionInputs.build(q, k, v, attn_mask=mask, kv_lengths=kv_lengths, scale=spec.scale,
                                 is_causal=spec.is_causal if is_causal is None else is_causal,
                                 layout=spec.layout, local_window_size=spec.window)


def _run(inputs, backend, return_lse):
    res = choose(inputs.spec, backend)(inputs, return_lse)
    return res if return_lse else (res, None)


# ---------------------------------------------------------------------------------------------
# Wrapping a call in shard_map.

def _sharded(plan: Plan, inputs: AttentionInputs, backend, return_lse):
    spec = inputs.spec
    seq, head = _axes(spec.layout)
    n_seq = plan.size(plan.seq_axis)
    n_batch, n_head = plan.size(plan.batch_axis), plan.size(plan.head_axis)
    where = "shard_local" if plan.method == "local" else f"sequence_parallel({plan.method!r})"
    if spec.batch % n_batch:
        raise ValueError(f"{where}: batch {spec.batch} does not divide over batch_axis "
                         f"{plan.batch_axis!r} of size {n_batch}")
    if spec.heads % n_head or spec.kv_heads % n_head:
        raise ValueError(f"{where}: heads (q {spec.heads}, k/v {spec.kv_heads}) do not divide over "
                         f"head_axis {plan.head_axis!r} of size {n_head}")
    if plan.method == "ulysses" and (spec.heads // n_head) % n_seq:
        raise ValueError(f"sequence_parallel('ulysses'): {spec.heads // n_head} heads per device group "
                         f"do not divide over {plan.seq_axis!r} of size {n_seq}; use method='ring'")
    if plan.method == "local" and plan.seq_axis is not None and spec.is_causal:
        raise ValueError("shard_local(query_axis=...): is_causal needs each query's position against "
                         "whole keys; use sequence_parallel for causal attention")

    # Pad sequences to a multiple of the device count; padded keys are masked by kv_lengths.
    sq_pad = -(-spec.q_len // n_seq) * n_seq
    kv_split = plan.method != "local"
    skv_pad = -(-spec.kv_len // n_seq) * n_seq if kv_split else spec.kv_len
    q, k, v = _pad(inputs.q, seq, sq_pad), _pad(inputs.k, seq, skv_pad), _pad(inputs.v, seq, skv_pad)
    kv_lengths = inputs.kv_lengths
    if skv_pad != spec.kv_len:
        kv_lengths = (jnp.full((spec.batch,), spec.kv_len, jnp.int32) if kv_lengths is None
                      else jnp.minimum(kv_lengths, spec.kv_len))
    mask = inputs.mask
    if mask is not None:  # neutral padding: padded keys are masked anyway, padded rows dropped
        neutral = True if spec.mask_kind == "bool" else 0
        if mask.shape[2] > 1:
            mask = _pad(mask, 2, sq_pad, neutral)
        if mask.shape[3] > 1:
            mask = _pad(mask, 3, skv_pad, neutral)

    b_ax, h_ax, s_ax = plan.batch_axis, plan.head_axis, plan.seq_axis

    def dims(batch, heads, seqlen):
        d = [None] * 4
        d[0], d[head], d[seq] = batch, heads, seqlen
        return P(*d)

    q_spec = dims(_spec_entry(b_ax), _spec_entry(h_ax), _spec_entry(s_ax))
    kv_spec = dims(_spec_entry(b_ax), _spec_entry(h_ax), _spec_entry(s_ax) if kv_split else None)
    lse_spec = P(_spec_entry(b_ax), _spec_entry(h_ax), _spec_entry(s_ax))
    args, specs = {"q": q, "k": k, "v": v}, {"q": q_spec, "k": kv_spec, "v": kv_spec}
    if mask is not None:
        mb, mn, mq, _ = mask.shape
        mask_heads = _spec_entry(h_ax, s_ax) if plan.method == "ulysses" else _spec_entry(h_ax)
        args["mask"] = mask
        specs["mask"] = P(_spec_entry(b_ax) if mb > 1 else None, mask_heads if mn > 1 else None,
                          _spec_entry(s_ax) if mq > 1 and plan.method != "ulysses" else None, None)
    if kv_lengths is not None:
        args["kv_lengths"] = kv_lengths
        specs["kv_lengths"] = P(_spec_entry(b_ax))

    def body(a):
        lq, lk, lv, lm, ll = a["q"], a["k"], a["v"], a.get("mask"), a.get("kv_lengths")
        if plan.method == "local":
            return _run(_local(spec, lq, lk, lv, lm, ll), backend, return_lse)
        if plan.method == "ulysses":
            return _ulysses(spec, s_ax, n_seq, lq, lk, lv, lm, ll, backend, return_lse)
        return _ring(spec, s_ax, n_seq, lq, lk, lv, lm, ll, backend, return_lse)

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
    n_seq = jax.lax.axis_size(axis) if hasattr(jax.lax, "axis_size") else jax.lax.psum(1, axis)
    if plan.method == "ulysses" and spec.heads % n_seq:
        raise ValueError(f"sequence_parallel('ulysses'): {spec.heads} heads do not divide over "
                         f"{axis!r} of size {n_seq}; use method='ring'")
    fn = _ulysses if plan.method == "ulysses" else _ring
    out, lse = fn(spec, axis, n_seq, inputs.q, inputs.k, inputs.v, inputs.mask, inputs.kv_lengths,
                  backend, return_lse)
    return (out, lse) if return_lse else out


# ---------------------------------------------------------------------------------------------
# Ulysses: sequence shards -> head shards -> local attention -> back.

def _ulysses(spec, axis, n_seq, q, k, v, mask, kv_lengths, backend, return_lse):
    seq, head = _axes(spec.layout)
    n_kv = k.shape[head]
    if n_kv % n_seq:  # GQA/MQA with too few k/v heads: repeat each until they split evenly
        groups = q.shape[head] // n_kv
        r = next(r for r in range(1, groups + 1) if groups % r == 0 and (n_kv * r) % n_seq == 0)
        k, v = jnp.repeat(k, r, axis=head), jnp.repeat(v, r, axis=head)

    def to_heads(x):
        return jax.lax.all_to_all(x, axis, split_axis=head, concat_axis=seq, tiled=True)

    q, k, v = to_heads(q), to_heads(k), to_heads(v)
    out, lse = _run(_local(spec, q, k, v, mask, kv_lengths), backend, return_lse)
    out = jax.lax.all_to_all(out, axis, split_axis=seq, concat_axis=head, tiled=True)
    if lse is not None:
        lse = jax.lax.all_to_all(lse, axis, split_axis=2, concat_axis=1, tiled=True)
    return out, lse


# ---------------------------------------------------------------------------------------------
# Ring: k/v blocks go round; each step's (out, lse) is merged into the running result.

@dataclasses.dataclass(frozen=True)
class _Ring:
    spec: Any  # the global call's Spec (scale, layout, mask kind, causal)
    axis: Any
    n: int  # devices on the ring
    q_block: int
    k_block: int
    backend: Any

    def kinds(self):
        """Step variants, indexed by `kind_index`."""
        if not self.spec.is_causal:
            return ("full",)
        if self.q_block == self.k_block:
            return ("full", "diag", "skip")
        return ("offset", "skip")

    def kind_index(self, i, j):
        """Which variant query block i against key block j needs (traced ints)."""
        if not self.spec.is_causal:
            return None
        if self.q_block == self.k_block:
            return jnp.where(j < i, 0, jnp.where(j == i, 1, 2))
        hidden = j * self.k_block > i * self.q_block + self.q_block - 1
        return jnp.where(hidden, 1, 0)

    def perm(self):
        return [(d, (d + 1) % self.n) for d in range(self.n)]

    def block(self, mask, kv_lengths, j):
        """The mask columns and kv_lengths of key block j, in block coordinates."""
        if mask is not None and mask.shape[3] > 1:
            mask = jax.lax.dynamic_slice_in_dim(mask, j * self.k_block, self.k_block, 3)
        if kv_lengths is not None:
            kv_lengths = jnp.clip(kv_lengths - j * self.k_block, 0, self.k_block).astype(jnp.int32)
        return mask, kv_lengths

    def step(self, kind, q, k, v, mask, kv_lengths, i, j, backend=None):
        """`(out, lse)` of query block i against key block j for one variant."""
        spec = self.spec
        if kind == "skip":
            seq, head = _axes(spec.layout)
            shape = list(q.shape[:-1]) + [v.shape[-1]]
            lse_shape = (q.shape[0], q.shape[head], q.shape[seq])
            return jnp.zeros(shape, q.dtype), jnp.full(lse_shape, -jnp.inf, jnp.float32)
        if kind == "offset":  # causal with unequal blocks: an explicit mask from global positions
            q_pos = i * self.q_block + jnp.arange(self.q_block)
            k_pos = j * self.k_block + jnp.arange(self.k_block)
            keep = (k_pos[None, :] <= q_pos[:, None])[None, None]
            if mask is None:
                mask = keep
            elif spec.mask_kind == "bool":
                mask = mask & keep
            else:
                mask = jnp.where(keep, mask, -jnp.inf).astype(mask.dtype)
        inputs = _local(spec, q, k, v, mask, kv_lengths, is_causal=kind == "diag")
        b = choose(inputs.spec, self.backend) if backend is None else backend(inputs.spec)
        return b(inputs, True)

    def dispatch(self, i, j, fn, *operands):
        """`fn(kind, *operands)` for the variant of block (i, j), through `lax.switch` if causal."""
        kinds = self.kinds()
        if len(kinds) == 1:
            return fn(kinds[0], *operands)
        branches = [lambda *ops, kd=kd: fn(kd, *ops) for kd in kinds]
        return jax.lax.switch(self.kind_index(i, j), branches, *operands)


def _merge(out, lse, out_t, lse_t, layout):
    """Merge two normalized partial results by their log-sum-exps (float32; -inf = no keys)."""
    m = jax.lax.stop_gradient(jnp.maximum(lse, lse_t))
    m = jnp.where(jnp.isneginf(m), 0.0, m)
    w, w_t = jnp.exp(lse - m), jnp.exp(lse_t - m)
    total = w + w_t
    nonempty = total > 0
    total_safe = jnp.where(nonempty, total, 1.0)
    new_lse = jnp.where(nonempty, m + jnp.log(total_safe), -jnp.inf)
    new_out = (out * _lse_col(w / total_safe, layout)
               + out_t.astype(jnp.float32) * _lse_col(w_t / total_safe, layout))
    return new_out, new_lse


def _ring(spec, axis, n_seq, q, k, v, mask, kv_lengths, backend, return_lse):
    seq, _ = _axes(spec.layout)
    # The choice is fixed now, so the backward (traced later, maybe outside a use_backend block)
    # routes the same way.
    names, _ = current_choice(backend)
    ring = _Ring(spec, axis, n_seq, q.shape[seq], k.shape[seq], names)
    out, lse = _ring_fn(ring)(q, k, v, mask, kv_lengths)
    return out, (lse if return_lse else None)


def _ring_fn(ring: _Ring):
    layout = ring.spec.layout

    def forward(q, k, v, mask, kv_lengths):
        i = jax.lax.axis_index(ring.axis)
        seq, head = _axes(layout)
        out = jnp.zeros(q.shape[:-1] + v.shape[-1:], jnp.float32)
        lse = jnp.full((q.shape[0], q.shape[head], q.shape[seq]), -jnp.inf, jnp.float32)
        kv = (k, v)
        for t in range(ring.n):
            j = (i - t) % ring.n
            if t < ring.n - 1:  # issued before the compute so the transfer can overlap it
                nxt = jax.lax.ppermute(kv, ring.axis, ring.perm())
            m_j, l_j = ring.block(mask, kv_lengths, j)
            out_t, lse_t = ring.dispatch(i, j, ring.step, q, kv[0], kv[1], m_j, l_j, i, j)
            out, lse = _merge(out, lse, out_t, lse_t, layout)
            if t < ring.n - 1:
                kv = nxt
        return out.astype(q.dtype), lse

    @jax.custom_vjp
    def ring_attention(q, k, v, mask, kv_lengths):
        return forward(q, k, v, mask, kv_lengths)

    def fwd(q, k, v, mask, kv_lengths):
        out, lse = forward(q, k, v, mask, kv_lengths)
        return (out, lse), (q, k, v, mask, kv_lengths, out, lse)

    def bwd(res, cts):
        q, k, v, mask, kv_lengths, out, lse = res
        d_out, d_lse = cts
        i = jax.lax.axis_index(ring.axis)
        want_dmask = mask is not None and ring.spec.mask_kind == "bias"
        pick = _grad_backend(ring)
        lse_safe = jnp.where(jnp.isneginf(lse), 0.0, lse)
        d_out32, out32 = d_out.astype(jnp.float32), out.astype(jnp.float32)

        def step_vjp(kind, q, k_j, v_j, m_j, l_j, i, j):
            """Gradients of one block's share: recompute (out_t, lse_t), pull back through it.

            out = sum_t w_t out_t with w_t = exp(lse_t - lse), so d out_t = w_t d_out and
            d lse_t = w_t (d_out . (out_t - out) + d_lse).
            """
            def f(q, k_j, v_j, m_j):
                return ring.step(kind, q, k_j, v_j, m_j, l_j, i, j, backend=pick)

            if not want_dmask:
                (out_t, lse_t), pull = jax.vjp(lambda q, k, v: f(q, k, v, m_j), q, k_j, v_j)
            else:
                (out_t, lse_t), pull = jax.vjp(f, q, k_j, v_j, m_j)
            w = jnp.where(jnp.isneginf(lse_t), 0.0, jnp.exp(lse_t - lse_safe))
            d_out_t = (d_out32 * _lse_col(w, layout)).astype(out_t.dtype)
            dot = jnp.sum(d_out32 * (out_t.astype(jnp.float32) - out32), -1)
            dot = dot if layout == "bnsd" else jnp.swapaxes(dot, 1, 2)
            grads = pull((d_out_t, w * (dot + d_lse)))
            return tuple(g.astype(jnp.float32) for g in grads) + ((None,) if not want_dmask else ())

        dq = jnp.zeros(q.shape, jnp.float32)
        dmask = jnp.zeros(mask.shape, jnp.float32) if want_dmask else None
        kv = (k, v)
        dkv = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
        for t in range(ring.n):
            j = (i - t) % ring.n
            if t < ring.n - 1:
                nxt = jax.lax.ppermute(kv, ring.axis, ring.perm())
            m_j, l_j = ring.block(mask, kv_lengths, j)
            dq_t, dk_t, dv_t, dm_t = ring.dispatch(i, j, step_vjp, q, kv[0], kv[1], m_j, l_j, i, j)
            dq = dq + dq_t
            # dk/dv travel with their block; the last hop brings them home.
            dkv = jax.lax.ppermute((dkv[0] + dk_t, dkv[1] + dv_t), ring.axis, ring.perm())
            if want_dmask:
                if mask.shape[3] > 1:
                    start = j * ring.k_block
                    cur = jax.lax.dynamic_slice_in_dim(dmask, start, ring.k_block, 3)
                    dmask = jax.lax.dynamic_update_slice_in_dim(dmask, cur + dm_t, start, 3)
                else:
                    dmask = dmask + dm_t
            if t < ring.n - 1:
                kv = nxt
        dmask = dmask.astype(mask.dtype) if want_dmask else None
        return dq.astype(q.dtype), dkv[0].astype(k.dtype), dkv[1].astype(v.dtype), dmask, None

    ring_attention.defvjp(fwd, bwd)
    return ring_attention


def _grad_backend(ring: _Ring):
    """A chooser of the backend for the ring's backward: one whose log-sum-exp is differentiable.

    The backward recomputes each block and pulls gradients back through its `(out, lse)`, so a
    backend that ignores the lse cotangent (cuDNN) would give wrong gradients: routing is asked
    for `Needs(lse_grad=True)`. A backend named by the caller must qualify (else ValueError);
    automatic or list choices fall to one that does.
    """
    def pick(local_spec):
        d = decide(local_spec, ring.backend, Needs(lse_grad=True))
        if d.backend is None:
            raise ValueError("sequence_parallel('ring') backward: none of the backends can serve it with a "
                             "differentiable log-sum-exp: "
                             + "; ".join(f"{nm!r}: {', '.join(d.reasons[nm]) or 'not chosen automatically'}"
                                         for nm in d.candidates)
                             + ". Use a backend with lse gradients (pallas, xla, chunked, naive), or "
                               "method='ulysses'.")
        plain = decide(local_spec, ring.backend).backend
        if plain != d.backend and (plain, d.backend) not in _logged:
            _logged.add((plain, d.backend))
            log.info("ring attention: backward uses %r (%r has no lse gradient)", d.backend, plain)
        return BACKENDS[d.backend]

    return pick
