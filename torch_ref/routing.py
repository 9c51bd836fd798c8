"""Which torch backend serves a call: argument > `use_backend` > `TORCH_REF_ATTN_BACKEND` > automatic.

The rules are `jax_attn.choice`'s, as in `jax_attn.routing` (one name, a comma-separated
preference list, or "auto"; the same `Decision` and `BackendError`), over torch_ref's registry.
What is torch's own: the reasons depend on the `RunContext` (device, autograd, lse), known only at run
time, so torch decides per call; and the automatic preference is a fixed order.
"""
from __future__ import annotations

import contextvars
import logging

from jax_attn import choice
from jax_attn.autoselect import SCORE_BYTES_BUDGET
from jax_attn.choice import BackendError, Decision
from jax_attn.contract import Spec

from .backends import BACKENDS, Backend
from .inputs import RunContext

log = logging.getLogger(__name__)

ENV_VAR = "TORCH_REF_ATTN_BACKEND"
_context: contextvars.ContextVar = contextvars.ContextVar("torch_ref_backend", default=None)
ROUTER = choice.Router(BACKENDS, ENV_VAR, _context, log)
_logged = ROUTER.logged
parse_choice = ROUTER.parse_choice
use_backend = ROUTER.use_backend
current_choice = ROUTER.current_choice

__all__ = ["BackendError", "Decision", "ENV_VAR", "choose", "current_choice", "decide", "parse_choice",
           "preference", "use_backend"]


def preference(spec: Spec, call: RunContext) -> list[str]:
    """Backends to try, best first: installed fused kernels on CUDA, then sdpa, then chunked."""
    order = ["flash_attn", "xformers", "sdpa", "chunked", "naive"] if call.device == "cuda" else [
        "sdpa", "chunked", "naive"]
    if spec.batch * spec.heads * spec.q_len * spec.kv_len * 4 > SCORE_BYTES_BUDGET:
        order.remove("naive")  # keep memory linear in sequence length
    return order


def decide(spec: Spec, call: RunContext = RunContext(), backend=None) -> Decision:
    return ROUTER.decide(backend, lambda b: b.reasons(spec, call), lambda: preference(spec, call))


def choose(spec: Spec, call: RunContext = RunContext(), backend=None) -> Backend:
    """The backend for this call, raising `BackendError` with every reason when none can serve."""
    return ROUTER.chosen(decide(spec, call, backend))
