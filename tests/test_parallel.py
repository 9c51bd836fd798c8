"""Several devices: sequence parallelism (Ulysses, ring) and shard-local attention match one device.

The 8 devices are simulated CPU devices (`tests/conftest.py` sets
`--xla_force_host_platform_device_count=8`). Every result is checked against the float64
reference, forward and gradients, at `reference.TOLERANCE["float32"]` (gradients 2x, as in
test_backends). Lengths such as 333 do not divide by the device counts, so the padding path runs.
The local backend is a fast jnp one (`naive`, `chunked`): the point is the distribution, not the
kernel, and every backend computes the same function (test_backends).
"""
import contextlib
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jax_attn
from jax_attn import parallel, reference
from jax_attn.parallel import ring_backward
from jax_attn.backends import BACKENDS

TOL = reference.TOLERANCE["float32"]


def mesh(*shape, names=("sp",)):
    count = int(np.prod(shape))
    if len(jax.devices()) < count:
        pytest.skip(f"needs {count} devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
    return Mesh(np.array(jax.devices()[:count]).reshape(shape), names)


def make(rng, b=2, n=8, n_kv=8, sq=333, skv=333, d=16, layout="bnsd", mask=None, lengths=None,
         causal=False):
    """Random float32 inputs and keyword arguments; masks in (b?, n?, sq?, skv?) form."""
    def t(*shape):
        x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
        return x if layout == "bnsd" else jnp.swapaxes(x, 1, 2)

    q, k, v = t(b, n, sq, d), t(b, n_kv, skv, d), t(b, n_kv, skv, d)
    kw = dict(layout=layout, is_causal=causal)
    if mask == "key":
        kw["attn_mask"] = jnp.asarray(rng.random((b, 1, 1, skv)) < 0.7)
    elif mask == "full":
        m = rng.random((b, n, sq, skv)) < 0.7
        m[0, 1, 5] = False  # an empty row
        kw["attn_mask"] = jnp.asarray(m)
    elif mask == "bias":
        bias = rng.standard_normal((b, 1, 1, skv)).astype(np.float32)
        bias[:, :, :, 3] = -np.inf
        kw["attn_mask"] = jnp.asarray(bias)
    if lengths is not None:
        kw["kv_lengths"] = jnp.asarray(lengths, jnp.int32)
    return q, k, v, kw


def bnsd(x, layout):
    x = np.asarray(x, np.float64)
    return x if layout == "bnsd" else np.swapaxes(x, 1, 2)


def expected(q, k, v, kw, d_out):
    """Reference output, lse and (dq, dk, dv, dbias) in bnsd."""
    layout = kw["layout"]
    qn, kn, vn, don = (bnsd(x, layout) for x in (q, k, v, d_out))
    mask = kw.get("attn_mask")
    mask = None if mask is None else np.asarray(mask)
    lengths = kw.get("kv_lengths")
    lengths = None if lengths is None else np.asarray(lengths)
    ids = {name: np.asarray(kw[name]) for name in ("q_segment_ids", "kv_segment_ids") if name in kw}
    out, lse = reference.attention(qn, kn, vn, mask, lengths, kw["is_causal"], return_lse=True, **ids)
    grads = reference.attention_vjp(qn, kn, vn, don, mask, lengths, kw["is_causal"], **ids)
    return out, lse, grads


def check(q, k, v, kw, backend, context, seed=0, bias_grad=False):
    """Forward (out, lse) and gradients under `context` against the float64 reference."""
    layout = kw["layout"]
    d_out = jnp.asarray(np.random.default_rng(seed).standard_normal(q.shape[:-1] + v.shape[-1:]),
                        jnp.float32)

    def loss(q, k, v, mask):
        args = dict(kw, attn_mask=mask) if mask is not None else kw
        out, lse = jax_attn.attention_forward(q, k, v, backend=backend, return_lse=True, **args)
        return jnp.sum(out * d_out), (out, lse)

    argnums = (0, 1, 2, 3) if bias_grad else (0, 1, 2)
    with context:  # the context is read at trace time
        f = jax.jit(jax.grad(loss, argnums=argnums, has_aux=True))
        grads, (out, lse) = f(q, k, v, kw.get("attn_mask"))
    ref_out, ref_lse, ref_grads = expected(q, k, v, kw, d_out)
    assert reference.relative_error(bnsd(out, layout), ref_out) <= TOL
    assert reference.relative_error(lse, ref_lse) <= TOL
    for name, g, r in zip("qkv", grads, ref_grads):
        err = reference.relative_error(bnsd(g, layout), r)
        assert err <= 2 * TOL, f"d{name}: relative error {err:.2e}"
    if bias_grad:
        mask = kw["attn_mask"]
        axes = tuple(a for a in range(4) if mask.shape[a] == 1)
        err = reference.relative_error(grads[3], ref_grads[3].sum(axes, keepdims=True))
        assert err <= 2 * TOL, f"dbias: relative error {err:.2e}"


CASES = {
    "uneven": dict(),
    "kv_lengths": dict(lengths=[300, 41]),
    "key_mask+lengths": dict(mask="key", lengths=[333, 0]),  # sample 1: no keys at all
    "full_mask": dict(mask="full"),
    "causal": dict(causal=True),
    "causal_cross": dict(causal=True, sq=200, skv=333, lengths=[150, 333]),
    "cross_text": dict(sq=333, skv=77, lengths=[77, 20]),
    "gqa": dict(n=8, n_kv=2, causal=True),
    "mqa": dict(n=8, n_kv=1, mask="key"),
    "bsnd": dict(layout="bsnd", causal=True, lengths=[333, 100]),
}
# Every case on 4 devices; a spread of them on 2 and 8 (each compile costs seconds on 2 cores).
GRID = ([(4, c) for c in CASES]
        + [(2, c) for c in ("uneven", "key_mask+lengths", "causal", "mqa")]
        + [(8, c) for c in ("kv_lengths", "causal", "gqa", "bsnd")])


@pytest.mark.fast_every(9)
@pytest.mark.parametrize("method", parallel.METHODS)
@pytest.mark.parametrize("devices,case", GRID)
def test_sequence_parallel_matches_reference(method, devices, case):
    rng = np.random.default_rng([devices, list(CASES).index(case)])
    q, k, v, kw = make(rng, **CASES[case])
    check(q, k, v, kw, "naive", jax_attn.parallel.sequence_parallel(mesh(devices), "sp", method))


@pytest.mark.fast_every(2)
@pytest.mark.parametrize("method", parallel.METHODS)
def test_chunked_backend_and_bias_gradient(method):
    """A backend with its own VJP inside the ring; gradient of a per-key additive bias."""
    rng = np.random.default_rng(1)
    q, k, v, kw = make(rng, sq=150, skv=150, mask="bias", causal=True)
    check(q, k, v, kw, "chunked", parallel.sequence_parallel(mesh(4), "sp", method), bias_grad=True)


@pytest.mark.parametrize("method", parallel.METHODS)
def test_with_batch_and_head_axes(method):
    """Sequence parallel over one mesh axis while batch and heads split over two others."""
    rng = np.random.default_rng(2)
    q, k, v, kw = make(rng, n=8, n_kv=4, sq=101, skv=101, mask="full", lengths=[90, 101], causal=True)
    m = mesh(2, 2, 2, names=("data", "tp", "sp"))
    check(q, k, v, kw, "naive", parallel.sequence_parallel(m, "sp", method, batch_axis="data",
                                                           head_axis="tp"))


def test_inputs_already_sharded_along_the_sequence():
    """Arrays placed with a NamedSharding over the sequence: the result keeps that sharding."""
    m = mesh(4)
    rng = np.random.default_rng(3)
    q, k, v, kw = make(rng, sq=128, skv=128)
    seq = NamedSharding(m, P(None, None, "sp", None))
    q, k, v = (jax.device_put(x, seq) for x in (q, k, v))
    with parallel.sequence_parallel(m, "sp", "ring"):
        out = jax.jit(lambda q, k, v: jax_attn.attention_forward(q, k, v, backend="naive"))(q, k, v)
    assert out.sharding.is_equivalent_to(seq, 4)
    assert reference.relative_error(out, reference.attention(q, k, v)) <= TOL


@pytest.mark.parametrize("method", parallel.METHODS)
def test_inside_a_users_shard_map(method):
    """`sequence_parallel(None, axis)` inside the caller's shard_map: arrays are the local blocks."""
    m = mesh(4)
    rng = np.random.default_rng(4)
    q, k, v, kw = make(rng, sq=128, skv=128, lengths=[128, 70], causal=True)
    lengths = kw["kv_lengths"]

    def body(q, k, v, lengths):
        with parallel.sequence_parallel(None, "sp", method):
            return jax_attn.attention_forward(q, k, v, kv_lengths=lengths, is_causal=True, backend="naive")

    seq = P(None, None, "sp", None)
    f = jax.jit(parallel._shard_map(body, m, (seq, seq, seq, P()), seq))
    ref = reference.attention(q, k, v, kv_lengths=np.asarray(lengths), is_causal=True)
    assert reference.relative_error(f(q, k, v, lengths), ref) <= TOL


@pytest.mark.parametrize("axes", [dict(batch_axis="x"), dict(head_axis="x"),
                                  dict(batch_axis="x", head_axis="y")])
def test_shard_local_runs_each_shard_without_gathering(axes):
    names = tuple(axes.values())
    m = mesh(*(2 if len(names) == 2 else 4,) * len(names), names=names)
    rng = np.random.default_rng(5)
    q, k, v, kw = make(rng, b=4, n=8, n_kv=4, sq=40, skv=50, mask="full", lengths=[50, 3, 0, 49])
    check(q, k, v, kw, "chunked", parallel.shard_local(m, **axes))

    spec = [None] * 4
    spec[0], spec[1] = axes.get("batch_axis"), axes.get("head_axis")
    sharded = NamedSharding(m, P(*spec))
    q, k, v = (jax.device_put(x, sharded) for x in (q, k, v))
    with parallel.shard_local(m, **axes):
        f = jax.jit(lambda q, k, v: jax_attn.attention_forward(q, k, v, backend="chunked"))
        hlo = f.lower(q, k, v).compile().as_text()
    assert "all-gather" not in hlo and "all-to-all" not in hlo


def test_shard_local_query_axis_for_cross_attention():
    """Queries split along the sequence, short text keys whole on every device."""
    rng = np.random.default_rng(6)
    q, k, v, kw = make(rng, sq=301, skv=77, mask="full", lengths=[77, 30])
    check(q, k, v, kw, "naive", parallel.shard_local(mesh(4), query_axis="sp"))
    with parallel.shard_local(mesh(4), query_axis="sp"), pytest.raises(ValueError, match="causal"):
        jax_attn.attention_forward(q, k, v, is_causal=True, backend="naive")


@pytest.mark.slow
def test_ring_backward_needs_a_differentiable_lse(monkeypatch):
    """A named backend with neither a block backward from global statistics nor lse gradients:
    the forward runs, the backward says why not; a preference list falls through."""
    monkeypatch.setattr(BACKENDS["chunked"], "supports_lse_grad", False)
    assert "chunked" not in ring_backward.STATS_BACKWARDS
    rng = np.random.default_rng(7)
    q, k, v, _ = make(rng, sq=64, skv=64)
    with parallel.sequence_parallel(mesh(2), "sp", "ring"):
        out = jax_attn.attention_forward(q, k, v, backend="chunked")
        assert reference.relative_error(out, reference.attention(q, k, v)) <= TOL
        with pytest.raises(ValueError, match="'chunked'.*supports_lse_grad=False"):
            jax.jit(jax.grad(lambda q: jax_attn.attention_forward(q, k, v, backend="chunked").sum()))(q)
        # A preference list falls through to a backend whose lse is differentiable.
        g = jax.jit(jax.grad(lambda q: jax_attn.attention_forward(q, k, v, backend="chunked,naive").sum()))(q)
    g_ref = jax.grad(lambda q: jax_attn.attention_forward(q, k, v, backend="naive").sum())(q)
    assert reference.relative_error(g, g_ref) <= TOL


@pytest.mark.fast_every(2)
@pytest.mark.parametrize("case", ["full_mask", "causal_cross", "gqa", "bsnd"])
def test_ring_backward_from_global_statistics_needs_no_lse_gradient(monkeypatch, case):
    """`naive` has a block backward from the global (out, lse): the ring's backward uses it and
    never differentiates a block's lse, so it serves even with supports_lse_grad=False, and no
    block's forward is recomputed."""
    monkeypatch.setattr(BACKENDS["naive"], "supports_lse_grad", False)
    calls = []
    real = ring_backward.STATS_BACKWARDS["naive"]
    monkeypatch.setitem(ring_backward.STATS_BACKWARDS, "naive",
                        lambda *a: calls.append(1) or real(*a))
    rng = np.random.default_rng([20, list(CASES).index(case)])
    q, k, v, kw = make(rng, **CASES[case])
    check(q, k, v, kw, "naive", parallel.sequence_parallel(mesh(4), "sp", "ring"))
    assert calls


def test_ring_backward_borrows_a_block_backward(monkeypatch):
    """A forward backend with no block backward from global statistics and no lse gradient (as
    cuDNN): the backward runs the block backward of the backend routing gives for lse gradients,
    recomputing nothing."""
    monkeypatch.setattr(BACKENDS["chunked"], "supports_lse_grad", False)
    calls = []
    real = ring_backward.STATS_BACKWARDS["naive"]
    monkeypatch.setitem(ring_backward.STATS_BACKWARDS, "naive", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(parallel.ring, "_recompute_grads", lambda *a: pytest.fail("recomputed a block"))
    rng = np.random.default_rng(8)
    q, k, v, kw = make(rng, sq=150, skv=150, mask="key", causal=True)
    check(q, k, v, kw, "chunked,naive", parallel.sequence_parallel(mesh(4), "sp", "ring"))
    assert calls


def test_ring_block_backward_refusals(monkeypatch):
    """A block backward that refuses some calls (as cuDNN's refuses a returned lse: it forms
    delta from out alone) serves the others; a refused call takes the block backward of the
    backend routing gives for lse gradients. Both give the float64 gradients."""
    monkeypatch.setattr(BACKENDS["chunked"], "supports_lse_grad", False)
    used = []

    def spy(name, fn):
        return lambda *a: used.append(name) or fn(*a)
    monkeypatch.setitem(ring_backward.STATS_BACKWARDS, "chunked",
                        spy("chunked", ring_backward.jnp_block_grads))
    monkeypatch.setitem(ring_backward.STATS_BACKWARDS, "naive",
                        spy("naive", ring_backward.STATS_BACKWARDS["naive"]))
    monkeypatch.setitem(ring_backward.STATS_REFUSALS, "chunked",
                        lambda spec, lse_cotangent: "lse returned" if lse_cotangent else None)
    rng = np.random.default_rng(22)
    q, k, v, kw = make(rng, sq=128, skv=128)
    d_out = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
    ring = lambda: parallel.sequence_parallel(mesh(4), "sp", "ring")  # noqa: E731
    _, _, want = expected(q, k, v, kw, d_out)

    def loss(q, k, v):
        return jnp.sum(jax_attn.attention_forward(q, k, v, backend="chunked,naive", **kw) * d_out)
    with ring():
        got = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
    assert set(used) == {"chunked"}
    for g, r in zip(got, want):
        assert reference.relative_error(g, r) <= 2 * TOL
    used.clear()
    check(q, k, v, kw, "chunked,naive", ring())  # returns the lse: refused
    assert set(used) == {"naive"}


def test_cudnn_block_backward_refusals():
    """cuDNN's block backward serves only what was verified on a GPU (the probe); on the CPU the
    private rule may be present, so only the spec-based reasons are checked."""
    from jax_attn.contract import Spec
    plain = Spec(batch=1, heads=4, kv_heads=4, q_len=512, kv_len=512, head_dim=64, value_dim=64,
                 dtype="bfloat16", scale=0.125)
    refusal = ring_backward.cudnn_stats_refusal
    assert "lse" in refusal(plain, True)
    for change, word in [(dict(mask_kind="bool", mask_shape=(1, 1, 1, 512)), "mask"),
                         (dict(mask_kind="bias", mask_shape=(1, 1, 1, 512)), "mask"),
                         (dict(has_kv_lengths=True), "lengths"),
                         (dict(has_q_lengths=True), "lengths"),
                         (dict(window=(8, 8)), "window"),
                         (dict(has_segment_ids=True), "segment"),
                         (dict(kv_heads=2), "grouped"), (dict(kv_len=256), "unequal"),
                         (dict(q_len=511, kv_len=511), "odd")]:
        assert word in refusal(dataclasses.replace(plain, **change), False), change
    why = refusal(plain, False)
    assert why is None or "private" in why
    assert (why is None) == (ring_backward._cudnn_rule() is not None)
    assert refusal(dataclasses.replace(plain, is_causal=True), False) == why


@pytest.mark.slow
def test_ring_backward_with_lse_cotangent_and_bias_gradient():
    """The lse's own cotangent enters the statistics path through delta; a bias gets its gradient."""
    rng = np.random.default_rng(21)
    q, k, v, kw = make(rng, sq=150, skv=150, mask="bias", causal=True)
    d_lse = jnp.asarray(rng.standard_normal(q.shape[:3]), jnp.float32)

    def loss(q, k, v, bias):
        out, lse = jax_attn.attention_forward(q, k, v, backend="naive", return_lse=True,
                                              **dict(kw, attn_mask=bias))
        return jnp.sum(out) + jnp.sum(jnp.where(jnp.isneginf(lse), 0.0, lse) * d_lse)

    with parallel.sequence_parallel(mesh(4), "sp", "ring"):
        got = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(q, k, v, kw["attn_mask"])
    want = jax.grad(loss, argnums=(0, 1, 2, 3))(q, k, v, kw["attn_mask"])
    for name, g, r in zip(("dq", "dk", "dv", "dbias"), got, want):
        err = reference.relative_error(g, r)
        assert err <= 2 * TOL, f"{name}: relative error {err:.2e}"


def test_errors_name_the_problem():
    m = mesh(4)
    rng = np.random.default_rng(8)
    q, k, v, _ = make(rng, n=6, n_kv=6, sq=16, skv=16)
    with parallel.sequence_parallel(m, "sp", "ulysses"), pytest.raises(ValueError, match="method='ring'"):
        jax_attn.attention_forward(q, k, v, backend="naive")
    with pytest.raises(ValueError, match="not an axis of the mesh"):
        parallel.sequence_parallel(m, "seq")
    with pytest.raises(ValueError, match="method must be one of"):
        parallel.sequence_parallel(m, "sp", method="tree")
    with parallel.shard_local(m, batch_axis="sp"), pytest.raises(ValueError, match="batch 2"):
        jax_attn.attention_forward(q, k, v, backend="naive")


def test_no_context_costs_nothing():
    rng = np.random.default_rng(9)
    q, k, v, _ = make(rng, sq=8, skv=8)
    inputs = jax_attn.inputs.AttentionInputs.build(q, k, v)
    assert parallel.current_plan() is None
    assert parallel.sequence_parallel_forward(inputs, None, False) is None
    jaxpr = str(jax.make_jaxpr(lambda q: jax_attn.attention_forward(q, k, v, backend="naive"))(q))
    assert "shard_map" not in jaxpr
    with parallel.sequence_parallel(mesh(2), "sp", "ring"):
        assert parallel.current_plan().method == "ring"
    assert parallel.current_plan() is None


def test_ring_gradients_with_automatic_choice():
    """No backend named: the ring's backward must pick one whose lse really is differentiable."""
    rng = np.random.default_rng(10)
    q, k, v, kw = make(rng, sq=64, skv=64, lengths=[64, 30])
    check(q, k, v, kw, None, parallel.sequence_parallel(mesh(2), "sp", "ring"))


def test_ring_with_a_forward_only_backend_first(monkeypatch):
    """A preference list whose first backend has no backward (as `sage`): differentiated, the
    ring's blocks run the next backend forward and backward, so the gradient is that backend's
    (here `chunked` made forward-only, with `naive` after it); undifferentiated, the first."""
    monkeypatch.setattr(type(BACKENDS["chunked"]), "backward_reasons", lambda self, spec: ["forward only"])
    rng = np.random.default_rng(9)
    q, k, v, kw = make(rng, sq=96, skv=96, causal=True)
    ran = []
    for name in ("chunked", "naive"):
        b = BACKENDS[name]
        monkeypatch.setattr(b, "_forward", lambda inputs, lse, f=b._forward, n=name: ran.append(n) or f(inputs, lse))
    with parallel.sequence_parallel(mesh(2), "sp", "ring"):
        jax.jit(lambda q, k, v: jax_attn.attention_forward(q, k, v, backend="chunked,naive", **kw))(q, k, v)
        assert set(ran) == {"chunked"}
        ran.clear()
        check(q, k, v, kw, "chunked,naive", contextlib.nullcontext())  # inside the ring's context
    assert "chunked" not in ran and "naive" in ran


@pytest.mark.parametrize("method", ["ulysses", "local"])
def test_lse_without_gradient_is_guarded_on_several_devices(method, monkeypatch):
    """A local backend whose lse has no gradient (as cuDNN): differentiating the lse raises, as on
    one device, instead of losing its share; returning it without differentiating it does not."""
    monkeypatch.setattr(BACKENDS["naive"], "supports_lse_grad", False)
    rng = np.random.default_rng(10)
    q, k, v, _ = make(rng, sq=64, skv=64)
    m = mesh(2)
    context = (parallel.sequence_parallel(m, "sp", "ulysses") if method == "ulysses"
               else parallel.shard_local(m, head_axis="sp"))

    def loss(q, use_lse):
        out, lse = jax_attn.attention_forward(q, k, v, backend="naive", return_lse=True)
        return jnp.sum(out) + (jnp.sum(lse) if use_lse else 0.0)

    with context:
        jax.jit(jax.grad(lambda q: loss(q, False)))(q)  # the lse returned, not differentiated
        with pytest.raises(ValueError, match="'naive'.*log-sum-exp it returns has no gradient"):
            jax.jit(jax.grad(lambda q: loss(q, True)))(q)
