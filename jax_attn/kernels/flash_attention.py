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
0/-inf biases), it lies at or past `kv_lengths[b]`, or outside the query's window: query i sees
keys `[i - left, i + right]` (`window=(left, right)`, None = unbounded; causal, top-left aligned,
is `right = 0`). Key blocks outside every row's window are never visited: each loop runs over the
block range its tile can see, and only the blocks on a window edge (or the kv_lengths / tail
edge) apply the element mask. Dropped logits are -inf, never a large finite number, so a row
with no key keeps `l_i == 0` and returns zeros and `lse = -inf`; every `exp2` guards its
`-inf - -inf`. Logits are kept in base 2 (`exp2` is one instruction), so `qk_scale = scale *
log2(e)` and biases are multiplied by log2(e).

Bias gradients are computed only when a bias is differentiated (the custom VJP sees which inputs
are perturbed): d bias = dS = P * (dP - D), the gradient w.r.t. the natural-unit logits. The dK/dV
kernel, which holds dS per key block, sums its columns for the per-key bias; the dQ kernel writes
dS tiles for a full bias (zeros for the tiles it skips). Neither materializes an (sq, skv) array
unless the bias itself is one.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import operator

import logging

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import SymbolicZero
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from . import configs, sharding

log = logging.getLogger(__name__)

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
# Squeezed block dimension (`None` in older JAX).
_SQ = getattr(pl, "squeezed", None)


@jax.tree_util.register_static  # no leaves: the VJP residuals carry the backward's copy
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
    window: tuple[int | None, int | None] | None = None  # (left, right); see `bounds`
    # Which bias gradients the backward returns: (d key_bias, d bias). Set by the VJP when that
    # input is differentiated; otherwise the kernels do none of that work.
    bias_grads: tuple[bool, bool] = (False, False)

    @property
    def bounds(self):
        """`(left, right)`: query i sees keys `[i - left, i + right]`, causal folded in (then
        right <= 0); None is unbounded on that side."""
        left, right = self.window or (None, None)
        if self.causal:
            right = 0 if right is None else min(right, 0)
        return left, right

    @property
    def windowed(self):
        return self.bounds != (None, None)

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


def _in_window(st, rows, cols):
    """(rows, cols) bool: the key is in the query's window (causal included); None: unbounded."""
    left, right = st.bounds
    keep = None
    if left is not None:
        keep = cols[None, :] >= rows[:, None] - left
    if right is not None:
        keep = _and(keep, cols[None, :] <= rows[:, None] + right)
    return keep


def _key_blocks(st, q0, bq, bk, kv_end):
    """The key blocks query block `[q0, q0 + bq)` visits, as `lo <= full_lo <= full_hi <= hi`:
    `[full_lo, full_hi)` need no mask (every row of the tile sees every key: inside each row's
    window and below kv_end); `[lo, full_lo)` and `[full_hi, hi)` are edge blocks, masked. Blocks
    outside `[lo, hi)` hold no key any row of the tile can see."""
    left, right = st.bounds
    last_row = jnp.minimum(q0 + bq, st.sq) - 1  # rows past sq are padding: they see nothing
    first = 0 if left is None else jnp.maximum(q0 - left, 0)  # first visible key of the tile
    end = kv_end if right is None else jnp.minimum(kv_end, last_row + right + 1)  # one past last
    lo = lax.div(first, bk)
    hi = jnp.where(first < end, _cdiv(end, bk), lo)
    # Unmasked: k0 >= (last row) - left, k0 + bk - 1 <= q0 + right and k0 + bk <= kv_end.
    full_lo = lo
    if left is not None:
        full_lo = jnp.maximum(_cdiv(jnp.maximum(q0 + bq - 1 - left, 0), bk), lo)
    full_lo = jnp.minimum(full_lo, hi)
    full_hi = lax.div(kv_end, bk)
    if right is not None:
        full_hi = jnp.minimum(full_hi, lax.div(q0 + right + 1, bk))
    full_hi = jnp.minimum(jnp.maximum(full_hi, full_lo), hi)
    return lo, full_lo, full_hi, hi


