"""Pallas (Triton-lowered) kernels, each beside a plain-jnp reference (`reference.py`)."""
from .configs import BwdConfig, Config, FwdConfig, get_config
from .flash_attention import flash_attention

__all__ = ["BwdConfig", "Config", "FwdConfig", "flash_attention", "get_config"]
