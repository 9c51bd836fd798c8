"""Which torch backend serves a call: argument > `use_backend` > `TORCH_REF_ATTN_BACKEND` > automatic.

The same rules as `jax_attn.routing` (one name, a comma-separated preference list, or "auto"),
the same `Decision` and `BackendError`. Torch decides per call, at run time, since the device and
autograd state are only known then.
"""
from __future__ import annotations

import contextlib
import contextvars
import logging
import os

from jax_attn.autoselect import SCORE_BYTES_BUDGET
from jax_attn.contract import Spec
from jax_attn.routing import BackendError, Decision
from jax_attn.routing import parse_choice as _parse_choice

from .backends import BACKENDS, Backend
from .inputs import Call

log = logging.getLogger(__name__)

ENV_VAR = "TORCH_REF_ATTN_BACKEND"
_context: contextvars.ContextVar = contextvars.ContextVar("torch_ref_backend", default=None)
_logged: set = set()

__all__ = ["BackendError", "Decision", "ENV_VAR", "choose", "decide", "parse_choice", "preference",
           "use_backend"]


def parse_choice(choice, source: str = "backend") -> tuple[str, ...]:
    """Normalize a choice to a tuple of torch backend names (`jax_attn.routing.parse_choice`)."""
    return _parse_choice(choice, source, BACKENDS)


@contextlib.contextmanager
def use_backend(choice):
    """Route every `torch_ref.attention_forward` inside this block (innermost block wins)."""
    names = parse_choice(choice, "use_backend")
    token = _context.set(names)
    try:
        yield
    finally:
        _context.reset(token)


def current_choice(backend=None) -> tuple[tuple[str, ...], str]:
    if backend is not None:
        return parse_choice(backend, "backend"), "argument"
    if _context.get() is not None:
        return _context.get(), "use_backend"
    env = os.environ.get(ENV_VAR, "").strip()
    if env:
        return parse_choice(env, ENV_VAR), ENV_VAR
    return ("auto",), "automatic"


def preference(spec: Spec, call: Call) -> list[str]:
    """Backends to try, best first: installed fused kernels on CUDA, then sdpa, then chunked."""
    order = ["flash_attn", "xformers", "sdpa", "chunked", "naive"] if call.device == "cuda" else [
        "sdpa", "chunked", "naive"]
    if spec.batch * spec.heads * spec.q_len * spec.kv_len * 4 > SCORE_BYTES_BUDGET:
        order.remove("naive")  # keep memory linear in sequence length
    return order


def decide(spec: Spec, call: Call = Call(), backend=None) -> Decision:
    names, source = current_choice(backend)
    reasons = {name: b.reasons(spec, call) for name, b in BACKENDS.items()}
    if names == ("auto",):
        candidates = preference(spec, call)
        usable = [n for n in candidates if not reasons[n] and BACKENDS[n].automatic]
    else:
        candidates = names
        usable = [n for n in candidates if not reasons[n]]
    return Decision(usable[0] if usable else None, source, tuple(candidates), reasons)


def choose(spec: Spec, call: Call = Call(), backend=None) -> Backend:
    """The backend for this call, raising `BackendError` with every reason when none can serve."""
    d = decide(spec, call, backend)
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
