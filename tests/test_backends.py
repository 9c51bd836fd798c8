"""Every backend computes the float64 reference's function: forward, lse and gradients.

Tolerances: `jax_attn.reference.TOLERANCE` per dtype (relative Frobenius error), gradients 2x.
On this CPU, `cudnn` reports why it cannot run and `pallas` runs in interpret mode (few examples:
it is slow there; its own tests cover it in depth).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import jax_attn
from jax_attn import reference
from jax_attn.backends import BACKENDS
from jax_attn.contract import validate

TOL = reference.TOLERANCE
EXAMPLES = {"naive": 20, "xla": 15, "chunked": 25, "pallas": 15}
RUNNABLE = [n for n in EXAMPLES if not BACKENDS[n].unavailable()]


# Chunk sizes that do not divide the test lengths: tails and several chunks (tests/conftest.py).
pytestmark = pytest.mark.small_chunks(16, 24)


def make_call(rng, b, n, n_kv, sq, skv, d, dv, dtype, layout="bnsd", mask="none", causal=False,
              lengths=None):
    """Random inputs (standard normal, never zeros) and the matching keyword arguments."""
    def t(*shape):
        x = jnp.asarray(rng.standard_normal(shape), dtype)
        return x if layout == "bnsd" else jnp.swapaxes(x, 1, 2)

    q, k, v = t(b, n, sq, d), t(b, n_kv, skv, d), t(b, n_kv, skv, dv)
    kw = dict(layout=layout, is_causal=causal)
    if mask == "key":
        kw["attn_mask"] = jnp.asarray(rng.random((b, 1, 1, skv)) < 0.7)
    elif mask == "full":
        m = rng.random((b, n, sq, skv)) < 0.7
        m[0, 0, 0] = False  # one empty row
        kw["attn_mask"] = jnp.asarray(m)
    elif mask == "bias":
        bias = rng.standard_normal((1, n, sq, skv)).astype(np.float32)
        bias[0, -1, -1] = -np.inf  # one empty row, from the bias alone
        bias[0, 0, :, 0] = -np.inf
        kw["attn_mask"] = jnp.asarray(bias, dtype)
    if lengths is not None:
        kw["kv_lengths"] = jnp.asarray(lengths, jnp.int32)
    return q, k, v, kw


def to_bnsd(x, layout):
    x = np.asarray(x.astype(jnp.float32) if x.dtype != jnp.float64 else x, np.float64)
    return x if layout == "bnsd" else np.swapaxes(x, 1, 2)


def reference_for(q, k, v, kw, d_out):
    layout = kw["layout"]
    qn, kn, vn = (to_bnsd(x, layout) for x in (q, k, v))
    mask = kw.get("attn_mask")
    mask = None if mask is None else np.asarray(mask.astype(jnp.float32) if mask.dtype != jnp.bool_ else mask)
    lengths = kw.get("kv_lengths")
    lengths = None if lengths is None else np.asarray(lengths)
    out, lse = reference.attention(qn, kn, vn, mask, lengths, kw["is_causal"], return_lse=True)
    grads = reference.attention_vjp(qn, kn, vn, to_bnsd(d_out, layout), mask, lengths, kw["is_causal"])
    return out, lse, grads


def assert_matches_reference(backend, q, k, v, kw, dtype, rng):
    tol = TOL[dtype]
    layout = kw["layout"]
    out, lse = jax_attn.attention_forward(q, k, v, backend=backend, return_lse=True, **kw)
    assert out.dtype == q.dtype and out.shape[:3] == q.shape[:3] and out.shape[3] == v.shape[3]
    d_out = jnp.asarray(rng.standard_normal(out.shape), dtype)
    ref_out, ref_lse, ref_grads = reference_for(q, k, v, kw, d_out)
    assert reference.relative_error(to_bnsd(out, layout), ref_out) <= tol
    assert reference.relative_error(lse, ref_lse) <= tol

    def loss(q, k, v):
        o = jax_attn.attention_forward(q, k, v, backend=backend, **kw)
        return jnp.sum(o.astype(jnp.float32) * d_out.astype(jnp.float32))

    grads = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
    for name, g, r in zip("qkv", grads, ref_grads[:3]):
        err = reference.relative_error(to_bnsd(g, layout), r)
        assert err <= 2 * tol, f"d{name}: relative error {err:.2e} > {2 * tol:.0e}"


@st.composite
def calls(draw):
    n_kv, groups = draw(st.integers(1, 2)), draw(st.sampled_from([1, 2, 3]))
    sq, skv = draw(st.sampled_from([1, 5, 17, 33, 77])), draw(st.sampled_from([1, 7, 24, 50, 77]))
    d = draw(st.sampled_from([8, 16, 40, 72]))
    dv = draw(st.sampled_from([d, d, 24]))
    b = draw(st.integers(1, 2))
    lengths = draw(st.one_of(st.none(), st.lists(st.integers(0, skv), min_size=b, max_size=b)))
    return dict(b=b, n=n_kv * groups, n_kv=n_kv, sq=sq, skv=skv, d=d, dv=dv,
                dtype=draw(st.sampled_from(["float32", "bfloat16", "float16"])),
                layout=draw(st.sampled_from(["bnsd", "bsnd"])),
                mask=draw(st.sampled_from(["none", "key", "full", "bias"])),
                causal=draw(st.booleans()), lengths=lengths), draw(st.integers(0, 2 ** 31))


@pytest.mark.slow  # a property sweep (15-25 examples each); the fast run keeps the tests below
@pytest.mark.parametrize("backend", RUNNABLE)
def test_matches_reference_on_random_calls(backend):
    @settings(max_examples=EXAMPLES[backend], deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow])
    @given(calls())
    def check(call):
        params, seed = call
        rng = np.random.default_rng(seed)
        q, k, v, kw = make_call(rng, **params)
        spec = validate(q, k, v, attn_mask=kw.get("attn_mask"), kv_lengths=kw.get("kv_lengths"),
                        is_causal=kw["is_causal"], layout=kw["layout"])
        assume(not BACKENDS[backend].reasons(spec))
        assert_matches_reference(backend, q, k, v, kw, params["dtype"], rng)

    check()


@pytest.mark.fast_every(3)
@pytest.mark.fast_diagonal  # the fast run: each backend once (the first three shapes)
@pytest.mark.parametrize("backend", ["naive", "xla", "chunked"])
@pytest.mark.parametrize("sq,skv,d", [(1, 77, 8), (77, 1, 256), (4097, 77, 40),
                                      pytest.param(33, 4097, 72, marks=pytest.mark.slow),
                                      pytest.param(64, 64, 128, marks=pytest.mark.slow),
                                      pytest.param(5, 9, 200, marks=pytest.mark.slow)])
def test_required_lengths_and_head_dims(backend, sq, skv, d):
    rng = np.random.default_rng(sq * skv + d)
    q, k, v, kw = make_call(rng, 1, 2, 1, sq, skv, d, d, "float32", lengths=[max(1, skv - 3)])
    assert_matches_reference(backend, q, k, v, kw, "float32", rng)


@pytest.mark.slow  # the fast run has tests/test_reliability.py::test_bias_gradient_is_real
@pytest.mark.parametrize("backend", ["naive", "xla", "chunked"])
def test_bias_gradient(backend):
    rng = np.random.default_rng(7)
    q, k, v, kw = make_call(rng, 2, 2, 2, 20, 30, 16, 16, "float32")
    bias = jnp.asarray(rng.standard_normal((2, 1, 20, 30)), jnp.float32)  # broadcast over heads
    d_out = jnp.asarray(rng.standard_normal((2, 2, 20, 16)), jnp.float32)
    g = jax.grad(lambda m: jnp.sum(jax_attn.attention_forward(q, k, v, attn_mask=m, backend=backend) * d_out))(bias)
    ds = reference.attention_vjp(q, k, v, d_out, np.asarray(bias))[3]
    assert reference.relative_error(g, ds.sum(1, keepdims=True)) <= TOL["float32"]


@pytest.mark.parametrize("backend", [n for n in RUNNABLE if BACKENDS[n].supports_lse_grad])
def test_lse_gradient(backend):
    """d(sum_i w_i lse_i)/ds_ij = w_i p_ij: ring attention and attention maps rely on it."""
    rng = np.random.default_rng(9)
    q, k, v, kw = make_call(rng, 2, 4, 2, 13, 21, 8, 8, "float32", mask="key", lengths=[21, 0])
    w = jnp.asarray(rng.standard_normal((2, 4, 13)), jnp.float32)
    loss = lambda q, k: jnp.sum(jnp.where(jnp.isfinite(w), w, 0) * jnp.nan_to_num(
        jax_attn.attention_forward(q, k, v, backend=backend, return_lse=True, **kw)[1], neginf=0.0))
    dq, dk = jax.grad(loss, argnums=(0, 1))(q, k)
    qn, kn = to_bnsd(q, "bnsd"), np.repeat(to_bnsd(k, "bnsd"), 2, axis=1)
    wp = np.asarray(w)[..., None] * reference.probabilities(qn, to_bnsd(k, "bnsd"), np.asarray(kw["attn_mask"]),
                                                            np.asarray(kw["kv_lengths"]))
    scale = 8 ** -0.5
    ref_dq = scale * np.einsum("bnqk,bnkd->bnqd", wp, kn)
    ref_dk = (scale * np.einsum("bnqk,bnqd->bnkd", wp, qn)).reshape(2, 2, 2, 21, 8).sum(2)
    assert reference.relative_error(dq, ref_dq) <= TOL["float32"]
    assert reference.relative_error(dk, ref_dk) <= TOL["float32"]


@pytest.mark.parametrize("backend", RUNNABLE)
def test_empty_rows_give_zeros_and_zero_gradients(backend):
    rng = np.random.default_rng(3)
    q, k, v, kw = make_call(rng, 2, 2, 2, 9, 12, 8, 8, "float32", mask="full", lengths=[0, 12])
    kw["attn_mask"] = kw["attn_mask"].at[1, 0, 0].set(False)  # sample 0 is empty by length
    out = jax_attn.attention_forward(q, k, v, backend=backend, **kw)
    dq, dk, dv = jax.grad(lambda q, k, v: jnp.sum(jax_attn.attention_forward(q, k, v, backend=backend, **kw)),
                          argnums=(0, 1, 2))(q, k, v)
    assert np.all(np.isfinite(out)) and np.all(np.isfinite(dq)) and np.all(np.isfinite(dk))
    assert np.all(out[0] == 0) and np.all(dq[0] == 0) and np.all(dk[0] == 0) and np.all(dv[0] == 0)
    assert np.all(out[1, 0, 0] == 0) and np.all(dq[1, 0, 0] == 0)  # the masked row of sample 1
    assert np.any(out[1] != 0)


@pytest.mark.parametrize("backend", ["naive", "xla", "chunked"])
def test_nan_in_inputs_propagates_like_the_reference(backend):
    rng = np.random.default_rng(5)
    q, k, v, kw = make_call(rng, 1, 2, 2, 6, 7, 8, 8, "float32")
    q = q.at[0, 1, 2, 3].set(jnp.nan)
    out = jax_attn.attention_forward(q, k, v, backend=backend, **kw)
    ref = reference.attention(q, k, v)
    assert np.array_equal(np.isnan(out), np.isnan(ref)) and np.isnan(ref).any()


@pytest.mark.parametrize("backend", RUNNABLE)
def test_jit_and_vmap(backend):
    rng = np.random.default_rng(11)
    q, k, v = (jnp.asarray(rng.standard_normal((3, 1, 2, 10, 8)), jnp.float32) for _ in range(3))
    f = jax.jit(jax.vmap(lambda q, k, v: jax_attn.attention_forward(q, k, v, backend=backend, is_causal=True)))
    out = f(q, k, v)
    for i in range(3):
        ref = reference.attention(q[i], k[i], v[i], is_causal=True)
        assert reference.relative_error(out[i], ref) <= TOL["float32"]


def test_cudnn_says_why_not_here():
    if jax.default_backend() == "gpu":
        pytest.skip("on a GPU cudnn may be available; see tests on the device")
    why = jax_attn.explain(jax.ShapeDtypeStruct((1, 2, 8, 64), jnp.bfloat16),
                           jax.ShapeDtypeStruct((1, 2, 8, 64), jnp.bfloat16),
                           jax.ShapeDtypeStruct((1, 2, 8, 64), jnp.bfloat16)).reasons["cudnn"]
    assert why and "GPU" in why[0]
