"""The ring's per-block backward from the global statistics: no forward recomputed, no lse gradient.

Ring attention's output is `out = sum_j P_j V_j` with `P_j = exp(S_j - lse)` over key block j and
the *global* `lse` the forward's merge produced. So block j's share of the gradients needs only
that block, the global `out`, `lse` and the output cotangent, exactly as a flash-attention
backward kernel does for the whole sequence:

    dV_j = P_j^T dO,   dP_j = dO V_j^T,   dS_j = P_j * (dP_j - delta),   delta = rowsum(dO * out) - dlse
    dQ  += scale dS_j K_j,   dK_j = scale dS_j^T Q,   dbias_j = dS_j

(`dlse`, the cotangent of the returned lse, enters through `delta` because d lse / d S_j = P_j.)
This is the standard ring-attention backward: one backward per block, with `delta` computed once.

The alternative the ring falls back to (`ring._recompute_grads`) recomputes each block's forward
and pulls gradients back through its *local* `(out_j, lse_j)`, which needs a backend whose lse is
differentiable, and costs a forward more per block.

`STATS_BACKWARDS` maps a backend name to its block backward `(inputs, out, lse, d_out, delta,
mask_shape) -> (dq, dk, dv, dmask)` (float32, the caller's layout; `dmask` summed to `mask_shape`,
or None when `mask_shape` is None). `inputs` is the block's local call exactly as the ring's
forward ran it (`ring._Ring.inputs`): the block's mask columns and kv_lengths, and its causal
offset as `is_causal` (diagonal blocks) or as an explicit mask from global positions (unequal
blocks), so a block backward that honours `inputs` honours the offsets. Registered here:
- `naive`, `xla`: the jnp formulation above (they hold the score matrix anyway; per block it is
  `(b, n, s/P, s/P)`);
- `pallas`: the Triton kernels' dK/dV + dQ backward (`flash_attention_backward`) fed the global
  `out` and `lse`, what `flash_attention`'s VJP does with its own residuals.
- `cudnn`: cuDNN's backward kernel through JAX's private custom-VJP rule, whose residuals are
  the softmax statistic (the natural-log lse) and the forward's output: fed the global ones, it
  returns block j's share. It forms `delta` from `out` alone, so it serves only calls whose lse
  has no cotangent, and only the blocks verified on an H200 (plain and causal-diagonal, one k/v
  head per query head, equal even block lengths; `benchmarks/ring_cudnn_probe.py`): 1.43x faster than
  `pallas`'s at 16k tokens, d = 128.
`STATS_REFUSALS` says, per backend, why its block backward cannot serve a block (None when it
can); a refused block takes the block backward of the backend routing gives for lse gradients
(`ring._stats_backend`), as a backend with none does.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from .. import masking
from ..backends.naive import _precision
from ..backends.pallas import interpreting
from ..kernels.flash_attention import flash_attention_backward


def delta(out, d_out, d_lse, layout):
    """`rowsum(dO * out) - dlse`, float32 `(b, n, sq)`; `d_lse` None means no lse cotangent."""
    dot = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), -1)
    dot = dot if layout == "bnsd" else jnp.swapaxes(dot, 1, 2)
    return dot if d_lse is None else dot - d_lse.astype(jnp.float32)


def _sum_to(x, shape):
    """A full-size gradient summed over the broadcast (size-1) dims of `shape`."""
    axes = tuple(a for a, (n, m) in enumerate(zip(shape, x.shape)) if n == 1 and m != 1)
    return x.sum(axes, keepdims=True)


def jnp_block_grads(inputs, out, lse, d_out, delta, mask_shape):
    """Block gradients in jnp (module docstring), float32; materializes the block's scores."""
    spec = inputs.spec
    q, k, v = inputs.bnsd()
    to_bnsd = inputs.from_bnsd  # its own inverse: a swap of axes 1 and 2, or nothing
    out, d_out = to_bnsd(out), to_bnsd(d_out)
    b, n, sq, d = q.shape
    h, g, skv = spec.kv_heads, spec.groups, spec.kv_len
    prec = _precision(q.dtype)
    f32 = jnp.float32
    qg = q.reshape(b, h, g, sq, d)
    s = jnp.einsum("bhgqd,bhkd->bhgqk", qg, k, precision=prec, preferred_element_type=f32)
    s = s.reshape(b, n, sq, skv) * spec.scale
    keep, bias = masking.keep_and_bias(spec, inputs.mask, inputs.kv_lengths, jnp.arange(sq), jnp.arange(skv),
                                       segments=inputs.segments)
    s = masking.masked_logits(s, keep, bias)
    # Rows with no key anywhere have lse = -inf and take no gradient; a kept key's weight is its
    # global softmax probability.
    finite = ~jnp.isneginf(lse)[..., None]
    p = jnp.exp(s - jnp.where(finite, lse[..., None], 0.0))
    p = jnp.where(finite if keep is None else finite & keep, p, 0.0)
    do = d_out.astype(f32)
    pg, dog = p.reshape(b, h, g, sq, skv), do.reshape(b, h, g, sq, -1)
    dv = jnp.einsum("bhgqk,bhgqe->bhke", pg, dog, precision=jax.lax.Precision.HIGHEST)
    dp = jnp.einsum("bhgqe,bhke->bhgqk", dog, v.astype(f32), precision=jax.lax.Precision.HIGHEST)
    ds = pg * (dp - delta.reshape(b, h, g, sq)[..., None])
    dq = jnp.einsum("bhgqk,bhkd->bhgqd", ds, k.astype(f32), precision=jax.lax.Precision.HIGHEST)
    dk = jnp.einsum("bhgqk,bhgqd->bhkd", ds, qg.astype(f32), precision=jax.lax.Precision.HIGHEST)
    dq = dq.reshape(b, n, sq, d) * spec.scale
    dk = dk * spec.scale
    dmask = None if mask_shape is None else _sum_to(ds.reshape(b, n, sq, skv), mask_shape)
    return to_bnsd(dq), to_bnsd(dk), to_bnsd(dv), dmask


