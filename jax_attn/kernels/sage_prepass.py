"""The `sage` pre-pass as Pallas (Triton) kernels: Q and K to INT8 in one pass over each.

`quantization.quantize` states the scheme in jnp; XLA runs it as several fusions (the K mean,
then per tensor a row-amax reduction and a separate quantizing pass, each reading the bf16
input again and transposing it to (b, n, s, d)). Here one program owns `BLOCK_ROWS` rows of one
head: it reads them once in the caller's layout (bsnd rows are strided; no transpose pass), takes each row's amax,
and writes the INT8 rows and their scales in the kernel's padded (b, n, s, dp) order; for K it
subtracts the smoothing mean first, for Q it also writes the lse shift (`scale * q . mean`).
With one K scale per key tile (`SageConfig.k_scale_per_tile`) a program owns one tile
(`BLOCK_WARPS`, `SWEEP_SLICES` below).
K's smoothing mean and V's channel amax come from `token_stats`, one pass over K and V (XLA's
two token-axis reductions ran at a tenth of the bandwidth at 4096 tokens). The FP8 V's cast
and transpose is `quantize_v` here, one Pallas pass, with `quantize(v_pallas=True)`
(`SageConfig.v_pallas`, the default): bit for bit `quantization.quantize_v`'s jnp in interpret
mode, and on the H200 (round 11, inside the call) 41 us where XLA's transpose fusion took 331
at 16k tokens. The 16-bit P V leaves V untouched unless it must be cast or padded
(`quantization.quantize_v`).

Measured (H200, `benchmarks/sage_prepass_tune.py`): on Q alone the kernel runs at the speed of a
plain copy of Q in the same harness at 16k tokens (0.089 vs 0.082 ms); below that every
isolated timing, the copy's included, is bound by dispatching the call (~0.05 ms), so inside the
attention call the pre-pass costs less than its isolated timing says.

`quantize` returns the same `Quantized` as `quantization.quantize` (per-token Q scales; K's per
token or per block): given the same smoothing mean (`token_stats` sums K in another order than
`quantization.smoothing_mean`), the INT8 values and scales bit for bit in interpret mode (the
same float32 operations; rounding half to even built from floor, which the Triton lowering
lacks as an op), the lse shift up to float32 summation order. Compiled by Triton, a float32
division may round its last bit differently from XLA's (not checked on a GPU; it can move a
value by one INT8 step at most, which the kernel-vs-simulation tolerance of the device checks
covers).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from .. import quantization as Q
from ..arrays import pad_to

# Rows per program and warps: the fastest of sage_prepass_tune.py's sweep at 16k (d = 128) and
# 4096 (d = 64) tokens, H200 2026-11-30 (results/2026-11-30-h200-round5/prepass_tune); smaller
# calls are bound by dispatch, not by the kernel.
BLOCK_ROWS = 64
NUM_WARPS = 8
# K's pass with one scale per key tile (256 rows per program at the default block_kv): 16 warps,
# and above SWEEP_ELEMENTS values per program the tile in SWEEP_SLICES slices (`_rows_kernel`).
# H200 round 18 (`benchmarks/prepass_probe.py`, Nsight Compute, us at 1x24x4608x128 /
# 1x24x16384x128 / 2x10x4096x64): 8 warps whole 36 / 108 / 13.6; 16 warps whole 33 / 102 / 11.5;
# 16 warps in four slices 29 / 82 / 13.2.
BLOCK_WARPS = 16
SWEEP_ELEMENTS = 16384
SWEEP_SLICES = 4
_SQ = getattr(pl, "squeezed", None)  # a squeezed block dimension (`None` in older JAX)


def _round_half_even(x):
    """jnp.round's rounding (half to even) from floor, which the Triton lowering has (it has no
    round); every step is exact for |x| < 2**23. (The 1.5 * 2**23 add-and-subtract trick is not
    used: XLA folds it away in interpret mode.)"""
    r = jnp.floor(x)
    frac = x - r
    odd = (r - 2.0 * jnp.floor(0.5 * r)) == 1.0
    return r + jnp.where((frac > 0.5) | ((frac == 0.5) & odd), 1.0, 0.0)


def _int8(x, amax):
    """`x` (rows, dp) float32 to INT8 with one scale per row from `amax` (rows,): x * (1 / scale),
    the multiply `quantization._int8_blocks` also does (a division costs more here; H200 round
    18, `prepass_probe.py`: 1-3% of the pass, bit for bit the same on its inputs)."""
    scale = jnp.where(amax > 0, amax / Q.INT8_MAX, 1.0)
    x8 = jnp.clip(_round_half_even(x * (1.0 / scale)[:, None]), -Q.INT8_MAX, Q.INT8_MAX)
    return x8.astype(jnp.int8), scale


def _rows_kernel(x_ref, mean_ref, x8_ref, scale_ref, *shift_ref, n_rows: int, d: int,
                 row_factor: float, shift_factor: float | None, subtract_mean: bool,
                 block_scale: bool):
    block_rows, dp = x8_ref.shape
    col_ok = jnp.arange(dp) < d
    mean = plgpu.load(mean_ref, mask=col_ok, other=0.0)
    base = pl.program_id(2) * block_rows

    def load(lo, n):  # rows [lo, lo + n) of the block, float32, zeros past the sequence and d
        ok = ((base + lo + jnp.arange(n)) < n_rows)[:, None] & col_ok[None, :]
        x = plgpu.load(x_ref.at[pl.ds(lo, n)], mask=ok, other=0.0).astype(jnp.float32)
        # K smoothed; padded rows and columns stay zero (padding follows the mean)
        return jnp.where(ok, x - mean[None, :], 0.0) if subtract_mean else x

    if block_scale and block_rows * dp > SWEEP_ELEMENTS and shift_factor is None:
        # One scale for the block, taken over slices, then each slice quantized from a second
        # read (L1/L2): no slice's registers outlive it (H200 round 18: 36 -> 29 us for K at
        # 1x24x4608x128, 108 -> 82 at 16k tokens)
        part = block_rows // SWEEP_SLICES
        amax = functools.reduce(jnp.maximum, [jnp.max(jnp.abs(load(c * part, part)))
                                              for c in range(SWEEP_SLICES)])
        for c in range(SWEEP_SLICES):
            x8, scale = _int8(load(c * part, part), jnp.full((part,), amax, jnp.float32))
            plgpu.store(x8_ref.at[pl.ds(c * part, part)], x8)
            plgpu.store(scale_ref.at[pl.ds(c * part, part)], scale * row_factor)
        return
    x = load(0, block_rows)
    amax = jnp.max(jnp.abs(x), axis=1)
    if block_scale:  # one scale for the program's rows (`quantization._int8_blocks`)
        amax = jnp.full_like(amax, jnp.max(amax))
    x8, scale = _int8(x, amax)
    plgpu.store(x8_ref, x8)
    plgpu.store(scale_ref, scale * row_factor)
    if shift_factor is not None:
        plgpu.store(shift_ref[0], shift_factor * jnp.sum(x * mean[None, :], axis=1))


def quantize_rows(x, mean, *, layout: str, rows_pad: int, dp: int, groups: int,
                  row_factor: float = 1.0, shift_factor: float | None = None,
                  subtract_mean: bool = False, interpret: bool = False,
                  block_rows: int = BLOCK_ROWS, num_warps: int = NUM_WARPS,
                  block_scale: bool = False):
    """INT8 rows of `x` (caller's layout, bf16/f16/f32) with one scale per row (with
    `block_scale`, one per `block_rows` rows, which every row of the block carries).

    Returns `(x8 (b, h, rows_pad, dp) int8, scale (b, h, rows_pad) f32 * row_factor)`, and with
    `shift_factor` a third `(b, h, rows_pad)` f32, `shift_factor * x . mean` per row. `mean`
    `(b, h // groups, d)` f32: subtracted first with `subtract_mean` (K), else only dotted (Q).
    Rows past the sequence and columns past d come out as zeros with scale `row_factor`."""
    bnsd = layout == "bnsd"
    b, h, s, d = x.shape if bnsd else (x.shape[0], x.shape[2], x.shape[1], x.shape[3])
    if rows_pad % block_rows or dp & (dp - 1) or block_rows & (block_rows - 1):
        raise ValueError(f"rows_pad ({rows_pad}) must be a multiple of block_rows ({block_rows}), "
                         f"and block_rows and dp ({dp}) powers of two")
    if bnsd:
        x_spec = pl.BlockSpec((_SQ, _SQ, block_rows, dp), lambda b_, h_, i: (b_, h_, i, 0))
    else:
        x_spec = pl.BlockSpec((_SQ, block_rows, _SQ, dp), lambda b_, h_, i: (b_, i, h_, 0))
    mean_spec = pl.BlockSpec((_SQ, _SQ, dp), lambda b_, h_, i: (b_, h_ // groups, 0))
    row_spec = pl.BlockSpec((_SQ, _SQ, block_rows), lambda b_, h_, i: (b_, h_, i))
    out_shape = [jax.ShapeDtypeStruct((b, h, rows_pad, dp), jnp.int8),
                 jax.ShapeDtypeStruct((b, h, rows_pad), jnp.float32)]
    out_specs = [pl.BlockSpec((_SQ, _SQ, block_rows, dp), lambda b_, h_, i: (b_, h_, i, 0)), row_spec]
    if shift_factor is not None:
        out_shape.append(jax.ShapeDtypeStruct((b, h, rows_pad), jnp.float32))
        out_specs.append(row_spec)
    kernel = functools.partial(_rows_kernel, n_rows=s, d=d, row_factor=float(row_factor),
                               shift_factor=None if shift_factor is None else float(shift_factor),
                               subtract_mean=subtract_mean, block_scale=block_scale)
    return pl.pallas_call(
        kernel, grid=(b, h, rows_pad // block_rows), in_specs=[x_spec, mean_spec],
        out_specs=out_specs, out_shape=out_shape, interpret=interpret,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
        name="sage_quantize_rows")(x, mean)


STAT_ROWS = 256  # tokens per program of `token_stats`


def _stats_kernel(*refs, n_rows: int, d: int, with_v: bool):
    """Per program, `STAT_ROWS` tokens of one head: K's float32 column sums and (with V) V's
    column amax, both (dp,), zeros past the sequence and past d. refs: k, [v], ksum, [vmax]."""
    k_ref, v_ref, ksum_ref, vmax_ref = refs if with_v else (refs[0], None, refs[1], None)
    block_rows, dp = k_ref.shape
    rows = pl.program_id(2) * block_rows + jnp.arange(block_rows)
    ok = (rows < n_rows)[:, None] & (jnp.arange(dp) < d)[None, :]
    k = plgpu.load(k_ref, mask=ok, other=0.0).astype(jnp.float32)
    plgpu.store(ksum_ref, jnp.sum(k, axis=0))
    if with_v:
        v = plgpu.load(v_ref, mask=ok, other=0.0).astype(jnp.float32)
        plgpu.store(vmax_ref, jnp.max(jnp.abs(v), axis=0))


def token_stats(k, v=None, *, layout: str, dp: int, interpret: bool = False,
                block_rows: int = STAT_ROWS, num_warps: int = 4):
    """K's smoothing mean `(b, n_kv, d)` float32 and, with `v`, V's FP8 channel scale
    (`quantization.v_channel_scale`; else None), from one Pallas pass over K (and V): each
    program reduces `block_rows` tokens of one head, a jnp sum / max finishes over the programs.
    XLA ran each of these token-axis reductions as its own kernel, 26 us apiece for a 10 MB K
    at 2x4096x10x64 on an H200 (round 11, Nsight Compute inside the call): a tenth of the
    bandwidth. The V amax is exact; the mean is `quantization.smoothing_mean` up to float32
    summation order (the smoothing is exact for any vector subtracted from K, so the pre-pass
    only needs one mean used throughout; its Q . mean lse shift uses this one)."""
    bnsd = layout == "bnsd"
    b, n_kv, s, d = k.shape if bnsd else (k.shape[0], k.shape[2], k.shape[1], k.shape[3])
    chunks = -(-s // block_rows)
    if bnsd:
        spec = pl.BlockSpec((_SQ, _SQ, block_rows, dp), lambda b_, h_, i: (b_, h_, i, 0))
    else:
        spec = pl.BlockSpec((_SQ, block_rows, _SQ, dp), lambda b_, h_, i: (b_, i, h_, 0))
    part = jax.ShapeDtypeStruct((b, n_kv, chunks, dp), jnp.float32)
    part_spec = pl.BlockSpec((_SQ, _SQ, _SQ, dp), lambda b_, h_, i: (b_, h_, i, 0))
    args = (k,) if v is None else (k, v)
    parts = pl.pallas_call(
        functools.partial(_stats_kernel, n_rows=s, d=d, with_v=v is not None),
        grid=(b, n_kv, chunks),
        in_specs=[spec] * len(args), out_specs=[part_spec] * len(args),
        out_shape=[part] * len(args), interpret=interpret,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
        name="sage_token_stats")(*args)
    mean = jnp.sum(parts[0], axis=2)[..., :d] / s
    if v is None:
        return mean, None
    return mean, Q.fp8_scale(jnp.max(parts[1], axis=2)[..., :d])


V_BLOCK = 64  # keys per program of `quantize_v` (a multiple of key_perm's 16)


def _v_kernel(v_ref, scale_ref, vt_ref, *, n_keys: int, d: int, key_perm: bool):
    dp, bk = vt_ref.shape
    keys = pl.program_id(2) * bk + jnp.arange(bk)
    col_ok = jnp.arange(dp) < d
    ok = (keys < n_keys)[:, None] & col_ok[None, :]
    x = plgpu.load(v_ref, mask=ok, other=0.0).astype(jnp.float32)  # (bk, dp); padding zeros
    v_scale = plgpu.load(scale_ref, mask=col_ok, other=1.0)
    x8 = jnp.clip(x / v_scale[None, :], -Q.FP8_MAX, Q.FP8_MAX).astype(Q.FP8)
    if key_perm:  # `quantization.key_perm` within each 16 keys: swap the middle digits (2, 4)
        x8 = x8.reshape(bk // 16, 2, 4, 2, dp).transpose(0, 2, 1, 3, 4).reshape(bk, dp)
    plgpu.store(vt_ref, x8.T)


def quantize_v(v, *, layout: str, dp: int, skv_pad: int, v_key_perm: bool = False,
               interpret: bool = False, block_keys: int = V_BLOCK, num_warps: int = 4,
               v_scale=None):
    """`quantization.quantize_v` for the FP8 P V as one Pallas pass after the per-channel amax
    (a jnp reduction): each program reads `block_keys` rows of V in the caller's layout, scales,
    casts to e4m3 and writes them transposed (and key-permuted) into V^T, the (b, n_kv, dp,
    skv_pad) tile the kernel reads (`SageConfig.v_pallas` has the H200 timings). `v_scale`:
    the channel scales `(b, n_kv, d)` when already computed (`token_stats`)."""
    if skv_pad % block_keys or block_keys % 16:
        raise ValueError(f"skv_pad ({skv_pad}) must be a multiple of block_keys ({block_keys}), "
                         "itself a multiple of 16")
    bnsd = layout == "bnsd"
    b, n_kv, s, d = v.shape if bnsd else (v.shape[0], v.shape[2], v.shape[1], v.shape[3])
    if v_scale is None:
        v_scale = Q.v_channel_scale(v.astype(jnp.float32), 2 if bnsd else 1)  # (b, n_kv, d)
    if bnsd:
        v_spec = pl.BlockSpec((_SQ, _SQ, block_keys, dp), lambda b_, h_, i: (b_, h_, i, 0))
    else:
        v_spec = pl.BlockSpec((_SQ, block_keys, _SQ, dp), lambda b_, h_, i: (b_, i, h_, 0))
    kernel = functools.partial(_v_kernel, n_keys=s, d=d, key_perm=v_key_perm)
    vt8 = pl.pallas_call(
        kernel, grid=(b, n_kv, skv_pad // block_keys),
        in_specs=[v_spec, pl.BlockSpec((_SQ, _SQ, dp), lambda b_, h_, i: (b_, h_, 0))],
        out_specs=pl.BlockSpec((_SQ, _SQ, dp, block_keys), lambda b_, h_, i: (b_, h_, 0, i)),
        out_shape=jax.ShapeDtypeStruct((b, n_kv, dp, skv_pad), Q.FP8), interpret=interpret,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
        name="sage_quantize_v")(v, v_scale)
    return vt8, pad_to(v_scale / Q.P_SCALE, 2, dp), False


def quantize(q, k, v, *, layout: str, scale: float, dp: int, sq_pad: int, skv_pad: int,
             v_key_perm: bool = False, pv_dtype=None, interpret: bool = False,
             k_rows: int = 1, v_pallas: bool = False, mean=None) -> Q.Quantized:
    """`quantization.quantize` with per-token Q scales (`q_rows = 1`) and one K scale per
    `k_rows` keys (1, or a power of two: per key block, `SageConfig.k_scale_per_tile`), Q and K
    through `quantize_rows` (see the module docstring for what is equal). `v_pallas`: the FP8
    V through `quantize_v` (this module's) instead of `quantization.quantize_v`, its channel
    scales from the same `token_stats` pass as K's mean. `mean`: K's smoothing mean when given
    (the tests pass `quantization.smoothing_mean`'s to compare the quantization bit for bit),
    else `token_stats`'."""
    seq = 2 if layout == "bnsd" else 1
    n = q.shape[1] if layout == "bnsd" else q.shape[2]
    n_kv = k.shape[1] if layout == "bnsd" else k.shape[2]
    v_fp8 = v_pallas and pv_dtype is None  # V's channel amax read in the same pass as K's mean
    v_scale = None
    if mean is None:
        mean, v_scale = token_stats(k, v if v_fp8 else None, layout=layout, dp=dp,
                                    interpret=interpret)
    k_block = dict(block_rows=k_rows, block_scale=True, num_warps=BLOCK_WARPS) if k_rows > 1 else {}
    k8, k_scale = quantize_rows(k, mean, layout=layout, rows_pad=skv_pad, dp=dp, groups=1,
                                subtract_mean=True, interpret=interpret, **k_block)
    q8, q_scale, lse_shift = quantize_rows(
        q, mean, layout=layout, rows_pad=sq_pad, dp=dp, groups=n // n_kv,
        row_factor=scale * Q.LOG2E, shift_factor=scale, interpret=interpret)
    if v_fp8:
        vt8, out_scale, v_bsnd = quantize_v(v, layout=layout, dp=dp, skv_pad=skv_pad,
                                            v_key_perm=v_key_perm, interpret=interpret,
                                            v_scale=v_scale)
    else:
        vt8, out_scale, v_bsnd = Q.quantize_v(v, layout=layout, dp=dp, skv_pad=skv_pad,
                                              v_key_perm=v_key_perm, pv_dtype=pv_dtype)
    return Q.Quantized(q8=q8, q_scale=q_scale, k8=k8, k_scale=k_scale, vt8=vt8,
                       out_scale=out_scale, lse_shift=lse_shift[:, :, :q.shape[seq]],
                       v_bsnd=v_bsnd)
