"""Which keys a query sees, in rules that hold for any array library: once for both frameworks.

This module imports no array framework. Its functions use only indexing, broadcasting
comparisons and `&`, `|`, `~`, `.any`, `.reshape` (common to NumPy, jnp and torch arrays); where
an array must be made or a value tested, the caller passes `xp`, a namespace with `arange(n)` and
`isneginf(x)` (`jax.numpy`, or torch's functions bound to a device). `jax_attn.masking` and
`torch_ref.masking` keep the array math of each framework (masked logits, empty-row fixes) and
call these for the geometry; `jax_attn.inputs` and `torch_ref.inputs` for the argument rules.
"""
from __future__ import annotations

from typing import Callable, Sequence

from .contract import Spec


def lengths_alias(kv_lengths, key_value_seq_lengths):
    """`key_value_seq_lengths` is jax.nn's name for `kv_lengths`; giving both is an error."""
    if key_value_seq_lengths is None:
        return kv_lengths
    if kv_lengths is not None:
        raise ValueError("give kv_lengths or key_value_seq_lengths (its jax.nn name), not both")
    return key_value_seq_lengths


def check_lengths(values, name: str) -> None:
    """Lengths whose values are known must be >= 0 (values past the sequence mean "all": callers
    clamp them in their own dtype, so nothing wraps; unknown values, under a trace, clamp at 0)."""
    if (values < 0).any():
        raise ValueError(f"{name} must be >= 0, got {values.tolist()}")


def merge_masks(parts: Sequence, is_bool: Callable, dropped: Callable):
    """One mask from the given (rank-4) masks of a call, None where there is none: bool where all
    parts are bool (AND), else an additive bias (float parts added; keys a bool part drops at
    -inf, through `dropped(keep, bias)`, the framework's `where(keep, bias, -inf)`)."""
    parts = [x for x in parts if x is not None]
    if len(parts) <= 1:
        return parts[0] if parts else None
    keep = add = None
    for x in parts:
        if is_bool(x):
            keep = x if keep is None else keep & x
        else:
            add = x if add is None else add + x
    if add is None or keep is None:
        return keep if add is None else add
    return dropped(keep, add)


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


def segment_keep(q_segment_ids, kv_segment_ids):
    """bool `(b, 1, sq', skv')`: query i sees key j only where their segment ids are equal (packed
    sequences). The ids are `(b, sq')` and `(b, skv')`, already cut to the positions at hand, so a
    chunked backend builds only its chunk's block, never `(sq, skv)`."""
    return q_segment_ids[:, None, :, None] == kv_segment_ids[:, None, None, :]


def restrict(spec: Spec, keep, kv_lengths, q_pos, k_pos, kv_limit=None, segments=None):
    """`keep` (None, or broadcastable to `(b, n, len(q_pos), len(k_pos))`) with the keys at or past
    `kv_limit` (padding a backend added) or `kv_lengths[b]` dropped, those outside each query's
    window (causality included) and, with `segments = (q_segment_ids, kv_segment_ids)` cut to
    `q_pos` and `k_pos`, those of another segment; None when nothing applies."""
    if segments is not None:
        keep = _and(keep, segment_keep(*segments))
    if kv_limit is not None:
        keep = _and(keep, (k_pos < kv_limit)[None, None, None, :])
    if kv_lengths is not None:
        keep = _and(keep, k_pos[None, None, None, :] < kv_lengths[:, None, None, None])
    geometry = window_keep(spec, q_pos, k_pos)
    if geometry is not None:
        keep = _and(keep, geometry[None, None])
    return keep


def seen_keys(spec: Spec, mask, kv_lengths, q_lengths, xp):
    """bool `(b|1, n_kv|1, skv)`: the keys of each k/v head that at least one query (before
    `q_lengths`) can see; None when every key is seen by construction (no work to do).

    `mask` is the call's merged rank-4 mask (bool, or a bias whose -inf entries drop keys).
    Segment ids are not read here: which keys a segment hides from every query takes a sort, which
    each framework's `masking.seen_keys` adds on top."""
    skv, sq = spec.kv_len, spec.q_len
    k_pos = xp.arange(skv)
    seen = None
    if kv_lengths is not None:
        seen = (k_pos[None, :] < kv_lengths[:, None])[:, None, :]
    right = None if spec.window_bounds is None else spec.window_bounds[1]
    if q_lengths is not None:  # the last query that looks at key j is q_len - 1 (+ right)
        rows = ((k_pos[None, :] <= q_lengths[:, None] - 1 + right) if right is not None
                else (q_lengths[:, None] > 0) & (k_pos[None, :] >= 0))
        seen = _and(seen, rows[:, None, :])
    elif right is not None and sq - 1 + right < skv - 1:
        seen = _and(seen, (k_pos <= sq - 1 + right)[None, None, :])
    if mask is not None:
        keep = mask if spec.mask_kind == "bool" else ~xp.isneginf(mask)
        if spec.per_key_mask:
            keep = keep[:, :, 0, :]
        else:  # a key is seen when some query's mask row and window keep it
            q_pos = xp.arange(sq)
            keep = restrict(spec, keep, None, q_pos, k_pos)
            if q_lengths is not None:
                keep = keep & (q_pos[None, :] < q_lengths[:, None])[:, None, :, None]
            keep = keep.any(2)
        if keep.shape[1] == spec.heads and spec.groups > 1:  # any query head of the group
            keep = keep.reshape(keep.shape[0], spec.kv_heads, spec.groups, skv).any(2)
        seen = _and(seen, keep)
    return seen
