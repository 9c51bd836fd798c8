"""`Attention`: the torch twin of `jax_attn.Attention`, driven by the same processor classes.

Built like diffusers' `Attention` (parameters `to_q`, `to_k`, `to_v`, `to_out.0`, `norm_q`,
`norm_k`, in torch's `(out, in)` layout) and implementing the protocol documented at the top of
`jax_attn.processors`, so `AttnProcessor`, `LoRAAttnProcessor`, ... run here unchanged.
Processor parameters and state live in the `processor_state` sub-module: the state-dict names
(`processor_state.<name>`) are the Flax module's, so weight conversion carries LoRA weights too.
Masks follow `jax_attn.Attention`'s module-level rules (see its docstring), with the same errors.
"""
from __future__ import annotations

import logging
import zlib

import torch
from torch import nn

from jax_attn import processors as _processors
from jax_attn.attention import QK_NORMS
from jax_attn.processors import AttnProcessor

from .api import attention_forward as _attention_forward

log = logging.getLogger(__name__)


def _softmax(x, axis=-1):
    """Softmax whose all -inf rows give zeros (not NaN)."""
    m = x.amax(axis, keepdim=True).detach()
    m = torch.where(torch.isneginf(m), torch.zeros((), dtype=m.dtype, device=m.device), m)
    e = torch.exp(x - m)
    s = e.sum(axis, keepdim=True)
    return e / torch.where(s > 0, s, torch.ones((), dtype=s.dtype, device=s.device))


class TorchOps:
    """The array operations processors may use (`attn.ops`), in torch."""

    einsum = staticmethod(torch.einsum)
    matmul = staticmethod(torch.matmul)
    exp = staticmethod(torch.exp)
    log = staticmethod(torch.log)
    isfinite = staticmethod(torch.isfinite)
    swapaxes = staticmethod(torch.swapaxes)
    softmax = staticmethod(_softmax)

    def __init__(self, module: nn.Module):
        self._module = module

    @property
    def _device(self):
        return next(self._module.parameters()).device

    @staticmethod
    def where(cond, a, b):
        like = a if isinstance(a, torch.Tensor) else b
        if not isinstance(a, torch.Tensor):
            a = torch.tensor(a, dtype=like.dtype, device=like.device)
        if not isinstance(b, torch.Tensor):
            b = torch.tensor(b, dtype=like.dtype, device=like.device)
        return torch.where(cond, a, b)

    @staticmethod
    def sum(x, axis=None, keepdims=False):
        return x.sum() if axis is None else x.sum(axis, keepdim=keepdims)

    @staticmethod
    def mean(x, axis=None, keepdims=False):
        return x.mean() if axis is None else x.mean(axis, keepdim=keepdims)

    @staticmethod
    def concatenate(xs, axis=0):
        return torch.cat(list(xs), dim=axis)

    @staticmethod
    def take(x, index, axis):
        return x.index_select(axis, torch.tensor(index, dtype=torch.long, device=x.device))

    @staticmethod
    def cast(x, dtype):
        return x.to(dtype)

    @staticmethod
    def asarray(data, like):
        return torch.tensor(data, dtype=torch.float64).to(device=like.device, dtype=like.dtype)

    def zeros(self, shape):
        return torch.zeros(shape, dtype=torch.float32, device=self._device)


def _shape(x):
    return "(" + ", ".join(map(str, x.shape)) + ")"


def _integer(dtype) -> bool:
    return not dtype.is_floating_point and not dtype.is_complex and dtype != torch.bool


class ProcessorState(nn.Module):
    """Holds the current processor's parameters (trainable) and buffers (not in the state dict)."""


