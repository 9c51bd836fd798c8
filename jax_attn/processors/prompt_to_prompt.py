"""Prompt-to-prompt edits: re-weighting text tokens, and replacing a pass's maps by recorded ones."""
from __future__ import annotations

import math

from .base import AttnProcessorBase, _output, _project
from .layers import _check_layers, _selected


class AttentionReweightProcessor(AttnProcessorBase):
    """Prompt-to-prompt token re-weighting, on any backend.

    `token_weights` maps key positions (text tokens) to weights `w`. With `renormalize=True` the
    probabilities become `w_j p_j / sum_k w_k p_k`: an additive bias `log w` on those keys (w = 0
    drops the key). With `renormalize=False` they become `w_j p_j` (rows no longer sum to one), the
    original prompt-to-prompt edit: `sum_j w_j p_j v_j` is attention over values scaled by `w`, so
    only `v` changes. Weights need `w >= 0` when renormalizing; any real `w` otherwise.

    Args:
      token_weights: {key position: weight}.
      renormalize: see above.
      batch_indices: batch entries to edit (others unchanged); None edits all.
      layers / kind: which layers edit, as in `AttentionMapStore`; default cross-attention only.
    """

    def __init__(self, token_weights, *, renormalize: bool = True, batch_indices=None, layers=None,
                 kind: str = "cross"):
        if not hasattr(token_weights, "items") or not token_weights:
            raise TypeError("token_weights must be a non-empty {key position: weight} mapping")
        weights = tuple(sorted((int(j), float(w)) for j, w in token_weights.items()))
        if renormalize and any(w < 0 for _, w in weights):
            raise ValueError(f"token_weights must be >= 0 with renormalize=True, got {dict(weights)}")
        self.token_weights = weights
        self.renormalize = bool(renormalize)
        self.batch_indices = None if batch_indices is None else frozenset(int(i) for i in batch_indices)
        self.layers = _check_layers(layers, kind)
        self.kind = kind

    def _weights(self, b, skv):
        rows = []
        for i in range(b):
            row = [1.0] * skv
            if self.batch_indices is None or i in self.batch_indices:
                for j, w in self.token_weights:
                    if not -skv <= j < skv:
                        raise ValueError(f"token position {j} out of range for {skv} keys")
                    row[j] = w
            rows.append(row)
        return rows

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 kv_lengths=None):
        q, k, v = _project(attn, hidden_states, encoder_hidden_states)
        if _selected(attn, self.layers, self.kind):
            b, skv = k.shape[0], k.shape[2]
            rows = self._weights(b, skv)
            ops = attn.ops
            if self.renormalize:
                with_log = [[math.log(w) if w > 0 else -math.inf for w in r] for r in rows]
                bias = ops.asarray(with_log, ops.zeros((1,)))[:, None, None, :]
                base = attn.mask_to_bias(attention_mask, kv_lengths, kv_len=skv)
                attention_mask = bias if base is None else base + bias
                kv_lengths = None  # folded into the bias
            else:
                v = v * ops.asarray(rows, v)[:, None, :, None]
        out = attn.attention_forward(q, k, v, attn_mask=attention_mask, kv_lengths=kv_lengths)
        return _output(attn, out)


class AttentionMapReplaceProcessor(AttnProcessorBase):
    """Prompt-to-prompt map replacement: inject source maps into a target pass.

    Call the model with `cross_attention_kwargs={"source_maps": {layer path: maps}}` (e.g. from an
    `AttentionMapStore(kind="cross", average_heads=False)` pass on the source prompt). Selected layers
    named in `source_maps` compute `out = P_source @ v_target`; maps may be `(b, n, sq, skv)` or
    head-averaged `(b, sq, skv)` (then used for every head). Other layers, and calls without
    `source_maps`, run `AttnProcessor`. The maps arrive as call arguments, so switching prompts or
    steps under `nnx.jit` does not retrace. The injected maps are materialized (`b*n*sq*skv`): meant
    for cross-attention, where `skv` is the text length.
    """

    def __init__(self, *, layers=None, kind: str = "cross"):
        self.layers = _check_layers(layers, kind)
        self.kind = kind

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 kv_lengths=None, source_maps=None):
        q, k, v = _project(attn, hidden_states, encoder_hidden_states)
        p = None
        if source_maps is not None and _selected(attn, self.layers, self.kind):
            p = source_maps.get(attn.layer_name)
        if p is None:
            out = attn.attention_forward(q, k, v, attn_mask=attention_mask, kv_lengths=kv_lengths)
            return _output(attn, out)
        b, n, sq, _ = q.shape
        skv = k.shape[2]
        want = [(b, n, sq, skv), (b, sq, skv)]
        if tuple(p.shape) not in want:
            raise ValueError(f"source_maps[{attn.layer_name!r}] must have shape (b, n, sq, skv) = "
                             f"{want[0]} or (b, sq, skv) = {want[1]}, got {tuple(p.shape)}")
        if len(p.shape) == 3:
            out = attn.ops.einsum("bqk,bnkd->bnqd", attn.ops.cast(p, v.dtype), v)
        else:
            out = attn.ops.einsum("bnqk,bnkd->bnqd", attn.ops.cast(p, v.dtype), v)
        return _output(attn, out)
