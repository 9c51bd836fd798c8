"""Flash attention in Pallas with the Triton lowering: the entry point and its custom VJP.

The kernels are split by role:

* `flash_call.py`: `KernelCall` (formerly `_Static`, still an alias here), the static
  description of one call, its block sizes, and which tiles a call runs (window / kv_lengths
  block ranges, segment-id ranges).
* `flash_tiles.py`: what the kernels share inside a tile (masked loads, element masks, bias
  terms, the key-block loop) and the BlockSpecs that read inputs in place.
* `flash_forward.py`: the forward kernel (online softmax, FlashAttention-2).
* `flash_backward.py`: the dK/dV and dQ kernels.

This module validates and folds the caller's masks, picks the tuned config, and ties forward and
backward together in a custom VJP under the sharding wrappers (`sharding.py`). It re-exports the
names other modules and tests read from it.

Shapes are arbitrary: Triton tiles must be powers of two, so the last query/key block and a head
dim like 40 or 72 are read with masked loads (zeros outside) and written with masked stores; no
array is padded or transposed. `layout="bsnd"` is read in place through the BlockSpec index maps.

Masking follows `jax_attn.reference`: a key is dropped when its bias is -inf (bool masks arrive as
0/-inf biases), it lies at or past `kv_lengths[b]`, outside the query's window (query i sees keys
`[i - left, i + right]`, `window=(left, right)`, None = unbounded; causal, top-left aligned, is
`right = 0`), or, for packed sequences, in another segment (`q_segment_ids[b, i] !=
kv_segment_ids[b, j]`). Key blocks outside every row's window are never visited, nor are tiles
whose query and key blocks share no segment id; only blocks on a window edge (or the kv_lengths /
tail edge) apply the window mask. A row with no visible key returns zeros and `lse = -inf`.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import math

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from .. import contract
from . import configs, sharding
from .flash_backward import _backward, _dkdv_splits  # noqa: F401 (re-exported: tests)
from .flash_call import KernelCall, segment_ranges, segment_tiles  # noqa: F401 (re-exported)
from .flash_forward import _forward

log = logging.getLogger(__name__)

_Static = KernelCall  # the former name; the Mosaic VJP and older callers build it under this name


# ---------------------------------------------------------------------------------------------
# VJP


# The kernel calls as the partitioner sees them: batch/head-sharded operands stay sharded and each
# device runs the kernel on its shard; sequences and head dims are gathered (see sharding.py).
_forward_sharded = sharding.partitioned(_forward, "fwd")
_backward_sharded = sharding.partitioned(_backward, "bwd")


@functools.cache
def _backward_with_bias_grads(bias_grads):
    """`_backward_sharded` with the bias gradients it returns under `st.bias_grads` as results:
    full `(b, n, ...)` arrays that split over batch and heads like the rest (the broadcast dims
    are summed by the caller, outside, so that a sharded sum is XLA's all-reduce)."""
    if not any(bias_grads):
        return _backward_sharded
    if sharding.custom_partitioning is None:  # pragma: no cover
        return _backward
    roles = tuple(r for r, want in zip(("key_bias", "bias"), bias_grads) if want)
    return sharding._make(_backward, sharding._BWD_IN, sharding._BWD_OUT + roles,
                          sharding.triton_operands)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(st, q, k, v, key_bias, bias, kv_lengths, q_ids, kv_ids):
    return _forward_sharded(st, q, k, v, key_bias, bias, kv_lengths, q_ids, kv_ids)


def _flash_fwd(st, q, k, v, key_bias, bias, kv_lengths, q_ids, kv_ids):
    # symbolic_zeros: each array argument arrives as CustomVJPPrimal(value, perturbed), so a bias
    # that is not differentiated (a mask, a constant) costs the backward nothing.
    wants = tuple(x is not None and x.perturbed for x in (key_bias, bias))
    q, k, v, key_bias, bias, kv_lengths, q_ids, kv_ids = (
        None if x is None else x.value
        for x in (q, k, v, key_bias, bias, kv_lengths, q_ids, kv_ids))
    out, lse = _forward_sharded(st, q, k, v, key_bias, bias, kv_lengths, q_ids, kv_ids)
    st_bwd = dataclasses.replace(st, bias_grads=wants)
    return (out, lse), (st_bwd, q, k, v, key_bias, bias, kv_lengths, q_ids, kv_ids, out, lse)


def _sum_to(x, like):
    """A full-size bias gradient summed over `like`'s broadcast (size-1) dims, in its dtype."""
    axes = tuple(a for a, (n, m) in enumerate(zip(like.shape, x.shape)) if n == 1 and m != 1)
    return x.sum(axes, keepdims=True).astype(like.dtype)


def _flash_bwd(st, res, cotangents):
    st, q, k, v, key_bias, bias, kv_lengths, q_ids, kv_ids, out, lse = res
    # An unused output (out, or lse when not returned) has a symbolic zero cotangent.
    do, dlse = (jnp.zeros(c.shape, c.dtype) if isinstance(c, SymbolicZero) else c
                for c in cotangents)
    dq, dk, dv, *extra = _backward_with_bias_grads(st.bias_grads)(
        st, q, k, v, key_bias, bias, kv_lengths, out, lse, do, dlse, q_ids, kv_ids)
    dkb = _sum_to(extra.pop(0), key_bias) if st.bias_grads[0] else None
    dbias = _sum_to(extra.pop(0), bias) if st.bias_grads[1] else None
    return dq, dk, dv, dkb, dbias, None, None, None  # kv_lengths, segment ids: integers


_flash.defvjp(_flash_fwd, _flash_bwd, symbolic_zeros=True)


# ---------------------------------------------------------------------------------------------
# Public entry point


def _pad4(x):
    return x.reshape((1,) * (4 - x.ndim) + x.shape)


def flash_attention(q, k, v, *, bias=None, kv_lengths=None, key_mask=None, is_causal=False,
                    window=None, scale=None, layout="bnsd", return_lse=False, config=None,
                    interpret=False, q_segment_ids=None, kv_segment_ids=None):
    """Flash attention (differentiable in q, k, v, a float bias and the returned lse).

    q `(b, n, sq, d)`, k `(b, n_kv, skv, d)`, v `(b, n_kv, skv, dv)` (or `(b, s, n, d)` with
    `layout="bsnd"`), `n % n_kv == 0`. `bias`: additive float, broadcastable to `(b, n, sq, skv)`;
    -inf drops a key. Its gradient is computed only when it is differentiated; a bias with query
    dim 1 is read (and differentiated) as one vector per batch/head, any other as full tiles, so
    its gradient costs a float32 `(b, n, sq, skv)` buffer. `key_mask`: bool (True = attend)
    broadcastable to `(b, 1|n, 1, skv)`. `kv_lengths (b,)`: keys at or past it are padding.
    `is_causal`: key j is visible to query i iff j <= i. `window`: `(left, right)` (jax.nn's
    `local_window_size`; an int w means `(w, w)`), each an int >= 0 or None (unbounded): key j is
    visible to query i iff `i - left <= j <= i + right`; key blocks outside every window are
    skipped. `q_segment_ids (b, sq)`, `kv_segment_ids (b, skv)`: integer ids of packed
    sequences (both or neither, read as int32, in any order): key j is visible to query i only
    where their ids are equal; tiles whose query and key blocks share no id are skipped (a block
    is summarized by its min and max id: number prompts in packing order and give padding the
    next id, not -1, else the padding's block spans every prompt and skips nothing). A query
    that sees no key gets zeros (and zero gradients). Returns `out` in q's layout
    and dtype and, with `return_lse`, the float32 natural log-sum-exp `(b, n, sq)` of the scaled,
    biased logits (-inf for empty rows). `config`: a `configs.Config`; by default the tuned
    table's entry for this GPU.
    """
    st, operands, _ = _call_operands(
        q, k, v, bias=bias, key_mask=key_mask, kv_lengths=kv_lengths, is_causal=is_causal,
        window=window, scale=scale, layout=layout, config=config, interpret=interpret,
        q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids)
    out, lse = _flash(st, q, k, v, *operands)
    return (out, lse) if return_lse else out


def _check_segments(q_ids, kv_ids, b, sq, skv):
    """Both segment-id arrays as int32 `(b, sq)` and `(b, skv)`, or `(None, None)`."""
    if (q_ids is None) != (kv_ids is None):
        raise ValueError("q_segment_ids and kv_segment_ids must be given together (or neither)")
    if q_ids is None:
        return None, None
    out = []
    for name, ids, want in (("q_segment_ids", q_ids, (b, sq)),
                            ("kv_segment_ids", kv_ids, (b, skv))):
        ids = jnp.asarray(ids)
        if ids.shape != want:
            raise ValueError(f"{name} must have shape {want}, got {ids.shape}")
        if not jnp.issubdtype(ids.dtype, jnp.integer):  # a float id cast to int could merge ids
            raise TypeError(f"{name} must have an integer dtype, got {ids.dtype}")
        out.append(ids.astype(jnp.int32))
    return tuple(out)


def _compute_capability(interpret):
    if interpret or jax.default_backend() != "gpu":
        return None
    cc = getattr(jax.devices()[0], "compute_capability", None)
    return None if not cc else tuple(int(x) for x in str(cc).split(".")[:2])


# ---------------------------------------------------------------------------------------------
# Public backward entry point: the VJP's backward fed with statistics the caller holds


def flash_attention_backward(q, k, v, out, lse, d_out, d_lse=None, *, bias=None, key_mask=None,
                             kv_lengths=None, is_causal=False, window=None, scale=None,
                             layout="bnsd", config=None, interpret=False, q_segment_ids=None,
                             kv_segment_ids=None, bias_grad=False):
    """The backward of `flash_attention` from a given `out` and `lse`: `(dq, dk, dv, dbias)`.

    Runs the same dK/dV and dQ kernels as `flash_attention`'s VJP, without a forward: the caller
    supplies `out` (q's layout, `(.., dv)`) and the float32 natural-log `lse (b, n, sq)` that the
    gradient is taken against. With the `out, lse` of `flash_attention` on the same arguments this
    equals `jax.vjp` of `flash_attention(..., return_lse=True)` under the cotangents
    `(d_out, d_lse)`. Its use is a block of a longer sequence (ring attention): with the *global*
    `out` and `lse` of all key blocks, the result is that key block's exact share of the global
    gradient (the kernels recompute `p = exp(s - lse)` and use `delta = rowsum(d_out * out) -
    d_lse`, both of which are then the global ones).

    Every other argument means what it means for `flash_attention`. `d_lse`: the lse cotangent,
    float32 `(b, n, sq)`; None is zero. `bias_grad=True` (needs `bias`) also returns the gradient
    of `bias`, in its shape and dtype (a full bias costs a float32 `(b, n, sq, skv)` buffer);
    otherwise `dbias` is None. `dq, dk, dv` come in the dtypes and layout of `q, k, v`.
    """
    if bias_grad and bias is None:
        raise ValueError("bias_grad=True needs a bias")
    st, ops, fold = _call_operands(q, k, v, bias=bias, key_mask=key_mask, kv_lengths=kv_lengths,
                                   is_causal=is_causal, window=window, scale=scale, layout=layout,
                                   config=config, interpret=interpret, q_segment_ids=q_segment_ids,
                                   kv_segment_ids=kv_segment_ids)
    key_bias, kbias, kv_lengths, q_ids, kv_ids = ops
    want_out = q.shape[:-1] + (st.dv,)
    if tuple(out.shape) != want_out or tuple(d_out.shape) != want_out:
        raise ValueError(f"out and d_out must have shape {want_out} (q's layout, v's head dim), "
                         f"got {tuple(out.shape)} and {tuple(d_out.shape)}")
    want_lse = (q.shape[0], q.shape[1] if layout == "bnsd" else q.shape[2], st.sq)
    if tuple(lse.shape) != want_lse:
        raise ValueError(f"lse must have shape {want_lse} (b, n, sq), got {tuple(lse.shape)}")
    # The kernels take out and d_out in q's dtype, as the VJP gets them (out is q's dtype).
    out, d_out = jnp.asarray(out).astype(q.dtype), jnp.asarray(d_out).astype(q.dtype)
    lse = jnp.asarray(lse, jnp.float32)
    d_lse = (jnp.zeros(want_lse, jnp.float32) if d_lse is None
             else jnp.broadcast_to(jnp.asarray(d_lse, jnp.float32), want_lse))
    # Which folded operand the bias became decides which kernel gradient is its own.
    wants = (bias_grad and fold == "key_bias", bias_grad and fold == "bias")
    st = dataclasses.replace(st, bias_grads=wants)
    dq, dk, dv, *extra = _backward_with_bias_grads(wants)(
        st, q, k, v, key_bias, kbias, kv_lengths, out, lse, d_out, d_lse, q_ids, kv_ids)
    dbias = None
    if bias_grad:
        ds = extra[0]  # float32 dS: (b, n, skv) summed over queries, or (b, n, sq, skv)
        if fold == "key_bias":
            ds = ds[:, :, None, :]
        bias = jnp.asarray(bias)
        # Summed over the dims the bias broadcast along (a key_mask folded in with it adds no
        # gradient: d (bias + mask) / d bias = 1), then back to its own rank and dtype.
        padded = _pad4(bias)
        ds = ds.sum(tuple(a for a in range(4) if padded.shape[a] == 1 and ds.shape[a] != 1),
                    keepdims=True)
        dbias = ds.reshape(bias.shape).astype(bias.dtype)
    return dq, dk, dv, dbias


def _call_operands(q, k, v, *, bias, key_mask, kv_lengths, is_causal, window, scale, layout,
                   config, interpret, q_segment_ids, kv_segment_ids):
    """`(KernelCall, (key_bias, bias, kv_lengths, q_ids, kv_ids), fold)` for a call: validation,
    mask folding and the config, shared by `flash_attention` and the backward entry so both run
    the same kernels; `fold` says where `bias` went: "key_bias" (a row shared by every query, read
    as a vector), "bias" (full tiles) or None."""
    if layout not in ("bnsd", "bsnd"):
        raise ValueError(f"layout must be 'bnsd' or 'bsnd', got {layout!r}")

    def bnsd(shape):
        return tuple(shape) if layout == "bnsd" else (shape[0], shape[2], shape[1], shape[3])

    b, n, sq, d = bnsd(q.shape)
    _, n_kv, skv, _ = bnsd(k.shape)
    dv = v.shape[-1]
    if n % n_kv:
        raise ValueError(f"q heads ({n}) must be a multiple of k/v heads ({n_kv})")
    if max(d, dv) > 256:
        raise ValueError(f"head dims up to 256 are supported, got d={d}, dv={dv}")
    if q.dtype not in (jnp.float16, jnp.bfloat16, jnp.float32):
        raise TypeError(f"q/k/v must be float16, bfloat16 or float32, got {q.dtype}")
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    window = contract.normalize_window(window, name="window", error=ValueError)
    q_segment_ids, kv_segment_ids = _check_segments(q_segment_ids, kv_segment_ids, b, sq, skv)

    key_bias, fold = None, None
    if key_mask is not None:
        key_mask = _pad4(jnp.asarray(key_mask))
        if key_mask.shape[2] != 1:
            raise ValueError(f"key_mask must be broadcastable to (b, 1|n, 1, skv), got {key_mask.shape}")
        key_bias = jnp.where(key_mask, 0.0, -jnp.inf).astype(jnp.float32)
    if bias is not None:
        bias = _pad4(jnp.asarray(bias))
        fold = "bias"
        if bias.shape[2] == 1:
            kb = bias.astype(jnp.float32)
            key_bias = kb if key_bias is None else key_bias + kb
            bias, fold = None, "key_bias"
        elif bias.shape[3] == 1:
            bias = jnp.broadcast_to(bias, bias.shape[:3] + (skv,))
    if key_bias is not None:
        key_bias = jnp.broadcast_to(key_bias, key_bias.shape[:3] + (skv,))[:, :, 0, :]
    if kv_lengths is not None:
        kv_lengths = jnp.asarray(kv_lengths, jnp.int32)

    def dims(x):
        return None if x is None else (x.shape[0] != 1, x.shape[1] != 1)

    if config is None:
        cc = _compute_capability(interpret)
        config = configs.get_config(d, jnp.dtype(q.dtype).name, cc)
        if bias is not None:  # a full bias tile per pipeline stage: keep within shared memory
            config = configs.fit_forward(config, d, dv, jnp.dtype(q.dtype).itemsize,
                                         jnp.dtype(bias.dtype).itemsize, cc)
        log.debug("flash_attention d=%d %s: %s", d, jnp.dtype(q.dtype).name, config)
    st = KernelCall(scale=scale, causal=bool(is_causal), layout=layout, sq=sq, skv=skv, d=d, dv=dv,
                    groups=n // n_kv, has_kv_lengths=kv_lengths is not None,
                    key_bias_dims=dims(key_bias), bias_dims=dims(bias),
                    config=config, interpret=bool(interpret), window=window,
                    has_segments=q_segment_ids is not None)
    return st, (key_bias, bias, kv_lengths, q_segment_ids, kv_segment_ids), fold
