"""Example models built from `jax_attn.Attention`, and benchmark-sized ones with pluggable attention."""
from .dit import DiTConfig, TinyDiT, ddim_schedule, ddim_step, embed_prompt
from .dit_large import JointDiT, JointDiTConfig
from .unet import UNet, UNetConfig

__all__ = ["DiTConfig", "TinyDiT", "ddim_schedule", "ddim_step", "embed_prompt", "JointDiT",
           "JointDiTConfig", "UNet", "UNetConfig"]
