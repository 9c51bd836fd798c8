"""Flash attention in Pallas with the Triton lowering: forward, backward, and the VJP tying them.

One program of the forward kernel owns `block_q` queries of one head and walks the key blocks with
the online softmax (FlashAttention-2). The backward has two kernels: dK/dV, one program per key
block of a k/v head looping over the query blocks of every query head in its group (so GQA sums
happen in registers), and dQ, one program per query block looping over key blocks. Short key
sequences (77 text tokens) give too few key blocks to fill the GPU, so there each key block's query
loop is split over several programs whose float32 partial dK/dV are summed afterwards.

Shapes are arbitrary: Triton tiles must be powers of two, so the last query/key block and a head
dim like 40 or 72 are read with masked loads (zeros outside) and written with masked stores; no
array is padded or transposed. `layout="bsnd"` is read in place through the BlockSpec index maps.

Masking follows `jax_attn.reference`: a key is dropped when its bias is -inf (bool masks arrive as
0/-inf biases), it lies at or past `kv_lengths[b]`, or (causal, top-left aligned) after the query.
Dropped logits are -inf, never a large finite number, so a row with no key keeps `l_i == 0` and
returns zeros and `lse = -inf`; every `exp2` guards its `-inf - -inf`. Logits are kept in base 2
(`exp2` is one instruction), so `qk_scale = scale * log2(e)` and biases are multiplied by log2(e).
"""
from __future__ import annotations

import dataclasses
import functools
import math

import logging

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from . import configs, sharding

log = logging.getLogger(__name__)

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
# Squeezed block dimension (`None` in older JAX).
_SQ = getattr(pl, "squeezed", None)


@dataclasses.dataclass(frozen=True)
class _Static:
    """Everything the kernels specialize on (hashable: it is a custom_vjp nondiff argument)."""

    scale: float
    causal: bool
    layout: str
    sq: int
    skv: int
    d: int
    dv: int
    groups: int
    has_kv_lengths: bool
    key_bias_dims: tuple[bool, bool] | None  # (varies over batch, varies over heads) or None
    bias_dims: tuple[bool, bool] | None
    config: configs.Config
    interpret: bool

    @property
    def dp(self):  # head dims padded to a power of two inside the kernels
        return configs.head_dim_bucket(self.d)

    @property
    def dvp(self):
        return configs.head_dim_bucket(self.dv)


def _cdiv(a, b):
    return lax.div(a + b - 1, b)


def _col_mask(n, n_padded):
    """Columns of a padded head dim that hold data; None when there is no padding."""
    return None if n == n_padded else (jnp.arange(n_padded) < n)[None, :]


def _and(a, b):
    if a is None:
        return b
    return a if b is None else a & b


def _dot(a, b):
    """`a @ b` accumulated in float32; float32 inputs get IEEE products (Triton would use TF32)."""
    prec = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return lax.dot_general(a, b, (((1,), (0,)), ((), ())), precision=prec,
                           preferred_element_type=jnp.float32)


def _load(ref, idx=None, mask=None, other=0.0):
    ref = ref if idx is None else ref.at[idx]
    return plgpu.load(ref, mask=mask, other=None if mask is None else other)


def _store(ref, val, mask=None):
    plgpu.store(ref, val.astype(ref.dtype), mask=mask)


def _mk_idx(layout, head, rows, cols=slice(None)):
    """One indexer into a (heads, seq, dim) [bnsd] or (seq, heads, dim) [bsnd] group block."""
    if head is None:
        return (rows, cols)
    return (head, rows, cols) if layout == "bnsd" else (rows, head, cols)


def _kv_end(st, kvlen_ref, b):
    """Keys at or past this index are padding (dynamic when kv_lengths is given)."""
    if kvlen_ref is None:
        return st.skv
    return jnp.clip(kvlen_ref[b], 0, st.skv)


