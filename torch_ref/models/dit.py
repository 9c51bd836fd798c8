"""The torch twin of `jax_attn.models.dit.TinyDiT`: same config, layout, names and math.

Parameter names match the Flax model's (diffusers' `BasicTransformerBlock` names), so
`torch_ref.convert` moves weights either way; inputs are channels-last latents `(b, h, w, c)` as
in the Flax model. Flax's `LayerNorm` epsilon (1e-6) and tanh-approximated GELU are kept.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from jax_attn.models.dit import DiTConfig

from ..attention import Attention

FLAX_LAYER_NORM_EPS = 1e-6


def timestep_embedding(t, dim: int, max_period: float = 10000.0):
    """Sinusoidal embedding of (possibly fractional) timesteps `(b,)` -> `(b, dim)`."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.to(torch.float32)[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class GELUProj(nn.Module):
    def __init__(self, dim_in, dim_out):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)

    def forward(self, x):
        return F.gelu(self.proj(x), approximate="tanh")


class FeedForward(nn.Module):
    def __init__(self, dim, mult):
        super().__init__()
        self.net = nn.ModuleList([GELUProj(dim, dim * mult), nn.Dropout(0.0), nn.Linear(dim * mult, dim)])

    def forward(self, x):
        for layer in self.net:
            x = layer(x)
        return x


class TransformerBlock(nn.Module):
    def __init__(self, cfg: DiTConfig, backend=None):
        super().__init__()
        dim = cfg.dim
        attn = dict(heads=cfg.heads, dim_head=cfg.dim_head, qk_norm=cfg.qk_norm, out_bias=True, backend=backend)
        self.norm1 = nn.LayerNorm(dim, eps=FLAX_LAYER_NORM_EPS, elementwise_affine=False)
        self.attn1 = Attention(dim, **attn)
        self.norm2 = nn.LayerNorm(dim, eps=FLAX_LAYER_NORM_EPS)
        self.attn2 = Attention(dim, cfg.cross_attention_dim, **attn)
        self.norm3 = nn.LayerNorm(dim, eps=FLAX_LAYER_NORM_EPS, elementwise_affine=False)
        self.ff = FeedForward(dim, cfg.ff_mult)
        self.adaln = nn.Linear(dim, 6 * dim)

    def forward(self, x, temb, context, encoder_attention_mask=None, kv_lengths=None,
                cross_attention_kwargs=None):
        kw = cross_attention_kwargs or {}
        sh1, sc1, g1, sh2, sc2, g2 = self.adaln(F.silu(temb))[:, None].chunk(6, dim=-1)
        h = self.norm1(x) * (1 + sc1) + sh1
        x = x + g1 * self.attn1(h, **kw)
        x = x + self.attn2(self.norm2(x), context, encoder_attention_mask, kv_lengths=kv_lengths, **kw)
        h = self.norm3(x) * (1 + sc2) + sh2
        return x + g2 * self.ff(h)


class TinyDiT(nn.Module):
    """`model(latents (b, h, w, c), timesteps (b,), text (b, l, cross_attention_dim)) -> noise`.

    `cfg` is the Flax model's `DiTConfig`; its `backend` names a JAX backend, so the torch
    backend is given here as `backend` (a `torch_ref` choice; None = the usual routing).
    """

    def __init__(self, cfg: DiTConfig = DiTConfig(), *, backend=None):
        super().__init__()
        if cfg.sample_size % cfg.patch_size:
            raise ValueError(f"sample_size {cfg.sample_size} must be a multiple of patch_size {cfg.patch_size}")
        self.cfg = cfg
        dim, p = cfg.dim, cfg.patch_size
        self.proj_in = nn.Linear(p * p * cfg.in_channels, dim)
        self.pos_embed = nn.Parameter(0.02 * torch.randn(cfg.grid * cfg.grid, dim))
        self.time_embed = nn.ModuleList([nn.Linear(dim, dim), nn.Linear(dim, dim)])
        self.blocks = nn.ModuleList([TransformerBlock(cfg, backend) for _ in range(cfg.depth)])
        self.norm_out = nn.LayerNorm(dim, eps=FLAX_LAYER_NORM_EPS, elementwise_affine=False)
        self.adaln_out = nn.Linear(dim, 2 * dim)
        self.proj_out = nn.Linear(dim, p * p * cfg.in_channels)

    def forward(self, latents, timesteps, encoder_hidden_states, encoder_attention_mask=None, *,
                kv_lengths=None, cross_attention_kwargs=None):
        cfg = self.cfg
        b, h, w, c = latents.shape
        if (h, w, c) != (cfg.sample_size, cfg.sample_size, cfg.in_channels):
            raise ValueError(f"latents must have shape (b, {cfg.sample_size}, {cfg.sample_size}, "
                             f"{cfg.in_channels}), got {tuple(latents.shape)}")
        p, g = cfg.patch_size, cfg.grid
        x = latents.reshape(b, g, p, g, p, c).permute(0, 1, 3, 2, 4, 5).reshape(b, g * g, p * p * c)
        x = self.proj_in(x) + self.pos_embed
        t = torch.as_tensor(timesteps, device=latents.device)
        temb = timestep_embedding(t.expand(b) if t.ndim else t.reshape(1).expand(b), cfg.dim)
        temb = self.time_embed[1](F.silu(self.time_embed[0](temb)))
        mask = None if encoder_attention_mask is None else torch.as_tensor(encoder_attention_mask).bool()
        for block in self.blocks:
            x = block(x, temb, encoder_hidden_states, mask, kv_lengths, cross_attention_kwargs)
        shift, scale = self.adaln_out(F.silu(temb))[:, None].chunk(2, dim=-1)
        x = self.proj_out(self.norm_out(x) * (1 + scale) + shift)
        return x.reshape(b, g, g, p, p, c).permute(0, 1, 3, 2, 4, 5).reshape(b, h, w, c)
