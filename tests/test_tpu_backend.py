"""The `tpu` backend (JAX's Pallas TPU flash kernel) in Pallas TPU interpret mode on the CPU, against
the float64 reference: forward, lse and gradients, with padding, GQA, causal with sq != skv,
kv_lengths with an empty sample, per-key masks per head; and the reasons it declines."""
from __future__ import annotations

import os

os.environ.setdefault("JAX_ATTN_INTERPRET", "1")  # before the backend looks (conftest does too)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import jax_attn  # noqa: E402
from jax_attn import reference  # noqa: E402
from jax_attn.backends import BACKENDS  # noqa: E402

TOL = {"float32": 1e-5, "bfloat16": 2e-2}
pytestmark = pytest.mark.skipif(bool(BACKENDS["tpu"].unavailable()), reason="; ".join(BACKENDS["tpu"].unavailable()))


def _case(seed, b, n, n_kv, sq, skv, d, dtype):
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal(s).astype(np.float32)
               for s in ((b, n, sq, d), (b, n_kv, skv, d), (b, n_kv, skv, d)))
    return [jnp.asarray(x, dtype) for x in (q, k, v)]


CASES = {
    # name: (shape b, n, n_kv, sq, skv, d; options)
    "plain": ((2, 2, 2, 40, 40, 16), {}),
    "causal_sq_ne_skv": ((1, 2, 2, 24, 136, 32), {"is_causal": True}),
    "gqa_lengths": ((2, 4, 2, 17, 33, 16), {"kv_lengths": [0, 20]}),
    "per_head_key_mask_causal": ((2, 2, 1, 30, 30, 16), {"mask": "per_head", "is_causal": True}),
}


@pytest.mark.fast_every(4)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", list(CASES))
def test_matches_float64_reference(name, dtype):
    (b, n, n_kv, sq, skv, d), opts = CASES[name]
    q, k, v = _case(hash(name) % 1000, b, n, n_kv, sq, skv, d, dtype)
    kw = {"is_causal": opts.get("is_causal", False)}
    if "kv_lengths" in opts:
        kw["kv_lengths"] = jnp.asarray(opts["kv_lengths"], jnp.int32)
    if opts.get("mask") == "per_head":
        keep = np.random.default_rng(1).random((b, n, 1, skv)) > 0.4
        keep[0, 1, 0, :] = False  # one head of one sample sees nothing: its rows are zeros
        kw["attn_mask"] = jnp.asarray(keep)
    rng = np.random.default_rng(7)
    d_out = rng.standard_normal((b, n, sq, d))

    def loss(q, k, v):
        out, lse = jax_attn.attention_forward(q, k, v, backend="tpu", return_lse=True, **kw)
        return jnp.sum(out.astype(jnp.float32) * d_out), (out, lse)

    (_, (out, lse)), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    ref_kw = {key: np.asarray(val) for key, val in kw.items() if key != "is_causal"}
    ref_out, ref_lse = reference.attention(q, k, v, return_lse=True, is_causal=kw["is_causal"], **ref_kw)
    ref_grads = reference.attention_vjp(q, k, v, d_out, is_causal=kw["is_causal"], **ref_kw)[:3]
    assert reference.relative_error(out, ref_out) < TOL[dtype]
    assert reference.relative_error(lse, ref_lse) < 10 * TOL[dtype]
    for got, want in zip(grads, ref_grads):
        assert reference.relative_error(got, want) < 2 * TOL[dtype]


def test_segment_ids_with_per_head_key_mask_and_lengths():
    """Packed sequences through the kernel's own segment ids, together with what it folds into them
    (a per-head key mask, so heads fold into the batch; kv_lengths; padding to 128), causal GQA;
    a query segment with no key (empty rows: zeros, lse -inf, no gradient)."""
    b, n, n_kv, s, d = 2, 4, 2, 45, 16
    q, k, v = _case(5, b, n, n_kv, s, s, d, "float32")
    rng = np.random.default_rng(9)
    ids = np.sort(rng.integers(0, 4, (b, s)), -1).astype(np.int32)
    q_ids = ids.copy()
    q_ids[0, 20:24] = 99  # no key holds it
    keep = rng.random((b, n, 1, s)) > 0.3
    lengths = np.array([s, 31], np.int32)
    kw = dict(is_causal=True, attn_mask=jnp.asarray(keep), kv_lengths=jnp.asarray(lengths),
              q_segment_ids=jnp.asarray(q_ids), kv_segment_ids=jnp.asarray(ids))
    d_out = rng.standard_normal((b, n, s, d))

    def loss(q, k, v):
        out, lse = jax_attn.attention_forward(q, k, v, backend="tpu", return_lse=True, **kw)
        return jnp.sum(out * d_out), (out, lse)

    (_, (out, lse)), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    ref_kw = dict(attn_mask=keep, kv_lengths=lengths, is_causal=True, q_segment_ids=q_ids, kv_segment_ids=ids)
    ref_out, ref_lse = reference.attention(q, k, v, return_lse=True, **ref_kw)
    assert np.all(np.isneginf(np.asarray(lse)[0, :, 20:24])) and not np.any(np.asarray(out)[0, :, 20:24])
    assert reference.relative_error(out, ref_out) < TOL["float32"]
    assert reference.relative_error(lse, ref_lse) < 10 * TOL["float32"]
    for got, want in zip(grads, reference.attention_vjp(q, k, v, d_out, **ref_kw)[:3]):
        assert reference.relative_error(got, want) < 2 * TOL["float32"]


def test_differentiating_its_lse_raises():
    q, k, v = _case(0, 1, 2, 2, 16, 16, 16, "float32")
    f = lambda q: jax_attn.attention_forward(q, k, v, backend="tpu", return_lse=True)[1].sum()  # noqa: E731
    with pytest.raises(ValueError, match="'tpu'.*log-sum-exp"):
        jax.grad(f)(q)


def test_declines_what_it_cannot_serve_with_reasons():
    q = jax.ShapeDtypeStruct((1, 2, 64, 32), jnp.bfloat16)
    d = jax_attn.explain(q, q, q, backend="tpu", attn_mask=jax.ShapeDtypeStruct((1, 1, 64, 64), jnp.bool_))
    assert any("varies along queries" in r for r in d.reasons["tpu"])
    d = jax_attn.explain(q, q, q, attn_mask=jax.ShapeDtypeStruct((1, 1, 64, 64), jnp.float32))
    assert any("additive float attn_mask" in r for r in d.reasons["tpu"])
    d = jax_attn.explain(q, q, q, local_window_size=(8, 0))
    assert any("local_window_size" in r for r in d.reasons["tpu"])
    h = jax.ShapeDtypeStruct((1, 2, 64, 32), jnp.float16)
    assert any("float16" in r for r in jax_attn.explain(h, h, h).reasons["tpu"])


def test_interpret_mode_is_never_chosen_automatically():
    assert BACKENDS["tpu"].automatic is False
