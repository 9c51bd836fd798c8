"""The framework-free half of the `Attention` layer, written once for `jax_attn.Attention` (Flax
NNX) and `torch_ref.Attention` (torch).

This module imports no array framework. `AttentionRules` is a mixin both modules inherit; it holds
everything they decide the same way: the constructor's argument checks and sizes, which
sub-layers exist, attaching a processor (its `setup`, the rollback when it raises, freezing),
the rules of processor state names, the head layout, the module-level mask rules and their error
messages, and a call's checks before the processor runs. Its array work goes through `attn.ops`
(the processors' op namespace), so it runs on either framework's arrays.

What stays in each framework (array math and module systems), as hooks a subclass provides:
  ops                        the op namespace (`JaxOps` / `TorchOps`)
  _route                     the framework's `attention_forward`
  _float32                   the framework's float32 dtype
  _asarray(x)                an array of the framework from any array-like
  _dtype_kind(dtype)         "bool", "integer", "floating" or "other"
  _dtype_name(dtype)         the dtype as error messages name it ("float16")
  _mask_logits(s, m)         scores with a rank-4 mask applied: bool drops at -inf, float adds
  _drop_padding(s, lengths)  scores with keys at positions >= lengths[i] at -inf
  _reset_processor(p)        fresh, empty processor state, and `p` stored as the processor
  _seeded(seed)              a context in which `new_param` draws from `seed` (None: per name)
  _save_processor(), _restore_processor(saved), has_state(name), _state_names()
"""
from __future__ import annotations

import inspect
import zlib

from .processors import (AttnProcessor, AttnProcessorBase, check_processor, register_layer_finder,
                         set_layer_processors)
from .processors.layers import _processor_key

QK_NORMS = (None, "layer_norm", "rms_norm")


def _shape(x) -> str:
    return "(" + ", ".join(map(str, x.shape)) + ")"


def _is_array(x) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype")


def check_out_dim(out_dim) -> None:
    if out_dim not in (3, 4):
        raise ValueError(f"out_dim must be 3 or 4, got {out_dim!r}")


def check_call(attn, hidden_states, encoder_hidden_states) -> tuple[int, int, int]:
    """Validate an `Attention` call's inputs (either framework); returns `(b, sq, skv)`."""
    if getattr(hidden_states, "ndim", None) != 3 or hidden_states.shape[-1] != attn.query_dim:
        got = _shape(hidden_states) if hasattr(hidden_states, "shape") else type(hidden_states).__name__
        raise ValueError(f"hidden_states must have shape (b, sq, query_dim={attn.query_dim}), got {got}")
    b, sq, _ = hidden_states.shape
    if encoder_hidden_states is None:
        return b, sq, sq
    if (getattr(encoder_hidden_states, "ndim", None) != 3 or encoder_hidden_states.shape[0] != b
            or encoder_hidden_states.shape[-1] != attn.cross_attention_dim):
        raise ValueError(f"encoder_hidden_states must have shape (b={b}, skv, "
                         f"cross_attention_dim={attn.cross_attention_dim}), got "
                         f"{_shape(encoder_hidden_states)}")
    return b, sq, encoder_hidden_states.shape[1]


def check_processor_kwargs(processor, kwargs, layer_name) -> None:
    """A `TypeError` naming the processor, the layer and the keys its `__call__` does not take."""
    if not kwargs:
        return
    fn = processor if inspect.isfunction(processor) or inspect.ismethod(processor) else processor.__call__
    params = inspect.signature(fn).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return
    accepted = {p.name for p in params if p.kind in (inspect.Parameter.KEYWORD_ONLY,
                                                     inspect.Parameter.POSITIONAL_OR_KEYWORD)}
    accepted -= {"self", "attn", "hidden_states", "encoder_hidden_states", "attention_mask"}
    bad = sorted(set(kwargs) - accepted)
    if bad:
        raise TypeError(f"attention processor {type(processor).__name__} at layer {layer_name!r} does "
                        f"not accept {', '.join(map(repr, bad))} (from cross_attention_kwargs or "
                        f"kv_lengths); it accepts: {', '.join(sorted(accepted)) or 'nothing extra'}")


