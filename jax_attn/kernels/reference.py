"""Plain-jnp attention with the kernel's exact signature, for tests and quick comparisons.

Materializes the `(b, n, sq, skv)` logits in float32; same masking rules as the kernel (window
and segment ids included; a row with no key gives zeros and lse = -inf). Differentiable by JAX's
own autodiff, so its gradients check the kernel's hand-written backward, lse cotangent included.
"""
from __future__ import annotations

import math

import jax.numpy as jnp

from .. import contract


def _pad4(x):
    return x.reshape((1,) * (4 - x.ndim) + x.shape)


def flash_attention_reference(q, k, v, *, bias=None, kv_lengths=None, key_mask=None,
                              is_causal=False, scale=None, layout="bnsd", return_lse=False,
                              window=None, q_segment_ids=None, kv_segment_ids=None):
    if layout == "bsnd":
        q, k, v = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))
    b, n, sq, d = q.shape
    n_kv, skv = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    g = n // n_kv
    k, v = jnp.repeat(k, g, axis=1), jnp.repeat(v, g, axis=1)
    s = jnp.einsum("bnqd,bnkd->bnqk", q, k, preferred_element_type=jnp.float32) * scale
    keep = jnp.ones((1, 1, 1, skv), bool)
    if bias is not None:
        bias = _pad4(jnp.asarray(bias)).astype(jnp.float32)
        keep = keep & ~jnp.isneginf(bias)
        s = s + jnp.where(jnp.isneginf(bias), 0.0, bias)
    if key_mask is not None:
        keep = keep & _pad4(jnp.asarray(key_mask))
    if kv_lengths is not None:
        keep = keep & (jnp.arange(skv)[None, :] < jnp.asarray(kv_lengths)[:, None])[:, None, None, :]
    rows, cols = jnp.arange(sq)[:, None], jnp.arange(skv)[None, :]
    if is_causal:
        keep = keep & (cols <= rows)[None, None]
    window = contract.normalize_window(window, name="window", error=ValueError)
    if window is not None:
        left, right = window
        if left is not None:
            keep = keep & (cols >= rows - left)[None, None]
        if right is not None:
            keep = keep & (cols <= rows + right)[None, None]
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError("q_segment_ids and kv_segment_ids must be given together (or neither)")
    if q_segment_ids is not None:
        same = jnp.asarray(q_segment_ids)[:, :, None] == jnp.asarray(kv_segment_ids)[:, None, :]
        keep = keep & same[:, None]
    s = jnp.where(keep, s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    m = jnp.where(jnp.isneginf(m), 0.0, m)
    e = jnp.exp(s - m)
    l = jnp.sum(e, axis=-1, keepdims=True)
    p = e / jnp.where(l > 0, l, 1.0)
    out = jnp.einsum("bnqk,bnkd->bnqd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    out = out.astype(q.dtype)
    if layout == "bsnd":
        out = jnp.swapaxes(out, 1, 2)
    if not return_lse:
        return out
    l0 = l[..., 0]
    lse = jnp.where(l0 > 0, jnp.log(jnp.where(l0 > 0, l0, 1.0)) + m[..., 0], -jnp.inf)
    return out, lse
