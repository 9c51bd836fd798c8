"""The Mosaic GPU (Hopper) flash-attention kernel, in Mosaic GPU's interpret mode on the CPU.

What interpret mode covers here: `plgpu.kernel(..., interpret=InterpretGPUParams())` runs the
kernel body of `jax_attn.kernels.mosaic_attention` as written, on the CPU: the grid, the
warpgroup threads (two or three consumers, one producer) as real concurrent threads, every TMA copy with
its exact GMEM slice (wrong index arithmetic reads wrong data or fails a bounds check), the
shared-memory ring of K/V slots, and every barrier. The interpreter enforces the barrier
protocol: a thread must observe every phase of a barrier it waits on, and a barrier may not
complete a phase again before the previous completion was observed; a producer that overwrote a
slot too early, a missing arrival or an extra one fails or deadlocks the test. The online softmax,
the masking (key-bias vector built from bool masks, kv_lengths and the padded key tail), empty
rows (zeros and lse = -inf), the epilogue (O and lse written back by TMA) and the wrapper
(head-dim and sequence padding, GQA, both layouts, the custom VJP) are all exercised and compared
with the float64 NumPy reference `jax_attn.reference`: out, lse, and dq/dk/dv under cotangents on
both out and lse. The default backward (`backward="auto"`) is the Mosaic dQ and dK/dV kernels up
to d = 128 (GQA sums included), run by the same interpreter; above d = 128, and with
`backward="triton"`, the Triton backward (run in Triton's interpret mode) fed with the Mosaic
forward's lse. The fused backward (`MosaicConfig.bwd_fused`: one kernel adding dQ by TMA
reduce-adds) runs there too, with each warpgroup adding into its own float32 slice, since the
interpreter has no TMA reductions; its GPU lowering (one kernel, `cp.reduce.async.bulk.tensor`
into an aliased buffer) is checked by lowering for CUDA on the CPU.

What it cannot cover: the interpreter cannot run wgmma with a register operand or through a
transposed shared-memory view, nor `layout_cast`; in interpret mode the kernel's two matmuls are
`lax.dot_general` on the same shared-memory tiles, and layout casts and the tiling/swizzle
transforms of the shared-memory buffers are skipped. So these tests prove nothing about the
Mosaic lowering (whether it compiles), wgmma fragment layouts, swizzling, register limits
(`set_max_registers`), asynchronous wgmma ordering, or speed. Those are checked on an H100 by
`benchmarks/mosaic_gpu.py` (results in `benchmarks/results/2026-11-23-h100-mosaic.md` and
`benchmarks/results/2026-11-23-h100-mosaic-bwd/`), which also checks every timed shape.

Runtime: interpret mode costs roughly a second per CTA, so shapes are a few CTAs each; still,
the whole module takes about 3.5 CPU minutes, so most kernel tests are marked `slow` (run with
`-m "slow or not slow"`) and the default run keeps one of them (a few seconds).
"""
from __future__ import annotations

import math
import os
import pathlib
import re
import subprocess
import sys

os.environ.setdefault("JAX_ATTN_INTERPRET", "1")  # the Triton backward in interpret mode

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from jax_attn import reference, routing  # noqa: E402
from jax_attn.contract import Spec  # noqa: E402
from jax_attn.kernels import mosaic_attention as M  # noqa: E402

# Kernel tests need jax.experimental.pallas.mosaic_gpu (and its interpreter); the others do not.
needs_mgpu = pytest.mark.skipif(
    M.available() is not None, reason=f"Mosaic GPU Pallas not importable: {M.available()}")
# The interpreter runs about a second per CTA: the fast run keeps one (forward-only) kernel test;
# the others are `slow`.
SLOW = pytest.mark.slow

# Relative error ||x - ref|| / ||ref|| per dtype: operands of both matmuls (q, k, p, v) are
# rounded to the dtype (bf16 ~4e-3 per rounding, fp16 ~5e-4), accumulation is float32.
TOL = {"bfloat16": 2e-2, "float16": 5e-3}
LSE_TOL = {"bfloat16": 5e-2, "float16": 1e-2}  # absolute, the lse is a log


