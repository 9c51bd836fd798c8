"""The `sage` backend: its 8-bit scheme (simulation vs float64) and its kernel (Mosaic GPU
interpret mode vs the simulation).

What this proves: the scheme's accuracy on the two input families (`jax_attn.quantization`
simulated in jnp), and that the kernel body computes that scheme: quantized operands, scales,
online softmax, P cast to e4m3, masking (per-key masks, kv_lengths, padded tails, empty rows),
GQA, both layouts, padded head dims, the lse with the smoothing shift; plus the backend's routing
and its refusal to be differentiated. What it cannot prove: interpret mode runs the matmuls as
`lax.dot_general` (no wgmma, no smem swizzle, no register layouts), so whether the kernel lowers
and its speed are for `benchmarks/sage_device.py` on an H100/H200.
"""
from __future__ import annotations

import dataclasses
import os

os.environ.setdefault("JAX_ATTN_INTERPRET", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import jax_attn  # noqa: E402
from jax_attn import quantization as Q  # noqa: E402
from jax_attn import reference  # noqa: E402
from jax_attn.backends import BACKENDS  # noqa: E402
from jax_attn.contract import validate  # noqa: E402
from jax_attn.kernels import sage_attention as S  # noqa: E402
from jax_attn.kernels import sage_forward, sage_prepass  # noqa: E402
from jax_attn.kernels.mosaic_config import available  # noqa: E402
from jax_attn.kernels.sage_forward import SageConfig  # noqa: E402

needs_mgpu = pytest.mark.skipif(available() is not None, reason=f"no Mosaic GPU Pallas: {available()}")
SMALL = SageConfig(block_q=64, block_kv=64, stages=2)  # tiny interpret-mode shapes
# Each kernel path against its simulation: the default (P as the register operand, the fused
# softmax, two-level P V), the path first measured (P through shared memory, the plain softmax)
# and the mixes a device run compares (see benchmarks/sage_device.py --variants).
PATHS = {
    "default": SMALL,
    "old": SageConfig(block_q=64, block_kv=64, stages=2, p_in_registers=False,
                      fused_softmax=False),
    "regs_plain_1level": SageConfig(block_q=64, block_kv=64, stages=2, fused_softmax=False,
                                    two_level_pv=False),
    "smem_fused_1level": SageConfig(block_q=64, block_kv=64, stages=3, p_in_registers=False,
                                    two_level_pv=False),
    "free": SageConfig(block_q=64, block_kv=64, stages=2, pingpong=False),
    # the default before round 16: the row sum by the softmax's adds, S's accumulator from 0
    "no_rowsum_no_magic": SageConfig(block_q=64, block_kv=64, stages=2, rowsum_mma=False,
                                     magic_acc=False),
    # the row sum's one-level path (fresh l columns per block) with the MAGIC_I accumulator
    "rowsum_1level_magic": SageConfig(block_q=64, block_kv=64, stages=2, two_level_pv=False,
                                      magic_acc=True),
}

# What the simulated scheme reaches, worst head (measured: normal d=64/128 cos 0.9992, rel L1
# 0.039; outlier family cos 0.9990, rel L1 0.040). Bounds a little below, to catch a regression.
COS_MIN = {"normal": 0.999, "outlier": 0.998}
L1_MAX = 0.045
# The brief's target. e4m3 keeps 3 mantissa bits, so P and V each carry ~2.6% RMS relative
# rounding error, ~3.7% together: on iid inputs that alone is cos ~0.9993, rel L1 ~0.037.
TARGET_COS, TARGET_L1 = 0.9995, 0.02


def _bf16_f64(x):
    return np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32), np.float64)


def family(name, shape_q, shape_kv, seed=0):
    """standard normal, or 'outlier': heavy-tailed Q (student-t, 3 dof) and a large per-channel
    offset in K (8x a standard normal per channel, shared by every token)."""
    rng = np.random.default_rng(seed)
    q, k, v = rng.standard_normal(shape_q), rng.standard_normal(shape_kv), rng.standard_normal(shape_kv)
    if name == "outlier":
        q = rng.standard_t(3, shape_q)
        k = k + 8.0 * rng.standard_normal((1, 1, 1, shape_kv[-1]))
    return tuple(_bf16_f64(x) for x in (q, k, v))


def _sim_accuracy(fam, d):
    q, k, v = family(fam, (1, 2, 512, d), (1, 2, 512, d))
    ref, rlse = reference.attention(q, k, v, return_lse=True)
    out, lse = Q.sage_reference(*(jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)))
    return Q.accuracy(out, ref), np.abs(np.asarray(lse, np.float64) - rlse).max()


@pytest.mark.fast_every(2)
@pytest.mark.parametrize("fam", ["normal", "outlier"])
@pytest.mark.parametrize("d", [64, 128])
def test_scheme_accuracy_vs_float64(fam, d):
    acc, lse_err = _sim_accuracy(fam, d)
    assert acc["cos_min"] >= COS_MIN[fam] and acc["rel_l1_max"] <= L1_MAX, acc
    assert lse_err < (0.05 if fam == "normal" else 0.5), lse_err  # the smoothing shift is added back


@pytest.mark.xfail(strict=True, reason="FP8 e4m3 P and V cannot reach cos >= 0.9995 / rel L1 <= 0.02 "
                   "on iid inputs (see TARGET_COS); strict, so a change that reaches it shows up")
@pytest.mark.parametrize("fam", ["normal", "outlier"])
def test_brief_target_accuracy(fam):
    acc, _ = _sim_accuracy(fam, 128)
    assert acc["cos_min"] >= TARGET_COS and acc["rel_l1_max"] <= TARGET_L1, acc


