"""Variants of the `sage` pre-pass's INT8 row kernel, each run once for Nsight Compute to time
(`ncu --metrics gpu__time_duration.sum --csv`, summarised by `kernel_times.py --table`), and each checked
against `sage_prepass.quantize_rows` (the library's kernel) on the same inputs.

    ncu --metrics gpu__time_duration.sum --csv python benchmarks/prepass_probe.py 1 24 4608 128

Round 18 measured the library's K pass (256 rows per program, one scale per 256-key tile, 8
warps) at 35 us for a 28 MB K at 1x24x4608x128 on the H200, the Q pass (64 rows, 8 warps) at
21, and the FP8 V pass over the same bytes at 13. Variants (kernel names say which):
  k_<warps>         K as the library, 256 rows, `warps` warps
  k_recip_<warps>   the same with x * (1 / scale) for x / scale
  k_sweep_<warps>   256 rows as four 64-row slices: the tile's amax over the four, then each
                    slice quantized (re-read from L1/L2), so no slice's registers outlive it
  q_<warps>, q_recip_<warps>   Q, 64 rows per program
  q_recip_<rows>r_<warps>      Q, `rows` rows per program
`--interpret`: a small shape in interpret mode (a CPU check of every variant's bits).
"""
from __future__ import annotations

import functools
import logging
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

sys.path.insert(0, str(pathlib.Path(__file__).parent.parent))
from jax_attn import quantization as Q  # noqa: E402
from jax_attn.kernels import sage_prepass as P  # noqa: E402

log = logging.getLogger("prepass_probe")
_SQ = P._SQ


def _quantize(x, amax, recip):
    scale = jnp.where(amax > 0, amax / Q.INT8_MAX, 1.0)
    y = x * (1.0 / scale)[:, None] if recip else x / scale[:, None]
    return jnp.clip(P._round_half_even(y), -Q.INT8_MAX, Q.INT8_MAX).astype(jnp.int8), scale


def _kernel(x_ref, mean_ref, x8_ref, scale_ref, *, n_rows, d, k_side, recip, sweep):
    block_rows, dp = x8_ref.shape
    col_ok = jnp.arange(dp) < d
    mean = plgpu.load(mean_ref, mask=col_ok, other=0.0)
    base = pl.program_id(2) * block_rows

    def rows(lo, n):
        r = base + lo + jnp.arange(n)
        ok = (r < n_rows)[:, None] & col_ok[None, :]
        x = plgpu.load(x_ref.at[pl.ds(lo, n)], mask=ok, other=0.0).astype(jnp.float32)
        return jnp.where(ok, x - mean[None, :], 0.0) if k_side else x

    if not sweep:
        x = rows(0, block_rows)
        amax = jnp.max(jnp.abs(x), axis=1)
        if k_side:
            amax = jnp.full_like(amax, jnp.max(amax))
        x8, scale = _quantize(x, amax, recip)
        plgpu.store(x8_ref, x8)
        plgpu.store(scale_ref, scale)
        return
    part = block_rows // 4
    amax = functools.reduce(jnp.maximum, [jnp.max(jnp.abs(rows(c * part, part)))
                                          for c in range(4)])
    amax_rows = jnp.full((part,), amax, jnp.float32)
    for c in range(4):
        x8, scale = _quantize(rows(c * part, part), amax_rows, recip)
        plgpu.store(x8_ref.at[pl.ds(c * part, part)], x8)
        plgpu.store(scale_ref.at[pl.ds(c * part, part)], scale)


def variant(x, mean, *, name, block_rows, warps, k_side, recip=False, sweep=False, interpret=False):
    b, s, h, d = x.shape  # bsnd
    dp = 64 if d <= 64 else 128
    rows_pad = -(-s // 256) * 256
    spec = pl.BlockSpec((_SQ, block_rows, _SQ, dp), lambda b_, h_, i: (b_, i, h_, 0))
    return pl.pallas_call(
        functools.partial(_kernel, n_rows=s, d=d, k_side=k_side, recip=recip, sweep=sweep),
        grid=(b, h, rows_pad // block_rows),
        in_specs=[spec, pl.BlockSpec((_SQ, _SQ, dp), lambda b_, h_, i: (b_, h_, 0))],
        out_specs=[pl.BlockSpec((_SQ, _SQ, block_rows, dp), lambda b_, h_, i: (b_, h_, i, 0)),
                   pl.BlockSpec((_SQ, _SQ, block_rows), lambda b_, h_, i: (b_, h_, i))],
        out_shape=[jax.ShapeDtypeStruct((b, h, rows_pad, dp), jnp.int8),
                   jax.ShapeDtypeStruct((b, h, rows_pad), jnp.float32)],
        interpret=interpret, compiler_params=plgpu.CompilerParams(num_warps=warps, num_stages=1),
        name=name)(x, mean)


def main():
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    interpret = "--interpret" in sys.argv
    args = [a for a in sys.argv[1:] if a != "--interpret"]
    b, n, s, d = map(int, args) if args else (1, 2, 300, 40)
    rng = np.random.default_rng(0)
    x = jax.device_put(rng.standard_normal((b, s, n, d)).astype(jnp.bfloat16))
    mean = jnp.asarray(rng.standard_normal((b, n, 64 if d <= 64 else 128)), jnp.float32)
    mean = mean.at[..., d:].set(0.0)
    dp = mean.shape[-1]
    rows_pad = -(-s // 256) * 256
    ref_k = P.quantize_rows(x, mean[..., :d], layout="bsnd", rows_pad=rows_pad, dp=dp, groups=1,
                            subtract_mean=True, block_rows=256, block_scale=True, interpret=interpret)
    ref_q = P.quantize_rows(x, mean[..., :d], layout="bsnd", rows_pad=rows_pad, dp=dp, groups=1,
                            interpret=interpret)
    runs = []
    for w in (4, 8, 16):
        runs += [dict(name=f"k_{w}", block_rows=256, warps=w, k_side=True),
                 dict(name=f"k_recip_{w}", block_rows=256, warps=w, k_side=True, recip=True),
                 dict(name=f"k_sweep_{w}", block_rows=256, warps=w, k_side=True, sweep=True),
                 dict(name=f"k_sweep_recip_{w}", block_rows=256, warps=w, k_side=True, sweep=True,
                      recip=True)]
    for w in (4, 8):
        runs += [dict(name=f"q_{w}", block_rows=64, warps=w, k_side=False),
                 dict(name=f"q_recip_{w}", block_rows=64, warps=w, k_side=False, recip=True)]
    for rows in (32, 128, 256):  # Q's rows per program (call 3)
        for w in (2, 4, 8):
            runs.append(dict(name=f"q_recip_{rows}r_{w}", block_rows=rows, warps=w, k_side=False,
                             recip=True))
    for kw in runs:
        try:
            x8, sc = jax.block_until_ready(variant(x, mean, interpret=interpret, **kw))
            r8, rs = ref_k if kw["k_side"] else ref_q
            steps = int(np.abs(np.asarray(x8, np.int32) - np.asarray(r8, np.int32)).max())
            sc_err = float(np.abs(np.asarray(sc) / np.asarray(rs) - 1).max())
            log.info("%-20s max int8 step vs library %d, scale rel err %.1e", kw["name"], steps, sc_err)
        except Exception as e:  # noqa: BLE001  (one failure must not stop the sweep)
            log.info("%-20s ERROR %s: %s", kw["name"], type(e).__name__, str(e)[:400])


if __name__ == "__main__":
    main()