def check(b, n, n_kv, sq, skv, d, *, dtype="bfloat16", layout="bnsd", kv_lengths=None,
          key_mask=None, config=None, grads=True, seed=0, backward="auto"):
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal(s)
               for s in ((b, n, sq, d), (b, n_kv, skv, d), (b, n_kv, skv, d)))
    do, dlse = rng.standard_normal((b, n, sq, d)), rng.standard_normal((b, n, sq))
    q, k, v, do = (np.asarray(jnp.asarray(x, dtype).astype(jnp.float32), np.float64)
                   for x in (q, k, v, do))
    t = (lambda x: x) if layout == "bnsd" else (lambda x: np.swapaxes(x, 1, 2))
    kw = dict(layout=layout, config=config, interpret=True, return_lse=True, backward=backward)
    if kv_lengths is not None:
        kw["kv_lengths"] = jnp.asarray(kv_lengths, jnp.int32)
    if key_mask is not None:
        kw["key_mask"] = jnp.asarray(key_mask)

    def f(q, k, v):
        return M.mosaic_attention(q, k, v, **kw)

    args = [jnp.asarray(t(x), dtype) for x in (q, k, v)]
    if grads:
        (out, lse), vjp = jax.vjp(f, *args)
    else:
        out, lse = f(*args)
    assert out.dtype == jnp.dtype(dtype) and lse.dtype == jnp.float32
    assert out.shape == t(np.empty((b, n, sq, d))).shape and lse.shape == (b, n, sq)

    scale = 1 / math.sqrt(d)
    ro, rlse = reference.attention(q, k, v, attn_mask=key_mask, kv_lengths=kv_lengths,
                                   scale=scale, return_lse=True)
    errors = {"out": reference.relative_error(t(np.asarray(out, np.float32)), ro)}
    if grads:
        dq, dk, dv = vjp((jnp.asarray(t(do), dtype), jnp.asarray(dlse, jnp.float32)))
        rdq, rdk, rdv, _ = reference.attention_vjp(q, k, v, do, attn_mask=key_mask,
                                                   kv_lengths=kv_lengths, scale=scale)
        p = reference.probabilities(q, k, attn_mask=key_mask, kv_lengths=kv_lengths, scale=scale)
        g = n // n_kv
        ds = p * dlse[..., None] * scale  # d lse / d s = p
        rdq = rdq + np.einsum("bnqk,bnkd->bnqd", ds, np.repeat(k, g, axis=1))
        rdk = rdk + np.einsum("bnqk,bnqd->bnkd", ds, q).reshape(b, n_kv, g, skv, d).sum(2)
        errors.update(dq=reference.relative_error(t(np.asarray(dq, np.float32)), rdq),
                      dk=reference.relative_error(t(np.asarray(dk, np.float32)), rdk),
                      dv=reference.relative_error(t(np.asarray(dv, np.float32)), rdv))
    bad = {k_: e for k_, e in errors.items() if not e <= TOL[dtype]}
    assert not bad, f"relative errors over {TOL[dtype]}: {bad}"
    lse = np.asarray(lse, np.float64)
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(rlse), "empty rows: lse = -inf")
    fin = np.isfinite(rlse)
    np.testing.assert_allclose(lse[fin], rlse[fin], atol=LSE_TOL[dtype], rtol=0)
    return out, lse


@SLOW
@needs_mgpu
def test_tails_and_padded_head_dim():
    # 77 queries (one CTA of 2 x 64 rows, padded), 33 keys (tail masked), d = 40 run at 64.
    check(1, 2, 2, 77, 33, 40, config=M.MosaicConfig(block_q=64, block_kv=64, stages=2))


@SLOW
@needs_mgpu
def test_pipeline_without_masks():
    # Aligned lengths, no mask: the unmasked code path; 4 key steps through a 2-slot ring,
    # two query tiles, MQA-style sharing of the one k/v head.
    out, lse = check(1, 2, 1, 256, 256, 64, config=M.MosaicConfig(64, 64, 2), grads=False)
    assert np.all(np.isfinite(lse))


@SLOW
@needs_mgpu
def test_gqa_kv_lengths_empty_batch_bsnd_fp16():
    # kv_lengths with an empty batch row (zeros, lse = -inf, zero gradients), GQA, bsnd read in
    # place, several key steps through a 3-slot ring ending mid-ring.
    out, _ = check(2, 4, 2, 70, 300, 64, dtype="float16", layout="bsnd", kv_lengths=[0, 150],
                   config=M.MosaicConfig(64, 64, 3, bwd_stages=3))
    np.testing.assert_array_equal(np.asarray(out[0], np.float32), 0.0)


