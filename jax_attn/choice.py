"""Choosing a backend from a registry, the same way in every framework: one `Router` per package.

This module imports no array framework. A choice is one name, a comma-separated preference list
(or a list of names), "auto", or "auto+8bit" (`AUTO_LOSSY`); it comes from, first match wins, the call's `backend=` argument,
the innermost `use_backend(...)` block (a context variable: threads and nested blocks do not leak
into each other), the package's environment variable, or automatic selection. A registry maps
names to backends; a backend says why it cannot serve a call as a list of reasons (empty = can)
and whether automatic selection may take it (`automatic`). `jax_attn.routing` and
`torch_ref.routing` each instantiate a `Router` and add only what their framework decides: the
reasons of a call, the automatic preference order, and (JAX) the kernel and autodiff mode.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import logging
import os
from typing import Callable, Iterable, Mapping


class BackendError(ValueError):
    """No backend in the requested choice can serve the inputs; the message lists every reason."""


# Automatic selection that may also take lossy backends (8-bit attention) for calls nothing
# differentiates, where the routing data measured one faster than every exact backend and it
# passed the float64 gate at the inputs' dtype tolerance; everything else routes as "auto". A
# framework without such data (no `lossy_preference`) routes it exactly as "auto".
AUTO_LOSSY = "auto+8bit"
AUTOMATIC = ("auto", AUTO_LOSSY)


def parse_choice(choice, source: str, known: Iterable[str]) -> tuple[str, ...]:
    """Normalize a choice to a tuple of names, ("auto",) for automatic; names not in `known` raise.

    `source` names where the choice came from, for the error messages."""
    known = tuple(known)
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
        raise ValueError(f"{source} names no backend; known: {', '.join(known)}, 'auto' or "
                         f"{AUTO_LOSSY!r}")
    unknown = [x for x in names if x not in AUTOMATIC and x not in known]
    if unknown:
        raise ValueError(f"{source}: unknown backend {', '.join(map(repr, unknown))}; "
                         f"known: {', '.join(known)}, 'auto' or {AUTO_LOSSY!r}")
    auto = [x for x in names if x in AUTOMATIC]
    if auto and len(names) > 1:
        raise ValueError(f"{source}: {auto[0]!r} cannot be combined with other names, got {choice!r}")
    return names


@dataclasses.dataclass(frozen=True)
class Decision:
    """The outcome of routing one call: what was chosen, from which source, and why not the rest."""

    backend: str | None
    source: str
    candidates: tuple[str, ...]
    reasons: dict  # name -> list of reasons (empty = could serve)
    # The backend for calls nothing differentiates, where it differs from `backend` (auto's
    # inference order, or a forward-only backend ahead in a named list).
    forward_only: str | None = None
    kernel: str | None = None  # the kernel the chosen backend runs, where a backend has several
    kernel_why: str = ""
    no_backward: tuple = ()  # why a gradient through `backend` would raise (forward-only kernels)
    note: str = ""  # a line a framework adds (JAX: how `auto+8bit` read its routing data)

    def kernel_line(self) -> str:
        """The line saying which kernel runs and why (a framework's subclass may word it)."""
        return f"kernel: {self.kernel} ({self.kernel_why})"

    def __str__(self):
        lines = [f"chosen: {self.backend or 'none'} (by {self.source}; tried {', '.join(self.candidates)})"]
        if self.forward_only:
            lines[0] += f"; {self.forward_only} when nothing differentiates the call"
        if self.kernel:
            lines.append(self.kernel_line())
        if self.no_backward:
            lines.append(f"differentiating it raises: {'; '.join(self.no_backward)}")
        if self.note:
            lines.append(self.note)
        for name, why in self.reasons.items():
            lines.append(f"  {name:8s} " + ("ok" if not why else "; ".join(why)))
        return "\n".join(lines)


class Router:
    """The choice rules over one registry of backends.

    `registry`: name -> backend, in the order `explain` lists them (read at each call, so a
    registry filled after construction is seen); `env_var`: the environment variable read after
    the context; `context`: the `ContextVar` (default None) that `use_backend` sets; `log`: the
    logger for fall-through messages; `logged` holds what was logged once already.
    """

    def __init__(self, registry: Mapping, env_var: str, context: contextvars.ContextVar,
                 log: logging.Logger):
        self.registry, self.env_var, self.context, self.log = registry, env_var, context, log
        self.logged: set = set()

    def parse_choice(self, choice, source: str = "backend", known=None) -> tuple[str, ...]:
        """Normalize a choice to a tuple of names, ("auto",) for automatic. Unknown names raise.

        `known`: the names checked against (default: this router's registry)."""
        return parse_choice(choice, source, self.registry if known is None else known)

    @contextlib.contextmanager
    def use_backend(self, choice):
        """Route every attention call made inside this block (JAX: traced inside it) by `choice`;
        the innermost block wins.

        Context-local (`contextvars`), so threads and nested blocks do not leak into each other.
        """
        names = self.parse_choice(choice, "use_backend")
        token = self.context.set(names)
        try:
            yield
        finally:
            self.context.reset(token)

    def current_choice(self, backend=None) -> tuple[tuple[str, ...], str]:
        """The choice in force and where it came from."""
        if backend is not None:
            return self.parse_choice(backend, "backend"), "argument"
        if self.context.get() is not None:
            return self.context.get(), "use_backend"
        env = os.environ.get(self.env_var, "").strip()
        if env:
            return self.parse_choice(env, self.env_var), self.env_var
        return ("auto",), "automatic"

    def first_automatic(self, candidates: Iterable[str], reasons: Mapping, also=None,
                        lossy: bool = False) -> str | None:
        """The first of `candidates` that can serve and that automatic selection may take (and
        for which `also(name)` holds, when given); with `lossy`, lossy backends too (whose only
        bar to automatic selection is that they are lossy)."""
        def may(n):
            b = self.registry[n]
            return b.automatic or (lossy and getattr(b, "lossy", False))
        return next((n for n in candidates if not reasons[n] and may(n)
                     and (also is None or also(n))), None)

    def decide(self, backend, reasons_of: Callable, preference: Callable[[], Iterable[str]],
               inference_preference: Callable[[], Iterable[str]] | None = None,
               decision: type = Decision, backward_reasons_of: Callable | None = None,
               lossy_preference: Callable[[], Iterable[str]] | None = None) -> Decision:
        """Route one call: every backend's reasons (`reasons_of(backend)`), then the first of the
        named backends that can serve, or under "auto" the first of `preference()` that can and
        may be chosen automatically. `inference_preference`: under "auto", the order for calls that
        nothing differentiates; its first is `forward_only` when it differs.

        `backward_reasons_of(backend)`: why a backend that serves the forward cannot be
        differentiated (forward-only kernels). The choice for differentiated calls (`backend` of
        the decision) then skips such backends where a later name of the list (or of the
        automatic order) serves both; the forward-only one stays the choice for calls nothing
        differentiates (`forward_only`). With none to take its place, it stays the choice, and a
        gradient through it raises from its backward.

        `lossy_preference`: under `AUTO_LOSSY`, the order for calls nothing differentiates, in
        which lossy backends may be taken (measured ones only: the caller's order says where);
        without it, or under "auto", `inference_preference` as above."""
        names, source = self.current_choice(backend)
        reasons = {name: reasons_of(b) for name, b in self.registry.items()}
        trainable = None
        if backward_reasons_of is not None:
            trainable = lambda n: not backward_reasons_of(self.registry[n])  # noqa: E731
        forward_only = None
        if names[0] not in AUTOMATIC:
            candidates = names
            chosen = next((n for n in names if not reasons[n]), None)
            if chosen is not None and trainable is not None and not trainable(chosen):
                later = names[names.index(chosen) + 1:]
                trainer = next((n for n in later if not reasons[n] and trainable(n)), None)
                if trainer is not None:
                    forward_only, chosen = chosen, trainer
        else:
            candidates = tuple(preference())
            chosen = None if trainable is None else self.first_automatic(candidates, reasons, trainable)
            chosen = chosen or self.first_automatic(candidates, reasons)
            lossy = names == (AUTO_LOSSY,) and lossy_preference is not None
            order = lossy_preference if lossy else inference_preference
            if order is not None:
                inference = self.first_automatic(order(), reasons, lossy=lossy)
                forward_only = inference if chosen and inference != chosen else None
        no_backward = ()
        if chosen is not None and backward_reasons_of is not None:
            no_backward = tuple(backward_reasons_of(self.registry[chosen]))
        return decision(chosen, source, candidates, reasons, forward_only, no_backward=no_backward)

    def chosen(self, d: Decision):
        """The registry's backend for `d`: raises `BackendError` with every reason when none can
        serve; logs once (per choice, backend and reasons) the backends a named list skipped."""
        if d.backend is None:
            detail = "\n".join(f"  {n}: {'; '.join(d.reasons[n]) or 'not chosen automatically'}"
                               for n in d.candidates)
            raise BackendError(f"no backend can serve this call (choice {','.join(d.candidates)!r} "
                               f"from {d.source}):\n{detail}")
        # Not skipped: the forward-only backend that serves the calls nothing differentiates.
        skipped = [n for n in d.candidates[: d.candidates.index(d.backend)] if n != d.forward_only]
        if skipped and d.source == "automatic":
            self.log.debug("attention: auto chose %r over %s", d.backend, ", ".join(skipped))
        elif skipped:
            key = (d.candidates, d.backend, tuple(tuple(d.reasons[n]) for n in skipped))
            if key not in self.logged:
                self.logged.add(key)
                using = repr(d.backend) if not d.forward_only else (
                    f"{d.forward_only!r} (differentiated: {d.backend!r})")
                self.log.warning("attention: using %s from %s; skipped %s", using, d.source,
                                 "; ".join(f"{n} ({', '.join(d.reasons[n])})" for n in skipped))
        return self.registry[d.backend]