def pallas_block_grads(inputs, out, lse, d_out, delta, mask_shape):
    """Block gradients by the Triton kernels' backward (`flash_attention_backward`), float32.

    The block's masks reach the kernel as the `pallas` backend's forward passes them
    (`Pallas._forward`): a per-key bool mask as `key_mask`, a full bool mask as a 0/-inf bias, a
    float mask as the bias (differentiated when `mask_shape` asks for its gradient). An "offset"
    block's causal mask is already folded into `inputs.mask`, a diagonal block is `is_causal`.

    Where `pallas` runs the Mosaic GPU kernel for the forward (Hopper self-attention), this still
    runs the Triton backward: both compute the same function and the backward needs only the
    global `out` and `lse`, not the forward's residuals, so mixing them is exact.
    """
    spec = inputs.spec
    bias = key_mask = None
    if spec.mask_kind == "bool" and spec.per_key_mask:
        key_mask = inputs.mask
    elif spec.mask_kind == "bool":
        bias = jnp.where(inputs.mask, 0.0, -jnp.inf).astype(jnp.bfloat16)  # as the forward: exact
    elif spec.mask_kind == "bias":
        # Upcast (exact: same logits) when differentiated, so that the kernel's dS sums are not
        # rounded to a half-precision bias dtype before the ring sums them further.
        bias = inputs.mask if mask_shape is None else inputs.mask.astype(jnp.float32)
    segments = {}
    if inputs.segments is not None:
        segments = dict(q_segment_ids=inputs.q_segment_ids, kv_segment_ids=inputs.kv_segment_ids)
    # The kernel forms delta = rowsum(dO * out) - d_lse itself; the ring computed it once for all
    # blocks, so hand it the d_lse that reproduces it (one rounding; an (s/P,) row op per block).
    dot = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), -1)
    dot = dot if spec.layout == "bnsd" else jnp.swapaxes(dot, 1, 2)
    want_dmask = mask_shape is not None
    dq, dk, dv, dbias = flash_attention_backward(
        inputs.q, inputs.k, inputs.v, out, lse, d_out, dot - delta, bias=bias, key_mask=key_mask,
        kv_lengths=inputs.kv_lengths, is_causal=spec.is_causal, window=spec.window,
        scale=spec.scale, layout=spec.layout, interpret=interpreting(), bias_grad=want_dmask,
        **segments)
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    dmask = _sum_to(f32(dbias), mask_shape) if want_dmask else None
    return f32(dq), f32(dk), f32(dv), dmask


