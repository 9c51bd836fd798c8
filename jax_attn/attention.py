"""`Attention`: a Flax NNX attention layer built like diffusers' `Attention`, driven by processors.

The module owns the weights (diffusers names: `to_q`, `to_k`, `to_v`, `to_out[0]`, `norm_q`,
`norm_k`; kernels are `(in, out)`, the transpose of torch's `weight`) and the helpers; the
processor owns the computation (see `jax_attn.processors` for the protocol both sides follow).
What the Flax and torch modules decide alike (argument checks, sizes, processor attachment, mask
rules, call checks) is `jax_attn.module_rules.AttentionRules`; this file holds the Flax half: the
NNX layers and variables, the jnp ops, and the mask math on jnp arrays.

Masks at the module level, for hidden states `(b, sq, c)` and context `(b, skv, c_kv)`:
- `attention_mask` of shape `(b, skv)`, `(b, sq|1, skv)` or `(b, n|1, sq|1, skv)` (any of those
  dims may be 1). bool or integer (0/1): a keep mask, True/1 = attend. float: an additive bias, as
  diffusers' `Attention` receives it (its models turn 0/1 masks into `-10000` biases; `-inf` drops
  a key outright here).
- `kv_lengths` int `(b,)`: keys at positions `>= kv_lengths[i]` are padding (text-encoder padding),
  the cheapest form for the kernels. Both may be given; a key is kept only if both keep it.
A query with no key left returns zeros (the `attention_forward` contract), unlike diffusers'
finite `-10000` bias, which averages the values there.
"""
from __future__ import annotations

import contextlib
import contextvars
import logging

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from . import module_rules as _rules
from .api import attention_forward as _attention_forward
from .backends.naive import _precision  # the one definition, shared with the backends
from .module_rules import QK_NORMS  # noqa: F401  (its former home; torch_ref imported it from here)

log = logging.getLogger(__name__)

# The PRNG key for processor parameters while a processor's `setup` runs (not module state).
_setup_key: contextvars.ContextVar = contextvars.ContextVar("jax_attn_setup_key", default=None)


class ProcessorState(nnx.Variable):
    """Non-trainable state a processor keeps in a layer (e.g. recorded attention maps)."""


class JaxOps:
    """The array operations processors may use (`attn.ops`), in jnp."""

    @staticmethod
    def einsum(spec, *xs):
        return jnp.einsum(spec, *xs, precision=_precision(xs[0].dtype))

    @staticmethod
    def matmul(a, b):
        return jnp.matmul(a, b, precision=_precision(a.dtype))

    exp = staticmethod(jnp.exp)
    log = staticmethod(jnp.log)
    isfinite = staticmethod(jnp.isfinite)
    where = staticmethod(jnp.where)
    swapaxes = staticmethod(jnp.swapaxes)

    @staticmethod
    def softmax(x, axis=-1):
        """Softmax whose all -inf rows give zeros (not NaN)."""
        m = jnp.max(x, axis=axis, keepdims=True)
        m = jax.lax.stop_gradient(jnp.where(jnp.isneginf(m), 0.0, m))
        e = jnp.exp(x - m)
        s = jnp.sum(e, axis=axis, keepdims=True)
        return e / jnp.where(s > 0, s, 1.0)

    @staticmethod
    def sum(x, axis=None, keepdims=False):
        return jnp.sum(x, axis=axis, keepdims=keepdims)

    @staticmethod
    def mean(x, axis=None, keepdims=False):
        return jnp.mean(x, axis=axis, keepdims=keepdims)

    @staticmethod
    def concatenate(xs, axis=0):
        return jnp.concatenate(list(xs), axis=axis)

    @staticmethod
    def take(x, index, axis):
        return jnp.take(x, jnp.asarray(index, jnp.int32), axis=axis)

    @staticmethod
    def cast(x, dtype):
        return x.astype(dtype)

    @staticmethod
    def asarray(data, like):
        return jnp.asarray(np.asarray(data, dtype=np.float64), dtype=like.dtype)

    @staticmethod
    def zeros(shape):
        return jnp.zeros(shape, jnp.float32)

    broadcast_to = staticmethod(jnp.broadcast_to)