def _attention_f64(q, k, v, round_p=None):
    """float64 attention (b, n, s, d), the unnormalized P optionally rounded by `round_p` (the
    row sum stays exact, so only the rounding of the P V operand shows)."""
    s = np.einsum("bnqd,bnkd->bnqk", q, k) / np.sqrt(q.shape[-1])
    p = np.exp(s - s.max(-1, keepdims=True))
    l = p.sum(-1, keepdims=True)
    return np.einsum("bnqk,bnkd->bnqd", p if round_p is None else round_p(p), v) / l


def _e4m3(x):  # the scheme's rounding (quantization.fp8), back in float64
    return np.asarray(Q.fp8(jnp.asarray(x, jnp.float32)).astype(jnp.float32), np.float64)


def test_e4m3_rounding_alone_misses_the_l1_target():
    # Why `sage` cannot reach the brief's relative L1 <= 0.02 on standard-normal inputs: with
    # everything else in float64, rounding V alone to e4m3 (its channel scale to 448, as the
    # scheme) leaves ~0.028, P alone (scaled by P_SCALE) ~0.025, both ~0.037, which is what
    # `sage` measures (README). Any FP8 e4m3 P V has this floor; `sage16` does not.
    q, k, v = family("normal", (1, 4, 512, 128), (1, 4, 512, 128))
    ref = _attention_f64(q, k, v)
    v_scale = np.abs(v).max(axis=2, keepdims=True) / Q.FP8_MAX
    v_only = Q.accuracy(_attention_f64(q, k, _e4m3(v / v_scale) * v_scale), ref)
    p_only = Q.accuracy(_attention_f64(q, k, v, lambda p: _e4m3(p * Q.P_SCALE) / Q.P_SCALE), ref)
    for acc in (v_only, p_only):
        assert 0.022 < acc["rel_l1_max"] < 0.033, acc
    both = Q.accuracy(_attention_f64(q, k, _e4m3(v / v_scale) * v_scale,
                                     lambda p: _e4m3(p * Q.P_SCALE) / Q.P_SCALE), ref)
    assert both["rel_l1_max"] > 0.033 and both["cos_min"] < TARGET_COS, both


def test_int8_q_alone_misses_the_target_on_heavy_tails_at_d128():
    # Why `sage16` misses the brief's target on the outlier family at d = 128: with K, V and
    # the softmax in float64, rounding Q alone to INT8 with one scale per token (the finest a
    # single INT8 product allows: a scale must factor out of the contraction) already gives
    # about cos 0.9992 / rel L1 0.022 for student-t(3) Q. At d = 64 the same rounding passes.
    worst = {}
    for d in (64, 128):
        q, k, v = family("outlier", (1, 4, 1024, d), (1, 4, 1024, d))
        q8, q_scale = Q._int8_blocks(jnp.asarray(q, jnp.float32), 1)
        q_hat = np.asarray(q8, np.float64) * np.asarray(q_scale, np.float64)[..., None]
        worst[d] = Q.accuracy(_attention_f64(q_hat, k, v), _attention_f64(q, k, v))
    assert worst[128]["cos_min"] < TARGET_COS and worst[128]["rel_l1_max"] > TARGET_L1, worst
    assert worst[64]["cos_min"] >= TARGET_COS and worst[64]["rel_l1_max"] <= TARGET_L1, worst


@pytest.mark.parametrize("fam", ["normal", "outlier"])
@pytest.mark.parametrize("d", [64, 128])
def test_pv16_accuracy_vs_float64(fam, d):
    """The 16-bit P V variant (SageConfig(pv_bits=16)): only Q K^T is 8-bit. It reaches the brief's
    target on normal inputs; with outliers the INT8 Q K^T of heavy-tailed Q is what is left
    (the README's inputs, 1024 tokens, 4 heads: cos 0.9995 / L1 0.020 at d = 64, 0.9992 / 0.024
    at d = 128; this test runs 512 tokens, 2 heads)."""
    with pytest.raises(ValueError, match="v_key_perm applies to the FP8"):
        Q.sage_reference(*(jnp.zeros((1, 1, 128, 64), jnp.bfloat16),) * 3, pv16=True,
                         v_key_perm=True)
    q, k, v = family(fam, (1, 2, 512, d), (1, 2, 512, d))
    ref = reference.attention(q, k, v)
    args = [jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)]
    acc8 = Q.accuracy(Q.sage_reference(*args)[0], ref)
    # one K scale per token, and what the kernel runs by default (one per key block)
    shipped = SageConfig(pv_bits=16).resolved(d)
    for acc16 in (Q.accuracy(Q.sage_reference(*args, pv16=True)[0], ref),
                  Q.accuracy(Q.sage_reference(*args, block_k=shipped.block_kv,
                                              **S.sim_flags(shipped))[0], ref)):
        assert acc16["cos_min"] > acc8["cos_min"] and acc16["rel_l1_max"] < acc8["rel_l1_max"]
        if fam == "normal":
            assert acc16["cos_min"] >= TARGET_COS and acc16["rel_l1_max"] <= TARGET_L1, acc16
        else:
            assert acc16["cos_min"] >= 0.998 and acc16["rel_l1_max"] <= 0.03, acc16


def test_smoothing_is_what_saves_k_offsets():
    # Same inputs, K smoothed vs K with its offset left in: the offset sets the INT8 scale then.
    q, k, v = family("outlier", (1, 1, 256, 64), (1, 1, 256, 64), seed=1)
    ref = reference.attention(q, k, v)
    good = Q.accuracy(Q.sage_reference(*(jnp.asarray(x) for x in (q, k, v)))[0], ref)
    k_off = k + 1e4 * np.sign(k.mean(2, keepdims=True))  # mean shifts; smoothing removes it again
    moved = Q.accuracy(Q.sage_reference(*(jnp.asarray(x) for x in (q, k_off, v)))[0],
                       reference.attention(q, k_off, v))
    assert abs(good["cos"] - moved["cos"]) < 2e-3, (good, moved)


