"""Routing: argument > use_backend (innermost) > JAX_ATTN_BACKEND > automatic, decided at trace time."""
import json
import logging
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_attn
from jax_attn import routing
from jax_attn.backends import BACKENDS

S = jax.ShapeDtypeStruct
Q = K = V = S((1, 2, 16, 8), jnp.float32)
BF = S((1, 2, 16, 8), jnp.bfloat16)


def chosen(backend=None, q=Q, **kw):
    return jax_attn.explain(q, q, q, backend=backend, **kw).backend


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    monkeypatch.delenv(routing.ENV_VAR, raising=False)
    routing._logged.clear()


def test_priority_argument_context_env(monkeypatch):
    monkeypatch.setenv(routing.ENV_VAR, "chunked")
    assert chosen() == "chunked"
    with jax_attn.use_backend("naive"):
        assert chosen() == "naive"
        with jax_attn.use_backend("xla"):
            assert chosen() == "xla"
        assert chosen() == "naive"
        assert chosen("chunked") == "chunked"
    assert chosen() == "chunked"
    assert jax_attn.explain(Q, K, V).source == routing.ENV_VAR


def test_automatic_choice_on_cpu_never_picks_interpret_mode_pallas():
    d = jax_attn.explain(Q, K, V)
    assert d.source == "automatic" and d.backend in ("xla", "chunked")
    assert "pallas" in d.candidates and d.backend != "pallas"


def test_automatic_choice_keeps_memory_linear_for_long_sequences():
    big = S((1, 8, 32768, 64), jnp.float32)  # 32 GiB of scores: xla/naive must not be chosen
    assert chosen(q=big) == "chunked"


def test_preference_list_falls_through_and_logs_once(caplog):
    with caplog.at_level(logging.WARNING, logger="jax_attn.routing"):
        assert chosen("cudnn,chunked", q=BF) in ("chunked", "cudnn")
        if jax.default_backend() == "cpu":
            spec = jax_attn.contract.validate(BF, BF, BF)
            routing.choose(spec, "cudnn,chunked")
            routing.choose(spec, "cudnn,chunked")
            records = [r for r in caplog.records if "skipped cudnn" in r.getMessage()]
            assert len(records) == 1 and "GPU" in records[0].getMessage()


def test_single_backend_that_cannot_serve_lists_its_reasons():
    spec = jax_attn.contract.validate(Q, K, S((1, 2, 16, 4), jnp.float32))  # dv != d
    with pytest.raises(jax_attn.BackendError, match="value head dim 4 differs"):
        routing.choose(spec, "xla")
    q = jnp.ones((1, 2, 4, 8)) * np.arange(8)
    with pytest.raises(jax_attn.BackendError, match=r"xla: .*value head dim"):
        jax_attn.attention_forward(q, q, q[..., :4], backend="xla")


@pytest.mark.parametrize("bad", ["flash", "naive,nope", "auto,xla", ""])
def test_unknown_names_list_the_known_ones(bad, monkeypatch):
    with pytest.raises(ValueError, match="known: pallas, fa4, cudnn, tpu, xla, chunked, naive, sage|names no backend|cannot be combined"):
        chosen(bad)
    with pytest.raises(ValueError):
        with jax_attn.use_backend(bad):
            pass
    if bad:
        monkeypatch.setenv(routing.ENV_VAR, bad)
        with pytest.raises(ValueError, match=routing.ENV_VAR):
            chosen()


def test_env_var_accepts_list_and_auto(monkeypatch):
    monkeypatch.setenv(routing.ENV_VAR, "naive, xla")
    assert chosen() == "naive"
    monkeypatch.setenv(routing.ENV_VAR, "auto")
    assert jax_attn.explain(Q, K, V).source == routing.ENV_VAR and chosen() in ("xla", "chunked")


def test_context_is_thread_local():
    seen = {}
    barrier = threading.Barrier(2)

    def worker(name):
        with jax_attn.use_backend(name):
            barrier.wait()
            seen[name] = chosen()

    threads = [threading.Thread(target=worker, args=(n,)) for n in ("naive", "chunked")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == {"naive": "naive", "chunked": "chunked"}
    assert routing._context.get() is None


def test_decision_is_made_at_trace_time(monkeypatch):
    calls = []
    real = BACKENDS["naive"]._forward
    monkeypatch.setattr(BACKENDS["naive"], "_forward", lambda *a: calls.append(1) or real(*a))
    f = jax.jit(lambda q: jax_attn.attention_forward(q, q, q, backend="naive"))
    x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 2, 16, 8)), jnp.float32)
    f(x), f(x), f(x + 1)
    assert len(calls) == 1