def _query_blocks(st, k0, bq, bk, kv_end):
    """The query blocks that see key block `[k0, k0 + bk)`, as `lo <= full_lo <= full_hi <= hi`:
    every row of `[full_lo, full_hi)` has the whole block inside its window (kv_lengths and the
    key tail are masked separately, per column); `[lo, full_lo)` and `[full_hi, hi)` need the
    window mask. Empty when the block is all padding or no query's window reaches it."""
    left, right = st.bounds
    last_key = jnp.minimum(k0 + bk, kv_end) - 1
    first = 0 if right is None else jnp.maximum(k0 - right, 0)  # first row that sees a key
    last = st.sq - 1 if left is None else jnp.minimum(last_key + left, st.sq - 1)  # last row
    lo = lax.div(first, bq)
    hi = jnp.where((first <= last) & (k0 < kv_end), lax.div(jnp.maximum(last, 0), bq) + 1, lo)
    # Unmasked: q0 >= k0 + bk - 1 - right and q0 + bq - 1 <= k0 + left.
    full_lo = lo
    if right is not None:
        full_lo = jnp.maximum(_cdiv(jnp.maximum(k0 + bk - 1 - right, 0), bq), lo)
    full_lo = jnp.minimum(full_lo, hi)
    full_hi = hi
    if left is not None:
        full_hi = jnp.minimum(jnp.maximum(lax.div(k0 + left + 1, bq), full_lo), hi)
    return lo, full_lo, full_hi, hi


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
    carry = _over_key_blocks(st, body, carry, q0, bq, bk, kv_end, needs_mask)
    acc, m_i, l_i = carry
    empty = l_i == 0.0
    l_safe = jnp.where(empty, 1.0, l_i)
    _store(o_ref, acc / l_safe[:, None], mask=_and(row_ok[:, None], dvmask))
    _store(lse_ref, jnp.where(empty, -jnp.inf, (m_i + jnp.log2(l_safe)) * LN2), mask=row_ok)


def _over_key_blocks(st, body, carry, q0, bq, bk, kv_end, needs_mask):
    """Run `body(j, carry, masked)` over the key blocks query block q0 can see (`_key_blocks`):
    masked on the edges, unmasked in between (online softmax and dQ sums are order-free)."""
    if not needs_mask:
        return lax.fori_loop(0, pl.cdiv(st.skv, bk), functools.partial(body, masked=False), carry)
    lo, full_lo, full_hi, hi = _key_blocks(st, q0, bq, bk, kv_end)
    if st.bounds[0] is not None:  # a left window edge; with none, full_lo == lo
        carry = lax.fori_loop(lo, full_lo, functools.partial(body, masked=True), carry)
    carry = lax.fori_loop(full_lo, full_hi, functools.partial(body, masked=False), carry)
    return lax.fori_loop(full_hi, hi, functools.partial(body, masked=True), carry)


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
    dk_ref, dv_ref, *rest = rest
    dkb_ref = rest.pop(0) if st.bias_grads[0] else None  # d key_bias, per query head
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
    lo, full_lo, full_hi, hi = _query_blocks(st, k0, bq, bk, kv_end)
    left, right = st.bounds
    # This split's share of each range: masked edges (only where the window has that edge).
    runs = (((lo, full_lo, True),) if right is not None else ()) + ((full_lo, full_hi, False),) + (
        ((full_hi, hi, True),) if left is not None else ())

    def head(h, carry):
        if dkb_ref is not None:
            carry = (*carry, jnp.zeros((bk, 16), jnp.float32))
        for a, z, masked in runs:
            carry = lax.fori_loop(jnp.maximum(a, first), jnp.minimum(z, end),
                                  functools.partial(body, h=h, masked=masked), carry)
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


# Backward: dQ kernel (loops over key blocks, like the forward)


