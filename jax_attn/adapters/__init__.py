"""Adapters that put jax-attn inside other libraries' attention layers.

- `jax_attn.adapters.flax`: `attention_fn` for `flax.nnx.MultiHeadAttention` and
  `flax.linen.MultiHeadDotProductAttention` (also importable as `jax_attn.flax_adapters`).
- `jax_attn.adapters.maxdiffusion`: a kernel for MaxDiffusion's attention-kernel registry.
- `jax_attn.adapters.diffusers_flax`: diffusers' Flax `FlaxAttention` / VAE `FlaxAttentionBlock`
  (diffusers 0.35.x, the last releases with Flax models).

Submodules load on first access, so importing this package pulls in neither MaxDiffusion nor
diffusers (each is needed only by the function that patches it).
"""
import importlib

_SUBMODULES = ("flax", "maxdiffusion", "diffusers_flax")


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = list(_SUBMODULES)