def test_quantizers_round_trip():
    x = jnp.asarray(np.random.default_rng(2).standard_normal((1, 1, 128, 64)), jnp.float32)
    x8, s = Q._int8_blocks(x, 64)
    assert x8.dtype == jnp.int8 and int(jnp.abs(x8.astype(jnp.int32)).max()) == 127
    err = jnp.abs(x8.astype(jnp.float32) * s[..., None] - x)
    assert float((err / s[..., None]).max()) <= 0.5 + 1e-6  # half a step, round to nearest
    assert float(Q.fp8(jnp.float32(448.3)).astype(jnp.float32)) == 448.0  # clipped, never NaN
    z8, zs = Q._int8_blocks(jnp.zeros((1, 1, 64, 64)), 64)
    assert float(jnp.abs(z8).max()) == 0 and float(zs.min()) == 1.0  # zero block: no 0/0


def check_kernel(b, n, n_kv, sq, skv, d, *, dtype="bfloat16", layout="bnsd", kv_lengths=None,
                 key_mask=None, seed=0, q_rows=1, k_rows=1, config=SMALL, segments=None):
    """Kernel (interpret mode) vs the simulation: the same bits in, so only float32 summation
    order, and the output's final rounding to `dtype`, may differ."""
    rng = np.random.default_rng(seed)
    shapes = ((b, n, sq, d), (b, n_kv, skv, d), (b, n_kv, skv, d))
    t = (lambda x: x) if layout == "bnsd" else (lambda x: np.swapaxes(x, 1, 2))
    q, k, v = (jnp.asarray(t(rng.standard_normal(s)), dtype) for s in shapes)
    kw = dict(layout=layout, q_rows=q_rows, k_rows=k_rows,
              kv_lengths=None if kv_lengths is None else jnp.asarray(kv_lengths, jnp.int32))
    if segments is not None:
        kw.update(q_segment_ids=jnp.asarray(segments[0]), kv_segment_ids=jnp.asarray(segments[1]))
    out, lse = S.sage_attention(q, k, v, return_lse=True, config=config, interpret=True,
                                key_mask=key_mask, **kw)
    so, slse = Q.sage_reference(q, k, v, block_q=config.block_q, block_k=config.block_kv,
                                key_mask=None if key_mask is None else jnp.asarray(key_mask)[:, :, 0, :],
                                **kw, **S.sim_flags(config))
    assert out.dtype == jnp.dtype(dtype) and out.shape == q.shape and lse.shape == (b, n, sq)
    so_d = np.asarray(jnp.asarray(so).astype(dtype).astype(jnp.float32))
    ulp = 2.0 ** -7 if dtype == "bfloat16" else 2.0 ** -10
    np.testing.assert_allclose(np.asarray(out, np.float32), so_d, rtol=2 * ulp, atol=1e-3)
    lse, slse = np.asarray(lse), np.asarray(slse)
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(slse))
    fin = np.isfinite(slse)
    np.testing.assert_allclose(lse[fin], slse[fin], atol=1e-4, rtol=1e-5)
    # And the scheme, through the kernel, still tracks float64 (same family as the bounds above).
    ref = reference.attention(*(np.asarray(jnp.asarray(x).astype(jnp.float32), np.float64)
                                for x in (t(np.asarray(q, np.float32)), t(np.asarray(k, np.float32)),
                                          t(np.asarray(v, np.float32)))),
                              attn_mask=key_mask, kv_lengths=kv_lengths,
                              **({} if segments is None else dict(q_segment_ids=segments[0],
                                                                  kv_segment_ids=segments[1])))
    rows = np.isfinite(slse)[..., None] & np.ones((1, 1, 1, d), bool)
    got = t(np.asarray(out, np.float64))
    assert reference.relative_error(np.where(rows, got, 0), np.where(rows, ref, 0)) < 0.06
    return out, lse


@pytest.mark.slow
@needs_mgpu
def test_kernel_tails_gqa_padded_head_dim():
    # 100 queries (one CTA, padded), 200 keys (4 steps through a 2-slot ring, tail masked),
    # d = 40 run at 64, two query heads sharing one k/v head.
    check_kernel(1, 2, 1, 100, 200, 40)


@needs_mgpu
@pytest.mark.parametrize("layout,d,dtype", [("bsnd", 80, "bfloat16"), ("bnsd", 40, "float16"),
                                            ("bnsd", 36, "bfloat16")])
def test_kernel_writes_the_callers_head_dim(layout, d, dtype):
    # SageConfig.narrow_output: at d = 40 and 80 the kernel's output has d columns (no XLA slice
    # of a dp-wide output follows), with the values of the dp-wide path; d = 36 is no multiple of
    # 8 (the layout's column tile), so it keeps dp columns. Interpret mode has no swizzle or TMA:
    # the unswizzled tile and the (rows, d) boxes are checked by the GPU smoke runs
    # (benchmarks/sage_device.py, d = 40 and 80).
    check_kernel(1, 2, 1, 128, 200, d, layout=layout, dtype=dtype)
    rng = np.random.default_rng(0)
    shape = (1, 2, 128, d) if layout == "bnsd" else (1, 128, 2, d)
    q, k, v = (jnp.asarray(rng.standard_normal(shape), dtype) for _ in range(3))
    wide = dataclasses.replace(SMALL, narrow_output=False)
    outs = [S.sage_attention(q, k, v, layout=layout, config=c, interpret=True) for c in (SMALL, wide)]
    np.testing.assert_array_equal(np.asarray(outs[0], np.float32), np.asarray(outs[1], np.float32))
    dp = S.head_dim_padded(d)
    qz = sage_prepass.quantize(q, k, v, layout=layout, scale=d ** -0.5, dp=dp, sq_pad=128,
                               skv_pad=128, v_key_perm=True, interpret=True,
                               k_rows=SMALL.resolved(dp).block_kv, v_pallas=True)
    for cfg, cols in ((SMALL, d if d % 8 == 0 else dp), (wide, dp)):
        o, _ = sage_forward.sage_call(cfg, qz, None, out_dtype=dtype, out_layout=layout,
                                      groups=1, key_bias_dims=None, interpret=True, d=d)
        assert o.shape[-1] == cols


