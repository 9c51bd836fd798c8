"""jax-attn: one attention call for JAX/Flax diffusion models, routed to the fastest backend."""
from .api import attention_forward, available_backends, explain
from .parallel import sequence_parallel, shard_local
from .routing import BackendError, use_backend

__version__ = "0.1.0"
__all__ = ["attention_forward", "available_backends", "explain", "use_backend", "BackendError",
           "sequence_parallel", "shard_local"]
