"""jax-attn inside diffusers' Flax models (diffusers 0.35.x, the last releases with Flax models).

    import jax_attn.adapters.diffusers_flax as jdf
    unet = jdf.swap_attention(unet)              # unet.apply(...) now attends with jax_attn
    with jdf.use_jax_attn(): out = vae.apply(...) # or for the calls inside the block

Two attention layers exist there: `FlaxAttention` (diffusers/models/attention_flax.py: the UNet's
self- and cross-attention; Dense layers `to_q`, `to_k`, `to_v` without bias, `to_out_0`, output
dropout) and the VAE's `FlaxAttentionBlock` (diffusers/models/vae_flax.py: `group_norm`, `query`,
`key`, `value`, `proj_attn`, residual). Both compute `softmax(q k^T * scale) v` with plain jnp; we
keep their projections, norms and parameters and replace only that core with
`jax_attn.attention_forward` (heads split as `(b, s, n, d)`, layout "bsnd": no transposes).

How it is swapped in: linen models are frozen dataclasses whose children are built in `setup`
from module-level names, so there is no attribute to replace. `use_jax_attn()` installs a Flax
method interceptor (`flax.linen.intercept_methods`) for the block: each `__call__` of a
`FlaxAttention` or `FlaxAttentionBlock` (or subclass) runs our version on that same module, its
bound submodules and parameters; everything else runs untouched. Parameters are unchanged, so
pretrained weights load as before. The interceptor is read at trace time: wrap the `jit`-traced
call (or use `swap_attention`, whose `apply`/`init`/`init_weights` enter the block themselves).

`FlaxAttention` and `FlaxAttentionBlock` here are also standalone linen modules with the same
fields and parameter names, for building models without diffusers.

Differences, stated: `use_memory_efficient_attention` and `split_head_dim` are ignored (jax_attn
chooses a memory-bounded backend by itself when the score matrix would be large); numerics are
those of the backend (float32 accumulation for half-precision inputs).
"""
from __future__ import annotations

import contextlib
import importlib

import flax.linen as nn
import jax.numpy as jnp

from ..api import attention_forward