@needs_mgpu
@pytest.mark.parametrize("case", ["gqa-masked-odd-steps", "bsnd-segments-stages3",
                                  "two-ctas-d40"])
def test_persistent_grid_vs_simulation(case):
    # SageConfig.persistent (the default; every kernel test here runs it, but this one names
    # the cases): 3 CTAs (interpret mode's default) loop over the query tiles, the
    # ring's slots and barrier phases running on from tile to tile, and each warpgroup's next Q
    # loading into its second buffer. Odd key-block counts put a tile's first block in slot 1;
    # 8 tiles over 3 CTAs leave them 3, 3 and 2 tiles; 3 tiles over 2 CTAs, 2 and 1. Against
    # the simulation, and bit for bit against the one-CTA-per-tile grid (same arithmetic).
    rng = np.random.default_rng(9)
    segments = None
    if case == "gqa-masked-odd-steps":  # 3 key blocks of 64, 2 slots
        b, n, n_kv, sq, skv, d, layout, dtype = 2, 4, 2, 128, 150, 64, "bnsd", "bfloat16"
        cfg = dataclasses.replace(SMALL, persistent=True)
        kw = dict(key_mask=rng.random((b, 1, 1, skv)) > 0.3, kv_lengths=[150, 97])
    elif case == "bsnd-segments-stages3":
        b, n, n_kv, sq, skv, d, layout, dtype = 1, 2, 1, 256, 200, 128, "bsnd", "bfloat16"
        cfg = dataclasses.replace(SMALL, persistent=True, stages=3)
        segments = (np.repeat([0, 1, 2], [100, 100, 56])[None].astype(np.int32),
                    np.repeat([0, 1, 2], [90, 60, 50])[None].astype(np.int32))
        kw = {}
    else:
        b, n, n_kv, sq, skv, d, layout, dtype = 1, 3, 1, 128, 200, 40, "bnsd", "float16"
        cfg = dataclasses.replace(SMALL, persistent=True, persistent_ctas=2)
        kw = {}
    check_kernel(b, n, n_kv, sq, skv, d, layout=layout, dtype=dtype, config=cfg,
                 segments=segments, seed=3, **kw)
    shp = lambda h, s_: (b, h, s_, d) if layout == "bnsd" else (b, s_, h, d)
    q, k, v = (jnp.asarray(rng.standard_normal(x), dtype)
               for x in (shp(n, sq), shp(n_kv, skv), shp(n_kv, skv)))
    extra = {} if segments is None else dict(q_segment_ids=jnp.asarray(segments[0]),
                                             kv_segment_ids=jnp.asarray(segments[1]))
    extra.update({k_: (jnp.asarray(x, jnp.int32) if k_ == "kv_lengths" else jnp.asarray(x))
                  for k_, x in kw.items()})
    outs = [S.sage_attention(q, k, v, layout=layout, config=c, return_lse=True, interpret=True,
                             **extra)
            for c in (cfg, dataclasses.replace(cfg, persistent=False))]
    for a, b_ in zip(*outs):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b_, np.float32))


def test_persistent_grid_config():
    with pytest.raises(ValueError, match="persistent.*overlap=False"):
        SageConfig(persistent=True, overlap=True).resolved(64)
    # never more CTAs than tiles; one per tile where the device gives no SM count
    fw = sage_forward._Fwd(bq=64, bk=64, dp=64, n_steps=2, stages=2, out_dtype=jnp.bfloat16,
                           out_bnsd=True, has_kb=False, interp=False, groups=1,
                           key_bias_dims=None, two_level=True, p_regs=True, fused=True,
                           overlap=False, p_dtype=Q.FP8, persistent=True, tiles=(1, 2, 3))
    cfg = SageConfig(persistent=True)
    assert sage_forward._grid(dataclasses.replace(cfg, persistent_ctas=4), fw, False)["grid"] == (4,)
    assert sage_forward._grid(dataclasses.replace(cfg, persistent_ctas=16), fw, False)["grid"] == (6,)
    assert sage_forward._grid(cfg, fw, True)["grid"] == (3,)  # interpret mode
    plain = dataclasses.replace(fw, persistent=False)
    assert sage_forward._grid(cfg, plain, False) == dict(grid=(1, 2, 3), grid_names=("b", "h", "q"))


@pytest.mark.slow
@needs_mgpu
def test_kernel_bsnd_fp16_masks_lengths_empty_rows_d128():
    rng = np.random.default_rng(3)
    mask = rng.random((2, 2, 1, 150)) > 0.3
    mask[1, 1] = False  # a head with no key: zeros and lse = -inf
    out, lse = check_kernel(2, 2, 2, 64, 150, 128, dtype="float16", layout="bsnd",
                            kv_lengths=[0, 120], key_mask=mask, seed=1, q_rows=64, k_rows=64)
    np.testing.assert_array_equal(np.asarray(out[0], np.float32), 0.0)  # kv_lengths 0
    assert np.all(np.isneginf(np.asarray(lse)[0])) and np.all(np.isneginf(np.asarray(lse)[1, 1]))


@pytest.mark.slow
@pytest.mark.fast_every(3)
@needs_mgpu
@pytest.mark.parametrize("path", ["old", "regs_plain_1level", "smem_fused_1level", "free",
                                  "no_rowsum_no_magic", "rowsum_1level_magic"])
def test_kernel_paths_vs_simulation(path):
    # Every SageConfig path on the masked, padded, GQA case (the default path runs above).
    rng = np.random.default_rng(5)
    mask = rng.random((1, 1, 1, 200)) > 0.3
    check_kernel(1, 2, 1, 100, 200, 40, key_mask=mask, kv_lengths=[190], seed=2,
                 config=PATHS[path])


