"""`chunked`: flash attention in torch ops, memory bounded on any device.

Forward: a loop over query chunks, each looping over key chunks with the online softmax.
Backward (`torch.autograd.Function`): a loop over key chunks, each looping over the query chunks
and recomputing the probabilities from the saved log-sum-exp. Peak extra memory is
O(chunk_q * chunk_k) per head: it never holds a `(sq, skv)` matrix, in either direction (segment
ids are cut to each block and compared there).
"""
from __future__ import annotations

import dataclasses

import torch

from jax_attn.contract import Spec

from .. import masking
from .base import Backend


@dataclasses.dataclass(frozen=True)
class _Plan:
    spec: Spec
    q_chunk: int
    k_chunk: int

    def blocks(self, length, chunk):
        return [(start, min(start + chunk, length)) for start in range(0, length, chunk)]

    def visible(self, q_block, k_block):
        """False when the window (causality included) hides the key block from every query of the
        query block: such blocks are skipped."""
        bounds = self.spec.window_bounds
        if bounds is None:
            return True
        left, right = bounds
        (q_lo, q_end), (k_lo, k_end) = q_block, k_block
        return ((right is None or k_lo <= q_end - 1 + right)
                and (left is None or k_end - 1 >= q_lo - left))


def _cut(x, axis, block):
    """The block of `x` along `axis`, or `x` itself where it broadcasts (size 1)."""
    return x if x is None or x.shape[axis] == 1 else x.narrow(axis, block[0], block[1] - block[0])


def _grouped(x, spec):
    """(b?, n?, q, k) -> (b?, n_kv?, g?, q, k) so it broadcasts against grouped logits."""
    if x is None:
        return None
    if x.shape[1] == spec.heads:
        return x.reshape(x.shape[0], spec.kv_heads, spec.groups, *x.shape[2:])
    return x[:, :, None]


def _logits(plan, q_i, k_j, mask, kv_lengths, qb, kb, segments=None):
    """Masked logits of query block qb against key block kb, and the keep mask (grouped).
    `segments`: None, or the `(b, sq)` and `(b, skv)` segment ids (passed only when there are some,
    so the signature of calls without packed sequences is the one it always had)."""
    spec = plan.spec
    s = torch.einsum("bhgqd,bhkd->bhgqk", q_i, k_j) * spec.scale
    dev = q_i.device
    if segments is not None:  # this block's ids only: a (b, 1, qc, kc) comparison
        segments = (_cut(segments[0], 1, qb), _cut(segments[1], 1, kb))
    keep, bias = masking.keep_and_bias(spec, _cut(_cut(mask, 2, qb), 3, kb), kv_lengths,
                                       torch.arange(*qb, device=dev), torch.arange(*kb, device=dev),
                                       segments)
    keep = _grouped(keep, spec)
    return masking.masked_logits(s, keep, _grouped(bias, spec)), keep


def _kept(x, keep):
    return x if keep is None else torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device))


