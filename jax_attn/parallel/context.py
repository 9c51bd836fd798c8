"""The multi-device contexts and the plan they install.

Two contexts change what `attention_forward` does with the arrays it is given; outside them it
costs one context-variable lookup and nothing else (`sequence_parallel_forward` returns None).

- `shard_local(mesh, batch_axis=..., head_axis=...)`: q, k, v (and masks, `kv_lengths`) are split
  over batch and/or heads; each device runs the chosen backend on its own shard inside
  `shard_map`: explicit, and it serves any kernel, including ones without partitioning rules.
  `query_axis=` also splits the queries along the sequence while keys and values stay whole on
  every device: cross-attention to text tokens in a sequence-parallel model (no backend's own
  rules do that: they gather a sharded sequence).
- `sequence_parallel(mesh, axis_name, method=...)`: q, k, v are split along the sequence over
  `axis_name` (and optionally over batch/heads as above), by "ulysses" (`ulysses.py`) or "ring"
  (`ring.py`); with `ring_axis=` as well, over both axes by Ulysses x ring (`hybrid.py`).

`sequence_parallel(None, axis_name, ...)` is for code already inside a `shard_map` (or `pmap`)
over `axis_name`: the arrays given are then the local sequence blocks, all of one length.

The plan lives in a context variable so that the innermost context wins and `jit` tracing inside
the block sees it; the work itself is in `sharded.py`.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from typing import Any

from ..inputs import AttentionInputs
from .layout import _names
from .sharded import _manual, _sharded

METHODS = ("ulysses", "ring")  # the single-axis methods; "hybrid" is Ulysses plus `ring_axis`
_context: contextvars.ContextVar = contextvars.ContextVar("jax_attn_parallel", default=None)


@dataclasses.dataclass(frozen=True)
class Plan:
    """How the arrays of an `attention_forward` call are laid over a mesh.

    `method` is "local" (`shard_local`), "ulysses", "ring" or "hybrid" (`sequence_parallel`);
    `seq_axis` splits q, k, v along the sequence (queries only for "local"); for "hybrid" it is the
    Ulysses axis and `ring_axis` the ring's, the sequence split over both (ring major). `mesh` None
    means the caller is already inside a `shard_map` over those axes.
    """

    mesh: Any
    method: str
    seq_axis: Any = None
    batch_axis: Any = None
    head_axis: Any = None
    ring_axis: Any = None  # "hybrid" only; last, so positional construction stays as it was

    def size(self, axis) -> int:
        return math.prod(self.mesh.shape[a] for a in _names(axis))


@contextlib.contextmanager
def _use(plan: Plan):
    token = _context.set(plan)
    try:
        yield plan
    finally:
        _context.reset(token)


def _check_axes(mesh, **axes):
    if mesh is None:
        return
    used = []
    for what, axis in axes.items():
        for a in _names(axis):
            if a not in mesh.shape:
                raise ValueError(f"{what} {a!r} is not an axis of the mesh (axes: {', '.join(mesh.axis_names)})")
            if a in used:
                raise ValueError(f"mesh axis {a!r} is named twice; each may split one dimension")
            used.append(a)


def sequence_parallel(mesh, axis_name, method: str = "ulysses", *, ring_axis=None, batch_axis=None,
                      head_axis=None):
    """Treat q, k, v of every `attention_forward` traced in this block as split along the sequence.

    Args:
      mesh: the `jax.sharding.Mesh` the arrays live on, or None when called inside a `shard_map`
        over `axis_name` (the arrays are then the local blocks).
      axis_name: the mesh axis (or tuple of axes) the sequence is split over, for q and k/v alike.
      method: "ulysses" (all-to-all to head shards; heads must divide by the axis size) or "ring"
        (k/v blocks passed round with `ppermute`, merged by log-sum-exp; any head count).
      ring_axis: with "ulysses" (or method="hybrid"), a second mesh axis: the sequence is split
        over `(ring_axis, axis_name)`, ring major; heads are all-to-all'd over `axis_name` only
        (so they need to divide by its size alone) and the resulting sequence chunks run ring
        attention over `ring_axis` (as MaxDiffusion lays out a large context-parallel mesh:
        all-to-all within a fast group, ring across groups).
      batch_axis, head_axis: mesh axes the batch and heads are also split over (data/tensor
        parallelism); those dimensions must divide by the axis sizes.

    Any local backend serves each device's share (the `backend=` argument or `use_backend`
    context chooses it as usual, for the local shapes). Runs under `jit`; differentiable.
    Innermost context wins (also against `shard_local`).
    """
    if method not in METHODS + ("hybrid",):
        raise ValueError(f"sequence_parallel: method must be one of {METHODS + ('hybrid',)}, got {method!r}")
    if axis_name is None:
        raise ValueError("sequence_parallel: axis_name names the mesh axis the sequence is split over")
    if ring_axis is not None:
        if method == "ring":
            raise ValueError("sequence_parallel: ring_axis adds a ring to Ulysses (method='ulysses' or "
                             "'hybrid'); for a ring alone pass the axis as axis_name")
        method = "hybrid"
    elif method == "hybrid":
        raise ValueError("sequence_parallel(method='hybrid') needs ring_axis= (the mesh axis of the ring)")
    if mesh is None and (batch_axis is not None or head_axis is not None):
        raise ValueError("sequence_parallel: batch_axis/head_axis need a mesh (inside a shard_map the "
                         "arrays are already local)")
    _check_axes(mesh, axis_name=axis_name, ring_axis=ring_axis, batch_axis=batch_axis, head_axis=head_axis)
    return _use(Plan(mesh, method, axis_name, batch_axis, head_axis, ring_axis))


def shard_local(mesh, *, batch_axis=None, head_axis=None, query_axis=None):
    """Run every `attention_forward` traced in this block shard by shard, with no communication.

    q, k, v (and a mask or `kv_lengths` with those dimensions) are split over `batch_axis` and/or
    `head_axis` of `mesh`; each device calls the backend on its own shard inside `shard_map`.
    Batch/head-sharded inputs stay local without this too (XLA splits the jnp backends; the
    `pallas` Triton kernel and JAX's cuDNN binding have partitioning rules), so it matters for
    `query_axis`, for kernels without such rules (the Mosaic GPU variant of `pallas`), and to fix
    the split whatever sharding propagation would choose.
    `query_axis` splits the queries along the sequence too, with k/v whole on every device
    (cross-attention to a short text sequence in a sequence-parallel model); not with causal.
    """
    if batch_axis is None and head_axis is None and query_axis is None:
        raise ValueError("shard_local: name at least one of batch_axis, head_axis, query_axis")
    _check_axes(mesh, batch_axis=batch_axis, head_axis=head_axis, query_axis=query_axis)
    return _use(Plan(mesh, "local", query_axis, batch_axis, head_axis))


def current_plan() -> Plan | None:
    """The innermost `sequence_parallel` / `shard_local` plan in force, or None."""
    return _context.get()


def sequence_parallel_forward(inputs: AttentionInputs, backend, return_lse):
    """The multi-device result when a `sequence_parallel` or `shard_local` context is active, else None."""
    plan = _context.get()
    if plan is None:
        return None
    spec = inputs.spec
    split_seq = plan.method != "local" or plan.seq_axis is not None or plan.mesh is None
    if split_seq and (spec.window is not None or spec.has_q_lengths):
        raise ValueError("local_window_size and query_seq_lengths need whole sequences on each device: "
                         "they are not supported under sequence_parallel or shard_local(query_axis=...)")
    if plan.mesh is None:
        return _manual(plan, inputs, backend, return_lse)
    return _sharded(plan, inputs, backend, return_lse)