@needs_mgpu
@pytest.mark.parametrize("overlap", [False, True])
def test_kernel_pv16_vs_simulation(overlap):
    # P and V in bf16 (V unquantized, read as (keys, d) rows), P as the 16-bit register
    # operand; 3 blocks. bsnd with nothing to pad: the kernel reads the caller's V itself.
    cfg = dataclasses.replace(SMALL, pv_bits=16, overlap=overlap)
    check_kernel(1, 2, 1, 100, 192, 64, config=cfg)
    check_kernel(1, 2, 2, 128, 192, 64, layout="bsnd", config=cfg, seed=3)
    check_kernel(1, 4, 2, 100, 150, 64, layout="bsnd", config=cfg, seed=6)  # GQA, padded keys


def test_pv16_prepass_leaves_v_alone():
    # 16-bit P V, inputs already bf16 and unpadded: V reaches the kernel as the caller's array
    # values in the caller's layout (no transpose, no cast); padding only pads.
    rng = np.random.default_rng(5)
    for layout, shape in (("bnsd", (1, 2, 128, 64)), ("bsnd", (1, 128, 2, 64))):
        q, k, v = (jnp.asarray(rng.standard_normal(shape), jnp.bfloat16) for _ in range(3))
        kw = dict(layout=layout, scale=0.125, q_rows=1, k_rows=1, dp=64, sq_pad=128,
                  pv_dtype=jnp.bfloat16)
        qz = Q.quantize(q, k, v, skv_pad=128, **kw)
        assert qz.v_bsnd == (layout == "bsnd") and qz.vt8.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(qz.vt8, np.float32), np.asarray(v, np.float32))
        padded = Q.quantize(q, k, v, skv_pad=192, **kw).vt8
        keys = 1 if layout == "bsnd" else 2
        assert padded.shape[keys] == 192
        np.testing.assert_array_equal(np.take(np.asarray(padded, np.float32), range(128), keys),
                                      np.asarray(v, np.float32))
        assert not np.asarray(np.take(np.asarray(padded, np.float32), range(128, 192), keys)).any()


@pytest.mark.slow
@needs_mgpu
def test_kernel_pv16_fp16_masks_smem_p():
    rng = np.random.default_rng(7)
    mask = rng.random((2, 2, 1, 150)) > 0.3
    cfg = SageConfig(block_q=64, block_kv=64, stages=2, pv_bits=16, p_in_registers=False)
    check_kernel(2, 2, 2, 64, 150, 128, dtype="float16", layout="bsnd", kv_lengths=[0, 120],
                 key_mask=mask, seed=1, config=cfg)


def _packed_ids(b, s, cuts_per_row, rng):
    """Sorted segment ids of prompts of uneven lengths, one row per batch entry."""
    cuts = np.sort(rng.choice(np.arange(1, s), (b, cuts_per_row), replace=False), -1)
    return np.stack([np.searchsorted(c, np.arange(s), side="right") for c in cuts]).astype(np.int32)


@needs_mgpu
@pytest.mark.parametrize("overlap", [False, True])
def test_kernel_segment_ids_vs_simulation(overlap):
    # Packed prompts (sorted ids, 3 per row) over 4 key blocks; queries and keys share the ids.
    ids = _packed_ids(2, 200, 2, np.random.default_rng(8))
    cfg = dataclasses.replace(SMALL, overlap=overlap)
    check_kernel(2, 2, 1, 200, 200, 64, config=cfg, segments=(ids, ids))


@pytest.mark.slow
@needs_mgpu
def test_kernel_segment_ids_with_masks_bsnd_pv16():
    # Unsorted ids that leave some queries without any key of theirs (zeros, lse = -inf), with
    # kv_lengths and a key mask on top, bsnd, the 16-bit P V.
    rng = np.random.default_rng(9)
    q_ids = rng.integers(0, 3, (2, 70)).astype(np.int32)
    kv_ids = rng.integers(1, 4, (2, 150)).astype(np.int32)
    mask = rng.random((2, 1, 1, 150)) > 0.3
    cfg = SageConfig(block_q=64, block_kv=64, stages=2, pv_bits=16)
    out, lse = check_kernel(2, 2, 2, 70, 150, 40, layout="bsnd", kv_lengths=[150, 90],
                            key_mask=mask, config=cfg, segments=(q_ids, kv_ids), seed=4)
    assert np.isneginf(np.asarray(lse)[0, 0][q_ids[0] == 0]).all()


# --- one K scale per key block (SageConfig.k_scale_per_tile): the scales fold into exp2's FMA.

@pytest.mark.fast_every(2)
@needs_mgpu
@pytest.mark.parametrize("case", ["fp8-gqa", "pv16-masked-bsnd", "segments-overlap"])
def test_kernel_k_scale_per_tile_vs_simulation(case):
    cfg = dataclasses.replace(SMALL, k_scale_per_tile=True)
    if case == "fp8-gqa":  # 4 key blocks through a 2-slot ring, padded query rows
        _, lse = check_kernel(1, 2, 1, 100, 256, 64, config=cfg, seed=6)
        assert np.all(np.isfinite(lse))
    elif case == "pv16-masked-bsnd":  # dropped keys, an empty row, a ragged key tail, d = 40
        rng = np.random.default_rng(8)
        mask = rng.random((2, 1, 1, 150)) > 0.3
        mask[1] = False
        out, lse = check_kernel(2, 2, 2, 70, 150, 40, layout="bsnd", kv_lengths=[150, 90],
                                key_mask=mask, config=dataclasses.replace(cfg, pv_bits=16), seed=7)
        assert np.all(np.isneginf(np.asarray(lse)[1]))
    else:  # packed prompts through the overlapped pipeline
        ids = np.repeat(np.array([[0, 1, 2, 3]], np.int32), 50, axis=1)
        check_kernel(1, 2, 1, 200, 200, 64, config=dataclasses.replace(cfg, overlap=True),
                     segments=(ids, ids), seed=9)


