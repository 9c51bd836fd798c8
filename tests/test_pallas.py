"""The Pallas flash-attention kernel, as a specification, in Pallas interpret mode on the CPU.

Every check compares against the float64 NumPy reference (`jax_attn.reference`) on random normal
inputs: forward, log-sum-exp, and the gradients of q, k, v under a cotangent on both `out` and
`lse` (so the lse is proven differentiable). Shapes are small and odd on purpose: tails of query
and key blocks, head dims that are not powers of two, dv != d, GQA and MQA.
"""
from __future__ import annotations

import math
import os

os.environ.setdefault("JAX_ATTN_INTERPRET", "1")  # before the backend looks (conftest does too)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from jax_attn import reference  # noqa: E402
from jax_attn.backends.pallas import Pallas  # noqa: E402
from jax_attn.contract import validate  # noqa: E402
from jax_attn.inputs import AttentionInputs  # noqa: E402
from jax_attn.kernels import configs  # noqa: E402
from jax_attn.kernels import flash_attention as fa_kernels  # noqa: E402
from jax_attn.kernels.flash_attention import flash_attention as fa_function  # noqa: E402
from jax_attn.kernels.reference import flash_attention_reference  # noqa: E402

# Relative error ||x - ref|| / ||ref|| allowed per dtype, and why:
TOL = {
    # float32 products and f32 accumulation: only summation order differs from float64.
    "float32": 1e-5,
    # bf16 operands (8-bit mantissa, ~4e-3 per rounding) for q, k, v, p and dS in the matmuls.
    "bfloat16": 2e-2,
    # fp16 operands (11-bit mantissa, ~5e-4 per rounding), same matmuls.
    "float16": 5e-3,
}
# The lse is compared in absolute terms (it is a log): same reasoning, looser for half inputs.
LSE_TOL = {"float32": 1e-5, "bfloat16": 5e-2, "float16": 1e-2}


SLOW = pytest.mark.slow  # interpret mode costs seconds per call: the fast run keeps one of each kind


def flash(*args, **kw):
    return fa_function(*args, interpret=True, **kw)


def ref_grads(q, k, v, do, dlse, mask, kv_lengths, is_causal, scale):
    """float64 gradients of sum(out * do) + sum(lse * dlse)."""
    return reference.attention_vjp(q, k, v, do, attn_mask=mask, kv_lengths=kv_lengths,
                                   is_causal=is_causal, scale=scale, d_lse=dlse)[:3]


def check(b, n, n_kv, sq, skv, d, dv=None, *, dtype="float32", layout="bnsd", is_causal=False,
          kv_lengths=None, key_mask=None, bias=None, scale=None, seed=0):
    """Run the kernel forward and backward and compare all five results with the reference."""
    dv = d if dv is None else dv
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal(s) for s in ((b, n, sq, d), (b, n_kv, skv, d), (b, n_kv, skv, dv)))
    do, dlse = rng.standard_normal((b, n, sq, dv)), rng.standard_normal((b, n, sq))
    # Quantize inputs to the tested dtype so the reference sees exactly what the kernel sees.
    q, k, v, do = (np.asarray(jnp.asarray(x, dtype).astype(jnp.float32), np.float64)
                   for x in (q, k, v, do))
    t = (lambda x: x) if layout == "bnsd" else (lambda x: np.swapaxes(x, 1, 2))
    mask = key_mask if key_mask is not None else bias
    kw = dict(is_causal=is_causal, layout=layout, scale=scale)
    if kv_lengths is not None:
        kw["kv_lengths"] = jnp.asarray(kv_lengths, jnp.int32)
    if key_mask is not None:
        kw["key_mask"] = jnp.asarray(key_mask)
    if bias is not None:
        kw["bias"] = jnp.asarray(bias, jnp.float32)

    def f(q, k, v):
        return flash(q, k, v, return_lse=True, **kw)

    (out, lse), vjp = jax.vjp(f, *(jnp.asarray(t(x), dtype) for x in (q, k, v)))
    dq, dk, dv_ = vjp((jnp.asarray(t(do), dtype), jnp.asarray(dlse, jnp.float32)))
    assert out.dtype == jnp.dtype(dtype) and lse.dtype == jnp.float32
    assert out.shape == t(np.empty((b, n, sq, dv))).shape and lse.shape == (b, n, sq)

    s = 1 / math.sqrt(d) if scale is None else scale
    ro, rlse = reference.attention(q, k, v, attn_mask=mask, kv_lengths=kv_lengths,
                                   is_causal=is_causal, scale=s, return_lse=True)
    rdq, rdk, rdv = ref_grads(q, k, v, do, dlse, mask, kv_lengths, is_causal, s)
    tol = TOL[dtype]
    errors = {"out": reference.relative_error(t(np.asarray(out, np.float32)), ro),
              "dq": reference.relative_error(t(np.asarray(dq, np.float32)), rdq),
              "dk": reference.relative_error(t(np.asarray(dk, np.float32)), rdk),
              "dv": reference.relative_error(t(np.asarray(dv_, np.float32)), rdv)}
    bad = {name: e for name, e in errors.items() if not e <= tol}
    assert not bad, f"relative errors over {tol}: {bad}"
    lse = np.asarray(lse, np.float64)
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(rlse), "empty rows must have lse -inf")
    fin = np.isfinite(rlse)
    np.testing.assert_allclose(lse[fin], rlse[fin], atol=LSE_TOL[dtype], rtol=0)
    return out, lse, (dq, dk, dv_)