_CUDNN_RULE_PARAMS = ("scale", "seed", "dropout_rate", "variadic_args", "mask_type", "layout",
                      "sliding_window_length", "is_training", "return_residual", "res",
                      "grad_output")


@functools.lru_cache(maxsize=None)
def _cudnn_rule():
    """JAX's private cuDNN attention module when its backward rule has the signature used here,
    else None (private API: any change means "use another block backward")."""
    try:
        import inspect

        from jax._src.cudnn import fused_attention_stablehlo as F
        params = tuple(inspect.signature(F._dot_product_attention_bwd_rule).parameters)
        return F if params == _CUDNN_RULE_PARAMS else None
    except Exception:  # noqa: BLE001 - absent or changed
        return None


def cudnn_stats_refusal(spec, lse_cotangent: bool) -> str | None:
    """Why `cudnn_block_grads` cannot serve this block (None when it can)."""
    if lse_cotangent:
        return "the lse is returned (cuDNN's backward forms delta from out alone)"
    if (spec.mask_kind != "none" or spec.has_kv_lengths or spec.has_q_lengths
            or spec.has_segment_ids or spec.window is not None):
        return "a mask, lengths, a window or segment ids (verified: plain and causal blocks)"
    if spec.groups != 1:
        return "grouped k/v heads (verified: one k/v head per query head)"
    if spec.q_len != spec.kv_len:
        return "unequal query and key blocks (verified: equal ones)"
    if spec.q_len % 2:
        return "odd block lengths"
    if _cudnn_rule() is None:
        return "JAX's private cuDNN backward rule is absent or has another signature"
    return None


def cudnn_block_grads(inputs, out, lse, d_out, delta, mask_shape):
    """Block gradients by cuDNN's backward kernel fed the global `out` and `lse`, float32.

    Only for blocks `cudnn_stats_refusal` accepts: the kernel forms `rowsum(dO * out)` itself,
    which is `delta` when the lse has no cotangent (so `delta` is not read), and there is no mask
    whose gradient `mask_shape` could ask for."""
    del delta, mask_shape
    F = _cudnn_rule()
    spec = inputs.spec
    q, k, v = inputs.q, inputs.k, inputs.v
    layout = (F.AttentionLayout.BNTH if spec.layout == "bnsd" else F.AttentionLayout.BTNH).value
    mask_type = F.MaskType.CAUSAL if spec.is_causal else F.MaskType.NO_MASK
    none = jnp.zeros(0, q.dtype)  # bias, lengths, offsets, page tables: absent
    res = (q, k, v) + (none,) * 7 + (lse.astype(jnp.float32), out.astype(q.dtype))
    grads = F._dot_product_attention_bwd_rule(
        spec.scale, 0, 0.0, (False, False), mask_type, layout, None, True, False, res,
        d_out.astype(q.dtype))
    return tuple(g.astype(jnp.float32) for g in grads[:3]) + (None,)


STATS_BACKWARDS = {"naive": jnp_block_grads, "xla": jnp_block_grads, "pallas": pallas_block_grads,
                   "cudnn": cudnn_block_grads}
STATS_REFUSALS = {"cudnn": cudnn_stats_refusal}


def stats_refusal(name: str, spec, lse_cotangent: bool) -> str | None:
    """Why backend `name`'s block backward cannot serve this block (None when it can)."""
    if name not in STATS_BACKWARDS:
        return "no block backward from global statistics"
    refusal = STATS_REFUSALS.get(name)
    return None if refusal is None else refusal(spec, lse_cotangent)
