"""What one call of the Triton flash-attention kernels specializes on, and which tiles it runs.

`KernelCall` is the static (hashable) description of a call: shapes, masking rules, tuning. The
functions below decide, from it and a few traced scalars, which (query block, key block) tiles a
kernel visits and which of those need the element mask. They are plain `jnp`/`lax` arithmetic
on scalars and small arrays, so the kernels run them on device while the tests (and the segment
helpers) run the same code on the host: what the tests count is what the kernels do.

Tile ranges come in the form `lo <= full_lo <= full_hi <= hi`: blocks outside `[lo, hi)` are
never visited, `[full_lo, full_hi)` run without the window mask, the two edges run with it.
Packed sequences (segment ids) narrow `[lo, hi)` further to the span of blocks whose segment ids
can meet the program's own (`segment_spans`).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from . import configs


@jax.tree_util.register_static  # no leaves: the VJP residuals carry the backward's copy
@dataclasses.dataclass(frozen=True)
class KernelCall:
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
    # Packed sequences: int32 q_segment_ids (b, sq) and kv_segment_ids (b, skv) are passed.
    has_segments: bool = False

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


# ---------------------------------------------------------------------------------------------
# Block sizes


def _clamp(block, n):
    """No block larger than the (power-of-two padded) sequence; 16 is the tensor-core minimum."""
    return max(16, min(block, configs.head_dim_bucket(n)))


def _fwd_blocks(st):
    c = st.config.fwd
    return _clamp(c.block_q, st.sq), _clamp(c.block_k, st.skv)


def _dkdv_blocks(st):
    c = st.config.bwd
    return _clamp(c.block_q_dkv, st.sq), _clamp(c.block_k_dkv, st.skv)


def _dq_blocks(st):
    c = st.config.bwd
    return _clamp(c.block_q_dq, st.sq), _clamp(c.block_k_dq, st.skv)


# ---------------------------------------------------------------------------------------------
# Window and kv_lengths: contiguous block ranges


def _cdiv(a, b):
    return lax.div(a + b - 1, b)


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


# ---------------------------------------------------------------------------------------------
# Packed sequences: which tiles can hold a query and a key of the same segment
#
# Each block of queries (and of keys) is summarized by the min and max of its segment ids. A
# tile whose two ranges do not overlap holds no equal pair, so no visible (query, key): it is
# skipped. This needs no sorting: disjoint ranges imply distinct ids whatever their order.
# The kernels loop over the span from the first to the last block that meets theirs
# (`segment_spans`): loop bounds, not a branch per tile, so Triton still pipelines the loads.
# Sorted (packed) ids make the span exactly the tiles that meet, so a batch of short prompts
# runs about the diagonal tiles of each prompt; inside a span every pair is masked by equality.

_ID_MAX = np.iinfo(np.int32).max
_ID_MIN = np.iinfo(np.int32).min


def segment_ranges(ids, block):
    """`(b, 2, cdiv(s, block))` int32: per block of `block` positions of `ids (b, s)`, the min
    (row 0) and max (row 1) segment id. A partial last block covers only its real positions."""
    ids = jnp.asarray(ids, jnp.int32)
    b, s = ids.shape
    n = -(-s // block)
    pad = n * block - s
    lows = jnp.pad(ids, ((0, 0), (0, pad)), constant_values=_ID_MAX).reshape(b, n, block)
    highs = jnp.pad(ids, ((0, 0), (0, pad)), constant_values=_ID_MIN).reshape(b, n, block)
    return jnp.stack([lows.min(-1), highs.max(-1)], axis=1)


def segment_ranges_meet(q_lo, q_hi, k_lo, k_hi):
    """True where a query block of ids in `[q_lo, q_hi]` and a key block of ids in
    `[k_lo, k_hi]` may share an id: the tile runs. Scalars in the kernels, arrays on the host."""
    return (k_lo <= q_hi) & (q_lo <= k_hi)


def segment_tiles(q_ids, kv_ids, bq, bk):
    """`(b, n_qblocks, n_kblocks)` bool: the tiles that packed sequences alone let run, for
    blocks `bq` x `bk` (the kernels apply the window and kv_lengths ranges on top)."""
    qr, kr = segment_ranges(q_ids, bq), segment_ranges(kv_ids, bk)
    return segment_ranges_meet(qr[:, 0, :, None], qr[:, 1, :, None],
                               kr[:, 0, None, :], kr[:, 1, None, :])


def segment_spans(q_ids, kv_ids, bq, bk, by_key=False):
    """`(b, 2, n)` int32: per query block (per key block with `by_key`), the first block of the
    other side whose ids may meet its own (row 0) and one past the last (row 1); `(0, 0)` when
    none does. The kernels visit only the blocks of that span (see above)."""
    tiles = segment_tiles(q_ids, kv_ids, bq, bk)
    if by_key:
        tiles = jnp.swapaxes(tiles, 1, 2)
    n = tiles.shape[-1]
    hit = tiles.any(-1)
    first = jnp.argmax(tiles, -1)
    end = n - jnp.argmax(tiles[..., ::-1], -1)
    return jnp.stack([jnp.where(hit, first, 0), jnp.where(hit, end, 0)], axis=1).astype(jnp.int32)
