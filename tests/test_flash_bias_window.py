"""Bias gradients and sliding windows of the Triton flash-attention kernel, in interpret mode.

Every result is compared with the float64 NumPy reference (`jax_attn.reference`) on random normal
inputs, under a cotangent on both `out` and `lse`: forward, lse, dq, dk, dv and the gradient of
the bias, summed over the bias's broadcast dims. Blocks are 16 (or 16/32) so that small, odd
shapes still cross several query and key blocks, hit tails, and run the edge (masked) and inner
(unmasked) loops of every kernel. `INTERPRET` can be set False to run the same checks on a GPU.
"""
from __future__ import annotations

import math
import os

os.environ.setdefault("JAX_ATTN_INTERPRET", "1")  # before the backend looks (conftest does too)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from jax_attn import reference  # noqa: E402
from jax_attn.kernels import configs  # noqa: E402
from jax_attn.kernels import flash_attention as fa  # noqa: E402
from jax_attn.kernels import flash_backward  # noqa: E402  (owns `_dkdv_splits`)

INTERPRET = True
# Interpret mode costs seconds per call: the fast run keeps one test of each kind (a bias
# gradient, a window, block skipping); the others are `slow`.
SLOW = pytest.mark.slow
# 16-wide tiles everywhere, and a mix (forward 32x16, dK/dV 16x32, dQ 32x16).
SMALL = configs.Config(configs.FwdConfig(16, 16, 4, 2), configs.BwdConfig(16, 16, 16, 16, 4, 2))
MIXED = configs.Config(configs.FwdConfig(32, 16, 4, 2), configs.BwdConfig(16, 32, 32, 16, 4, 2))


def flash(*args, **kw):
    kw.setdefault("config", SMALL)
    return fa.flash_attention(*args, interpret=INTERPRET, **kw)


@pytest.fixture
def dkdv_path(monkeypatch):
    """`use(path)`: run the dK/dV kernel with its query loop split over programs ("split", what
    small shapes get) or whole (one program per key block, forced); at the end, check that every
    backward traced ran that path, so no test silently covers the other one."""
    natural, counts, chosen = flash_backward._dkdv_splits, [], []

    def splits(*args):
        n = natural(*args) if chosen[0] == "split" else 1
        counts.append(n)
        return n

    def use(path):
        chosen.append(path)
        monkeypatch.setattr(flash_backward, "_dkdv_splits", splits)

    yield use
    if chosen:
        assert counts, "the dK/dV kernel was not traced"
        assert all((n > 1) if chosen[0] == "split" else (n == 1) for n in counts), counts


def ref_all(q, k, v, do, dlse, bias, kv_lengths, causal, window, scale):
    """float64 (out, lse, dq, dk, dv, dS) for the loss sum(out * do) + sum(lse * dlse); dS is the
    full (b, n, sq, skv) gradient of the logits (so of any additive bias)."""
    kw = dict(attn_mask=bias, kv_lengths=kv_lengths, is_causal=causal, scale=scale, window=window)
    out, lse = reference.attention(q, k, v, return_lse=True, **kw)
    dq, dk, dv, ds = reference.attention_vjp(q, k, v, do, **kw)
    ds_lse = reference.probabilities(q, k, **kw) * dlse[..., None]  # d lse / d s = p
    g = q.shape[1] // k.shape[1]
    b, n_kv, skv, d = k.shape
    dq = dq + np.einsum("bnqk,bnkd->bnqd", ds_lse, np.repeat(k, g, axis=1)) * scale
    dk = dk + (np.einsum("bnqk,bnqd->bnkd", ds_lse, q) * scale).reshape(b, n_kv, g, skv, d).sum(2)
    return out, lse, dq, dk, dv, ds + ds_lse


def sum_to(ds, shape):
    """The full gradient summed over the broadcast dims of a bias of `shape`."""
    shape4 = (1,) * (4 - len(shape)) + tuple(shape)
    axes = tuple(a for a in range(4) if shape4[a] == 1)
    return ds.sum(axes, keepdims=True).reshape(shape)


