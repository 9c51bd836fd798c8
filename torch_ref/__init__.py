"""torch_ref: the PyTorch twin of jax_attn: the same attention contract, routing and processors,
and weight conversion between the two frameworks (and diffusers)."""
from .api import attention_forward, available_backends, explain
from .attention import Attention, attn_processors, set_attn_processor
from .convert import flax_state_dict, load_state_dict_into_flax
from .routing import BackendError, use_backend

__all__ = ["attention_forward", "available_backends", "explain", "use_backend", "BackendError",
           "Attention", "attn_processors", "set_attn_processor", "flax_state_dict",
           "load_state_dict_into_flax"]
