"""`chunked`: flash attention written in jnp, with memory bounded on any device.

Forward: `lax.map` over query chunks, `lax.scan` over key chunks with the online softmax.
Backward (custom VJP): a scan over key chunks, each scanning the query chunks and recomputing the
probabilities from the saved log-sum-exp. Peak memory is O((sq + skv) * d + chunk_q * chunk_k)
per head: it never holds a `(sq, skv)` matrix, in either direction. Segment ids (packed sequences)
are cut to each block and compared there, so neither do they.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from ..arrays import pad_to
from .. import masking
from ..contract import Spec
from .base import Backend
from .naive import _precision


@dataclasses.dataclass(frozen=True)
class _Plan:
    spec: Spec
    q_chunk: int
    k_chunk: int

    @property
    def q_blocks(self):
        return -(-self.spec.q_len // self.q_chunk)

    @property
    def k_blocks(self):
        return -(-self.spec.kv_len // self.k_chunk)

    def visible(self, i, j):
        """False when the window (causality included) hides key block j from every query of block i."""
        bounds = self.spec.window_bounds
        if bounds is None:
            return True
        left, right = bounds
        q_lo, q_hi = i * self.q_chunk, i * self.q_chunk + self.q_chunk - 1
        k_lo, k_hi = j * self.k_chunk, j * self.k_chunk + self.k_chunk - 1
        ok = True
        if right is not None:
            ok = k_lo <= q_hi + right
        if left is not None:
            ok = ok & (k_hi >= q_lo - left)
        return ok


def _slice(x, axis, start, size):
    """Chunk of `x` along `axis`, or `x` itself where it broadcasts (size 1)."""
    if x.shape[axis] == 1:
        return x
    return jax.lax.dynamic_slice_in_dim(x, start, size, axis)


def _grouped(x, plan):
    """(b?, n?, q, k) -> (b?, n_kv?, g?, q, k) so it broadcasts against grouped logits."""
    if x is None:
        return None
    spec = plan.spec
    if x.shape[1] == spec.heads:
        return x.reshape(x.shape[0], spec.kv_heads, spec.groups, *x.shape[2:])
    return x[:, :, None]


def _logits(plan, q_i, k_j, mask, kv_lengths, segments, i, j):
    """Masked float32 logits of query block i against key block j, and the keep mask (grouped).
    `segments`: None, or the `(b, Sq)` and `(b, Sk)` segment ids padded to whole chunks."""
    spec = plan.spec
    s = jnp.einsum("bhgqd,bhkd->bhgqk", q_i, k_j, precision=_precision(q_i.dtype),
                   preferred_element_type=jnp.float32) * spec.scale
    q_pos = i * plan.q_chunk + jnp.arange(plan.q_chunk)
    k_pos = j * plan.k_chunk + jnp.arange(plan.k_chunk)
    m = None
    if mask is not None:
        m = _slice(_slice(mask, 2, i * plan.q_chunk, plan.q_chunk), 3, j * plan.k_chunk, plan.k_chunk)
    if segments is not None:  # this block's ids only: a (b, 1, qc, kc) comparison
        segments = (jax.lax.dynamic_slice_in_dim(segments[0], i * plan.q_chunk, plan.q_chunk, 1),
                    jax.lax.dynamic_slice_in_dim(segments[1], j * plan.k_chunk, plan.k_chunk, 1))
    keep, bias = masking.keep_and_bias(spec, m, kv_lengths, q_pos, k_pos, kv_limit=spec.kv_len,
                                       segments=segments)
    keep, bias = _grouped(keep, plan), _grouped(bias, plan)
    return masking.masked_logits(s, keep, bias), keep


def _kept(x, keep):
    return x if keep is None else jnp.where(keep, x, 0.0)


def _forward(plan, q, k, v, mask, kv_lengths, segments):
    """q (b, hk, g, Sq, d) and k, v (b, hk, Sk, .) padded to whole chunks."""
    b, hk, g, _, _ = q.shape
    dv = v.shape[-1]
    qc, kc = plan.q_chunk, plan.k_chunk

    def q_block(i):
        q_i = jax.lax.dynamic_slice_in_dim(q, i * qc, qc, 3)

        def k_step(carry, j):
            def update(carry):
                m, l, acc = carry
                k_j = jax.lax.dynamic_slice_in_dim(k, j * kc, kc, 2)
                v_j = jax.lax.dynamic_slice_in_dim(v, j * kc, kc, 2)
                s, keep = _logits(plan, q_i, k_j, mask, kv_lengths, segments, i, j)
                # Masked logits sit at the finite masking.MASKED; `keep`, not their value, drops
                # them, so a visible NaN keeps its row NaN (never "empty").
                m_new = jnp.maximum(m, s.max(-1))
                p = _kept(jnp.exp(s - m_new[..., None]), keep)
                alpha = jnp.exp(m - m_new)
                pv = jnp.einsum("bhgqk,bhkd->bhgqd", p.astype(v.dtype), v_j,
                                precision=_precision(v.dtype), preferred_element_type=jnp.float32)
                return m_new, alpha * l + p.sum(-1), alpha[..., None] * acc + pv

            return jax.lax.cond(plan.visible(i, j), update, lambda c: c, carry), None

        init = (jnp.full((b, hk, g, qc), masking.MASKED, jnp.float32), jnp.zeros((b, hk, g, qc), jnp.float32),
                jnp.zeros((b, hk, g, qc, dv), jnp.float32))
        (m, l, acc), _ = jax.lax.scan(k_step, init, jnp.arange(plan.k_blocks))
        empty = l == 0  # only a row with no kept key sums to exactly 0; NaN != 0
        out = acc / jnp.where(empty, 1.0, l)[..., None]
        lse = jnp.where(empty, -jnp.inf, jnp.log(jnp.where(empty, 1.0, l)) + m)
        return out.astype(q.dtype), lse

    out, lse = jax.lax.map(q_block, jnp.arange(plan.q_blocks))  # (blocks, b, hk, g, qc, ...)
    out = jnp.moveaxis(out, 0, 3).reshape(b, hk, g, plan.q_blocks * qc, dv)
    lse = jnp.moveaxis(lse, 0, 3).reshape(b, hk, g, plan.q_blocks * qc)
    return out, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(plan, q, k, v, mask, kv_lengths, segments):
    return _forward(plan, q, k, v, mask, kv_lengths, segments)


def _attention_fwd(plan, q, k, v, mask, kv_lengths, segments):
    out, lse = _forward(plan, q, k, v, mask, kv_lengths, segments)
    return (out, lse), (q, k, v, mask, kv_lengths, segments, out, lse)


def _attention_bwd(plan, res, cotangents):
    q, k, v, mask, kv_lengths, segments, out, lse = res
    d_out, d_lse = cotangents
    spec = plan.spec
    qc, kc = plan.q_chunk, plan.k_chunk
    # dS = P * (dP - D) with D = rowsum(dO * O) - dlse: the dlse term is the lse's own gradient.
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), -1) - d_lse
    lse_safe = jnp.where(jnp.isneginf(lse), 0.0, lse)
    want_dbias = spec.mask_kind == "bias"
    prec = _precision(q.dtype)

    def k_block(carry, j):
        dq, dbias = carry
        k_j = jax.lax.dynamic_slice_in_dim(k, j * kc, kc, 2)
        v_j = jax.lax.dynamic_slice_in_dim(v, j * kc, kc, 2)

        def q_step(carry, i):
            def update(carry):
                dk_j, dv_j, dq, dbias = carry
                q_i, do_i = (jax.lax.dynamic_slice_in_dim(x, i * qc, qc, 3) for x in (q, d_out))
                lse_i, delta_i = (jax.lax.dynamic_slice_in_dim(x, i * qc, qc, 3) for x in (lse_safe, delta))
                s, keep = _logits(plan, q_i, k_j, mask, kv_lengths, segments, i, j)
                p = _kept(jnp.exp(s - lse_i[..., None]), keep)
                dv_j = dv_j + jnp.einsum("bhgqk,bhgqd->bhkd", p.astype(do_i.dtype), do_i, precision=prec,
                                         preferred_element_type=jnp.float32)
                dp = jnp.einsum("bhgqd,bhkd->bhgqk", do_i, v_j, precision=prec,
                                preferred_element_type=jnp.float32)
                ds = p * (dp - delta_i[..., None])
                dk_j = dk_j + spec.scale * jnp.einsum("bhgqk,bhgqd->bhkd", ds.astype(q_i.dtype), q_i,
                                                      precision=prec, preferred_element_type=jnp.float32)
                dq_i = spec.scale * jnp.einsum("bhgqk,bhkd->bhgqd", ds.astype(k_j.dtype), k_j,
                                               precision=prec, preferred_element_type=jnp.float32)
                dq = jax.lax.dynamic_update_slice_in_dim(
                    dq, jax.lax.dynamic_slice_in_dim(dq, i * qc, qc, 3) + dq_i, i * qc, 3)
                if want_dbias:
                    dbias = _accumulate_dbias(dbias, ds, plan, i, j)
                return dk_j, dv_j, dq, dbias

            return jax.lax.cond(plan.visible(i, j), update, lambda c: c, carry), None

        init = (jnp.zeros(k_j.shape, jnp.float32), jnp.zeros(v_j.shape, jnp.float32), dq, dbias)
        (dk_j, dv_j, dq, dbias), _ = jax.lax.scan(q_step, init, jnp.arange(plan.q_blocks))
        return (dq, dbias), (dk_j, dv_j)

    dbias0 = jnp.zeros(mask.shape, jnp.float32) if want_dbias else None
    (dq, dbias), (dk, dv) = jax.lax.scan(k_block, (jnp.zeros(q.shape, jnp.float32), dbias0),
                                         jnp.arange(plan.k_blocks))
    b, hk = k.shape[:2]
    dk = jnp.moveaxis(dk, 0, 2).reshape(k.shape)
    dv = jnp.moveaxis(dv, 0, 2).reshape(v.shape)
    dmask = dbias.astype(mask.dtype) if want_dbias else None
    no_segments = None if segments is None else (None, None)  # integer ids: no cotangent
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dmask, None, no_segments


def _accumulate_dbias(dbias, ds, plan, i, j):
    """Add block (i, j) of dS, summed over the dims the bias broadcasts along, into `dbias`."""
    b, hk, g, qc, kc = ds.shape
    ds = ds.reshape(b, hk * g, qc, kc)
    axes = tuple(a for a in (0, 1, 2, 3) if dbias.shape[a] == 1 and ds.shape[a] != 1)
    ds = ds.sum(axes, keepdims=True)
    start = [0, 0, i * qc if dbias.shape[2] > 1 else 0, j * kc if dbias.shape[3] > 1 else 0]
    cur = jax.lax.dynamic_slice(dbias, start, ds.shape)
    return jax.lax.dynamic_update_slice(dbias, cur + ds, start)


_attention.defvjp(_attention_fwd, _attention_bwd)


class Chunked(Backend):
    name = "chunked"
    description = "jnp online softmax over key/query chunks with its own VJP; memory linear in s"
    supports_window = True
    supports_segment_ids = True  # compared block by block, never as (sq, skv)

    def __init__(self, q_chunk: int = 512, k_chunk: int = 512):
        self.q_chunk, self.k_chunk = q_chunk, k_chunk

    def _forward(self, inputs, return_lse):
        spec = inputs.spec
        plan = _Plan(spec, min(self.q_chunk, spec.q_len), min(self.k_chunk, spec.kv_len))
        sq_pad, skv_pad = plan.q_blocks * plan.q_chunk, plan.k_blocks * plan.k_chunk
        q, k, v = inputs.bnsd()
        b, n, sq, d = q.shape
        q = pad_to(q.reshape(b, spec.kv_heads, spec.groups, sq, d), 3, sq_pad)
        k, v = pad_to(k, 2, skv_pad), pad_to(v, 2, skv_pad)
        mask = inputs.mask
        if mask is not None:
            for axis, size in ((2, sq_pad), (3, skv_pad)):
                mask = pad_to(mask, axis, size) if mask.shape[axis] > 1 else mask
        segments = inputs.segments
        if segments is not None:  # padded queries are cut off, padded keys dropped by kv_limit
            segments = (pad_to(segments[0], 1, sq_pad), pad_to(segments[1], 1, skv_pad))
        out, lse = _attention(plan, q, k, v, mask, inputs.kv_lengths, segments)
        out = inputs.from_bnsd(out[..., :sq, :].reshape(b, n, sq, -1))
        return (out, lse[..., :sq].reshape(b, n, sq)) if return_lse else out
