"""The float64 NumPy reference: the definition every backend is tested against.

Plain NumPy, no JAX, so it shares no code path with what it checks. Inputs in `(b, n, s, d)`.
A key is masked when the bool mask is False, the bias is -inf, it lies at or past
`kv_lengths[b]`, (causal) after the query's position (top-left aligned, as
`jax.nn.dot_product_attention` and `torch.nn.functional.scaled_dot_product_attention`), or
outside the query's local window `(left, right)`: visible iff `i - left <= j <= i + right`, or
(packed sequences) in another segment: `q_segment_ids[b, i] != kv_segment_ids[b, j]`. Queries at or past `q_lengths[b]` are padding and see no key. A query with no unmasked key
returns zeros and zero gradients, and its log-sum-exp is -inf. A NaN in a visible logit is NaN.
A key that no query sees contributes nothing, forward and backward, whatever it holds (NaN
included); so does a padding query.
"""
from __future__ import annotations

import math

import numpy as np

# Relative error ||x - ref|| / ||ref|| allowed per input dtype, for outputs and gradients alike.
# float32: on GPUs XLA may run float32 matmuls in TF32 (about 3e-4 relative); on CPUs we see 1e-6.
# bfloat16: 8 mantissa bits, inputs and P rounded before the second matmul (seen 2e-3 to 8e-3).
# float16: 11 mantissa bits (seen 3e-4 to 1e-3).
TOLERANCE = {"float64": 1e-9, "float32": 2e-3, "bfloat16": 3e-2, "float16": 5e-3}


def relative_error(x, ref) -> float:
    """||x - ref|| / ||ref|| over finite entries (see floor); inf unless NaN and +-inf sit exactly where ref has them."""
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    finite = np.isfinite(ref)
    if not (np.array_equal(np.isnan(x), np.isnan(ref)) and np.array_equal(np.isinf(x), np.isinf(ref))
            and np.array_equal(x[np.isinf(ref)], ref[np.isinf(ref)])):
        return float("inf")
    with np.errstate(invalid="ignore"):
        diff = np.linalg.norm(np.where(finite, x - ref, 0.0))
    # Floor the denominator at an RMS of 1e-3: a gradient that is analytically zero (one key
    # attended) is compared against that scale instead of against its own rounding noise.
    floor = 1e-3 * np.sqrt(max(finite.sum(), 1))
    return float(diff / max(np.linalg.norm(np.where(finite, ref, 0.0)), floor))


def _keep(shape, attn_mask, kv_lengths, is_causal, q_lengths, window, segments=None):
    """Which logits of `(b, n, sq, skv)` are kept, and the finite part of an additive bias."""
    b, n, sq, skv = shape
    keep = np.ones(shape, dtype=bool)
    bias = None
    if attn_mask is not None:
        m = np.asarray(attn_mask)
        if m.dtype == bool:
            keep &= np.broadcast_to(m, keep.shape)
        else:
            full = np.broadcast_to(m.astype(np.float64), keep.shape)
            keep &= ~np.isneginf(full)
            bias = np.where(np.isneginf(full), 0.0, full)
    if kv_lengths is not None:
        keep &= np.arange(skv)[None, None, None, :] < np.asarray(kv_lengths)[:, None, None, None]
    if q_lengths is not None:
        keep &= np.arange(sq)[None, None, :, None] < np.asarray(q_lengths)[:, None, None, None]
    if segments is not None:
        q_ids, kv_ids = (np.asarray(x).reshape(b, -1) for x in segments)
        keep &= (q_ids[:, :, None] == kv_ids[:, None, :]).astype(bool)[:, None]  # object ids too
    i, j = np.arange(sq)[:, None], np.arange(skv)[None, :]
    if is_causal:
        keep &= (j <= i)[None, None]
    if window is not None:
        left, right = (window, window) if np.isscalar(window) else window
        if left is not None:
            keep &= (j >= i - left)[None, None]
        if right is not None:
            keep &= (j <= i + right)[None, None]
    return keep, bias


def _logits_and_keep(q, k, attn_mask, kv_lengths, is_causal, scale, q_lengths=None, window=None,
                     segments=None):
    """Scaled logits (plus bias) and the keep mask; k and q at positions nothing sees are zeroed
    first, so that whatever they hold cannot reach any result."""
    b, n, sq, d = q.shape
    n_kv, skv = k.shape[1], k.shape[2]
    g = n // n_kv
    keep, bias = _keep((b, n, sq, skv), attn_mask, kv_lengths, is_causal, q_lengths, window, segments)
    key_seen = keep.any(2).reshape(b, n_kv, g, skv).any(2)  # (b, n_kv, skv)
    k = np.where(key_seen[..., None], k, 0.0)
    if q_lengths is not None:
        q = np.where((np.arange(sq)[None, :] < np.asarray(q_lengths)[:, None])[:, None, :, None], q, 0.0)
    s = np.einsum("bnqd,bnkd->bnqk", q, np.repeat(k, g, axis=1)) * scale
    if bias is not None:
        s = s + bias
    return s, keep, key_seen