def test_k_scale_per_tile_keeps_sage16_accurate():
    # What the coarser K scale costs (benchmarks/sage_scale_granularity.py): sage16 stays within
    # the brief's target on standard-normal inputs.
    q, k, v = family("normal", (1, 2, 512, 128), (1, 2, 512, 128))
    ref = reference.attention(q, k, v)
    args = [jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)]
    tile = Q.accuracy(Q.sage_reference(*args, pv16=True, fused_softmax=True, k_tile_scale=True)[0], ref)
    token = Q.accuracy(Q.sage_reference(*args, pv16=True, fused_softmax=True)[0], ref)
    assert tile["cos_min"] >= TARGET_COS and tile["rel_l1_max"] <= TARGET_L1, tile
    assert token["rel_l1_max"] <= tile["rel_l1_max"] < 1.5 * token["rel_l1_max"], (token, tile)


def test_k_scale_per_tile_validated():
    with pytest.raises(ValueError, match="needs fused_softmax"):
        SageConfig(k_scale_per_tile=True, fused_softmax=False).resolved(64)
    with pytest.raises(ValueError, match="k_rows=64 differs"):
        Q.sage_reference(*(jnp.ones((1, 1, 128, 64), jnp.bfloat16),) * 3, block_k=128, k_rows=64,
                         fused_softmax=True, k_tile_scale=True)
    with pytest.raises(ValueError, match="fused_softmax=True"):
        Q.simulate(None, block_k=64, k_tile_scale=True)


def test_pv_bits_validated():
    with pytest.raises(ValueError, match="pv_bits must be 8 or 16"):
        SageConfig(pv_bits=4).resolved(64)
    assert SageConfig(pv_bits=16).resolved(64).two_level_pv is False  # one accumulator in 16 bits


# --- intra-warpgroup overlap (SageConfig.overlap): S of the next block and P V of this one
# issued together, the next softmax while P V runs, the two warpgroups taking turns through their
# `turn` barriers (the interpreter checks every arrival and wait of that protocol).

@needs_mgpu
def test_overlap_pipeline_unmasked():
    # 4 key blocks through a 2-slot ring (prologue, 3 overlapped steps, epilogue), GQA, the
    # default path (P in registers, fused softmax, two-level P V at d = 64).
    _, lse = check_kernel(1, 2, 1, 128, 256, 64, config=dataclasses.replace(SMALL, overlap=True))
    assert np.all(np.isfinite(lse))


@pytest.mark.slow
@needs_mgpu
@pytest.mark.parametrize("path,d,skv,stages", [
    ("default", 40, 300, 3),  # 5 blocks through a 3-slot ring, ending mid-ring
    ("default", 40, 40, 2),  # a single key block: prologue and epilogue only
    ("default", 128, 200, 2),  # d = 128: one-level P V (P V accumulates onto O)
    ("old", 40, 250, 2),  # P through shared memory, the plain softmax
    ("regs_plain_1level", 40, 200, 3),
    ("smem_fused_1level", 40, 200, 2),
])
def test_overlap_masked_gqa_empty_row(path, d, skv, stages):
    # Two query heads per k/v head, bsnd, a query tail (70 of 128 rows), kv_lengths with an empty
    # batch, a per-head key mask with an empty head, the key tail: every row kind in one call.
    mask = np.random.default_rng(6).random((2, 4, 1, skv)) > 0.3
    mask[1, 3] = False
    cfg = dataclasses.replace(PATHS[path], stages=stages, overlap=True)
    out, lse = check_kernel(2, 4, 2, 70, skv, d, layout="bsnd", kv_lengths=[0, skv // 2],
                            key_mask=mask, seed=3, config=cfg)
    np.testing.assert_array_equal(np.asarray(out[0], np.float32), 0.0)
    assert np.all(np.isneginf(np.asarray(lse)[0])) and np.all(np.isneginf(np.asarray(lse)[1, 3]))


def test_key_perm_matches_register_relabelling():
    # The register relabelling (`sage_forward._p_to_8bit_layout`) reads thread j's accumulator
    # vectors (keys 2j, 2j+1 and 8+2j, 9+2j of each 16) as its 8-bit operand vector (positions
    # 4j..4j+3); V^T must present its keys in that order.
    order = np.asarray(Q.key_perm(jnp.arange(32)[None], 1))[0]
    want = [16 * c + k for c in range(2) for j in range(4) for k in (2 * j, 2 * j + 1, 8 + 2 * j, 9 + 2 * j)]
    np.testing.assert_array_equal(order, want)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 3, 48)))
    np.testing.assert_array_equal(Q.key_unperm(Q.key_perm(x, 2), 2), x)


@pytest.mark.parametrize("fam", ["normal", "outlier"])
def test_fused_softmax_costs_no_accuracy(fam):
    # The fused arithmetic rounds differently (FMA order, P_SCALE in exp2's bias), not worse.
    q, k, v = family(fam, (1, 2, 512, 128), (1, 2, 512, 128))
    ref = reference.attention(q, k, v)
    args = [jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)]
    plain = Q.accuracy(Q.sage_reference(*args)[0], ref)
    fused = Q.accuracy(Q.sage_reference(*args, fused_softmax=True, v_key_perm=True)[0], ref)
    assert abs(plain["cos_min"] - fused["cos_min"]) < 2e-5, (plain, fused)
    assert abs(plain["rel_l1_max"] - fused["rel_l1_max"]) < 1e-3, (plain, fused)


