"""Old name of `jax_attn.adapters.flax` (Flax `attention_fn` adapters), kept so existing imports work.

`import jax_attn.flax_adapters` gives the very module `jax_attn.adapters.flax` (not a copy), so
attributes set on either are seen through both names.
"""
import sys

from .adapters import flax as _flax

sys.modules[__name__] = _flax