def test_explain_lists_every_backend_and_prints_a_table():
    d = jax_attn.explain(Q, K, V)
    assert set(d.reasons) == set(BACKENDS)
    text = str(d)
    assert text.startswith("chosen:") and all(n in text for n in BACKENDS)


def test_available_backends():
    names = jax_attn.available_backends()
    assert {"naive", "xla", "chunked"} <= set(names)
    assert ("cudnn" in names) == (jax.default_backend() == "gpu")


def test_auto_routes_inference_and_training_separately(tmp_path, monkeypatch):
    """A table whose forward-only choice (chunked) differs from its training choice (xla): a call
    nothing differentiates runs chunked; under autodiff, xla's forward and backward run."""
    from jax_attn import autoselect, reference
    q = jax.random.normal(jax.random.key(0), (2, 2, 24, 8), jnp.float32)
    k, v = (jax.random.normal(jax.random.key(i), (2, 2, 40, 8), jnp.float32) for i in (1, 2))
    mask = jax.random.bernoulli(jax.random.key(3), 0.7, (2, 1, 1, 40)).at[..., 0].set(True)
    lengths = jnp.array([40, 17], jnp.int32)
    key = autoselect.bucket(jax_attn.contract.validate(q, k, v))
    path = tmp_path / "routing_table.json"
    path.write_text(json.dumps({"preferences": {key: ["xla", "chunked"]},
                                "preferences_forward": {key: ["chunked", "xla"]}}))
    monkeypatch.setattr(autoselect, "TABLE_PATH", path)
    autoselect.table.cache_clear()
    traced = []
    for name in ("xla", "chunked"):
        b = BACKENDS[name]
        monkeypatch.setattr(b, "_forward", lambda inputs, lse, f=b._forward, n=name:
                            traced.append(n) or f(inputs, lse))
    try:
        d = jax_attn.explain(q, k, v, attn_mask=mask, kv_lengths=lengths)
        assert (d.backend, d.forward_only) == ("xla", "chunked")
        assert "chunked when nothing differentiates" in str(d)

        def f(q, k, v):
            return jax_attn.attention_forward(q, k, v, attn_mask=mask, kv_lengths=lengths,
                                              return_lse=True)
        out, lse = jax.jit(f)(q, k, v)
        assert traced == ["chunked"]
        traced.clear()

        def loss(q, k, v):
            o, l_ = f(q, k, v)
            return jnp.sum(o * jnp.cos(o)) + jnp.sum(jnp.where(jnp.isfinite(l_), l_, 0.0) ** 2)
        grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
        assert traced == ["xla"]
        with jax_attn.use_backend("xla"):
            want = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
        # The custom VJP leaves no trace: the same programs as naming each backend.
        from jax_attn.bench import program_fingerprint

        def program(fn, backend=None):
            with jax_attn.use_backend(backend or "auto"):
                return program_fingerprint(jax.jit(fn).lower(q, k, v).compile())
        assert program(f) == program(f, "chunked")
        grad = jax.grad(loss, argnums=(0, 1, 2))
        assert program(grad) == program(grad, "xla")
    finally:
        autoselect.table.cache_clear()
    x64 = [np.asarray(a, np.float64) for a in (q, k, v)]
    ro, rlse = reference.attention(*x64, attn_mask=np.asarray(mask), kv_lengths=np.asarray(lengths),
                                   return_lse=True)
    np.testing.assert_allclose(out, ro, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(lse, rlse, rtol=1e-4, atol=1e-5)
    for g, w in zip(grads, want):
        np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-6)
        assert np.all(np.isfinite(g)) and np.abs(g).sum() > 0


