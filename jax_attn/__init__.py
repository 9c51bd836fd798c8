"""jax-attn: one attention call for JAX/Flax diffusion models, routed to the fastest backend."""
from .api import attention_forward, available_backends, explain
from .attention import Attention, ProcessorState, attn_processors, set_attn_processor
from .parallel import sequence_parallel, shard_local
from .processors import (AttentionMapReplaceProcessor, AttentionMapStore, AttentionReweightProcessor,
                         AttnProcessor, LoRAAttnProcessor, SlicedAttnProcessor)
from .routing import BackendError, use_backend

__version__ = "0.1.0"
__all__ = [
    "attention_forward", "available_backends", "explain", "use_backend", "BackendError",
    "sequence_parallel", "shard_local",
    "Attention", "ProcessorState", "attn_processors", "set_attn_processor",
    "AttnProcessor", "SlicedAttnProcessor", "AttentionMapStore", "AttentionReweightProcessor",
    "AttentionMapReplaceProcessor", "LoRAAttnProcessor",
]
