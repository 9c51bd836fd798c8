"""Attention processors, written once for `jax_attn.Attention` (Flax NNX) and `torch_ref.Attention`.

This package imports no array framework. It is split by role, and every public name is importable
from `jax_attn.processors` as before:
  layers            finding a model's attention layers, and attaching processors all or nothing
  base              `AttnProcessorBase`, the default `AttnProcessor`, the shared q/k/v helpers
  sliced            `SlicedAttnProcessor` (diffusers' sliced attention)
  maps              `AttentionMapStore` (attention maps on the fast path)
  prompt_to_prompt  `AttentionReweightProcessor`, `AttentionMapReplaceProcessor`
  lora              `LoRAAttnProcessor`
The checks an `Attention` module runs on its own calls live in `jax_attn.module_rules`. A processor is a callable that receives the attention
module itself and does all of its math through that module's methods, attributes and `attn.ops`;
so the same class runs wherever a module implements the protocol below.

The protocol (what a module must provide; `b` batch, `sq`/`skv` query/key lengths, `n = heads`,
`d = dim_head`, `c_q = query_dim`, `c_kv = cross_attention_dim or query_dim`, `inner = n * d`)
------------------------------------------------------------------------------------------------
Attributes
  heads, dim_head, inner_dim, query_dim         ints
  cross_attention_dim                            int: width of `encoder_hidden_states` (c_kv)
  is_cross_attention                             bool: built with a `cross_attention_dim`
  scale                                          float, dim_head ** -0.5
  layer_name                                     str: path in the model ("" until
                                                 `set_attn_processor` names it; no ".processor")
  ops                                            the array-op namespace below
Sub-modules (callables)
  to_q (b, s, c_q) -> (b, s, inner)              to_k, to_v (b, s, c_kv) -> (b, s, inner)
  to_out[0] (b, s, inner) -> (b, s, c_q)         to_out[1] dropout (identity in inference)
  norm_q, norm_k                                 None, or (b, n, s, d) -> (b, n, s, d)
Head layout
  split_heads(x (b, s, n*d)) -> (b, n, s, d)     merge_heads(x (b, n, s, d)) -> (b, s, n*d)
  head_to_batch_dim(x (b, s, n*d), out_dim=3) -> (b*n, s, d), or (b, n, s, d) for out_dim=4
  batch_to_head_dim(x (b*n, s, d)) -> (b, s, n*d)
Attention
  attention_forward(q, k, v, attn_mask=None, kv_lengths=None, scale=None, return_lse=False)
      q (b, n, sq, d), k/v (b, n, skv, d) -> out (b, n, sq, d) [, lse (b, n, sq) float32]:
      the framework's routed attention with the module's backend; scale defaults to `attn.scale`.
  attention_logits(q, k, attn_mask=None, kv_lengths=None, query_index=None)
      -> float32 (b, n, nq, skv): scale * q.k + bias, masked keys at -inf, for the queries in
      `query_index` (a tuple of ints; all queries when None). Never more than asked.
  mask_to_bias(attn_mask, kv_lengths=None, kv_len=None) -> additive float32 rank-4 bias
      (-inf = dropped), or None when there is neither; `kv_len` = skv, needed for kv_lengths alone.
  prepare_attention_mask(attention_mask, target_length, batch_size, out_dim=3, kv_lengths=None)
      -> additive float32 (b*n, 1 or sq, skv) (or (b, n, 1 or sq, skv) for out_dim=4), or None.
  get_attention_scores(query (b*n, sq, d), key (b*n, skv, d), attention_mask=None)
      -> probabilities (b*n, sq, skv) in query's dtype (softmax in float32; fully masked rows 0).
Processor-owned state (lives in the module, one copy per layer, reset by `set_processor`)
  new_param(name, shape, init="zeros" | "normal", std=1.0)  trainable (nnx.Param / nn.Parameter)
  get_param(name) -> array
  new_state(name, value)                         non-trainable (nnx Variable / buffer)
  get_state(name) -> array                       set_state(name, value) (shape may change)
  has_state(name) -> bool                        (params and states share one namespace)
attn.ops: einsum(spec, *xs), matmul(a, b), exp, log, isfinite(x), where(cond, a, b),
  softmax(x, axis=-1) (a row of all -inf gives zeros), sum/mean(x, axis, keepdims=False),
  concatenate(xs, axis), take(x, index: tuple[int, ...], axis), cast(x, dtype),
  asarray(nested python list, like: an array whose dtype to use), zeros(shape) (float32),
  swapaxes(x, a, b), broadcast_to(x, shape). `where` and arithmetic accept Python scalars.
  Arrays also support `.shape`, `.reshape(shape_tuple)`, `.dtype`, indexing and arithmetic.

Calling convention
------------------
`attn(hidden_states, encoder_hidden_states=None, attention_mask=None, kv_lengths=None, **kw)`
runs `processor(attn, hidden_states, encoder_hidden_states, attention_mask, **kw)` where the module
has already normalized `attention_mask` to `attention_forward`'s convention (rank 4, broadcastable
to (b, n, sq, skv); bool True = attend, or an additive float bias) and passes `kv_lengths=` only
when given. `kw` are the model's `cross_attention_kwargs`; the module raises a `TypeError` naming
the processor and the key when the processor's `__call__` does not accept one.

State and mutability
--------------------
A processor object is configuration: under `nnx.jit` it is a static part of the graph, so it is
frozen once attached to a layer (setting an attribute raises; build a new one and set it). One
instance may be shared by many layers. Everything that changes or trains lives in the layer,
created through `attn.new_param` / `attn.new_state` in `setup(attn)`, which the module calls once
per layer on attach; `nnx.jit`, `nnx.grad` and optimizers see it as ordinary module state
(`jax_attn.attention.ProcessorState` for the non-trainable part). Setting another processor drops
the previous processor's state. Setting is all or nothing (`set_layer_processors`): a request is
checked whole before any layer changes, and a `setup` that raises leaves every layer with its
previous processor and state (modules provide `_save_processor()` / `_restore_processor(saved)`).
"""
from __future__ import annotations

import warnings

# Every public name of the former single module is importable from here, and so are the helpers
# the frameworks' modules and `jax_attn.module_rules` use.
from .base import AttnProcessor, AttnProcessorBase
from .layers import (LAYER_FINDERS, _layer_key, _processor_key, attention_layers,  # noqa: F401
                     check_processor, register_layer_finder, resolve_processors, set_layer_processors)
from .lora import LoRAAttnProcessor
from .maps import AttentionMapStore
from .prompt_to_prompt import AttentionMapReplaceProcessor, AttentionReweightProcessor
from .sliced import SlicedAttnProcessor

# Checks of a module's own call, moved to `jax_attn.module_rules` (they are the module's rules, not
# a processor's); the old names keep working for one deprecation cycle.
_MOVED = {"check_call": "jax_attn.module_rules", "check_processor_kwargs": "jax_attn.module_rules"}


def __getattr__(name):
    if name in _MOVED:
        warnings.warn(f"jax_attn.processors.{name} moved to {_MOVED[name]}.{name}", DeprecationWarning,
                      stacklevel=2)
        from .. import module_rules
        return getattr(module_rules, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["AttnProcessorBase", "AttnProcessor", "SlicedAttnProcessor", "AttentionMapStore",
           "AttentionReweightProcessor", "AttentionMapReplaceProcessor", "LoRAAttnProcessor",
           "attention_layers", "register_layer_finder"]
