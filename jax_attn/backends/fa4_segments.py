"""Packed sequences (segment ids) for the `fa4` backend: FA4's mask_mod and block sparsity.

FA4 4.0.0b36 takes a `mask_mod` (a CuTe function of batch, head, query and key index, reading
`aux_tensors`) and, on sm90, `block_sparse_tensors`: per tile, the key tiles where some pair is
kept but not all ("partial", the mask_mod runs there) and those where every pair is kept ("full",
no mask_mod). Tiles in neither list are skipped, so a packed batch costs about its prompts.

Three facts of that FA4 decide the design (flash_attn/cute/):
- given a mask_mod, its forward drops `causal` and the window (interface.py:443-444), while its
  backward keeps them and then never calls the mask_mod (mask.py:225: the mask_mod branch runs
  only when neither is set). So causality, windows and `kv_lengths` are folded into our own
  mask_mod (top-left aligned, our convention) and FA4 gets `causal=False`, no window and no
  `seqused_k` (its block-sparse backward asserts there is none: interface.py:2289-2295).
- the block-sparse tensors must use FA4's tile sizes for the call: `sparse_blocks`.
- a row with no kept key comes back as zeros with lse -inf (softmax.py:277-287, and
  flash_fwd_sm90.py:1231 for a tile with no block), and its backward adds nothing
  (flash_bwd_preprocess.py:486 reads lse -inf as 0, every P of the row is 0): no fix-up needed.

The block classification (`block_classes`) holds for any ids, sorted or not, and costs a sort
and a binary search per key block, far below the attention it prunes.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from ..contract import Spec

# The id tensors are padded by this many entries: FA4's forward calls the mask_mod for the rows of
# a query tile past `sq` without wrapping their index (mask.py:234: only tiles masked for the
# sequence length wrap), so it reads up to one tile (<= 192 rows on sm90) past the ids; those rows
# are never stored, their ids only must be readable.
ID_PAD = 256

Window = tuple  # (left, right), each an int or None: key j is kept iff i - left <= j <= i + right


@dataclasses.dataclass(frozen=True)
class SegmentPlan:
    """The static half of a call with segment ids: what the mask_mod folds in besides the ids, and
    the sparse block sizes `(q, kv)` of the forward and backward (`sparse_blocks`)."""

    window: Window | None  # `spec.window_bounds` (causal included), or None
    has_lengths: bool  # kv_lengths folded into the mask_mod (a third aux tensor)
    fwd_block: tuple[int, int]
    bwd_block: tuple[int, int]


def sparse_blocks(head_dim: int, value_dim: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """`(forward, backward)` sparse block sizes `(q rows, kv rows)` FA4 4.0.0b36 accepts on sm90
    for a mask_mod call (causal/local off, interface.py:443), mirroring flash_attn/cute/interface.py:

    forward: `_tile_size_fwd_sm90(d, dv, False, False)` (interface.py:151-183) picks (tile_m,
      tile_n); a sparse block of exactly that size leaves the tile unchanged
      (`_fit_sm90_fwd_tile_to_block_sparsity`, :186-197) and is what sm90 requires of the kv side
      (`normalize_block_sparse_config`, block_sparsity.py: kv block == tile_n without subtiles).
    backward: FA4's own sm90 default q block of 128 (interface.py:2317), for which
      `_tile_size_bwd_sm90(d, dv, False, False, 128)` (:216-290) picks tile_m dividing 128 (128 at
      d <= 64, else 64) and tile_n, which the kv block must equal (block_sparsity.py,
      `normalize_block_sparse_config_bwd`).
    A mismatch would make FA4 raise (a kv block other than tile_n) or subdivide correctly (a q
    block that tile_m divides); it cannot silently skip a tile that holds a kept pair.
    """
    if head_dim <= 64:
        fwd = (192, 128)
    elif head_dim <= 96:
        fwd = (192, 144)
    elif head_dim <= 128:
        fwd = (128, 128)
    elif head_dim <= 192:
        fwd = (128, 128 if value_dim <= 128 else 112)
    else:
        fwd = (128, 80)
    bwd_tile_n = 128 if head_dim <= 128 else 96 if head_dim <= 192 else 64
    return fwd, (128, bwd_tile_n)


def plan(spec: Spec) -> SegmentPlan:
    fwd, bwd = sparse_blocks(spec.head_dim, spec.value_dim)
    return SegmentPlan(spec.window_bounds, spec.has_kv_lengths, fwd, bwd)


def padded_ids(ids):
    """int32 `(b, s + ID_PAD)`: the ids with room for FA4's reads past the sequence (`ID_PAD`)."""
    return jnp.pad(ids.astype(jnp.int32), ((0, 0), (0, ID_PAD)))