def test_resolved_by_head_dim():
    """Keys per step and the two-level P V follow the head dim unless set (H200 measurements)."""
    assert SageConfig().resolved(64).block_kv == 256 and SageConfig().resolved(128).block_kv == 256
    # 16-bit V at d = 128: two 256-key slots would exceed shared memory
    assert SageConfig(pv_bits=16).resolved(128).block_kv == 128
    assert SageConfig(pv_bits=16).resolved(64).block_kv == 256
    assert SMALL.resolved(128).block_kv == 64
    assert SageConfig().resolved(64).two_level_pv and not SageConfig().resolved(128).two_level_pv
    assert SageConfig(two_level_pv=True).resolved(128).two_level_pv
    assert not SageConfig(two_level_pv=False).resolved(64).two_level_pv
    assert SageConfig(overlap=True).resolved(64).block_kv == 128  # S and P live at once
    # S's accumulator from MAGIC_I at d <= 64 and, with 256-key blocks, at d = 128 (the H200's
    # measurements, rounds 16 and 17), never where the exponent trick or the plain pipeline is not
    assert SageConfig().resolved(64).magic_acc and SageConfig().resolved(128).magic_acc
    assert not SageConfig(block_kv=128).resolved(128).magic_acc  # slower there (round 16)
    assert not SageConfig(pv_bits=16).resolved(128).magic_acc  # 128-key blocks
    assert SageConfig(block_kv=128).resolved(64).magic_acc
    assert not SageConfig(overlap=True).resolved(64).magic_acc
    assert not SageConfig(fused_softmax=False).resolved(64).magic_acc
    # the row sum on the tensor cores wherever P V is FP8 with the per-tile K scale
    assert SageConfig().resolved(64).rowsum_mma and SageConfig().resolved(128).rowsum_mma
    assert not SageConfig(pv_bits=16).resolved(128).rowsum_mma
    assert not SageConfig(k_scale_per_tile=False).resolved(128).rowsum_mma
    # the persistent grid wherever the plain pipeline runs (H200 round 21)
    assert SageConfig().resolved(64).persistent and SageConfig(pv_bits=16).resolved(128).persistent
    assert not SageConfig(overlap=True).resolved(128).persistent
    assert not SageConfig(persistent=False).resolved(64).persistent


def test_rowsum_and_magic_validated():
    with pytest.raises(ValueError, match="rowsum_mma .* needs pv_bits=8"):
        SageConfig(rowsum_mma=True, pv_bits=16).resolved(64)
    with pytest.raises(ValueError, match="rowsum_mma .* needs pv_bits=8"):
        SageConfig(rowsum_mma=True, k_scale_per_tile=False).resolved(64)
    with pytest.raises(ValueError, match="magic_acc .* overlap=False"):
        SageConfig(magic_acc=True, overlap=True).resolved(64)
    with pytest.raises(ValueError, match="magic_acc .* fused_softmax=True"):
        SageConfig(magic_acc=True, fused_softmax=False).resolved(128)
    with pytest.raises(ValueError, match="rowsum_p8 is a variant"):
        Q.simulate(None, block_k=64, fused_softmax=True, rowsum_p8=True)


@pytest.mark.parametrize("fam", ["normal", "outlier"])
def test_rowsum_of_fp8_p_costs_no_accuracy(fam):
    # SageConfig.rowsum_mma: l sums P as rounded to e4m3 (the tensor cores sum what the P V
    # product used) instead of P in float32. Against float64 the output is as close as before
    # (O and l now share P's roundings). The lse is not: where a few keys dominate a row, their
    # e4m3 roundings (up to 1/16 each) do not average out in l (row sums 0.3-1.2% off on
    # 512 keys of standard-normal logits, times 1 to 4; measured here 3.4e-3 -> 7.3e-3).
    q, k, v = family(fam, (1, 2, 512, 128), (1, 2, 512, 128), seed=4)
    ref, rlse = reference.attention(q, k, v, return_lse=True)
    args = [jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)]
    kw = dict(fused_softmax=True, k_tile_scale=True, v_key_perm=True)
    (o32, l32), (o8, l8) = (Q.sage_reference(*args, **kw, rowsum_p8=r) for r in (False, True))
    assert not np.array_equal(np.asarray(o32), np.asarray(o8))  # the two sums differ...
    a32, a8 = Q.accuracy(o32, ref), Q.accuracy(o8, ref)
    assert abs(a32["rel_l1_max"] - a8["rel_l1_max"]) < 1e-3 and abs(a32["cos_min"] - a8["cos_min"]) < 1e-4
    e32, e8 = (float(np.abs(np.asarray(x, np.float64) - rlse).max()) for x in (l32, l8))
    assert e8 < e32 + 6e-3, (e32, e8)  # ...by e4m3's rounding of P


# ---------------------------------------------------------------------------------------------
# The backend


def _spec(**kw):
    q = jnp.zeros((1, 2, 64, kw.pop("d", 64)), kw.pop("dtype", jnp.bfloat16))
    return validate(q, q, q, **kw)


@pytest.mark.parametrize("name", ["sage", "sage16"])
def test_backend_declares_and_declines(name):
    sage = BACKENDS[name]
    assert sage.lossy is True
    assert sage.automatic is False
    assert sage.reasons(_spec()) == []  # interpret mode here
    assert any("dtype" in r for r in sage.reasons(_spec(dtype=jnp.float32)))
    assert any("causal" in r for r in sage.reasons(_spec(is_causal=True)))
    assert any("full" in r for r in sage.reasons(_spec(attn_mask=jnp.ones((64, 64), bool))))
    assert sage.reasons(_spec(attn_mask=jnp.ones((1, 1, 1, 64), bool))) == []
    assert any("head dim" in r for r in sage.reasons(_spec(d=256)))


def test_auto_never_picks_sage():
    q = jnp.zeros((1, 2, 64, 64), jnp.bfloat16)
    assert jax_attn.explain(q, q, q).backend not in ("sage", "sage16")


