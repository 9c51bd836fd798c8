"""The Pallas kernel partitions itself: batch/head-sharded inputs under plain `jit` run shard-local.

No `shard_local` context here: q, k, v (and masks, `kv_lengths`) are placed with a
`NamedSharding` over the 8 simulated CPU devices (`tests/conftest.py`) and given to a jitted
`attention_forward(..., backend="pallas")` (interpret mode). The kernel's `custom_partitioning`
rules (`jax_attn/kernels/sharding.py`) must keep batch/heads split with no all-gather, forward
and backward, and results (out, lse, dq, dk, dv) must match the unsharded call and the float64
reference. Sharded sequences are gathered (logged) and still correct. Each case runs under the
default partitioner; a few also under the other one (Shardy vs GSPMD) where the flag exists.
"""
import contextlib
import importlib
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jax_attn
from jax_attn import reference

sharding_rules = importlib.import_module("jax_attn.kernels.sharding")

TOL = reference.TOLERANCE["float32"]
COLLECTIVES = ("all-gather", "all-to-all", "collective-permute")


def mesh(shape, names):
    if len(jax.devices()) < int(np.prod(shape)):
        pytest.skip("needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
    return Mesh(np.array(jax.devices()[:int(np.prod(shape))]).reshape(shape), names)


@contextlib.contextmanager
def partitioner(name):
    """`"default"`, or `"other"`: the partitioner jax does not use by default (if selectable)."""
    if name == "default":
        yield
        return
    if not hasattr(jax.config, "jax_use_shardy_partitioner"):
        pytest.skip("this jax has a single partitioner")
    before = jax.config.jax_use_shardy_partitioner
    jax.config.update("jax_use_shardy_partitioner", not before)
    try:
        yield
    finally:
        jax.config.update("jax_use_shardy_partitioner", before)


def make(rng, layout, b=4, n=8, n_kv=8, sq=40, skv=48, d=16, key_mask=False, full_mask=False,
         lengths=None):
    def t(*shape):
        x = rng.standard_normal(shape).astype(np.float32)
        return jnp.asarray(x if layout == "bnsd" else np.swapaxes(x, 1, 2))

    q, k, v = t(b, n, sq, d), t(b, n_kv, skv, d), t(b, n_kv, skv, d)
    kw = dict(layout=layout)
    if key_mask:
        m = rng.random((b, 1, 1, skv)) < 0.7
        m[1] = False  # a sample with no visible key: zeros, zero gradients, lse = -inf
        kw["attn_mask"] = jnp.asarray(m)
    if full_mask:  # one (sq, skv) mask per sample, shared by the heads: a bias read tile by tile
        m = rng.random((b, 1, sq, skv)) < 0.7
        m[0, 0, 3] = False  # an empty query row
        kw["attn_mask"] = jnp.asarray(m)
    if lengths is not None:
        kw["kv_lengths"] = jnp.asarray(lengths, jnp.int32)
    return q, k, v, kw


def bnsd(x, layout):
    x = np.asarray(x, np.float64)
    return x if layout == "bnsd" else np.swapaxes(x, 1, 2)


def spec(layout, batch=None, heads=None, seq=None):
    """A PartitionSpec for a q/k/v-like array in `layout`."""
    s = [batch, None, None, None]
    s[1 if layout == "bnsd" else 2] = heads
    s[2 if layout == "bnsd" else 1] = seq
    return P(*s)


def loss_and_grads(kw, d_out):
    def loss(q, k, v, mask, lengths):
        args = dict(kw, attn_mask=mask, kv_lengths=lengths)
        out, lse = jax_attn.attention_forward(q, k, v, backend="pallas", return_lse=True, **args)
        return jnp.sum(out * d_out), (out, lse)

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))


