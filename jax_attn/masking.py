"""Mask algebra shared by the jnp backends: which logits are kept, and which query rows are empty.

A key is dropped when the bool mask is False, the bias is -inf, it lies at or past
`kv_lengths[b]`, or outside the query's window (`spec.window_bounds`, causal included). A row is
empty when no key is kept; that is decided from visibility alone, never from values, so a NaN in
a visible logit stays NaN instead of reading as "empty". Empty rows produce zeros; backends that
cannot do that natively get `EmptyRows` to unmask such rows and zero them after.

Masked logits are set to a large finite negative number, not -inf, so that `jax.debug_infs`
stays quiet; the keep mask, not the value, is what removes them.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np

from .contract import Spec

# Masked logits: finite (see the module docstring), far below any real logit, with room left
# for `s - max` not to overflow to -inf (jax.nn uses the same margin).
MASKED = -0.7 * float(np.finfo(np.float32).max)


def _and(a, b):
    return b if a is None else a if b is None else a & b


def window_keep(spec: Spec, q_pos, k_pos):
    """`(len(q_pos), len(k_pos))` bool from the window and causality, or None when unrestricted."""
    bounds = spec.window_bounds
    if bounds is None:
        return None
    left, right = bounds
    keep = None
    if left is not None:
        keep = k_pos[None, :] >= q_pos[:, None] - left
    if right is not None:
        keep = _and(keep, k_pos[None, :] <= q_pos[:, None] + right)
    return keep


def keep_and_bias(spec: Spec, mask, kv_lengths, q_pos, k_pos, kv_limit=None):
    """`(keep, bias)` for query positions `q_pos` and key positions `k_pos`.

    `mask` is the caller's mask already cut to these positions (rank 4, broadcastable).
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
    if kv_limit is not None:
        keep = _and(keep, (k_pos < kv_limit)[None, None, None, :])
    if kv_lengths is not None:
        keep = _and(keep, k_pos[None, None, None, :] < kv_lengths[:, None, None, None])
    geometry = window_keep(spec, q_pos, k_pos)
    if geometry is not None:
        keep = _and(keep, geometry[None, None])
    return keep, bias


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


def seen_keys(spec: Spec, mask, kv_lengths, q_lengths):
    """bool `(b|1, n_kv|1, skv)`: the keys of each k/v head that at least one query (before
    `q_lengths`) can see; None when every key is seen by construction (no work to do)."""
    skv, sq = spec.kv_len, spec.q_len
    k_pos = jnp.arange(skv)
    seen = None
    if kv_lengths is not None:
        seen = (k_pos[None, :] < kv_lengths[:, None])[:, None, :]
    right = None if spec.window_bounds is None else spec.window_bounds[1]
    if q_lengths is not None:  # the last query that looks at key j is q_len - 1 (+ right)
        last = q_lengths[:, None] - 1 + (0 if right is None else right)
        seen = _and(seen, ((k_pos[None, :] <= last) if right is not None
                           else (q_lengths[:, None] > 0) & (k_pos[None, :] >= 0))[:, None, :])
    elif right is not None and sq - 1 + right < skv - 1:
        seen = _and(seen, (k_pos <= sq - 1 + right)[None, None, :])
    if mask is not None:
        if spec.per_key_mask:
            keep = mask[:, :, 0, :] if spec.mask_kind == "bool" else ~jnp.isneginf(mask[:, :, 0, :])
        else:  # a key is seen when some query's mask row and window keep it
            keep, _ = keep_and_bias(spec, mask, None, jnp.arange(sq), k_pos)
            if q_lengths is not None:
                keep = keep & (jnp.arange(sq)[None, :] < q_lengths[:, None])[:, None, :, None]
            keep = jnp.any(keep, axis=2)
        if keep.shape[1] == spec.heads and spec.groups > 1:  # any query head of the group
            keep = keep.reshape(keep.shape[0], spec.kv_heads, spec.groups, skv).any(2)
        seen = _and(seen, keep)
    return seen


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
    def fix(cls, spec: Spec, mask, kv_lengths) -> "EmptyRows":
        if not spec.can_have_empty_rows:
            return cls(None, None, None, None)
        bool_mask, bias = None, None
        if spec.mask_kind == "bool":
            bool_mask = mask
        elif spec.mask_kind == "bias":
            bool_mask = ~jnp.isneginf(mask)
            bias = jnp.where(bool_mask, mask, 0).astype(mask.dtype)
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
            keep = bool_mask
            if kv_lengths is not None:
                keep = keep & (k_pos[None, None, None, :] < kv_lengths[:, None, None, None])
            if geometry is not None:
                keep = keep & geometry[None, None]
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
