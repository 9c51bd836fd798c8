"""`torch_ref.attention_forward` computes the float64 reference's function on every torch backend.

Tolerances: `jax_attn.reference.TOLERANCE` per dtype (relative Frobenius error) for outputs and
the lse, twice that for gradients (they go through one more rounded matmul), as in
tests/test_backends.py. Routing and error messages follow the same rules as `jax_attn`.
"""
import logging

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import jax_attn
import torch_ref
from jax_attn import reference
from torch_ref import routing
from torch_ref.backends import BACKENDS
from torch_ref.inputs import AttentionInputs, RunContext

TOL = reference.TOLERANCE
DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16,
          "float16": torch.float16}
EXAMPLES = {"naive": 25, "chunked": 25, "sdpa": 25, "sdpa_math": 15, "sdpa_flash": 15,
            "sdpa_efficient": 15, "sdpa_cudnn": 15, "flash_attn": 15, "xformers": 15}
RUNNABLE = [n for n in EXAMPLES if not BACKENDS[n].unavailable()]
OPTIONAL = ("flash_attn", "sageattention", "xformers")


# torch_ref's chunks do not divide the test lengths: tails and many chunks (tests/conftest.py).
pytestmark = pytest.mark.small_chunks(16, 24, frameworks=("torch",))


@pytest.fixture(autouse=True)
def clean_routing(monkeypatch):
    monkeypatch.delenv(routing.ENV_VAR, raising=False)
    routing._logged.clear()


def make_call(rng, b, n, n_kv, sq, skv, d, dv, dtype, layout="bnsd", mask="none", causal=False,
              lengths=None, bias_grad=True):
    """Random inputs that require grad, in `layout`, and the keyword arguments of the call."""
    def t(*shape):
        x = torch.tensor(rng.standard_normal(shape), dtype=DTYPES[dtype])
        return (x if layout == "bnsd" else x.transpose(1, 2)).requires_grad_()

    q, k, v = t(b, n, sq, d), t(b, n_kv, skv, d), t(b, n_kv, skv, dv)
    kw = dict(layout=layout, is_causal=causal)
    if mask == "key":
        kw["attn_mask"] = torch.tensor(rng.random((b, 1, 1, skv)) < 0.7)
    elif mask == "full":
        m = rng.random((b, n, sq, skv)) < 0.7
        m[0, 0, 0] = False  # one empty row
        kw["attn_mask"] = torch.tensor(m)
    elif mask == "bias":
        bias = rng.standard_normal((1, n, sq, skv))
        bias[0, -1, -1] = -np.inf  # one empty row, from the bias alone
        bias[0, 0, :, 0] = -np.inf
        kw["attn_mask"] = torch.tensor(bias, dtype=DTYPES[dtype]).requires_grad_(bias_grad)
    if lengths is not None:
        kw["kv_lengths"] = torch.tensor(lengths, dtype=torch.int32)
    return q, k, v, kw


def f64(x, layout="bnsd"):
    x = x.detach().to(torch.float64).numpy()
    return x if layout == "bnsd" else np.swapaxes(x, 1, 2)


def reference_for(q, k, v, kw, d_out):
    layout = kw["layout"]
    mask = kw.get("attn_mask")
    mask = None if mask is None else (mask.numpy() if mask.dtype == torch.bool else f64(mask))
    lengths = kw.get("kv_lengths")
    lengths = None if lengths is None else lengths.numpy()
    qn, kn, vn = (f64(x, layout) for x in (q, k, v))
    out, lse = reference.attention(qn, kn, vn, mask, lengths, kw["is_causal"], return_lse=True)
    grads = reference.attention_vjp(qn, kn, vn, f64(d_out, layout), mask, lengths, kw["is_causal"])
    return out, lse, grads


