"""`Attention`: the torch twin of `jax_attn.Attention`, driven by the same processor classes.

Built like diffusers' `Attention` (parameters `to_q`, `to_k`, `to_v`, `to_out.0`, `norm_q`,
`norm_k`, in torch's `(out, in)` layout) and implementing the protocol documented at the top of
`jax_attn.processors`, so `AttnProcessor`, `LoRAAttnProcessor`, ... run here unchanged.
Processor parameters and state live in the `processor_state` sub-module: the state-dict names
(`processor_state.<name>`) are the Flax module's, so weight conversion carries LoRA weights too.
Masks follow `jax_attn.Attention`'s module-level rules (see its docstring), with the same errors:
both modules inherit those rules, and everything else they decide alike, from
`jax_attn.module_rules.AttentionRules`; this file holds the torch half (layers, parameters and
buffers, the torch ops, the mask math on tensors).
"""
from __future__ import annotations

import contextlib
import logging

import torch
from torch import nn

from jax_attn import module_rules as _rules

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
    broadcast_to = staticmethod(torch.broadcast_to)
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


def _dtype_kind(dtype) -> str:
    if dtype == torch.bool:
        return "bool"
    if dtype.is_floating_point:
        return "floating"
    return "other" if dtype.is_complex else "integer"


def _minus_inf(x):
    return torch.full((), float("-inf"), dtype=x.dtype, device=x.device)


class ProcessorState(nn.Module):
    """Holds the current processor's parameters (trainable) and buffers (not in the state dict)."""