@needs_mgpu
def test_backend_forward_and_gradient_refused():
    # Both variants through attention_forward against float64; sage16 (16-bit P V) is the one
    # that meets the bound (and differs from sage: its config reached the kernel).
    rng = np.random.default_rng(4)
    q, k, v = (jnp.asarray(rng.standard_normal((1, 70, 2, 64)), jnp.bfloat16) for _ in range(3))
    ref, rlse = reference.attention(*(np.swapaxes(np.asarray(x, np.float64), 1, 2) for x in (q, k, v)),
                                    return_lse=True)
    outs = {}
    for name, cos in (("sage", 0.998), ("sage16", 0.9995)):
        out, lse = jax_attn.attention_forward(q, k, v, layout="bsnd", backend=name, return_lse=True)
        acc = Q.accuracy(np.swapaxes(np.asarray(out, np.float64), 1, 2), ref)
        assert acc["cos_min"] > cos, (name, acc)
        np.testing.assert_allclose(np.asarray(lse), rlse, atol=0.05)
        outs[name] = np.asarray(out, np.float32)
        with pytest.raises(ValueError, match=f"backend='{name}' is forward-only"):
            jax.grad(lambda q: jax_attn.attention_forward(q, k, v, layout="bsnd", backend=name)
                     .astype(jnp.float32).sum())(q)
    assert not np.array_equal(outs["sage"], outs["sage16"])
    assert (Q.accuracy(np.swapaxes(outs["sage16"], 1, 2), ref)["rel_l1_max"]
            < Q.accuracy(np.swapaxes(outs["sage"], 1, 2), ref)["rel_l1_max"])


@needs_mgpu
def test_backend_serves_segment_ids():
    """Packed prompts through attention_forward(backend="sage"): the ids reach the kernel (an id
    dropped on the way would mix the prompts: cosine far below the bound)."""
    rng = np.random.default_rng(10)
    q, k, v = (jnp.asarray(rng.standard_normal((1, 2, 192, 64)), jnp.bfloat16) for _ in range(3))
    ids = jnp.asarray(_packed_ids(1, 192, 2, rng))
    out, lse = jax_attn.attention_forward(q, k, v, backend="sage", return_lse=True,
                                          q_segment_ids=ids, kv_segment_ids=ids)
    f64 = [np.asarray(x, np.float64) for x in (q, k, v)]
    ref, rlse = reference.attention(*f64, return_lse=True, q_segment_ids=np.asarray(ids),
                                    kv_segment_ids=np.asarray(ids))
    assert Q.accuracy(np.asarray(out, np.float64), ref)["cos_min"] > 0.998
    np.testing.assert_allclose(np.asarray(lse), rlse, atol=0.05)


@needs_mgpu
def test_preference_list_samples_in_8_bits_and_trains_exactly():
    """`use_backend("sage,naive")`: a call nothing differentiates runs sage, a differentiated one
    runs naive forward and backward (sage has no backward), in one program; alone, sage still
    refuses the gradient."""
    rng = np.random.default_rng(5)
    q, k, v = (jnp.asarray(rng.standard_normal((1, 2, 70, 64)), jnp.bfloat16) for _ in range(3))

    def loss(q, k, v):
        return jnp.sum(jax_attn.attention_forward(q, k, v).astype(jnp.float32) ** 2)

    with jax_attn.use_backend("sage,naive"):
        d = jax_attn.explain(q, k, v)
        out = jax.jit(jax_attn.attention_forward)(q, k, v)
        grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
    assert (d.backend, d.forward_only) == ("naive", "sage")
    assert "sage when nothing differentiates" in str(d)
    sage = jax_attn.attention_forward(q, k, v, backend="sage")
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(sage, np.float32))
    with jax_attn.use_backend("naive"):
        want = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
    for g, w in zip(grads, want):  # naive's gradients (the wrapper's program rounds a few bf16 apart)
        assert reference.relative_error(np.asarray(g, np.float64), np.asarray(w, np.float64)) < 1e-3
    with jax_attn.use_backend("sage"), pytest.raises(ValueError, match="backend='sage'"):
        jax.grad(loss)(q, k, v)


def test_forward_only_backends_give_way_under_differentiation():
    """The routing rule itself, on declarations: sage and fa4 at an unverified head dim say why
    they cannot be differentiated; a list moves the training choice to the next backend that
    can, and leaves a forward-only backend in place when nothing follows it."""
    from jax_attn import routing
    from jax_attn.backends.fa4 import VERIFIED_BACKWARD_HEAD_DIMS
    assert BACKENDS["sage"].backward_reasons(_spec()) and not BACKENDS["naive"].backward_reasons(_spec())
    assert BACKENDS["fa4"].backward_reasons(_spec(d=40))
    assert all(not BACKENDS["fa4"].backward_reasons(_spec(d=d)) for d in VERIFIED_BACKWARD_HEAD_DIMS)
    d = routing.decide(_spec(), "sage,xla,naive")
    assert (d.backend, d.forward_only) == ("xla", "sage")
    d = routing.decide(_spec(), "sage")
    assert (d.backend, d.forward_only) == ("sage", None)
    assert "differentiating it raises: forward only" in str(d)
    d = routing.decide(_spec(), "naive,sage")
    assert (d.backend, d.forward_only) == ("naive", None)


@needs_mgpu
def test_zero_scale_with_masked_keys_is_a_uniform_average():
    # scale = 0: every kept key weighs the same. The fused softmax would meet 0 * -inf at masked
    # keys (NaN); sage_attention takes the plain arithmetic there instead.
    rng = np.random.default_rng(12)
    q, k, v = (jnp.asarray(rng.standard_normal((1, 1, 64, 64)), jnp.bfloat16) for _ in range(3))
    mask = np.ones((1, 1, 1, 64), bool)
    mask[..., 40:] = False
    out = S.sage_attention(q, k, v, scale=0.0, key_mask=mask, config=SMALL, interpret=True)
    want = np.asarray(v[0, 0, :40].astype(jnp.float32)).mean(axis=0)
    got = np.asarray(out[0, 0].astype(jnp.float32))
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, np.broadcast_to(want, got.shape), atol=0.05)
    with pytest.raises(ValueError, match="positive scale"):
        S.sage_attention(q, k, v, scale=0.0, config=dataclasses.replace(SMALL, k_scale_per_tile=True),
                         interpret=True)