def assert_matches_reference(backend, q, k, v, kw, dtype, rng):
    tol = TOL[dtype]
    layout = kw["layout"]
    with_lse = BACKENDS[backend].supports_lse
    res = torch_ref.attention_forward(q, k, v, backend=backend, return_lse=with_lse, **kw)
    out, lse = res if with_lse else (res, None)
    assert out.dtype == q.dtype and out.shape[:3] == q.shape[:3] and out.shape[3] == v.shape[3]
    d_out = torch.tensor(rng.standard_normal(out.shape), dtype=out.dtype)
    ref_out, ref_lse, ref_grads = reference_for(q, k, v, kw, d_out)
    err = reference.relative_error(f64(out, layout), ref_out)
    assert err <= tol, f"out: relative error {err:.2e} > {tol:.0e}"
    if lse is not None:
        assert lse.dtype == torch.float32
        assert reference.relative_error(f64(lse), ref_lse) <= max(tol, TOL["float32"])
    mask = kw.get("attn_mask")
    wrt = [q, k, v] + ([mask] if mask is not None and mask.requires_grad else [])
    acc = torch.promote_types(out.dtype, torch.float32)  # half inputs: an f32 loss; float64 stays float64
    grads = torch.autograd.grad((out.to(acc) * d_out.to(acc)).sum(), wrt)
    ds = ref_grads[3]
    if len(wrt) == 4:  # the bias broadcasts: its gradient sums over the broadcast dims
        dims = tuple(a for a in range(4) if mask.shape[a] == 1)
        ds = ds.sum(dims, keepdims=True) if dims else ds
    for name, g, r in zip(("dq", "dk", "dv", "dbias"), grads, (*ref_grads[:3], ds)):
        assert g.dtype == q.dtype
        err = reference.relative_error(f64(g, layout if name != "dbias" else "bnsd"), r)
        assert err <= 2 * tol, f"{name}: relative error {err:.2e} > {2 * tol:.0e}"


