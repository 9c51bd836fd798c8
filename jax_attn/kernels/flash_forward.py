"""The forward kernel of the Triton flash attention and its launch.

One program owns `block_q` queries of one head and walks the key blocks its tile can see
(`flash_call._key_blocks`; with packed sequences, within the span of blocks whose segment ids can
meet its own) with the online softmax of FlashAttention-2, in base 2 (`exp2` is one
instruction, so logits are scaled by `scale * log2(e)`). Dropped logits are -inf: a row with no key keeps
`l_i == 0` and returns zeros and `lse = -inf`, and the running max is guarded wherever a row may
still be empty so that no `-inf - -inf` reaches `exp2`.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from .flash_call import KernelCall, _fwd_blocks
from .flash_tiles import (
    _SQ, LN2, LOG2E, _and, _append_row_block_inputs, _bias_terms, _col_mask,
    _compiler_params, _dot, _in_window, _kv_end, _load, _over_key_blocks, _pop_segments,
    _seq_spec, _store)


def _fwd_kernel(*refs, st: KernelCall):
    q_ref, k_ref, v_ref, *rest = refs
    kvlen_ref = rest.pop(0) if st.has_kv_lengths else None
    kb_ref = rest.pop(0) if st.key_bias_dims else None
    bias_ref = rest.pop(0) if st.bias_dims else None
    seg = _pop_segments(st, rest)
    o_ref, lse_ref = rest
    bq, bk = _fwd_blocks(st)
    qi, b = pl.program_id(0), pl.program_id(1)
    q0 = qi * bq
    rows = q0 + jnp.arange(bq)
    row_ok = rows < st.sq
    dmask, dvmask = _col_mask(st.d, st.dp), _col_mask(st.dv, st.dvp)
    q = _load(q_ref, mask=_and(row_ok[:, None], dmask))
    qk_scale = st.scale * LOG2E
    tail_rows, tail_cols = st.sq % bq != 0, st.skv % bk != 0
    may_be_inf = st.key_bias_dims is not None or st.bias_dims is not None or seg is not None
    if seg is not None:  # rows past sq are padding: their ids are never compared with a kept key
        q_ids = _load(seg.q_ids, mask=row_ok, other=0)

    kv_end = _kv_end(st, kvlen_ref, b)
    needs_mask = st.windowed or st.has_kv_lengths or tail_cols

    def body(j, carry, masked):
        acc, m_i, l_i = carry
        k0 = j * bk
        cols = k0 + jnp.arange(bk)
        kv_rows = (cols < st.skv)[:, None] if masked and tail_cols else None
        k = _load(k_ref, (pl.ds(k0, bk), slice(None)), mask=_and(kv_rows, dmask))
        s = _dot(q, k.T) * qk_scale
        extra = _bias_terms(st, kb_ref, bias_ref, pl.ds(k0, bk), (slice(None), pl.ds(k0, bk)),
                            rows, cols, tail_rows, masked and tail_cols)
        if extra is not None:
            s = s + extra
        if masked:
            s = jnp.where(_and((cols < kv_end)[None, :], _in_window(st, rows, cols)), s, -jnp.inf)
        if seg is not None:  # the tail past skv (masked blocks only) is dropped just above
            k_ids = _load(seg.k_ids, pl.ds(k0, bk), mask=cols < st.skv if masked and tail_cols
                          else None, other=0)
            s = jnp.where(seg.same(q_ids, k_ids), s, -jnp.inf)
        m_new = jnp.maximum(m_i, jnp.max(s, axis=1))
        if masked or may_be_inf:  # a row with no key yet: subtract 0, not -inf (no NaN)
            m_new_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        else:
            m_new_safe = m_new
        alpha = jnp.exp2(m_i - m_new_safe)
        p = jnp.exp2(s - m_new_safe[:, None])
        l_i = l_i * alpha + jnp.sum(p, axis=1)
        v = _load(v_ref, (pl.ds(k0, bk), slice(None)), mask=_and(kv_rows, dvmask))
        acc = acc * alpha[:, None] + _dot(p.astype(v.dtype), v)
        return acc, m_new, l_i

    carry = (jnp.zeros((bq, st.dvp), jnp.float32), jnp.full((bq,), -jnp.inf, jnp.float32),
             jnp.zeros((bq,), jnp.float32))
    span = None if seg is None else seg.span(qi)
    carry = _over_key_blocks(st, body, carry, q0, bq, bk, kv_end, needs_mask, span)
    acc, m_i, l_i = carry
    empty = l_i == 0.0
    l_safe = jnp.where(empty, 1.0, l_i)
    _store(o_ref, acc / l_safe[:, None], mask=_and(row_ok[:, None], dvmask))
    _store(lse_ref, jnp.where(empty, -jnp.inf, (m_i + jnp.log2(l_safe)) * LN2), mask=row_ok)


def _forward(st: KernelCall, q, k, v, key_bias, bias, kv_lengths, q_ids=None, kv_ids=None):
    """`(out, lse)`: out in q's layout and dtype, lse float32 `(b, n, sq)` natural log."""
    batch = q.shape[0]
    heads = q.shape[1] if st.layout == "bnsd" else q.shape[2]
    bq, bk = _fwd_blocks(st)
    g = st.groups
    grid = (pl.cdiv(st.sq, bq), batch, heads)
    q_spec = _seq_spec(st, bq, _SQ, lambda i, b, h: (b, h, i, 0))
    kv_spec = _seq_spec(st, st.skv, _SQ, lambda i, b, h: (b, h // g, 0, 0))
    in_specs = [q_spec(st.dp), kv_spec(st.dp), kv_spec(st.dvp)]
    args = [q, k, v]
    _append_row_block_inputs(st, args, in_specs, kv_lengths, key_bias, bias, q_ids, kv_ids, bq, bk)
    out_shape = [jax.ShapeDtypeStruct(_out_shape(st, q), q.dtype),
                 jax.ShapeDtypeStruct((batch, heads, st.sq), jnp.float32)]
    out_specs = [q_spec(st.dvp), pl.BlockSpec((_SQ, _SQ, bq), lambda i, b, h: (b, h, i))]
    out, lse = pl.pallas_call(
        functools.partial(_fwd_kernel, st=st), grid=grid, in_specs=in_specs, out_specs=out_specs,
        out_shape=out_shape, compiler_params=_compiler_params(st.config.fwd),
        interpret=st.interpret, name="flash_attention_fwd")(*args)
    return out, lse


def _out_shape(st, q):
    shape = list(q.shape)
    shape[-1] = st.dv
    return tuple(shape)