def _bias_terms(st, kb_ref, bias_ref, kb_idx, bias_idx, rows, cols, tail_rows, tail_cols):
    """Key bias (1, bk) plus full bias tile (bq, bk), in base-2 units; None when neither."""
    out = None
    if kb_ref is not None:
        kb = _load(kb_ref, kb_idx, mask=cols < st.skv if tail_cols else None)
        out = kb.astype(jnp.float32)[None, :] * LOG2E
    if bias_ref is not None:
        m = _and((rows < st.sq)[:, None] if tail_rows else None,
                 (cols < st.skv)[None, :] if tail_cols else None)
        tile = _load(bias_ref, bias_idx, mask=m, other=0.0).astype(jnp.float32) * LOG2E
        out = tile if out is None else out + tile
    return out


# ---------------------------------------------------------------------------------------------
# Forward


def _fwd_kernel(*refs, st: _Static):
    q_ref, k_ref, v_ref, *rest = refs
    kvlen_ref = rest.pop(0) if st.has_kv_lengths else None
    kb_ref = rest.pop(0) if st.key_bias_dims else None
    bias_ref = rest.pop(0) if st.bias_dims else None
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
    may_be_inf = st.key_bias_dims is not None or st.bias_dims is not None

    kv_end = _kv_end(st, kvlen_ref, b)
    hi = jnp.minimum(kv_end, q0 + bq) if st.causal else kv_end
    n_blocks = _cdiv(hi, bk)
    # Blocks below n_full need no mask: every key is < kv_end and (causal) <= the first query.
    n_full = lax.div(kv_end, bk)
    if st.causal:
        n_full = jnp.minimum(n_full, lax.div(q0 + 1, bk))
    needs_mask = st.causal or st.has_kv_lengths or tail_cols

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
            keep = (cols < kv_end)[None, :]
            if st.causal:
                keep = keep & (cols[None, :] <= rows[:, None])
            s = jnp.where(keep, s, -jnp.inf)
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
    if needs_mask:
        carry = lax.fori_loop(0, n_full, functools.partial(body, masked=False), carry)
        carry = lax.fori_loop(n_full, n_blocks, functools.partial(body, masked=True), carry)
    else:
        carry = lax.fori_loop(0, n_blocks, functools.partial(body, masked=False), carry)
    acc, m_i, l_i = carry
    empty = l_i == 0.0
    l_safe = jnp.where(empty, 1.0, l_i)
    _store(o_ref, acc / l_safe[:, None], mask=_and(row_ok[:, None], dvmask))
    _store(lse_ref, jnp.where(empty, -jnp.inf, (m_i + jnp.log2(l_safe)) * LN2), mask=row_ok)


def _fwd_blocks(st):
    c = st.config.fwd
    return _clamp(c.block_q, st.sq), _clamp(c.block_k, st.skv)


def _clamp(block, n):
    """No block larger than the (power-of-two padded) sequence; 16 is the tensor-core minimum."""
    return max(16, min(block, configs.head_dim_bucket(n)))


def _seq_spec(st, block_s, head_block, index):
    """`block_d -> BlockSpec` of a q/k/v-like array in the call's layout, read in place.

    `index(*program_ids) -> (batch, head, seq, dim)` block indices, whatever the layout; bsnd
    just swaps two entries. `head_block` is `_SQ` for one head or the group size for a
    (heads, seq, dim) block. `block_d` may exceed the head dim (padded to a power of two): the
    kernels mask those columns on load and store.
    """
    if st.layout == "bnsd":
        return lambda block_d: pl.BlockSpec((_SQ, head_block, block_s, block_d), index)

    def reorder(*ids):
        b, h, s, d = index(*ids)
        return b, s, h, d

    return lambda block_d: pl.BlockSpec((_SQ, block_s, head_block, block_d), reorder)


def _append_masks(st, args, specs, kv_lengths, key_bias, bias, key_bias_spec, bias_spec):
    """Append the optional kv_lengths, key bias and bias inputs with their specs.

    `key_bias_spec` and `bias_spec` are called only when that input exists (their index maps
    read `st.*_dims`, which are None otherwise). kv_lengths is read whole: one scalar per program.
    """
    if st.has_kv_lengths:
        args.append(kv_lengths)
        specs.append(pl.BlockSpec(kv_lengths.shape, lambda *_: (0,)))
    if st.key_bias_dims:
        args.append(key_bias)
        specs.append(key_bias_spec())
    if st.bias_dims:
        args.append(bias)
        specs.append(bias_spec())


