"""Routing: argument > use_backend (innermost) > JAX_ATTN_BACKEND > automatic, decided at trace time."""
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
    with pytest.raises(ValueError, match="known: pallas, cudnn, xla, chunked, naive|names no backend|cannot be combined"):
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