# --- shapes: tails, head dims, dv != d, GQA / MQA ----------------------------------------------

@pytest.mark.parametrize("b,n,n_kv,sq,skv,d,dv", [
    pytest.param(1, 2, 2, 1, 77, 8, 8, marks=SLOW),  # one query, key tail
    (1, 2, 2, 77, 33, 40, 40),  # odd both ways, d = 40 (padded to 64 inside)
    pytest.param(2, 1, 1, 33, 1, 16, 16, marks=SLOW),  # a single key
    pytest.param(1, 2, 2, 20, 50, 72, 40, marks=SLOW),  # d = 72, dv != d
    pytest.param(1, 1, 1, 16, 20, 128, 128, marks=SLOW),
    pytest.param(1, 1, 1, 5, 9, 96, 80, marks=SLOW),
    pytest.param(2, 4, 2, 17, 45, 32, 32, marks=SLOW),  # GQA
    pytest.param(1, 4, 1, 30, 19, 24, 48, marks=SLOW),  # MQA
    pytest.param(1, 2, 2, 70, 140, 16, 16, marks=SLOW),  # several key blocks of the default 64
])
def test_shapes_match_reference(b, n, n_kv, sq, skv, d, dv):
    check(b, n, n_kv, sq, skv, d, dv)


@pytest.mark.parametrize("case,dtype", [
    pytest.param(case, dtype, id=f"case{i}-{dtype}", marks=() if (i, dtype) == (0, "bfloat16") else SLOW)
    for i, case in enumerate([
        dict(b=1, n=2, n_kv=2, sq=77, skv=33, d=40),
        dict(b=2, n=4, n_kv=1, sq=20, skv=50, d=72, dv=40, is_causal=True, kv_lengths=[50, 7]),
    ]) for dtype in ["bfloat16", "float16"]])
def test_half_precision(dtype, case):
    check(dtype=dtype, **case)


@SLOW
def test_scale():
    check(1, 2, 2, 20, 30, 32, scale=0.3)


# --- masks -------------------------------------------------------------------------------------

@SLOW  # test_everything_at_once_in_bsnd is causal
@pytest.mark.parametrize("sq,skv", [(20, 45), (45, 20), (1, 33), (64, 64)])
def test_causal_top_left_aligned(sq, skv):
    check(1, 2, 1, sq, skv, 16, is_causal=True)


def test_kv_lengths_with_an_empty_row():
    out, lse, grads = check(3, 2, 2, 21, 40, 24, kv_lengths=[40, 0, 13])
    assert not np.any(np.asarray(out[1], np.float32))
    assert np.all(np.isneginf(lse[1]))
    for g in grads:  # dq of the empty batch, dk/dv of its keys: zero
        assert not np.any(np.asarray(g[1], np.float32))


