"""`Attention`: a Flax NNX attention layer built like diffusers' `Attention`, driven by processors.

The module owns the weights (diffusers names: `to_q`, `to_k`, `to_v`, `to_out[0]`, `norm_q`,
`norm_k`; kernels are `(in, out)`, the transpose of torch's `weight`) and the helpers; the
processor owns the computation (see `jax_attn.processors` for the protocol both sides follow).

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

import contextvars
import logging
import math
import zlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from . import processors as _processors
from .api import attention_forward as _attention_forward
from .backends.naive import _precision  # the one definition, shared with the backends
from .processors import AttnProcessor

log = logging.getLogger(__name__)

QK_NORMS = (None, "layer_norm", "rms_norm")
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


def _shape(x):
    return "(" + ", ".join(map(str, x.shape)) + ")"


class Attention(nnx.Module):
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

    def __init__(self, query_dim: int, cross_attention_dim: int | None = None, heads: int = 8,
                 dim_head: int = 64, bias: bool = False, out_bias: bool = True, qk_norm=None, *,
                 eps: float = 1e-5, out_dim: int | None = None, dropout: float = 0.0, backend=None,
                 processor=None, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        for name, val in (("query_dim", query_dim), ("heads", heads), ("dim_head", dim_head)):
            if not isinstance(val, int) or isinstance(val, bool) or val < 1:
                raise ValueError(f"{name} must be a positive int, got {val!r}")
        if cross_attention_dim is not None and (not isinstance(cross_attention_dim, int)
                                                or cross_attention_dim < 1):
            raise ValueError(f"cross_attention_dim must be a positive int or None, got {cross_attention_dim!r}")
        if qk_norm not in QK_NORMS:
            raise ValueError(f"qk_norm must be one of {QK_NORMS}, got {qk_norm!r}")
        if backend is not None:
            from .routing import parse_choice
            parse_choice(backend, "backend")
        self.query_dim = query_dim
        self.is_cross_attention = cross_attention_dim is not None
        self.cross_attention_dim = cross_attention_dim if cross_attention_dim is not None else query_dim
        self.heads = heads
        self.dim_head = dim_head
        self.inner_dim = heads * dim_head
        self.out_dim = out_dim if out_dim is not None else query_dim
        self.scale = dim_head ** -0.5
        self.backend = backend
        self.layer_name = ""
        self.ops = JaxOps
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.to_q = nnx.Linear(query_dim, self.inner_dim, use_bias=bias, **kw)
        self.to_k = nnx.Linear(self.cross_attention_dim, self.inner_dim, use_bias=bias, **kw)
        self.to_v = nnx.Linear(self.cross_attention_dim, self.inner_dim, use_bias=bias, **kw)
        self.to_out = nnx.List([nnx.Linear(self.inner_dim, self.out_dim, use_bias=out_bias, **kw),
                                nnx.Dropout(dropout, rngs=rngs)])
        if qk_norm == "layer_norm":
            self.norm_q = nnx.LayerNorm(dim_head, epsilon=eps, **kw)
            self.norm_k = nnx.LayerNorm(dim_head, epsilon=eps, **kw)
        elif qk_norm == "rms_norm":
            self.norm_q = nnx.RMSNorm(dim_head, epsilon=eps, **kw)
            self.norm_k = nnx.RMSNorm(dim_head, epsilon=eps, **kw)
        else:
            self.norm_q = self.norm_k = None
        self.processor_state = nnx.Dict()
        self.set_processor(AttnProcessor() if processor is None else processor)

    # ---- processors -------------------------------------------------------------------------
    def set_processor(self, processor, *, rngs: nnx.Rngs | None = None) -> None:
        """Attach `processor` (drops the previous one's state), run its `setup`, freeze it.

        When `setup` raises, the layer keeps its previous processor and state."""
        _processors.check_processor(processor, self.layer_name or None)
        saved = self._save_processor()
        self.processor_state = nnx.Dict()
        self.processor = processor
        token = _setup_key.set(None if rngs is None else rngs.params())
        try:
            setup = getattr(processor, "setup", None)
            if setup is not None:
                setup(self)
        except BaseException:
            self._restore_processor(saved)
            raise
        finally:
            _setup_key.reset(token)
        if isinstance(processor, _processors.AttnProcessorBase):
            processor.freeze()

    def _save_processor(self):
        """The processor and the variables it owns (kept as they are: `set_processor` replaces them)."""
        return getattr(self, "processor", None), self.processor_state

    def _restore_processor(self, saved) -> None:
        self.processor, self.processor_state = saved

    def get_processor(self):
        return self.processor

    def _check_new(self, name):
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"processor state name must be an identifier, got {name!r}")
        if name in self.processor_state:
            raise ValueError(f"processor state {name!r} already exists in layer {self.layer_name!r}")

    def new_param(self, name: str, shape, init: str = "zeros", std: float = 1.0):
        """Create a trainable float32 `nnx.Param` owned by the current processor."""
        self._check_new(name)
        shape = tuple(int(s) for s in shape)
        if init == "zeros":
            value = jnp.zeros(shape, jnp.float32)
        elif init == "normal":
            key = _setup_key.get()
            if key is None:  # deterministic per layer and name when no rngs were given
                key = jax.random.key(zlib.crc32(f"{self.layer_name}/{name}".encode()))
            else:
                key = jax.random.fold_in(key, zlib.crc32(name.encode()))
            value = std * jax.random.normal(key, shape, jnp.float32)
        else:
            raise ValueError(f"init must be 'zeros' or 'normal', got {init!r}")
        self.processor_state[name] = nnx.Param(value)

    def new_state(self, name: str, value) -> None:
        """Create non-trainable `ProcessorState` owned by the current processor."""
        self._check_new(name)
        self.processor_state[name] = ProcessorState(jnp.asarray(value))

    def _var(self, name):
        if name not in self.processor_state:
            raise KeyError(f"layer {self.layer_name!r} has no processor state {name!r} "
                           f"(has: {sorted(self.processor_state.keys())})")
        return self.processor_state[name]

    def has_state(self, name: str) -> bool:
        return name in self.processor_state

    def get_param(self, name: str):
        return self._var(name).get_value()

    get_state = get_param

    def set_state(self, name: str, value) -> None:
        self._var(name).set_value(value)

    # ---- head layout (diffusers helpers) ----------------------------------------------------
    def split_heads(self, x):
        """(b, s, n*d) -> (b, n, s, d)."""
        b, s, _ = x.shape
        return x.reshape(b, s, self.heads, -1).transpose(0, 2, 1, 3)

    def merge_heads(self, x):
        """(b, n, s, d) -> (b, s, n*d)."""
        b, n, s, d = x.shape
        return x.transpose(0, 2, 1, 3).reshape(b, s, n * d)

    def head_to_batch_dim(self, tensor, out_dim: int = 3):
        """(b, s, n*d) -> (b*n, s, d) (out_dim=3) or (b, n, s, d) (out_dim=4), as diffusers."""
        if out_dim not in (3, 4):
            raise ValueError(f"out_dim must be 3 or 4, got {out_dim!r}")
        x = self.split_heads(tensor)
        return x.reshape(-1, x.shape[2], x.shape[3]) if out_dim == 3 else x

    def batch_to_head_dim(self, tensor):
        """(b*n, s, d) -> (b, s, n*d), as diffusers."""
        bn, s, d = tensor.shape
        return self.merge_heads(tensor.reshape(bn // self.heads, self.heads, s, d))

    # ---- masks ------------------------------------------------------------------------------
    def normalize_mask(self, attention_mask, batch_size=None, target_length=None, q_len=None):
        """A module-level mask (see the module docstring) in `attention_forward`'s convention:
        rank 4, bool keep mask or additive float bias, broadcastable to (b, n, sq, skv)."""
        if attention_mask is None:
            return None
        if not hasattr(attention_mask, "shape") or not hasattr(attention_mask, "dtype"):
            raise TypeError(f"attention_mask must be an array, got {type(attention_mask).__name__}")
        m = jnp.asarray(attention_mask)
        if m.ndim == 2:
            m = m[:, None, None, :]
        elif m.ndim == 3:
            m = m[:, None]
        elif m.ndim != 4:
            raise ValueError(f"attention_mask must have shape (b, skv), (b, sq, skv) or (b, n, sq, skv), "
                             f"got {_shape(attention_mask)}")
        full = (batch_size, self.heads, q_len, target_length)
        if any(f is not None and s not in (1, f) for s, f in zip(m.shape, full)):
            want = tuple("?" if f is None else f for f in full)
            raise ValueError(f"attention_mask of shape {_shape(attention_mask)} does not broadcast to "
                             f"(b, n, sq, skv) = ({', '.join(map(str, want))})")
        if target_length is not None and m.shape[3] != target_length:
            raise ValueError(f"attention_mask must have skv = {target_length} keys in its last dim, "
                             f"got {_shape(attention_mask)}")
        if m.dtype == jnp.bool_:
            return m
        if jnp.issubdtype(m.dtype, jnp.integer):
            return m != 0
        if jnp.issubdtype(m.dtype, jnp.floating):
            return m
        raise TypeError(f"attention_mask must be bool, integer (0/1 keep) or float (additive), got {m.dtype}")

    def _check_kv_lengths(self, kv_lengths, batch_size):
        if kv_lengths is None:
            return None
        if not hasattr(kv_lengths, "shape") or not hasattr(kv_lengths, "dtype"):
            raise TypeError(f"kv_lengths must be an integer array of shape ({batch_size},), "
                            f"got {type(kv_lengths).__name__}")
        if tuple(kv_lengths.shape) != (batch_size,) or not jnp.issubdtype(kv_lengths.dtype, jnp.integer):
            raise ValueError(f"kv_lengths must be an integer array of shape ({batch_size},), got "
                             f"{kv_lengths.dtype} {_shape(kv_lengths)}")
        return kv_lengths

    def mask_to_bias(self, attn_mask, kv_lengths=None, kv_len=None):
        """Additive float32 rank-4 bias (-inf = dropped key) from a mask and/or kv_lengths.

        `kv_len` (skv) is needed when only `kv_lengths` is given; None when there is neither.
        """
        bias = None
        if attn_mask is not None:
            m = self.normalize_mask(attn_mask)
            bias = (jnp.where(m, 0.0, -jnp.inf) if m.dtype == jnp.bool_ else m).astype(jnp.float32)
        if kv_lengths is not None:
            if bias is None:
                if kv_len is None:
                    raise ValueError("mask_to_bias: kv_len is required when only kv_lengths is given")
                bias = jnp.zeros((1, 1, 1, kv_len), jnp.float32)
            keep = jnp.arange(bias.shape[3])[None, None, None, :] < kv_lengths[:, None, None, None]
            bias = jnp.where(keep, bias, -jnp.inf)
        return bias

    def prepare_attention_mask(self, attention_mask, target_length, batch_size, out_dim: int = 3,
                               kv_lengths=None):
        """diffusers' helper: additive float32 mask (b*n, 1|sq, skv) (out_dim=3) or (b, n, 1|sq, skv).

        Accepts any module-level mask form (bool/int keep mask or float bias) and folds
        `kv_lengths` in; None when there is neither.
        """
        if out_dim not in (3, 4):
            raise ValueError(f"out_dim must be 3 or 4, got {out_dim!r}")
        if attention_mask is None and kv_lengths is None:
            return None
        if attention_mask is None:
            attention_mask = jnp.zeros((batch_size, 1, 1, target_length), jnp.float32)
        m = self.normalize_mask(attention_mask, batch_size, target_length)
        bias = self.mask_to_bias(m, kv_lengths)
        bias = jnp.broadcast_to(bias, (batch_size, self.heads, bias.shape[2], target_length))
        return bias.reshape(-1, bias.shape[2], target_length) if out_dim == 3 else bias

    # ---- attention --------------------------------------------------------------------------
    def get_attention_scores(self, query, key, attention_mask=None):
        """diffusers' helper: softmax(scale q k^T + mask) over (b*n, sq|1, skv), in query's dtype."""
        s = jnp.einsum("bqd,bkd->bqk", query.astype(jnp.float32), key.astype(jnp.float32),
                       precision=jax.lax.Precision.HIGHEST) * self.scale
        if attention_mask is not None:
            s = s + attention_mask.astype(jnp.float32)
        return JaxOps.softmax(s, axis=-1).astype(query.dtype)

    def attention_forward(self, q, k, v, attn_mask=None, kv_lengths=None, scale=None,
                          return_lse=False):
        """`jax_attn.attention_forward` in (b, n, s, d) with this module's scale and backend."""
        return _attention_forward(q, k, v, attn_mask=attn_mask, kv_lengths=kv_lengths,
                                  scale=self.scale if scale is None else scale, backend=self.backend,
                                  return_lse=return_lse)

    def attention_logits(self, q, k, attn_mask=None, kv_lengths=None, query_index=None):
        """float32 (b, n, nq, skv): scale q.k + bias with masked keys at -inf, chosen queries only."""
        if query_index is not None:
            q = JaxOps.take(q, query_index, 2)
        s = jnp.einsum("bnqd,bnkd->bnqk", q.astype(jnp.float32), k.astype(jnp.float32),
                       precision=jax.lax.Precision.HIGHEST) * self.scale
        if attn_mask is not None:
            m = self.normalize_mask(attn_mask)
            if query_index is not None and m.shape[2] != 1:
                m = JaxOps.take(m, query_index, 2)
            s = jnp.where(m, s, -jnp.inf) if m.dtype == jnp.bool_ else s + m.astype(jnp.float32)
        if kv_lengths is not None:
            keep = jnp.arange(k.shape[2])[None, None, None, :] < kv_lengths[:, None, None, None]
            s = jnp.where(keep, s, -jnp.inf)
        return s

    # ---- call -------------------------------------------------------------------------------
    def __call__(self, hidden_states, encoder_hidden_states=None, attention_mask=None, *,
                 kv_lengths=None, **cross_attention_kwargs):
        """Run the processor: `(b, sq, query_dim)` -> `(b, sq, out_dim)`."""
        b, sq, skv = _processors.check_call(self, hidden_states, encoder_hidden_states)
        mask = self.normalize_mask(attention_mask, b, skv, sq)
        kwargs = dict(cross_attention_kwargs)
        if self._check_kv_lengths(kv_lengths, b) is not None:
            kwargs["kv_lengths"] = kv_lengths
        _processors.check_processor_kwargs(self.processor, kwargs, self.layer_name)
        return self.processor(self, hidden_states, encoder_hidden_states, mask, **kwargs)


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


@_processors.register_layer_finder
def _find_layers(model):
    return attention_layers(model) if isinstance(model, nnx.Module) else None


_processor_key = _processors._processor_key


def attn_processors(model) -> dict:
    """`{"<layer path>.processor": processor}` (diffusers' keys) for every attention layer."""
    return {_processor_key(p): layer.processor for p, layer in attention_layers(model).items()}


def set_attn_processor(model, processor, *, rngs: nnx.Rngs | None = None) -> None:
    """Set one processor on every attention layer, or a dict `{layer key: processor}` naming each.

    Keys are those of `attn_processors` (the ".processor" suffix may be left off). A dict that
    misses a layer or names an unknown one raises `ValueError`. `rngs` seeds processor parameters
    (LoRA); without it they are seeded from the layer path. Outside `nnx.jit` only.

    All or nothing: the whole request is checked before any layer changes (`TypeError` /
    `ValueError` naming the key), and when a processor's `setup` raises, every layer keeps its
    previous processor and state, and the error propagates.
    """
    layers = attention_layers(model)
    if not layers:
        raise ValueError(f"model {type(model).__name__} has no jax_attn.Attention layer")
    _processors.set_layer_processors(layers, processor,
                                     lambda layer, p: layer.set_processor(p, rngs=rngs))


__all__ = ["Attention", "ProcessorState", "JaxOps", "attention_layers", "attn_processors",
           "set_attn_processor"]
