"""`attention_fn` adapters: jax-attn inside `flax.nnx.MultiHeadAttention` and
`flax.linen.MultiHeadDotProductAttention`.

    mha = nnx.MultiHeadAttention(..., attention_fn=jax_attn.adapters.flax.make_attention_fn())
    mha = nn.MultiHeadDotProductAttention(..., attention_fn=make_attention_fn(backend="xla"))

Flax calls `attention_fn(query, key, value, bias=None, mask=None, ...)` with `(batch..., s, n, d)`
arrays; the adapter hands them to `attention_forward(layout="bsnd")` (no transposes on backends
that read that layout). Flax's mask convention is the same as ours (bool, True = attend,
broadcastable to `(batch..., n, sq, skv)`), and `bias` is additive; both may be given.

Differences from Flax's `dot_product_attention`, stated rather than hidden:
- a query whose keys are all masked returns zeros (Flax's finite `-big` fill averages the values);
- attention dropout is not supported: `dropout_rate > 0` with `deterministic=False` raises;
- `sow_weights=True` (the `module` argument) raises: use `jax_attn.AttentionMapStore` for maps;
- `precision` is not forwarded: backends pick full float32 precision or float32 accumulation.
"""
from __future__ import annotations

import jax.numpy as jnp

from ..api import attention_forward


def _flatten(x, n_batch):
    """Collapse Flax's leading batch dims into one."""
    lead = x.shape[:n_batch]
    size = 1
    for s in lead:
        size *= s
    return x.reshape((size,) + x.shape[n_batch:]), lead


def _flatten_mask(m, lead, name):
    """Rank-(len(lead)+3) mask/bias `(batch..., n, sq, skv)` -> rank 4 with batch dims merged."""
    if m is None:
        return None
    nb = len(lead)
    if m.ndim < 3:
        return m
    if m.ndim > nb + 3:
        raise ValueError(f"{name} of shape {tuple(m.shape)} has more dims than (batch..., n, sq, skv)")
    m = m.reshape((1,) * (nb + 3 - m.ndim) + m.shape)  # left-pad to (batch..., n, sq, skv)
    if nb != 1:
        m = jnp.broadcast_to(m, lead + m.shape[nb:]) if any(s != 1 for s in m.shape[:nb]) else m
        m = m.reshape((-1,) + m.shape[nb:])
    return m


def make_attention_fn(backend=None, *, scale=None):
    """An `attention_fn` for Flax's attention modules that runs `jax_attn.attention_forward`.

    Args:
      backend: backend choice (None = the usual routing: `use_backend`, env var, automatic).
      scale: logit scale (default `1/sqrt(d)`, as Flax).
    """

    def attention_fn(query, key, value, bias=None, mask=None, broadcast_dropout=True,
                     dropout_rng=None, dropout_rate=0.0, deterministic=False, dtype=None,
                     precision=None, module=None, is_causal=False):
        del broadcast_dropout, dropout_rng, precision
        if dropout_rate > 0.0 and not deterministic:
            raise NotImplementedError(
                f"jax_attn attention_fn: attention dropout is not supported (dropout_rate="
                f"{dropout_rate}); set dropout_rate=0 or deterministic=True")
        if module is not None:
            raise NotImplementedError("jax_attn attention_fn: sow_weights=True is not supported; "
                                      "use jax_attn AttentionMapStore for attention maps")
        if query.ndim < 4:
            raise ValueError(f"query must have shape (batch..., sq, n, d), got {tuple(query.shape)}")
        if dtype is not None:
            query, key, value = (x.astype(dtype) for x in (query, key, value))
        else:
            dt = jnp.result_type(query, key, value)
            query, key, value = (x.astype(dt) for x in (query, key, value))
        nb = query.ndim - 3
        q, lead = _flatten(query, nb)
        k, _ = _flatten(key, nb)
        v, _ = _flatten(value, nb)
        mask = _flatten_mask(mask, lead, "mask")
        bias = _flatten_mask(bias, lead, "bias")
        if mask is not None and bias is not None:
            attn_mask = jnp.where(mask, bias.astype(jnp.float32), -jnp.inf)
        elif mask is not None:
            attn_mask = mask.astype(bool)
        else:
            attn_mask = bias
        out = attention_forward(q, k, v, attn_mask=attn_mask, scale=scale, is_causal=bool(is_causal),
                                layout="bsnd", backend=backend)
        return out.reshape(lead + out.shape[1:])

    return attention_fn


# Ready-made adapter with the default routing.
attention_fn = make_attention_fn()

__all__ = ["make_attention_fn", "attention_fn"]
