"""A tiny DiT-style diffusion transformer built from `jax_attn.Attention`.

Patchified latent tokens go through blocks of (adaLN-modulated self-attention, cross-attention to
text embeddings, adaLN-modulated feed-forward) conditioned on the timestep, then back to a latent
of the input's shape (the predicted noise). Names follow diffusers' `BasicTransformerBlock`
(`norm1`, `attn1`, `norm2`, `attn2`, `norm3`, `ff.net[0].proj`, `ff.net[2]`), so processors and
weight conversion address layers as they would there ("blocks.0.attn2").

Unlike DiT, the adaLN modulation is not zero-initialized: an untrained model then already
responds to its text, which the example (and its processor edits) needs.
"""
from __future__ import annotations

import dataclasses
import math
import zlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..attention import Attention


@dataclasses.dataclass(frozen=True)
class DiTConfig:
    sample_size: int = 16  # latent height = width
    patch_size: int = 2
    in_channels: int = 4
    heads: int = 4
    dim_head: int = 16
    depth: int = 2
    cross_attention_dim: int = 32
    ff_mult: int = 4
    qk_norm: str | None = "rms_norm"
    backend: str | None = None

    @property
    def dim(self) -> int:
        return self.heads * self.dim_head

    @property
    def grid(self) -> int:
        return self.sample_size // self.patch_size