@SLOW
@needs_mgpu
def test_per_head_key_mask_d96():
    rng = np.random.default_rng(3)
    mask = rng.random((1, 2, 1, 150)) > 0.4
    mask[:, 1, :, :] = False  # a head with no key at all
    # The Triton backward fed with the Mosaic lse (what d > 128 gets), on a padded head dim.
    check(1, 2, 2, 64, 150, 96, key_mask=mask, config=M.MosaicConfig(64, 64, 2), backward="triton")


@needs_mgpu
def test_head_dim_256_and_broadcast_key_mask():
    mask = np.random.default_rng(4).random((1, 1, 1, 64)) > 0.3
    check(1, 1, 1, 64, 64, 256, key_mask=mask, config=M.MosaicConfig(64, 64, 2), grads=False)


# --- intra-warpgroup overlap (MosaicConfig.overlap): S of the next block and P V of this one
# issued together, the next softmax while P V runs, the two warpgroups taking turns through
# their `turn` barriers (the interpreter checks every arrival and wait of that protocol).

@needs_mgpu
@pytest.mark.parametrize("wgs", [2, 3])
def test_overlap_pipeline_unmasked(wgs):
    # 4 key blocks through a 2-slot ring (prologue, 3 overlapped steps, epilogue), 2 query tiles
    # (with 3 compute warpgroups: 192-row tiles, turns round robin).
    regs = (232, 40) if wgs == 2 else (160, 32)
    out, lse = check(1, 2, 1, 256, 256, 64, grads=False,
                     config=M.MosaicConfig(64, 64, 2, overlap=True, compute_warpgroups=wgs,
                                           fwd_registers=regs))
    assert np.all(np.isfinite(lse))


@SLOW
@needs_mgpu
def test_three_warpgroups_masked_bsnd_gradients():
    check(2, 4, 2, 200, 300, 40, layout="bsnd", kv_lengths=[0, 150],
          config=M.MosaicConfig(64, 64, 3, overlap=True, compute_warpgroups=3,
                                fwd_registers=(160, 32)))


@needs_mgpu
def test_three_warpgroups_need_overlap_and_registers():
    x = jnp.zeros((1, 1, 192, 64), jnp.bfloat16)
    with pytest.raises(ValueError, match="needs overlap=True"):
        M.mosaic_attention(x, x, x, interpret=True,
                           config=M.MosaicConfig(compute_warpgroups=3, fwd_registers=(160, 32)))
    with pytest.raises(ValueError, match="65536 registers"):
        M.mosaic_attention(x, x, x, interpret=True,
                           config=M.MosaicConfig(compute_warpgroups=3, overlap=True))


