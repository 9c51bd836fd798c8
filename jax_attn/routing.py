"""Which backend serves a call: argument > `use_backend` > `JAX_ATTN_BACKEND` > automatic.

A choice is one name, a comma-separated preference list (or a list of names), or "auto".
Everything here runs at trace time; the compiled program holds only the chosen backend.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import logging
import os

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

    def __str__(self):
        lines = [f"chosen: {self.backend or 'none'} (by {self.source}; tried {', '.join(self.candidates)})"]
        for name, why in self.reasons.items():
            lines.append(f"  {name:8s} " + ("ok" if not why else "; ".join(why)))
        return "\n".join(lines)


def decide(spec: Spec, backend=None) -> Decision:
    names, source = current_choice(backend)
    reasons = {name: b.reasons(spec) for name, b in BACKENDS.items()}
    if names == ("auto",):
        candidates = autoselect.preference(spec)
        usable = [n for n in candidates if not reasons[n] and BACKENDS[n].automatic]
    else:
        candidates = names
        usable = [n for n in candidates if not reasons[n]]
    return Decision(usable[0] if usable else None, source, tuple(candidates), reasons)


def choose(spec: Spec, backend=None) -> Backend:
    """The backend for `spec`, raising `BackendError` with every reason when none can serve."""
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
    return BACKENDS[d.backend]