def _bh(dims, b, h):
    """Block index of a mask with size-1 batch/head dims (broadcast through the index map)."""
    return (b if dims[0] else 0), (h if dims[1] else 0)


def _compiler_params(c):
    return plgpu.CompilerParams(num_warps=c.num_warps, num_stages=c.num_stages)


def _forward(st: _Static, q, k, v, key_bias, bias, kv_lengths):
    batch = q.shape[0]
    heads = q.shape[1] if st.layout == "bnsd" else q.shape[2]
    bq, bk = _fwd_blocks(st)
    g = st.groups
    grid = (pl.cdiv(st.sq, bq), batch, heads)
    q_spec = _seq_spec(st, bq, _SQ, lambda i, b, h: (b, h, i, 0))
    kv_spec = _seq_spec(st, st.skv, _SQ, lambda i, b, h: (b, h // g, 0, 0))
    in_specs = [q_spec(st.dp), kv_spec(st.dp), kv_spec(st.dvp)]
    args = [q, k, v]
    _append_masks(
        st, args, in_specs, kv_lengths, key_bias, bias,
        lambda: pl.BlockSpec((_SQ, _SQ, st.skv), lambda i, b, h: (*_bh(st.key_bias_dims, b, h), 0)),
        lambda: pl.BlockSpec((_SQ, _SQ, bq, st.skv), lambda i, b, h: (*_bh(st.bias_dims, b, h), i, 0)))
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


# ---------------------------------------------------------------------------------------------
# Backward: dK/dV kernel (loops over query blocks of each head in the group)


def _dkdv_kernel(*refs, st: _Static, splits: int):
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *rest = refs
    kvlen_ref = rest.pop(0) if st.has_kv_lengths else None
    kb_ref = rest.pop(0) if st.key_bias_dims else None
    bias_ref = rest.pop(0) if st.bias_dims else None
    dk_ref, dv_ref = rest
    c = st.config.bwd
    bq, bk = _clamp(c.block_q_dkv, st.sq), _clamp(c.block_k_dkv, st.skv)
    # Axis 0 enumerates (key block, query split); split `part` owns a contiguous run of query blocks.
    kj, part, b = lax.div(pl.program_id(0), splits), lax.rem(pl.program_id(0), splits), pl.program_id(1)
    k0 = kj * bk
    cols = k0 + jnp.arange(bk)
    tail_rows, tail_cols = st.sq % bq != 0, st.skv % bk != 0
    dmask, dvmask = _col_mask(st.d, st.dp), _col_mask(st.dv, st.dvp)
    kv_rows = (cols < st.skv)[:, None] if tail_cols else None
    k = _load(k_ref, mask=_and(kv_rows, dmask))
    v = _load(v_ref, mask=_and(kv_rows, dvmask))
    kv_end = _kv_end(st, kvlen_ref, b)
    col_ok = cols < kv_end if (st.has_kv_lengths or tail_cols) else None
    qk_scale = st.scale * LOG2E
    g = st.groups
    n_qblocks = pl.cdiv(st.sq, bq)

    q_lo = q_full = 0
    q_hi = n_qblocks
    if st.has_kv_lengths:  # an all-padding key block has no work
        q_hi = n_qblocks * (k0 < kv_end).astype(jnp.int32)
    if st.causal:
        # Queries from block q_full on see every key of this block; [q_lo, q_full) need the mask.
        q_lo = lax.div(k0, bq)
        q_full = jnp.minimum(jnp.minimum(_cdiv(k0 + bk - 1, bq), n_qblocks), q_hi)

    def body(i, carry, h, masked):
        dk, dv = carry
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
            keep = _and(keep, cols[None, :] <= rows[:, None])
        if keep is not None:
            p = jnp.where(keep, p, 0.0)
        dv = dv + _dot(p.astype(do.dtype).T, do)
        dp = _dot(do, v.T)
        ds = p * (dp - delta[:, None])
        dk = dk + _dot(ds.astype(q.dtype).T, q)
        return dk, dv

    per_split = pl.cdiv(n_qblocks, splits)
    first, end = part * per_split, jnp.minimum((part + 1) * per_split, n_qblocks)

    def head(h, carry):
        if st.causal:
            carry = lax.fori_loop(jnp.maximum(q_lo, first), jnp.minimum(q_full, end),
                                  functools.partial(body, h=h, masked=True), carry)
        return lax.fori_loop(jnp.maximum(q_full, first), jnp.minimum(q_hi, end),
                             functools.partial(body, h=h, masked=False), carry)

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


# Backward: dQ kernel (loops over key blocks, like the forward)


def _dq_kernel(*refs, st: _Static):
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *rest = refs
    kvlen_ref = rest.pop(0) if st.has_kv_lengths else None
    kb_ref = rest.pop(0) if st.key_bias_dims else None
    bias_ref = rest.pop(0) if st.bias_dims else None
    (dq_ref,) = rest
    c = st.config.bwd
    bq, bk = _clamp(c.block_q_dq, st.sq), _clamp(c.block_k_dq, st.skv)
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
    qk_scale = st.scale * LOG2E

    kv_end = _kv_end(st, kvlen_ref, b)
    hi = jnp.minimum(kv_end, q0 + bq) if st.causal else kv_end
    n_blocks = _cdiv(hi, bk)
    n_full = lax.div(kv_end, bk)
    if st.causal:
        n_full = jnp.minimum(n_full, lax.div(q0 + 1, bk))
    needs_mask = st.causal or st.has_kv_lengths or tail_cols

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
            keep = (cols < kv_end)[None, :]
            if st.causal:
                keep = keep & (cols[None, :] <= rows[:, None])
            p = jnp.where(keep, p, 0.0)
        dp = _dot(do, v.T)
        ds = p * (dp - delta[:, None])
        return dq + _dot(ds.astype(k.dtype), k)

    dq = jnp.zeros((bq, st.dp), jnp.float32)
    if needs_mask:
        dq = lax.fori_loop(0, n_full, functools.partial(body, masked=False), dq)
        dq = lax.fori_loop(n_full, n_blocks, functools.partial(body, masked=True), dq)
    else:
        dq = lax.fori_loop(0, n_blocks, functools.partial(body, masked=False), dq)
    _store(dq_ref, dq * st.scale, mask=_and(row_ok[:, None], dmask))


def _backward(st: _Static, q, k, v, key_bias, bias, kv_lengths, out, lse, do, dlse):
    batch = q.shape[0]
    heads = lse.shape[1]
    kv_heads = heads // st.groups
    g = st.groups
    c = st.config.bwd
    # D_i = rowsum(dO_i * O_i) - dlse_i: the softmax Jacobian term, plus the lse cotangent
    # (d lse / d s = p), so a differentiable lse costs one subtraction.
    delta = jnp.einsum("bnsd,bnsd->bns" if st.layout == "bnsd" else "bsnd,bsnd->bns",
                       out.astype(jnp.float32), do.astype(jnp.float32))
    delta = delta - dlse.astype(jnp.float32)
    # The kernels want lse in base 2; an empty row (lse = -inf) becomes +inf so that its
    # p = exp2(s - lse2) is exactly 0, and with it all of its gradients.
    lse2 = jnp.where(jnp.isneginf(lse), jnp.inf, lse * LOG2E)
    params = _compiler_params(c)

    # dK/dV: grid over key blocks of each k/v head; the group's query heads come as one block.
    bq, bk = _clamp(c.block_q_dkv, st.sq), _clamp(c.block_k_dkv, st.skv)
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
    if splits == 1:
        out_specs = [kv_spec(st.dp), kv_spec(st.dvp)]
        out_shape = [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)]
    else:
        part_spec = lambda w: pl.BlockSpec(  # noqa: E731
            (_SQ, _SQ, _SQ, bk, w), lambda j, b, h: (lax.rem(j, splits), b, h, kb(j), 0))
        out_specs = [part_spec(st.dp), part_spec(st.dvp)]
        out_shape = [jax.ShapeDtypeStruct((splits, batch, kv_heads, n_kb * bk, w), jnp.float32)
                     for w in (st.dp, st.dvp)]
    dk, dv = pl.pallas_call(
        functools.partial(_dkdv_kernel, st=st, splits=splits),
        grid=(n_kb * splits, batch, kv_heads), in_specs=in_specs, out_specs=out_specs,
        out_shape=out_shape, compiler_params=params, interpret=st.interpret,
        name="flash_attention_dkdv")(*args)
    if splits > 1:
        def total(part, width, like):
            x = part.sum(0)[:, :, :st.skv, :width].astype(like.dtype)
            return x if st.layout == "bnsd" else x.swapaxes(1, 2)
        dk, dv = total(dk, st.d, k), total(dv, st.dv, v)

    # dQ: grid over query blocks of each query head, like the forward.
    bq, bk = _clamp(c.block_q_dq, st.sq), _clamp(c.block_k_dq, st.skv)
    q_spec = _seq_spec(st, bq, _SQ, lambda i, b, h: (b, h, i, 0))
    kv_spec = _seq_spec(st, st.skv, _SQ, lambda i, b, h: (b, h // g, 0, 0))
    row_spec = pl.BlockSpec((_SQ, _SQ, bq), lambda i, b, h: (b, h, i))
    in_specs = [q_spec(st.dp), kv_spec(st.dp), kv_spec(st.dvp), q_spec(st.dvp), row_spec, row_spec]
    args = [q, k, v, do, lse2, delta]
    _append_masks(
        st, args, in_specs, kv_lengths, key_bias, bias,
        lambda: pl.BlockSpec((_SQ, _SQ, st.skv), lambda i, b, h: (*_bh(st.key_bias_dims, b, h), 0)),
        lambda: pl.BlockSpec((_SQ, _SQ, bq, st.skv), lambda i, b, h: (*_bh(st.bias_dims, b, h), i, 0)))
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, st=st),
        grid=(pl.cdiv(st.sq, bq), batch, heads), in_specs=in_specs, out_specs=q_spec(st.dp),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=params, interpret=st.interpret, name="flash_attention_dq")(*args)
    return dq, dk, dv


# ---------------------------------------------------------------------------------------------
# VJP


# The kernel calls as the partitioner sees them: batch/head-sharded operands stay sharded and each
# device runs the kernel on its shard; sequences and head dims are gathered (see sharding.py).
_forward_sharded = sharding.partitioned(_forward, "fwd")
_backward_sharded = sharding.partitioned(_backward, "bwd")


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(st, q, k, v, key_bias, bias, kv_lengths):
    return _forward_sharded(st, q, k, v, key_bias, bias, kv_lengths)


def _flash_fwd(st, q, k, v, key_bias, bias, kv_lengths):
    out, lse = _forward_sharded(st, q, k, v, key_bias, bias, kv_lengths)
    return (out, lse), (q, k, v, key_bias, bias, kv_lengths, out, lse)


def _flash_bwd(st, res, cotangents):
    q, k, v, key_bias, bias, kv_lengths, out, lse = res
    do, dlse = cotangents
    dq, dk, dv = _backward_sharded(st, q, k, v, key_bias, bias, kv_lengths, out, lse, do, dlse)
    # Masks and biases are constants here (bias gradients are not supported), lengths are ints.
    return dq, dk, dv, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


# ---------------------------------------------------------------------------------------------
# Public entry point


def _pad4(x):
    return x.reshape((1,) * (4 - x.ndim) + x.shape)


def flash_attention(q, k, v, *, bias=None, kv_lengths=None, key_mask=None, is_causal=False,
                    scale=None, layout="bnsd", return_lse=False, config=None, interpret=False):
    """Flash attention forward (differentiable in q, k, v and the returned lse).

    q `(b, n, sq, d)`, k `(b, n_kv, skv, d)`, v `(b, n_kv, skv, dv)` (or `(b, s, n, d)` with
    `layout="bsnd"`), `n % n_kv == 0`. `bias`: additive float, broadcastable to `(b, n, sq, skv)`
    (-inf drops a key; no gradient flows to it). `key_mask`: bool (True = attend) broadcastable to
    `(b, 1|n, 1, skv)`. `kv_lengths (b,)`: keys at or past it are padding. `is_causal`: key j is
    visible to query i iff j <= i. Returns `out` in q's layout and dtype and, with `return_lse`,
    the float32 natural log-sum-exp `(b, n, sq)` of the scaled, biased logits (-inf for empty rows).
    `config`: a `configs.Config`; by default the tuned table's entry for this GPU.
    """
    if layout not in ("bnsd", "bsnd"):
        raise ValueError(f"layout must be 'bnsd' or 'bsnd', got {layout!r}")

    def bnsd(shape):
        return tuple(shape) if layout == "bnsd" else (shape[0], shape[2], shape[1], shape[3])

    b, n, sq, d = bnsd(q.shape)
    _, n_kv, skv, _ = bnsd(k.shape)
    dv = v.shape[-1]
    if n % n_kv:
        raise ValueError(f"q heads ({n}) must be a multiple of k/v heads ({n_kv})")
    if max(d, dv) > 256:
        raise ValueError(f"head dims up to 256 are supported, got d={d}, dv={dv}")
    if q.dtype not in (jnp.float16, jnp.bfloat16, jnp.float32):
        raise TypeError(f"q/k/v must be float16, bfloat16 or float32, got {q.dtype}")
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)

    key_bias = None
    if key_mask is not None:
        key_mask = _pad4(jnp.asarray(key_mask))
        if key_mask.shape[2] != 1:
            raise ValueError(f"key_mask must be broadcastable to (b, 1|n, 1, skv), got {key_mask.shape}")
        key_bias = jnp.where(key_mask, 0.0, -jnp.inf).astype(jnp.float32)
    if bias is not None:
        bias = _pad4(jnp.asarray(bias))
        if bias.shape[2] == 1:  # one row shared by every query: a key bias, read as a vector
            kb = bias.astype(jnp.float32)
            key_bias = kb if key_bias is None else key_bias + kb
            bias = None
        elif bias.shape[3] == 1:  # a per-query bias only matters where it is -inf; rare
            bias = jnp.broadcast_to(bias, bias.shape[:3] + (skv,))
    if key_bias is not None:
        key_bias = jnp.broadcast_to(key_bias, key_bias.shape[:3] + (skv,))[:, :, 0, :]
    if kv_lengths is not None:
        kv_lengths = jnp.asarray(kv_lengths, jnp.int32)

    def dims(x):
        return None if x is None else (x.shape[0] != 1, x.shape[1] != 1)

    if config is None:
        config = configs.get_config(d, jnp.dtype(q.dtype).name, _compute_capability(interpret))
        log.debug("flash_attention d=%d %s: %s", d, jnp.dtype(q.dtype).name, config)
    st = _Static(scale=scale, causal=bool(is_causal), layout=layout, sq=sq, skv=skv, d=d, dv=dv,
                 groups=n // n_kv, has_kv_lengths=kv_lengths is not None,
                 key_bias_dims=dims(key_bias), bias_dims=dims(bias),
                 config=config, interpret=bool(interpret))
    out, lse = _flash(st, q, k, v, key_bias, bias, kv_lengths)
    return (out, lse) if return_lse else out


def _compute_capability(interpret):
    if interpret or jax.default_backend() != "gpu":
        return None
    cc = getattr(jax.devices()[0], "compute_capability", None)
    return None if not cc else tuple(int(x) for x in str(cc).split(".")[:2])
