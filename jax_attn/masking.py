"""Mask algebra shared by the jnp backends: which logits are kept, and which query rows are empty.

A key is dropped when the bool mask is False, the bias is -inf, it lies at or past
`kv_lengths[b]`, outside the query's window (`spec.window_bounds`, causal included), or in another
segment than the query (`q_segment_ids`/`kv_segment_ids`, packed sequences); that
geometry, and which keys any query sees, are `jax_attn.visibility`'s, shared with torch_ref.
A row is empty when no key is kept; that is decided from visibility alone, never from values,
so a NaN in a visible logit stays NaN instead of reading as "empty". Empty rows produce zeros; backends that
cannot do that natively get `EmptyRows` to unmask such rows and zero them after.

Masked logits are set to a large finite negative number, not -inf, so that `jax.debug_infs`
stays quiet; the keep mask, not the value, is what removes them.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from . import visibility
from .contract import Spec
from .visibility import restrict, window_keep

# Masked logits: finite (see the module docstring), far below any real logit, with room left
# for `s - max` not to overflow to -inf (jax.nn uses the same margin).
MASKED = -0.7 * float(np.finfo(np.float32).max)


def keep_and_bias(spec: Spec, mask, kv_lengths, q_pos, k_pos, kv_limit=None, segments=None):
    """`(keep, bias)` for query positions `q_pos` and key positions `k_pos`.

    `mask` is the caller's mask already cut to these positions (rank 4, broadcastable), and
    `segments`, when given, `(q_segment_ids, kv_segment_ids)` cut to them too.
    `kv_limit` drops keys at or past it (padding added by a backend). Each result is broadcastable
    to `(b, n, len(q_pos), len(k_pos))`, or None when nothing applies.
    """
    keep = bias = None
    if mask is not None and spec.mask_kind == "bool":
        keep = mask
    elif mask is not None:
        finite = ~jnp.isneginf(mask)
        keep = finite
        bias = jnp.where(finite, mask, 0).astype(jnp.float32)
    return restrict(spec, keep, kv_lengths, q_pos, k_pos, kv_limit, segments), bias


def masked_logits(s, keep, bias):
    """Logits in float32 with dropped keys at `MASKED`."""
    if bias is not None:
        s = s + bias
    if keep is not None:
        s = jnp.where(keep, s, MASKED)
    return s


def nonempty_rows(keep, shape):
    """bool `(..., sq, 1)`: rows with at least one kept key (all rows when `keep` is None)."""
    if keep is None:
        return jnp.ones(shape[:-1] + (1,), bool)
    return jnp.broadcast_to(jnp.any(keep, axis=-1, keepdims=True), shape[:-1] + (1,))


def keys_with_query(q_segment_ids, kv_segment_ids, q_lengths):
    """bool `(b, skv)`: keys whose segment id some query (before `q_lengths`) holds.

    A sort and a binary search, never an `(sq, skv)` array: O((sq + skv) log sq). Padding queries
    (at or past `q_lengths`) take the first query's id, which changes no row's set of ids unless
    no query is real, when no key is found. A value sort, not an argsort, and a search unrolled
    into straight-line code, not a while loop: on a GPU each loop step was a launch, and the two
    cost about 0.4 ms a call at 16k tokens (H200, 2026-11-30).
    """
    ids = q_segment_ids
    if q_lengths is not None:
        ids = jnp.where(jnp.arange(ids.shape[1])[None, :] < q_lengths[:, None], ids, ids[:, :1])
    ids = jnp.sort(ids, axis=-1)
    search = functools.partial(jnp.searchsorted, method="scan_unrolled")
    first = jnp.minimum(jax.vmap(search)(ids, kv_segment_ids), ids.shape[1] - 1)
    found = jnp.take_along_axis(ids, first, -1) == kv_segment_ids
    if q_lengths is not None:
        found = found & (q_lengths[:, None] > 0)
    return found


def seen_keys(spec: Spec, mask, kv_lengths, q_lengths, q_segment_ids=None, kv_segment_ids=None):
    """bool `(b|1, n_kv|1, skv)`: the keys of each k/v head that at least one query (before
    `q_lengths`) can see; None when every key is seen by construction (`visibility.seen_keys`).

    With segment ids, a key whose segment has no query is unseen too. Each rule is tested on its
    own, so no seen key is ever dropped; a key hidden only by segments and a window or full mask
    together (every query of its segment is outside its window) is kept, and holds what it holds.
    """
    seen = visibility.seen_keys(spec, mask, kv_lengths, q_lengths, jnp)
    if q_segment_ids is None:
        return seen
    by_segment = keys_with_query(q_segment_ids, kv_segment_ids, q_lengths)[:, None, :]
    return by_segment if seen is None else seen & by_segment


@dataclasses.dataclass(frozen=True)
class EmptyRows:
    """For backends that return garbage (or NaN) on rows with no key: unmask those rows, then zero.

    `row_valid` broadcasts to `(b, n, sq)`; None means no row can be empty.
    Zeroing through `jnp.where` also zeroes those rows' gradient, and since their output cotangent
    is then zero they add nothing to dk or dv.
    """

    mask: Any  # bool mask for the backend (bias -inf entries folded in), or None
    bias: Any  # additive bias with -inf replaced by 0, or None
    kv_lengths: Any  # lengths with 0 replaced by the full length, or None
    row_valid: Any

    @classmethod
    def fix(cls, spec: Spec, mask, kv_lengths, segments=None) -> "EmptyRows":
        """`segments`: `(q_segment_ids, kv_segment_ids)`, folded into the bool mask exactly (a
        `(b, 1, sq, skv)` array: for backends that hold the scores anyway, or take one mask)."""
        if not spec.can_have_empty_rows:
            return cls(None, None, None, None)
        bool_mask, bias = None, None
        if spec.mask_kind == "bool":
            bool_mask = mask
        elif spec.mask_kind == "bias":
            bool_mask = ~jnp.isneginf(mask)
            bias = jnp.where(bool_mask, mask, 0).astype(mask.dtype)
        if segments is not None:
            same = visibility.segment_keep(*segments)
            bool_mask = same if bool_mask is None else bool_mask & same
        q_pos, k_pos = jnp.arange(spec.q_len), jnp.arange(spec.kv_len)
        row_valid = None
        if kv_lengths is not None:
            row_valid = (kv_lengths > 0)[:, None, None]
        geometry = window_keep(spec, q_pos, k_pos)  # causal alone leaves no row empty; a window can
        if spec.window is not None and bool_mask is None:  # rows the window leaves with no key
            rows = jnp.any(geometry & (k_pos[None, :] < (spec.kv_len if kv_lengths is None
                                                         else kv_lengths[:, None, None])), -1)
            row_valid = rows[None, None] if rows.ndim == 1 else rows[:, None]
        if bool_mask is not None:
            keep = restrict(spec, bool_mask, kv_lengths, q_pos, k_pos)
            mask_rows = jnp.any(keep, axis=-1)
            row_valid = mask_rows if row_valid is None else row_valid & mask_rows
            bool_mask = bool_mask | ~mask_rows[..., None]
        if kv_lengths is not None:
            kv_lengths = jnp.where(kv_lengths > 0, kv_lengths, spec.kv_len).astype(jnp.int32)
        return cls(bool_mask, bias, kv_lengths, row_valid)

    def zero(self, out, lse=None, layout="bnsd"):
        """Zero the empty rows of `out` (in `layout`) and set their lse (bnsd) to -inf."""
        if self.row_valid is None:
            return out, lse
        valid = self.row_valid[..., None]
        if layout == "bsnd":
            valid = jnp.swapaxes(valid, 1, 2)
        out = jnp.where(valid, out, jnp.zeros((), out.dtype))
        if lse is not None:
            lse = jnp.where(self.row_valid, lse, -jnp.inf)
        return out, lse
