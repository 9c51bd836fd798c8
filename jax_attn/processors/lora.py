"""LoRA: trainable low-rank updates of an attention layer's projections, owned by the layer."""
from __future__ import annotations

from .base import AttnProcessorBase


class LoRAAttnProcessor(AttnProcessorBase):
    """Low-rank updates of the q, k, v and output projections: `W x + (alpha / r) * up(down(x))`.

    Per layer and target t in `targets`, trainable `to_{t}_lora_down (in, rank)` (normal, std
    1/rank, as diffusers) and `to_{t}_lora_up (rank, out)` (zeros, so a fresh LoRA is the identity
    edit). `alpha = network_alpha or rank`. The model's `cross_attention_kwargs={"scale": s}`
    scales the update at call time (diffusers' LoRA scale). Train with
    `nnx.grad(..., argnums=nnx.DiffState(0, nnx.Param))` and freeze the base weights by filtering
    on the parameter names (`nnx.PathContains("lora")`).
    """

    TARGETS = ("q", "k", "v", "out")

    def __init__(self, rank: int = 4, network_alpha: float | None = None, targets=TARGETS):
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
            raise ValueError(f"rank must be a positive int, got {rank!r}")
        targets = tuple(targets)
        bad = [t for t in targets if t not in self.TARGETS]
        if bad or not targets:
            raise ValueError(f"targets must be a non-empty subset of {self.TARGETS}, got {targets}")
        self.rank = rank
        self.network_alpha = network_alpha
        self.targets = targets

    def _dims(self, attn, t):
        if t == "q":
            return attn.query_dim, attn.inner_dim
        if t == "out":
            return attn.inner_dim, attn.query_dim
        return attn.cross_attention_dim, attn.inner_dim

    def setup(self, attn):
        for t in self.targets:
            d_in, d_out = self._dims(attn, t)
            attn.new_param(f"to_{t}_lora_down", (d_in, self.rank), init="normal", std=1.0 / self.rank)
            attn.new_param(f"to_{t}_lora_up", (self.rank, d_out), init="zeros")

    def _delta(self, attn, t, x, scale):
        ops = attn.ops
        down = ops.cast(attn.get_param(f"to_{t}_lora_down"), x.dtype)
        up = ops.cast(attn.get_param(f"to_{t}_lora_up"), x.dtype)
        factor = scale * (self.network_alpha or self.rank) / self.rank
        return ops.matmul(ops.matmul(x, down), up) * factor

    def _proj(self, attn, t, layer, x, scale):
        y = layer(x)
        return y + self._delta(attn, t, x, scale) if t in self.targets else y

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 kv_lengths=None, scale: float = 1.0):
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        q = attn.split_heads(self._proj(attn, "q", attn.to_q, hidden_states, scale))
        k = attn.split_heads(self._proj(attn, "k", attn.to_k, context, scale))
        v = attn.split_heads(self._proj(attn, "v", attn.to_v, context, scale))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        out = attn.merge_heads(attn.attention_forward(q, k, v, attn_mask=attention_mask,
                                                      kv_lengths=kv_lengths))
        return attn.to_out[1](self._proj(attn, "out", attn.to_out[0], out, scale))
