"""Recording attention maps on the fast path: the maps recomputed from the kernel's log-sum-exp."""
from __future__ import annotations

from .base import AttnProcessorBase, _output, _project
from .layers import _check_layers, _selected, attention_layers


def _maps_from_lse(attn, q, k, lse, attention_mask, kv_lengths, queries):
    """p = exp(logits - lse) for the chosen queries: (b, n, nq, skv) float32; empty rows give 0."""
    ops = attn.ops
    logits = attn.attention_logits(q, k, attn_mask=attention_mask, kv_lengths=kv_lengths,
                                   query_index=queries)
    if queries is not None:
        lse = ops.take(lse, queries, 2)
    lse = lse[..., None]
    finite = ops.isfinite(lse)
    # A row with no key has lse = -inf and all logits -inf; subtract 0 there so exp gives 0, not NaN.
    return ops.exp(logits - ops.where(finite, lse, 0.0))


class AttentionMapStore(AttnProcessorBase):
    """Attention maps for visualization (prompt-to-prompt, attend-and-excite), on the fast path.

    The output still comes from `attn.attention_forward` (any backend), asked for its log-sum-exp;
    the maps are then recomputed for the chosen layers and queries only as
    `p = exp(scale * q.k + bias - lse)`, which is exactly the kernel's softmax row.

    Args:
      layers: layer paths to record (as in `attn_processors`, with or without ".processor");
        None records every layer that `kind` admits. Other layers run `AttnProcessor`.
      kind: "all", "cross" (cross-attention layers only) or "self".
      queries: query positions to record (ints); None records every query: the full map.
      average_heads: store the mean over heads, `(b, nq, skv)`, instead of `(b, n, nq, skv)`.

    Memory: per recorded layer and call, a transient `b * n * nq * skv` float32 (logits, then
    probabilities) and a stored `b * nq * skv` (averaged) or `b * n * nq * skv` float32 array,
    with `nq = len(queries)`. Nothing of size `sq * skv` per head exists unless `queries` is None.
    The attention kernel itself keeps its own memory behavior (linear in s for flash backends).

    The maps are module state (`ProcessorState` variables), so they are captured inside `nnx.jit`;
    read them after a call with `maps(model)`.
    """

    STATE = "attention_maps"

    def __init__(self, layers=None, *, kind: str = "all", queries=None, average_heads: bool = True):
        self.layers = _check_layers(layers, kind)
        self.kind = kind
        if queries is not None:
            queries = tuple(int(i) for i in queries)
            if not queries:
                raise ValueError("queries must name at least one query position (or be None for all)")
        self.queries = queries
        self.average_heads = bool(average_heads)

    def setup(self, attn):
        if _selected(attn, self.layers, self.kind):
            # An empty placeholder: the first call sets the real (b, [n,] nq, skv) shape.
            attn.new_state(self.STATE, attn.ops.zeros((0,)))

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 kv_lengths=None):
        q, k, v = _project(attn, hidden_states, encoder_hidden_states)
        if not _selected(attn, self.layers, self.kind):
            out = attn.attention_forward(q, k, v, attn_mask=attention_mask, kv_lengths=kv_lengths)
            return _output(attn, out)
        sq = q.shape[2]
        if self.queries is not None and not all(-sq <= i < sq for i in self.queries):
            raise ValueError(f"AttentionMapStore.queries {self.queries} out of range for {sq} queries "
                             f"at layer {attn.layer_name!r}")
        queries = None if self.queries is None else tuple(i % sq for i in self.queries)
        out, lse = attn.attention_forward(q, k, v, attn_mask=attention_mask, kv_lengths=kv_lengths,
                                          return_lse=True)
        p = _maps_from_lse(attn, q, k, lse, attention_mask, kv_lengths, queries)
        attn.set_state(self.STATE, attn.ops.mean(p, 1) if self.average_heads else p)
        return _output(attn, out)

    def maps(self, model) -> dict:
        """`{layer path: maps}` recorded by the last call, for the layers this store records."""
        found = {}
        for path, layer in attention_layers(model).items():
            if layer.processor is self and layer.has_state(self.STATE):
                value = layer.get_state(self.STATE)
                if value.shape != (0,):
                    found[path] = value
        return found
