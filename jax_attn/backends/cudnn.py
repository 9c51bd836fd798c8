"""`cudnn`: cuDNN's fused flash attention, reached through JAX.

JAX's own cuDNN binding also reads `(b, n, s, d)` (its `qkv_layout="BNTH"`), so neither layout
costs a transpose. It is private API, so it is used only when it has the signature we expect;
otherwise `jax.nn.dot_product_attention(implementation="cudnn")` runs, with transposes for
`bnsd`, and that fallback is logged once.

JAX's binding refuses odd sq or skv whenever the call is differentiated (it always passes a bias
operand, and cuDNN's backward with a bias needs even lengths), which would rule out the 77-token
text-encoder keys of cross-attention. So an odd length is padded by one: a masked key (through
`kv_lengths`), or a query row that is sliced off.

Segment ids (packed sequences) are folded into the one bias cuDNN takes, exactly as a bool mask
is: the `(sq, skv)` bias is materialized for any mask already.
"""
from __future__ import annotations

import functools
import inspect
import logging

import jax
import jax.numpy as jnp

from ..arrays import pad_to
from ..inputs import AttentionInputs
from ..masking import EmptyRows
from .base import Backend, gpu_compute_capability

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=None)
def _binding():
    """JAX's cuDNN binding if it has the arguments we use, else None (with the reason logged)."""
    try:
        from jax._src.cudnn import fused_attention_stablehlo as binding
        params = inspect.signature(binding.dot_product_attention).parameters
        missing = ({"qkv_layout", "mask_type", "return_residual", "q_seqlen", "kv_seqlen",
                    "sliding_window_length"} - set(params))
        if missing:
            raise ImportError(f"its signature lacks {sorted(missing)}")
        return binding
    except Exception as e:  # private API: any change of it means "use the public one"
        log.warning("cudnn: JAX's cuDNN binding is unusable (%s); using jax.nn.dot_product_attention "
                    "with transposes for the bnsd layout", e)
        return None


@functools.lru_cache(maxsize=None)
def _cudnn_version() -> int | None:
    try:
        from jax._src.lib import cuda_versions
        return cuda_versions.cudnn_get_version() if cuda_versions else None
    except Exception:
        return None


