"""The `sage` backend's 8-bit attention scheme: its quantization pre-pass and a float simulation.

The scheme (issue 16; after the SageAttention papers, our own code):

* K is smoothed: its mean over tokens, per (batch, kv head, channel), is subtracted. Every score
  of a query row then moves by the same `q . mean`, which softmax ignores; what it buys is that a
  large shared channel offset (common in diffusion models' K) no longer sets the INT8 scale.
  The log-sum-exp is not shift-invariant, so the lse gets `scale * q . mean` added back.
* Q and K go to INT8 per group of rows, per head, symmetric, `scale = amax / 127`, round half
  to even. The kernel reads one scale per query row and per key (a vector, like a key bias), so
  the group size costs it nothing: the simulation's default is one scale per token
  (`q_rows = k_rows = 1`); per kernel block (`block_q` / `block_k` rows, the SageAttention
  granularity) is a parameter. The kernel's default K scale is per key block
  (`SageConfig.k_scale_per_tile`, `k_tile_scale` here), which it folds into exp2's FMA.
  Measured in this simulation (d = 128, 1024 tokens): per-token Q raises the cosine on
  heavy-tailed (student-t, 3 dof) Q from 0.9974 to 0.9990; on normal inputs it changes nothing. S = (Q8 K8^T) is exact in
  int32; its float32 value times the row's Q scale (with `softmax_scale * log2(e)` folded in:
  base-2 logits) times the key's K scale gives the logits.
* Online softmax in float32, in base 2, over key blocks of `block_k`, exactly as the kernel walks
  them (P is relative to the running max of the blocks seen so far, so it must be simulated
  blockwise to round the same way).
* P . V in FP8 e4m3: V is scaled per channel (`amax over tokens / 448`); P in [0, 1] is multiplied
  by `P_SCALE = 448` before the cast, so its largest value lands on e4m3's largest finite value
  and small probabilities stay normal numbers down to 2**-6 / 448 (~3.5e-5) instead of 2**-6.
  The row sum `l` is taken from the float32 P (the probabilities the kernel would use without
  quantization), or, as the kernel does by default (`SageConfig.rowsum_mma`; `rowsum_p8`
  here), from P as rounded to e4m3, summed by the P V product itself; the product accumulates
  in float32, and the epilogue multiplies by `v_scale / P_SCALE` per channel.

`quantize` is the pre-pass in jnp: the kernel's entry point runs it for per-block scales and, for
per-token scales, `kernels/sage_prepass.py`, whose Pallas pass over Q and K gives the same INT8
values and scales (bit for bit in interpret mode; tests/test_sage_prepass.py), so the kernel and
`simulate` see the same bits; `simulate` is the jnp mirror of the kernel's arithmetic,
in the same order, used by the tests (kernel in interpret mode vs simulation: tight) and by
`benchmarks/sage_device.py`; `accuracy` is the metric both report against float64.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .arrays import pad_to

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
INT8_MAX = 127.0
FP8 = jnp.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn value
P_SCALE = 448.0  # P in [0, 1] is cast to e4m3 as P * P_SCALE (see the module docstring)
LOG2_P_SCALE = math.log2(P_SCALE)  # the fused softmax's exp2 bias: exp2(x + this) = P_SCALE 2^x
LN_P_SCALE = math.log(P_SCALE)
# The kernel's int32 -> float32 without a conversion instruction (those issue at a quarter of
# the FMA rate on sm90, as often as exp2, once per logit): for |s| < 2**22, the bits of
# `s + MAGIC_I` are the float32 `MAGIC_F + s` exactly (its ulp is 1 there), so subtracting
# MAGIC_F leaves s, exactly. |Q8 K8^T| <= 127 * 127 * 128 < 2**21. The simulation follows it
# where the offset changes a rounding (`simulate`'s k_tile_scale).
MAGIC_I = 0x4B400000
MAGIC_F = 12582912.0  # 1.5 * 2**23, the float32 whose bits are MAGIC_I


def key_perm(x, axis):
    """Reorder keys (along `axis`, a multiple of 16 long) within each group of 16 so that key
    16c + 8a + 2j + b lands at 16c + 4j + 2a + b: the order in which the kernel's register P
    (accumulator layout, read as wgmma's 8-bit operand layout) presents them. V^T is stored in
    this order when `quantize(v_key_perm=True)`; `key_unperm` undoes it."""
    return _swap_key_digits(x, axis, (2, 4, 2))


def key_unperm(x, axis):
    return _swap_key_digits(x, axis, (4, 2, 2))


def _swap_key_digits(x, axis, digits):
    """Split `axis` into (groups of 16, *digits) and swap the two middle digits."""
    axis = axis % x.ndim
    n = x.shape[axis]
    shp = x.shape[:axis] + (n // 16, *digits) + x.shape[axis + 1:]
    order = (0, 2, 1, 3)
    perm = list(range(axis)) + [axis + o for o in order] + list(range(axis + 4, len(shp)))
    return jnp.transpose(x.reshape(shp), perm).reshape(x.shape)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Quantized:
    """The pre-pass's output, padded and (but the 16-bit P V's V, see `vt8`) in (b, n, s, d) order,
    which the kernel reads.

    Rows past the sequences and head-dim columns past `d` are zeros (quantized zeros).
    """
    q8: Any  # (b, n, sq_pad, dp) int8
    q_scale: Any  # (b, n, sq_pad) f32: each row's block scale * softmax scale * log2(e)
    k8: Any  # (b, n_kv, skv_pad, dp) int8, smoothed
    k_scale: Any  # (b, n_kv, skv_pad) f32: each key's block scale
    vt8: Any  # (b, n_kv, dp, skv_pad) float8_e4m3fn: V / v_scale, transposed (K-major for wgmma);
    # with a 16-bit P V (`quantize(pv_dtype=...)`), V itself in that dtype, (b, n_kv, skv_pad, dp)
    # untransposed (16-bit wgmma reads it so; `pv_v_rows` tells the two apart), and with
    # `v_bsnd` left in the caller's (b, skv_pad, n_kv, dp) order: then no pass over V at all
    out_scale: Any  # (b, n_kv, dp) f32: v_scale / P_SCALE (1 / P_SCALE in 16 bits), epilogue
    lse_shift: Any  # (b, n, sq) f32: softmax scale * q . mean(K), added to the lse
    v_bsnd: bool = dataclasses.field(default=False, metadata=dict(static=True))


def _int8_blocks(x, block):
    """(b, h, s, d) float32, s a multiple of `block` -> int8 values and the per-row scale (each row
    carries its block's scale). Symmetric, amax / 127; an all-zero block gets scale 1."""
    b, h, s, d = x.shape
    xb = x.reshape(b, h, s // block, block, d)
    amax = jnp.max(jnp.abs(xb), axis=(3, 4), keepdims=True)
    scale = jnp.where(amax > 0, amax / INT8_MAX, 1.0)
    # x * (1 / scale): what the Pallas pre-pass computes (`sage_prepass._int8`), bit for bit
    x8 = jnp.clip(jnp.round(xb * (1.0 / scale)), -INT8_MAX, INT8_MAX).astype(jnp.int8)
    rows = jnp.broadcast_to(scale[..., 0], (b, h, s // block, block)).reshape(b, h, s)
    return x8.reshape(b, h, s, d), rows


def fp8(x):
    """Round float32 to e4m3fn (nearest even), clipped first: e4m3fn has no inf, and a value a
    rounding past 448 would otherwise become NaN."""
    return jnp.clip(x, -FP8_MAX, FP8_MAX).astype(FP8)


def quantize(q, k, v, *, layout: str, scale: float, q_rows: int, k_rows: int, dp: int,
             sq_pad: int, skv_pad: int, v_key_perm: bool = False, pv_dtype=None) -> Quantized:
    """The pre-pass: smooth K, quantize Q and K (INT8, one scale per `q_rows` / `k_rows` rows) and
    V (FP8 per channel), pad.

    q, k, v in `layout` (bnsd or bsnd), d <= dp; `q_rows` divides `sq_pad`, `k_rows` `skv_pad`.
    Padding comes after the smoothing mean and the V scales, so padded rows shift neither; a
    padded row's zeros can only lower a block's amax, never raise it. `v_key_perm`: V^T's keys
    stored in `key_perm` order (the kernel's register-P path). `pv_dtype` (bfloat16/float16): the
    16-bit P V variant, V left unquantized in that dtype (no per-channel scale, no permutation).

    Written for few passes over memory: the lse shift is a row reduction of q (like Q's row
    amax, so XLA can do both in one pass) rather than a dot, and the key permutation is a
    reshape/transpose folded into V's (already transposing) cast.
    """
    mean = smoothing_mean(k, layout)  # (b, n_kv, d)
    if layout == "bsnd":
        q, k = (jnp.swapaxes(x, 1, 2) for x in (q, k))
    q, k = (x.astype(jnp.float32) for x in (q, k))
    b, n, sq, d = q.shape
    n_kv = k.shape[1]
    k = k - mean[:, :, None, :]
    qm = q.reshape(b, n_kv, n // n_kv, sq, d)
    lse_shift = (scale * jnp.sum(qm * mean[:, :, None, None, :], axis=-1)).reshape(b, n, sq)

    pad = lambda x, s: pad_to(pad_to(x, 3, dp), 2, s)  # noqa: E731
    q8, q_scale = _int8_blocks(pad(q, sq_pad), q_rows)
    k8, k_scale = _int8_blocks(pad(k, skv_pad), k_rows)
    q_scale = q_scale * (scale * LOG2E)
    vt8, out_scale, v_bsnd = quantize_v(v, layout=layout, dp=dp, skv_pad=skv_pad,
                                        v_key_perm=v_key_perm, pv_dtype=pv_dtype)
    return Quantized(q8=q8, q_scale=q_scale, k8=k8, k_scale=k_scale, vt8=vt8,
                     out_scale=out_scale, lse_shift=lse_shift, v_bsnd=v_bsnd)


def smoothing_mean(k, layout: str):
    """K's mean over tokens, float32 `(b, n_kv, d)`: what the smoothing subtracts (one
    definition, so every pre-pass subtracts the same bits)."""
    return jnp.mean(k.astype(jnp.float32), axis=2 if layout == "bnsd" else 1)


def v_channel_scale(vf, token_axis: int):
    """V's FP8 scale per channel, float32 V `vf` reduced over `token_axis` (`fp8_scale` of its
    amax; one definition for every V pre-pass)."""
    return fp8_scale(jnp.max(jnp.abs(vf), axis=token_axis))


def fp8_scale(amax):
    """The FP8 scale of a channel whose largest magnitude is `amax`: amax / 448, 1 for an
    all-zero channel."""
    return jnp.where(amax > 0, amax / FP8_MAX, 1.0)


def tile_k_rows(k_rows: int, block_k: int, scale: float | None, what: str) -> int:
    """The K scale's rows for one scale per key block (`SageConfig.k_scale_per_tile`, the
    simulation's `k_tile_scale`, named `what` in errors): `block_k`; `k_rows` must be 1 or it,
    and the scale positive (the fused softmax folds the scales: 0 * -inf at a masked key)."""
    if scale is not None and float(scale) <= 0:
        raise ValueError(f"{what} folds the scales into the fused softmax: it needs a positive "
                         f"scale, got scale={scale}")
    if k_rows not in (1, block_k):
        raise ValueError(f"{what} takes one K scale per block of {block_k} keys; "
                         f"k_rows={k_rows} differs")
    return block_k


def quantize_v(v, *, layout: str, dp: int, skv_pad: int, v_key_perm: bool = False,
               pv_dtype=None):
    """V's part of the pre-pass: `(vt8, out_scale, v_bsnd)` as `Quantized` holds them. FP8: V
    scaled per channel (amax over tokens / 448), cast, padded, transposed to (b, n_kv, dp, keys)
    (keys in `key_perm` order with `v_key_perm`). 16-bit P V (`pv_dtype`): V as it is, in the
    caller's layout, cast only if it is not that dtype already and padded only if it must be."""
    if pv_dtype is not None and v_key_perm:
        raise ValueError("v_key_perm applies to the FP8 P V only; with pv_dtype (the 16-bit P V) "
                         "V is stored unpermuted")
    b, n_kv = v.shape[0], v.shape[1] if layout == "bnsd" else v.shape[2]
    if pv_dtype is not None:  # P * P_SCALE's factor leaves in the epilogue
        keys = 1 if layout == "bsnd" else 2
        vt = pad_to(pad_to(v.astype(pv_dtype), 3, dp), keys, skv_pad)
        return vt, jnp.full((b, n_kv, dp), 1.0 / P_SCALE, jnp.float32), layout == "bsnd"
    if layout == "bsnd":
        v = jnp.swapaxes(v, 1, 2)
    v = v.astype(jnp.float32)
    v_scale = v_channel_scale(v, 2)  # (b, n_kv, d)
    v8 = fp8(v / v_scale[:, :, None, :])
    vt8 = jnp.swapaxes(pad_to(pad_to(v8, 3, dp), 2, skv_pad), 2, 3)
    if v_key_perm:
        vt8 = key_perm(vt8, 3)
    return vt8, pad_to(v_scale / P_SCALE, 2, dp), False


def key_bias(skv: int, skv_pad: int, key_mask=None, kv_lengths=None, batch: int = 1):
    """One float32 0/-inf vector `(b|1, n|1, skv_pad)` of the dropped keys: the caller's per-key
    bool mask `(b|1, n|1, skv)`, `kv_lengths (b,)` and the padded tail. None when nothing is
    dropped (the kernel then runs its path without mask arithmetic)."""
    if key_mask is None and kv_lengths is None and skv == skv_pad:
        return None
    cols = jnp.arange(skv_pad)
    keep = (cols < skv)[None, None, :]
    if kv_lengths is not None:
        keep = keep & (cols[None, None, :] < kv_lengths[:, None, None])
    if key_mask is not None:
        keep = keep & pad_to(key_mask, 2, skv_pad)
    return jnp.where(keep, 0.0, -jnp.inf).astype(jnp.float32)


def _softmax_block(s2, m_i, l_i, masked: bool):
    """The kernel's online-softmax step on base-2 logits: (p, alpha, l, m_new)."""
    m_new = jnp.maximum(m_i, s2.max(axis=-1))
    m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new) if masked else m_new  # no -inf - -inf
    p = jnp.exp2(s2 - m_use[..., None])
    alpha = jnp.exp2(m_i - m_use)
    return p, alpha, l_i * alpha + p.sum(axis=-1), m_new


def simulate(qz: Quantized, kb=None, *, block_k: int, fused_softmax: bool = False,
             v_key_perm: bool = False, segments=None, k_tile_scale: bool = False,
             rowsum_p8: bool = False):
    """The kernel's arithmetic in jnp, block by block: `(out, lse)`, out float32
    `(b, n, sq_pad, dp)` before slicing, lse `(b, n, sq_pad)` natural log, shift not included.
    `kb`: `key_bias(...)` or None. `fused_softmax`: the kernel's `SageConfig.fused_softmax`
    arithmetic (`sage_forward._softmax_fused`), else the plain one. `v_key_perm`: qz's V^T is
    stored key-permuted (undone here: only the order of a float32 sum depends on it).
    `segments`: None or padded int32 `(q_ids (b, sq_pad), kv_ids (b, skv_pad))`: a key counts for
    a row only where their ids are equal (as a dropped key otherwise). `k_tile_scale` (with
    `fused_softmax`): qz holds one K scale per `block_k` keys, and the arithmetic is the
    kernel's `SageConfig.k_scale_per_tile` one (`sage_forward._softmax_tile_scale`).
    `rowsum_p8` (with `k_tile_scale`): `SageConfig.rowsum_mma`, l sums P as rounded for the
    P V product."""
    if k_tile_scale and not fused_softmax:
        raise ValueError("k_tile_scale is a variant of the fused softmax: pass fused_softmax=True")
    if rowsum_p8 and not k_tile_scale:
        raise ValueError("rowsum_p8 is a variant of k_tile_scale's softmax")
    b, n, sq_pad, dp = qz.q8.shape
    n_kv, skv_pad = qz.k8.shape[1], qz.k8.shape[2]
    g = n // n_kv
    if v_key_perm and pv_v_rows(qz):
        raise ValueError("v_key_perm applies to the FP8 P V's V^T; this Quantized holds the 16-bit "
                         "P V's V rows, which are never permuted")
    rep = lambda x: jnp.repeat(x, g, axis=1)  # noqa: E731  (kv head -> its query heads)
    vt = key_unperm(qz.vt8, 3) if v_key_perm else qz.vt8
    if pv_v_rows(qz):  # the 16-bit P V's V: (keys, d) rows (bsnd or bnsd); the steps read V^T
        vt = jnp.transpose(vt, (0, 2, 3, 1) if qz.v_bsnd else (0, 1, 3, 2))
    k8, ks, vt8 = rep(qz.k8), rep(qz.k_scale), rep(vt)
    # The INT8 Q K^T in float32: every product (<= 127^2) and every partial sum (<= dp * 127^2
    # < 2^24 for dp <= 1024) is an integer float32 holds exactly, so this equals the int32 dot
    # bit for bit, and it compiles at once on a GPU, where XLA turns an int32 dot into a
    # reduction fusion that took minutes to compile at 16k tokens (H200 round 9).
    assert dp <= 1024, dp
    q8 = qz.q8.astype(jnp.float32)
    masked = kb is not None or segments is not None
    if kb is not None:
        kb = jnp.broadcast_to(kb, (b, n, skv_pad))
    # P (times P_SCALE) rounded as the kernel hands it to the P V wgmma: e4m3, or V's 16 bits
    p_round = fp8 if qz.vt8.dtype == FP8 else (lambda x: x.astype(qz.vt8.dtype))

    def same(sl):  # (b, 1, sq_pad, block_k): the row's and the key's segment ids agree
        q_ids, kv_ids = segments
        return q_ids[:, None, :, None] == sl(kv_ids, 1)[:, None, None, :]

    def step(carry, j):
        acc, m_i, l_i = carry
        sl = lambda x, ax: jax.lax.dynamic_slice_in_dim(x, j * block_k, block_k, ax)  # noqa: E731
        s = jnp.einsum("bnqd,bnkd->bnqk", q8, sl(k8, 2).astype(jnp.float32),
                       precision=jax.lax.Precision.HIGHEST)
        if k_tile_scale:  # the exponent trick's offset kept: it sets the FMA's rounding
            u = s + MAGIC_F
            if kb is not None:
                u = u + sl(kb, 2)[:, :, None, :]
            if segments is not None:
                u = jnp.where(same(sl), u, -jnp.inf)
            c = qz.q_scale * sl(ks, 2)[:, :, None, 0]  # the row's scale times the tile's
            m_new = jnp.maximum(m_i, (u.max(axis=-1) - MAGIC_F) * c)
            m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new) if masked else m_new
            bias = MAGIC_F * c + (m_use - LOG2_P_SCALE)
            p = jnp.exp2(u * c[..., None] - bias[..., None])  # P * P_SCALE
            alpha = jnp.exp2(m_i - m_use)
            p8 = p_round(p).astype(jnp.float32)
            l_i = l_i * alpha + (p8 if rowsum_p8 else p).sum(axis=-1)
        elif fused_softmax:
            t = s * sl(ks, 2)[:, :, None, :]
            if kb is not None:
                t = t + sl(kb, 2)[:, :, None, :]
            if segments is not None:
                t = jnp.where(same(sl), t, -jnp.inf)
            qs = qz.q_scale
            m_new = jnp.maximum(m_i, t.max(axis=-1) * qs)
            m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new) if masked else m_new
            p = jnp.exp2(t * qs[..., None] - (m_use - LOG2_P_SCALE)[..., None])  # P * P_SCALE
            alpha = jnp.exp2(m_i - m_use)
            l_i = l_i * alpha + p.sum(axis=-1)
            p8 = p_round(p).astype(jnp.float32)
        else:
            s2 = (s * qz.q_scale[..., None]) * sl(ks, 2)[:, :, None, :]
            if kb is not None:
                s2 = s2 + sl(kb, 2)[:, :, None, :]
            if segments is not None:
                s2 = jnp.where(same(sl), s2, -jnp.inf)
            p, alpha, l_i, m_new = _softmax_block(s2, m_i, l_i, masked)
            p8 = p_round(p * P_SCALE).astype(jnp.float32)
        pv = jnp.einsum("bnqk,bndk->bnqd", p8, sl(vt8, 3).astype(jnp.float32),
                        precision=jax.lax.Precision.HIGHEST)
        return (acc * alpha[..., None] + pv, m_new, l_i), None

    init = (jnp.zeros((b, n, sq_pad, dp), jnp.float32),
            jnp.full((b, n, sq_pad), -jnp.inf, jnp.float32), jnp.zeros((b, n, sq_pad), jnp.float32))
    (acc, m_i, l_i), _ = jax.lax.scan(step, init, jnp.arange(skv_pad // block_k))
    return finish(acc, m_i, l_i, rep(qz.out_scale), masked, fused_softmax)


def finish(acc, m_i, l_i, out_scale, masked: bool, fused_softmax: bool = False):
    """The kernel's epilogue: out = acc / l * out_scale (per channel); lse = m ln2 + log l;
    a row with no key gives zeros and lse = -inf. `out_scale` (b, n, dp). With
    `fused_softmax`, l sums P * P_SCALE, which both formulas divide back out."""
    empty = l_i == 0.0
    l_safe = jnp.where(empty, 1.0, l_i) if masked else l_i
    num = P_SCALE if fused_softmax else 1.0
    out = (acc * (num / l_safe)[..., None]) * out_scale[:, :, None, :]
    lse = m_i * LN2 + jnp.log(l_safe)
    if fused_softmax:
        lse = lse - LN_P_SCALE
    if masked:
        lse = jnp.where(empty, -jnp.inf, lse)
    return out, lse


def sage_reference(q, k, v, *, scale=None, layout="bnsd", key_mask=None, kv_lengths=None,
                   block_q: int = 64, block_k: int = 128, q_rows: int = 1, k_rows: int = 1,
                   fused_softmax: bool = False, v_key_perm: bool = False, pv16: bool = False,
                   q_segment_ids=None, kv_segment_ids=None, k_tile_scale: bool = False,
                   rowsum_p8: bool = False):
    """The whole scheme simulated in jnp (no kernel): `(out, lse)`, out float32 in `layout`,
    lse `(b, n, sq)` float32. `key_mask`: bool `(b|1, n|1, skv)`, True = attend. `q_rows`,
    `k_rows`: rows per INT8 scale (1: per token, the default; `block_q`/`block_k`: per kernel
    block). `fused_softmax`, `v_key_perm`, `pv16` (P V in 16 bits: q's dtype, bfloat16 for
    float32 inputs), `k_tile_scale` (one K scale per `block_k` keys: `k_rows` becomes
    `block_k`), `rowsum_p8`: as the kernel's SageConfig (`sim_flags`)."""
    if k_tile_scale:
        k_rows = tile_k_rows(k_rows, block_k, scale, "k_tile_scale")
    bnsd = (lambda x: x) if layout == "bnsd" else (lambda x: jnp.swapaxes(x, 1, 2))
    b, n, sq, d = bnsd(q).shape
    skv = bnsd(k).shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    dp = 64 if d <= 64 else 128 if d <= 128 else -(-d // 64) * 64
    sq_pad, skv_pad = -(-sq // block_q) * block_q, -(-skv // block_k) * block_k
    qz = quantize(q, k, v, layout=layout, scale=scale, q_rows=q_rows, k_rows=k_rows, dp=dp,
                  sq_pad=sq_pad, skv_pad=skv_pad, v_key_perm=v_key_perm,
                  pv_dtype=pv16_dtype(q.dtype) if pv16 else None)
    kb = key_bias(skv, skv_pad, key_mask, kv_lengths)
    segments = None if q_segment_ids is None else padded_segments(
        q_segment_ids, kv_segment_ids, sq_pad, skv_pad)
    out, lse = simulate(qz, kb, block_k=block_k, fused_softmax=fused_softmax,
                        v_key_perm=v_key_perm, segments=segments, k_tile_scale=k_tile_scale,
                        rowsum_p8=rowsum_p8)
    return bnsd(out[:, :, :sq, :d]), lse[:, :, :sq] + qz.lse_shift


def pv_v_rows(qz: Quantized) -> bool:
    """Whether qz holds V as (keys, d) rows (the 16-bit P V) rather than FP8 V^T."""
    return qz.vt8.dtype != FP8


def padded_segments(q_ids, kv_ids, sq_pad: int, skv_pad: int):
    """int32 `(b, s)` segment ids padded to the kernel's lengths. The padding's value does not
    matter: padded keys are dropped by the key bias (`key_bias` covers the padded tail) and
    padded query rows are sliced off."""
    q_ids, kv_ids = (jnp.asarray(x).astype(jnp.int32) for x in (q_ids, kv_ids))
    return pad_to(q_ids, 1, sq_pad), pad_to(kv_ids, 1, skv_pad)


def pv16_dtype(dtype):
    """The 16-bit P V's dtype for inputs of `dtype`: their own (V is then exact), else bf16."""
    return jnp.dtype(dtype) if jnp.dtype(dtype).name in ("bfloat16", "float16") else jnp.bfloat16


def accuracy(x, ref) -> dict:
    """Cosine similarity and relative L1 of `x` against `ref`, both (b, n, s, d): per head (axis 1;
    pass bnsd) the worst values (`cos_min`, `rel_l1_max`), and over everything (`cos`, `rel_l1`)."""
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    axes = tuple(i for i in range(x.ndim) if i != 1)
    cos = (x * ref).sum(axes) / np.maximum(np.sqrt((x * x).sum(axes) * (ref * ref).sum(axes)), 1e-300)
    l1 = np.abs(x - ref).sum(axes) / np.maximum(np.abs(ref).sum(axes), 1e-300)
    all_cos = float((x * ref).sum() / max(np.sqrt((x * x).sum() * (ref * ref).sum()), 1e-300))
    return {"cos_min": float(cos.min()), "rel_l1_max": float(l1.max()), "cos": all_cos,
            "rel_l1": float(np.abs(x - ref).sum() / max(np.abs(ref).sum(), 1e-300))}
