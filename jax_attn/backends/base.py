"""A backend is a declaration of what it supports plus the reasons it cannot serve given inputs."""
from __future__ import annotations

import dataclasses
import functools
import warnings

import jax
from jax.custom_derivatives import SymbolicZero

from ..contract import Spec
from ..inputs import AttentionInputs


@functools.lru_cache(maxsize=None)
def platform() -> str:
    """The default JAX platform: "cpu", "gpu" or "tpu"."""
    return jax.default_backend()


@functools.lru_cache(maxsize=None)
def gpu_compute_capability() -> tuple[int, int] | None:
    """(major, minor) of the first NVIDIA GPU, or None."""
    if platform() != "gpu":
        return None
    cc = getattr(jax.devices()[0], "compute_capability", None)
    if not cc:
        return None
    major, minor = str(cc).split(".")[:2]
    return int(major), int(minor)


@dataclasses.dataclass(frozen=True)
class Needs:
    """What a call asks of a backend beyond its inputs, known at trace time (as xformers passes
    whether a gradient is needed)."""

    forward_ad: bool = False  # traced by jax.jvp / jacfwd / hessian
    lse_grad: bool = False  # its log-sum-exp will be differentiated (ring attention's backward)


class Backend:
    """Capabilities as data; `reasons` lists, in plain sentences, why it cannot serve a call.

    Subclasses set the class attributes and implement `_forward`; they extend `reasons` by
    calling `super().reasons(spec)` first. Capability flags are named `supports_*` so they do not
    read like values; the names before 0.2 (`bias`, `causal`, ...) still work, with a warning.
    """

    name: str = ""
    description: str = ""
    platforms: tuple[str, ...] = ("cpu", "gpu", "tpu")
    dtypes: tuple[str, ...] = ("float16", "bfloat16", "float32", "float64")
    head_dims: tuple[int, int] = (1, 1 << 30)  # inclusive range
    head_dim_multiple: int = 1
    value_dim_differs: bool = True  # dv != d
    supports_bool_mask: bool = True
    supports_bias: bool = True
    supports_bias_grad: bool = True  # gradient w.r.t. a float attn_mask
    supports_causal: bool = True
    supports_kv_lengths: bool = True
    supports_lse_grad: bool = True  # the log-sum-exp output is differentiable
    supports_window: bool = False  # local_window_size (sliding-window attention)
    supports_forward_ad: bool = False  # jax.jvp / jacfwd (a custom VJP rules it out)
    supports_segment_ids: bool = False  # q_segment_ids/kv_segment_ids (packed sequences)
    # Skips the tiles where no query and key share a segment (a packed batch costs about the sum
    # of its prompts); automatic selection puts such backends first for calls with segment ids.
    skips_segment_tiles: bool = False
    quadratic_memory: bool = False  # holds the (b, n, sq, skv) scores
    automatic: bool = True  # may be picked by automatic selection
    lossy: bool = False  # trades accuracy for speed (8-bit): automatic selection and tune never take it

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        for old in RENAMED_CAPABILITIES:
            if old in cls.__dict__ and not isinstance(cls.__dict__[old], property):
                warnings.warn(f"{cls.__name__}.{old} is deprecated: set supports_{old}", DeprecationWarning,
                              stacklevel=2)
                setattr(cls, f"supports_{old}", cls.__dict__[old])
                delattr(cls, old)

    def unavailable(self) -> list[str]:
        """Reasons this machine cannot run the backend at all (no GPU, package missing)."""
        if platform() not in self.platforms:
            return [f"needs a {' or '.join(p.upper() for p in self.platforms)} device; "
                    f"the default JAX platform is {platform()}"]
        return []

    def reasons(self, spec: Spec, needs: Needs | None = None) -> list[str]:
        """Why this backend cannot serve `spec` with `needs`; empty when it can."""
        needs = needs or Needs()
        why = self.unavailable()
        if spec.dtype not in self.dtypes:
            why.append(f"dtype {spec.dtype} is not supported (supports {', '.join(self.dtypes)})")
        lo, hi = self.head_dims
        if not lo <= spec.head_dim <= hi or spec.head_dim % self.head_dim_multiple:
            rule = f"in [{lo}, {hi}]" + (f" and a multiple of {self.head_dim_multiple}"
                                         if self.head_dim_multiple > 1 else "")
            why.append(f"head dim {spec.head_dim} is not supported (must be {rule})")
        if spec.value_dim != spec.head_dim and not self.value_dim_differs:
            why.append(f"value head dim {spec.value_dim} differs from q/k head dim {spec.head_dim}")
        if spec.mask_kind == "bool" and not self.supports_bool_mask:
            why.append("a bool attn_mask is not supported")
        if spec.mask_kind == "bias" and not self.supports_bias:
            why.append("an additive float attn_mask is not supported")
        if spec.is_causal and not self.supports_causal:
            why.append("is_causal=True is not supported")
        if spec.has_kv_lengths and not self.supports_kv_lengths:
            why.append("kv_lengths is not supported")
        if spec.window is not None and not self.supports_window:
            why.append("local_window_size is not supported")
        if spec.has_segment_ids and not self.supports_segment_ids:
            why.append("q_segment_ids/kv_segment_ids are not supported")
        if needs.forward_ad and not self.supports_forward_ad:
            why.append("forward-mode autodiff (jax.jvp, jacfwd, hessian) is not supported: its gradient is "
                       "a custom VJP; backend='xla' or 'naive' can be differentiated in forward mode")
        if needs.lse_grad and not self.supports_lse_grad:
            why.append("its log-sum-exp has no gradient (supports_lse_grad=False)")
        return why

    def __call__(self, inputs: AttentionInputs, return_lse: bool = False):
        """Attention in the caller's layout; with `return_lse`, also the `(b, n, sq)` float32 lse."""
        return self._forward(inputs, return_lse)

    def _forward(self, inputs: AttentionInputs, return_lse: bool):
        raise NotImplementedError

    def backward_reasons(self, spec: Spec) -> list[str]:
        """Why a reverse-mode gradient through this backend cannot be served for `spec` although
        its forward can (forward-only kernels); empty when it can. Routing then differentiates
        through a later backend of the choice (`choice.Router.decide`)."""
        return []

    def capabilities(self) -> dict:
        """The declared capabilities, for tables and docs."""
        return {
            "platforms": self.platforms, "dtypes": self.dtypes, "head_dims": self.head_dims,
            "head_dim_multiple": self.head_dim_multiple, "dv != d": self.value_dim_differs,
            "bool mask": self.supports_bool_mask, "bias": self.supports_bias, "bias grad": self.supports_bias_grad,
            "causal": self.supports_causal, "kv_lengths": self.supports_kv_lengths, "lse grad": self.supports_lse_grad,
            "window": self.supports_window, "segment ids": self.supports_segment_ids,
            "skips segment tiles": self.skips_segment_tiles,
            "forward AD": self.supports_forward_ad, "quadratic memory": self.quadratic_memory,
        }