def test_packed_calls_prefer_backends_that_skip_segment_tiles(tmp_path, monkeypatch):
    """A measured order with cudnn first: a call with segment ids goes to the backend whose
    kernels skip other segments' tiles (pallas); the same call without ids keeps the order."""
    from jax_attn import autoselect
    from jax_attn.contract import validate
    q = jax.ShapeDtypeStruct((1, 8, 4096, 64), jnp.bfloat16)
    ids = jax.ShapeDtypeStruct((1, 4096), jnp.int32)
    plain, packed = validate(q, q, q), validate(q, q, q, q_segment_ids=ids, kv_segment_ids=ids)
    path = tmp_path / "routing_table.json"
    path.write_text(json.dumps({"preferences": {autoselect.bucket(plain): ["cudnn", "pallas", "xla"]}}))
    monkeypatch.setattr(autoselect, "TABLE_PATH", path)
    autoselect.table.cache_clear()
    try:
        assert autoselect.preference(plain)[:2] == ["cudnn", "pallas"]
        assert BACKENDS["pallas"].skips_segment_tiles and not BACKENDS["cudnn"].skips_segment_tiles
        assert autoselect.preference(packed)[0] == "pallas"
        # a measured order with fa4 first (as the H200 table's training order at d <= 128):
        # packed calls still go to pallas, then fa4, both ahead of the backends that mask
        path.write_text(json.dumps({"preferences": {autoselect.bucket(plain): ["fa4", "cudnn", "pallas"]}}))
        autoselect.table.cache_clear()
        assert autoselect.preference(plain)[0] == "fa4"
        assert autoselect.preference(packed)[:3] == ["pallas", "fa4", "cudnn"]
        # fa4 unmeasured in the bucket (or failed there): not promoted, it stays behind cudnn
        path.write_text(json.dumps({"preferences": {autoselect.bucket(plain): ["cudnn", "pallas", "xla"]}}))
        autoselect.table.cache_clear()
        packed_order = autoselect.preference(packed)
        assert packed_order[:2] == ["pallas", "cudnn"]
        assert packed_order.index("fa4") > packed_order.index("cudnn")
    finally:
        autoselect.table.cache_clear()


def test_auto_8bit_takes_a_lossy_backend_only_where_measured(tmp_path, monkeypatch):
    """`backend="auto+8bit"`: calls nothing differentiates take a lossy backend where the table's
    lossy order ranks it first; training, other buckets, packed calls and plain `auto` never do.
    (sage16 cannot run on the CPU: it is made to serve here, through xla's forward.)"""
    from jax_attn import autoselect
    from jax_attn.contract import validate
    q = jax.random.normal(jax.random.key(0), (1, 2, 32, 8), jnp.float32)
    k, v = (jax.random.normal(jax.random.key(i), (1, 2, 48, 8), jnp.float32) for i in (1, 2))
    key = autoselect.bucket(validate(q, k, v))
    path = tmp_path / "routing_table.json"
    path.write_text(json.dumps({"preferences": {key: ["xla", "chunked"]},
                                "preferences_forward": {key: ["chunked", "xla"]},
                                "preferences_forward_lossy": {key: ["sage16", "chunked", "xla"]}}))
    monkeypatch.setattr(autoselect, "TABLE_PATH", path)
    autoselect.table.cache_clear()
    lossy, xla = BACKENDS["sage16"], BACKENDS["xla"]
    traced = []
    monkeypatch.setattr(lossy, "reasons", lambda spec, needs=None: [])
    monkeypatch.setattr(lossy, "_forward", lambda inputs, lse: traced.append("sage16") or
                        xla._forward(inputs, lse))
    try:
        d = jax_attn.explain(q, k, v, backend="auto+8bit")
        assert (d.backend, d.forward_only) == ("xla", "sage16")
        assert "auto+8bit: the measured order" in str(d)
        assert jax_attn.explain(q, k, v).forward_only == "chunked"  # plain auto: never lossy
        out = jax.jit(lambda q, k, v: jax_attn.attention_forward(q, k, v, backend="auto+8bit"))(q, k, v)
        assert traced == ["sage16"]
        np.testing.assert_allclose(out, jax_attn.attention_forward(q, k, v, backend="xla"),
                                   rtol=1e-5, atol=1e-6)
        traced.clear()
        with jax_attn.use_backend("auto+8bit"):  # training runs the exact training order
            jax.grad(lambda q: jax_attn.attention_forward(q, k, v).sum())(q)
        assert traced == []
        # another bucket (no lossy order there) and a packed call route as auto, and say why
        q2 = jnp.zeros((1, 2, 32, 80), jnp.float32)
        other = jax_attn.explain(q2, q2, q2, backend="auto+8bit")
        assert other.forward_only != "sage16" and "no lossy backend measured" in str(other)
        ids = jnp.zeros((1, 32), jnp.int32)
        packed = jax_attn.explain(q, q, q, backend="auto+8bit", q_segment_ids=ids, kv_segment_ids=ids)
        assert "sage16" not in (packed.backend, packed.forward_only) and "packed" in str(packed)
    finally:
        autoselect.table.cache_clear()
    with pytest.raises(ValueError, match="cannot be combined"):
        routing.parse_choice("auto+8bit,xla")