def _dq_kernel(*refs, st: _Static):
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *rest = refs
    kvlen_ref = rest.pop(0) if st.has_kv_lengths else None
    kb_ref = rest.pop(0) if st.key_bias_dims else None
    bias_ref = rest.pop(0) if st.bias_dims else None
    dq_ref, *rest = rest
    dbias_ref = rest.pop(0) if st.bias_grads[1] else None  # (bq, skv) row strip of d bias
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
        dp = _dot(do, v.T)
        ds = p * (dp - delta[:, None])
        if dbias_ref is not None:  # d bias = dS (exactly 0 where p was masked to 0)
            store_dbias(k0, ds)
        return dq + _dot(ds.astype(k.dtype), k)

    dq = _over_key_blocks(st, body, jnp.zeros((bq, st.dp), jnp.float32), q0, bq, bk, kv_end,
                          needs_mask)
    _store(dq_ref, dq * st.scale, mask=_and(row_ok[:, None], dmask))
    if dbias_ref is not None and needs_mask:  # the skipped tiles of d bias are zeros
        lo, _, _, hi = _key_blocks(st, q0, bq, bk, kv_end)
        zero = lambda j, _: store_dbias(j * bk, jnp.zeros((bq, bk), jnp.float32))  # noqa: E731
        lax.fori_loop(0, lo, zero, None)
        lax.fori_loop(hi, pl.cdiv(st.skv, bk), zero, None)


def _backward(st: _Static, q, k, v, key_bias, bias, kv_lengths, out, lse, do, dlse):
    """`(dq, dk, dv)`, then per `st.bias_grads` the float32 `dS` sums `(b, n, skv)` for the key
    bias and the full `dS` `(b, n, sq, skv)` for the bias; the caller sums broadcast dims."""
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


# ---------------------------------------------------------------------------------------------
# VJP


# The kernel calls as the partitioner sees them: batch/head-sharded operands stay sharded and each
# device runs the kernel on its shard; sequences and head dims are gathered (see sharding.py).
_forward_sharded = sharding.partitioned(_forward, "fwd")
_backward_sharded = sharding.partitioned(_backward, "bwd")


@functools.cache
def _backward_with_bias_grads(bias_grads):
    """`_backward_sharded` with the bias gradients it returns under `st.bias_grads` as results:
    full `(b, n, ...)` arrays that split over batch and heads like the rest (the broadcast dims
    are summed by the caller, outside, so that a sharded sum is XLA's all-reduce)."""
    if not any(bias_grads):
        return _backward_sharded
    if sharding.custom_partitioning is None:  # pragma: no cover
        return _backward
    roles = tuple(r for r, want in zip(("key_bias", "bias"), bias_grads) if want)
    return sharding._make(_backward, sharding._BWD_IN, sharding._BWD_OUT + roles,
                          sharding.triton_operands)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(st, q, k, v, key_bias, bias, kv_lengths):
    return _forward_sharded(st, q, k, v, key_bias, bias, kv_lengths)


def _flash_fwd(st, q, k, v, key_bias, bias, kv_lengths):
    # symbolic_zeros: each array argument arrives as CustomVJPPrimal(value, perturbed), so a bias
    # that is not differentiated (a mask, a constant) costs the backward nothing.
    wants = tuple(x is not None and x.perturbed for x in (key_bias, bias))
    q, k, v, key_bias, bias, kv_lengths = (
        None if x is None else x.value for x in (q, k, v, key_bias, bias, kv_lengths))
    out, lse = _forward_sharded(st, q, k, v, key_bias, bias, kv_lengths)
    st_bwd = dataclasses.replace(st, bias_grads=wants)
    return (out, lse), (st_bwd, q, k, v, key_bias, bias, kv_lengths, out, lse)


def _sum_to(x, like):
    """A full-size bias gradient summed over `like`'s broadcast (size-1) dims, in its dtype."""
    axes = tuple(a for a, (n, m) in enumerate(zip(like.shape, x.shape)) if n == 1 and m != 1)
    return x.sum(axes, keepdims=True).astype(like.dtype)


def _flash_bwd(st, res, cotangents):
    st, q, k, v, key_bias, bias, kv_lengths, out, lse = res
    # An unused output (out, or lse when not returned) has a symbolic zero cotangent.
    do, dlse = (jnp.zeros(c.shape, c.dtype) if isinstance(c, SymbolicZero) else c
                for c in cotangents)
    dq, dk, dv, *extra = _backward_with_bias_grads(st.bias_grads)(
        st, q, k, v, key_bias, bias, kv_lengths, out, lse, do, dlse)
    dkb = _sum_to(extra.pop(0), key_bias) if st.bias_grads[0] else None
    dbias = _sum_to(extra.pop(0), bias) if st.bias_grads[1] else None
    return dq, dk, dv, dkb, dbias, None  # kv_lengths: integers


_flash.defvjp(_flash_fwd, _flash_bwd, symbolic_zeros=True)