class _Attention(torch.autograd.Function):
    """q (b, hk, g, sq, d), k, v (b, hk, skv, .) in the accumulator dtype; returns out and lse."""

    @staticmethod
    def forward(ctx, plan, q, k, v, mask, kv_lengths, q_ids, kv_ids):
        b, hk, g, sq, _ = q.shape
        segments = {} if q_ids is None else {"segments": (q_ids, kv_ids)}
        out = q.new_empty(b, hk, g, sq, v.shape[-1])
        lse = q.new_empty(b, hk, g, sq)
        for qb in plan.blocks(sq, plan.q_chunk):
            q_i = q[..., qb[0]:qb[1], :]
            m = q.new_full(q_i.shape[:-1], float("-inf"))
            l = q.new_zeros(q_i.shape[:-1])
            acc = q.new_zeros(*q_i.shape[:-1], v.shape[-1])
            nonempty = torch.zeros(q_i.shape[:-1], dtype=torch.bool, device=q.device)
            for kb in plan.blocks(k.shape[2], plan.k_chunk):
                if not plan.visible(qb, kb):
                    continue
                s, keep = _logits(plan, q_i, k[:, :, kb[0]:kb[1]], mask, kv_lengths, qb, kb, **segments)
                # Emptiness comes from `keep`, never from `l > 0`, so a NaN row stays NaN.
                nonempty = nonempty | (True if keep is None else keep.any(-1))
                m_new = torch.maximum(m, s.amax(-1))
                m_safe = m_new.masked_fill(torch.isneginf(m_new), 0.0)
                p = _kept(torch.exp(s - m_safe[..., None]), keep)
                alpha = torch.exp(m - m_safe)
                l = alpha * l + p.sum(-1)
                acc = alpha[..., None] * acc + torch.einsum("bhgqk,bhkd->bhgqd", p, v[:, :, kb[0]:kb[1]])
                m = m_new
            l_safe = torch.where(nonempty, l, torch.ones_like(l))
            out[..., qb[0]:qb[1], :] = acc / l_safe[..., None]
            lse[..., qb[0]:qb[1]] = torch.where(nonempty, torch.log(l_safe) + m, float("-inf"))
        ctx.plan = plan
        ctx.save_for_backward(q, k, v, mask, kv_lengths, q_ids, kv_ids, out, lse)
        return out, lse

    @staticmethod
    def backward(ctx, d_out, d_lse):
        plan = ctx.plan
        q, k, v, mask, kv_lengths, q_ids, kv_ids, out, lse = ctx.saved_tensors
        segments = {} if q_ids is None else {"segments": (q_ids, kv_ids)}
        scale = plan.spec.scale
        want_dbias = ctx.needs_input_grad[4]
        # dS = P * (dP - D) with D = rowsum(dO * O) - dlse: the dlse term is the lse's own gradient.
        delta = (d_out * out).sum(-1) - d_lse
        lse = lse.masked_fill(torch.isneginf(lse), 0.0)
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        dbias = torch.zeros_like(mask) if want_dbias else None
        for kb in plan.blocks(k.shape[2], plan.k_chunk):
            k_j, v_j = k[:, :, kb[0]:kb[1]], v[:, :, kb[0]:kb[1]]
            for qb in plan.blocks(q.shape[3], plan.q_chunk):
                if not plan.visible(qb, kb):
                    continue
                q_i, do_i = q[..., qb[0]:qb[1], :], d_out[..., qb[0]:qb[1], :]
                s, keep = _logits(plan, q_i, k_j, mask, kv_lengths, qb, kb, **segments)
                p = _kept(torch.exp(s - lse[..., qb[0]:qb[1], None]), keep)
                dv[:, :, kb[0]:kb[1]] += torch.einsum("bhgqk,bhgqd->bhkd", p, do_i)
                dp = torch.einsum("bhgqd,bhkd->bhgqk", do_i, v_j)
                ds = p * (dp - delta[..., qb[0]:qb[1], None])
                dk[:, :, kb[0]:kb[1]] += scale * torch.einsum("bhgqk,bhgqd->bhkd", ds, q_i)
                dq[..., qb[0]:qb[1], :] += scale * torch.einsum("bhgqk,bhkd->bhgqd", ds, k_j)
                if want_dbias:
                    _accumulate_dbias(dbias, ds, qb, kb)
        return None, dq, dk, dv, dbias, None, None, None


def _accumulate_dbias(dbias, ds, qb, kb):
    """Add block (qb, kb) of dS, summed over the dims the bias broadcasts along, into `dbias`."""
    b, hk, g, qc, kc = ds.shape
    ds = ds.reshape(b, hk * g, qc, kc)
    dims = tuple(a for a in range(4) if dbias.shape[a] == 1 and ds.shape[a] != 1)
    if dims:
        ds = ds.sum(dims, keepdim=True)
    _cut(_cut(dbias, 2, qb), 3, kb).add_(ds)


class Chunked(Backend):
    name = "chunked"
    description = "torch online softmax over key/query chunks with its own backward; memory linear in s"
    supports_window = True
    supports_segment_ids = True  # compared block by block, never as (sq, skv)

    def __init__(self, q_chunk: int = 512, k_chunk: int = 512):
        self.q_chunk, self.k_chunk = q_chunk, k_chunk

    def _forward(self, inputs, return_lse):
        spec = inputs.spec
        q, k, v = inputs.bnsd()
        acc = masking.accumulator(q.dtype)
        b, n, sq, d = q.shape
        mask = inputs.mask
        if spec.mask_kind == "bias":
            mask = mask.to(acc)
        plan = _Plan(spec, self.q_chunk, self.k_chunk)
        out, lse = _Attention.apply(plan, q.reshape(b, spec.kv_heads, spec.groups, sq, d).to(acc),
                                    k.to(acc), v.to(acc), mask, inputs.kv_lengths, inputs.q_segment_ids,
                                    inputs.kv_segment_ids)
        out = inputs.from_bnsd(out.reshape(b, n, sq, -1).to(q.dtype))
        return (out, lse.reshape(b, n, sq).to(torch.float32)) if return_lse else out