def _probs(q, k, attn_mask, kv_lengths, is_causal, scale, q_lengths=None, window=None, segments=None):
    s, keep, key_seen = _logits_and_keep(q, k, attn_mask, kv_lengths, is_causal, scale, q_lengths, window,
                                         segments)
    empty = ~keep.any(-1, keepdims=True)  # emptiness is about visibility, never about values
    s_masked = np.where(keep, s, -np.inf)
    with np.errstate(invalid="ignore"):
        m = np.where(empty, 0.0, s_masked.max(-1, keepdims=True))  # NaN stays NaN
        e = np.where(keep, np.exp(s_masked - m), 0.0)
        l = e.sum(-1, keepdims=True)
        p = e / np.where(empty, 1.0, l)
    with np.errstate(divide="ignore", invalid="ignore"):
        lse = np.where(empty[..., 0], -np.inf, np.log(l[..., 0]) + m[..., 0])
    return p, lse, key_seen


def _f64(*xs):
    return [None if x is None else np.asarray(x, dtype=np.float64) for x in xs]


def _segments(q_segment_ids, kv_segment_ids):
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError("give both q_segment_ids and kv_segment_ids, or neither")
    return None if q_segment_ids is None else (q_segment_ids, kv_segment_ids)


def attention(q, k, v, attn_mask=None, kv_lengths=None, is_causal=False, scale=None,
              return_lse=False, *, q_lengths=None, window=None, q_segment_ids=None,
              kv_segment_ids=None):
    """Forward pass in float64. Returns `out (b, n, sq, dv)` and optionally `lse (b, n, sq)`.
    Segment ids: `(b, sq)` and `(b, skv)` integers, compared exactly as given."""
    q, k, v = _f64(q, k, v)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    p, lse, key_seen = _probs(q, k, attn_mask, kv_lengths, is_causal, scale, q_lengths, window,
                              _segments(q_segment_ids, kv_segment_ids))
    n, n_kv = q.shape[1], k.shape[1]
    v = np.where(key_seen[..., None], v, 0.0)
    out = np.einsum("bnqk,bnkd->bnqd", p, np.repeat(v, n // n_kv, axis=1))
    return (out, lse) if return_lse else out


def probabilities(q, k, attn_mask=None, kv_lengths=None, is_causal=False, scale=None, *,
                  q_lengths=None, window=None, q_segment_ids=None, kv_segment_ids=None):
    """The full attention map `(b, n, sq, skv)` in float64 (rows of zeros where fully masked)."""
    q, k = _f64(q, k)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return _probs(q, k, attn_mask, kv_lengths, is_causal, scale, q_lengths, window,
                  _segments(q_segment_ids, kv_segment_ids))[0]


def attention_vjp(q, k, v, d_out, attn_mask=None, kv_lengths=None, is_causal=False, scale=None, *,
                  q_lengths=None, window=None, q_segment_ids=None, kv_segment_ids=None, d_lse=None):
    """Gradients `(dq, dk, dv, dbias)` of `sum(out * d_out)` (plus `sum(lse * d_lse)` when
    `d_lse (b, n, sq)` is given), by the analytic softmax derivative (d lse / d s = p).

    `dbias` is the full `(b, n, sq, skv)` gradient w.r.t. an additive bias (zero where masked);
    sum it over broadcast dims to match a smaller bias.
    """
    q, k, v, d_out = _f64(q, k, v, d_out)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    g = q.shape[1] // k.shape[1]
    p, _, key_seen = _probs(q, k, attn_mask, kv_lengths, is_causal, scale, q_lengths, window,
                            _segments(q_segment_ids, kv_segment_ids))
    seen = key_seen[..., None]
    k, v = np.where(seen, k, 0.0), np.where(seen, v, 0.0)
    if q_lengths is not None:
        q = np.where((np.arange(q.shape[2])[None, :] < np.asarray(q_lengths)[:, None])[:, None, :, None], q, 0.0)
    v_rep, k_rep = np.repeat(v, g, axis=1), np.repeat(k, g, axis=1)
    dv = np.einsum("bnqk,bnqd->bnkd", p, d_out)
    dp = np.einsum("bnqd,bnkd->bnqk", d_out, v_rep)
    ds = p * (dp - (dp * p).sum(-1, keepdims=True))
    if d_lse is not None:
        ds = ds + p * np.asarray(d_lse, np.float64)[..., None]
    dq = np.einsum("bnqk,bnkd->bnqd", ds, k_rep) * scale
    dk = np.einsum("bnqk,bnqd->bnkd", ds, q) * scale

    def fold(x):  # sum the query heads of each group back onto their shared k/v head
        b, n, s, e = x.shape
        return x.reshape(b, n // g, g, s, e).sum(2)

    return dq, fold(dk), fold(dv), ds