def block_classes(q_ids, kv_ids, kv_lengths, window: Window | None, block: tuple[int, int]):
    """`(listed, full)`, bool `(b, q blocks, kv blocks)`: the tiles FA4 visits, and those where it
    may skip the mask_mod because every pair inside the sequences is kept (pairs past `sq` or `skv`
    are FA4's own sequence-length masking; keys past `kv_lengths` are ours).

    `full` is exact. `listed` is exact without a window (some pair has equal ids, its key before
    `kv_lengths`); with one it takes the tiles that hold such a pair and, separately, a pair inside
    the window, a superset only on the window's edge tiles, where the mask_mod then drops every
    pair: never a kept pair missed. A sort of each key block and a binary search of every query
    id in each, O(sq * kv blocks * log(block)) time and O(sq * kv blocks) memory (b * sq *
    skv / block_kv int32 entries: ~640 MB for one 128k-token sequence), not a compare of all
    (sq, skv) pairs.
    """
    bq, bk = block
    b, sq = q_ids.shape
    skv = kv_ids.shape[1]
    m, n = -(-sq // bq), -(-skv // bk)
    limit = (jnp.full((b, 1), skv) if kv_lengths is None
             else jnp.minimum(kv_lengths.astype(jnp.int32), skv)[:, None])  # keys that count: j < limit
    starts = jnp.arange(n) * bk
    ends = jnp.minimum(starts + bk, skv)  # one past each key block's last key inside the sequence
    # Edge padding repeats each row's last id: a tile's minimum and maximum id stay its own.
    q = jnp.pad(q_ids, ((0, 0), (0, m * bq - sq)), mode="edge").reshape(b, m, bq)
    k = jnp.pad(kv_ids, ((0, 0), (0, n * bk - skv)), mode="edge").reshape(b, n, bk)

    # Some pair with equal ids: is each query's id among the ids of each key block's counting keys?
    counts = (starts[:, None] + jnp.arange(bk))[None] < limit[:, :, None]  # (b, n, bk), a prefix per block
    # Keys that do not count take their block's first key's id: the block's set of ids is unchanged
    # when that key counts (counting keys are a prefix), and the block is dropped when it does not.
    k_sorted = jnp.sort(jnp.where(counts, k, k[:, :, :1]), axis=-1)
    search = functools.partial(jnp.searchsorted, method="scan_unrolled")  # no while loop: see masking
    at = jax.vmap(jax.vmap(search, (0, None)), (0, 0))(k_sorted, q_ids)  # (b, n, sq)
    member = jnp.take_along_axis(k_sorted, jnp.minimum(at, bk - 1), axis=-1) == q_ids[:, None, :]
    member = jnp.pad(member & counts[:, :, :1], ((0, 0), (0, 0), (0, m * bq - sq)))
    ids_any = jnp.swapaxes(jnp.any(member.reshape(b, n, m, bq), axis=-1), 1, 2)  # (b, m, n)

    # Every pair with equal ids: one id over the tile's rows, the same over its keys, all counting.
    q_one, k_one = q.min(-1) == q.max(-1), k.min(-1) == k.max(-1)
    ids_full = (q_one[:, :, None] & k_one[:, None, :] & (q[:, :, None, 0] == k[:, None, :, 0])
                & (ends[None] <= limit)[:, None, :])

    i0 = jnp.arange(m)[:, None] * bq
    i1 = jnp.minimum(i0 + bq, sq) - 1  # the tile's first and last query inside the sequence
    j0, j1 = starts[None, :], ends[None, :] - 1
    geometry_any = geometry_full = jnp.ones((m, n), bool)
    left, right = window or (None, None)
    if left is not None:
        geometry_any, geometry_full = geometry_any & (j1 >= i0 - left), geometry_full & (j0 >= i1 - left)
    if right is not None:
        geometry_any, geometry_full = geometry_any & (j0 <= i1 + right), geometry_full & (j1 <= i0 + right)
    return ids_any & geometry_any, ids_full & geometry_full


def _lists(selected):
    """FA4's count and index tensors for bool `(b, rows, cols)`: `(b, 1, rows)` counts and
    `(b, 1, rows, cols)` column indices, the selected ones first, ascending (FA4 reads the first
    `count` of each row and takes the last one first, the tile that holds the sequence's end)."""
    count = jnp.sum(selected, axis=-1, dtype=jnp.int32)
    index = jnp.argsort(jnp.logical_not(selected).astype(jnp.int8), axis=-1, stable=True)
    return count[:, None], index.astype(jnp.int32)[:, None]


def forward_blocks(q_ids, kv_ids, kv_lengths, segment_plan: SegmentPlan):
    """`(partial count, partial index, full count, full index)` per query block, for the forward
    (FA4's `BlockSparseTensorsTorch` fields, head axis 1: the ids are the same for every head)."""
    listed, full = block_classes(q_ids, kv_ids, kv_lengths, segment_plan.window, segment_plan.fwd_block)
    return (*_lists(listed & ~full), *_lists(full))


def backward_blocks(q_ids, kv_ids, kv_lengths, segment_plan: SegmentPlan):
    """The same per key block, listing query blocks: the backward's direction."""
    listed, full = block_classes(q_ids, kv_ids, kv_lengths, segment_plan.window, segment_plan.bwd_block)
    listed, full = (jnp.swapaxes(x, 1, 2) for x in (listed, full))
    return (*_lists(listed & ~full), *_lists(full))


@functools.lru_cache(maxsize=None)
def segment_mask_mod(window: Window | None, has_lengths: bool):
    """FA4's mask_mod for segment ids: key j is kept for query i of sample b iff
    `q_ids[b, i] == kv_ids[b, j]` (aux tensors 0 and 1), `j < kv_lengths[b]` (aux tensor 2, when
    `has_lengths`) and `i - left <= j <= i + right` (the window's sides that are not None).

    One function object per (window, has_lengths), kept by the cache: FA4 keys its compile cache
    on the function's source and the reprs of what it captures (utils.hash_callable), so every
    call of one geometry reuses one compiled kernel. It captures modules and plain values only,
    whose reprs hold no address, so the key is the same in every process (FA4's optional on-disk
    cache). Imports CuTe only when first asked for (on the GPU).
    """
    import cutlass
    import cutlass.cute as cute
    from flash_attn.cute import utils as fa_utils

    left, right = window or (None, None)

    @cute.jit
    def mask_mod(batch, head, q_idx, kv_idx, seqlen_info, aux_tensors):
        # Indices arrive as 1-element TensorSSAs; scalars read or captured become ones too.
        q_id = fa_utils.scalar_to_ssa(aux_tensors[0][batch[0], q_idx[0]], cutlass.Int32)
        kv_id = fa_utils.scalar_to_ssa(aux_tensors[1][batch[0], kv_idx[0]], cutlass.Int32)
        keep = q_id == kv_id
        if cutlass.const_expr(has_lengths):
            length = fa_utils.scalar_to_ssa(aux_tensors[2][batch[0]], cutlass.Int32)
            keep = keep & (kv_idx < length)
        if cutlass.const_expr(left is not None):
            keep = keep & (kv_idx >= q_idx - fa_utils.scalar_to_ssa(left, cutlass.Int32))
        if cutlass.const_expr(right is not None):
            keep = keep & (kv_idx <= q_idx + fa_utils.scalar_to_ssa(right, cutlass.Int32))
        return keep

    return mask_mod