def inputs(b, n, n_kv, sq, skv, d, dtype, seed, bias_shape=None):
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal(s)
               for s in ((b, n, sq, d), (b, n_kv, skv, d), (b, n_kv, skv, d)))
    do, dlse = rng.standard_normal((b, n, sq, d)), rng.standard_normal((b, n, sq))
    # Quantize to the tested dtype so the reference sees exactly what the kernel sees.
    q, k, v, do = (np.asarray(jnp.asarray(x, dtype).astype(jnp.float32), np.float64)
                   for x in (q, k, v, do))
    bias = None if bias_shape is None else rng.standard_normal(bias_shape)
    return q, k, v, do, dlse, bias


def run(q, k, v, do, dlse, bias, *, dtype="float32", bias_dtype="float32", layout="bnsd", **kw):
    """Kernel (out, lse, dq, dk, dv, dbias) in bnsd float64, under the same loss as `ref_all`."""
    t = (lambda x: x) if layout == "bnsd" else (lambda x: np.swapaxes(x, 1, 2))
    if kw.get("kv_lengths") is not None:
        kw["kv_lengths"] = jnp.asarray(kw["kv_lengths"], jnp.int32)
    args = [jnp.asarray(t(x), dtype) for x in (q, k, v)]
    if bias is not None:
        args.append(jnp.asarray(bias, bias_dtype))

    def f(q, k, v, bias=None):
        return flash(q, k, v, bias=bias, layout=layout, return_lse=True, **kw)

    (out, lse), vjp = jax.vjp(f, *args)
    grads = vjp((jnp.asarray(t(do), dtype), jnp.asarray(dlse, jnp.float32)))
    assert out.dtype == jnp.dtype(dtype) and lse.dtype == jnp.float32
    if bias is not None:
        assert grads[3].shape == bias.shape and grads[3].dtype == jnp.dtype(bias_dtype)
    f64 = lambda x: np.asarray(jnp.asarray(x, jnp.float32), np.float64)  # noqa: E731
    dbias = f64(grads[3]) if bias is not None else None
    return (t(f64(out)), f64(lse), *(t(f64(g)) for g in grads[:3]), dbias)


def check(b, n, n_kv, sq, skv, d=16, *, bias_shape=None, dtype="float32", bias_dtype="float32",
          kv_lengths=None, is_causal=False, window=None, seed=0, neg_inf=(), layout="bnsd",
          config=SMALL):
    """Kernel vs reference for every result; returns both (kernel, reference) tuples."""
    q, k, v, do, dlse, bias = inputs(b, n, n_kv, sq, skv, d, dtype, seed, bias_shape)
    if bias is not None:
        bias = np.asarray(jnp.asarray(bias, bias_dtype).astype(jnp.float32), np.float64)
        for idx in neg_inf:  # dropped entries: their gradient must be exactly zero
            bias[idx] = -np.inf
    got = run(q, k, v, do, dlse, bias, dtype=dtype, bias_dtype=bias_dtype, layout=layout,
              kv_lengths=kv_lengths, is_causal=is_causal, window=window, config=config)
    scale = 1 / math.sqrt(d)
    want = list(ref_all(q, k, v, do, dlse, bias, kv_lengths, is_causal, window, scale))
    if bias is not None:
        want[5] = sum_to(want[5], bias.shape)
    tol = reference.TOLERANCE[dtype]
    names = ("out", "lse", "dq", "dk", "dv", "dbias")
    pairs = list(zip(names, got, want))[:6 if bias is not None else 5]
    errors = {name: reference.relative_error(x, r) for name, x, r in pairs}
    bad = {name: e for name, e in errors.items() if not e <= tol}
    assert not bad, f"relative errors over {tol}: {bad}"
    for name, x, r in pairs:  # what nothing reaches (masked, empty rows, unseen keys) is exactly 0
        assert not np.any(x[r == 0]), f"{name}: nonzero where the reference is exactly 0"
    if bias is not None:
        np.testing.assert_array_equal(got[5][np.isneginf(bias)], 0.0)
        assert np.abs(got[5]).max() > 1e-2, "the bias gradient is (nearly) zero"
    return got, want


# --- bias gradients ----------------------------------------------------------------------------