def rank4_mask_shape(attention_mask, heads, batch_size=None, target_length=None, q_len=None) -> tuple:
    """The rank-4 shape a module-level mask is read as ((b, skv) -> (b, 1, 1, skv), (b, sq, skv)
    -> (b, 1, sq, skv)), after checking that it broadcasts to (b, n, sq, skv) for the sizes given
    (None = not checked)."""
    if not _is_array(attention_mask):
        raise TypeError(f"attention_mask must be an array, got {type(attention_mask).__name__}")
    shape = tuple(attention_mask.shape)
    if len(shape) == 2:
        shape = (shape[0], 1, 1, shape[1])
    elif len(shape) == 3:
        shape = (shape[0], 1, *shape[1:])
    elif len(shape) != 4:
        raise ValueError(f"attention_mask must have shape (b, skv), (b, sq, skv) or (b, n, sq, skv), "
                         f"got {_shape(attention_mask)}")
    full = (batch_size, heads, q_len, target_length)
    if any(f is not None and s not in (1, f) for s, f in zip(shape, full)):
        want = tuple("?" if f is None else f for f in full)
        raise ValueError(f"attention_mask of shape {_shape(attention_mask)} does not broadcast to "
                         f"(b, n, sq, skv) = ({', '.join(map(str, want))})")
    if target_length is not None and shape[3] != target_length:
        raise ValueError(f"attention_mask must have skv = {target_length} keys in its last dim, "
                         f"got {_shape(attention_mask)}")
    return shape


def param_seed(layer_name: str, name: str) -> int:
    """The seed of a processor parameter drawn without a generator: fixed per layer path and name,
    so a model rebuilt the same way gets the same parameters."""
    return zlib.crc32(f"{layer_name}/{name}".encode())


def name_seed(name: str) -> int:
    """What a parameter's name folds into a given generator, so each name draws its own numbers."""
    return zlib.crc32(name.encode())


