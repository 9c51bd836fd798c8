"""Ring attention: k/v blocks go round; each step's (out, lse) is merged into the running result.

Each device keeps its query block and the key/value blocks travel round the ring with
`ppermute`; the per-block results are merged with their log-sum-exps. Works for any head count;
memory per device stays O(s / P) in both directions (the backward is a second ring, carrying
dk/dv with the blocks). Causal calls skip the blocks wholly above the diagonal (`lax.switch`
over the step variants).

The backward is the ring's own custom VJP. Per block it runs, by the local backend's name:
- its block backward from the global `(out, lse)` (`ring_backward.STATS_BACKWARDS`): one
  backward per block, nothing recomputed, no lse gradient needed (the standard ring backward).
  It needs only the global statistics, not the forward's residuals, so a forward backend without
  one, or whose one refuses the block (cuDNN's, when the lse is returned or the block is masked:
  `ring_backward.STATS_REFUSALS`), takes the block backward of the backend the routing gives for
  lse gradients (`pallas` on a GPU), logged once: exact, since both compute the same function;
- otherwise `_recompute_grads`: the block's forward recomputed and pulled back through its own
  `(out_j, lse_j)`, which needs a backend whose lse is differentiable (`_grad_backend`) and one
  forward more per block.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any

import jax
import jax.numpy as jnp

from ..backends import BACKENDS, Needs
from ..routing import ROUTER, choose, current_choice, decide
from .layout import _axes, _local, _lse_col, _run
from .ring_backward import STATS_BACKWARDS, delta, stats_refusal

log = logging.getLogger(__name__)

_logged: set = set()


@dataclasses.dataclass(frozen=True)
class _Ring:
    spec: Any  # the global call's Spec (scale, layout, mask kind, causal)
    axis: Any
    n: int  # devices on the ring
    q_block: int
    k_block: int
    backend: Any
    return_lse: bool = False  # whether the lse can have a cotangent

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

    def step(self, kind, q, k, v, mask, kv_lengths, segments, i, j, backend=None):
        """`(out, lse)` of query block i against key block j for one variant; `segments` None or
        the `(q_segment_ids, kv_segment_ids)` of those two blocks."""
        spec = self.spec
        if kind == "skip":
            seq, head = _axes(spec.layout)
            shape = list(q.shape[:-1]) + [v.shape[-1]]
            lse_shape = (q.shape[0], q.shape[head], q.shape[seq])
            return jnp.zeros(shape, q.dtype), jnp.full(lse_shape, -jnp.inf, jnp.float32)
        inputs = self.inputs(kind, q, k, v, mask, kv_lengths, segments, i, j)
        b = choose(inputs.spec, self.backend) if backend is None else backend(inputs.spec)
        return b(inputs, True)

    def inputs(self, kind, q, k, v, mask, kv_lengths, segments, i, j):
        """The local call of query block i against key block j, for a variant other than "skip"."""
        spec = self.spec
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
        return _local(spec, q, k, v, mask, kv_lengths, is_causal=kind == "diag", segments=segments)

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


def _ring(spec, axis, n_seq, q, k, v, mask, kv_lengths, backend, return_lse, segments=None):
    """`segments`: None, or this device's `(q_segment_ids, kv_segment_ids)` blocks; the key ids
    travel round with their keys."""
    if n_seq == 1:  # a ring of one device (a hybrid's 1 x U mesh) is the local call: a ring step
        # would only add its merge and block backward (on 2 H200s the 1 x 2 hybrid trained at
        # 0.64 of linear, plain Ulysses at 0.94)
        return _run(_local(spec, q, k, v, mask, kv_lengths, segments=segments), backend, return_lse)
    seq, _ = _axes(spec.layout)
    # The choice is fixed now, so the backward (traced later, maybe outside a use_backend block)
    # routes the same way.
    names, _ = current_choice(backend)
    ring = _Ring(spec, axis, n_seq, q.shape[seq], k.shape[seq], names, bool(return_lse))
    q_ids, kv_ids = (None, None) if segments is None else segments
    out, lse = _ring_fn(ring)(q, k, v, mask, kv_lengths, q_ids, kv_ids)
    return out, (lse if return_lse else None)


def _ring_fn(ring: _Ring):
    layout = ring.spec.layout

    def block_segments(q_ids, kv_ids_j):
        return None if q_ids is None else (q_ids, kv_ids_j)

    def forward(q, k, v, mask, kv_lengths, q_ids, kv_ids, pick=None):
        """The merged `(out, lse)`; `pick(local_spec)`: the blocks' backend (default: routing's
        choice for a call nothing differentiates)."""
        i = jax.lax.axis_index(ring.axis)
        seq, head = _axes(layout)
        out = jnp.zeros(q.shape[:-1] + v.shape[-1:], jnp.float32)
        lse = jnp.full((q.shape[0], q.shape[head], q.shape[seq]), -jnp.inf, jnp.float32)
        kv = (k, v, kv_ids)  # the key ids (None without segments) travel with their block
        for t in range(ring.n):
            j = (i - t) % ring.n
            if t < ring.n - 1:  # issued before the compute so the transfer can overlap it
                nxt = jax.lax.ppermute(kv, ring.axis, ring.perm())
            m_j, l_j = ring.block(mask, kv_lengths, j)
            step = functools.partial(ring.step, backend=pick)
            out_t, lse_t = ring.dispatch(i, j, step, q, kv[0], kv[1], m_j, l_j,
                                         block_segments(q_ids, kv[2]), i, j)
            out, lse = _merge(out, lse, out_t, lse_t, layout)
            if t < ring.n - 1:
                kv = nxt
        return out.astype(q.dtype), lse

    @jax.custom_vjp
    def ring_attention(q, k, v, mask, kv_lengths, q_ids, kv_ids):
        return forward(q, k, v, mask, kv_lengths, q_ids, kv_ids)

    def fwd(q, k, v, mask, kv_lengths, q_ids, kv_ids):
        # Differentiated: the blocks run the choice for training (a forward-only backend first in
        # a preference list serves only calls nothing differentiates), whose gradient follows.
        out, lse = forward(q, k, v, mask, kv_lengths, q_ids, kv_ids,
                           pick=lambda local_spec: ROUTER.chosen(decide(local_spec, ring.backend)))
        return (out, lse), (q, k, v, mask, kv_lengths, q_ids, kv_ids, out, lse)

    def bwd(res, cts):
        q, k, v, mask, kv_lengths, q_ids, kv_ids, out, lse = res
        d_out, d_lse = cts
        i = jax.lax.axis_index(ring.axis)
        want_dmask = mask is not None and ring.spec.mask_kind == "bias"
        # The global statistics every block's gradient is taken against (ring_backward.py).
        stats = (out, lse, d_out, delta(out, d_out, d_lse, layout), d_lse)
        pick = _grad_backend(ring)

        def step_grads(kind, q, k_j, v_j, m_j, l_j, seg, i, j):
            """Float32 `(dq, dk_j, dv_j, dmask_j | None)` of block (i, j) for one variant."""
            if kind == "skip":
                f32 = lambda x: jnp.zeros(x.shape, jnp.float32)  # noqa: E731
                return f32(q), f32(k_j), f32(v_j), (f32(m_j) if want_dmask else None)
            inputs = ring.inputs(kind, q, k_j, v_j, m_j, l_j, seg, i, j)
            name = _stats_backend(ring, inputs.spec)
            if name is not None:
                out, lse, d_out, dlt, _ = stats
                return STATS_BACKWARDS[name](inputs, out, lse, d_out, dlt, m_j.shape if want_dmask else None)
            return _recompute_grads(ring, kind, pick, stats, want_dmask, q, k_j, v_j, m_j, l_j, seg, i, j)

        dq = jnp.zeros(q.shape, jnp.float32)
        dmask = jnp.zeros(mask.shape, jnp.float32) if want_dmask else None
        kv = (k, v, kv_ids)
        dkv = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
        for t in range(ring.n):
            j = (i - t) % ring.n
            if t < ring.n - 1:
                nxt = jax.lax.ppermute(kv, ring.axis, ring.perm())
            m_j, l_j = ring.block(mask, kv_lengths, j)
            dq_t, dk_t, dv_t, dm_t = ring.dispatch(i, j, step_grads, q, kv[0], kv[1], m_j, l_j,
                                                   block_segments(q_ids, kv[2]), i, j)
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
        return dq.astype(q.dtype), dkv[0].astype(k.dtype), dkv[1].astype(v.dtype), dmask, None, None, None

    ring_attention.defvjp(fwd, bwd)
    return ring_attention


def _recompute_grads(ring, kind, pick, stats, want_dmask, q, k_j, v_j, m_j, l_j, seg, i, j):
    """Block (i, j)'s gradients by recomputing its `(out_j, lse_j)` and pulling back through both.

    out = sum_j w_j out_j with w_j = exp(lse_j - lse), so d out_j = w_j d_out and
    d lse_j = w_j (d_out . (out_j - out) + d_lse). Needs `pick`'s backend to differentiate its lse.
    """
    out, lse, d_out, _, d_lse = stats
    layout = ring.spec.layout
    lse_safe = jnp.where(jnp.isneginf(lse), 0.0, lse)
    d_out32, out32 = d_out.astype(jnp.float32), out.astype(jnp.float32)

    def f(q, k_j, v_j, m_j):
        return ring.step(kind, q, k_j, v_j, m_j, l_j, seg, i, j, backend=pick)

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


def _stats_backend(ring: _Ring, local_spec):
    """The backend whose block backward from the global statistics serves this block, or None.

    The forward's own where it has one that serves the block (`stats_refusal`); else the one
    routing picks for lse gradients (what the recompute would run) where that has one."""
    name = decide(local_spec, ring.backend).backend
    why = stats_refusal(name, local_spec, ring.return_lse)
    if why is None:
        return name
    alt = decide(local_spec, ring.backend, Needs(lse_grad=True)).backend
    if stats_refusal(alt, local_spec, ring.return_lse) is not None:
        return None
    if ("stats", name, alt, why) not in _logged:
        _logged.add(("stats", name, alt, why))
        log.info("ring attention: the backward runs %r's block backward from the global statistics "
                 "(%r's: %s)", alt, name, why)
    return alt


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
