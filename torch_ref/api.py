"""The public entry points: `attention_forward`, `explain`, `available_backends`."""
from __future__ import annotations

from .backends import BACKENDS
from .inputs import AttentionInputs
from .routing import Decision, choose, decide


def attention_forward(q, k, v, *, attn_mask=None, scale=None, is_causal=False, kv_lengths=None,
                      layout="bnsd", backend=None, return_lse=False):
    """Scaled dot-product attention on torch tensors, with `jax_attn.attention_forward`'s contract.

    Same arguments, semantics and error messages (both validate through `jax_attn.contract`):
    `q (b, n, sq, d)`, `k (b, n_kv, skv, d)`, `v (b, n_kv, skv, dv)` (`(b, s, n, d)` with
    `layout="bsnd"`), bool (True = attend) or additive float `attn_mask`, `kv_lengths (b,)`,
    top-left aligned `is_causal`, `scale` default `1/sqrt(d)`. A query with no key to attend to
    gets zeros, zero gradients and lse = -inf. `backend` is one name, a comma-separated preference
    list or "auto" (see `use_backend`); with `return_lse` also returns the `(b, n, sq)` float32
    log-sum-exp (only backends that compute it can serve).
    """
    inputs = AttentionInputs.build(q, k, v, attn_mask=attn_mask, kv_lengths=kv_lengths, scale=scale,
                                   is_causal=is_causal, layout=layout, return_lse=return_lse)
    return choose(inputs.spec, inputs.call, backend)(inputs, return_lse)


def explain(q, k, v, *, attn_mask=None, scale=None, is_causal=False, kv_lengths=None, layout="bnsd",
            backend=None, return_lse=False) -> Decision:
    """What `attention_forward` would run for these tensors, and every backend's reasons.

    Accepts `device="meta"` tensors (shapes only; then no backend is ruled out by device).
    """
    inputs = AttentionInputs.build(q, k, v, attn_mask=attn_mask, kv_lengths=kv_lengths, scale=scale,
                                   is_causal=is_causal, layout=layout, return_lse=return_lse)
    return decide(inputs.spec, inputs.call, backend)


def available_backends() -> list[str]:
    """Backends this machine can run (whatever the inputs)."""
    return [name for name, b in BACKENDS.items() if not b.unavailable()]