@st.composite
def calls(draw):
    n_kv, groups = draw(st.integers(1, 2)), draw(st.sampled_from([1, 2, 3]))
    sq, skv = draw(st.sampled_from([1, 5, 17, 33, 77])), draw(st.sampled_from([1, 7, 24, 50, 77]))
    d = draw(st.sampled_from([8, 16, 40, 72]))
    dv = draw(st.sampled_from([d, d, 24]))
    b = draw(st.integers(1, 2))
    lengths = draw(st.one_of(st.none(), st.lists(st.integers(0, skv), min_size=b, max_size=b)))
    return dict(b=b, n=n_kv * groups, n_kv=n_kv, sq=sq, skv=skv, d=d, dv=dv,
                dtype=draw(st.sampled_from(["float32", "bfloat16", "float16", "float64"])),
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
        q, k, v, kw = make_call(rng, **params, bias_grad=BACKENDS[backend].supports_bias_grad)
        inputs = AttentionInputs.build(q, k, v, **kw, return_lse=BACKENDS[backend].supports_lse)
        assume(not BACKENDS[backend].reasons(inputs.spec, inputs.call))
        assert_matches_reference(backend, q, k, v, kw, params["dtype"], rng)

    check()


@pytest.mark.fast_diagonal  # the fast run: each shape once, the backends in turn
@pytest.mark.parametrize("backend", ["naive", "chunked", "sdpa"])
@pytest.mark.parametrize("sq,skv,d", [(1, 77, 8), (77, 1, 256), (600, 77, 40), (33, 600, 72)])
def test_required_lengths_and_head_dims(backend, sq, skv, d):
    rng = np.random.default_rng(sq * skv + d)
    q, k, v, kw = make_call(rng, 1, 2, 1, sq, skv, d, d, "float32", lengths=[max(1, skv - 3)])
    assert_matches_reference(backend, q, k, v, kw, "float32", rng)


@pytest.mark.parametrize("backend", RUNNABLE)
def test_empty_rows_give_zeros_and_zero_gradients(backend):
    rng = np.random.default_rng(3)
    q, k, v, kw = make_call(rng, 2, 2, 2, 9, 12, 8, 8, "float32", mask="full", lengths=[0, 12])
    kw["attn_mask"][1, 0, 0] = False  # sample 0 is empty by length
    out = torch_ref.attention_forward(q, k, v, backend=backend, **kw)
    dq, dk, dv = torch.autograd.grad(out.sum(), (q, k, v))
    assert all(torch.isfinite(x).all() for x in (out, dq, dk, dv))
    assert (out[0] == 0).all() and (dq[0] == 0).all() and (dk[0] == 0).all() and (dv[0] == 0).all()
    assert (out[1, 0, 0] == 0).all() and (dq[1, 0, 0] == 0).all()  # the masked row of sample 1
    assert (out[1] != 0).any()


@pytest.mark.parametrize("backend", ["naive", "chunked"])
def test_empty_rows_have_minus_infinite_lse(backend):
    q, k, v, kw = make_call(np.random.default_rng(4), 2, 1, 1, 3, 5, 8, 8, "float32", lengths=[0, 5])
    _, lse = torch_ref.attention_forward(q, k, v, backend=backend, return_lse=True, **kw)
    assert torch.isneginf(lse[0]).all() and torch.isfinite(lse[1]).all()


@pytest.mark.parametrize("backend", ["naive", "chunked", "sdpa_math"])
def test_nan_in_inputs_propagates_like_the_reference(backend):
    """Not asked of `sdpa`/`sdpa_flash`: torch's CPU flash kernel drops a NaN query silently."""
    q, k, v, kw = make_call(np.random.default_rng(5), 1, 2, 2, 6, 7, 8, 8, "float32")
    q = q.detach().clone()
    q[0, 1, 2, 3] = float("nan")
    out = torch_ref.attention_forward(q, k, v, backend=backend, **kw)
    ref = reference.attention(f64(q), f64(k), f64(v))
    assert np.array_equal(np.isnan(f64(out)), np.isnan(ref)) and np.isnan(ref).any()


def test_bsnd_layout_reads_strided_views_without_copies():
    rng = np.random.default_rng(6)
    q, k, v, kw = make_call(rng, 1, 2, 2, 5, 5, 8, 8, "float32", layout="bsnd")
    inputs = AttentionInputs.build(q, k, v, layout="bsnd")
    assert all(a.data_ptr() == b.data_ptr() for a, b in zip(inputs.bnsd(), (q, k, v)))


# --- errors: the very same types and messages as jax_attn -------------------------------------

BAD_CALLS = [
    ("rank", dict(q=(2, 4, 8)), {}),
    ("batch", dict(k=(3, 2, 6, 8)), {}),
    ("head dim", dict(k=(2, 2, 6, 4)), {}),
    ("v heads", dict(v=(2, 1, 6, 8)), {}),
    ("gqa", dict(q=(2, 3, 5, 8)), {}),
    ("zero size", dict(q=(2, 2, 0, 8)), {}),
    ("mask shape", {}, dict(attn_mask=("bool", (2, 2, 4, 6)))),
    ("mask rank", {}, dict(attn_mask=("bool", (1, 2, 2, 5, 6)))),
    ("mask dtype", {}, dict(attn_mask=("int32", (2, 1, 1, 6)))),
    ("lengths shape", {}, dict(kv_lengths=("int32", (3,)))),
    ("lengths dtype", {}, dict(kv_lengths=("float32", (2,)))),
    ("int q", dict(dtype_q="int32"), {}),
    ("mixed dtypes", dict(dtype_v="float16"), {}),
    ("layout", {}, dict(layout="sbnd")),
    ("scale", {}, dict(scale=float("inf"))),
    ("causal", {}, dict(is_causal=1)),
    ("not an array", dict(q=None), {}),
]


def _bad_call(framework, shapes, extra):
    shapes = {"q": (2, 2, 5, 8), "k": (2, 2, 6, 8), "v": (2, 2, 6, 8), **shapes}
    zeros = {"jax": lambda s, dt: jnp.zeros(s, dt),
             "torch": lambda s, dt: torch.zeros(s, dtype=getattr(torch, dt))}[framework]
    args = [[1.0] if shapes[x] is None else zeros(shapes[x], shapes.get(f"dtype_{x}", "float32"))
            for x in "qkv"]
    kw = {key: zeros(val[1], val[0]) if isinstance(val, tuple) else val for key, val in extra.items()}
    return args, kw


@pytest.mark.parametrize("case,shapes,extra", BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_errors_are_those_of_jax_attn(case, shapes, extra):
    args, kw = _bad_call("jax", shapes, extra)
    with pytest.raises((TypeError, ValueError)) as jax_err:
        jax_attn.attention_forward(*args, **kw)
    args, kw = _bad_call("torch", shapes, extra)
    with pytest.raises((TypeError, ValueError)) as torch_err:
        torch_ref.attention_forward(*args, **kw)
    assert type(torch_err.value) is type(jax_err.value)
    assert str(torch_err.value) == str(jax_err.value)


# --- routing: the same rules as jax_attn ------------------------------------------------------

Q = torch.zeros(1, 2, 16, 8)


def chosen(backend=None, q=Q, **kw):
    return torch_ref.explain(q, q, q, backend=backend, **kw).backend


def test_priority_argument_context_env(monkeypatch):
    monkeypatch.setenv(routing.ENV_VAR, "chunked")
    assert chosen() == "chunked"
    with torch_ref.use_backend("naive"):
        assert chosen() == "naive"
        with torch_ref.use_backend("sdpa_math"):
            assert chosen() == "sdpa_math"
        assert chosen() == "naive"
        assert chosen("chunked") == "chunked"
    assert chosen() == "chunked"
    assert torch_ref.explain(Q, Q, Q).source == routing.ENV_VAR


def test_routing_is_applied_to_the_call(monkeypatch):
    calls = []
    real = BACKENDS["naive"]._forward
    monkeypatch.setattr(BACKENDS["naive"], "_forward", lambda *a: calls.append(1) or real(*a))
    with torch_ref.use_backend("naive"):
        torch_ref.attention_forward(Q, Q, Q)
    monkeypatch.setenv(routing.ENV_VAR, "naive")
    torch_ref.attention_forward(Q, Q, Q)
    torch_ref.attention_forward(Q, Q, Q, backend="chunked")
    assert len(calls) == 2


def test_automatic_choice():
    d = torch_ref.explain(Q, Q, Q)
    assert d.source == "automatic" and d.backend == ("sdpa" if Q.device.type == "cpu" else d.backend)
    assert torch_ref.explain(Q, Q, Q, return_lse=True).backend == "chunked"  # sdpa has no lse
    big = torch.empty(1, 8, 32768, 64, device="meta")  # 32 GiB of scores: never naive
    d = torch_ref.explain(big, big, big, return_lse=True)
    assert "naive" not in d.candidates and d.backend == "chunked"


def test_preference_list_falls_through_and_logs_once(caplog):
    v = torch.zeros(1, 2, 16, 4)  # dv != d: sdpa_flash cannot serve
    with caplog.at_level(logging.WARNING, logger="torch_ref.routing"):
        for _ in range(2):
            torch_ref.attention_forward(Q, Q, v, backend="sdpa_flash,naive")
    records = [r for r in caplog.records if "skipped sdpa_flash" in r.getMessage()]
    assert len(records) == 1 and "value head dim 4 differs" in records[0].getMessage()


def test_single_backend_that_cannot_serve_lists_its_reasons():
    with pytest.raises(torch_ref.BackendError, match=r"sdpa: .*return_lse=True is not supported"):
        torch_ref.attention_forward(Q, Q, Q, backend="sdpa", return_lse=True)
    assert torch_ref.BackendError is jax_attn.BackendError


@pytest.mark.parametrize("bad", ["flash", "naive,nope", "auto,naive", ""])
def test_unknown_names_list_the_known_ones(bad, monkeypatch):
    known = ", ".join(BACKENDS)
    with pytest.raises(ValueError, match=f"known: {known}|names no backend|cannot be combined"):
        chosen(bad)
    with pytest.raises(ValueError):
        with torch_ref.use_backend(bad):
            pass
    if bad:
        monkeypatch.setenv(routing.ENV_VAR, bad)
        with pytest.raises(ValueError, match=routing.ENV_VAR):
            chosen()


def test_explain_lists_every_backend_and_prints_a_table():
    d = torch_ref.explain(Q, Q, Q)
    assert set(d.reasons) == set(BACKENDS)
    assert str(d).startswith("chosen:") and all(n in str(d) for n in BACKENDS)
    meta = torch.empty(1, 2, 16, 64, device="meta", dtype=torch.float16)
    assert torch_ref.explain(meta, meta, meta).reasons["sdpa"] == []


def test_no_backward_backends_refuse_when_grad_is_needed():
    spec = AttentionInputs.build(Q, Q, Q).spec
    assert any("no backward" in r for r in BACKENDS["sageattention"].reasons(spec, RunContext(grad=True)))


def test_available_backends():
    names = torch_ref.available_backends()
    assert {"naive", "chunked", "sdpa", "sdpa_math"} <= set(names)
    assert ("sdpa_efficient" in names) == torch.cuda.is_available()


@pytest.mark.parametrize("name", OPTIONAL)
def test_optional_backend_is_absent_with_a_reason_or_matches_the_reference(name):
    backend = BACKENDS[name]
    if backend.unavailable():
        assert any(name in r or "CUDA" in r for r in backend.unavailable())
        pytest.skip(f"{name}: {'; '.join(backend.unavailable())}")
    rng = np.random.default_rng(8)
    q, k, v, kw = make_call(rng, 2, 4, 2, 64, 64, 64, 64, "bfloat16")
    q, k, v = (x.detach().cuda().requires_grad_(backend.grad) for x in (q, k, v))
    out = torch_ref.attention_forward(q, k, v, backend=name, **kw)
    ref = reference.attention(f64(q.cpu()), f64(k.cpu()), f64(v.cpu()))
    tol = TOL["bfloat16"] if backend.automatic else 0.1  # sageattention quantizes q and k to int8
    assert reference.relative_error(f64(out.cpu()), ref) <= tol


@pytest.mark.slow  # `check` over every case
def test_cli_check_rows_pass_and_skip_with_reasons():
    from jax_attn.cli import CASES
    from torch_ref.check import compare_with_reference
    rows = compare_with_reference([c.scaled(32) for c in CASES], seed=0)
    assert rows and all(r["status"] in ("pass", "skip") for r in rows), [r for r in rows if r["status"] == "FAIL"]
    assert all(r["note"] for r in rows if r["status"] == "skip")
    assert {r["backend"] for r in rows} == {f"torch:{n}" for n in torch_ref.available_backends()}
