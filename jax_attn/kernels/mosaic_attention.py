"""Hopper flash attention in Pallas's Mosaic GPU dialect: the entry point and its custom VJP.

The kernels are split by role, as in tokamax:

* `mosaic_config.py`: what the kernels serve and how they are tuned (`MosaicConfig`,
  `default_config`, `head_dim_padded`, `FASTER_THAN_TRITON_SM90` (a view of
  `jax_attn/data/mosaic_routing.json`), `shape_bucket`, `unsupported`, `available`) and
  `MosaicCall` (formerly `_Static`, still an alias), the hashable description of one call.
* `mosaic_forward.py`: the forward kernel (one CTA = `MosaicConfig.compute_warpgroups`
  compute warpgroups, two by default, and a TMA producer, FlashAttention-3 style; its design is
  in that module's docstring).
* `mosaic_backward.py`: the dQ and dK/dV kernels.

This module holds the wrapper around them (padding, mask folding, slicing), the custom VJP that
ties the forward to the Mosaic or Triton backward, the sharding wrappers, and the public
`mosaic_attention(...)`. It re-exports the names other modules import from it.

Masking follows `jax_attn.kernels.flash_attention` (and `jax_attn.reference`): a dropped key
gets the logit -inf, never a large finite number; a row with no key keeps `l == 0` and returns
zeros and `lse = -inf`, and the running max is guarded so no `-inf - -inf` reaches `exp2`.
Every dropped key arrives through ONE float32 key-bias vector `(b|1, n|1, skv_padded)` of 0/-inf
built in the wrapper: the per-key bool mask, `kv_lengths`, and the padded key tail all fold into
it, so the kernel has a single masked code path and, when nothing is masked (aligned lengths, no
mask), a path with no mask arithmetic at all.

What the wrapper pads (never the caller): wgmma wants swizzled rows and a contraction dim that
is a multiple of 16, so head dims are run at 64, 128 or 256 (80 and 96 -> 128; 40 -> 64, or in
the forward 48 with `MosaicConfig.narrow_head_dim`, the default there, on 32-byte swizzled rows;
zero columns change neither Q K^T nor the kept columns of P V); query rows are padded to a
multiple of `compute_warpgroups * block_q` and keys to a multiple of `block_kv` (the key tail is
masked through the key bias; padded query rows are sliced off). Shapes that are already aligned
are not copied.

Backward (`backward="auto"`, the default: "mosaic" for head dims up to 128, else "triton"): two
Mosaic GPU kernels of the forward's default CTA shape (two compute warpgroups of 64 rows, one
TMA producer streaming a ring of `MosaicConfig.bwd_stages` slots): dQ over query tiles, and dK/dV
over key tiles of each k/v head with the group's query heads streamed in turn (GQA sums stay in
registers); see `mosaic_backward.py`. delta = rowsum(dO * O) - dlse and the base-2 lse are
computed in XLA before the kernels. At d > 128 the dK and dV accumulators would not fit in
registers, so there (and with `backward="triton"`) the Triton dK/dV and dQ kernels of
`jax_attn.kernels.flash_attention` run, fed with this forward's output and lse (same masking
conventions, same gradients).

Interpret mode (`interpret=True`, the CPU tests): Mosaic GPU's interpreter runs the same kernel
body (grid, warpgroup threads, TMA copies, barriers with their phase checks, the index
arithmetic, the online softmax and the epilogue), but it cannot run wgmma with a register operand
or a transposed shared-memory view, nor `layout_cast`; there the two matmuls are plain
`lax.dot_general` on the shared-memory tiles and layout casts are skipped. See
`tests/test_mosaic.py` for what that does and does not prove.

Measurements (against cuDNN and our Triton kernels, forward and backward) are in
`benchmarks/results/`: `2026-11-23-h100-mosaic-grid/README.md` (the current kernel, with what was
tried and not kept and what the profile says still separates the 16k forward from cuDNN),
`2026-11-23-h100-mosaic-bwd/README.md` (the backward) and `2026-11-23-h100-mosaic.md` (the
buckets where the `pallas` backend picks Mosaic over Triton: `jax_attn/data/mosaic_routing.json`).
"""
from __future__ import annotations

