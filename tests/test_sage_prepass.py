"""The `sage` pre-pass kernel (`kernels/sage_prepass.py`, Pallas interpret mode here) against the
jnp scheme (`quantization.quantize`): the INT8 values and every scale bit for bit (in interpret
mode, i.e. under XLA's arithmetic; see sage_prepass's docstring for the compiled kernel), the lse shift
to float32 summation order, in both layouts, with GQA, padded rows and head dims, all-zero rows,
heavy tails and a K channel offset (what the smoothing is for)."""
import numpy as np
import jax.numpy as jnp
import pytest

from jax_attn import quantization as Q
from jax_attn.kernels import sage_prepass as P

CASES = [  # layout, (b, n, n_kv, sq, skv, d), 16-bit P V
    ("bnsd", (1, 4, 2, 100, 130, 40), False),
    ("bsnd", (2, 2, 2, 64, 200, 128), True),
    ("bsnd", (1, 4, 1, 70, 64, 64), False),
    ("bnsd", (2, 3, 3, 128, 256, 80), True),
]


def _inputs(layout, b, n, n_kv, sq, skv, d, seed):
    rng = np.random.default_rng(seed)
    shape = (lambda s, h: (b, h, s, d)) if layout == "bnsd" else (lambda s, h: (b, s, h, d))
    q = rng.standard_t(3, shape(sq, n))
    k = rng.standard_normal(shape(skv, n_kv)) + 6.0 * rng.standard_normal(d)
    v = rng.standard_normal(shape(skv, n_kv))
    q[0, 1, 1] = 0.0  # one all-zero row (head 1, token 1 in either layout): scale 1
    return (jnp.asarray(x, jnp.bfloat16) for x in (q, k, v))


# per key; per key block (k_scale_per_tile); 256 rows at dp = 128 run the sliced sweep
@pytest.mark.parametrize("k_rows", [1, 128, 256])
@pytest.mark.parametrize("layout,dims,pv16", CASES)
def test_prepass_kernel_matches_the_scheme(layout, dims, pv16, k_rows):
    b, n, n_kv, sq, skv, d = dims
    q, k, v = _inputs(layout, *dims, seed=sq + skv)
    dp = 64 if d <= 64 else 128
    kw = dict(layout=layout, scale=0.17, dp=dp, sq_pad=-(-sq // 128) * 128,
              skv_pad=-(-skv // max(k_rows, 128)) * max(k_rows, 128), v_key_perm=not pv16,
              pv_dtype=jnp.bfloat16 if pv16 else None)
    want = Q.quantize(q, k, v, q_rows=1, k_rows=k_rows, **kw)
    # The same smoothing mean (token_stats' sums in another order: checked on its own below)
    got = P.quantize(q, k, v, interpret=True, k_rows=k_rows, v_pallas=not pv16,
                     mean=Q.smoothing_mean(k, layout), **kw)
    for name in ("q8", "q_scale", "k8", "k_scale", "vt8", "out_scale"):
        w, g = getattr(want, name), getattr(got, name)
        assert g.shape == w.shape and g.dtype == w.dtype, name
        np.testing.assert_array_equal(np.asarray(g.astype(jnp.float32)),
                                      np.asarray(w.astype(jnp.float32)), err_msg=name)
    assert got.v_bsnd == want.v_bsnd
    np.testing.assert_allclose(np.asarray(got.lse_shift), np.asarray(want.lse_shift),
                               rtol=1e-5, atol=1e-4)
    # the int8 rows are not all zeros (the test would pass on a kernel that wrote nothing)
    assert np.abs(np.asarray(got.q8, np.int32)).max() == 127


def test_round_half_even_matches_jnp_round():
    rng = np.random.default_rng(0)
    ties = np.arange(-130, 130) + 0.5
    near = np.nextafter(ties, 0.0), np.nextafter(ties, np.inf)
    x = jnp.asarray(np.concatenate([ties, *near, rng.uniform(-128, 128, 4096)]), jnp.float32)
    np.testing.assert_array_equal(np.asarray(P._round_half_even(x)), np.asarray(jnp.round(x)))


def test_block_contract_is_checked():
    x = jnp.zeros((1, 1, 64, 64), jnp.bfloat16)
    mean = jnp.zeros((1, 1, 64), jnp.float32)
    with pytest.raises(ValueError, match="rows_pad"):
        P.quantize_rows(x, mean, layout="bnsd", rows_pad=100, dp=64, groups=1, interpret=True)
    with pytest.raises(ValueError, match="powers of two"):
        P.quantize_rows(x, mean, layout="bnsd", rows_pad=64, dp=96, groups=1, interpret=True)


@pytest.mark.parametrize("layout,dims,perm", [
    ("bnsd", (1, 4, 2, 100, 130, 40), True),   # padded keys and head dim
    ("bsnd", (2, 2, 2, 64, 256, 128), True),
    ("bsnd", (1, 4, 1, 70, 64, 64), False),
])
def test_v_pass_matches_the_scheme(layout, dims, perm):
    # The FP8 V pass (scale per channel, e4m3, transposed, key-permuted) against the jnp one.
    b, n, n_kv, sq, skv, d = dims
    _, _, v = _inputs(layout, *dims, seed=skv)
    dp = 64 if d <= 64 else 128
    kw = dict(layout=layout, dp=dp, skv_pad=-(-skv // 128) * 128, v_key_perm=perm)
    want = Q.quantize_v(v, **kw)
    got = P.quantize_v(v, interpret=True, **kw)
    for name, w, g in zip(("vt8", "out_scale"), want[:2], got[:2]):
        assert g.shape == w.shape and g.dtype == w.dtype, name
        np.testing.assert_array_equal(np.asarray(g.astype(jnp.float32)),
                                      np.asarray(w.astype(jnp.float32)), err_msg=name)
    assert got[2] is False and np.abs(np.asarray(got[0].astype(jnp.float32))).max() == Q.FP8_MAX


@pytest.mark.parametrize("layout,dims", [("bsnd", (2, 3, 700, 40)), ("bnsd", (1, 2, 300, 128)),
                                         ("bsnd", (1, 1, 100, 64))])
def test_token_stats_pass(layout, dims):
    # K's smoothing mean and V's FP8 channel scales from the one Pallas pass (256 tokens per
    # program: 700 has a masked last block, 100 one block; d = 40 masked columns) against
    # float64 and the jnp definitions; without V, the mean alone.
    b, n, s, d = dims
    rng = np.random.default_rng(s)
    shape = (b, s, n, d) if layout == "bsnd" else (b, n, s, d)
    axis = 1 if layout == "bsnd" else 2
    k = jnp.asarray(rng.standard_normal(shape) * 3 + rng.standard_normal(d) * 8, jnp.bfloat16)
    v = jnp.asarray(rng.standard_t(3, shape), jnp.bfloat16)
    dp = 64 if d <= 64 else 128
    mean, v_scale = P.token_stats(k, v, layout=layout, dp=dp, interpret=True)
    kf, vf = (np.asarray(x.astype(jnp.float32), np.float64) for x in (k, v))
    assert mean.shape == v_scale.shape == (b, n, d)
    np.testing.assert_allclose(np.asarray(mean), kf.mean(axis), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(mean), np.asarray(Q.smoothing_mean(k, layout)),
                               rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(np.asarray(v_scale),  # a max is exact in any order
                                  np.asarray(Q.v_channel_scale(v.astype(jnp.float32), axis)))
    mean_only, none = P.token_stats(k, layout=layout, dp=dp, interpret=True)
    assert none is None
    np.testing.assert_array_equal(np.asarray(mean_only), np.asarray(mean))