@SLOW
@needs_mgpu
@pytest.mark.parametrize("skv,stages", [(300, 3), (40, 2)])  # 5 blocks mid-ring; one block
def test_overlap_masked_gqa_empty_row(skv, stages):
    out, _ = check(2, 4, 2, 70, skv, 40, layout="bsnd", kv_lengths=[0, skv // 2],
                   config=M.MosaicConfig(64, 64, stages, overlap=True))
    np.testing.assert_array_equal(np.asarray(out[0], np.float32), 0.0)


# --- narrow head dims (MosaicConfig.narrow_head_dim): the forward of d = 33-48 at 48


@needs_mgpu
@pytest.mark.parametrize("d,dp", [(40, 48), (20, 64)])  # only 48 is verified on a GPU
def test_narrow_head_dim_forward(d, dp):
    cfg = M.MosaicConfig(64, 64, 2, narrow_head_dim=True)
    st = M.MosaicCall(scale=1.0, layout="bnsd", sq=64, skv=150, d=d, groups=1,
                      key_bias_dims=None, orig_key_bias_dims=None, has_kv_lengths=False,
                      config=cfg, interpret=True, backward="mosaic")
    assert (st.fwd_dp, st.dp) == (dp, 64)  # the backward stays at 64
    check(1, 2, 1, 64, 150, d, kv_lengths=[100], config=cfg, grads=False)


@SLOW
@needs_mgpu
def test_narrow_head_dim_gradients_bsnd():
    # The backward (at 64) behind the narrow forward: its out and lse feed the dQ/dK/dV kernels.
    check(2, 2, 2, 77, 130, 40, layout="bsnd", kv_lengths=[130, 0],
          config=M.MosaicConfig(64, 64, 2, narrow_head_dim=True, overlap=True))


def test_config_validation():
    with pytest.raises(ValueError, match="compute_warpgroups must be >= 1"):
        M.MosaicConfig(compute_warpgroups=0)
    with pytest.raises(ValueError, match="multiples of 8"):
        M.MosaicConfig(fwd_registers=(230, 40))
    assert hash(M.MosaicConfig(fwd_registers=[240, 24])) == hash(M.MosaicConfig(fwd_registers=(240, 24)))
    assert hash(M.MosaicConfig(bwd_registers=[240, 24])) == hash(M.MosaicConfig(bwd_registers=(240, 24)))
    with pytest.raises(ValueError, match="bwd_registers must be two multiples of 8"):
        M.MosaicConfig(bwd_registers=(300, 8))
    with pytest.raises(ValueError, match="exceed the SM's 65536 registers"):
        M.MosaicConfig(bwd_registers=(248, 40))


def test_smem_swizzle_by_row_bytes():
    assert [M.smem_swizzle(dp) for dp in (16, 32, 48, 64, 128, 256)] == [32, 64, 32, 128, 128, 128]


# --- the Mosaic backward (the default for head dims up to 128) ---------------------------------

@SLOW
@needs_mgpu
def test_mosaic_backward_tails_kv_lengths_mqa_bsnd():
    # dQ and dK/dV kernels: query tail (77 of 128 padded rows: lse2 = +inf there), key tail and
    # kv_lengths through the key bias, d = 40 at 64, two query heads summed into one k/v head.
    check(1, 2, 1, 77, 150, 40, layout="bsnd", kv_lengths=[100], backward="mosaic",
          config=M.MosaicConfig(64, 64, 2))


@SLOW
@needs_mgpu
def test_heads_side_by_side_grid_order():
    # q_major_grid=False: (tiles, heads, batch) launch order in all three kernels (the default
    # puts the tiles last); GQA, two batches.
    check(2, 4, 2, 256, 256, 64, kv_lengths=[256, 100],
          config=M.MosaicConfig(64, 64, 2, q_major_grid=False))


@SLOW
@needs_mgpu
def test_mosaic_backward_per_head_mask_with_an_empty_head():
    mask = np.random.default_rng(5).random((1, 2, 1, 128)) > 0.4
    mask[:, 0] = False  # every query of head 0 is empty: zero gradients, lse = -inf
    check(1, 2, 2, 64, 128, 64, dtype="float16", key_mask=mask, backward="mosaic",
          config=M.MosaicConfig(64, 64, 2))


# The fused backward (`MosaicConfig.bwd_fused`): the dK/dV kernel also adds dQ's share of every
# tile into a float32 dQ. In interpret mode each warpgroup adds into its own slice (no TMA
# reductions there), so a share added twice, to the wrong rows or heads, or never, shows in dq.
@SLOW
@needs_mgpu
@pytest.mark.parametrize("case", ["tails_mqa_bsnd", "gqa_split_d128", "empty_head_fp16"])
def test_fused_backward(case):
    fused = dict(bwd_fused=True)
    if case == "tails_mqa_bsnd":  # query and key tails, kv_lengths, two query heads per k/v head
        check(1, 2, 1, 77, 150, 40, layout="bsnd", kv_lengths=[100], backward="mosaic",
              config=M.MosaicConfig(64, 64, 2, **fused))
    elif case == "gqa_split_d128":  # the warpgroups split dQ's columns (d = 128 only)
        check(1, 4, 2, 130, 200, 128, kv_lengths=[150], backward="mosaic",
              config=M.MosaicConfig(64, 64, 2, bwd_dq_split=True, **fused))
    else:
        mask = np.random.default_rng(5).random((1, 2, 1, 128)) > 0.4
        mask[:, 0] = False
        check(1, 2, 2, 64, 128, 64, dtype="float16", key_mask=mask, backward="mosaic",
              config=M.MosaicConfig(64, 64, 2, **fused))


@needs_mgpu
@pytest.mark.parametrize("split", [False, True])
def test_fused_backward_lowers_to_one_kernel_with_tma_reduce_adds(split):
    # What interpret mode cannot show: the GPU lowering (Mosaic GPU compiles to PTX here, no GPU
    # needed) is one backward kernel whose dQ adds are TMA reductions into an aliased buffer.
    cfg = M.MosaicConfig(64, 64, 2, bwd_fused=True, bwd_dq_split=split)
    x = jax.ShapeDtypeStruct((1, 256, 2, 128), jnp.bfloat16)
    loss = lambda q, k, v: M.mosaic_attention(  # noqa: E731
        q, k, v, layout="bsnd", config=cfg).astype(jnp.float32).sum()
    text = jax.jit(jax.grad(loss, (0, 1, 2))).trace(x, x, x).lower(
        lowering_platforms=("cuda",)).as_text()
    kernels = re.findall(r"custom_call @mosaic_gpu", text)
    assert len(kernels) == 2  # the forward and one backward kernel (unfused: three)
    assert "cp.reduce.async.bulk.tensor" in text and "output_operand_aliases" in text
    # The warpgroup index passes through an empty inline asm (constraints "=r,0") inside the
    # loop, so LLVM cannot hoist the K/V tiles' wgmma descriptors out of it (they spilled).
    assert "\\00=r,0\\00" in text


@needs_mgpu
@pytest.mark.parametrize("wgs,regs", [(2, (232, 40)), (3, (160, 32))])
def test_named_turns_lower_to_hardware_barriers(wgs, regs):
    # MosaicConfig.named_turns: the overlap path's turns are `bar.sync` / `bar.arrive` on named
    # barriers (two warpgroups' threads each), not shared-memory mbarriers. Interpret mode runs
    # the mbarrier turns, so only the CUDA lowering (here, no GPU) shows the named ones.
    x = jax.ShapeDtypeStruct((1, 512, 2, 128), jnp.bfloat16)

    def lowered(named):
        cfg = M.MosaicConfig(64, 128, 2, overlap=True, named_turns=named, compute_warpgroups=wgs,
                             fwd_registers=regs)
        f = lambda q, k, v: M.mosaic_attention(q, k, v, layout="bsnd", config=cfg)  # noqa: E731
        return jax.jit(f).trace(x, x, x).lower(lowering_platforms=("cuda",)).as_text()
    named, polled = lowered(True), lowered(False)
    for ptx in ("bar.sync $0, 256;", "bar.arrive $0, 256;"):
        assert ptx in named and ptx not in polled


def test_fused_backward_shared_memory_fits():
    from types import SimpleNamespace

    from jax_attn.kernels import mosaic_backward as B
    for dp, fused, split, want in [(128, False, False, 3), (128, True, False, 2),
                                   (128, True, True, 2), (64, True, False, 3)]:
        st = SimpleNamespace(dp=dp, config=M.MosaicConfig(bwd_stages=3, bwd_dq_split=split))
        assert B._dkdv_stages(st, 2, 100, fused, has_kb=True) == want, (dp, fused, split)
    st = SimpleNamespace(dp=128, config=M.MosaicConfig(bwd_stages=3))
    assert B._dkdv_stages(st, 2, 1, True, has_kb=False) == 1  # never deeper than the steps


@needs_mgpu
@pytest.mark.parametrize("d,kernel", [(64, "mosaic"), (256, "triton")])
def test_default_backward_is_mosaic_up_to_head_dim_128(d, kernel):
    x = jnp.ones((1, 1, 128, d), jnp.bfloat16)
    loss = lambda q: M.mosaic_attention(q, x, x, interpret=True).astype(jnp.float32).sum()  # noqa: E731
    jaxpr = str(jax.make_jaxpr(jax.grad(loss))(x))
    assert ("flash_attention_dkdv" in jaxpr) == (kernel == "triton")


@needs_mgpu
def test_mosaic_backward_refuses_head_dim_256():
    x = jnp.zeros((1, 1, 64, 256), jnp.bfloat16)
    with pytest.raises(ValueError, match="up to 128"):
        M.mosaic_attention(x, x, x, interpret=True, backward="mosaic")
    with pytest.raises(ValueError, match="backward"):
        M.mosaic_attention(x, x, x, interpret=True, backward="cutlass")


def test_default_configs_and_buckets():
    assert M.head_dim_padded(40) == 64 and M.head_dim_padded(80) == 128
    assert M.head_dim_padded(256) == 256 and M.head_dim_padded(257) is None
    assert M.default_config(256).block_kv == 64 and M.default_config(40).block_kv == 256
    assert M.default_config(128).q_major_grid
    assert M.shape_bucket(40, 4096, 77) == (64, "cross")
    assert M.shape_bucket(128, 4608, 4608) == (128, "self")
    assert M.shape_bucket(64, 1, 4096) == (64, "short_q")
    # Every automatic choice must cite a measurement: only True/False entries of known buckets.
    for (dp, kind), faster in M.FASTER_THAN_TRITON_SM90.items():
        assert dp in (64, 128, 256) and kind in ("self", "cross", "short_q")
        assert isinstance(faster, bool)


def test_unsupported_reasons():
    assert not M.unsupported(dtype=jnp.bfloat16, d=64, dv=64, has_full_bias=False,
                             is_causal=False)
    why = M.unsupported(dtype=jnp.float32, d=320, dv=64, has_full_bias=True, is_causal=True)
    assert len(why) == 5
    with pytest.raises(ValueError, match="cannot serve"):
        M.mosaic_attention(jnp.zeros((1, 1, 8, 64), jnp.float32), jnp.zeros((1, 1, 8, 64)),
                           jnp.zeros((1, 1, 8, 64)))


def test_jax_attn_imports_without_mosaic_gpu():
    """A JAX without the Mosaic GPU dialect must still import jax_attn and keep `pallas` (Triton)."""
    code = ("import sys; sys.modules['jax.experimental.pallas.mosaic_gpu'] = None\n"
            "import jax_attn\n"
            "from jax_attn.kernels import mosaic_attention as M\n"
            "assert M.available() is not None, 'expected the import to be reported missing'\n"
            "why = M.unsupported(dtype='bfloat16', d=64, dv=64, has_full_bias=False, "
            "is_causal=False)\n"
            "assert why and 'not importable' in why[0], why\n"
            "print('ok')\n")
    env = dict(os.environ, PYTHONPATH=str(pathlib.Path(__file__).resolve().parents[1]))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=300)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-2000:]