def run(m, qkv_spec, q, k, v, kw, d_out, kv_spec=None):
    """Place the inputs on `m` (masks/lengths split over batch where q is), compile, run.

    Returns `(grads, (out, lse)), compiled HLO text`.
    """
    layout = kw["layout"]
    place = lambda x, s: jax.device_put(x, NamedSharding(m, s))  # noqa: E731
    batch = qkv_spec[0]
    kv_spec = qkv_spec if kv_spec is None else kv_spec
    q, k, v = place(q, qkv_spec), place(k, kv_spec), place(v, kv_spec)
    mask, lengths = kw.get("attn_mask"), kw.get("kv_lengths")
    if mask is not None:
        mask = place(mask, P(batch))
    if lengths is not None:
        lengths = place(lengths, P(batch))
    d_out = place(d_out, qkv_spec)
    f = loss_and_grads({"layout": layout, "is_causal": kw.get("is_causal", False)}, d_out)
    compiled = f.lower(q, k, v, mask, lengths).compile()
    return compiled(q, k, v, mask, lengths), compiled.as_text()


def check(m, qkv_spec, q, k, v, kw, seed=0, kv_spec=None):
    """Sharded vs unsharded vs float64 reference; returns the sharded results and the HLO."""
    layout = kw["layout"]
    d_out = jnp.asarray(np.random.default_rng(seed).standard_normal(q.shape[:-1] + v.shape[-1:]),
                        jnp.float32)
    (grads, (out, lse)), hlo = run(m, qkv_spec, q, k, v, kw, d_out, kv_spec)
    plain = loss_and_grads({"layout": layout}, d_out)(q, k, v, kw.get("attn_mask"),
                                                       kw.get("kv_lengths"))
    (p_grads, (p_out, p_lse)) = plain

    mask = kw.get("attn_mask")
    mask = None if mask is None else np.asarray(mask)
    lengths = kw.get("kv_lengths")
    lengths = None if lengths is None else np.asarray(lengths)
    qn, kn, vn, don = (bnsd(x, layout) for x in (q, k, v, d_out))
    ref_out, ref_lse = reference.attention(qn, kn, vn, mask, lengths, return_lse=True)
    ref_grads = reference.attention_vjp(qn, kn, vn, don, mask, lengths)

    assert reference.relative_error(bnsd(out, layout), ref_out) <= TOL
    assert reference.relative_error(bnsd(out, layout), bnsd(p_out, layout)) <= 1e-6
    lse_np, p_lse = np.asarray(lse), np.asarray(p_lse)
    assert np.array_equal(np.isneginf(lse_np), np.isneginf(ref_lse))
    finite = np.isfinite(ref_lse)
    assert reference.relative_error(lse_np[finite], ref_lse[finite]) <= TOL
    assert reference.relative_error(lse_np[finite], p_lse[finite]) <= 1e-6
    for name, g, pg, r in zip("qkv", grads, p_grads, ref_grads):
        assert reference.relative_error(bnsd(g, layout), r) <= 2 * TOL, f"d{name} vs reference"
        assert reference.relative_error(bnsd(g, layout), bnsd(pg, layout)) <= 1e-6, f"d{name}"
    return (out, lse, grads), hlo


def assert_local(hlo):
    found = [c for c in COLLECTIVES if c in hlo]
    assert not found, f"the compiled program communicates: {found}"


# (mesh shape, mesh axes, layout, q/k/v spec entries, make() kwargs)
CASES = {
    "bnsd-batch+heads": ((2, 4), ("data", "model"), "bnsd", dict(batch="data", heads="model"),
                         dict()),
    "bsnd-batch+heads": ((2, 4), ("data", "model"), "bsnd", dict(batch="data", heads="model"),
                         dict()),
    "bnsd-heads-only": ((4, 2), ("x", "y"), "bnsd", dict(heads=("x", "y")), dict()),
    "bsnd-batch-only": ((4, 2), ("data", "model"), "bsnd", dict(batch="data"), dict(b=4)),
    "gqa": ((2, 4), ("data", "model"), "bnsd", dict(batch="data", heads="model"), dict(n_kv=4)),
    "gqa-bsnd-mask+lengths": ((2, 4), ("data", "model"), "bsnd", dict(batch="data", heads="model"),
                              dict(n_kv=4, key_mask=True, lengths=[48, 30, 0, 17])),
    "full-mask": ((2, 4), ("data", "model"), "bnsd", dict(batch="data", heads="model"),
                  dict(full_mask=True)),
}


