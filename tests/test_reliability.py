"""Nothing silently wrong: the holes found by JAX's own attention tests and a bad-input battery.

Every backend this machine runs (pallas in interpret mode) against the float64 reference, on
random inputs: gradients through a float bias, NaN rows, garbage in padding, huge lengths,
argument hygiene, `jax.debug_infs`, forward-mode autodiff, and jax.nn's arguments.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_attn
from jax_attn import reference
from jax_attn.backends import BACKENDS

BACKEND_NAMES = [n for n in ("naive", "xla", "chunked", "pallas") if not BACKENDS[n].unavailable()]
TOL = reference.TOLERANCE["float32"]
SLOW = pytest.mark.slow


# Chunks that do not divide the lengths: several chunks and tails (tests/conftest.py).
pytestmark = pytest.mark.small_chunks(8, 16)


def normal(rng, *shape, dtype=jnp.float32):
    return jnp.asarray(rng.standard_normal(shape), dtype)


def qkv(rng, b=2, n=4, n_kv=2, sq=24, skv=40, d=16):
    return normal(rng, b, n, sq, d), normal(rng, b, n_kv, skv, d), normal(rng, b, n_kv, skv, d)


def f64(x):
    return None if x is None else np.asarray(x, np.float64)


def grads(backend, q, k, v, d_out, **kw):
    """d(sum(out * d_out)) / d(q, k, v) through `attention_forward`."""
    def loss(q, k, v):
        return jnp.sum(jax_attn.attention_forward(q, k, v, backend=backend, **kw) * d_out)
    return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)


# ---- 1. a float bias gets its real gradient on every backend ---------------------------------

@pytest.mark.fast_every(4)
@pytest.mark.fast_diagonal  # the fast run: each bias shape once, each backend once
@pytest.mark.parametrize("bias_shape", [(2, 1, 1, 40), (1, 4, 24, 40), (2, 4, 24, 40), (1, 4, 1, 40)])
@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_bias_gradient_is_real(backend, bias_shape):
    rng = np.random.default_rng(1)
    q, k, v = qkv(rng)
    bias = normal(rng, *bias_shape)
    lengths = jnp.asarray([40, 29], jnp.int32)
    d_out = normal(rng, 2, 4, 24, 16)

    def loss(bias):
        out = jax_attn.attention_forward(q, k, v, attn_mask=bias, kv_lengths=lengths, backend=backend)
        return jnp.sum(out * d_out)

    got = jax.grad(loss)(bias)
    full = reference.attention_vjp(q, k, v, d_out, f64(bias), np.asarray(lengths))[3]
    axes = tuple(i for i, s in enumerate(bias_shape) if s == 1)
    want = full.sum(axis=axes, keepdims=True)
    assert np.abs(want).max() > 1e-3  # the reference gradient is far from zero: zeros cannot pass
    assert reference.relative_error(got, want) <= 2 * TOL


# ---- 2. a NaN row is NaN, not "empty" ---------------------------------------------------------

@pytest.mark.fast_every(3)
@pytest.mark.parametrize("backend", [pytest.param(n, marks=SLOW) if n == "naive" else n
                                     for n in BACKEND_NAMES])
def test_nan_in_a_visible_logit_is_nan_not_empty(backend):
    rng = np.random.default_rng(2)
    q, k, v = qkv(rng, sq=16, skv=24)
    q = q.at[0, 1, 3, 0].set(jnp.nan)  # row (0, 1, 3): every logit NaN
    out, lse = jax_attn.attention_forward(q, k, v, backend=backend, return_lse=True,
                                          kv_lengths=jnp.asarray([24, 0], jnp.int32))
    assert np.isnan(np.asarray(out[0, 1, 3])).all() and np.isnan(float(lse[0, 1, 3]))
    assert np.isfinite(np.asarray(out[0, 0])).all()
    assert (np.asarray(out[1]) == 0).all() and np.isneginf(np.asarray(lse[1])).all()  # truly empty rows
    dv = jax.grad(lambda v: jnp.sum(jax_attn.attention_forward(q, k, v, backend=backend)))(v)
    assert np.isnan(np.asarray(dv[0, 0])).any()  # the NaN row's head group: NaN gradients, not garbage


# ---- 3. padding and masked keys never matter, whatever they hold -------------------------------

def poison(x, where_seq, value):
    """`x` (b, n, s, d) with `value` at the (batch, position) pairs of `where_seq`."""
    x = np.array(x)
    for b, s in where_seq:
        x[b, :, s] = value
    return jnp.asarray(x)


PADDING = {
    "kv_lengths": dict(kv_lengths=[40, 29]),
    "per-key bool mask": dict(key_mask=True),
    "full bool mask": dict(full_mask=True),
    "causal, more keys than queries": dict(causal=True),
    "window": dict(window=(3, 2)),
    "query_seq_lengths": dict(q_lengths=[24, 11]),
}


@pytest.mark.fast_every(3)
@pytest.mark.fast_diagonal  # the fast run: each case once, backends and values in turn
@pytest.mark.parametrize("value", [np.nan, np.inf])
@pytest.mark.parametrize("case", list(PADDING))
@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_padding_contributes_nothing_whatever_it_holds(backend, case, value):
    if case == "window" and not BACKENDS[backend].supports_window:
        pytest.skip(f"{backend} does not serve windows")
    c = PADDING[case]
    rng = np.random.default_rng(3)
    q, k, v = qkv(rng)
    kw, ref_kw, bad_keys, bad_queries = {}, {}, [], []
    if "kv_lengths" in c:
        kw["kv_lengths"] = ref_kw["kv_lengths"] = np.asarray(c["kv_lengths"], np.int32)
        bad_keys = [(1, s) for s in range(29, 40)]
    if "key_mask" in c:
        m = np.ones((2, 1, 1, 40), bool)
        m[0, 0, 0, [2, 17, 39]] = False
        kw["attn_mask"] = ref_kw["attn_mask"] = m
        bad_keys = [(0, 2), (0, 17), (0, 39)]
    if "full_mask" in c:
        m = rng.random((2, 4, 24, 40)) < 0.8
        m[1, :, :, 5] = False  # key 5 of sample 1 hidden from every query of every head
        kw["attn_mask"] = ref_kw["attn_mask"] = m
        bad_keys = [(1, 5)]
    if "causal" in c:
        kw["is_causal"] = ref_kw["is_causal"] = True
        bad_keys = [(b, s) for b in range(2) for s in range(24, 40)]  # after the last query
    if "window" in c:
        kw["local_window_size"], ref_kw["window"] = c["window"], c["window"]
        bad_keys = [(b, s) for b in range(2) for s in range(26, 40)]  # beyond 23 + 2
    if "q_lengths" in c:
        kw["query_seq_lengths"] = ref_kw["q_lengths"] = np.asarray(c["q_lengths"], np.int32)
        bad_queries = [(1, s) for s in range(11, 24)]
    k, v = poison(k, bad_keys, value), poison(v, bad_keys, value)
    q = poison(q, bad_queries, value)
    jkw = {name: jnp.asarray(x) if isinstance(x, np.ndarray) else x for name, x in kw.items()}
    out, lse = jax_attn.attention_forward(q, k, v, backend=backend, return_lse=True, **jkw)
    clean = lambda x, pos: poison(x, pos, 0.0)  # noqa: E731  the reference never sees the poison
    qc, kc, vc = clean(q, bad_queries), clean(k, bad_keys), clean(v, bad_keys)
    ref_kw = {**ref_kw, "window": ref_kw.get("window"), "q_lengths": ref_kw.get("q_lengths")}
    pos = {n: ref_kw.pop(n, None) for n in ("attn_mask", "kv_lengths", "is_causal")}
    ref, ref_lse = reference.attention(qc, kc, vc, pos["attn_mask"], pos["kv_lengths"],
                                       bool(pos["is_causal"]), return_lse=True, **ref_kw)
    assert reference.relative_error(out, ref) <= TOL and reference.relative_error(lse, ref_lse) <= TOL
    d_out = normal(rng, *out.shape)
    got = grads(backend, q, k, v, d_out, **jkw)
    want = reference.attention_vjp(qc, kc, vc, d_out, pos["attn_mask"], pos["kv_lengths"],
                                   bool(pos["is_causal"]), **ref_kw)[:3]
    for name, g, w in zip("qkv", got, want):
        assert np.isfinite(np.asarray(g)).all(), f"d{name} not finite"
        assert reference.relative_error(g, w) <= 2 * TOL, f"d{name}"
    for b, s in bad_keys:
        assert (np.asarray(got[1][b, :, s]) == 0).all() and (np.asarray(got[2][b, :, s]) == 0).all()


# ---- 4. lengths are clamped, never wrapped ----------------------------------------------------

@pytest.mark.parametrize("lengths", [np.asarray([2**32 + 2, 5], np.int64),
                                     np.asarray([np.iinfo(np.uint32).max, 5], np.uint32),
                                     np.asarray([127, 5], np.int8), np.asarray([40, 5], np.uint16)])
def test_kv_lengths_above_the_keys_mean_all_keys(lengths):
    rng = np.random.default_rng(4)
    q, k, v = qkv(rng)
    out = jax_attn.attention_forward(q, k, v, kv_lengths=lengths, backend="naive")
    ref = reference.attention(q, k, v, kv_lengths=np.minimum(lengths.astype(np.int64), 40))
    assert reference.relative_error(out, ref) <= TOL
    jitted = jax.jit(lambda kl: jax_attn.attention_forward(q, k, v, kv_lengths=kl, backend="xla"))
    if lengths.dtype.itemsize <= 4:  # JAX arrays of this dtype exist without x64
        assert reference.relative_error(jitted(jnp.asarray(lengths)), ref) <= TOL


def test_negative_lengths_raise_naming_the_argument():
    rng = np.random.default_rng(5)
    q, k, v = qkv(rng)
    with pytest.raises(ValueError, match="kv_lengths must be >= 0"):
        jax_attn.attention_forward(q, k, v, kv_lengths=np.asarray([3, -1]))
    with pytest.raises(ValueError, match="query_seq_lengths must be >= 0"):
        jax_attn.attention_forward(q, k, v, query_seq_lengths=jnp.asarray([-3, 1]))


# ---- 6. argument hygiene ------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,error,message", [
    (dict(scale="abc"), TypeError, "scale must be a real number"),
    (dict(scale="0.5"), TypeError, "scale must be a real number"),
    (dict(scale=True), TypeError, "scale must be a real number"),
    (dict(backend=["xla", ["naive"]]), TypeError, "backend must be .* list of names"),
    (dict(is_causal="yes"), TypeError, "is_causal must be a bool"),
    (dict(local_window_size=-1), TypeError, "local_window_size must be"),
    (dict(local_window_size=(1, 2, 3)), TypeError, "local_window_size must be"),
    (dict(kv_lengths=jnp.ones(2, jnp.int32), key_value_seq_lengths=jnp.ones(2, jnp.int32)), ValueError,
     "not both"),
    (dict(bias=jnp.ones((2, 4, 24, 40), bool)), TypeError, "bias must be a floating additive bias"),
    (dict(mask=jnp.ones((2, 4, 24, 40))), TypeError, r"mask must be bool \(True = attend\)"),
    (dict(query_seq_lengths=jnp.ones(3, jnp.int32)), ValueError, "query_seq_lengths must have shape"),
])
def test_bad_arguments_name_themselves(kwargs, error, message):
    q, k, v = qkv(np.random.default_rng(6))
    with pytest.raises(error, match=message):
        jax_attn.attention_forward(q, k, v, **kwargs)


def test_shapes_only_go_to_explain():
    s = jax.ShapeDtypeStruct((2, 4, 24, 16), jnp.float32)
    with pytest.raises(TypeError, match=r"q is a jax.ShapeDtypeStruct.*explain"):
        jax_attn.attention_forward(s, s, s)
    assert jax_attn.explain(s, s, s).backend is not None


def test_numpy_scalars_are_accepted():
    rng = np.random.default_rng(7)
    q, k, v = qkv(rng)
    out = jax_attn.attention_forward(q, k, v, is_causal=np.bool_(True), scale=np.float32(0.3), backend="naive")
    ref = reference.attention(q, k, v, is_causal=True, scale=float(np.float32(0.3)))
    assert reference.relative_error(out, ref) <= TOL


# ---- 7. jax.debug_infs ---------------------------------------------------------------------------

@pytest.mark.parametrize("backend", [pytest.param("naive", marks=SLOW), pytest.param("xla", marks=SLOW),
                                     "chunked"])
def test_debug_infs_is_quiet_on_masked_calls(backend):
    rng = np.random.default_rng(8)
    q, k, v = qkv(rng)
    mask = jnp.asarray(np.arange(40) < 33)
    with jax.debug_infs(True):
        for return_lse in (False, True):
            jax.block_until_ready(jax_attn.attention_forward(
                q, k, v, attn_mask=mask, is_causal=True, kv_lengths=jnp.asarray([40, 30]),
                backend=backend, return_lse=return_lse))


# ---- forward-mode autodiff ---------------------------------------------------------------------

@pytest.mark.slow
def test_forward_mode_works_or_names_the_backend():
    rng = np.random.default_rng(9)
    q, k, v = qkv(rng, sq=8, skv=12)
    t = normal(rng, *q.shape)
    f = lambda be: (lambda q: jax_attn.attention_forward(q, k, v, backend=be))  # noqa: E731
    want = jax.jvp(lambda q: jax.nn.dot_product_attention(*(jnp.swapaxes(x, 1, 2) for x in (q, k, v))),
                   (q,), (t,))[1]
    for backend in ("naive", "xla"):
        got = jax.jvp(f(backend), (q,), (t,))[1]
        assert reference.relative_error(got, jnp.swapaxes(want, 1, 2)) <= TOL
    got = jax.jvp(f(None), (q,), (t,))[1]  # auto: a backend that has forward mode
    assert reference.relative_error(got, jnp.swapaxes(want, 1, 2)) <= TOL
    for backend in [n for n in BACKEND_NAMES if n not in ("naive", "xla")]:
        with pytest.raises(jax_attn.BackendError, match=rf"(?s){backend}: .*forward-mode autodiff"):
            jax.jvp(f(backend), (q,), (t,))
        with pytest.raises(jax_attn.BackendError, match="forward-mode"):
            jax.jacfwd(f(backend))(q)
    h = jax.hessian(lambda s: jnp.sum(jax_attn.attention_forward(q * s, k, v)))(1.0)
    assert np.isfinite(float(h))


# ---- jax.nn parity -------------------------------------------------------------------------------

def jnn(q, k, v, **kw):
    """jax.nn.dot_product_attention in our (b, n, s, d) layout (an independent implementation)."""
    out = jax.nn.dot_product_attention(*(jnp.swapaxes(x, 1, 2) for x in (q, k, v)), **kw)
    return jnp.swapaxes(out, 1, 2)


@pytest.mark.parametrize("backend", [n if n == "pallas" else pytest.param(n, marks=SLOW)
                                     for n in BACKEND_NAMES])
def test_bias_and_mask_together_like_jax_nn(backend):
    rng = np.random.default_rng(10)
    q, k, v = qkv(rng, n_kv=4)
    bias = normal(rng, 1, 4, 24, 40)
    mask = jnp.asarray(rng.random((2, 1, 24, 40)) < 0.8).at[:, :, :, 0].set(True)  # no empty row
    out = jax_attn.attention_forward(q, k, v, bias=bias, mask=mask, backend=backend)
    assert reference.relative_error(out, np.asarray(jnn(q, k, v, bias=bias, mask=mask), np.float64)) <= TOL
    d_out = normal(rng, *out.shape)
    db = jax.grad(lambda b: jnp.sum(jax_attn.attention_forward(q, k, v, bias=b, mask=mask, backend=backend)
                                    * d_out))(bias)
    want = reference.attention_vjp(q, k, v, d_out, np.where(np.asarray(mask), f64(bias), -np.inf))[3]
    assert reference.relative_error(db, want.sum(0, keepdims=True)) <= 2 * TOL


@pytest.mark.fast_every(3)
@pytest.mark.fast_diagonal  # the fast run: each window once, backends in turn
@pytest.mark.parametrize("backend", [n for n in ("xla", "chunked", "pallas", "naive")  # xla, the
                                     if n in BACKEND_NAMES])  # cheapest, first: it comes up twice
@pytest.mark.parametrize("window", [(3, 2), (0, 0), 5, (None, 4), (6, None)])
def test_local_window_size_like_jax_nn(backend, window):
    if not BACKENDS[backend].supports_window:
        pytest.skip(f"{backend} does not serve windows")
    rng = np.random.default_rng(11)
    q, k, v = qkv(rng, sq=30, skv=30)
    out, lse = jax_attn.attention_forward(q, k, v, local_window_size=window, backend=backend, return_lse=True)
    ref, ref_lse = reference.attention(q, k, v, window=window, return_lse=True)
    assert reference.relative_error(out, ref) <= TOL and reference.relative_error(lse, ref_lse) <= TOL
    if None not in np.atleast_1d(np.asarray(window, object)):
        assert reference.relative_error(out, np.asarray(jnn(q, k, v, local_window_size=window), np.float64)) <= TOL
    d_out = normal(rng, *out.shape)
    got = grads(backend, q, k, v, d_out, local_window_size=window)
    want = reference.attention_vjp(q, k, v, d_out, window=window)[:3]
    assert max(reference.relative_error(g, w) for g, w in zip(got, want)) <= 2 * TOL


@pytest.mark.fast_every(2)
@pytest.mark.parametrize("backend", [pytest.param(n, marks=SLOW) if n in ("naive", "xla") else n
                                     for n in BACKEND_NAMES])
def test_query_and_key_value_seq_lengths(backend):
    rng = np.random.default_rng(12)
    q, k, v = qkv(rng)
    ql, kl = jnp.asarray([24, 9], jnp.int32), jnp.asarray([17, 40], jnp.int32)
    out, lse = jax_attn.attention_forward(q, k, v, query_seq_lengths=ql, key_value_seq_lengths=kl,
                                          backend=backend, return_lse=True)
    ref, ref_lse = reference.attention(q, k, v, kv_lengths=np.asarray(kl), q_lengths=np.asarray(ql),
                                       return_lse=True)
    assert reference.relative_error(out, ref) <= TOL and reference.relative_error(lse, ref_lse) <= TOL
    assert (np.asarray(out[1, :, 9:]) == 0).all()  # padding queries: zeros (jax.nn averages there)
    valid = jnn(q, k, v, query_seq_lengths=ql, key_value_seq_lengths=kl)
    assert reference.relative_error(out[1, :, :9], np.asarray(valid[1, :, :9], np.float64)) <= TOL
    d_out = normal(rng, *out.shape)
    got = grads(backend, q, k, v, d_out, query_seq_lengths=ql, key_value_seq_lengths=kl)
    want = reference.attention_vjp(q, k, v, d_out, kv_lengths=np.asarray(kl), q_lengths=np.asarray(ql))[:3]
    assert max(reference.relative_error(g, w) for g, w in zip(got, want)) <= 2 * TOL


@pytest.mark.parametrize("layout", ["bsnd", "bnsd"])
def test_unbatched_inputs(layout):
    rng = np.random.default_rng(13)
    q, k, v = normal(rng, 24, 4, 16), normal(rng, 40, 2, 16), normal(rng, 40, 2, 16)  # (s, n, d)
    if layout == "bnsd":
        q, k, v = (jnp.swapaxes(x, 0, 1) for x in (q, k, v))
    out, lse = jax_attn.attention_forward(q, k, v, layout=layout, kv_lengths=jnp.asarray(31),
                                          return_lse=True, backend="naive")
    assert out.shape == q.shape and lse.shape == (4, 24)
    bnsd = (lambda x: x[None]) if layout == "bnsd" else (lambda x: jnp.swapaxes(x, 0, 1)[None])
    ref = reference.attention(*(bnsd(x) for x in (q, k, v)), kv_lengths=np.asarray([31]))[0]
    got = out if layout == "bnsd" else jnp.swapaxes(out, 0, 1)
    assert reference.relative_error(got, ref) <= TOL
    if layout == "bsnd":  # jax.nn's own unbatched form
        want = jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=jnp.asarray([31]))
        assert reference.relative_error(out, np.asarray(want, np.float64)) <= TOL


# ---- an lse without a gradient says so -----------------------------------------------------------

def test_differentiating_an_lse_without_gradient_raises(monkeypatch):
    """A backend whose VJP ignores the lse cotangent (cuDNN) must not return a gradient that
    silently misses the lse's share: differentiating the lse raises, naming the backend."""
    monkeypatch.setattr(BACKENDS["naive"], "supports_lse_grad", False)
    rng = np.random.default_rng(14)
    q, k, v = qkv(rng)

    def loss(q, use_lse):
        out, lse = jax_attn.attention_forward(q, k, v, backend="naive", return_lse=True)
        return jnp.sum(out) + (jnp.sum(lse) if use_lse else jnp.sum(jax.lax.stop_gradient(lse)))

    g = jax.grad(loss)(q, False)  # the lse not differentiated: fine
    want = reference.attention_vjp(q, k, v, np.ones((2, 4, 24, 16)))[0]
    assert reference.relative_error(g, want) <= 2 * TOL
    with pytest.raises(ValueError, match="backend 'naive': the log-sum-exp it returns has no gradient"):
        jax.grad(loss)(q, True)
