"""Where the `sage` kernel's time goes, by taking parts of it away: each ablation patches
`jax_attn.kernels.sage_forward` while the call is traced, and the whole call (pre-pass
included, the same in every row) is timed. The ablated results are wrong on purpose and never
checked; the exact rewrites (`max_tree`, `regs240` and the `CONFIGS` rows) are checked against
the default's output first, and a row off by more than 1e-2 is not timed.

    PYTHONUNBUFFERED=1 PYTHONPATH=. python benchmarks/sage_ablation.py [--shapes 0,1,2]

Rows:
  default       the kernel as it ships
  no_exp        exp2(x) replaced by x: the softmax without its MUFU.EX2 per logit
  no_max        the row max replaced by max(m, 0): no per-logit max, no shuffles
  softmax_only  both wgmmas dropped (S stays at its start value, opaque to the compiler). P is
                then read by nothing, so the compiler drops its exp2s too: this row is the
                pipeline's skeleton (loads, barriers, row max, O's rescale, epilogue), not
                the softmax
  gemm_only     the softmax replaced by P = S's bits as float (no max, FMA or exp2)
  no_pv         the P V wgmma dropped (and with it P's exp2s, as in softmax_only)
  no_qk         the Q K^T wgmma dropped: P V with the whole softmax on a constant S
  regs240       240 registers per compute thread, 24 per producer thread (232 / 40 ship)
  max_tree      the row max as a tree of halvings (exact: max is associative) instead of
                Mosaic GPU's one dependent chain along each row's registers
Configurations (`CONFIGS`, each checked against the default's output first):
  free          pingpong=False, the warpgroups not taking turns
(Round 20 also ran SageConfig.paired_issue's configurations here, `paired*`, since reverted:
results/2026-12-02-h200-round20/paired_issue.patch.)

`ABLATION@CONFIG` (e.g. `gemm_only@free`) takes a part away from a configuration.

`default` - `no_exp` is the exp2s' exposed cost: zero if the matmuls hid them entirely.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import math
import sys
import pathlib

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).parent))

CONFIGS = {
    "free": dict(pingpong=False),
}
SHAPES = [(1, 24, 16384, 128), (1, 24, 4608, 128), (2, 10, 4096, 64), (2, 8, 4096, 40)]
log = logging.getLogger("sage_ablation")


def _tile_scale_softmax(variant):
    """`sage_forward._softmax_tile_scale` with one part taken away (or the max as a tree)."""
    import jax.numpy as jnp
    from jax import lax

    from jax_attn.kernels import sage_forward as sf
    from jax_attn.quantization import LOG2_P_SCALE, MAGIC_F

    def row_max(u):
        if variant != "max_tree":
            return u.max(axis=1)
        w = u.shape[1]
        while w > 8 and w % 16 == 0:  # halve along whole 8-column tiles of the wgmma layout
            w //= 2
            u = jnp.maximum(u[:, :w], u[:, w:2 * w])
        return u.max(axis=1)

    def softmax(fw, s, ks, kbias, qs, m_i, l_i, seg=None):
        bq, bk = fw.bq, fw.bk
        u = lax.bitcast_convert_type(sf._magic(fw, s), jnp.float32)
        if fw.has_kb:
            u = u + lax.broadcast_in_dim(kbias, (bq, bk), [1])
        if seg is not None:
            u = jnp.where(seg, u, -jnp.inf)
        if variant == "gemm_only":
            return u, jnp.ones_like(m_i), l_i, m_i
        c = qs * ks
        if variant == "no_max":
            m_new = jnp.maximum(m_i, jnp.zeros_like(m_i))
        else:
            m_new = jnp.maximum(m_i, (row_max(u) - MAGIC_F) * c)
        m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new) if fw.masked else m_new
        bias = MAGIC_F * c + (m_use - LOG2_P_SCALE)
        x = u * lax.broadcast_in_dim(c, (bq, bk), [0]) - lax.broadcast_in_dim(bias, (bq, bk), [0])
        p = x if variant == "no_exp" else jnp.exp2(x)
        alpha = jnp.exp2(m_i - m_use)
        if fw.rowsum:
            return p, alpha, l_i, m_new
        return p, alpha, l_i * alpha + p.sum(axis=1), m_new

    return softmax


class _Plgpu:
    """`plgpu` with `wgmma` dropped where `drop(acc_ref, a, b)` says so, and the registers
    `set_max_registers` asks for mapped through `regs`."""

    def __init__(self, real, drop=lambda *_: False, regs=None):
        self._real, self._drop, self._regs = real, drop, regs or {}

    def __getattr__(self, name):
        return getattr(self._real, name)

    def wgmma(self, acc, a, b, **kw):
        if not self._drop(acc, a, b):
            self._real.wgmma(acc, a, b, **kw)

    def set_max_registers(self, n, **kw):
        self._real.set_max_registers(self._regs.get(n, n), **kw)


@contextlib.contextmanager
def ablation(variant):
    from jax_attn.kernels import sage_forward as sf
    saved = (sf._softmax_tile_scale, sf.plgpu)
    try:
        if variant in ("no_exp", "no_max", "gemm_only", "max_tree"):
            sf._softmax_tile_scale = _tile_scale_softmax(variant)
        if variant in ("softmax_only", "no_pv", "no_qk"):
            def drop(acc, a, b):
                is_qk = getattr(acc, "dtype", None) is not None and "int" in str(acc.dtype)
                return variant == "softmax_only" or (variant == "no_qk") == is_qk
            sf.plgpu = _Plgpu(sf.plgpu, drop)
        if variant == "regs240":  # FlashAttention-3's split: 240 per compute thread, 24 producer
            sf.plgpu = _Plgpu(sf.plgpu, regs={232: 240, 40: 24})
        yield
    finally:
        sf._softmax_tile_scale, sf.plgpu = saved


def main():
    import dataclasses

    import jax
    import jax.numpy as jnp

    import jax_attn
    from jax_attn.arrays import random_normal
    from jax_attn.kernels import sage_attention as S
    from jax_attn.kernels import sage_prepass as P
    from jax_attn.kernels.sage_forward import SageConfig
    from tune_pallas import time_ms

    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="0,1,2,3")
    ap.add_argument("--interpret", action="store_true",
                    help="a CPU check of the patches on a tiny shape (no timing is meaningful)")
    ap.add_argument("--variants", default="default,no_exp,no_max,softmax_only,gemm_only,no_pv,"
                    "no_qk,free,regs240,max_tree")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    table = []
    shapes = [(1, 2, 512, 64)] if args.interpret else [SHAPES[i] for i in map(int, args.shapes.split(","))]
    for b, n, s, d in shapes:
        key = f"{b}x{n}x{s}x{d}"
        flops = 4.0 * b * n * s * s * d
        ks = jax.random.split(jax.random.key(0), 3)
        q, k, v = (random_normal(kk, (b, s, n, d), jnp.bfloat16) for kk in ks)
        dp = S.head_dim_padded(d)
        cfg0 = SageConfig().resolved(dp)
        row = {"shape": key}
        cudnn = jax.jit(lambda a, b_, c: jax_attn.attention_forward(a, b_, c, layout="bsnd",
                                                                   backend="cudnn"))
        row["cudnn"] = float("nan") if args.interpret else time_ms(cudnn, q, k, v, reps=10)
        pre = jax.jit(lambda a, b_, c: P.quantize(
            a, b_, c, layout="bsnd", scale=1 / math.sqrt(d), dp=dp,
            sq_pad=-(-s // 128) * 128, skv_pad=-(-s // cfg0.block_kv) * cfg0.block_kv,
            v_key_perm=True, v_pallas=True, k_rows=cfg0.block_kv, interpret=args.interpret))
        row["prepass"] = float("nan") if args.interpret else time_ms(pre, q, k, v, reps=10)
        ref = None
        for variant in args.variants.split(","):
            part, _, config = variant.partition("@")
            cfg = SageConfig(**CONFIGS.get(config or part, {}))
            try:
                with ablation(part):
                    fn = jax.jit(lambda a, b_, c, cfg=cfg: S.sage_attention(
                        a, b_, c, layout="bsnd", config=cfg, interpret=args.interpret))
                    out = jax.block_until_ready(fn(q, k, v))
                if variant == "default":
                    ref = np.asarray(out[:1, :256], np.float32)
                elif (variant in CONFIGS or variant in ("max_tree", "regs240")) and ref is not None:
                    got = np.asarray(out[:1, :256], np.float32)
                    err = float(np.abs(got - ref).max() / np.abs(ref).max())
                    log.info("%s %s vs default: max rel %.2e", key, variant, err)
                    if err > 1e-2:
                        row[variant] = float("nan")
                        continue
                if args.interpret:
                    continue
                row[variant] = time_ms(fn, q, k, v, reps=10)
                log.info("%s %s: %.3f ms (%.0f TFLOP/s)", key, variant, row[variant],
                         flops / row[variant] / 1e9)
            except Exception as e:  # noqa: BLE001
                log.exception("%s %s failed: %s", key, variant, e)
                row[variant] = float("nan")
        table.append(row)
    cols = ["cudnn", "prepass", *args.variants.split(",")]
    print("| shape | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for row in table:
        print(f"| {row['shape']} | " + " | ".join(f"{row.get(c, float('nan')):.3f}" for c in cols)
              + " |")


if __name__ == "__main__":
    main()