RENAMED_CAPABILITIES = ("bool_mask", "bias", "bias_grad", "causal", "kv_lengths", "lse_grad", "window",
                        "forward_ad")


def _deprecated_capability(old: str) -> property:
    def get(self):
        warnings.warn(f"Backend.{old} is deprecated: read supports_{old}", DeprecationWarning, stacklevel=2)
        return getattr(self, f"supports_{old}")
    return property(get, doc=f"Deprecated alias of `supports_{old}`.")


for _old in RENAMED_CAPABILITIES:
    setattr(Backend, _old, _deprecated_capability(_old))


@functools.cache
def lse_without_gradient(name: str):
    """Identity on the lse of a backend whose lse has no gradient (`supports_lse_grad=False`): its backward
    raises unless the lse's cotangent is a symbolic zero (the lse not differentiated), so a
    gradient never silently misses the lse's share. Raised while the gradient is traced."""
    @jax.custom_vjp
    def lse_out(lse):
        return lse

    def bwd(_, cotangent):
        if isinstance(cotangent, SymbolicZero):
            return (cotangent,)
        raise ValueError(f"backend {name!r}: the log-sum-exp it returns has no gradient (its VJP ignores "
                         "the lse cotangent), and this call differentiates it; use another backend "
                         "(pallas, xla, chunked, naive) or jax.lax.stop_gradient(lse)")

    lse_out.defvjp(lambda lse: (lse.value, None), bwd, symbolic_zeros=True)
    return lse_out

