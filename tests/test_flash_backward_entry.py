"""`flash_attention_backward`: the Triton kernels' backward fed with a caller's `out` and `lse`.

Checked two ways on random inputs in Pallas interpret mode: against `jax.vjp` of
`flash_attention` (same kernels, so agreement to float32 rounding: the entry builds the kernel
call exactly as the VJP does), and against the float64 reference (`jax_attn.reference`) with a
cotangent on both `out` and `lse`. Then the property ring attention relies on: fed the *global*
`out` and `lse`, each key block's backward is that block's exact share of the global gradient.
Shapes are tiny and odd (block tails, GQA) because interpret mode costs seconds per call.
"""
from __future__ import annotations

import math
import os

os.environ.setdefault("JAX_ATTN_INTERPRET", "1")  # before the backends look (conftest does too)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from jax_attn import reference  # noqa: E402
from jax_attn.kernels.flash_attention import flash_attention, flash_attention_backward  # noqa: E402

# float32 kernels against float64: only summation order differs (as tests/test_pallas.py).
TOL = 1e-5
# The entry against the VJP: the same kernels on the same operands; what may differ is XLA's
# fusion of the small jnp steps around them (delta, the bias sums) between the two programs.
SAME = dict(rtol=1e-5, atol=1e-6)


def ref_grads(q, k, v, do, dlse, mask, kv_lengths, is_causal, scale):
    """float64 `(dq, dk, dv, dS)` of `sum(out * do) + sum(lse * dlse)`, in bnsd; `dS (b, n, sq,
    skv)` is the gradient of an additive bias."""
    return reference.attention_vjp(q, k, v, do, attn_mask=mask, kv_lengths=kv_lengths,
                                   is_causal=is_causal, scale=scale, d_lse=dlse)


def inputs(seed, b, n, n_kv, sq, skv, d, layout):
    rng = np.random.default_rng(seed)
    q, k, v, do = (rng.standard_normal(s) for s in
                   ((b, n, sq, d), (b, n_kv, skv, d), (b, n_kv, skv, d), (b, n, sq, d)))
    dlse = rng.standard_normal((b, n, sq))
    return rng, (q, k, v, do, dlse)


CASES = {
    # name: (b, n, n_kv, sq, skv, d, layout, causal, kv_lengths, mask)
    "gqa": (1, 4, 2, 17, 23, 16, "bnsd", False, None, None),
    "causal+kv_lengths": (2, 2, 1, 19, 19, 8, "bnsd", True, [11, 19], None),
    "bsnd+key_mask+key_bias": (2, 2, 2, 9, 21, 8, "bsnd", False, [21, 7], "key_bias"),
    "causal+full_bias": (1, 2, 1, 13, 20, 8, "bnsd", True, None, "full_bias"),
}


@pytest.mark.fast_every(4)
@pytest.mark.parametrize("case", list(CASES))
def test_backward_entry_matches_vjp_and_reference(case):
    b, n, n_kv, sq, skv, d, layout, causal, lengths, mask = CASES[case]
    rng, (q, k, v, do, dlse) = inputs(list(CASES).index(case), b, n, n_kv, sq, skv, d, layout)
    t = (lambda x: x) if layout == "bnsd" else (lambda x: np.swapaxes(x, 1, 2))
    kw = dict(is_causal=causal, layout=layout, interpret=True)
    if lengths is not None:
        kw["kv_lengths"] = jnp.asarray(lengths, jnp.int32)
    bias = key_mask = ref_mask = None
    if mask == "key_bias":  # a per-key bias folded with a key_mask into the kernel's key bias
        bias = rng.standard_normal((1, 1, 1, skv))
        key_mask = rng.random((b, 1, 1, skv)) < 0.8
        ref_mask = np.where(key_mask, bias, -np.inf)
        kw["key_mask"] = jnp.asarray(key_mask)
    elif mask == "full_bias":  # full tiles, one row broadcast over heads
        bias = rng.standard_normal((b, 1, sq, skv))
        bias[0, 0, 3, 5:] = -np.inf
        ref_mask = bias
    args = [jnp.asarray(t(x), jnp.float32) for x in (q, k, v)]
    cot = (jnp.asarray(t(do), jnp.float32), jnp.asarray(dlse, jnp.float32))

    if bias is None:
        (out, lse), pull = jax.vjp(lambda *a: flash_attention(*a, return_lse=True, **kw), *args)
        want = pull(cot)
    else:
        (out, lse), pull = jax.vjp(
            lambda q, k, v, bias: flash_attention(q, k, v, bias=bias, return_lse=True, **kw),
            *args, jnp.asarray(bias, jnp.float32))
        want = pull(cot)
        kw["bias"] = jnp.asarray(bias, jnp.float32)
    dq, dk, dv, dbias = flash_attention_backward(*args, out, lse, *cot, bias_grad=bias is not None,
                                                 **kw)
    got = (dq, dk, dv) + (() if bias is None else (dbias,))
    assert (dbias is None) == (bias is None)
    for name, g, w in zip(("dq", "dk", "dv", "dbias"), got, want):
        assert g.shape == w.shape and g.dtype == w.dtype, name
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), err_msg=name, **SAME)

    scale = 1 / math.sqrt(d)
    rdq, rdk, rdv, rds = ref_grads(q, k, v, do, dlse, ref_mask, lengths, causal, scale)
    refs = [rdq, rdk, rdv]
    if bias is not None:
        axes = tuple(a for a in range(4) if bias.shape[a] == 1)
        refs.append(rds.sum(axes, keepdims=True))
    for name, g, r in zip(("dq", "dk", "dv", "dbias"), got, refs):
        err = reference.relative_error(t(np.asarray(g)) if name != "dbias" else g, r)
        assert err <= TOL, f"{name}: relative error {err:.2e}"


