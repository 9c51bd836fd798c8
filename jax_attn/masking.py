"""Mask algebra shared by the jnp backends: which logits are kept, and which query rows are empty.

A key is dropped when the bool mask is False, the bias is -inf, it lies at or past
`kv_lengths[b]`, or (causal) after the query's position. Rows left with no key must produce zeros;
backends that cannot do that natively get `EmptyRows` to unmask such rows and zero them after.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from .contract import Spec


def keep_and_bias(spec: Spec, mask, kv_lengths, q_pos, k_pos, kv_limit=None):
    """`(keep, bias)` for query positions `q_pos` and key positions `k_pos`.

    `mask` is the caller's mask already cut to these positions (rank 4, broadcastable).
    `kv_limit` drops keys at or past it (padding added by a backend). Each result is broadcastable
    to `(b, n, len(q_pos), len(k_pos))`, or None when nothing applies.
    """
    keep = None

    def both(a, b):
        return b if a is None else a & b

    bias = None
    if mask is not None and spec.mask_kind == "bool":
        keep = mask
    elif mask is not None:
        finite = ~jnp.isneginf(mask)
        keep = finite
        bias = jnp.where(finite, mask, 0).astype(jnp.float32)
    if kv_limit is not None:
        keep = both(keep, (k_pos < kv_limit)[None, None, None, :])
    if kv_lengths is not None:
        keep = both(keep, k_pos[None, None, None, :] < kv_lengths[:, None, None, None])
    if spec.is_causal:
        keep = both(keep, (k_pos[None, :] <= q_pos[:, None])[None, None])
    return keep, bias


def masked_logits(s, keep, bias):
    """Logits in float32 with dropped keys at -inf."""
    if bias is not None:
        s = s + bias
    if keep is not None:
        s = jnp.where(keep, s, -jnp.inf)
    return s


def safe_row_max(s):
    """Row max with empty rows (all -inf) read as 0, so `exp(s - m)` gives 0 there, never NaN."""
    m = jnp.max(s, axis=-1, keepdims=True)
    return jnp.where(jnp.isneginf(m), 0.0, m)


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
        row_valid = None
        if kv_lengths is not None:
            row_valid = (kv_lengths > 0)[:, None, None]
            kv_lengths = jnp.where(kv_lengths > 0, kv_lengths, spec.kv_len).astype(jnp.int32)
        if bool_mask is not None:
            keep, _ = keep_and_bias(
                Spec(**{**dataclasses.asdict(spec), "mask_kind": "bool"}), bool_mask,
                kv_lengths if row_valid is not None else None,
                jnp.arange(spec.q_len), jnp.arange(spec.kv_len))
            mask_rows = jnp.any(keep, axis=-1)
            row_valid = mask_rows if row_valid is None else row_valid & mask_rows
            bool_mask = bool_mask | ~mask_rows[..., None]
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
