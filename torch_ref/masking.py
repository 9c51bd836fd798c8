"""Mask algebra for the torch backends, the twin of `jax_attn.masking`.

A key is dropped when the bool mask is False, the bias is -inf, it lies at or past
`kv_lengths[b]`, outside the query's window (`spec.window_bounds`, causal included), or in another
segment than the query (`q_segment_ids`/`kv_segment_ids`, packed sequences); that
geometry, and which keys any query sees, are `jax_attn.visibility`'s. A row is
empty when no key is kept; that is decided from visibility alone, never from values (`l > 0` is
False for NaN), so a NaN in a visible logit stays NaN. Empty rows give zeros; `EmptyRows` serves
kernels that cannot do that themselves.
"""
from __future__ import annotations

import dataclasses
import functools
import types
from typing import Any

import torch

from jax_attn import visibility
from jax_attn.contract import Spec
from jax_attn.visibility import restrict, window_keep  # noqa: F401  (the twin's name, kept)


def accumulator(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def keep_and_bias(spec: Spec, mask, kv_lengths, q_pos, k_pos, segments=None):
    """`(keep, bias)` for query positions `q_pos` and key positions `k_pos` (1-d tensors).

    `mask` is the caller's rank-4 mask cut to these positions, and `segments`, when given,
    `(q_segment_ids, kv_segment_ids)` cut to them too. Each result broadcasts to
    `(b, n, len(q_pos), len(k_pos))`, or is None when nothing applies; `bias` has -inf replaced by 0.
    """
    keep = bias = None
    if mask is not None and spec.mask_kind == "bool":
        keep = mask
    elif mask is not None:
        keep = ~torch.isneginf(mask)
        bias = torch.where(keep, mask, torch.zeros((), dtype=mask.dtype, device=mask.device))
    return restrict(spec, keep, kv_lengths, q_pos, k_pos, segments=segments), bias


def masked_logits(s, keep, bias):
    """Logits with the bias added and dropped keys at -inf."""
    if bias is not None:
        s = s + bias.to(s.dtype)
    if keep is not None:
        s = s.masked_fill(~keep, float("-inf"))
    return s


def nonempty_rows(keep, shape, device):
    """bool `(..., sq)` broadcast to `shape[:-1]`: rows with at least one kept key."""
    if keep is None:
        return torch.ones(shape[:-1], dtype=torch.bool, device=device)
    return keep.any(-1).expand(shape[:-1])


def keys_with_query(q_segment_ids, kv_segment_ids, q_lengths):
    """bool `(b, skv)`: keys whose segment id some query (before `q_lengths`) holds; sorted, never
    an `(sq, skv)` comparison (`jax_attn.masking.keys_with_query`)."""
    sq = q_segment_ids.shape[1]
    ids, order = torch.sort(q_segment_ids, dim=-1, stable=True)  # each id's queries in position order
    first = torch.searchsorted(ids, kv_segment_ids.contiguous()).clamp(max=sq - 1)
    found = ids.gather(-1, first) == kv_segment_ids
    if q_lengths is not None:
        found = found & (order.gather(-1, first) < q_lengths[:, None])
    return found


def seen_keys(spec: Spec, mask, kv_lengths, q_lengths, device, q_segment_ids=None, kv_segment_ids=None):
    """bool `(b|1, n_kv|1, skv)`: the keys of each k/v head that at least one query (before
    `q_lengths`) can see; None when every key is seen by construction (`visibility.seen_keys`).
    With segment ids, a key whose segment has no query is unseen too (each rule tested on its own,
    as `jax_attn.masking.seen_keys`)."""
    xp = types.SimpleNamespace(arange=functools.partial(torch.arange, device=device),
                               isneginf=torch.isneginf)
    seen = visibility.seen_keys(spec, mask, kv_lengths, q_lengths, xp)
    if q_segment_ids is None:
        return seen
    by_segment = keys_with_query(q_segment_ids, kv_segment_ids, q_lengths)[:, None, :]
    return by_segment if seen is None else seen & by_segment


@dataclasses.dataclass(frozen=True)
class EmptyRows:
    """One `attn_mask` for a fused kernel, with empty rows unmasked, and the rows to zero after.

    `mask` folds the bool mask, -inf bias entries, `kv_lengths`, the window, segment ids and (when there is any
    of those) causality into a bool `keep`, or into a float bias with -inf where dropped when the
    caller gave a bias. `row_valid` broadcasts to `(b, n, sq)`; None means no row can be empty.
    Zeroing through `torch.where` also zeroes those rows' gradients.
    """

    mask: Any
    row_valid: Any
    causal_in_mask: bool

    @classmethod
    def fix(cls, spec: Spec, mask, kv_lengths, dtype, device, segments=None) -> "EmptyRows":
        """`segments`: `(q_segment_ids, kv_segment_ids)`, folded into the mask exactly."""
        # Causality alone leaves no row empty; query_seq_lengths is applied around the backends.
        if (spec.mask_kind == "none" and not spec.has_kv_lengths and spec.window is None
                and segments is None):
            return cls(None, None, False)
        keep, bias = keep_and_bias(spec, mask, kv_lengths, torch.arange(spec.q_len, device=device),
                                   torch.arange(spec.kv_len, device=device), segments)
        row_valid = keep.any(-1)
        keep = keep | ~row_valid[..., None]
        if bias is None:
            return cls(keep, row_valid, spec.is_causal)
        return cls(bias.to(dtype).masked_fill(~keep, float("-inf")), row_valid, spec.is_causal)

    def zero(self, out, lse=None, layout="bnsd"):
        """Zero the empty rows of `out` (in `layout`) and set their lse (bnsd) to -inf."""
        if self.row_valid is None:
            return out, lse
        valid = self.row_valid[..., None]
        if layout == "bsnd":
            valid = valid.transpose(1, 2)
        out = torch.where(valid, out, torch.zeros((), dtype=out.dtype, device=out.device))
        if lse is not None:
            lse = lse.masked_fill(~self.row_valid, float("-inf"))
        return out, lse
