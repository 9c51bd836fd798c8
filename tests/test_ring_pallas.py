"""Ring attention on the `pallas` backend (Pallas interpret mode) against the float64 reference.

The ring's backward runs each key block's gradients from the global `(out, lse)` through the
Triton kernels' backward (`ring_backward.pallas_block_grads`); a spy checks that this path ran and
that no block's forward was recomputed (`ring._recompute_grads`). The cases cover the three step
variants the block positions produce: diagonal blocks (`is_causal` locally), blocks below the
diagonal, and unequal query/key blocks whose causal offset is an explicit mask from global
positions; plus kv_lengths per block, GQA, a lse cotangent and a per-key bias gradient.

The devices are simulated CPU devices (tests/conftest.py). Shapes are tiny: each block runs the
interpret-mode kernels, several times per variant.
"""
from __future__ import annotations

import os

os.environ.setdefault("JAX_ATTN_INTERPRET", "1")  # before the backends look (conftest does too)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from jax.sharding import Mesh  # noqa: E402

import jax_attn  # noqa: E402
from jax_attn import parallel, reference  # noqa: E402
from jax_attn.inputs import AttentionInputs  # noqa: E402
from jax_attn.parallel import ring, ring_backward  # noqa: E402

# float32 kernels and a float32 merge against float64: only summation order differs, so far
# below reference.TOLERANCE["float32"] (which allows for TF32 on GPUs; here it is the CPU).
TOL = 1e-5


def mesh(count):
    if len(jax.devices()) < count:
        pytest.skip(f"needs {count} devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
    return Mesh(np.array(jax.devices()[:count]), ("sp",))


@pytest.fixture
def spy(monkeypatch):
    """Counts the pallas block backward's calls; a recomputed block fails the test."""
    calls = []
    real = ring_backward.STATS_BACKWARDS["pallas"]
    monkeypatch.setitem(ring_backward.STATS_BACKWARDS, "pallas",
                        lambda *a: calls.append(a[0].spec) or real(*a))

    def recompute(*a, **k):
        raise AssertionError("ring backward recomputed a block instead of using the statistics")

    monkeypatch.setattr(ring, "_recompute_grads", recompute)
    return calls


def ref_grads(q, k, v, do, dlse, mask, kv_lengths, is_causal):
    """float64 `(dq, dk, dv, dS)` of `sum(out * do) + sum(lse * dlse)` in bnsd."""
    return reference.attention_vjp(q, k, v, do, attn_mask=mask, kv_lengths=kv_lengths,
                                   is_causal=is_causal, d_lse=dlse)


def check(devices, *, b=1, n=2, n_kv=1, sq=16, skv=16, d=8, layout="bnsd", causal=False,
          lengths=None, mask=None, seed=0):
    """Ring forward (out, lse) and gradients (q, k, v and a float mask) against the reference."""
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal(s) for s in ((b, n, sq, d), (b, n_kv, skv, d), (b, n_kv, skv, d)))
    do, dlse = rng.standard_normal((b, n, sq, d)), rng.standard_normal((b, n, sq))
    t = (lambda x: x) if layout == "bnsd" else (lambda x: np.swapaxes(x, 1, 2))
    kw = dict(layout=layout, is_causal=causal)
    if lengths is not None:
        kw["kv_lengths"] = jnp.asarray(lengths, jnp.int32)
    if mask == "key_bias":
        mask = rng.standard_normal((b, 1, 1, skv))
        mask[:, :, :, 2] = -np.inf
    elif mask == "full_bool":
        mask = rng.random((b, n, sq, skv)) < 0.7
        mask[0, 1, 5] = False  # an empty row
    do32, dlse32 = jnp.asarray(t(do), jnp.float32), jnp.asarray(dlse, jnp.float32)

    def loss(q, k, v, m):
        out, lse = jax_attn.attention_forward(q, k, v, backend="pallas", return_lse=True,
                                              attn_mask=m, **kw)
        finite = jnp.where(jnp.isneginf(lse), 0.0, lse)  # an empty row's -inf takes no cotangent
        return jnp.sum(out * do32) + jnp.sum(finite * dlse32), (out, lse)

    bias_grad = mask is not None and mask.dtype != bool
    argnums = (0, 1, 2, 3) if bias_grad else (0, 1, 2)
    args = [jnp.asarray(t(x), jnp.float32) for x in (q, k, v)]
    m = None if mask is None else jnp.asarray(mask, jnp.float32 if bias_grad else bool)
    with parallel.sequence_parallel(mesh(devices), "sp", "ring"):
        grads, (out, lse) = jax.jit(jax.grad(loss, argnums=argnums, has_aux=True))(*args, m)

    ref_out, ref_lse = reference.attention(q, k, v, mask, lengths, causal, return_lse=True)
    dlse_ref = np.where(np.isneginf(ref_lse), 0.0, dlse)
    rdq, rdk, rdv, rds = ref_grads(q, k, v, do, dlse_ref, mask, lengths, causal)
    errors = {"out": reference.relative_error(t(np.asarray(out)), ref_out),
              "lse": reference.relative_error(lse, ref_lse)}
    for name, g, r in zip(("dq", "dk", "dv"), grads, (rdq, rdk, rdv)):
        errors[name] = reference.relative_error(t(np.asarray(g)), r)
    if bias_grad:
        axes = tuple(a for a in range(4) if mask.shape[a] == 1)
        errors["dbias"] = reference.relative_error(grads[3], rds.sum(axes, keepdims=True))
    bad = {name: e for name, e in errors.items() if not e <= TOL}
    assert not bad, f"relative errors over {TOL}: {bad}"