@SLOW  # test_backend_full_bool_mask_and_lse and the padding tests (test_reliability.py) mask keys
@pytest.mark.parametrize("shape", [(2, 1, 1, 50), (2, 3, 1, 50)])
def test_per_key_bool_mask(shape):
    mask = np.random.default_rng(3).random(shape) > 0.4
    mask[1] = False  # batch 1 has no key at all: zeros, lse -inf
    out, lse, _ = check(2, 3, 3, 19, 50, 16, key_mask=mask)
    assert not np.any(np.asarray(out[1], np.float32)) and np.all(np.isneginf(lse[1]))


@SLOW  # test_everything_at_once_in_bsnd has a bias with -inf
@pytest.mark.parametrize("shape", [(1, 2, 19, 37), (2, 1, 19, 37), (2, 2, 1, 37), (19, 37)])
def test_bias_with_neg_inf(shape):
    bias = np.random.default_rng(4).standard_normal(shape)
    bias[..., 3] = -np.inf
    if shape[-2] > 1:
        bias[..., 5, :] = -np.inf  # query 5 sees no key
    check(2, 2, 2, 19, 37, 32, bias=bias)


def test_everything_at_once_in_bsnd():
    bias = np.random.default_rng(5).standard_normal((2, 4, 33, 70))
    bias[:, :, :, 10] = -np.inf
    check(2, 4, 2, 33, 70, 40, 24, layout="bsnd", is_causal=True, kv_lengths=[70, 25], bias=bias)


@SLOW
def test_short_key_sequences_split_the_dkdv_query_loop():
    """Cross-attention to few keys: each key block's query loop runs on several programs whose
    float32 partial dK/dV are summed (every feature at once, both causal paths, an empty batch)."""
    n_kb, n_qb = 2, 4  # 77 keys and 200 queries in blocks of 64
    assert fa_kernels._dkdv_splits(n_kb, n_qb, 2, 2) == n_qb
    assert fa_kernels._dkdv_splits(64, 64, 2, 10) == 1  # 4096 keys: enough programs
    bias = np.random.default_rng(8).standard_normal((2, 4, 200, 77))
    bias[:, :, :, 10] = -np.inf
    check(2, 4, 2, 200, 77, 40, 24, layout="bsnd", is_causal=True, kv_lengths=[77, 0], bias=bias)
    check(1, 2, 1, 200, 77, 64, key_mask=np.random.default_rng(9).random((1, 1, 1, 77)) > 0.3,
          dtype="bfloat16")


@SLOW  # both layouts also run in test_everything_at_once_in_bsnd and test_backend_full_bool_mask_and_lse
@pytest.mark.parametrize("layout", ["bnsd", "bsnd"])
def test_layouts(layout):
    check(2, 4, 2, 37, 29, 16, layout=layout, key_mask=np.random.default_rng(6).random((2, 1, 1, 29)) > 0.3)


# --- transformations ---------------------------------------------------------------------------