class AttentionRules:
    """The methods `jax_attn.Attention` and `torch_ref.Attention` share (see the module docstring
    for the hooks a framework provides)."""

    # ---- construction -----------------------------------------------------------------------
    def _configure(self, query_dim, cross_attention_dim, heads, dim_head, qk_norm, out_dim, backend,
                   parse_choice) -> None:
        """Check the constructor's arguments (a `ValueError` naming the argument) and set the sizes
        the processor protocol reads; `parse_choice` checks `backend` against the framework's
        backends."""
        for name, val in (("query_dim", query_dim), ("heads", heads), ("dim_head", dim_head)):
            if not isinstance(val, int) or isinstance(val, bool) or val < 1:
                raise ValueError(f"{name} must be a positive int, got {val!r}")
        if cross_attention_dim is not None and (not isinstance(cross_attention_dim, int)
                                                or cross_attention_dim < 1):
            raise ValueError(f"cross_attention_dim must be a positive int or None, got {cross_attention_dim!r}")
        if qk_norm not in QK_NORMS:
            raise ValueError(f"qk_norm must be one of {QK_NORMS}, got {qk_norm!r}")
        if backend is not None:
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

    def _build_layers(self, linear, norm, to_out, bias: bool, out_bias: bool, qk_norm) -> None:
        """diffusers' sub-layers, in diffusers' order (the state-dict order): `linear(in, out, bias)`,
        `norm(kind)` over `dim_head`, `to_out(projection)` the output list with its dropout."""
        self.to_q = linear(self.query_dim, self.inner_dim, bias)
        self.to_k = linear(self.cross_attention_dim, self.inner_dim, bias)
        self.to_v = linear(self.cross_attention_dim, self.inner_dim, bias)
        self.to_out = to_out(linear(self.inner_dim, self.out_dim, out_bias))
        self.norm_q = None if qk_norm is None else norm(qk_norm)
        self.norm_k = None if qk_norm is None else norm(qk_norm)

    # ---- processors -------------------------------------------------------------------------
    def _attach(self, processor, seed) -> None:
        """Attach `processor` (drops the previous one's state), run its `setup` with `new_param`
        drawing from `seed`, freeze it. When `setup` raises, the layer keeps its previous processor
        and state."""
        check_processor(processor, self.layer_name or None)
        saved = self._save_processor()
        self._reset_processor(processor)
        try:
            with self._seeded(seed):
                setup = getattr(processor, "setup", None)
                if setup is not None:
                    setup(self)
        except BaseException:
            self._restore_processor(saved)
            raise
        if isinstance(processor, AttnProcessorBase):
            processor.freeze()

    def get_processor(self):
        return self.processor

    def _check_new(self, name, init: str = "zeros"):
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"processor state name must be an identifier, got {name!r}")
        if self.has_state(name):
            raise ValueError(f"processor state {name!r} already exists in layer {self.layer_name!r}")
        if init not in ("zeros", "normal"):
            raise ValueError(f"init must be 'zeros' or 'normal', got {init!r}")

    def _check_known(self, name):
        if not self.has_state(name):
            raise KeyError(f"layer {self.layer_name!r} has no processor state {name!r} "
                           f"(has: {sorted(self._state_names())})")

    # ---- head layout (diffusers helpers) ----------------------------------------------------
    def split_heads(self, x):
        """(b, s, n*d) -> (b, n, s, d)."""
        b, s, _ = x.shape
        return self.ops.swapaxes(x.reshape((b, s, self.heads, -1)), 1, 2)

    def merge_heads(self, x):
        """(b, n, s, d) -> (b, s, n*d)."""
        b, n, s, d = x.shape
        return self.ops.swapaxes(x, 1, 2).reshape((b, s, n * d))

    def head_to_batch_dim(self, tensor, out_dim: int = 3):
        """(b, s, n*d) -> (b*n, s, d) (out_dim=3) or (b, n, s, d) (out_dim=4), as diffusers."""
        check_out_dim(out_dim)
        x = self.split_heads(tensor)
        return x.reshape((-1, x.shape[2], x.shape[3])) if out_dim == 3 else x

    def batch_to_head_dim(self, tensor):
        """(b*n, s, d) -> (b, s, n*d), as diffusers."""
        bn, s, d = tensor.shape
        return self.merge_heads(tensor.reshape((bn // self.heads, self.heads, s, d)))

    # ---- masks ------------------------------------------------------------------------------
    def normalize_mask(self, attention_mask, batch_size=None, target_length=None, q_len=None):
        """A module-level mask (see `jax_attn.attention`'s docstring) in `attention_forward`'s
        convention: rank 4, bool keep mask or additive float bias, broadcastable to (b, n, sq, skv)."""
        if attention_mask is None:
            return None
        shape = rank4_mask_shape(attention_mask, self.heads, batch_size, target_length, q_len)
        m = self._asarray(attention_mask).reshape(shape)
        kind = self._dtype_kind(m.dtype)
        if kind in ("bool", "floating"):
            return m
        if kind == "integer":
            return m != 0
        raise TypeError(f"attention_mask must be bool, integer (0/1 keep) or float (additive), "
                        f"got {self._dtype_name(m.dtype)}")

    def _check_kv_lengths(self, kv_lengths, batch_size):
        if kv_lengths is None:
            return None
        if not _is_array(kv_lengths):
            raise TypeError(f"kv_lengths must be an integer array of shape ({batch_size},), "
                            f"got {type(kv_lengths).__name__}")
        if tuple(kv_lengths.shape) != (batch_size,) or self._dtype_kind(kv_lengths.dtype) != "integer":
            raise ValueError(f"kv_lengths must be an integer array of shape ({batch_size},), got "
                             f"{self._dtype_name(kv_lengths.dtype)} {_shape(kv_lengths)}")
        return kv_lengths

    def mask_to_bias(self, attn_mask, kv_lengths=None, kv_len=None):
        """Additive float32 rank-4 bias (-inf = dropped key) from a mask and/or kv_lengths.

        `kv_len` (skv) is needed when only `kv_lengths` is given; None when there is neither.
        """
        bias = None
        if attn_mask is not None:  # a bool mask becomes 0 / -inf, a float one float32
            bias = self._mask_logits(self.ops.zeros((1, 1, 1, 1)), self.normalize_mask(attn_mask))
        if kv_lengths is None:
            return bias
        if bias is None:
            if kv_len is None:
                raise ValueError("mask_to_bias: kv_len is required when only kv_lengths is given")
            bias = self.ops.zeros((1, 1, 1, kv_len))
        return self._drop_padding(bias, kv_lengths)

    def prepare_attention_mask(self, attention_mask, target_length, batch_size, out_dim: int = 3,
                               kv_lengths=None):
        """diffusers' helper: additive float32 mask (b*n, 1|sq, skv) (out_dim=3) or (b, n, 1|sq, skv).

        Accepts any module-level mask form (bool/int keep mask or float bias) and folds
        `kv_lengths` in; None when there is neither.
        """
        check_out_dim(out_dim)
        if attention_mask is None and kv_lengths is None:
            return None
        if attention_mask is None:
            attention_mask = self.ops.zeros((batch_size, 1, 1, target_length))
        m = self.normalize_mask(attention_mask, batch_size, target_length)
        bias = self.mask_to_bias(m, kv_lengths)
        bias = self.ops.broadcast_to(bias, (batch_size, self.heads, bias.shape[2], target_length))
        return bias.reshape((-1, bias.shape[2], target_length)) if out_dim == 3 else bias

    # ---- attention --------------------------------------------------------------------------
    def _logits(self, spec, q, k):
        """scale * q.k in float32 (full-precision matmuls: `ops.einsum` on float32)."""
        ops = self.ops
        return ops.einsum(spec, ops.cast(q, self._float32), ops.cast(k, self._float32)) * self.scale

    def get_attention_scores(self, query, key, attention_mask=None):
        """diffusers' helper: softmax(scale q k^T + mask) over (b*n, sq|1, skv), in query's dtype."""
        s = self._logits("bqd,bkd->bqk", query, key)
        if attention_mask is not None:
            s = s + self.ops.cast(attention_mask, self._float32)
        return self.ops.cast(self.ops.softmax(s, -1), query.dtype)

    def attention_forward(self, q, k, v, attn_mask=None, kv_lengths=None, scale=None,
                          return_lse=False):
        """The framework's `attention_forward` in (b, n, s, d) with this module's scale and backend."""
        return self._route(q, k, v, attn_mask=attn_mask, kv_lengths=kv_lengths,
                           scale=self.scale if scale is None else scale, backend=self.backend,
                           return_lse=return_lse)

    def attention_logits(self, q, k, attn_mask=None, kv_lengths=None, query_index=None):
        """float32 (b, n, nq, skv): scale q.k + bias with masked keys at -inf, chosen queries only."""
        if query_index is not None:
            q = self.ops.take(q, query_index, 2)
        s = self._logits("bnqd,bnkd->bnqk", q, k)
        if attn_mask is not None:
            m = self.normalize_mask(attn_mask)
            if query_index is not None and m.shape[2] != 1:
                m = self.ops.take(m, query_index, 2)
            s = self._mask_logits(s, m)
        return s if kv_lengths is None else self._drop_padding(s, kv_lengths)

    # ---- call -------------------------------------------------------------------------------
    def _run(self, hidden_states, encoder_hidden_states, attention_mask, kv_lengths, kwargs):
        """A call, checked, through the processor: `(b, sq, query_dim)` -> `(b, sq, out_dim)`."""
        b, sq, skv = check_call(self, hidden_states, encoder_hidden_states)
        mask = self.normalize_mask(attention_mask, b, skv, sq)
        kwargs = dict(kwargs)
        if self._check_kv_lengths(kv_lengths, b) is not None:
            kwargs["kv_lengths"] = kv_lengths
        check_processor_kwargs(self.processor, kwargs, self.layer_name)
        return self.processor(self, hidden_states, encoder_hidden_states, mask, **kwargs)


def default_processor(processor):
    """The processor a new layer starts with."""
    return AttnProcessor() if processor is None else processor


# ---- model-level helpers ---------------------------------------------------------------------
def register_finder(module_type, attention_layers):
    """Let processors find a framework's attention layers: `attention_layers(model)` for models
    that are `module_type` trees (other models are left to the other frameworks' finders)."""
    return register_layer_finder(lambda model: attention_layers(model) if isinstance(model, module_type)
                                 else None)


def processor_map(layers: dict) -> dict:
    """`{"<layer path>.processor": processor}` (diffusers' keys) for `{layer path: layer}`."""
    return {_processor_key(p): layer.processor for p, layer in layers.items()}


def set_processors(model, layers: dict, request, attach, package: str) -> None:
    """`set_attn_processor` for the `layers` found in `model`: all or nothing
    (`jax_attn.processors.set_layer_processors`), `attach(layer, processor)` per layer."""
    if not layers:
        raise ValueError(f"model {type(model).__name__} has no {package}.Attention layer")
    set_layer_processors(layers, request, attach)