class Attention(nn.Module, _rules.AttentionRules):
    """Multi-head self- or cross-attention with diffusers' names and `jax_attn.Attention`'s behavior.

    Args as `jax_attn.Attention` (query_dim, cross_attention_dim, heads, dim_head, bias, out_bias,
    qk_norm, eps, out_dim, dropout, backend, processor), with torch's `dtype` and `device` for the
    parameters instead of `dtype`/`param_dtype`/`rngs`. `backend` routes `torch_ref.attention_forward`.
    """

    _route = staticmethod(_attention_forward)
    _float32 = torch.float32
    _asarray = staticmethod(torch.as_tensor)
    _dtype_kind = staticmethod(_dtype_kind)

    def __init__(self, query_dim: int, cross_attention_dim: int | None = None, heads: int = 8,
                 dim_head: int = 64, bias: bool = False, out_bias: bool = True, qk_norm=None, *,
                 eps: float = 1e-5, out_dim: int | None = None, dropout: float = 0.0, backend=None,
                 processor=None, dtype=None, device=None):
        super().__init__()
        from .routing import parse_choice
        self._configure(query_dim, cross_attention_dim, heads, dim_head, qk_norm, out_dim, backend,
                        parse_choice)
        self.ops = TorchOps(self)
        kw = dict(dtype=dtype, device=device)
        norms = {"layer_norm": nn.LayerNorm, "rms_norm": nn.RMSNorm}
        self._build_layers(lambda d_in, d_out, b: nn.Linear(d_in, d_out, bias=b, **kw),
                           lambda kind: norms[kind](dim_head, eps=eps, **kw),
                           lambda proj: nn.ModuleList([proj, nn.Dropout(dropout)]),
                           bias, out_bias, qk_norm)
        self.processor_state = ProcessorState()
        self._generator = None
        self.set_processor(_rules.default_processor(processor))

    @staticmethod
    def _dtype_name(dtype) -> str:
        return str(dtype).replace("torch.", "")

    # ---- processors: the torch side of `AttentionRules._attach` ------------------------------
    def set_processor(self, processor, *, generator: torch.Generator | None = None) -> None:
        """Attach `processor` (drops the previous one's state), run its `setup`, freeze it.

        `generator` seeds processor parameters; without it each is seeded from layer path and name.
        When `setup` raises, the layer keeps its previous processor and state.
        """
        self._attach(processor, generator)

    @contextlib.contextmanager
    def _seeded(self, generator):
        self._generator = generator
        try:
            yield
        finally:
            self._generator = None

    def _reset_processor(self, processor) -> None:
        self.processor_state = ProcessorState()
        # Not a sub-module attribute: processors are configuration, shared between layers.
        self.__dict__["processor"] = processor

    def _save_processor(self):
        """The processor and the module holding its state (kept: `set_processor` replaces it)."""
        return self.__dict__.get("processor"), self.processor_state

    def _restore_processor(self, saved) -> None:
        self.__dict__["processor"], self.processor_state = saved

    def new_param(self, name: str, shape, init: str = "zeros", std: float = 1.0):
        """Create a trainable float32 `nn.Parameter` owned by the current processor."""
        self._check_new(name, init)
        shape = tuple(int(s) for s in shape)
        device = self.to_q.weight.device
        if init == "zeros":
            value = torch.zeros(shape, dtype=torch.float32, device=device)
        else:
            gen = self._generator
            if gen is None:  # deterministic per layer and name when no generator was given
                gen = torch.Generator().manual_seed(_rules.param_seed(self.layer_name, name))
            value = (std * torch.randn(shape, generator=gen, dtype=torch.float32)).to(device)
        self.processor_state.register_parameter(name, nn.Parameter(value))

    def new_state(self, name: str, value) -> None:
        """Create a non-trainable buffer owned by the current processor (not in the state dict)."""
        self._check_new(name)
        self.processor_state.register_buffer(name, torch.as_tensor(value), persistent=False)

    def _state_names(self):
        return [*self.processor_state._parameters, *self.processor_state._buffers]

    def has_state(self, name: str) -> bool:
        ps = self.processor_state
        return name in ps._parameters or name in ps._buffers

    def get_param(self, name: str):
        self._check_known(name)
        return getattr(self.processor_state, name)

    get_state = get_param

    def set_state(self, name: str, value) -> None:
        self._check_known(name)
        if name in self.processor_state._parameters:
            with torch.no_grad():
                self.processor_state._parameters[name].copy_(value)
        else:
            self.processor_state._buffers[name] = value

    # ---- mask math on tensors (the rules are `AttentionRules`') ------------------------------
    @staticmethod
    def _mask_logits(s, m):
        return torch.where(m, s, _minus_inf(s)) if m.dtype == torch.bool else s + m.float()

    @staticmethod
    def _drop_padding(s, kv_lengths):
        keep = (torch.arange(s.shape[3], device=s.device)[None, None, None, :]
                < kv_lengths.to(s.device)[:, None, None, None])
        return torch.where(keep, s, _minus_inf(s))

    # ---- call -------------------------------------------------------------------------------
    def forward(self, hidden_states, encoder_hidden_states=None, attention_mask=None, *,
                kv_lengths=None, **cross_attention_kwargs):
        """Run the processor: `(b, sq, query_dim)` -> `(b, sq, out_dim)`."""
        return self._run(hidden_states, encoder_hidden_states, attention_mask, kv_lengths,
                         cross_attention_kwargs)


# ---- model-level helpers ---------------------------------------------------------------------
def attention_layers(model) -> dict:
    """`{layer path: Attention}` for every `torch_ref.Attention` in a module tree (each once)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return {path: m for path, m in model.named_modules() if isinstance(m, Attention)}


_rules.register_finder(nn.Module, attention_layers)


def attn_processors(model) -> dict:
    """`{"<layer path>.processor": processor}` (diffusers' keys) for every attention layer."""
    return _rules.processor_map(attention_layers(model))


def set_attn_processor(model, processor, *, generator: torch.Generator | None = None) -> None:
    """Set one processor on every attention layer, or a dict `{layer key: processor}` naming each.

    Same keys, errors and all-or-nothing behavior as `jax_attn.attention.set_attn_processor`
    (both run `jax_attn.module_rules.set_processors`); `generator` seeds processor parameters
    (LoRA), which are otherwise seeded from the layer path.
    """
    _rules.set_processors(model, attention_layers(model), processor,
                          lambda layer, p: layer.set_processor(p, generator=generator), "torch_ref")


__all__ = ["Attention", "TorchOps", "attention_layers", "attn_processors", "set_attn_processor"]