@pytest.mark.fast_every(4)
@pytest.mark.parametrize("case", CASES)
def test_batch_and_head_sharding_stays_local(case):
    shape, names, layout, entries, make_kw = CASES[case]
    m = mesh(shape, names)
    rng = np.random.default_rng(list(CASES).index(case))
    q, k, v, kw = make(rng, layout, **make_kw)
    qkv_spec = spec(layout, **entries)
    (out, lse, grads), hlo = check(m, qkv_spec, q, k, v, kw)
    assert_local(hlo)
    want = NamedSharding(m, qkv_spec)
    assert out.sharding.is_equivalent_to(want, 4), out.sharding
    for g in grads:
        assert g.sharding.is_equivalent_to(want, 4), g.sharding
    lse_want = NamedSharding(m, P(entries.get("batch"), entries.get("heads"), None))
    assert lse.sharding.is_equivalent_to(lse_want, 3), lse.sharding


@pytest.mark.fast_every(2)
@pytest.mark.parametrize("case", ["bsnd-batch+heads", "gqa-bsnd-mask+lengths"])
def test_other_partitioner(case):
    """The same rules under the partitioner jax does not use by default (GSPMD or Shardy)."""
    shape, names, layout, entries, make_kw = CASES[case]
    with partitioner("other"):
        m = mesh(shape, names)
        rng = np.random.default_rng(10 + list(CASES).index(case))
        q, k, v, kw = make(rng, layout, **make_kw)
        qkv_spec = spec(layout, **entries)
        (out, _, _), hlo = check(m, qkv_spec, q, k, v, kw)
    assert_local(hlo)
    assert out.sharding.is_equivalent_to(NamedSharding(m, qkv_spec), 4)


def test_sharded_sequence_is_gathered_and_correct(caplog):
    """Sequence-sharded inputs: the rule asks for them whole (an all-gather), logged once."""
    m = mesh((2, 4), ("data", "sp"))
    rng = np.random.default_rng(20)
    q, k, v, kw = make(rng, "bnsd", lengths=[48, 5, 33, 48])
    sharding_rules._logged.clear()
    with caplog.at_level(logging.WARNING, logger=sharding_rules.__name__):
        (out, _, _), hlo = check(m, spec("bnsd", batch="data", seq="sp"), q, k, v, kw)
    assert "all-gather" in hlo
    assert any("sequence" in r.getMessage() and "all-gathered" in r.getMessage()
               for r in caplog.records), caplog.text
    # The batch split survives the fallback: it is still data-parallel.
    assert out.sharding.spec[0] == "data"


def test_gqa_heads_that_do_not_split_fall_back_to_replicated_heads(caplog):
    """q heads split 4 ways but only 2 k/v heads: they cannot split alike, so heads are gathered."""
    m = mesh((2, 4), ("data", "model"))
    rng = np.random.default_rng(21)
    q, k, v, kw = make(rng, "bsnd", n_kv=2)
    sharding_rules._logged.clear()
    with caplog.at_level(logging.WARNING, logger=sharding_rules.__name__):
        check(m, spec("bsnd", batch="data", heads="model"), q, k, v, kw,
              kv_spec=spec("bsnd", batch="data"))
    assert any("do not divide" in r.getMessage() for r in caplog.records), caplog.text


def test_unsharded_inputs_need_no_communication():
    """Inputs on one device (no sharding): the same results, and nothing is distributed."""
    rng = np.random.default_rng(22)
    q, k, v, kw = make(rng, "bnsd", n_kv=4, key_mask=True, lengths=[48, 30, 0, 17])
    f = jax.jit(lambda q, k, v: jax_attn.attention_forward(q, k, v, backend="pallas", **kw))
    hlo = f.lower(q, k, v).compile().as_text()
    assert_local(hlo)
    assert "all-reduce" not in hlo
    ref = reference.attention(q, k, v, np.asarray(kw["attn_mask"]), np.asarray(kw["kv_lengths"]))
    assert reference.relative_error(f(q, k, v), ref) <= TOL