def _dtype_kind(dtype) -> str:
    if dtype == jnp.bool_:
        return "bool"
    if jnp.issubdtype(dtype, jnp.integer):
        return "integer"
    return "floating" if jnp.issubdtype(dtype, jnp.floating) else "other"


class Attention(nnx.Module, _rules.AttentionRules):
    """Multi-head self- or cross-attention with diffusers' layout, names and processor protocol.

    Args:
      query_dim: channels of `hidden_states` (b, sq, query_dim).
      cross_attention_dim: channels of `encoder_hidden_states`; None = self-attention (query_dim).
      heads, dim_head: `inner_dim = heads * dim_head`.
      bias: biases on `to_q`, `to_k`, `to_v`.  out_bias: bias on `to_out[0]`.
      qk_norm: None, "layer_norm" or "rms_norm", over `dim_head`, on q and k after the head split.
      eps: epsilon of the q/k norms (diffusers' default 1e-5).
      out_dim: output channels (default query_dim).
      dropout: rate of `to_out[1]` (needs `rngs` at call time when active; 0 = identity).
      backend: backend choice for `attention_forward` (None = the usual routing).
      processor: initial processor (default `AttnProcessor()`).
      dtype, param_dtype: computation and parameter dtypes of the projections.
    """

    _route = staticmethod(_attention_forward)
    _float32 = jnp.float32
    _asarray = staticmethod(jnp.asarray)
    _dtype_kind = staticmethod(_dtype_kind)
    _dtype_name = staticmethod(str)

    def __init__(self, query_dim: int, cross_attention_dim: int | None = None, heads: int = 8,
                 dim_head: int = 64, bias: bool = False, out_bias: bool = True, qk_norm=None, *,
                 eps: float = 1e-5, out_dim: int | None = None, dropout: float = 0.0, backend=None,
                 processor=None, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        from .routing import parse_choice  # late: routing imports the backends, which import this
        self._configure(query_dim, cross_attention_dim, heads, dim_head, qk_norm, out_dim, backend,
                        parse_choice)
        self.ops = JaxOps
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        norms = {"layer_norm": nnx.LayerNorm, "rms_norm": nnx.RMSNorm}
        self._build_layers(lambda d_in, d_out, b: nnx.Linear(d_in, d_out, use_bias=b, **kw),
                           lambda kind: norms[kind](dim_head, epsilon=eps, **kw),
                           lambda proj: nnx.List([proj, nnx.Dropout(dropout, rngs=rngs)]),
                           bias, out_bias, qk_norm)
        self.processor_state = nnx.Dict()
        self.set_processor(_rules.default_processor(processor))

    # ---- processors: the NNX side of `AttentionRules._attach` --------------------------------
    def set_processor(self, processor, *, rngs: nnx.Rngs | None = None) -> None:
        """Attach `processor` (drops the previous one's state), run its `setup`, freeze it.

        When `setup` raises, the layer keeps its previous processor and state."""
        self._attach(processor, rngs)

    @staticmethod
    @contextlib.contextmanager
    def _seeded(rngs):
        token = _setup_key.set(None if rngs is None else rngs.params())
        try:
            yield
        finally:
            _setup_key.reset(token)

    def _reset_processor(self, processor) -> None:
        self.processor_state = nnx.Dict()
        self.processor = processor

    def _save_processor(self):
        """The processor and the variables it owns (kept as they are: `set_processor` replaces them)."""
        return getattr(self, "processor", None), self.processor_state

    def _restore_processor(self, saved) -> None:
        self.processor, self.processor_state = saved

    def new_param(self, name: str, shape, init: str = "zeros", std: float = 1.0):
        """Create a trainable float32 `nnx.Param` owned by the current processor."""
        self._check_new(name, init)
        shape = tuple(int(s) for s in shape)
        if init == "zeros":
            value = jnp.zeros(shape, jnp.float32)
        else:
            key = _setup_key.get()
            if key is None:  # deterministic per layer and name when no rngs were given
                key = jax.random.key(_rules.param_seed(self.layer_name, name))
            else:
                key = jax.random.fold_in(key, _rules.name_seed(name))
            value = std * jax.random.normal(key, shape, jnp.float32)
        self.processor_state[name] = nnx.Param(value)

    def new_state(self, name: str, value) -> None:
        """Create non-trainable `ProcessorState` owned by the current processor."""
        self._check_new(name)
        self.processor_state[name] = ProcessorState(jnp.asarray(value))

    def _state_names(self):
        return self.processor_state.keys()

    def has_state(self, name: str) -> bool:
        return name in self.processor_state

    def get_param(self, name: str):
        self._check_known(name)
        return self.processor_state[name].get_value()

    get_state = get_param

    def set_state(self, name: str, value) -> None:
        self._check_known(name)
        self.processor_state[name].set_value(value)

    # ---- mask math on jnp arrays (the rules are `AttentionRules`') ---------------------------
    @staticmethod
    def _mask_logits(s, m):
        return jnp.where(m, s, -jnp.inf) if m.dtype == jnp.bool_ else s + m.astype(jnp.float32)

    @staticmethod
    def _drop_padding(s, kv_lengths):
        keep = jnp.arange(s.shape[3])[None, None, None, :] < kv_lengths[:, None, None, None]
        return jnp.where(keep, s, -jnp.inf)

    # ---- call -------------------------------------------------------------------------------
    def __call__(self, hidden_states, encoder_hidden_states=None, attention_mask=None, *,
                 kv_lengths=None, **cross_attention_kwargs):
        """Run the processor: `(b, sq, query_dim)` -> `(b, sq, out_dim)`."""
        return self._run(hidden_states, encoder_hidden_states, attention_mask, kv_lengths,
                         cross_attention_kwargs)


# ---- model-level helpers ---------------------------------------------------------------------
def _path_str(path) -> str:
    return ".".join(str(p) for p in path)


def attention_layers(model) -> dict:
    """`{layer path: Attention}` for every `Attention` in an NNX module tree (each once)."""
    if not isinstance(model, nnx.Module):
        raise TypeError(f"model must be a flax.nnx.Module, got {type(model).__name__}")
    found = {}
    for path, node in nnx.iter_graph(model):
        if isinstance(node, Attention):
            found[_path_str(path)] = node
    return found


_rules.register_finder(nnx.Module, attention_layers)


def attn_processors(model) -> dict:
    """`{"<layer path>.processor": processor}` (diffusers' keys) for every attention layer."""
    return _rules.processor_map(attention_layers(model))


def set_attn_processor(model, processor, *, rngs: nnx.Rngs | None = None) -> None:
    """Set one processor on every attention layer, or a dict `{layer key: processor}` naming each.

    Keys are those of `attn_processors` (the ".processor" suffix may be left off). A dict that
    misses a layer or names an unknown one raises `ValueError`. `rngs` seeds processor parameters
    (LoRA); without it they are seeded from the layer path. Outside `nnx.jit` only.

    All or nothing: the whole request is checked before any layer changes (`TypeError` /
    `ValueError` naming the key), and when a processor's `setup` raises, every layer keeps its
    previous processor and state, and the error propagates.
    """
    _rules.set_processors(model, attention_layers(model), processor,
                          lambda layer, p: layer.set_processor(p, rngs=rngs), "jax_attn")


__all__ = ["Attention", "ProcessorState", "JaxOps", "attention_layers", "attn_processors",
           "set_attn_processor"]