def timestep_embedding(t, dim: int, max_period: float = 10000.0):
    """Sinusoidal embedding of (possibly fractional) timesteps `(b,)` -> `(b, dim)`."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class GELUProj(nnx.Module):
    def __init__(self, dim_in, dim_out, *, rngs):
        self.proj = nnx.Linear(dim_in, dim_out, rngs=rngs)

    def __call__(self, x):
        return jax.nn.gelu(self.proj(x), approximate=True)


class FeedForward(nnx.Module):
    def __init__(self, dim, mult, *, rngs):
        self.net = nnx.List([GELUProj(dim, dim * mult, rngs=rngs), nnx.Dropout(0.0, rngs=rngs),
                             nnx.Linear(dim * mult, dim, rngs=rngs)])

    def __call__(self, x):
        for layer in self.net:
            x = layer(x)
        return x


class TransformerBlock(nnx.Module):
    """adaLN self-attention, cross-attention to the text, adaLN feed-forward (pre-norm, residual)."""

    def __init__(self, cfg: DiTConfig, *, rngs):
        dim = cfg.dim
        attn = dict(heads=cfg.heads, dim_head=cfg.dim_head, qk_norm=cfg.qk_norm, out_bias=True,
                    backend=cfg.backend, rngs=rngs)
        self.norm1 = nnx.LayerNorm(dim, use_scale=False, use_bias=False, rngs=rngs)
        self.attn1 = Attention(dim, **attn)
        self.norm2 = nnx.LayerNorm(dim, rngs=rngs)
        self.attn2 = Attention(dim, cfg.cross_attention_dim, **attn)
        self.norm3 = nnx.LayerNorm(dim, use_scale=False, use_bias=False, rngs=rngs)
        self.ff = FeedForward(dim, cfg.ff_mult, rngs=rngs)
        # shift, scale, gate for attn1 and for ff, from the timestep embedding
        self.adaln = nnx.Linear(dim, 6 * dim, rngs=rngs)

    def __call__(self, x, temb, context, encoder_attention_mask=None, kv_lengths=None,
                 cross_attention_kwargs=None):
        kw = cross_attention_kwargs or {}
        sh1, sc1, g1, sh2, sc2, g2 = jnp.split(self.adaln(jax.nn.silu(temb))[:, None], 6, axis=-1)
        h = self.norm1(x) * (1 + sc1) + sh1
        x = x + g1 * self.attn1(h, **kw)
        x = x + self.attn2(self.norm2(x), context, encoder_attention_mask, kv_lengths=kv_lengths, **kw)
        h = self.norm3(x) * (1 + sc2) + sh2
        return x + g2 * self.ff(h)


class TinyDiT(nnx.Module):
    """`model(latents (b, h, w, c), timesteps (b,), text (b, l, cross_attention_dim)) -> noise`.

    `encoder_attention_mask` is a keep mask over text tokens, `(b, l)` bool or 0/1 (diffusers'
    model-level convention), `kv_lengths` the same as lengths; `cross_attention_kwargs` reach every
    attention processor.
    """

    def __init__(self, cfg: DiTConfig = DiTConfig(), *, rngs: nnx.Rngs):
        if cfg.sample_size % cfg.patch_size:
            raise ValueError(f"sample_size {cfg.sample_size} must be a multiple of patch_size {cfg.patch_size}")
        self.cfg = cfg
        dim, p = cfg.dim, cfg.patch_size
        self.proj_in = nnx.Linear(p * p * cfg.in_channels, dim, rngs=rngs)
        self.pos_embed = nnx.Param(0.02 * jax.random.normal(rngs.params(), (cfg.grid * cfg.grid, dim)))
        self.time_embed = nnx.List([nnx.Linear(dim, dim, rngs=rngs), nnx.Linear(dim, dim, rngs=rngs)])
        self.blocks = nnx.List([TransformerBlock(cfg, rngs=rngs) for _ in range(cfg.depth)])
        self.norm_out = nnx.LayerNorm(dim, use_scale=False, use_bias=False, rngs=rngs)
        self.adaln_out = nnx.Linear(dim, 2 * dim, rngs=rngs)
        self.proj_out = nnx.Linear(dim, p * p * cfg.in_channels, rngs=rngs)

    def __call__(self, latents, timesteps, encoder_hidden_states, encoder_attention_mask=None, *,
                 kv_lengths=None, cross_attention_kwargs=None):
        cfg = self.cfg
        b, h, w, c = latents.shape
        if (h, w, c) != (cfg.sample_size, cfg.sample_size, cfg.in_channels):
            raise ValueError(f"latents must have shape (b, {cfg.sample_size}, {cfg.sample_size}, "
                             f"{cfg.in_channels}), got {latents.shape}")
        p, g = cfg.patch_size, cfg.grid
        x = latents.reshape(b, g, p, g, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, g * g, p * p * c)
        x = self.proj_in(x) + self.pos_embed[...]
        # In the latents' dtype, so a model cast to bf16 runs (and attends) in bf16 throughout.
        temb = timestep_embedding(jnp.broadcast_to(timesteps, (b,)), cfg.dim).astype(x.dtype)
        temb = self.time_embed[1](jax.nn.silu(self.time_embed[0](temb)))
        mask = None
        if encoder_attention_mask is not None:
            mask = jnp.asarray(encoder_attention_mask).astype(bool)  # keep mask at the model level
        for block in self.blocks:
            x = block(x, temb, encoder_hidden_states, mask, kv_lengths, cross_attention_kwargs)
        shift, scale = jnp.split(self.adaln_out(jax.nn.silu(temb))[:, None], 2, axis=-1)
        x = self.proj_out(self.norm_out(x) * (1 + scale) + shift)
        return x.reshape(b, g, g, p, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, h, w, c)


def embed_prompt(words, dim: int, length: int | None = None):
    """A stand-in text encoder: one fixed random vector per word (seeded by the word) plus a
    position signal, `(len(words) or length, dim)` float32, zero-padded to `length`."""
    length = len(words) if length is None else length
    if len(words) > length:
        raise ValueError(f"prompt has {len(words)} words, more than length={length}")
    out = np.zeros((length, dim), np.float32)
    for i, word in enumerate(words):
        rng = np.random.default_rng(zlib.crc32(word.encode()))
        out[i] = rng.standard_normal(dim) + 0.1 * np.sin(np.arange(dim) * (i + 1) / dim)
    return jnp.asarray(out)


def ddim_schedule(steps: int, train_steps: int = 1000):
    """Timesteps (descending) and cumulative alphas of a linear-beta schedule, for DDIM sampling."""
    betas = np.linspace(1e-4, 0.02, train_steps)
    alphas = np.cumprod(1 - betas)
    ts = np.linspace(train_steps - 1, 0, steps).round().astype(int)
    return ts, alphas


def ddim_step(x, eps, t, t_prev, alphas):
    """Deterministic DDIM update from timestep t to t_prev (t_prev < 0 means the end)."""
    a_t = alphas[t]
    a_prev = alphas[t_prev] if t_prev >= 0 else 1.0
    x0 = (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
    return math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps


__all__ = ["DiTConfig", "TinyDiT", "TransformerBlock", "FeedForward", "timestep_embedding",
           "embed_prompt", "ddim_schedule", "ddim_step"]