import dataclasses  # noqa: F401 (kept: a module attribute before the split)
import functools
import importlib
import logging
import math

import jax
import jax.numpy as jnp
from jax import lax  # noqa: F401 (kept: a module attribute before the split)

from ..arrays import pad_to
from . import configs, sharding
# Re-exported: `jax_attn.backends.pallas`, the benchmarks and the tests read these from here.
from .mosaic_backward import (  # noqa: F401
    BWD_BLOCK, _bwd_common, _dkdv_call, _dq_call, _mm, _produce)
from .mosaic_config import (  # noqa: F401
    _IMPORT_ERROR, FASTER_THAN_TRITON_SM90, LN2, LOG2E, MosaicCall, MosaicConfig, _grid, _Static,
    available, default_config, head_dim_padded, pl, plgpu, shape_bucket, smem_swizzle, unsupported)
from .mosaic_forward import _fwd_call  # noqa: F401

_triton = importlib.import_module(__package__ + ".flash_attention")  # the module, not the function

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Wrapper: padding, mask folding, slicing


def _forward(st: MosaicCall, q, k, v, key_bias, kv_lengths):
    """key_bias: the caller's per-key mask as (b|1, n|1, skv) float32 0/-inf, or None."""
    s_axis = 2 if st.layout == "bnsd" else 1
    qp = pad_to(pad_to(q, 3, st.fwd_dp), s_axis, st.sq_pad)
    kp = pad_to(pad_to(k, 3, st.fwd_dp), s_axis, st.skv_pad)
    vp = pad_to(pad_to(v, 3, st.fwd_dp), s_axis, st.skv_pad)
    kb = None
    if st.key_bias_dims is not None:
        kb = _kernel_key_bias(st, key_bias, kv_lengths, q.shape[0])
    out, lse = _fwd_call(st, qp, kp, vp, kb)
    if st.layout == "bnsd":
        out = out[:, :, :st.sq, :st.d]
    else:
        out = out[:, :st.sq, :, :st.d]
    return out, lse[:, :, :st.sq]


