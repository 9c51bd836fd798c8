"""Tile-level pieces the Triton flash-attention kernels share: loads, masks, loops, BlockSpecs.

Inside a kernel: masked loads and stores (`_load`, `_store`: Triton tiles are powers of two, so
tails and head dims like 40 are read as zeros and written masked), float32-accumulating products
(`_dot`), the element masks (window, kv_lengths, segment ids) and the bias terms in base-2 units,
and `_over_key_blocks`, the key-block loop of the forward and dQ kernels. Outside: the BlockSpecs
that read q/k/v-like arrays in place in either layout and append the optional inputs.
"""
from __future__ import annotations

import functools
import math

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from .flash_call import _key_blocks, segment_spans

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
# Squeezed block dimension (`None` in older JAX).
_SQ = getattr(pl, "squeezed", None)


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


def _key_range(st, q0, bq, bk, kv_end, needs_mask, span=None):
    """`_key_blocks` (all blocks, unmasked, without `needs_mask`) narrowed to `span`: the
    `(lo, hi)` key blocks whose segment ids may meet this query block's (packed sequences)."""
    if not needs_mask:
        lo, hi = (0, pl.cdiv(st.skv, bk)) if span is None else span
        return lo, lo, hi, hi
    lo, full_lo, full_hi, hi = _key_blocks(st, q0, bq, bk, kv_end)
    if span is not None:
        lo = jnp.maximum(lo, span[0])
        hi = jnp.maximum(jnp.minimum(hi, span[1]), lo)
        full_lo = jnp.clip(full_lo, lo, hi)
        full_hi = jnp.clip(full_hi, full_lo, hi)
    return lo, full_lo, full_hi, hi


def _over_key_blocks(st, body, carry, q0, bq, bk, kv_end, needs_mask, span=None):
    """Run `body(j, carry, masked)` over the key blocks query block q0 can see (`_key_range`):
    masked on the edges, unmasked in between (online softmax and dQ sums are order-free)."""
    lo, full_lo, full_hi, hi = _key_range(st, q0, bq, bk, kv_end, needs_mask, span)
    if not needs_mask:
        return lax.fori_loop(lo, hi, functools.partial(body, masked=False), carry)
    if st.bounds[0] is not None:  # a left window edge; with none, full_lo == lo
        carry = lax.fori_loop(lo, full_lo, functools.partial(body, masked=True), carry)
    carry = lax.fori_loop(full_lo, full_hi, functools.partial(body, masked=False), carry)
    return lax.fori_loop(full_hi, hi, functools.partial(body, masked=True), carry)


# ---------------------------------------------------------------------------------------------
# Packed sequences inside a kernel


class _Segments:
    """The segment-id inputs of one kernel program: `ids` refs and its blocks' spans.

    `q_ids`/`k_ids` hold the program's ids (a block or the whole row, per the kernel's specs);
    `spans` the `(2, n_blocks)` rows of `flash_call.segment_spans` for the batch, indexed by the
    program's own block (query blocks for the forward and dQ, key blocks for dK/dV).
    """

    def __init__(self, q_ids, k_ids, spans):
        self.q_ids, self.k_ids, self.spans = q_ids, k_ids, spans

    def span(self, i):
        """`(first, end)` blocks of the other side that block i may share an id with."""
        return self.spans[0, i], self.spans[1, i]

    @staticmethod
    def same(q_ids, k_ids):
        """(bq, bk) bool: the query and the key belong to one segment."""
        return q_ids[:, None] == k_ids[None, :]


def _pop_segments(st, rest):
    """The three segment refs from the front of `rest` (None when the call has no segments)."""
    if not st.has_segments:
        return None
    return _Segments(*(rest.pop(0) for _ in range(3)))


def _append_segments(st, args, specs, q_ids, kv_ids, bq, bk, q_spec, k_spec, by_key=False):
    """Append q ids, kv ids, and the spans of the kernel's blocks (bq x bk tiles; per key block
    with `by_key`) with their specs.

    `q_spec`/`k_spec`: the BlockSpecs of the ids, per kernel (a block or the whole row); the
    spans, `(b, 2, n_blocks)` int32, are read whole per batch row (two scalars per program)."""
    if not st.has_segments:
        return
    spans = segment_spans(q_ids, kv_ids, bq, bk, by_key)
    args += [q_ids, kv_ids, spans]
    specs += [q_spec, k_spec, pl.BlockSpec((_SQ, 2, spans.shape[2]), _batch_row3)]


def _batch_row3(*ids):
    """Index map of a `(b, 2, n)` array read whole per batch: grid axis 1 is the batch."""
    return ids[1], 0, 0


# ---------------------------------------------------------------------------------------------
# BlockSpecs and launch parameters


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


def _append_row_block_inputs(st, args, specs, kv_lengths, key_bias, bias, q_ids, kv_ids, bq, bk):
    """`_append_masks` and `_append_segments` for a kernel gridded `(query block, batch, head)`
    (the forward and dQ): each program reads its `bq` rows of a full bias, its rows' ids, and
    every key's bias and ids."""
    _append_masks(
        st, args, specs, kv_lengths, key_bias, bias,
        lambda: pl.BlockSpec((_SQ, _SQ, st.skv), lambda i, b, h: (*_bh(st.key_bias_dims, b, h), 0)),
        lambda: pl.BlockSpec((_SQ, _SQ, bq, st.skv), lambda i, b, h: (*_bh(st.bias_dims, b, h), i, 0)))
    _append_segments(st, args, specs, q_ids, kv_ids, bq, bk,
                     pl.BlockSpec((_SQ, bq), lambda i, b, h: (b, i)),
                     pl.BlockSpec((_SQ, st.skv), lambda i, b, h: (b, 0)))


def _bh(dims, b, h):
    """Block index of a mask with size-1 batch/head dims (broadcast through the index map)."""
    return (b if dims[0] else 0), (h if dims[1] else 0)


def _compiler_params(c):
    return plgpu.CompilerParams(num_warps=c.num_warps, num_stages=c.num_stages)