def _spec(**kw):
    base = dict(batch=1, heads=2, kv_heads=2, q_len=4096, kv_len=4096, head_dim=64, value_dim=64,
                dtype="bfloat16")
    base.update(kw)
    return Spec(**base)


def test_backend_dispatch(monkeypatch):
    """`pallas` picks the Mosaic kernel only on sm90, for qualifying inputs, as the env var says;
    the choice is routing's (`routing.pallas_kernel`) and `explain()` shows it."""
    def use(spec):
        return routing.pallas_kernel(spec)[0] == "mosaic"
    # On the CPU (interpret mode) it is always the Triton kernel.
    monkeypatch.setenv(routing.ENV_PALLAS_KERNEL, "mosaic")
    assert not use(_spec())
    # Pretend to be a Hopper GPU outside interpret mode.
    monkeypatch.setattr(routing, "interpreting", lambda: False)
    monkeypatch.setattr(routing, "gpu_compute_capability", lambda: (9, 0))
    assert use(_spec())
    assert use(_spec(mask_kind="bool", mask_shape=(1, 2, 1, 4096), has_kv_lengths=True))
    assert not use(_spec(dtype="float32"))
    assert not use(_spec(is_causal=True))
    assert not use(_spec(window=(64, 64)))
    assert not use(_spec(mask_kind="bool", mask_shape=(1, 1, 4096, 4096)))  # full mask
    assert not use(_spec(mask_kind="bias", mask_shape=(1, 1, 1, 4096)))
    assert not use(_spec(value_dim=32))
    monkeypatch.setattr(routing, "gpu_compute_capability", lambda: (8, 0))
    assert not use(_spec())
    monkeypatch.setattr(routing, "gpu_compute_capability", lambda: (9, 0))
    monkeypatch.setenv(routing.ENV_PALLAS_KERNEL, "triton")
    assert not use(_spec())
    monkeypatch.setenv(routing.ENV_PALLAS_KERNEL, "auto")
    monkeypatch.setattr(M, "FASTER_THAN_TRITON_SM90", {(64, "self"): True, (64, "cross"): False})
    assert use(_spec())
    assert not use(_spec(kv_len=77))
    assert not use(_spec(q_len=1))  # a decode step: bucket not measured
    assert not use(_spec(head_dim=128, value_dim=128))  # bucket not measured
    monkeypatch.setenv(routing.ENV_PALLAS_KERNEL, "cutlass")
    with pytest.raises(ValueError, match="JAX_ATTN_PALLAS_KERNEL"):
        use(_spec())


def test_explain_names_the_pallas_kernel(monkeypatch):
    monkeypatch.setattr(routing, "interpreting", lambda: False)
    monkeypatch.setattr(routing, "gpu_compute_capability", lambda: (9, 0))
    monkeypatch.setattr(M, "FASTER_THAN_TRITON_SM90", {(64, "self"): True})
    d = routing.decide(_spec(), "pallas")
    assert d.kernel == "mosaic" and "measured faster" in d.kernel_why
    assert "pallas runs the mosaic kernel" in str(d) and "JAX_ATTN_PALLAS_KERNEL" in str(d)
    d = routing.decide(_spec(is_causal=True), "pallas")
    assert d.kernel == "triton" and "causal" in d.kernel_why