@SLOW
def test_key_bias_gradient_split_dkdv():
    """A per-key bias (query dim 1) of a short key sequence: its gradient is the column sum of dS
    in the dK/dV kernel, whose query loop is split over programs here (asserted)."""
    b, n, n_kv, sq, skv = 2, 4, 2, 100, 77
    blocks = -(-skv // 16), -(-sq // 16)  # SMALL: 16 x 16 dK/dV tiles
    assert fa._dkdv_splits(*blocks, b, n_kv) > 1
    got, _ = check(b, n, n_kv, sq, skv, bias_shape=(b, 1, 1, skv), kv_lengths=[77, 30],
                   is_causal=True, neg_inf=[(0, 0, 0, 5)])
    assert not np.any(got[5][1, ..., 30:]), "keys past kv_lengths get exactly zero"


@pytest.mark.parametrize("path,case", [
    pytest.param("whole", dict(bias_shape=(1, 4, 1, 53), window=(7, 2)), marks=SLOW),
    pytest.param("split", dict(bias_shape=(2, 4, 1, 53), kv_lengths=[53, 0], layout="bsnd"), marks=SLOW),
    pytest.param("whole", dict(bias_shape=(2, 4, 1, 53), kv_lengths=[53, 20], is_causal=True, config=MIXED),
                 marks=SLOW),
    ("split", dict(bias_shape=(1, 4, 37, 53), is_causal=True,
                   neg_inf=[(0, 1, 3), (0, 2, slice(None), 4)])),  # (head 1, query 3): no key
    pytest.param("whole", dict(bias_shape=(2, 4, 37, 53), kv_lengths=[20, 53], window=(3, None)),
                 marks=SLOW),
    pytest.param("split", dict(bias_shape=(37, 53), window=(16, 16), is_causal=True, config=MIXED),
                 marks=SLOW),
])
def test_bias_gradient(path, case, dkdv_path):
    """Per-key biases (b|1, n|1, 1, skv) through the dK/dV kernel's column sums, full biases
    through the dQ kernel's dS tiles (skipped tiles must come back as zeros, not NaN: interpret
    mode fills unwritten output with NaN), with GQA, both dK/dV paths and a layout."""
    dkdv_path(path)
    check(2, 4, 2, 37, 53, **case)


@SLOW
def test_per_query_bias_gradient_is_the_lse_cotangent():
    """A (1, 1, sq, 1) bias shifts every logit of a row alike: out does not move and lse moves
    one for one, so its gradient is the lse cotangent summed over batch and heads."""
    b, n, sq, skv = 2, 2, 40, 19
    got, _ = check(b, n, n, sq, skv, bias_shape=(1, 1, sq, 1), kv_lengths=[19, 0], window=(None, 3))
    _, _, _, _, dlse, _ = inputs(b, n, n, sq, skv, 16, "float32", 0)
    dlse = dlse.copy()
    dlse[1] = 0  # batch 1 sees no key: its rows are empty
    np.testing.assert_allclose(got[5][0, 0, :, 0], dlse.sum((0, 1)), atol=1e-4)


@SLOW
def test_bfloat16_bias_gradient():
    check(1, 2, 1, 50, 33, 32, bias_shape=(1, 2, 50, 33), dtype="bfloat16", bias_dtype="bfloat16",
          is_causal=True, window=(20, None))


@SLOW
def test_bias_gradient_of_an_lse_only_loss():
    """Only lse in the loss (out's cotangent is a symbolic zero): d lse / d bias = p."""
    rng = np.random.default_rng(3)
    q, k, v = (rng.standard_normal((1, 2, s, 16)) for s in (30, 45, 45))
    bias = rng.standard_normal((1, 1, 1, 45))
    w = rng.standard_normal((1, 2, 30))

    def loss(bias):
        _, lse = flash(*(jnp.asarray(x, jnp.float32) for x in (q, k, v)), bias=bias,
                       return_lse=True, window=(5, 5))
        return jnp.sum(lse * w)

    got = jax.grad(loss)(jnp.asarray(bias, jnp.float32))
    p = reference.probabilities(q, k, attn_mask=bias, window=(5, 5))
    want = (p * w[..., None]).sum((0, 1, 2)).reshape(bias.shape)
    assert reference.relative_error(got, want) <= reference.TOLERANCE["float32"]


def test_bias_gradients_cost_nothing_unless_differentiated(monkeypatch):
    """The backward asks for d key_bias / d bias only for a differentiated bias (symbolic zeros):
    a constant bias or a bool mask adds no output and no work to the backward kernels."""
    asked = []
    real = fa._backward_with_bias_grads
    monkeypatch.setattr(fa, "_backward_with_bias_grads",
                        lambda wants: asked.append(wants) or real(wants))
    rng = np.random.default_rng(4)
    q = jnp.asarray(rng.standard_normal((1, 2, 20, 16)), jnp.float32)
    full = jnp.asarray(rng.standard_normal((1, 2, 20, 20)), jnp.float32)
    per_key = jnp.asarray(rng.standard_normal((1, 1, 1, 20)), jnp.float32)
    mask = jnp.asarray(rng.random((1, 1, 1, 20)) > 0.3)

    def loss(q, bias=None, key_mask=None):
        return flash(q, q, q, bias=bias, key_mask=key_mask).sum()

    cases = [
        (lambda q: loss(q, full), (False, False)),  # a constant bias
        (lambda q: loss(q, key_mask=mask), (False, False)),  # a bool mask
        (lambda q: loss(q, per_key, mask), (False, False)),
        (lambda b: loss(q, b), (False, True)),
        (lambda b: loss(q, jnp.broadcast_to(b, (1, 2, 20, 20))), (False, True)),
    ]
    for f, wants in cases:
        asked.clear()
        jax.make_jaxpr(jax.grad(f))(q if wants == (False, False) else full)
        assert asked == [wants]
    asked.clear()
    jax.make_jaxpr(jax.grad(lambda b: loss(q, b, mask)))(per_key)  # mask + differentiated bias
    assert asked == [(True, False)]


# --- sliding window ----------------------------------------------------------------------------

@pytest.mark.parametrize("path,case", [
    ("split", dict(window=(0, 0), sq=45, skv=70)),  # keys 45 and up: seen by no query
    pytest.param("whole", dict(window=(3, None), sq=45, skv=70, kv_lengths=[70, 9]), marks=SLOW),
    pytest.param("split", dict(window=(None, 5), sq=70, skv=45, is_causal=True), marks=SLOW),
    pytest.param("whole", dict(window=(16, 16), sq=45, skv=70, is_causal=True, kv_lengths=[33, 70],
                               config=MIXED), marks=SLOW),
    pytest.param("whole", dict(window=(40, 1), sq=64, skv=64, bias_shape=(2, 1, 1, 64)),  # inner blocks
                 marks=SLOW),
])
def test_window_matches_reference(path, case, dkdv_path):
    """Forward, lse and gradients with windows, alone and with causal, kv_lengths, GQA, tails."""
    dkdv_path(path)
    check(2, 4, 2, **case)


@SLOW
def test_window_rows_with_no_key():
    """sq != skv and a narrow window: queries 22 and up see no key (keys stop at 19): zeros,
    lse -inf, and zero gradients, the bias's included."""
    got, want = check(1, 2, 1, 40, 20, bias_shape=(1, 2, 40, 20), window=(2, 2))
    out, lse, dq, dk, dv, dbias = got
    assert np.all(np.isneginf(lse[:, :, 22:])) and np.all(np.isfinite(lse[:, :, :22]))
    for x in (out, dq, dbias):
        assert not np.any(x[:, :, 22:])


@pytest.mark.parametrize("path", ["split", pytest.param("whole", marks=SLOW)])
def test_window_skips_blocks_no_query_of_the_tile_can_see(path, dkdv_path):
    """Poison whole key blocks with NaN and check results that would be NaN if any kernel visited
    a block outside its tile's window range, even masked (0 * NaN = NaN in the matmuls).

    128 queries and keys in blocks of 16, window (8, 8): query block i sees key blocks i-1..i+1.
    Key blocks 0 and 7 hold NaN, so rows 0-23 and 104-127 are NaN by right (they see them) and so
    are their lse and D. Forward and dQ: query blocks 2-5 (rows 32-95) must not visit key block 0
    or 7. dK/dV: key blocks 3-4 (keys 48-79) are seen by query blocks 2-5 only, and must not visit
    query blocks 0-1 or 6-7, whose lse and D hold NaN."""
    dkdv_path(path)
    s, d = 128, 16
    q, k, v, do, dlse, _ = inputs(1, 2, 1, s, s, d, "float32", 5)
    bad_k, bad_v = k.copy(), v.copy()
    for blk in (0, 7):
        bad_k[:, :, 16 * blk:16 * (blk + 1)] = np.nan
        bad_v[:, :, 16 * blk:16 * (blk + 1)] = np.nan
    out, lse, dq, dk, dv, _ = run(q, bad_k, bad_v, do, dlse, None, window=(8, 8))
    r_out, r_lse, r_dq, r_dk, r_dv, _ = ref_all(q, k, v, do, dlse, None, None, False, (8, 8),
                                                1 / math.sqrt(d))
    assert np.all(np.isnan(out[:, :, :24])) and np.all(np.isnan(out[:, :, 104:]))  # by right
    rows, keys = slice(32, 96), slice(48, 80)
    tol = reference.TOLERANCE["float32"]
    for x, r in ((out, r_out), (lse, r_lse), (dq, r_dq)):
        assert reference.relative_error(x[:, :, rows], r[:, :, rows]) <= tol
    for x, r in ((dk, r_dk), (dv, r_dv)):
        assert reference.relative_error(x[:, :, keys], r[:, :, keys]) <= tol


@SLOW
def test_window_argument():
    rng = np.random.default_rng(6)
    q = jnp.asarray(rng.standard_normal((1, 1, 20, 16)), jnp.float32)
    a = flash(q, q, q, window=4)
    np.testing.assert_array_equal(a, flash(q, q, q, window=(4, np.int64(4))))
    np.testing.assert_array_equal(flash(q, q, q, window=(None, None)), flash(q, q, q))
    for bad in (-1, (1, 2, 3), (2.5, 1), (1, -2)):
        with pytest.raises(ValueError):
            flash(q, q, q, window=bad)


# --- transformations ---------------------------------------------------------------------------

@SLOW
def test_jit_grad_of_bias_and_qkv():
    """Under jit, with an out-only loss (the lse cotangent is a symbolic zero)."""
    rng = np.random.default_rng(7)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 2, s, 16)), jnp.float32) for s in (33, 21, 21))
    bias = jnp.asarray(rng.standard_normal((2, 1, 33, 21)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((2, 2, 33, 16)), jnp.float32)

    def loss(q, k, v, bias):
        return jnp.sum(flash(q, k, v, bias=bias, is_causal=True, window=(6, None)) * w)

    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(q, k, v, bias)
    dq, dk, dv, ds = reference.attention_vjp(q, k, v, w, attn_mask=bias, is_causal=True,
                                             window=(6, None))
    for g, r in zip(grads, (dq, dk, dv, sum_to(ds, bias.shape))):
        assert reference.relative_error(g, r) <= reference.TOLERANCE["float32"]


@SLOW
def test_sharded_bias_gradients_stay_split():
    """Batch/head-sharded inputs under jit: the backward with bias gradients is partitioned like
    the plain one (the bias gradients are results split over batch and heads; the broadcast dims
    are summed afterwards), and matches the unsharded call."""
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
    m = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "model"))
    rng = np.random.default_rng(8)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 4, s, 16)), jnp.float32) for s in (24, 40, 40))
    full = jnp.asarray(rng.standard_normal((1, 4, 24, 40)), jnp.float32)
    per_key = jnp.asarray(rng.standard_normal((2, 1, 1, 40)), jnp.float32)

    def loss(q, k, v, full, per_key):
        a = flash(q, k, v, bias=full, window=(4, 9))
        b = flash(q, k, v, bias=per_key, is_causal=True)
        return jnp.sum(a * a) + jnp.sum(b * jnp.cos(b))

    f = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))
    heads = NamedSharding(m, P("data", "model"))
    args = [jax.device_put(x, s) for x, s in zip(
        (q, k, v, full, per_key), (heads, heads, heads, NamedSharding(m, P(None, "model")),
                                   NamedSharding(m, P("data"))))]
    hlo = f.lower(*args).compile().as_text()
    assert "all-gather" not in hlo
    for g, want in zip(f(*args), f(q, k, v, full, per_key)):
        assert reference.relative_error(g, want) <= 1e-6