class Attention(nn.Module):
    """Multi-head self- or cross-attention with diffusers' names and `jax_attn.Attention`'s behavior.

    Args as `jax_attn.Attention` (query_dim, cross_attention_dim, heads, dim_head, bias, out_bias,
    qk_norm, eps, out_dim, dropout, backend, processor), with torch's `dtype` and `device` for the
    parameters instead of `dtype`/`param_dtype`/`rngs`. `backend` routes `torch_ref.attention_forward`.
    """

    def __init__(self, query_dim: int, cross_attention_dim: int | None = None, heads: int = 8,
                 dim_head: int = 64, bias: bool = False, out_bias: bool = True, qk_norm=None, *,
                 eps: float = 1e-5, out_dim: int | None = None, dropout: float = 0.0, backend=None,
                 processor=None, dtype=None, device=None):
        super().__init__()
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
        self.ops = TorchOps(self)
        kw = dict(dtype=dtype, device=device)
        self.to_q = nn.Linear(query_dim, self.inner_dim, bias=bias, **kw)
        self.to_k = nn.Linear(self.cross_attention_dim, self.inner_dim, bias=bias, **kw)
        self.to_v = nn.Linear(self.cross_attention_dim, self.inner_dim, bias=bias, **kw)
        self.to_out = nn.ModuleList([nn.Linear(self.inner_dim, self.out_dim, bias=out_bias, **kw),
                                     nn.Dropout(dropout)])
        if qk_norm == "layer_norm":
            self.norm_q = nn.LayerNorm(dim_head, eps=eps, **kw)
            self.norm_k = nn.LayerNorm(dim_head, eps=eps, **kw)
        elif qk_norm == "rms_norm":
            self.norm_q = nn.RMSNorm(dim_head, eps=eps, **kw)
            self.norm_k = nn.RMSNorm(dim_head, eps=eps, **kw)
        else:
            self.norm_q = self.norm_k = None
        self.processor_state = ProcessorState()
        self.set_processor(AttnProcessor() if processor is None else processor)

    # ---- processors -------------------------------------------------------------------------
    def set_processor(self, processor, *, generator: torch.Generator | None = None) -> None:
        """Attach `processor` (drops the previous one's state), run its `setup`, freeze it.

        `generator` seeds processor parameters; without it each is seeded from layer path and name.
        When `setup` raises, the layer keeps its previous processor and state.
        """
        _processors.check_processor(processor, self.layer_name or None)
        saved = self._save_processor()
        self.processor_state = ProcessorState()
        # Not a sub-module attribute: processors are configuration, shared between layers.
        self.__dict__["processor"] = processor
        self._generator = generator
        try:
            setup = getattr(processor, "setup", None)
            if setup is not None:
                setup(self)
        except BaseException:
            self._restore_processor(saved)
            raise
        finally:
            self._generator = None
        if isinstance(processor, _processors.AttnProcessorBase):
            processor.freeze()

    def _save_processor(self):
        """The processor and the module holding its state (kept: `set_processor` replaces it)."""
        return self.__dict__.get("processor"), self.processor_state

    def _restore_processor(self, saved) -> None:
        self.__dict__["processor"], self.processor_state = saved

    def get_processor(self):
        return self.processor

    def _check_new(self, name):
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"processor state name must be an identifier, got {name!r}")
        if self.has_state(name):
            raise ValueError(f"processor state {name!r} already exists in layer {self.layer_name!r}")

    def new_param(self, name: str, shape, init: str = "zeros", std: float = 1.0):
        """Create a trainable float32 `nn.Parameter` owned by the current processor."""
        self._check_new(name)
        shape = tuple(int(s) for s in shape)
        device = self.to_q.weight.device
        if init == "zeros":
            value = torch.zeros(shape, dtype=torch.float32, device=device)
        elif init == "normal":
            gen = self._generator
            if gen is None:  # deterministic per layer and name when no generator was given
                gen = torch.Generator().manual_seed(zlib.crc32(f"{self.layer_name}/{name}".encode()))
            value = (std * torch.randn(shape, generator=gen, dtype=torch.float32)).to(device)
        else:
            raise ValueError(f"init must be 'zeros' or 'normal', got {init!r}")
        self.processor_state.register_parameter(name, nn.Parameter(value))

    def new_state(self, name: str, value) -> None:
        """Create a non-trainable buffer owned by the current processor (not in the state dict)."""
        self._check_new(name)
        self.processor_state.register_buffer(name, torch.as_tensor(value), persistent=False)

    def has_state(self, name: str) -> bool:
        ps = self.processor_state
        return name in ps._parameters or name in ps._buffers

    def _var(self, name):
        if not self.has_state(name):
            known = sorted([*self.processor_state._parameters, *self.processor_state._buffers])
            raise KeyError(f"layer {self.layer_name!r} has no processor state {name!r} (has: {known})")
        return getattr(self.processor_state, name)

    def get_param(self, name: str):
        return self._var(name)

    get_state = get_param

    def set_state(self, name: str, value) -> None:
        self._var(name)
        if name in self.processor_state._parameters:
            with torch.no_grad():
                self.processor_state._parameters[name].copy_(value)
        else:
            self.processor_state._buffers[name] = value

    # ---- head layout (diffusers helpers) ----------------------------------------------------
    def split_heads(self, x):
        """(b, s, n*d) -> (b, n, s, d)."""
        b, s, _ = x.shape
        return x.reshape(b, s, self.heads, -1).transpose(1, 2)

    def merge_heads(self, x):
        """(b, n, s, d) -> (b, s, n*d)."""
        b, n, s, d = x.shape
        return x.transpose(1, 2).reshape(b, s, n * d)

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
        """A module-level mask in `attention_forward`'s convention (rank 4, bool keep or float bias)."""
        if attention_mask is None:
            return None
        if not hasattr(attention_mask, "shape") or not hasattr(attention_mask, "dtype"):
            raise TypeError(f"attention_mask must be an array, got {type(attention_mask).__name__}")
        m = torch.as_tensor(attention_mask)
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
        if m.dtype == torch.bool or m.dtype.is_floating_point:
            return m
        if _integer(m.dtype):
            return m != 0
        raise TypeError(f"attention_mask must be bool, integer (0/1 keep) or float (additive), "
                        f"got {str(m.dtype).replace('torch.', '')}")

    def _check_kv_lengths(self, kv_lengths, batch_size):
        if kv_lengths is None:
            return None
        if not hasattr(kv_lengths, "shape") or not hasattr(kv_lengths, "dtype"):
            raise TypeError(f"kv_lengths must be an integer array of shape ({batch_size},), "
                            f"got {type(kv_lengths).__name__}")
        if tuple(kv_lengths.shape) != (batch_size,) or not _integer(kv_lengths.dtype):
            raise ValueError(f"kv_lengths must be an integer array of shape ({batch_size},), got "
                             f"{str(kv_lengths.dtype).replace('torch.', '')} {_shape(kv_lengths)}")
        return kv_lengths

    def mask_to_bias(self, attn_mask, kv_lengths=None, kv_len=None):
        """Additive float32 rank-4 bias (-inf = dropped key) from a mask and/or kv_lengths.

        `kv_len` (skv) is needed when only `kv_lengths` is given; None when there is neither.
        """
        bias = None
        if attn_mask is not None:
            m = self.normalize_mask(attn_mask)
            bias = (torch.zeros((), device=m.device).masked_fill(~m, float("-inf"))
                    if m.dtype == torch.bool else m).to(torch.float32)
        if kv_lengths is not None:
            if bias is None:
                if kv_len is None:
                    raise ValueError("mask_to_bias: kv_len is required when only kv_lengths is given")
                bias = torch.zeros((1, 1, 1, kv_len), dtype=torch.float32, device=kv_lengths.device)
            keep = (torch.arange(bias.shape[3], device=bias.device)[None, None, None, :]
                    < kv_lengths.to(bias.device)[:, None, None, None])
            bias = bias.masked_fill(~keep, float("-inf"))
        return bias

    def prepare_attention_mask(self, attention_mask, target_length, batch_size, out_dim: int = 3,
                               kv_lengths=None):
        """diffusers' helper: additive float32 mask (b*n, 1|sq, skv) (out_dim=3) or (b, n, 1|sq, skv)."""
        if out_dim not in (3, 4):
            raise ValueError(f"out_dim must be 3 or 4, got {out_dim!r}")
        if attention_mask is None and kv_lengths is None:
            return None
        if attention_mask is None:
            attention_mask = torch.zeros((batch_size, 1, 1, target_length), dtype=torch.float32,
                                         device=kv_lengths.device)
        m = self.normalize_mask(attention_mask, batch_size, target_length)
        bias = self.mask_to_bias(m, kv_lengths)
        bias = bias.expand(batch_size, self.heads, bias.shape[2], target_length)
        return bias.reshape(-1, bias.shape[2], target_length) if out_dim == 3 else bias

    # ---- attention --------------------------------------------------------------------------
    def get_attention_scores(self, query, key, attention_mask=None):
        """diffusers' helper: softmax(scale q k^T + mask) over (b*n, sq|1, skv), in query's dtype."""
        s = torch.einsum("bqd,bkd->bqk", query.float(), key.float()) * self.scale
        if attention_mask is not None:
            s = s + attention_mask.float()
        return _softmax(s, -1).to(query.dtype)

    def attention_forward(self, q, k, v, attn_mask=None, kv_lengths=None, scale=None,
                          return_lse=False):
        """`torch_ref.attention_forward` in (b, n, s, d) with this module's scale and backend."""
        return _attention_forward(q, k, v, attn_mask=attn_mask, kv_lengths=kv_lengths,
                                  scale=self.scale if scale is None else scale, backend=self.backend,
                                  return_lse=return_lse)

    def attention_logits(self, q, k, attn_mask=None, kv_lengths=None, query_index=None):
        """float32 (b, n, nq, skv): scale q.k + bias with masked keys at -inf, chosen queries only."""
        if query_index is not None:
            q = TorchOps.take(q, query_index, 2)
        s = torch.einsum("bnqd,bnkd->bnqk", q.float(), k.float()) * self.scale
        if attn_mask is not None:
            m = self.normalize_mask(attn_mask)
            if query_index is not None and m.shape[2] != 1:
                m = TorchOps.take(m, query_index, 2)
            s = s.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else s + m.float()
        if kv_lengths is not None:
            keep = (torch.arange(k.shape[2], device=k.device)[None, None, None, :]
                    < kv_lengths.to(k.device)[:, None, None, None])
            s = s.masked_fill(~keep, float("-inf"))
        return s

    # ---- call -------------------------------------------------------------------------------
    def forward(self, hidden_states, encoder_hidden_states=None, attention_mask=None, *,
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
def attention_layers(model) -> dict:
    """`{layer path: Attention}` for every `torch_ref.Attention` in a module tree (each once)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return {path: m for path, m in model.named_modules() if isinstance(m, Attention)}


@_processors.register_layer_finder
def _find_layers(model):
    return attention_layers(model) if isinstance(model, nn.Module) else None


_processor_key = _processors._processor_key


def attn_processors(model) -> dict:
    """`{"<layer path>.processor": processor}` (diffusers' keys) for every attention layer."""
    return {_processor_key(p): layer.processor for p, layer in attention_layers(model).items()}


def set_attn_processor(model, processor, *, generator: torch.Generator | None = None) -> None:
    """Set one processor on every attention layer, or a dict `{layer key: processor}` naming each.

    Same keys, errors and all-or-nothing behavior as `jax_attn.attention.set_attn_processor`
    (both run `jax_attn.processors.set_layer_processors`); `generator` seeds processor parameters
    (LoRA), which are otherwise seeded from the layer path.
    """
    layers = attention_layers(model)
    if not layers:
        raise ValueError(f"model {type(model).__name__} has no torch_ref.Attention layer")
    _processors.set_layer_processors(layers, processor,
                                     lambda layer, p: layer.set_processor(p, generator=generator))


__all__ = ["Attention", "TorchOps", "attention_layers", "attn_processors", "set_attn_processor"]