class CuDNN(Backend):
    name = "cudnn"
    description = "cuDNN fused flash attention via JAX (fp16/bf16, sm80+)"
    platforms = ("gpu",)
    dtypes = ("float16", "bfloat16")
    head_dim_multiple = 8
    value_dim_differs = False
    supports_lse_grad = False  # cuDNN's VJP ignores a cotangent on the log-sum-exp
    supports_window = True  # only a left window with causality: see `reasons`
    supports_segment_ids = True  # folded into its bias, as a bool mask

    @property
    def head_dims(self):
        cc = gpu_compute_capability()
        return (8, 256 if cc and cc >= (9, 0) else 128)

    def unavailable(self):
        why = super().unavailable()
        if why:
            return why
        cc = gpu_compute_capability()
        if cc is None:
            return ["needs an NVIDIA GPU (compute capability unknown)"]
        if cc < (8, 0):
            return [f"needs an sm80+ GPU (Ampere or newer); this one is sm{cc[0]}{cc[1]}"]
        if _cudnn_version() is None:
            return ["cuDNN is not installed with jaxlib"]
        return []

    def reasons(self, spec, needs=None):
        why = super().reasons(spec, needs)
        if spec.window is not None:
            left, right = spec.window_bounds
            # cuDNN's sliding window is "the last `left + 1` keys up to the query" (causal).
            if right != 0 or left is None:
                why.append("local_window_size: cuDNN takes only a bounded left window with causal "
                           "masking (right = 0 or is_causal=True)")
            elif (spec.mask_kind != "none" or spec.has_kv_lengths or spec.has_segment_ids
                  or spec.q_len % 2 or spec.kv_len % 2):
                why.append("local_window_size: cuDNN's sliding window is used only without masks, "
                           "kv_lengths, segment ids or odd lengths here")
            elif spec.q_len > spec.kv_len:
                why.append("local_window_size with more queries than keys (rows with no key)")
        return why

    def _forward(self, inputs, return_lse):
        spec = inputs.spec
        if spec.q_len % 2 or spec.kv_len % 2:
            return self._forward_padded(inputs, return_lse)
        fix = EmptyRows.fix(spec, inputs.mask, inputs.kv_lengths, inputs.segments)
        bias = None
        if fix.mask is not None:  # masks and segments: cuDNN takes one bias of full (sq, skv) extent
            mask = fix.mask
            full = jnp.broadcast_shapes(mask.shape, (1, 1, spec.q_len, spec.kv_len))
            bias = jnp.where(jnp.broadcast_to(mask, full), 0.0, -0.7 * float(jnp.finfo(inputs.q.dtype).max))
            if fix.bias is not None:
                bias = bias + fix.bias
            bias = bias.astype(inputs.q.dtype)
        binding = _binding()
        if binding is None:
            res = self._public(inputs, bias, fix.kv_lengths, return_lse)
        else:
            res = self._private(binding, inputs, bias, fix.kv_lengths, return_lse)
        out, lse = res if return_lse else (res, None)
        out, lse = fix.zero(out, lse, spec.layout)
        return (out, lse) if return_lse else out

    def _forward_padded(self, inputs, return_lse):
        """Pad odd sq / skv to even (see the module docstring), run, and cut the padding off."""
        spec = inputs.spec
        seq_axis = 2 if spec.layout == "bnsd" else 1
        pad_q, pad_k = spec.q_len % 2, spec.kv_len % 2

        def pad(x, axis, n):  # n more rows at the end of `axis`
            return pad_to(x, axis, x.shape[axis] + n)

        q = pad(inputs.q, seq_axis, pad_q)
        k, v = pad(inputs.k, seq_axis, pad_k), pad(inputs.v, seq_axis, pad_k)
        kv_lengths = inputs.kv_lengths
        if pad_k and kv_lengths is None:
            kv_lengths = jnp.full((spec.batch,), spec.kv_len, jnp.int32)
        mask = inputs.mask
        if mask is not None:
            mask = pad(mask, 2, pad_q if mask.shape[2] > 1 else 0)
            mask = pad(mask, 3, pad_k if mask.shape[3] > 1 else 0)
        q_ids = kv_ids = None
        if inputs.segments is not None:  # the padded query is cut off, the padded key dropped
            q_ids, kv_ids = pad(inputs.q_segment_ids, 1, pad_q), pad(inputs.kv_segment_ids, 1, pad_k)
        padded = AttentionInputs.build(q, k, v, attn_mask=mask, kv_lengths=kv_lengths, scale=spec.scale,
                                       is_causal=spec.is_causal, layout=spec.layout,
                                       local_window_size=spec.window, q_segment_ids=q_ids,
                                       kv_segment_ids=kv_ids)
        res = self._forward(padded, return_lse)
        out, lse = res if return_lse else (res, None)
        out = jax.lax.slice_in_dim(out, 0, spec.q_len, axis=seq_axis)
        return (out, lse[..., : spec.q_len]) if return_lse else out

    @staticmethod
    def _private(binding, inputs, bias, kv_lengths, return_lse):
        spec = inputs.spec
        mask_type = binding.MaskType.NO_MASK
        q_seqlen = None
        causal = spec.window_bounds is not None and spec.window_bounds[1] == 0
        window = None if spec.window is None else spec.window_bounds[0] + 1
        if kv_lengths is not None:
            q_seqlen = jnp.full((spec.batch,), spec.q_len, jnp.int32)
            mask_type = binding.MaskType.PADDING_CAUSAL if causal else binding.MaskType.PADDING
        elif causal:
            mask_type = binding.MaskType.CAUSAL
        res = binding.dot_product_attention(
            inputs.q, inputs.k, inputs.v, bias=bias, q_seqlen=q_seqlen, kv_seqlen=kv_lengths,
            scale=spec.scale, mask_type=mask_type, return_residual=return_lse,
            qkv_layout="BNTH" if spec.layout == "bnsd" else "BTNH", sliding_window_length=window)
        if return_lse:  # cuDNN returns the lse as (b, n, sq) whatever the layout
            out, lse = res
            return out, lse.astype(jnp.float32)
        return res

    @staticmethod
    def _public(inputs, bias, kv_lengths, return_lse):
        spec = inputs.spec
        q, k, v = inputs.bsnd()
        res = jax.nn.dot_product_attention(
            q, k, v, bias=bias, scale=spec.scale, is_causal=spec.is_causal,
            key_value_seq_lengths=kv_lengths, implementation="cudnn", return_residual=return_lse,
            local_window_size=None if spec.window is None else (spec.window_bounds[0], 0))
        if return_lse:
            out, lse = res
            return inputs.from_bsnd(out), jnp.swapaxes(lse, 1, 2).astype(jnp.float32)
        return inputs.from_bsnd(res)
