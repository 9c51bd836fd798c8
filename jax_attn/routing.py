"""Every routing decision: which backend serves a call, and which kernel runs inside it.

Backend: argument > `use_backend` > `JAX_ATTN_BACKEND` > automatic. A choice is one name, a
comma-separated preference list (or a list of names), "auto", or "auto+8bit" (auto that may take
a lossy backend for calls nothing differentiates, where the routing data ranks one first:
`autoselect.preference(spec, "lossy")`); those rules, the `Decision`
record and the fall-through logging are `jax_attn.choice`'s, shared with `torch_ref`. Backends
declare what they support (`backends.base.Backend`) and the call states what it needs (`Needs`:
forward-mode autodiff, a differentiable log-sum-exp); a backend serves when it has no reason not
to. Everything here runs at trace time; the compiled program holds only the chosen backend. Under
"auto" the measured fastest backend can differ between calls that are differentiated (training:
forward+backward) and calls that are not (inference: forward); then the call runs the inference
backend, and autodiff, entering through a custom VJP's forward rule, runs the training one's
forward and backward instead.

Kernel: `pallas` runs our Triton-lowered kernels, or on Hopper the Mosaic GPU kernels where they
serve the inputs and were measured faster (`pallas_kernel`, overridden by
`JAX_ATTN_PALLAS_KERNEL`). `explain()` shows both choices and why.
"""
from __future__ import annotations

import contextvars
import dataclasses
import functools
import logging
import os

import jax

from . import autoselect, choice
from .backends import BACKENDS, Backend, Needs
from .backends.base import gpu_compute_capability
from .backends.pallas import interpreting
from .choice import BackendError  # noqa: F401  (`jax_attn.routing.BackendError`, public)
from .contract import Spec
from .kernels import mosaic_attention

log = logging.getLogger(__name__)

ENV_VAR = "JAX_ATTN_BACKEND"
# Which kernel serves `pallas` on Hopper: "triton", "mosaic" (where the inputs qualify) or "auto"
# (default: Mosaic only in the shape buckets measured faster). Elsewhere always Triton.
ENV_PALLAS_KERNEL = "JAX_ATTN_PALLAS_KERNEL"
_context: contextvars.ContextVar = contextvars.ContextVar("jax_attn_backend", default=None)
ROUTER = choice.Router(BACKENDS, ENV_VAR, _context, log)
_logged = ROUTER.logged
parse_choice = ROUTER.parse_choice
use_backend = ROUTER.use_backend
current_choice = ROUTER.current_choice


class Decision(choice.Decision):
    """`choice.Decision`, whose kernel is the one `pallas` runs (and how to override it)."""

    def kernel_line(self) -> str:
        return (f"kernel: pallas runs the {self.kernel} kernel ({self.kernel_why}); "
                f"override with {ENV_PALLAS_KERNEL}=triton|mosaic|auto")


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
    if spec.has_segment_ids:
        why.append("q_segment_ids/kv_segment_ids are served by the Triton kernels")
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
    """Route one call (`choice.Router.decide`): the auto preference is autoselect's, per mode."""
    needs = needs or Needs()
    d = ROUTER.decide(backend, lambda b: b.reasons(spec, needs),
                      lambda: autoselect.preference(spec, "train"),
                      lambda: autoselect.preference(spec, "forward"), Decision,
                      lambda b: b.backward_reasons(spec),
                      lambda: autoselect.preference(spec, "lossy"))
    if ROUTER.current_choice(backend)[0] == (choice.AUTO_LOSSY,):
        why = autoselect.lossy_unranked(spec) or (
            f"the measured order for bucket {autoselect.bucket(spec)}, lossy backends included")
        d = dataclasses.replace(d, note=f"{choice.AUTO_LOSSY}: {why}")
    if "pallas" in (d.backend, d.forward_only):
        kernel, kernel_why = pallas_kernel(spec)
        d = dataclasses.replace(d, kernel=kernel, kernel_why=kernel_why or "")
    return d


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
                          "kv_lengths": inputs.kv_lengths, "q_segment_ids": inputs.q_segment_ids,
                          "kv_segment_ids": inputs.kv_segment_ids})
    run.name, run.supports_lse_grad = training.name, training.supports_lse_grad  # autodiff runs the training backend
    return run


def choose(spec: Spec, backend=None, needs: Needs | None = None):
    """A callable `(inputs, return_lse)` running the backend for `spec` (the pair of `_by_mode`
    where the calls nothing differentiates and the differentiated ones choose differently: auto's
    two orders, or a forward-only backend ahead in a named list); raises `BackendError` with every
    reason when none can serve."""
    needs = needs or Needs()
    d = decide(spec, backend, needs)
    run = ROUTER.chosen(d)
    if d.forward_only and not needs.forward_ad:  # the pair's custom VJP has no forward mode
        return _by_mode(BACKENDS[d.forward_only], run)
    return run
