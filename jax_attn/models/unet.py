"""An SDXL-sized latent UNet whose attention is a function argument.

The layout of SDXL's UNet at 1024x1024 (latent 128x128x4), simplified but at full size:
channels (320, 640, 1280); two ResNet blocks per level going down, three coming up (with skip
connections); transformer stacks after the ResNet blocks of the lower two levels, 2 and 10 blocks
deep, at 64x64 and 32x32 latent positions (4096 and 1024 tokens); a mid block of ResNet,
10 transformer blocks, ResNet. Each transformer block is (self-attention, cross-attention to the
text, GEGLU feed-forward), heads of 64 (10 at 640 channels, 20 at 1280), text context 2048 wide
(77 tokens). SDXL's extra conditioning (pooled text, size/crop ids) is left out: it only adds to
the timestep embedding.

Attention is pluggable as in `dit_large`: `attn_fn(q, k, v) -> out`, all `(b, s, n, d)`, passed at
call time. Transformer stacks run as `BlockStack`s (`lax.scan` over stacked weights), so the
compiled program holds one block per stack, not 70.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from .dit import timestep_embedding
from .dit_large import AttnFn, BlockStack, default_attention


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    sample_size: int = 128  # latent height = width (1024 px / 8)
    in_channels: int = 4
    channels: tuple = (320, 640, 1280)
    transformer_depth: tuple = (0, 2, 10)  # blocks per transformer stack, per level (0 = none)
    layers_per_block: int = 2
    dim_head: int = 64
    context_dim: int = 2048
    groups: int = 32  # GroupNorm groups
    dtype: str = "bfloat16"

    def __post_init__(self):
        if len(self.channels) != len(self.transformer_depth):
            raise ValueError("channels and transformer_depth need one entry per level")
        if self.sample_size % 2 ** (len(self.channels) - 1):
            raise ValueError(f"sample_size {self.sample_size} must divide by 2^(levels - 1)")
        for c in self.channels:
            if c % self.dim_head or c % self.groups:
                raise ValueError(f"channels {c} must be multiples of dim_head and groups")

    def attention_calls(self, batch: int, text_len: int = 77) -> list[dict]:
        """Every attention call of one forward pass, grouped by shape: `{kind, b, sq, skv, n, d, count}`."""
        rows = []
        levels = len(self.channels)
        for i, (c, depth) in enumerate(zip(self.channels, self.transformer_depth)):
            if not depth:
                continue
            stacks = self.layers_per_block + (self.layers_per_block + 1)  # down + up
            if i == levels - 1:
                stacks += 1  # the mid block
            tokens = (self.sample_size // 2 ** i) ** 2
            for kind, skv in (("self", tokens), ("cross", text_len)):
                rows.append(dict(kind=kind, b=batch, sq=tokens, skv=skv, n=c // self.dim_head,
                                 d=self.dim_head, count=stacks * depth))
        return rows


def _kw(cfg, rngs):
    return dict(dtype=cfg.dtype, param_dtype=cfg.dtype, rngs=rngs)


class ResBlock(nnx.Module):
    """GroupNorm, SiLU, 3x3 conv, + timestep, GroupNorm, SiLU, 3x3 conv; 1x1 conv skip if widths differ."""

    def __init__(self, cfg: UNetConfig, cin: int, cout: int, temb_dim: int, *, rngs):
        kw = _kw(cfg, rngs)
        self.norm1 = nnx.GroupNorm(cin, cfg.groups, epsilon=1e-5, **kw)
        self.conv1 = nnx.Conv(cin, cout, (3, 3), **kw)
        self.time_proj = nnx.Linear(temb_dim, cout, **kw)
        self.norm2 = nnx.GroupNorm(cout, cfg.groups, epsilon=1e-5, **kw)
        self.conv2 = nnx.Conv(cout, cout, (3, 3), **kw)
        self.skip = nnx.Conv(cin, cout, (1, 1), **kw) if cin != cout else None

    def __call__(self, x, temb):
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        h = h + self.time_proj(jax.nn.silu(temb))[:, None, None]
        h = self.conv2(jax.nn.silu(self.norm2(h)))
        return h + (x if self.skip is None else self.skip(x))


class CrossAttentionBlock(nnx.Module):
    """LayerNorm + self-attention, LayerNorm + cross-attention to the text, LayerNorm + GEGLU."""

    def __init__(self, cfg: UNetConfig, dim: int, *, rngs):
        kw = _kw(cfg, rngs)
        self.heads, self.dim_head = dim // cfg.dim_head, cfg.dim_head
        self.norm1 = nnx.LayerNorm(dim, **kw)
        self.attn1_qkv = nnx.Linear(dim, 3 * dim, use_bias=False, **kw)
        self.attn1_out = nnx.Linear(dim, dim, **kw)
        self.norm2 = nnx.LayerNorm(dim, **kw)
        self.attn2_q = nnx.Linear(dim, dim, use_bias=False, **kw)
        self.attn2_kv = nnx.Linear(cfg.context_dim, 2 * dim, use_bias=False, **kw)
        self.attn2_out = nnx.Linear(dim, dim, **kw)
        self.norm3 = nnx.LayerNorm(dim, **kw)
        self.ff_in = nnx.Linear(dim, 8 * dim, **kw)  # GEGLU: value and gate, 4x wide each
        self.ff_out = nnx.Linear(4 * dim, dim, **kw)

    def _heads(self, x):
        return x.reshape(*x.shape[:2], self.heads, self.dim_head)

    def __call__(self, x, context, attn_fn: AttnFn):
        b, s, c = x.shape
        q, k, v = jnp.split(self.attn1_qkv(self.norm1(x)), 3, axis=-1)
        x = x + self.attn1_out(attn_fn(self._heads(q), self._heads(k), self._heads(v)).reshape(b, s, c))
        q = self.attn2_q(self.norm2(x))
        k, v = jnp.split(self.attn2_kv(context), 2, axis=-1)
        x = x + self.attn2_out(attn_fn(self._heads(q), self._heads(k), self._heads(v)).reshape(b, s, c))
        val, gate = jnp.split(self.ff_in(self.norm3(x)), 2, axis=-1)
        return x + self.ff_out(val * jax.nn.gelu(gate, approximate=False))


class Transformer2D(nnx.Module):
    """GroupNorm, linear in, `depth` cross-attention blocks over the h*w tokens, linear out, residual."""

    def __init__(self, cfg: UNetConfig, dim: int, depth: int, *, rngs):
        kw = _kw(cfg, rngs)
        self.norm = nnx.GroupNorm(dim, cfg.groups, epsilon=1e-6, **kw)
        self.proj_in = nnx.Linear(dim, dim, **kw)
        self.blocks = BlockStack(lambda r: CrossAttentionBlock(cfg, dim, rngs=r), depth, rngs=rngs)
        self.proj_out = nnx.Linear(dim, dim, **kw)

    def __call__(self, x, context, attn_fn: AttnFn):
        b, hh, ww, c = x.shape
        h = self.proj_in(self.norm(x).reshape(b, hh * ww, c))
        h = self.blocks(h, context, attn_fn)
        return x + self.proj_out(h).reshape(b, hh, ww, c)


class UNet(nnx.Module):
    """`unet(latents (b, h, w, c), t (b,), context (b, l, context_dim), attn_fn=...)` -> noise, NHWC."""

    def __init__(self, cfg: UNetConfig = UNetConfig(), *, rngs: nnx.Rngs):
        self.cfg = cfg
        kw = _kw(cfg, rngs)
        ch, temb_dim = cfg.channels, 4 * cfg.channels[0]
        self.time_in = nnx.List([nnx.Linear(ch[0], temb_dim, **kw), nnx.Linear(temb_dim, temb_dim, **kw)])
        self.conv_in = nnx.Conv(cfg.in_channels, ch[0], (3, 3), **kw)

        def tf(c, depth):
            return Transformer2D(cfg, c, depth, rngs=rngs) if depth else None

        # Down: per level, layers_per_block (ResBlock, transformer?) pairs, then a stride-2 conv
        # except at the lowest level. `skips` tracks the widths the up path concatenates back.
        self.down, self.downsample, skips, cin = nnx.List(), nnx.List(), [ch[0]], ch[0]
        for i, (c, depth) in enumerate(zip(ch, cfg.transformer_depth)):
            for _ in range(cfg.layers_per_block):
                self.down.append(nnx.List([ResBlock(cfg, cin, c, temb_dim, rngs=rngs), tf(c, depth)]))
                cin = c
                skips.append(c)
            if i < len(ch) - 1:
                self.downsample.append(nnx.Conv(c, c, (3, 3), strides=2, **kw))
                skips.append(c)
        self.mid = nnx.List([ResBlock(cfg, cin, cin, temb_dim, rngs=rngs),
                             tf(cin, cfg.transformer_depth[-1]),
                             ResBlock(cfg, cin, cin, temb_dim, rngs=rngs)])
        # Up: per level from the lowest, layers_per_block + 1 pairs, each eating one skip, then a
        # nearest-neighbour 2x upsample and conv except at the top level.
        self.up, self.upsample = nnx.List(), nnx.List()
        for i in reversed(range(len(ch))):
            c, depth = ch[i], cfg.transformer_depth[i]
            for _ in range(cfg.layers_per_block + 1):
                self.up.append(nnx.List([ResBlock(cfg, cin + skips.pop(), c, temb_dim, rngs=rngs),
                                         tf(c, depth)]))
                cin = c
            if i > 0:
                self.upsample.append(nnx.Conv(c, c, (3, 3), **kw))
        self.norm_out = nnx.GroupNorm(ch[0], cfg.groups, epsilon=1e-5, **kw)
        self.conv_out = nnx.Conv(ch[0], cfg.in_channels, (3, 3), **kw)

    def __call__(self, latents, t, context, *, attn_fn: AttnFn = default_attention):
        cfg = self.cfg
        b = latents.shape[0]
        if latents.shape[1:] != (cfg.sample_size, cfg.sample_size, cfg.in_channels):
            raise ValueError(f"latents must have shape (b, {cfg.sample_size}, {cfg.sample_size}, "
                             f"{cfg.in_channels}), got {latents.shape}")
        if context.ndim != 3 or context.shape[0] != b or context.shape[-1] != cfg.context_dim:
            raise ValueError(f"context must have shape ({b}, l, {cfg.context_dim}), got {context.shape}")
        temb = timestep_embedding(jnp.broadcast_to(t, (b,)), cfg.channels[0]).astype(cfg.dtype)
        temb = self.time_in[1](jax.nn.silu(self.time_in[0](temb)))

        def pair(blocks, x):
            res, tf = blocks
            x = res(x, temb)
            return x if tf is None else tf(x, context, attn_fn)

        x = self.conv_in(latents.astype(cfg.dtype))
        skips, per_level = [x], cfg.layers_per_block
        for j, blocks in enumerate(self.down):
            x = pair(blocks, x)
            skips.append(x)
            level = j // per_level
            if j % per_level == per_level - 1 and level < len(self.downsample):
                x = self.downsample[level](x)
                skips.append(x)
        x = self.mid[0](x, temb)
        if self.mid[1] is not None:
            x = self.mid[1](x, context, attn_fn)
        x = self.mid[2](x, temb)
        for j, blocks in enumerate(self.up):
            x = pair(blocks, jnp.concatenate([x, skips.pop()], axis=-1))
            level = j // (per_level + 1)
            if j % (per_level + 1) == per_level and level < len(self.upsample):
                x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
                x = self.upsample[level](x)
        return self.conv_out(jax.nn.silu(self.norm_out(x)))


__all__ = ["UNet", "UNetConfig", "ResBlock", "CrossAttentionBlock", "Transformer2D"]