def test_jit_and_vmap():
    rng = np.random.default_rng(7)
    q = jnp.asarray(rng.standard_normal((3, 1, 2, 20, 16)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((3, 1, 2, 30, 16)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((3, 1, 2, 30, 16)), jnp.float32)
    lengths = jnp.asarray([[30], [0], [7]], jnp.int32)

    def f(q, k, v, n):
        return flash(q, k, v, kv_lengths=n, is_causal=True)

    batched = jax.jit(jax.vmap(f))(q, k, v, lengths)
    for i in range(3):
        ref = reference.attention(q[i], k[i], v[i], kv_lengths=lengths[i], is_causal=True)
        assert reference.relative_error(batched[i], ref) < TOL["float32"]
    assert not np.any(np.asarray(batched[1])), "a batch with no key gives zeros"
    grad = jax.jit(jax.vmap(jax.grad(lambda q, k, v, n: f(q, k, v, n).sum())))(q, k, v, lengths)
    assert not np.any(np.asarray(grad[1])), "a batch with no key gets zero gradients"
    assert np.all(np.isfinite(np.asarray(grad)))


@SLOW
def test_matches_the_jnp_reference_beside_the_kernel():
    rng = np.random.default_rng(8)
    q, k, v = (jnp.asarray(rng.standard_normal(s), jnp.float32)
               for s in ((2, 4, 21, 24), (2, 2, 35, 24), (2, 2, 35, 24)))
    kw = dict(is_causal=True, kv_lengths=jnp.asarray([35, 0]), return_lse=True)
    out, lse = flash(q, k, v, **kw)
    r_out, r_lse = flash_attention_reference(q, k, v, **kw)
    assert reference.relative_error(out, np.asarray(r_out, np.float64)) < 1e-5
    np.testing.assert_allclose(np.asarray(lse), np.asarray(r_lse), atol=1e-5)


# --- the backend adapter -----------------------------------------------------------------------

def test_backend_runs_in_interpret_mode_but_is_never_automatic():
    backend = Pallas()
    assert backend.unavailable() == []
    assert backend.automatic is False
    assert backend.supports_bias_grad is True and backend.supports_lse_grad is True and backend.supports_window is True


def test_backend_without_gpu_or_interpret_says_why(monkeypatch):
    monkeypatch.delenv("JAX_ATTN_INTERPRET")
    (why,) = Pallas().unavailable()
    assert why.startswith("no GPU") and "JAX_ATTN_INTERPRET=1" in why


def test_backend_reasons():
    spec = validate(jax.ShapeDtypeStruct((1, 2, 8, 300), jnp.float32),
                    jax.ShapeDtypeStruct((1, 2, 8, 300), jnp.float32),
                    jax.ShapeDtypeStruct((1, 2, 8, 300), jnp.float32))
    assert any("head dim 300" in r for r in Pallas().reasons(spec))
    spec = validate(*(jax.ShapeDtypeStruct((1, 2, 8, 64), jnp.float64),) * 3)
    assert any("float64" in r for r in Pallas().reasons(spec))


@pytest.mark.parametrize("layout", [pytest.param("bnsd", marks=SLOW), "bsnd"])
def test_backend_full_bool_mask_and_lse(layout):
    rng = np.random.default_rng(9)
    b, n, sq, skv, d = 2, 2, 13, 21, 16
    mask = rng.random((b, 1, sq, skv)) > 0.5
    mask[0, 0, 4] = False  # an empty row
    q, k, v = (rng.standard_normal(s) for s in ((b, n, sq, d), (b, n, skv, d), (b, n, skv, d)))
    t = (lambda x: x) if layout == "bnsd" else (lambda x: np.swapaxes(x, 1, 2))
    inputs = AttentionInputs.build(*(jnp.asarray(t(x), jnp.float32) for x in (q, k, v)),
                                   attn_mask=jnp.asarray(mask), layout=layout)
    out, lse = Pallas()(inputs, return_lse=True)
    ro, rlse = reference.attention(q, k, v, attn_mask=mask, return_lse=True)
    assert reference.relative_error(t(np.asarray(out)), ro) < TOL["float32"]
    np.testing.assert_array_equal(np.isneginf(np.asarray(lse)), np.isneginf(rlse))


# --- the config table --------------------------------------------------------------------------

def test_config_table():
    assert configs.head_dim_bucket(8) == 16 and configs.head_dim_bucket(40) == 64
    assert configs.head_dim_bucket(128) == 128 and configs.head_dim_bucket(129) == 256
    # No GPU (or an unmeasured one): the safe default.
    assert configs.get_config(64, "bfloat16", None) == configs.default_config(64)
    assert configs.get_config(64, "bfloat16", (7, 5)) == configs.default_config(64)
    for (device, dtype, bucket), cfg in configs.TUNED.items():
        assert device.startswith("sm") and dtype in TOL and bucket == configs.head_dim_bucket(bucket)
        assert cfg.device and cfg.measured  # every measured entry says where and when


@SLOW
def test_explicit_config_is_used_and_gives_the_same_answer():
    cfg = configs.Config(configs.FwdConfig(16, 32, 4, 2), configs.BwdConfig(32, 16, 16, 32, 4, 2))
    rng = np.random.default_rng(10)
    q, k, v = (jnp.asarray(rng.standard_normal((1, 2, 45, 16)), jnp.float32) for _ in range(3))
    a = flash(q, k, v, is_causal=True, config=cfg)
    b = flash(q, k, v, is_causal=True)
    assert reference.relative_error(a, np.asarray(b, np.float64)) < 1e-6