def _mosaic_backward(st, q, k, v, key_bias, kv_lengths, out, lse, do, dlse):
    bnsd = st.layout == "bnsd"
    s_axis = 2 if bnsd else 1
    delta = jnp.einsum("bnsd,bnsd->bns" if bnsd else "bsnd,bsnd->bns",
                       out.astype(jnp.float32), do.astype(jnp.float32)) - dlse.astype(jnp.float32)
    lse2 = jnp.where(jnp.isneginf(lse), jnp.inf, lse * LOG2E)
    t = 2 * BWD_BLOCK
    sq_pad, skv_pad = -(-st.sq // t) * t, -(-st.skv // t) * t
    lse2 = jnp.pad(lse2, ((0, 0), (0, 0), (0, sq_pad - st.sq)), constant_values=jnp.inf)
    delta = pad_to(delta, 2, sq_pad)
    qp, dop = (pad_to(pad_to(x, 3, st.dp), s_axis, sq_pad) for x in (q, do))
    kp, vp = (pad_to(pad_to(x, 3, st.dp), s_axis, skv_pad) for x in (k, v))
    kb = None
    if st.key_bias_dims is not None:
        kb = _kernel_key_bias(st, key_bias, kv_lengths, q.shape[0], skv_pad)
    if st.config.bwd_fused:
        dk, dv, dq = _dkdv_call(st, qp, kp, vp, dop, lse2, delta, kb, sq_pad, skv_pad,
                                with_dq=True)
        dq = dq.astype(q.dtype)
    else:
        dq = _dq_call(st, qp, kp, vp, dop, lse2, delta, kb, sq_pad, skv_pad)
        dk, dv = _dkdv_call(st, qp, kp, vp, dop, lse2, delta, kb, sq_pad, skv_pad)
    if bnsd:
        return dq[:, :, :st.sq, :st.d], dk[:, :, :st.skv, :st.d], dv[:, :, :st.skv, :st.d]
    return dq[:, :st.sq, :, :st.d], dk[:, :st.skv, :, :st.d], dv[:, :st.skv, :, :st.d]


def _kernel_key_bias(st, key_bias, kv_lengths, batch, size=None):
    """One (b|1, n|1, size) 0/-inf vector: caller mask, kv_lengths and the padded tail."""
    size = st.skv_pad if size is None else size
    cols = jnp.arange(size)
    keep = (cols < st.skv)[None, None, :]
    if kv_lengths is not None:
        keep = keep & (cols[None, None, :] < kv_lengths[:, None, None])
    kb = jnp.where(keep, 0.0, -jnp.inf).astype(jnp.float32)
    if key_bias is not None:
        kb = kb + pad_to(key_bias.astype(jnp.float32), 2, size)
    want = (batch if st.key_bias_dims[0] else 1, kb.shape[1] if st.key_bias_dims[1] else 1, size)
    return jnp.broadcast_to(kb, want)


def _triton_static(st: MosaicCall, dtype):
    cc = _triton._compute_capability(st.interpret)
    return _triton.KernelCall(
        scale=st.scale, causal=False, layout=st.layout, sq=st.sq, skv=st.skv, d=st.d, dv=st.d,
        groups=st.groups, has_kv_lengths=st.has_kv_lengths,
        key_bias_dims=st.orig_key_bias_dims, bias_dims=None,
        config=configs.get_config(st.d, jnp.dtype(dtype).name, cc), interpret=st.interpret)


def _operands(st):
    """The optional operands the wrapped calls get (for the sharding rules): no full bias."""
    return {"key_bias": st.orig_key_bias_dims is not None, "bias": False,
            "len": st.has_kv_lengths}


# The calls as the partitioner sees them: batch/head-sharded inputs run shard by shard
# (kernels/sharding.py); the Triton backward is already wrapped in flash_attention.py. The Mosaic
# GPU interpreter runs ordered IO callbacks, which custom_partitioning cannot lower, so interpret
# mode calls the kernels directly (tests/test_pallas_sharding.py checks these operand roles).
def _unless_interpreting(local, kind):
    wrapped = sharding.partitioned(local, kind, _operands)
    return lambda st, *args: (local if st.interpret else wrapped)(st, *args)


_forward_sharded = _unless_interpreting(_forward, "fwd")
_mosaic_backward_sharded = _unless_interpreting(_mosaic_backward, "bwd")


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _mosaic_flash(st, q, k, v, key_bias, kv_lengths):
    return _forward_sharded(st, q, k, v, key_bias, kv_lengths)


def _mosaic_flash_fwd(st, q, k, v, key_bias, kv_lengths):
    out, lse = _forward_sharded(st, q, k, v, key_bias, kv_lengths)
    return (out, lse), (q, k, v, key_bias, kv_lengths, out, lse)


def _mosaic_flash_bwd(st, res, cotangents):
    q, k, v, key_bias, kv_lengths, out, lse = res
    do, dlse = cotangents
    if st.backward == "mosaic":
        dq, dk, dv = _mosaic_backward_sharded(st, q, k, v, key_bias, kv_lengths, out, lse, do, dlse)
        return dq, dk, dv, None, None
    # The Triton backward kernels, given this forward's out and lse (see the module docstring).
    dq, dk, dv = _triton._backward_sharded(_triton_static(st, q.dtype), q, k, v, key_bias, None,
                                           kv_lengths, out, lse, do, dlse)
    return dq, dk, dv, None, None


_mosaic_flash.defvjp(_mosaic_flash_fwd, _mosaic_flash_bwd)


def mosaic_attention(q, k, v, *, kv_lengths=None, key_mask=None, scale=None, layout="bnsd",
                     return_lse=False, config=None, interpret=False, backward="auto"):
    """Flash attention on Hopper through Mosaic GPU (differentiable in q, k, v and the lse).

    q `(b, n, sq, d)`, k and v `(b, n_kv, skv, d)` (or `(b, s, n, d)` with `layout="bsnd"`),
    bfloat16 or float16, `d <= 256`, `n % n_kv == 0`. `key_mask`: bool (True = attend)
    broadcastable to `(b, 1|n, 1, skv)` (read as a vector per batch/head). `kv_lengths (b,)`:
    keys at or past it are padding. Returns `out` (q's layout and dtype) and, with `return_lse`, the
    float32 natural log-sum-exp `(b, n, sq)` (-inf for a row with no key). `backward`: "mosaic"
    (the Mosaic GPU dQ and dK/dV kernels, head dims up to 128), "triton" (the Triton kernels fed
    with this forward's lse), or "auto" (default: mosaic where it can, else triton).
    """
    if backward not in ("auto", "triton", "mosaic"):
        raise ValueError(f"backward must be 'auto', 'triton' or 'mosaic', got {backward!r}")
    if _IMPORT_ERROR is not None:
        raise RuntimeError(f"Mosaic GPU Pallas is unavailable: {_IMPORT_ERROR}")
    if layout not in ("bnsd", "bsnd"):
        raise ValueError(f"layout must be 'bnsd' or 'bsnd', got {layout!r}")

    def bnsd(shape):
        return tuple(shape) if layout == "bnsd" else (shape[0], shape[2], shape[1], shape[3])

    b, n, sq, d = bnsd(q.shape)
    _, n_kv, skv, _ = bnsd(k.shape)
    why = unsupported(dtype=q.dtype, d=d, dv=v.shape[-1], has_full_bias=False, is_causal=False)
    if why:
        raise ValueError("mosaic_attention cannot serve these inputs: " + "; ".join(why))
    if n % n_kv:
        raise ValueError(f"q heads ({n}) must be a multiple of k/v heads ({n_kv})")
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)

    key_bias = None
    if key_mask is not None:
        km = jnp.asarray(key_mask)
        km = km.reshape((1,) * (4 - km.ndim) + km.shape)
        if km.shape[2] != 1:
            raise ValueError(f"key_mask must be broadcastable to (b, 1|n, 1, skv), got {km.shape}")
        if km.shape[0] not in (1, b) or km.shape[1] not in (1, n) or km.shape[3] not in (1, skv):
            raise ValueError(f"key_mask {km.shape} is not broadcastable to ({b}, {n}, 1, {skv})")
        km = km[:, :, 0, :]
        km = jnp.broadcast_to(km, km.shape[:2] + (skv,))
        key_bias = jnp.where(km, 0.0, -jnp.inf).astype(jnp.float32)
    if kv_lengths is not None:
        kv_lengths = jnp.asarray(kv_lengths, jnp.int32)

    if backward == "auto":  # measured faster than the Triton backward (module docstring)
        backward = "mosaic" if head_dim_padded(d) <= 128 else "triton"
    if backward == "mosaic" and head_dim_padded(d) > 128:
        raise ValueError(f"backward='mosaic' takes head dims up to 128 (dK and dV accumulators "
                         f"of 64x{head_dim_padded(d)} float32 would not fit in registers), got {d}")
    cfg = config or default_config(d)
    skv_pad = -(-skv // cfg.block_kv) * cfg.block_kv
    orig_dims = None if key_bias is None else (key_bias.shape[0] != 1, key_bias.shape[1] != 1)
    if orig_dims is not None or kv_lengths is not None or skv_pad != skv:
        kdims = (bool(orig_dims and orig_dims[0]) or kv_lengths is not None,
                 bool(orig_dims and orig_dims[1]))
    else:
        kdims = None
    log.debug("mosaic_attention %s d=%d sq=%d skv=%d: %s, backward=%s", jnp.dtype(q.dtype).name,
              d, sq, skv, cfg, backward)
    st = MosaicCall(scale=scale, layout=layout, sq=sq, skv=skv, d=d, groups=n // n_kv,
                 key_bias_dims=kdims, orig_key_bias_dims=orig_dims,
                 has_kv_lengths=kv_lengths is not None, config=cfg, interpret=bool(interpret),
                 backward=backward)
    out, lse = _mosaic_flash(st, q, k, v, key_bias, kv_lengths)
    return (out, lse) if return_lse else out
