"""Which backend serves a call: argument > `use_backend` > `JAX_ATTN_BACKEND` > automatic.

A choice is one name, a comma-separated preference list (or a list of names), or "auto".
Everything here runs at trace time; the compiled program holds only the chosen backend. Under
"auto" the measured fastest backend can differ between calls that are differentiated (training:
forward+backward) and calls that are not (inference: forward); then the call runs the inference
backend, and autodiff, entering through a custom VJP's forward rule, runs the training one's
forward and backward instead.
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
from .backends import BACKENDS, Backend
from .contract import Spec

log = logging.getLogger(__name__)

ENV_VAR = "JAX_ATTN_BACKEND"
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
        names = tuple(choice)
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
    forward_only: str | None = None  # auto: the backend when nothing differentiates, if different

    def __str__(self):
        lines = [f"chosen: {self.backend or 'none'} (by {self.source}; tried {', '.join(self.candidates)})"]
        if self.forward_only:
            lines[0] += f"; {self.forward_only} when nothing differentiates the call"
        for name, why in self.reasons.items():
            lines.append(f"  {name:8s} " + ("ok" if not why else "; ".join(why)))
        return "\n".join(lines)


def decide(spec: Spec, backend=None) -> Decision:
    names, source = current_choice(backend)
    reasons = {name: b.reasons(spec) for name, b in BACKENDS.items()}
    if names != ("auto",):
        usable = [n for n in names if not reasons[n]]
        return Decision(usable[0] if usable else None, source, names, reasons)

    def first(candidates):
        return next((n for n in candidates if not reasons[n] and BACKENDS[n].automatic), None)
    candidates = autoselect.preference(spec, "train")
    chosen = first(candidates)
    inference = first(autoselect.preference(spec, "forward"))
    return Decision(chosen, source, tuple(candidates), reasons,
                    inference if chosen and inference != chosen else None)


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


def choose(spec: Spec, backend=None):
    """A callable `(inputs, return_lse)` running the backend for `spec` (under "auto", the pair of
    `_by_mode` where inference and training choose differently); raises `BackendError` with every
    reason when none can serve."""
    d = decide(spec, backend)
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
    if d.forward_only:
        return _by_mode(BACKENDS[d.forward_only], BACKENDS[d.backend])
    return BACKENDS[d.backend]
