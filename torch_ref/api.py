"""The public entry points: `attention_forward`, `explain`, `available_backends`."""
from __future__ import annotations

from jax_attn.visibility import lengths_alias

from .backends import BACKENDS
from .inputs import AttentionInputs, describe
from .routing import Decision, choose, decide


def attention_forward(q, k, v, *, attn_mask=None, scale=None, is_causal=False, kv_lengths=None,
                      layout="bnsd", backend=None, return_lse=False, bias=None, mask=None,
                      query_seq_lengths=None, key_value_seq_lengths=None, local_window_size=None,
                      q_segment_ids=None, kv_segment_ids=None):
    """Scaled dot-product attention on torch tensors, with `jax_attn.attention_forward`'s contract.

    Same arguments, semantics and error messages (both validate through `jax_attn.contract`):
    `q (b, n, sq, d)`, `k (b, n_kv, skv, d)`, `v (b, n_kv, skv, dv)` (`(b, s, n, d)` with
    `layout="bsnd"`; rank 3 for all of q, k, v means unbatched), bool (True = attend) or additive
    float `attn_mask`, jax.nn's float `bias` and bool `mask` (all merged: keys kept where every bool
    part keeps them, float parts added), `kv_lengths (b,)` (alias `key_value_seq_lengths`),
    `query_seq_lengths (b,)` (padding queries get zeros, lse -inf and no gradient), top-left aligned
    `is_causal`, `local_window_size` (an int or `(left, right)`, None sides unbounded: key j is
    visible to query i iff `i - left <= j <= i + right`), packed sequences through integer
    `q_segment_ids (b, sq)` and `kv_segment_ids (b, skv)` (both or neither; query i sees key j
    only where their ids are equal), `scale` default `1/sqrt(d)`. A query
    with no key to attend to gets zeros, zero gradients and lse = -inf; a NaN in a visible logit
    gives NaN; keys no query can see contribute nothing, whatever they hold. `backend` is one
    name, a comma-separated preference list or "auto" (see `use_backend`); with `return_lse` also
    returns the `(b, n, sq)` float32 log-sum-exp (only backends that compute it can serve).
    """
    inputs = AttentionInputs.build(
        q, k, v, attn_mask=attn_mask, kv_lengths=lengths_alias(kv_lengths, key_value_seq_lengths),
        scale=scale, is_causal=is_causal, layout=layout, return_lse=return_lse, bias=bias, mask=mask,
        query_seq_lengths=query_seq_lengths, local_window_size=local_window_size,
        q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids)
    run = choose(inputs.spec, inputs.call, backend)
    return inputs.finish(run(inputs.padding_zeroed(), return_lse), return_lse)


def explain(q, k, v, *, attn_mask=None, scale=None, is_causal=False, kv_lengths=None, layout="bnsd",
            backend=None, return_lse=False, bias=None, mask=None, query_seq_lengths=None,
            key_value_seq_lengths=None, local_window_size=None, q_segment_ids=None,
            kv_segment_ids=None) -> Decision:
    """What `attention_forward` would run for these tensors, and every backend's reasons.

    Accepts `device="meta"` tensors (shapes only; then no backend is ruled out by device).
    """
    spec, call = describe(q, k, v, attn_mask=attn_mask, scale=scale, is_causal=is_causal,
                          kv_lengths=lengths_alias(kv_lengths, key_value_seq_lengths), layout=layout,
                          return_lse=return_lse, bias=bias, mask=mask,
                          query_seq_lengths=query_seq_lengths, local_window_size=local_window_size,
                          q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids)
    return decide(spec, call, backend)


def available_backends() -> list[str]:
    """Backends this machine can run (whatever the inputs)."""
    return [name for name, b in BACKENDS.items() if not b.unavailable()]
