"""Example models built from `jax_attn.Attention`."""
from .dit import DiTConfig, TinyDiT, ddim_schedule, ddim_step, embed_prompt

__all__ = ["DiTConfig", "TinyDiT", "ddim_schedule", "ddim_step", "embed_prompt"]
