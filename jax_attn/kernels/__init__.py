"""Pallas kernels, each beside a plain-jnp reference (`reference.py`).

Modules keep their own names, and nothing here re-exports a function under a module's name:
`kernels.flash_attention` is the Triton-lowered kernel module (its entry point is
`kernels.flash_attention.flash_attention`), `kernels.mosaic_attention` the Mosaic GPU one,
`kernels.configs` the block-size tables, `kernels.sharding` the partitioning rules.
"""
from . import configs, flash_attention
from .configs import BwdConfig, Config, FwdConfig, get_config

__all__ = ["BwdConfig", "Config", "FwdConfig", "configs", "flash_attention", "get_config"]