def test_ring_pallas_causal_gqa_kv_lengths(spy):
    """Equal blocks: diagonal, below-diagonal and skipped steps; kv_lengths cut one sample's keys
    inside the second block, so per-block lengths (clipped, 0 for a block past them) matter."""
    check(2, b=2, n=4, n_kv=2, sq=24, skv=24, causal=True, lengths=[24, 17], seed=1)
    assert spy and all(s.kv_len == 12 for s in spy)
    assert any(s.is_causal for s in spy) and any(not s.is_causal for s in spy)


def test_ring_pallas_unequal_blocks_bsnd(spy):
    """sq != skv: the causal offset of every block is an explicit mask from global positions
    (which the block backward must honour exactly); lengths that do not divide by 4 devices
    (padding path), bsnd layout."""
    check(4, b=2, n=2, n_kv=1, sq=13, skv=30, layout="bsnd", causal=True, lengths=[30, 9], seed=2)
    assert spy and all(s.mask_kind == "bool" and not s.per_key_mask for s in spy)


@pytest.mark.slow
def test_ring_pallas_bias_gradient_and_full_mask(spy):
    """A per-key float bias, differentiated (its gradient summed over blocks and queries), with
    causal blocks; and a full bool mask with an empty row."""
    check(2, sq=20, skv=20, causal=True, mask="key_bias", seed=3)
    check(2, sq=18, skv=18, mask="full_bool", lengths=[13], seed=4)
    assert spy


@pytest.mark.slow
def test_pallas_block_grads_match_jnp_block_grads():
    """One block's statistics backward, kernel against jnp, from the same global statistics: an
    offset-style full bool mask with per-block kv_lengths, and a float bias with its gradient."""
    rng = np.random.default_rng(5)
    b, n, n_kv, sq, skv, d = 2, 4, 2, 9, 11, 8
    q, k, v = (jnp.asarray(rng.standard_normal(s), jnp.float32)
               for s in ((b, n, sq, d), (b, n_kv, skv, d), (b, n_kv, skv, d)))
    d_out = jnp.asarray(rng.standard_normal((b, n, sq, d)), jnp.float32)
    d_lse = jnp.asarray(rng.standard_normal((b, n, sq)), jnp.float32)
    # Stand-ins for the global statistics: a row's lse must only exceed its block's share.
    lse = jnp.asarray(rng.standard_normal((b, n, sq)) + 3.0, jnp.float32)
    lse = lse.at[0, 1, 2].set(-jnp.inf)  # a row with no key anywhere
    out = jnp.asarray(rng.standard_normal((b, n, sq, d)), jnp.float32)
    delta = ring_backward.delta(out, d_out, d_lse, "bnsd")
    keep = jnp.asarray(rng.random((1, 1, sq, skv)) < 0.6)
    bias = jnp.asarray(rng.standard_normal((b, 1, 1, skv)), jnp.float32)
    for mask, mask_shape in ((keep, None), (bias, bias.shape)):
        inputs = AttentionInputs.build(q, k, v, attn_mask=mask, kv_lengths=jnp.asarray([11, 4]),
                                       local_blocks=True)
        got = ring_backward.pallas_block_grads(inputs, out, lse, d_out, delta, mask_shape)
        want = ring_backward.jnp_block_grads(inputs, out, lse, d_out, delta, mask_shape)
        for name, g, w in zip(("dq", "dk", "dv", "dmask"), got, want):
            if w is None:
                assert g is None, name
                continue
            assert g.dtype == jnp.float32 and g.shape == w.shape, name
            err = reference.relative_error(g, w)
            assert err <= TOL, f"{name}: relative error {err:.2e}"
