"""The correctness gate: sampled rows against the float64 NumPy reference, before any timing.

Sampled query rows of two (batch, head) slices (`_check_slices`) are compared with
`jax_attn.reference`. For the backward, the output cotangent is zero except on those rows, so
the reference on the sub-problem gives the exact dq of those rows and the full dk, dv of those
slices, at any sequence length. A row over `_tolerance` is reported as FAIL and never timed, so
a fast wrong backend can never win a table or the routing. Shared by the JAX and torch runners,
as is `_short_message`, the one-line form of an error that a row's note carries.
"""
from __future__ import annotations

import numpy as np

from .shapes import Shape

CHECK_ROWS = 64  # query rows per sampled (batch, head) slice in the correctness gate


def _short_message(e: BaseException) -> str:
    lines = [x for x in str(e).splitlines() if x.strip()]
    return f"{type(e).__name__}: {lines[0][:200] if lines else ''}"


def _check_slices(shape: Shape):
    rows = np.unique(np.linspace(0, shape.sq - 1, min(CHECK_ROWS, shape.sq)).astype(int))
    pairs = sorted({(0, 0), (shape.b - 1, shape.n - 1)})
    return rows, pairs


def _reference_errors(shape: Shape, mode: str, host_inputs, host_results) -> float:
    """Largest relative error over the sampled slices; `host_*` are dicts keyed by (b, h)."""
    from .. import reference
    rows, pairs = _check_slices(shape)
    worst = 0.0
    for bh in pairs:
        q, k, v, do = host_inputs[bh]
        q_rows = q[rows][None, None]
        k_, v_ = k[None, None], v[None, None]
        if mode == "fwd":
            ref = reference.attention(q_rows, k_, v_)[0, 0]
            worst = max(worst, reference.relative_error(host_results[bh][0], ref))
        else:
            dq, dk, dv = (g[0, 0] for g in reference.attention_vjp(q_rows, k_, v_, do[rows][None, None])[:3])
            got_dq, got_dk, got_dv = host_results[bh]
            worst = max(worst, reference.relative_error(got_dq, dq), reference.relative_error(got_dk, dk),
                        reference.relative_error(got_dv, dv))
    return worst


def _tolerance(shape: Shape, mode: str) -> float:
    from .. import reference
    return reference.TOLERANCE[shape.dtype] * (2 if mode == "fwd+bwd" else 1)
