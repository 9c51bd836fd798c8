"""A torch backend: `jax_attn`'s capability declaration plus what torch decides at run time.

Subclassing `jax_attn.backends.base.Backend` keeps the reasons for dtype, head dim, masks,
causality, `kv_lengths` and `local_window_size` word for word the same in both frameworks. Torch
adds the device the tensors live on, whether autograd will differentiate, and whether the
log-sum-exp is wanted. (`query_seq_lengths` and unbatched inputs are applied around every backend.)
"""
from __future__ import annotations

import functools
import importlib.util
import warnings

import torch

from jax_attn.backends.base import Backend as _JaxBackend
from jax_attn.backends.base import _deprecated_capability
from jax_attn.contract import Spec

from ..inputs import AttentionInputs, RunContext


@functools.lru_cache(maxsize=None)
def installed(module: str) -> bool:
    """True when `module` can be imported (checked without importing it)."""
    return importlib.util.find_spec(module) is not None


class Backend(_JaxBackend):
    """Subclasses set the class attributes below (and the inherited ones) and implement `_forward`."""

    devices: tuple[str, ...] = ("cpu", "cuda")
    package: str | None = None  # the optional package it needs, by import name
    supports_grad: bool = True  # differentiable by autograd
    supports_lse: bool = True  # can return the log-sum-exp

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        for old in ("grad", "lse"):  # renamed in 0.2 like the inherited flags
            if old in cls.__dict__ and not isinstance(cls.__dict__[old], property):
                warnings.warn(f"{cls.__name__}.{old} is deprecated: set supports_{old}", DeprecationWarning,
                              stacklevel=2)
                setattr(cls, f"supports_{old}", cls.__dict__[old])
                delattr(cls, old)

    def unavailable(self) -> list[str]:
        why = []
        if self.package and not installed(self.package):
            why.append(f"package {self.package!r} is not installed")
        if self.devices == ("cuda",) and not torch.cuda.is_available():
            why.append("needs a CUDA device; torch.cuda.is_available() is False")
        return why

    def reasons(self, spec: Spec, call: RunContext = RunContext()) -> list[str]:
        why = super().reasons(spec)
        no_cuda = self.devices == ("cuda",) and not torch.cuda.is_available()  # said already
        if call.device not in self.devices and call.device != "meta" and not no_cuda:
            why.append(f"tensors on {call.device} are not supported (needs {' or '.join(self.devices)})")
        if call.grad and not self.supports_grad:
            why.append("it has no backward pass, and q, k or v requires grad")
        if call.bias_grad and not self.supports_bias_grad:
            why.append("the gradient w.r.t. a float attn_mask is not supported")
        if call.return_lse and not self.supports_lse:
            why.append("return_lse=True is not supported")
        return why

    def __call__(self, inputs: AttentionInputs, return_lse: bool = False):
        return self._forward(inputs, return_lse)


for _old in ("grad", "lse"):
    setattr(Backend, _old, _deprecated_capability(_old))
