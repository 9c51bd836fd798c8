"""Torch twins of `jax_attn.models`, built from `torch_ref.Attention` under the same names."""
from .dit import TinyDiT

__all__ = ["TinyDiT"]
