"""A Flux/SD3-sized diffusion transformer whose attention is a function argument.

Text and image tokens are concatenated and go through identical blocks of (adaLN-modulated joint
self-attention with RMS q/k-norm, adaLN-modulated GELU MLP), the shape of Flux's single-stream and
SD3's joint blocks. The defaults are Flux's widths: hidden 3072 = 24 heads of 128, MLP 4x, 64
input channels (16 latent channels packed 2x2), 4096-wide T5 text features. Rotary position
embeddings and the pooled-text vector are left out: they add elementwise work, no attention.

Attention is pluggable: every call takes `attn_fn(q, k, v) -> out`, all `(b, s, n, d)` (jax.nn's
layout, also `attention_forward(..., layout="bsnd")`), so one set of weights runs with any
implementation, or with a cheap stand-in to measure what attention costs.

The blocks' weights are stacked along a leading axis and applied with `jax.lax.scan`
(`BlockStack`): XLA compiles one block instead of `depth`, so compile time does not grow with depth
and benchmarks can run the full depth.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from .dit import timestep_embedding

# attn_fn(q, k, v) -> out; q (b, sq, n, d), k and v (b, skv, n, d), out (b, sq, n, d).
AttnFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def default_attention(q, k, v):
    """`jax.nn.dot_product_attention` with its default implementation."""
    return jax.nn.dot_product_attention(q, k, v)


class BlockStack(nnx.Module):
    """`depth` blocks of one structure, weights stacked on axis 0, run in sequence by `lax.scan`.

    `make(rngs)` builds one block; `stack(x, *args, remat=..., **kw)` applies
    `block(x, *args, **kw)` for each block in turn. `remat=True` recomputes each block's
    activations in the backward pass instead of keeping them (per-block gradient checkpointing).
    """

    def __init__(self, make, depth: int, *, rngs: nnx.Rngs):
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self.depth = depth

        @nnx.split_rngs(splits=depth)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def build(r):
            return make(r)

        self.layers = build(rngs)

    def __call__(self, x, *args, remat: bool = False, **kwargs):
        graphdef, stacked = nnx.split(self.layers)

        def body(h, weights):
            return nnx.merge(graphdef, weights)(h, *args, **kwargs), None

        if remat:
            body = jax.checkpoint(body)
        x, _ = jax.lax.scan(body, x, stacked)
        return x


@dataclasses.dataclass(frozen=True)
class JointDiTConfig:
    hidden: int = 3072
    heads: int = 24
    depth: int = 19
    mlp_ratio: int = 4
    in_channels: int = 64  # latent channels x patch area (Flux: 16 x 2 x 2)
    text_dim: int = 4096  # T5-XXL features
    time_dim: int = 256  # sinusoidal timestep features
    dtype: str = "bfloat16"  # weights and activations

    @property
    def dim_head(self) -> int:
        return self.hidden // self.heads

    def __post_init__(self):
        if self.hidden % self.heads:
            raise ValueError(f"hidden {self.hidden} must be a multiple of heads {self.heads}")


def _dense(cfg, din, dout, rngs):
    return nnx.Linear(din, dout, dtype=cfg.dtype, param_dtype=cfg.dtype, rngs=rngs)


class JointBlock(nnx.Module):
    """adaLN joint self-attention with RMS q/k-norm, then adaLN GELU MLP; residual, pre-norm."""

    def __init__(self, cfg: JointDiTConfig, *, rngs: nnx.Rngs):
        self.heads, self.dim_head = cfg.heads, cfg.dim_head
        h, kw = cfg.hidden, dict(dtype=cfg.dtype, param_dtype=cfg.dtype, rngs=rngs)
        self.modulation = _dense(cfg, h, 6 * h, rngs)  # shift, scale, gate for attention and MLP
        self.norm1 = nnx.LayerNorm(h, use_scale=False, use_bias=False, epsilon=1e-6, **kw)
        self.qkv = _dense(cfg, h, 3 * h, rngs)
        self.norm_q = nnx.RMSNorm(cfg.dim_head, epsilon=1e-6, **kw)
        self.norm_k = nnx.RMSNorm(cfg.dim_head, epsilon=1e-6, **kw)
        self.proj = _dense(cfg, h, h, rngs)
        self.norm2 = nnx.LayerNorm(h, use_scale=False, use_bias=False, epsilon=1e-6, **kw)
        self.mlp_in = _dense(cfg, h, cfg.mlp_ratio * h, rngs)
        self.mlp_out = _dense(cfg, cfg.mlp_ratio * h, h, rngs)

    def __call__(self, x, temb, attn_fn: AttnFn):
        b, s, c = x.shape
        sh1, sc1, g1, sh2, sc2, g2 = jnp.split(self.modulation(jax.nn.silu(temb))[:, None], 6, axis=-1)
        h = self.norm1(x) * (1 + sc1) + sh1
        q, k, v = (t[:, :, 0] for t in jnp.split(
            self.qkv(h).reshape(b, s, 3, self.heads, self.dim_head), 3, axis=2))
        out = attn_fn(self.norm_q(q), self.norm_k(k), v).reshape(b, s, c)
        x = x + g1 * self.proj(out)
        h = self.norm2(x) * (1 + sc2) + sh2
        return x + g2 * self.mlp_out(jax.nn.gelu(self.mlp_in(h), approximate=True))


class JointDiT(nnx.Module):
    """`model(img (b, n_img, in_channels), txt (b, n_txt, text_dim), t (b,), attn_fn=...)`
    -> prediction `(b, n_img, in_channels)`, for patchified latent tokens and text features."""

    def __init__(self, cfg: JointDiTConfig = JointDiTConfig(), *, rngs: nnx.Rngs):
        self.cfg = cfg
        h = cfg.hidden
        self.img_in = _dense(cfg, cfg.in_channels, h, rngs)
        self.txt_in = _dense(cfg, cfg.text_dim, h, rngs)
        self.time_in = nnx.List([_dense(cfg, cfg.time_dim, h, rngs), _dense(cfg, h, h, rngs)])
        self.blocks = BlockStack(lambda r: JointBlock(cfg, rngs=r), cfg.depth, rngs=rngs)
        self.norm_out = nnx.LayerNorm(h, use_scale=False, use_bias=False, epsilon=1e-6,
                                      dtype=cfg.dtype, param_dtype=cfg.dtype, rngs=rngs)
        self.mod_out = _dense(cfg, h, 2 * h, rngs)
        self.proj_out = _dense(cfg, h, cfg.in_channels, rngs)

    def __call__(self, img, txt, t, *, attn_fn: AttnFn = default_attention, remat: bool = False):
        cfg = self.cfg
        if img.ndim != 3 or img.shape[-1] != cfg.in_channels:
            raise ValueError(f"img must have shape (b, n_img, {cfg.in_channels}), got {img.shape}")
        if txt.ndim != 3 or txt.shape[-1] != cfg.text_dim or txt.shape[0] != img.shape[0]:
            raise ValueError(f"txt must have shape ({img.shape[0]}, n_txt, {cfg.text_dim}), got {txt.shape}")
        b, n_txt = img.shape[0], txt.shape[1]
        temb = timestep_embedding(jnp.broadcast_to(t, (b,)), cfg.time_dim).astype(cfg.dtype)
        temb = self.time_in[1](jax.nn.silu(self.time_in[0](temb)))
        x = jnp.concatenate([self.txt_in(txt), self.img_in(img)], axis=1)
        x = self.blocks(x, temb, attn_fn, remat=remat)
        shift, scale = jnp.split(self.mod_out(jax.nn.silu(temb))[:, None], 2, axis=-1)
        return self.proj_out(self.norm_out(x[:, n_txt:]) * (1 + scale) + shift)


__all__ = ["AttnFn", "BlockStack", "JointBlock", "JointDiT", "JointDiTConfig", "default_attention"]