# ---------------------------------------------------------------------------------------------
# Public entry point


def _pad4(x):
    return x.reshape((1,) * (4 - x.ndim) + x.shape)


def flash_attention(q, k, v, *, bias=None, kv_lengths=None, key_mask=None, is_causal=False,
                    window=None, scale=None, layout="bnsd", return_lse=False, config=None,
                    interpret=False):
    """Flash attention (differentiable in q, k, v, a float bias and the returned lse).

    q `(b, n, sq, d)`, k `(b, n_kv, skv, d)`, v `(b, n_kv, skv, dv)` (or `(b, s, n, d)` with
    `layout="bsnd"`), `n % n_kv == 0`. `bias`: additive float, broadcastable to `(b, n, sq, skv)`;
    -inf drops a key. Its gradient is computed only when it is differentiated; a bias with query
    dim 1 is read (and differentiated) as one vector per batch/head, any other as full tiles, so
    its gradient costs a float32 `(b, n, sq, skv)` buffer. `key_mask`: bool (True = attend)
    broadcastable to `(b, 1|n, 1, skv)`. `kv_lengths (b,)`: keys at or past it are padding.
    `is_causal`: key j is visible to query i iff j <= i. `window`: `(left, right)` (jax.nn's
    `local_window_size`; an int w means `(w, w)`), each an int >= 0 or None (unbounded): key j is
    visible to query i iff `i - left <= j <= i + right`; key blocks outside every window are
    skipped. A query that sees no key gets zeros (and zero gradients). Returns `out` in q's layout
    and dtype and, with `return_lse`, the float32 natural log-sum-exp `(b, n, sq)` of the scaled,
    biased logits (-inf for empty rows). `config`: a `configs.Config`; by default the tuned
    table's entry for this GPU.
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
    window = _check_window(window)

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
        elif bias.shape[3] == 1:  # per query: only its -inf and its gradient (d lse) matter; rare
            bias = jnp.broadcast_to(bias, bias.shape[:3] + (skv,))
    if key_bias is not None:
        key_bias = jnp.broadcast_to(key_bias, key_bias.shape[:3] + (skv,))[:, :, 0, :]
    if kv_lengths is not None:
        kv_lengths = jnp.asarray(kv_lengths, jnp.int32)

    def dims(x):
        return None if x is None else (x.shape[0] != 1, x.shape[1] != 1)

    if config is None:
        cc = _compute_capability(interpret)
        config = configs.get_config(d, jnp.dtype(q.dtype).name, cc)
        if bias is not None:  # a full bias tile per pipeline stage: keep within shared memory
            config = configs.fit_forward(config, d, dv, jnp.dtype(q.dtype).itemsize,
                                         jnp.dtype(bias.dtype).itemsize, cc)
        log.debug("flash_attention d=%d %s: %s", d, jnp.dtype(q.dtype).name, config)
    st = _Static(scale=scale, causal=bool(is_causal), layout=layout, sq=sq, skv=skv, d=d, dv=dv,
                 groups=n // n_kv, has_kv_lengths=kv_lengths is not None,
                 key_bias_dims=dims(key_bias), bias_dims=dims(bias),
                 config=config, interpret=bool(interpret), window=window)
    out, lse = _flash(st, q, k, v, key_bias, bias, kv_lengths)
    return (out, lse) if return_lse else out


def _check_window(window):
    """`(left, right)` of Python ints >= 0 or None; None when unbounded on both sides."""
    if window is None:
        return None

    def side(w):
        if w is None:
            return None
        try:
            w = operator.index(w)  # ints, numpy ints; not floats
        except TypeError:
            w = -1
        if w < 0:
            raise ValueError(f"window must be an int >= 0 or a (left, right) pair of ints >= 0 "
                             f"or None, got {window!r}")
        return w

    if isinstance(window, (tuple, list)):
        if len(window) != 2:
            raise ValueError(f"window must be an int or a (left, right) pair, got {window!r}")
        pair = (side(window[0]), side(window[1]))
    else:
        pair = (side(window),) * 2
    return None if pair == (None, None) else pair


def _compute_capability(interpret):
    if interpret or jax.default_backend() != "gpu":
        return None
    cc = getattr(jax.devices()[0], "compute_capability", None)
    return None if not cc else tuple(int(x) for x in str(cc).split(".")[:2])
