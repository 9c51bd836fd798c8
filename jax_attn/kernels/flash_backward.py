"""The backward kernels of the Triton flash attention and their launch.

Two kernels. dK/dV: one program per key block of a k/v head, looping over the query blocks of
every query head in its group (so GQA sums happen in registers). Short key sequences (77 text
tokens) give too few key blocks to fill the GPU, so there each key block's query loop is split
over several programs whose float32 partial dK/dV are summed afterwards (`_dkdv_splits`). dQ:
one program per query block looping over key blocks, like the forward. Both recompute
`p = exp2(s - lse2)` from the forward's lse; an empty row's lse (-inf) is turned into +inf so its
p, and every gradient through it, is exactly 0. Tiles the forward skips (window, kv_lengths,
segment ids) are skipped here too.

Bias gradients are computed only when a bias is differentiated (`KernelCall.bias_grads`):
d bias = dS = P * (dP - D), the gradient w.r.t. the natural-unit logits. The dK/dV kernel, which
holds dS per key block, sums its columns for the per-key bias; the dQ kernel writes dS tiles for
a full bias (zeros for the tiles it skips). Neither materializes an (sq, skv) array unless the
bias itself is one.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from .flash_call import KernelCall, _dkdv_blocks, _dq_blocks, _query_blocks
from .flash_tiles import (
    _SQ, LOG2E, _and, _append_masks, _append_row_block_inputs, _append_segments, _bh, _bias_terms,
    _col_mask, _compiler_params, _dot, _in_window, _key_range, _kv_end, _load, _mk_idx,
    _over_key_blocks, _pop_segments, _seq_spec, _store)


# ---------------------------------------------------------------------------------------------
# dK/dV kernel (loops over query blocks of each head in the group)


def _dkdv_kernel(*refs, st: KernelCall, splits: int):
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *rest = refs
    kvlen_ref = rest.pop(0) if st.has_kv_lengths else None
    kb_ref = rest.pop(0) if st.key_bias_dims else None
    bias_ref = rest.pop(0) if st.bias_dims else None
    seg = _pop_segments(st, rest)
    dk_ref, dv_ref, *rest = rest
    dkb_ref = rest.pop(0) if st.bias_grads[0] else None  # d key_bias, per query head
    bq, bk = _dkdv_blocks(st)
    # Axis 0 enumerates (key block, query split); split `part` owns a contiguous run of query blocks.
    kj, part, b = lax.div(pl.program_id(0), splits), lax.rem(pl.program_id(0), splits), pl.program_id(1)
    k0 = kj * bk
    cols = k0 + jnp.arange(bk)
    tail_rows, tail_cols = st.sq % bq != 0, st.skv % bk != 0
    dmask, dvmask = _col_mask(st.d, st.dp), _col_mask(st.dv, st.dvp)
    kv_rows = (cols < st.skv)[:, None] if tail_cols else None
    k = _load(k_ref, mask=_and(kv_rows, dmask))
    v = _load(v_ref, mask=_and(kv_rows, dvmask))
    if seg is not None:  # keys past skv are dropped by col_ok below, whatever their ids
        k_ids = _load(seg.k_ids, mask=cols < st.skv if tail_cols else None, other=0)
    kv_end = _kv_end(st, kvlen_ref, b)
    col_ok = cols < kv_end if (st.has_kv_lengths or tail_cols) else None
    qk_scale = st.scale * LOG2E
    g = st.groups
    n_qblocks = pl.cdiv(st.sq, bq)
    # (bq, 16) one-hot column (16: the narrowest tensor-core product) for the d key_bias sums.
    e0 = jnp.broadcast_to((jnp.arange(16) == 0).astype(q_ref.dtype), (bq, 16))

    def body(i, carry, h, masked):
        dk, dv, *dkb = carry
        q0 = i * bq
        rows = q0 + jnp.arange(bq)
        row_ok = rows < st.sq
        rmask = row_ok[:, None] if tail_rows else None
        q = _load(q_ref, _mk_idx(st.layout, h, pl.ds(q0, bq)), mask=_and(rmask, dmask))
        do = _load(do_ref, _mk_idx(st.layout, h, pl.ds(q0, bq)), mask=_and(rmask, dvmask))
        row_idx = (pl.ds(q0, bq),) if h is None else (h, pl.ds(q0, bq))
        lse2 = _load(lse_ref, row_idx, mask=row_ok if tail_rows else None, other=jnp.inf)
        delta = _load(delta_ref, row_idx, mask=row_ok if tail_rows else None)
        s = _dot(q, k.T) * qk_scale
        # A mask's block has a head dim only when the mask varies over heads and g > 1.
        hk = (h,) if h is not None and st.key_bias_dims and st.key_bias_dims[1] else ()
        hb = (h,) if h is not None and st.bias_dims and st.bias_dims[1] else ()
        extra = _bias_terms(st, kb_ref, bias_ref, (*hk, slice(None)),
                            (*hb, pl.ds(q0, bq), slice(None)), rows, cols, tail_rows, tail_cols)
        if extra is not None:
            s = s + extra
        p = jnp.exp2(s - lse2[:, None])
        keep = None if col_ok is None else col_ok[None, :]
        if masked:
            keep = _and(keep, _in_window(st, rows, cols))
        if seg is not None:
            q_ids = _load(seg.q_ids, pl.ds(q0, bq), mask=row_ok if tail_rows else None, other=0)
            keep = _and(keep, seg.same(q_ids, k_ids))
        if keep is not None:
            p = jnp.where(keep, p, 0.0)
        dv = dv + _dot(p.astype(do.dtype).T, do)
        dp = _dot(do, v.T)
        ds = p * (dp - delta[:, None])
        ds_t = ds.astype(q.dtype).T
        dk = dk + _dot(ds_t, q)
        # d key_bias: dS summed over queries (exactly 0 where p was masked to 0), as one more
        # product on dK's operand (so dS in the input dtype, as dK sees it): dS^T @ e_0 lands the
        # sums in column 0 of a (bk, 16) tile. Reducing dS over its rows at every step instead
        # cost 25-40% of the backward on an H200 (4k-16k causal, bf16); this costs 2-3%.
        return (dk, dv, *(acc + _dot(ds_t, e0) for acc in dkb))

    per_split = pl.cdiv(n_qblocks, splits)
    first, end = part * per_split, jnp.minimum((part + 1) * per_split, n_qblocks)
    if seg is not None:  # only the query blocks whose ids may meet this key block's
        span = seg.span(kj)
        first, end = jnp.maximum(first, span[0]), jnp.minimum(end, span[1])
    lo, full_lo, full_hi, hi = _query_blocks(st, k0, bq, bk, kv_end)
    left, right = st.bounds
    # This split's share of each range: masked edges (only where the window has that edge).
    runs = (((lo, full_lo, True),) if right is not None else ()) + ((full_lo, full_hi, False),) + (
        ((full_hi, hi, True),) if left is not None else ())

    def head(h, carry):
        if dkb_ref is not None:
            carry = (*carry, jnp.zeros((bk, 16), jnp.float32))
        for a, z, masked in runs:
            step = functools.partial(body, h=h, masked=masked)
            carry = lax.fori_loop(jnp.maximum(a, first), jnp.minimum(z, end), step, carry)
        if dkb_ref is None:
            return carry
        dk, dv, dkb = carry  # columns 1-15 of dkb are exact zeros
        ref = dkb_ref if h is None else dkb_ref.at[h]
        tail = cols < st.skv if splits == 1 and tail_cols else None
        _store(ref, jnp.sum(dkb, axis=1), mask=tail)
        return dk, dv

    carry = (jnp.zeros((bk, st.dp), jnp.float32), jnp.zeros((bk, st.dvp), jnp.float32))
    carry = head(None, carry) if g == 1 else lax.fori_loop(0, g, head, carry)
    dk, dv = carry
    if splits > 1:  # float32 partial sums in whole padded blocks, added up by the caller
        _store(dk_ref, dk * st.scale)
        _store(dv_ref, dv)
        return
    out_rows = (cols < st.skv)[:, None] if tail_cols else None
    _store(dk_ref, dk * st.scale, mask=_and(out_rows, dmask))
    _store(dv_ref, dv, mask=_and(out_rows, dvmask))


# Fewer dK/dV programs than this leave SMs idle (132 on an H100): short key sequences (77 text
# tokens give 2 key blocks per head) then split each key block's query loop over programs.
_DKDV_MIN_PROGRAMS = 256


def _dkdv_splits(n_key_blocks, n_query_blocks, batch, kv_heads):
    """Programs per key block: enough for `_DKDV_MIN_PROGRAMS`, at most one per query block."""
    base = n_key_blocks * batch * kv_heads
    return max(1, min(-(-_DKDV_MIN_PROGRAMS // base), n_query_blocks))


# ---------------------------------------------------------------------------------------------
# dQ kernel (loops over key blocks, like the forward)


def _dq_kernel(*refs, st: KernelCall):
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *rest = refs
    kvlen_ref = rest.pop(0) if st.has_kv_lengths else None
    kb_ref = rest.pop(0) if st.key_bias_dims else None
    bias_ref = rest.pop(0) if st.bias_dims else None
    seg = _pop_segments(st, rest)
    dq_ref, *rest = rest
    dbias_ref = rest.pop(0) if st.bias_grads[1] else None  # (bq, skv) row strip of d bias
    bq, bk = _dq_blocks(st)
    qi, b = pl.program_id(0), pl.program_id(1)
    q0 = qi * bq
    rows = q0 + jnp.arange(bq)
    row_ok = rows < st.sq
    tail_rows, tail_cols = st.sq % bq != 0, st.skv % bk != 0
    dmask, dvmask = _col_mask(st.d, st.dp), _col_mask(st.dv, st.dvp)
    q = _load(q_ref, mask=_and(row_ok[:, None], dmask))
    do = _load(do_ref, mask=_and(row_ok[:, None], dvmask))
    lse2 = _load(lse_ref, mask=row_ok, other=jnp.inf)
    delta = _load(delta_ref, mask=row_ok)
    if seg is not None:
        q_ids = _load(seg.q_ids, mask=row_ok, other=0)
    qk_scale = st.scale * LOG2E
    kv_end = _kv_end(st, kvlen_ref, b)
    needs_mask = st.windowed or st.has_kv_lengths or tail_cols

    def store_dbias(k0, ds):
        cols = k0 + jnp.arange(bk)
        m = _and(row_ok[:, None] if tail_rows else None,
                 (cols < st.skv)[None, :] if tail_cols else None)
        _store(dbias_ref.at[:, pl.ds(k0, bk)], ds, mask=m)

    def body(j, dq, masked):
        k0 = j * bk
        cols = k0 + jnp.arange(bk)
        kv_rows = (cols < st.skv)[:, None] if masked and tail_cols else None
        k = _load(k_ref, (pl.ds(k0, bk), slice(None)), mask=_and(kv_rows, dmask))
        v = _load(v_ref, (pl.ds(k0, bk), slice(None)), mask=_and(kv_rows, dvmask))
        s = _dot(q, k.T) * qk_scale
        extra = _bias_terms(st, kb_ref, bias_ref, pl.ds(k0, bk), (slice(None), pl.ds(k0, bk)),
                            rows, cols, tail_rows, masked and tail_cols)
        if extra is not None:
            s = s + extra
        p = jnp.exp2(s - lse2[:, None])
        if masked:
            p = jnp.where(_and((cols < kv_end)[None, :], _in_window(st, rows, cols)), p, 0.0)
        if seg is not None:  # the tail past skv (masked blocks only) is dropped just above
            k_ids = _load(seg.k_ids, pl.ds(k0, bk), mask=cols < st.skv if masked and tail_cols
                          else None, other=0)
            p = jnp.where(seg.same(q_ids, k_ids), p, 0.0)
        dp = _dot(do, v.T)
        ds = p * (dp - delta[:, None])
        if dbias_ref is not None:  # d bias = dS (exactly 0 where p was masked to 0)
            store_dbias(k0, ds)
        return dq + _dot(ds.astype(k.dtype), k)

    span = None if seg is None else seg.span(qi)
    dq = _over_key_blocks(st, body, jnp.zeros((bq, st.dp), jnp.float32), q0, bq, bk, kv_end,
                          needs_mask, span)
    _store(dq_ref, dq * st.scale, mask=_and(row_ok[:, None], dmask))
    if dbias_ref is not None and (needs_mask or span is not None):  # skipped d bias tiles: zeros
        lo, _, _, hi = _key_range(st, q0, bq, bk, kv_end, needs_mask, span)
        zero = lambda j, _: store_dbias(j * bk, jnp.zeros((bq, bk), jnp.float32))  # noqa: E731
        lax.fori_loop(0, lo, zero, None)
        lax.fori_loop(hi, pl.cdiv(st.skv, bk), zero, None)


def _backward(st: KernelCall, q, k, v, key_bias, bias, kv_lengths, out, lse, do, dlse,
              q_ids=None, kv_ids=None):
    """`(dq, dk, dv)`, then per `st.bias_grads` the float32 `dS` sums `(b, n, skv)` for the key
    bias and the full `dS` `(b, n, sq, skv)` for the bias; the caller sums broadcast dims.
    The segment ids come last so that callers without them (the Mosaic VJP) need not pass any."""
    batch = q.shape[0]
    heads = lse.shape[1]
    kv_heads = heads // st.groups
    g = st.groups
    # D_i = rowsum(dO_i * O_i) - dlse_i: the softmax Jacobian term, plus the lse cotangent
    # (d lse / d s = p), so a differentiable lse costs one subtraction.
    delta = jnp.einsum("bnsd,bnsd->bns" if st.layout == "bnsd" else "bsnd,bsnd->bns",
                       out.astype(jnp.float32), do.astype(jnp.float32))
    delta = delta - dlse.astype(jnp.float32)
    # The kernels want lse in base 2; an empty row (lse = -inf) becomes +inf so that its
    # p = exp2(s - lse2) is exactly 0, and with it all of its gradients.
    lse2 = jnp.where(jnp.isneginf(lse), jnp.inf, lse * LOG2E)
    params = _compiler_params(st.config.bwd)

    # dK/dV: grid over key blocks of each k/v head; the group's query heads come as one block.
    bq, bk = _dkdv_blocks(st)
    n_kb = pl.cdiv(st.skv, bk)
    splits = _dkdv_splits(n_kb, pl.cdiv(st.sq, bq), batch, kv_heads)
    kb = lambda j: lax.div(j, splits)  # noqa: E731  (grid axis 0 -> key block)
    grp = _SQ if g == 1 else g
    q_spec = _seq_spec(st, st.sq, grp, lambda j, b, h: (b, h, 0, 0))
    kv_spec = _seq_spec(st, bk, _SQ, lambda j, b, h: (b, h, kb(j), 0))
    row_spec = pl.BlockSpec((_SQ, grp, st.sq), lambda j, b, h: (b, h, 0))
    in_specs = [q_spec(st.dp), kv_spec(st.dp), kv_spec(st.dvp), q_spec(st.dvp), row_spec, row_spec]
    args = [q, k, v, do, lse2, delta]

    def mask_group(dims):  # the group's heads of a mask, or its single broadcast head
        return grp if dims[1] else _SQ

    _append_masks(
        st, args, in_specs, kv_lengths, key_bias, bias,
        lambda: pl.BlockSpec((_SQ, mask_group(st.key_bias_dims), bk),
                             lambda j, b, h: (*_bh(st.key_bias_dims, b, h), kb(j))),
        lambda: pl.BlockSpec((_SQ, mask_group(st.bias_dims), st.sq, bk),
                             lambda j, b, h: (*_bh(st.bias_dims, b, h), 0, kb(j))))
    _append_segments(st, args, in_specs, q_ids, kv_ids, bq, bk,
                     pl.BlockSpec((_SQ, st.sq), lambda j, b, h: (b, 0)),
                     pl.BlockSpec((_SQ, bk), lambda j, b, h: (b, kb(j))), by_key=True)
    if splits == 1:
        out_specs = [kv_spec(st.dp), kv_spec(st.dvp)]
        out_shape = [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)]
        # d key_bias per query head: the group's heads of this key block.
        dkb_spec = pl.BlockSpec((_SQ, grp, bk), lambda j, b, h: (b, h, kb(j)))
        dkb_shape = (batch, heads, st.skv)
    else:
        part_spec = lambda w: pl.BlockSpec(  # noqa: E731
            (_SQ, _SQ, _SQ, bk, w), lambda j, b, h: (lax.rem(j, splits), b, h, kb(j), 0))
        out_specs = [part_spec(st.dp), part_spec(st.dvp)]
        out_shape = [jax.ShapeDtypeStruct((splits, batch, kv_heads, n_kb * bk, w), jnp.float32)
                     for w in (st.dp, st.dvp)]
        dkb_spec = pl.BlockSpec((_SQ, _SQ, grp, bk),
                                lambda j, b, h: (lax.rem(j, splits), b, h, kb(j)))
        dkb_shape = (splits, batch, heads, n_kb * bk)
    if st.bias_grads[0]:
        out_specs.append(dkb_spec)
        out_shape.append(jax.ShapeDtypeStruct(dkb_shape, jnp.float32))
    dk, dv, *dkb = pl.pallas_call(
        functools.partial(_dkdv_kernel, st=st, splits=splits),
        grid=(n_kb * splits, batch, kv_heads), in_specs=in_specs, out_specs=out_specs,
        out_shape=out_shape, compiler_params=params, interpret=st.interpret,
        name="flash_attention_dkdv")(*args)
    if splits > 1:
        def total(part, width, like):
            x = part.sum(0)[:, :, :st.skv, :width].astype(like.dtype)
            return x if st.layout == "bnsd" else x.swapaxes(1, 2)
        dk, dv = total(dk, st.d, k), total(dv, st.dv, v)
        dkb = [x.sum(0)[:, :, :st.skv] for x in dkb]

    # dQ: grid over query blocks of each query head, like the forward.
    bq, bk = _dq_blocks(st)
    q_spec = _seq_spec(st, bq, _SQ, lambda i, b, h: (b, h, i, 0))
    kv_spec = _seq_spec(st, st.skv, _SQ, lambda i, b, h: (b, h // g, 0, 0))
    row_spec = pl.BlockSpec((_SQ, _SQ, bq), lambda i, b, h: (b, h, i))
    in_specs = [q_spec(st.dp), kv_spec(st.dp), kv_spec(st.dvp), q_spec(st.dvp), row_spec, row_spec]
    args = [q, k, v, do, lse2, delta]
    _append_row_block_inputs(st, args, in_specs, kv_lengths, key_bias, bias, q_ids, kv_ids, bq, bk)
    out_specs, out_shape = [q_spec(st.dp)], [jax.ShapeDtypeStruct(q.shape, q.dtype)]
    if st.bias_grads[1]:  # d bias: one (bq, skv) row strip per program, every tile written
        out_specs.append(pl.BlockSpec((_SQ, _SQ, bq, st.skv), lambda i, b, h: (b, h, i, 0)))
        out_shape.append(jax.ShapeDtypeStruct((batch, heads, st.sq, st.skv), jnp.float32))
    dq, *dbias = pl.pallas_call(
        functools.partial(_dq_kernel, st=st),
        grid=(pl.cdiv(st.sq, bq), batch, heads), in_specs=in_specs, out_specs=out_specs,
        out_shape=out_shape, compiler_params=params, interpret=st.interpret,
        name="flash_attention_dq")(*args)
    return (dq, dk, dv, *dkb, *dbias)
