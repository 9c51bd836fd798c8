"""Mask algebra for the torch backends, the twin of `jax_attn.masking`.

A key is dropped when the bool mask is False, the bias is -inf, it lies at or past
`kv_lengths[b]`, or (causal) after the query's position (top-left aligned). Rows left with no key
give zeros; `EmptyRows` serves kernels that cannot do that themselves.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch

from jax_attn.contract import Spec


def accumulator(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def keep_and_bias(spec: Spec, mask, kv_lengths, q_pos, k_pos, with_causal: bool = True):
    """`(keep, bias)` for query positions `q_pos` and key positions `k_pos` (1-d tensors).

    `mask` is the caller's rank-4 mask cut to these positions. Each result broadcasts to
    `(b, n, len(q_pos), len(k_pos))`, or is None when nothing applies; `bias` has -inf replaced by 0.
    """
    keep = bias = None

    def both(a, b):
        return b if a is None else a & b

    if mask is not None and spec.mask_kind == "bool":
        keep = mask
    elif mask is not None:
        keep = ~torch.isneginf(mask)
        bias = torch.where(keep, mask, torch.zeros((), dtype=mask.dtype, device=mask.device))
    if kv_lengths is not None:
        keep = both(keep, k_pos[None, None, None, :] < kv_lengths[:, None, None, None])
    if spec.is_causal and with_causal:
        keep = both(keep, (k_pos[None, :] <= q_pos[:, None])[None, None])
    return keep, bias


def masked_logits(s, keep, bias):
    """Logits with the bias added and dropped keys at -inf."""
    if bias is not None:
        s = s + bias.to(s.dtype)
    if keep is not None:
        s = s.masked_fill(~keep, float("-inf"))
    return s


def safe_row_max(s):
    """Row max, with empty rows (all -inf) read as 0 so `exp(s - m)` is 0 there, never NaN."""
    m = s.amax(-1, keepdim=True)
    return torch.where(torch.isneginf(m), torch.zeros((), dtype=m.dtype, device=m.device), m)


@dataclasses.dataclass(frozen=True)
class EmptyRows:
    """One `attn_mask` for a fused kernel, with empty rows unmasked, and the rows to zero after.

    `mask` folds the bool mask, -inf bias entries, `kv_lengths` and (when there is any other mask)
    causality into a bool `keep`, or into a float bias with -inf where dropped when the caller gave
    a bias. `row_valid` broadcasts to `(b, n, sq)`; None means no row can be empty. Zeroing through
    `torch.where` also zeroes those rows' gradients.
    """

    mask: Any
    row_valid: Any
    causal_in_mask: bool

    @classmethod
    def fix(cls, spec: Spec, mask, kv_lengths, dtype, device) -> "EmptyRows":
        if not spec.can_have_empty_rows:
            return cls(None, None, False)
        keep, bias = keep_and_bias(spec, mask, kv_lengths, torch.arange(spec.q_len, device=device),
                                   torch.arange(spec.kv_len, device=device))
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