def test_vmap_over_a_sharded_call_still_works():
    """`custom_partitioning` has no batching rule; vmap goes through the plain kernel call."""
    rng = np.random.default_rng(23)
    q, k, v, _ = make(rng, "bnsd", b=2, n=2, n_kv=2, sq=16, skv=16)
    f = jax.jit(jax.vmap(lambda q, k, v: jax_attn.attention_forward(q, k, v, backend="pallas")))
    g = jax.jit(jax.vmap(jax.grad(
        lambda q, k, v: jax_attn.attention_forward(q, k, v, backend="pallas").sum())))
    qs, ks, vs = (x[:, None] for x in (q, k, v))  # vmap over the batch, each a batch of one
    assert reference.relative_error(f(qs, ks, vs)[:, 0], reference.attention(q, k, v)) <= TOL
    assert np.all(np.isfinite(np.asarray(g(qs, ks, vs))))


def test_mosaic_operand_roles():
    """The Mosaic kernel's calls (no full bias; the caller's per-key mask and lengths) under the
    same rules. The Mosaic GPU interpreter's IO callbacks cannot be partitioned, so a jnp
    stand-in with the kernel calls' exact signatures runs where the kernels would, shard-local."""
    from jax_attn.kernels import mosaic_attention as M
    from jax_attn.kernels.reference import flash_attention_reference as ref_attention

    def attend(st, q, k, v, key_bias, kv_lengths):
        mask = None if key_bias is None else (key_bias == 0)[:, :, None, :]
        return ref_attention(q, k, v, key_mask=mask, kv_lengths=kv_lengths, layout=st.layout,
                             return_lse=True)

    def backward(st, q, k, v, key_bias, kv_lengths, out, lse, do, dlse):
        _, vjp = jax.vjp(lambda q, k, v: attend(st, q, k, v, key_bias, kv_lengths), q, k, v)
        return vjp((do, dlse))

    fwd = sharding_rules.partitioned(attend, "fwd", M._operands)
    bwd = sharding_rules.partitioned(backward, "bwd", M._operands)
    m = mesh((2, 4), ("data", "model"))
    rng = np.random.default_rng(24)
    q, k, v, kw = make(rng, "bsnd", n_kv=4, key_mask=True, lengths=[48, 30, 0, 17])
    key_bias = jnp.where(kw["attn_mask"][:, :, 0, :], 0.0, -jnp.inf)
    lengths = kw["kv_lengths"]
    st = M._Static(scale=0.25, layout="bsnd", sq=40, skv=48, d=16, groups=2,
                   key_bias_dims=(True, False), orig_key_bias_dims=(True, False),
                   has_kv_lengths=True, config=M.MosaicConfig(), interpret=False,
                   backward="mosaic")

    def both(q, k, v, key_bias, lengths, do, dlse):
        out, lse = fwd(st, q, k, v, key_bias, lengths)
        return (out, lse), bwd(st, q, k, v, key_bias, lengths, out, lse, do, dlse)

    do = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
    dlse = jnp.asarray(rng.standard_normal((4, 8, 40)), jnp.float32)
    qkv = NamedSharding(m, spec("bsnd", batch="data", heads="model"))
    by_batch = NamedSharding(m, P("data"))
    places = (qkv, qkv, qkv, by_batch, by_batch, qkv, NamedSharding(m, P("data", "model")))
    args = [jax.device_put(x, s) for x, s in zip((q, k, v, key_bias, lengths, do, dlse), places)]
    compiled = jax.jit(both).lower(*args).compile()
    assert_local(compiled.as_text())
    got, want = compiled(*args), jax.jit(both)(q, k, v, key_bias, lengths, do, dlse)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        finite = np.isfinite(np.asarray(w))
        assert np.array_equal(finite, np.isfinite(np.asarray(g)))
        assert reference.relative_error(np.asarray(g)[finite], np.asarray(w)[finite]) <= 1e-6
    assert got[0][0].sharding.is_equivalent_to(qkv, 4)
