"""The public entry points: `attention_forward`, `explain`, `available_backends`."""
from __future__ import annotations

from .backends import BACKENDS, Needs
from .backends.base import lse_without_gradient
from .contract import validate
from .inputs import AttentionInputs
from .routing import Decision, choose, decide, forward_mode
from .visibility import lengths_alias


def attention_forward(q, k, v, *, attn_mask=None, scale=None, is_causal=False, kv_lengths=None,
                      layout="bnsd", backend=None, return_lse=False, bias=None, mask=None,
                      query_seq_lengths=None, key_value_seq_lengths=None, local_window_size=None,
                      q_segment_ids=None, kv_segment_ids=None):
    """Scaled dot-product attention, routed to the best backend that can serve it.

    Args:
      q: `(b, n, sq, d)` queries (`(b, sq, n, d)` with `layout="bsnd"`); rank 3 for all of q, k, v
        means unbatched (`(n, s, d)`, or `(s, n, d)` with "bsnd").
      k: `(b, n_kv, skv, d)` keys, `n % n_kv == 0` (GQA/MQA).
      v: `(b, n_kv, skv, dv)` values.
      attn_mask: bool (True = attend) or additive float bias, broadcastable to `(b, n, sq, skv)`
        in either layout; a bias entry of -inf masks that key.
      scale: logit scale (a real number), default `1/sqrt(d)`.
      is_causal: key j is visible to query i only when `j <= i` (top-left aligned).
      kv_lengths: integer `(b,)`; keys at positions `>= kv_lengths[i]` are padding (values above
        skv mean all keys). `key_value_seq_lengths` is the same, under jax.nn's name.
      layout: "bnsd" or "bsnd", for q, k, v and the output.
      backend: a backend name, a comma-separated preference list, "auto", or "auto+8bit" (auto
        that may take a lossy 8-bit backend where `tune --lossy` measured it faster; see
        `use_backend`).
      return_lse: also return the log-sum-exp of the masked logits, `(b, n, sq)` float32.
      bias, mask: jax.nn's names: a float additive bias and a bool mask, both broadcastable to
        `(b, n, sq, skv)`; any of attn_mask, bias and mask may be given together (keys are kept
        where every bool part keeps them, float parts add up).
      query_seq_lengths: integer `(b,)`; queries at positions `>= query_seq_lengths[i]` are padding:
        zeros out, lse -inf, no gradient, and they add nothing to any other gradient.
      local_window_size: sliding window, an int (symmetric) or `(left, right)` (ints >= 0, or None
        for unbounded): key j is visible to query i iff `i - left <= j <= i + right`.
      q_segment_ids, kv_segment_ids: packed sequences, integer `(b, sq)` and `(b, skv)` (`(sq,)` and
        `(skv,)` unbatched), both or neither: query i of sample b sees key j only where
        `q_segment_ids[b, i] == kv_segment_ids[b, j]`, on top of every other rule above.

    Returns:
      `out` in q's dtype and layout, with last dim `dv` (and `lse` if asked). A query with no key
      to attend to gets zeros, zero gradients and lse = -inf; a NaN in a visible logit gives NaN.
      Keys no query can see contribute exactly nothing, whatever they hold.
    """
    from .parallel import current_plan, sequence_parallel_forward  # late: parallel imports this module
    plan = current_plan()
    inputs = AttentionInputs.build(
        q, k, v, attn_mask=attn_mask, kv_lengths=lengths_alias(kv_lengths, key_value_seq_lengths),
        scale=scale, is_causal=is_causal, layout=layout, bias=bias, mask=mask,
        query_seq_lengths=query_seq_lengths, local_window_size=local_window_size,
        q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids, local_blocks=True,
        ids_per_device=plan is not None and plan.mesh is None)
    sp = sequence_parallel_forward(inputs, backend, return_lse)  # zeroes padding per device
    if sp is not None:
        return inputs.finish(sp, return_lse)
    run = choose(inputs.spec, backend, Needs(forward_ad=forward_mode(q, k, v, attn_mask, bias, mask)))
    result = run(inputs.padding_zeroed(), return_lse)
    if return_lse and not run.supports_lse_grad:  # differentiating this lse raises instead of missing it
        result = (result[0], lse_without_gradient(run.name)(result[1]))
    return inputs.finish(result, return_lse)


def explain(q, k, v, *, attn_mask=None, scale=None, is_causal=False, kv_lengths=None, layout="bnsd",
            backend=None, bias=None, mask=None, query_seq_lengths=None, key_value_seq_lengths=None,
            local_window_size=None, q_segment_ids=None, kv_segment_ids=None) -> Decision:
    """What `attention_forward` would run for these inputs, and every backend's reasons.

    Accepts arrays or `jax.ShapeDtypeStruct`s; `print()` the result for a table.
    """
    spec = validate(q, k, v, attn_mask=attn_mask, scale=scale, is_causal=is_causal,
                    kv_lengths=lengths_alias(kv_lengths, key_value_seq_lengths), layout=layout,
                    bias=bias, mask=mask, query_seq_lengths=query_seq_lengths,
                    local_window_size=local_window_size, q_segment_ids=q_segment_ids,
                    kv_segment_ids=kv_segment_ids)
    return decide(spec, backend, Needs(forward_ad=forward_mode(q, k, v, attn_mask, bias, mask)))


def available_backends() -> list[str]:
    """Backends this machine can run (whatever the inputs)."""
    return [name for name, b in BACKENDS.items() if not b.unavailable()]
