"""Every routing decision: which backend serves a call, and which kernel runs inside it.

Backend: argument > `use_backend` > `JAX_ATTN_BACKEND` > automatic. A choice is one name, a
comma-separated preference list (or a list of names), or "auto". Backends declare what they
support (`backends.base.Backend`) and the call states what it needs (`Needs`: forward-mode
autodiff, a differentiable log-sum-exp); a backend serves when it has no reason not to.
Everything here runs at trace time; the compiled program holds only the chosen backend. Under
"auto" the measured fastest backend can differ between calls that are differentiated (training:
forward+backward) and calls that are not (inference: forward); then the call runs the inference
backend, and autodiff, entering through a custom VJP's forward rule, runs the training one's
forward and backward instead.

Kernel: `pallas` runs our Triton-lowered kernels, or on Hopper the Mosaic GPU kernels where they
serve the inputs and were measured faster (`pallas_kernel`, overridden by
`JAX_ATTN_PALLAS_KERNEL`). `explain()` shows both choices and why.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import logging
import os

import jax

from . import autoselect
from .backends import BACKENDS, Backend, Needs
from .backends.base import gpu_compute_capability
from .backends.pallas import interpreting
from .contract import Spec
from .kernels import mosaic_attention

log = logging.getLogger(__name__)

ENV_VAR = "JAX_ATTN_BACKEND"
# Which kernel serves `pallas` on Hopper: "triton", "mosaic" (where the inputs qualify) or "auto"
# (default: Mosaic only in the shape buckets measured faster). Elsewhere always Triton.
ENV_PALLAS_KERNEL = "JAX_ATTN_PALLAS_KERNEL"
_context: contextvars.ContextVar = contextvars.ContextVar("jax_attn_backend", default=None)
_logged: set = set()


class BackendError(ValueError):
    """No backend in the requested choice can serve the inputs; the message lists every reason."""


def parse_choice(choice, source: str = "backend", known=None) -> tuple[str, ...]:
    """Normalize a choice to a tuple of names, ("auto",) for automatic. Unknown names raise.

    `known`: the backend registry names are checked against (default: jax_attn's; torch_ref
    passes its own)."""
    registry = BACKENDS if known is None else known
    if isinstance(choice, str):
        names = tuple(x.strip() for x in choice.split(",") if x.strip())
    elif isinstance(choice, (list, tuple)):
        names = tuple(x.strip() if isinstance(x, str) else x for x in choice)
        if not all(isinstance(x, str) for x in names):
            raise TypeError(f"{source} must be a backend name, a comma-separated list or 'auto', or a "
                            f"list of names (strings), got {choice!r}")
    else:
        raise TypeError(f"{source} must be a backend name, a comma-separated list or 'auto', "
                        f"got {type(choice).__name__}")
    if not names:
        raise ValueError(f"{source} names no backend; known: {', '.join(registry)} or 'auto'")
    unknown = [x for x in names if x != "auto" and x not in registry]
    if unknown:
        raise ValueError(f"{source}: unknown backend {', '.join(map(repr, unknown))}; "
                         f"known: {', '.join(registry)} or 'auto'")
    if "auto" in names and len(names) > 1:
        raise ValueError(f"{source}: 'auto' cannot be combined with other names, got {choice!r}")
    return names


@contextlib.contextmanager
def use_backend(choice):
    """Route every `attention_forward` traced inside this block (innermost block wins).

    Context-local (`contextvars`), so threads and nested blocks do not leak into each other.
    """
    names = parse_choice(choice, "use_backend")
    token = _context.set(names)
    try:
        yield
    finally:
        _context.reset(token)


def current_choice(backend=None) -> tuple[tuple[str, ...], str]:
    """The choice in force and where it came from."""
    if backend is not None:
        return parse_choice(backend, "backend"), "argument"
    if _context.get() is not None:
        return _context.get(), "use_backend"
    env = os.environ.get(ENV_VAR, "").strip()
    if env:
        return parse_choice(env, ENV_VAR), ENV_VAR
    return ("auto",), "automatic"


@dataclasses.dataclass(frozen=True)
class Decision:
    """The outcome of routing one call: what was chosen, from which source, and why not the rest."""

    backend: str | None
    source: str
    candidates: tuple[str, ...]
    reasons: dict  # name -> list of reasons (empty = could serve)
    forward_only: str | None = None  # auto: the backend when nothing differentiates the call
    kernel: str | None = None  # the kernel `pallas` runs, when pallas is chosen
    kernel_why: str = ""

    def __str__(self):
        lines = [f"chosen: {self.backend or 'none'} (by {self.source}; tried {', '.join(self.candidates)})"]
        if self.forward_only:
            lines[0] += f"; {self.forward_only} when nothing differentiates the call"
        if self.kernel:
            lines.append(f"kernel: pallas runs the {self.kernel} kernel ({self.kernel_why}); "
                         f"override with {ENV_PALLAS_KERNEL}=triton|mosaic|auto")
        for name, why in self.reasons.items():
            lines.append(f"  {name:8s} " + ("ok" if not why else "; ".join(why)))
        return "\n".join(lines)


def forward_mode(*arrays) -> bool:
    """True when forward-mode autodiff (jax.jvp, jacfwd, hessian) is tracing any of `arrays`.

    Read from the trace stack at trace time: a JVP trace anywhere above the arrays' own trace.
    Reverse mode (grad, vjp) linearizes instead and is not reported. Under `jax.jvp(jax.jit(f))`
    the JVP is applied to the compiled function later and cannot be seen here; JAX then raises
    its own error for the custom VJP (the README says so).
    """
    for x in arrays:
        trace = getattr(x, "_trace", None)
        while trace is not None:
            if type(trace).__name__ == "JVPTrace":
                return True
            trace = getattr(trace, "parent_trace", None)
    return False


def pallas_kernel(spec: Spec) -> tuple[str, str]:
    """`("mosaic" | "triton", why)`: the kernel the `pallas` backend runs for `spec`."""
    mode = os.environ.get(ENV_PALLAS_KERNEL, "auto").strip().lower() or "auto"
    if mode not in ("auto", "triton", "mosaic"):
        raise ValueError(f"{ENV_PALLAS_KERNEL} must be triton, mosaic or auto, got {mode!r}")
    if mode == "triton":
        return "triton", f"{ENV_PALLAS_KERNEL}=triton"
    if interpreting():
        return "triton", "interpret mode"
    cc = gpu_compute_capability()
    why = mosaic_attention.unsupported(
        dtype=spec.dtype, d=spec.head_dim, dv=spec.value_dim, is_causal=spec.is_causal,
        has_full_bias=(spec.mask_kind == "bias"
                       or (spec.mask_kind == "bool" and not spec.per_key_mask)))
    if cc is None or cc[0] != 9:
        why.append("not a Hopper (sm90) GPU")
    if spec.window is not None:
        why.append("local_window_size is served by the Triton kernels")
    bucket = mosaic_attention.shape_bucket(spec.head_dim, spec.q_len, spec.kv_len)
    if not why and mode == "auto" and not mosaic_attention.FASTER_THAN_TRITON_SM90.get(bucket):
        why.append(f"bucket {bucket} not measured faster than Triton")
    if not why:
        return "mosaic", (f"{ENV_PALLAS_KERNEL}=mosaic" if mode == "mosaic"
                          else f"Hopper, bucket {bucket} measured faster than Triton")
    if mode == "mosaic":
        log.warning("%s=mosaic, but the Mosaic kernel cannot serve these inputs (%s): using Triton",
                    ENV_PALLAS_KERNEL, "; ".join(why))
    return "triton", "; ".join(why)


def decide(spec: Spec, backend=None, needs: Needs | None = None) -> Decision:
    needs = needs or Needs()
    names, source = current_choice(backend)
    reasons = {name: b.reasons(spec, needs) for name, b in BACKENDS.items()}

    def first(candidates):
        return next((n for n in candidates if not reasons[n] and BACKENDS[n].automatic), None)

    forward_only = None
    if names != ("auto",):
        candidates = names
        chosen = next((n for n in names if not reasons[n]), None)
    else:
        candidates = tuple(autoselect.preference(spec, "train"))
        chosen = first(candidates)
        inference = first(autoselect.preference(spec, "forward"))
        forward_only = inference if chosen and inference != chosen else None
    kernel = kernel_why = None
    if "pallas" in (chosen, forward_only):
        kernel, kernel_why = pallas_kernel(spec)
    return Decision(chosen, source, candidates, reasons, forward_only, kernel, kernel_why or "")


def _by_mode(inference: Backend, training: Backend):
    """`inference` for calls that nothing differentiates; under autodiff, `training`'s forward and
    backward (the custom VJP's forward rule is what autodiff runs, never the primal)."""
    def run(inputs, return_lse=False):
        def call(backend, arrays):
            return backend(dataclasses.replace(inputs, **arrays), return_lse)

        @jax.custom_vjp
        def attention(arrays):
            return call(inference, arrays)

        def attention_fwd(arrays):
            return jax.vjp(functools.partial(call, training), arrays)  # (out, its VJP as residual)

        attention.defvjp(attention_fwd, lambda vjp, g: vjp(g))
        return attention({"q": inputs.q, "k": inputs.k, "v": inputs.v, "mask": inputs.mask,
                          "kv_lengths": inputs.kv_lengths})
    return run


def choose(spec: Spec, backend=None, needs: Needs | None = None):
    """A callable `(inputs, return_lse)` running the backend for `spec` (under "auto", the pair of
    `_by_mode` where inference and training choose differently); raises `BackendError` with every
    reason when none can serve."""
    needs = needs or Needs()
    d = decide(spec, backend, needs)
    if d.backend is None:
        detail = "\n".join(f"  {n}: {'; '.join(d.reasons[n]) or 'not chosen automatically'}"
                           for n in d.candidates)
        raise BackendError(f"no backend can serve this call (choice {','.join(d.candidates)!r} "
                           f"from {d.source}):\n{detail}")
    skipped = d.candidates[: d.candidates.index(d.backend)]
    if skipped and d.source == "automatic":
        log.debug("attention: auto chose %r over %s", d.backend, ", ".join(skipped))
    elif skipped:
        key = (d.candidates, d.backend, tuple(tuple(d.reasons[n]) for n in skipped))
        if key not in _logged:
            _logged.add(key)
            log.warning("attention: using %r from %s; skipped %s", d.backend, d.source,
                        "; ".join(f"{n} ({', '.join(d.reasons[n])})" for n in skipped))
    if d.forward_only and not needs.forward_ad:  # the pair's custom VJP has no forward mode
        return _by_mode(BACKENDS[d.forward_only], BACKENDS[d.backend])
    return BACKENDS[d.backend]