def _heads(x, n):
    b, s, width = x.shape
    return x.reshape(b, s, n, width // n)


def _attend(q, k, v, heads, scale, backend):
    """(b, s, heads*d) projections -> (b, sq, heads*d) attention output."""
    out = attention_forward(_heads(q, heads), _heads(k, heads), _heads(v, heads), scale=scale,
                            layout="bsnd", backend=backend)
    return out.reshape(out.shape[0], out.shape[1], -1)


def attention_call(module, hidden_states, context=None, deterministic=True, *, backend=None):
    """`FlaxAttention.__call__` with jax_attn, on a bound module with diffusers' submodules."""
    context = hidden_states if context is None else context
    out = _attend(module.query(hidden_states), module.key(context), module.value(context),
                  module.heads, module.dim_head ** -0.5, backend)
    return module.dropout_layer(module.proj_attn(out), deterministic=deterministic)


def attention_block_call(module, hidden_states, *, backend=None):
    """`FlaxAttentionBlock.__call__` (VAE) with jax_attn."""
    b, h, w, c = hidden_states.shape
    x = module.group_norm(hidden_states).reshape(b, h * w, c)
    heads = module.channels // module.num_head_channels if module.num_head_channels is not None else 1
    # diffusers scales q and k each by (c / heads) ** -0.25: together the usual 1/sqrt(head dim).
    out = _attend(module.query(x), module.key(x), module.value(x), heads, (module.channels / heads) ** -0.5,
                  backend)
    return module.proj_attn(out).reshape(b, h, w, c) + hidden_states


class FlaxAttention(nn.Module):
    """Drop-in for diffusers' `FlaxAttention`: same fields and parameters, jax_attn inside.

    `backend` (extra field) chooses the jax_attn backend (None = automatic)."""

    query_dim: int
    heads: int = 8
    dim_head: int = 64
    dropout: float = 0.0
    use_memory_efficient_attention: bool = False
    split_head_dim: bool = False
    dtype: object = jnp.float32
    backend: object = None

    def setup(self):
        inner = self.dim_head * self.heads
        dense = lambda features, bias, name: nn.Dense(features, use_bias=bias, dtype=self.dtype, name=name)
        # Parameter names as diffusers' checkpoints spell them; attribute names as its module's.
        self.query = dense(inner, False, "to_q")
        self.key = dense(inner, False, "to_k")
        self.value = dense(inner, False, "to_v")
        self.proj_attn = dense(self.query_dim, True, "to_out_0")
        self.dropout_layer = nn.Dropout(rate=self.dropout)

    def __call__(self, hidden_states, context=None, deterministic=True):
        return attention_call(self, hidden_states, context, deterministic, backend=self.backend)


class FlaxAttentionBlock(nn.Module):
    """Drop-in for the VAE's `FlaxAttentionBlock` (parameters `group_norm`, `query`, `key`,
    `value`, `proj_attn`), jax_attn inside."""

    channels: int
    num_head_channels: int = None
    num_groups: int = 32
    dtype: object = jnp.float32
    backend: object = None

    def setup(self):
        self.group_norm = nn.GroupNorm(num_groups=self.num_groups, epsilon=1e-6)
        self.query, self.key, self.value, self.proj_attn = (
            nn.Dense(self.channels, dtype=self.dtype) for _ in range(4))

    def __call__(self, hidden_states):
        return attention_block_call(self, hidden_states, backend=self.backend)


def _diffusers_classes():
    """diffusers' two Flax attention classes, or ImportError saying why not."""
    try:
        attention_flax = importlib.import_module("diffusers.models.attention_flax")
        vae_flax = importlib.import_module("diffusers.models.vae_flax")
        return attention_flax.FlaxAttention, vae_flax.FlaxAttentionBlock
    except (ImportError, AttributeError) as e:
        try:
            version = importlib.import_module("diffusers").__version__
        except ImportError:
            version = "not installed"
        raise ImportError("jax_attn.adapters.diffusers_flax needs diffusers' Flax models "
                          f"(diffusers 0.35.x; found: {version}): {e}") from e


@contextlib.contextmanager
def use_jax_attn(backend=None):
    """Within the block, diffusers' Flax attention layers compute attention with jax_attn.

    Applies to calls traced in the block (wrap `jit`-compiled calls at their first trace)."""
    attention_cls, block_cls = _diffusers_classes()

    def interceptor(next_fun, args, kwargs, ctx):
        if ctx.method_name == "__call__":
            if isinstance(ctx.module, attention_cls):
                return attention_call(ctx.module, *args, **kwargs, backend=backend)
            if isinstance(ctx.module, block_cls):
                return attention_block_call(ctx.module, *args, **kwargs, backend=backend)
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        yield


class _Swapped:
    """A model whose `init`/`apply`/`init_weights`/`init_with_output` run under `use_jax_attn`;
    every other attribute is the wrapped model's."""

    def __init__(self, model, backend):
        self.__dict__.update(_model=model, _backend=backend)

    def __getattr__(self, name):
        attr = getattr(self._model, name)
        if name in ("init", "apply", "init_weights", "init_with_output"):
            def wrapped(*args, **kwargs):
                with use_jax_attn(self._backend):
                    return attr(*args, **kwargs)
            return wrapped
        return attr

    def __repr__(self):
        return f"swap_attention({self._model!r})"


def swap_attention(model, backend=None):
    """`model` (a diffusers Flax UNet/VAE, or any linen module containing their attention layers)
    with jax_attn computing attention in its `init`/`apply`/`init_weights`; parameters unchanged.

    Raises ImportError when diffusers' Flax models are not importable."""
    _diffusers_classes()
    return _Swapped(model, backend)


__all__ = ["FlaxAttention", "FlaxAttentionBlock", "attention_call", "attention_block_call", "swap_attention",
           "use_jax_attn"]
