"""The processor base class, the default processor, and the steps every built-in one shares.

`_project` (q, k, v with the module's norms) and `_output` (merge heads, project out, dropout) are
the two halves of diffusers' attention around the attention itself.
"""
from __future__ import annotations


class AttnProcessorBase:
    """Optional base: `setup(attn)` to create per-layer state, and freezing once attached."""

    _frozen = False

    def setup(self, attn) -> None:
        """Called once for each layer this processor is attached to; create state here."""

    def freeze(self) -> None:
        object.__setattr__(self, "_frozen", True)

    def __setattr__(self, name, value):
        if self._frozen:
            raise AttributeError(
                f"{type(self).__name__} is attached to attention layers and is frozen (it is static "
                f"under nnx.jit): build a new processor and set it, instead of setting {name!r}")
        object.__setattr__(self, name, value)

    def __repr__(self):
        items = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({items})"


def _project(attn, hidden_states, encoder_hidden_states):
    """q, k, v in (b, n, s, d), with the module's optional q/k norms."""
    context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
    q = attn.split_heads(attn.to_q(hidden_states))
    k = attn.split_heads(attn.to_k(context))
    v = attn.split_heads(attn.to_v(context))
    if attn.norm_q is not None:
        q = attn.norm_q(q)
    if attn.norm_k is not None:
        k = attn.norm_k(k)
    return q, k, v


def _output(attn, out):
    """(b, n, sq, d) -> merged heads -> output projection -> dropout."""
    return attn.to_out[1](attn.to_out[0](attn.merge_heads(out)))


class AttnProcessor(AttnProcessorBase):
    """The default: project, `attn.attention_forward` (routed to the module's backend), project out."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 kv_lengths=None):
        q, k, v = _project(attn, hidden_states, encoder_hidden_states)
        out = attn.attention_forward(q, k, v, attn_mask=attention_mask, kv_lengths=kv_lengths)
        return _output(attn, out)
