"""The public entry points: `attention_forward`, `explain`, `available_backends`."""
from __future__ import annotations

from .backends import BACKENDS
from .inputs import AttentionInputs
from .routing import Decision, choose, decide


def attention_forward(q, k, v, *, attn_mask=None, scale=None, is_causal=False, kv_lengths=None,
                      layout="bnsd", backend=None, return_lse=False):
    """Scaled dot-product attention, routed to the best backend that can serve it.

    Args:
      q: `(b, n, sq, d)` queries (`(b, sq, n, d)` with `layout="bsnd"`).
      k: `(b, n_kv, skv, d)` keys, `n % n_kv == 0` (GQA/MQA).
      v: `(b, n_kv, skv, dv)` values.
      attn_mask: bool (True = attend) or additive float bias, broadcastable to `(b, n, sq, skv)`
        in either layout; a bias entry of -inf masks that key.
      scale: logit scale, default `1/sqrt(d)`.
      is_causal: key j is visible to query i only when `j <= i` (top-left aligned).
      kv_lengths: int `(b,)`; keys at positions `>= kv_lengths[i]` are padding.
      layout: "bnsd" or "bsnd", for q, k, v and the output.
      backend: a backend name, a comma-separated preference list, or "auto" (see `use_backend`).
      return_lse: also return the log-sum-exp of the masked logits, `(b, n, sq)` float32.

    Returns:
      `out` in q's dtype and layout, with last dim `dv` (and `lse` if asked). A query with no key
      to attend to gets zeros, zero gradients and lse = -inf.
    """
    inputs = AttentionInputs.build(q, k, v, attn_mask=attn_mask, kv_lengths=kv_lengths, scale=scale,
                                   is_causal=is_causal, layout=layout)
    from .parallel import sequence_parallel_forward  # late: parallel imports this module
    sp = sequence_parallel_forward(inputs, backend, return_lse)
    if sp is not None:
        return sp
    return choose(inputs.spec, backend)(inputs, return_lse)


def explain(q, k, v, *, attn_mask=None, scale=None, is_causal=False, kv_lengths=None, layout="bnsd",
            backend=None) -> Decision:
    """What `attention_forward` would run for these inputs, and every backend's reasons.

    Accepts arrays or `jax.ShapeDtypeStruct`s; `print()` the result for a table.
    """
    inputs = AttentionInputs.build(q, k, v, attn_mask=attn_mask, kv_lengths=kv_lengths, scale=scale,
                                   is_causal=is_causal, layout=layout)
    return decide(inputs.spec, backend)


def available_backends() -> list[str]:
    """Backends this machine can run (whatever the inputs)."""
    return [name for name, b in BACKENDS.items() if not b.unavailable()]