def test_no_lse_cotangent_is_zero():
    """`d_lse=None` is a zero lse cotangent: the plain gradient of `sum(out * do)`."""
    _, (q, k, v, do, _) = inputs(5, 1, 2, 2, 10, 14, 8, "bnsd")
    args = [jnp.asarray(x, jnp.float32) for x in (q, k, v)]
    out, lse = flash_attention(*args, is_causal=True, return_lse=True, interpret=True)
    dq, dk, dv, dbias = flash_attention_backward(*args, out, lse, jnp.asarray(do, jnp.float32),
                                                 is_causal=True, interpret=True)
    assert dbias is None
    for name, g, r in zip(("dq", "dk", "dv"), (dq, dk, dv),
                          reference.attention_vjp(q, k, v, do, is_causal=True)):
        err = reference.relative_error(g, r)
        assert err <= TOL, f"{name}: relative error {err:.2e}"


def test_key_blocks_from_global_statistics_sum_to_the_gradient():
    """Ring attention's use: split the keys in two blocks; each block's backward with the global
    `out`, `lse` (and the causal offset of the second block as a bias) is its share, so dq is the
    sum and dk/dv are the concatenation of the blocks' results."""
    _, (q, k, v, do, dlse) = inputs(6, 1, 4, 2, 12, 12, 8, "bnsd")
    args = [jnp.asarray(x, jnp.float32) for x in (q, k, v)]
    do32, dlse32 = jnp.asarray(do, jnp.float32), jnp.asarray(dlse, jnp.float32)
    out, lse = flash_attention(*args, is_causal=True, return_lse=True, interpret=True)
    h = 5  # key blocks [0, 5) and [5, 12): not a tile boundary
    rows = np.arange(12)[:, None]

    def causal_bias(a, z):  # key j of block [a, z) is visible to query i iff a + j <= i
        return jnp.asarray(np.where(a + np.arange(z - a)[None, :] <= rows, 0.0, -np.inf), jnp.float32)

    parts = [flash_attention_backward(args[0], args[1][:, :, a:z], args[2][:, :, a:z], out, lse,
                                      do32, dlse32, bias=causal_bias(a, z), interpret=True)
             for a, z in ((0, h), (h, 12))]
    dq = parts[0][0] + parts[1][0]
    dk = jnp.concatenate([parts[0][1], parts[1][1]], axis=2)
    dv = jnp.concatenate([parts[0][2], parts[1][2]], axis=2)
    rdq, rdk, rdv, _ = ref_grads(q, k, v, do, dlse, None, None, True, 1 / math.sqrt(8))
    for name, g, r in zip(("dq", "dk", "dv"), (dq, dk, dv), (rdq, rdk, rdv)):
        err = reference.relative_error(g, r)
        assert err <= TOL, f"{name}: relative error {err:.2e}"


def test_errors_name_the_problem():
    x = jnp.zeros((1, 2, 8, 8), jnp.float32)
    lse = jnp.zeros((1, 2, 8), jnp.float32)
    with pytest.raises(ValueError, match="bias_grad=True needs a bias"):
        flash_attention_backward(x, x, x, x, lse, x, bias_grad=True, interpret=True)
    with pytest.raises(ValueError, match="lse must have shape"):
        flash_attention_backward(x, x, x, x, lse[:, :1], x, interpret=True)
    with pytest.raises(ValueError, match="out and d_out must have shape"):
        flash_attention_backward(x, x, x, x[..., :4], lse, x, interpret=True)
