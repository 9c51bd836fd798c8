"""torch_ref's wider contract: jax.nn's `bias`/`mask`, `query_seq_lengths`, `key_value_seq_lengths`,
`local_window_size`, unbatched inputs, length clamping, NaN rows and harmless padding.

Every available torch backend (skipped where its reasons refuse the call) is compared with the
float64 reference (`jax_attn.reference`) on random normal inputs, under a cotangent on `out` and
on `lse`: out, lse, dq, dk, dv and the gradient of a float bias. Tolerances as
tests/test_torch_ref.py: `reference.TOLERANCE[dtype]` for out and lse, twice that for gradients.
The `cross_framework` tests run `jax_attn.attention_forward` on the very same inputs.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jax_attn
import torch_ref
from jax_attn import reference
from jax_attn.backends import BACKENDS as JAX_BACKENDS
from torch_ref.backends import BACKENDS
from torch_ref.backends import chunked as chunked_module
from torch_ref.inputs import RunContext

TOL = reference.TOLERANCE
NAMES = torch_ref.available_backends()
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# torch_ref's chunks do not divide the lengths: tails, several chunks, and chunks a window skips
# (tests/conftest.py).
pytestmark = pytest.mark.small_chunks(4, 6, frameworks=("torch",))


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    b: int = 2
    n: int = 4
    n_kv: int = 2
    sq: int = 13
    skv: int = 17
    d: int = 8
    dv: int = 8
    dtype: str = "float32"
    layout: str = "bnsd"
    unbatched: bool = False  # rank-3 q, k, v (then b == 1)
    causal: bool = False
    bias: tuple | None = None  # shape of a float `bias`
    mask: str | None = None  # bool `mask`: "key" (b, 1, 1, skv) or "full" (b, n, sq, skv)
    attn_mask: str | None = None  # bool `attn_mask` per key
    q_lengths: tuple | None = None
    kv_lengths: tuple | None = None
    alias: bool = False  # kv_lengths given as key_value_seq_lengths
    window: object = None


CASES = [
    Case("bias+mask+attn_mask", bias=(1, 4, 13, 17), mask="full", attn_mask="key"),
    Case("bias+mask-causal-gqa3", n=6, bias=(2, 1, 1, 17), mask="key", causal=True),
    Case("query-lengths", q_lengths=(5, 13), kv_lengths=(9, 17), causal=True),
    Case("query-lengths-zero-bias", q_lengths=(0, 7), bias=(1, 4, 13, 17)),
    Case("kv-alias-empty-batch", kv_lengths=(0, 11), alias=True, mask="key"),
    Case("window-symmetric", window=3),
    Case("window-left-causal", window=(4, None), causal=True),
    Case("window-right", window=(None, 2), sq=17, skv=13, bias=(1, 1, 17, 13)),
    Case("window-empty-rows", window=(2, 3), sq=24, skv=12, kv_lengths=(12, 5)),
    Case("window-diagonal-qlen", window=(0, 0), q_lengths=(7, 13), mask="key"),
    Case("window-causal-right", window=(3, 5), causal=True, sq=11, skv=19, mask="full"),
    Case("unbatched", b=1, unbatched=True, bias=(4, 13, 17), q_lengths=(9,), window=(5, 1)),
    Case("unbatched-bsnd", b=1, unbatched=True, layout="bsnd", mask="key", causal=True, q_lengths=(10,)),
    Case("bsnd-qlen-window", layout="bsnd", q_lengths=(13, 4), window=(3, 0), bias=(2, 1, 1, 17)),
    Case("bfloat16", dtype="bfloat16", bias=(1, 4, 13, 17), mask="key", q_lengths=(8, 13), window=4),
    Case("float16-gqa", dtype="float16", n=6, kv_lengths=(3, 17), window=(None, 5), q_lengths=(13, 11)),
]


def _round(x, dtype):
    return np.asarray(jnp.asarray(x, dtype).astype(jnp.float32), np.float64)


@functools.lru_cache(maxsize=None)
def case_arrays(case: Case):
    """float64 NumPy in bnsd (with the batch axis), rounded to the case dtype: q, k, v, d_out,
    d_lse, and the keyword arrays (bias, mask, attn_mask, lengths)."""
    rng = np.random.default_rng(CASES.index(case) if case in CASES else 99)
    t = lambda *s: _round(rng.standard_normal(s), case.dtype)  # noqa: E731
    b, n, n_kv, sq, skv = case.b, case.n, case.n_kv, case.sq, case.skv
    arrays = dict(q=t(b, n, sq, case.d), k=t(b, n_kv, skv, case.d), v=t(b, n_kv, skv, case.dv),
                  d_out=t(b, n, sq, case.dv), d_lse=rng.standard_normal((b, n, sq)))
    if case.bias is not None:
        bias = t(*case.bias)
        bias.reshape(-1)[3] = -np.inf  # a key dropped by the bias alone
        arrays["bias"] = bias
    if case.mask == "key":
        m = rng.random((b, 1, 1, skv)) < 0.7
        m[0, 0, 0, :2] = False
        arrays["mask"] = m
    elif case.mask == "full":
        m = rng.random((b, n, sq, skv)) < 0.7
        m[0, 0, 2] = False  # one row left empty by the mask
        arrays["mask"] = m
    if case.attn_mask == "key":
        arrays["attn_mask"] = rng.random((b, 1, 1, skv)) < 0.8
    for key in ("q_lengths", "kv_lengths"):
        if getattr(case, key) is not None:
            arrays[key] = np.asarray(getattr(case, key), np.int64)
    return arrays


def merged(arrays):
    """The reference's one attn_mask: keys kept where every bool part keeps them, floats added."""
    keep = None
    for key in ("attn_mask", "mask"):
        if key in arrays:
            m = arrays[key]
            keep = m if keep is None else keep & m
    bias = arrays.get("bias")
    if bias is None or keep is None:
        return keep if bias is None else bias
    return np.where(keep, bias, -np.inf)


def reference_all(case: Case, arrays, with_lse=True):
    """float64 (out, lse, dq, dk, dv, dS) under the loss sum(out * d_out) + sum(lse * d_lse)."""
    q, k, v = arrays["q"], arrays["k"], arrays["v"]
    kv_lengths = arrays.get("kv_lengths")
    kw = dict(attn_mask=merged(arrays), is_causal=case.causal, scale=1 / math.sqrt(case.d),
              kv_lengths=None if kv_lengths is None else np.minimum(kv_lengths, case.skv),
              q_lengths=None if arrays.get("q_lengths") is None else np.minimum(arrays["q_lengths"], case.sq),
              window=case.window)
    out, lse = reference.attention(q, k, v, return_lse=True, **kw)
    dq, dk, dv, ds = reference.attention_vjp(q, k, v, arrays["d_out"], **kw)
    if with_lse:  # d lse / d s = p
        ds_lse = reference.probabilities(q, k, **kw) * arrays["d_lse"][..., None]
        g = case.n // case.n_kv
        dq = dq + np.einsum("bnqk,bnkd->bnqd", ds_lse, np.repeat(k, g, axis=1)) * kw["scale"]
        dk = dk + (np.einsum("bnqk,bnqd->bnkd", ds_lse, q) * kw["scale"]).reshape(
            case.b, case.n_kv, g, case.skv, case.d).sum(2)
        ds = ds + ds_lse
    return dict(out=out, lse=lse, dq=dq, dk=dk, dv=dv, dbias=ds)


def _sum_to(ds, shape):
    """The full `(b, n, sq, skv)` gradient summed over the broadcast dims of a bias of `shape`."""
    shape4 = (1,) * (4 - len(shape)) + tuple(shape)
    axes = tuple(a for a in range(4) if shape4[a] == 1)
    return ds.sum(axes, keepdims=True).reshape(shape)


def to_torch(case: Case, x):
    """A bnsd (with batch) array as the call takes it: layout, unbatched."""
    x = np.swapaxes(x, 1, 2) if case.layout == "bsnd" else x
    return torch.tensor(x[0] if case.unbatched else x, dtype=DTYPES[case.dtype])


def from_torch(case: Case, x, layout=True):
    x = x.detach().to(torch.float64).numpy()
    x = x[None] if case.unbatched else x
    return np.swapaxes(x, 1, 2) if layout and case.layout == "bsnd" else x


def torch_kwargs(case: Case, arrays, bias_grad=False):
    kw = dict(is_causal=case.causal, layout=case.layout)
    if case.window is not None:
        kw["local_window_size"] = case.window
    if "bias" in arrays:
        kw["bias"] = torch.tensor(arrays["bias"], dtype=DTYPES[case.dtype]).requires_grad_(bias_grad)
    for key in ("mask", "attn_mask"):
        if key in arrays:
            kw[key] = torch.tensor(arrays[key])
    lengths = lambda x: torch.tensor(x[0] if case.unbatched else x)  # noqa: E731
    if "q_lengths" in arrays:
        kw["query_seq_lengths"] = lengths(arrays["q_lengths"])
    if "kv_lengths" in arrays:
        kw["key_value_seq_lengths" if case.alias else "kv_lengths"] = lengths(arrays["kv_lengths"])
    return kw


def refused(name, q, k, v, **kw):
    """The backend's reasons for this call (`explain` with the new keywords), or []."""
    decision = torch_ref.explain(q, k, v, backend=name, return_lse=BACKENDS[name].supports_lse, **kw)
    return decision.reasons[name]


def torch_all(case: Case, arrays, name, with_lse=True):
    """out, lse and gradients from a torch backend, float64 bnsd with the batch axis."""
    b = BACKENDS[name]
    q, k, v = (to_torch(case, arrays[x]).requires_grad_() for x in "qkv")
    kw = torch_kwargs(case, arrays, bias_grad=b.supports_bias_grad)
    why = refused(name, q, k, v, **kw)
    if why:
        pytest.skip(f"{name}: {'; '.join(why)}")
    res = torch_ref.attention_forward(q, k, v, backend=name, return_lse=b.supports_lse, **kw)
    out, lse = res if b.supports_lse else (res, None)
    assert out.dtype == q.dtype and out.shape == q.shape[:-1] + (case.dv,)
    loss = (out.float() * to_torch(case, arrays["d_out"]).float()).sum()
    if lse is not None:
        assert lse.dtype == torch.float32 and lse.shape == (out.shape[:-1] if case.layout == "bnsd"
                                                             else out.transpose(-3, -2).shape[:-1])
        if with_lse:
            d_lse = arrays["d_lse"][0] if case.unbatched else arrays["d_lse"]
            d_lse = torch.tensor(d_lse, dtype=torch.float32)
            loss = loss + torch.where(torch.isfinite(lse), lse * d_lse, 0.0).sum()
    wrt = [q, k, v] + ([kw["bias"]] if kw.get("bias") is not None and kw["bias"].requires_grad else [])
    grads = torch.autograd.grad(loss, wrt)
    res = dict(out=from_torch(case, out), lse=None if lse is None else from_torch(case, lse, False),
               dq=from_torch(case, grads[0]), dk=from_torch(case, grads[1]), dv=from_torch(case, grads[2]))
    if len(grads) == 4:
        assert grads[3].dtype == kw["bias"].dtype
        res["dbias"] = grads[3].detach().to(torch.float64).numpy()
    return res


def assert_close(case, got, ref, scale=1):
    tol = TOL[case.dtype]
    for key in ("out", "lse", "dq", "dk", "dv", "dbias"):
        if got.get(key) is None:
            continue
        r = ref[key] if key != "dbias" else _sum_to(ref[key], case.bias)
        limit = scale * (tol if key == "out" else max(tol, TOL["float32"]) if key == "lse" else 2 * tol)
        err = reference.relative_error(got[key], r)
        assert err <= limit, f"{key}: relative error {err:.2e} > {limit:.0e}"


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_matches_reference(case, name):
    arrays = case_arrays(case)
    got = torch_all(case, arrays, name, with_lse=BACKENDS[name].supports_lse)
    assert_close(case, got, reference_all(case, arrays, with_lse=BACKENDS[name].supports_lse))


@pytest.mark.parametrize("name", NAMES)
def test_padding_queries_output_zeros_and_take_no_gradient(name):
    """Padding queries (even NaN ones) give zeros and lse -inf, get zero dq, add nothing to dk/dv."""
    case = Case("nan-padding-queries", q_lengths=(6, 13), bias=(1, 4, 13, 17), window=(None, 4))
    arrays = dict(case_arrays(case))
    q = arrays["q"].copy()
    q[0, :, 6:] = np.nan
    q[0, 1, 8, 2] = np.inf
    arrays["q"] = q
    got = torch_all(case, arrays, name, with_lse=False)
    assert all(np.isfinite(got[key]).all() for key in ("out", "dq", "dk", "dv"))
    assert (got["out"][0, :, 6:] == 0).all() and (got["dq"][0, :, 6:] == 0).all()
    if got["lse"] is not None:
        assert np.isneginf(got["lse"][0, :, 6:]).all() and np.isfinite(got["lse"][0, :, :6]).all()
    assert_close(case, got, reference_all(case, arrays, with_lse=False))


PADDED = {  # kind -> (case, keys that no query sees, per batch)
    "kv_lengths": (Case("pad-kv-lengths", kv_lengths=(5, 0)), [slice(5, None), slice(None)]),
    "key-mask": (Case("pad-key-mask", mask="key", kv_lengths=(17, 12)), None),
    "key-attn-mask-causal-tail": (Case("pad-causal-tail", attn_mask="key", causal=True, sq=9, skv=15), None),
    "alias-window": (Case("pad-alias-window", kv_lengths=(9, 14), alias=True, window=(1, 2), sq=8), None),
}


def _unseen(case, arrays):
    """bool (b, n_kv, skv): keys that no query of the group can see, from the reference's keep."""
    q = arrays["q"]
    kw = dict(attn_mask=merged(arrays), is_causal=case.causal, kv_lengths=arrays.get("kv_lengths"),
              q_lengths=arrays.get("q_lengths"), window=case.window)
    keep, _ = reference._keep(q.shape[:3] + (case.skv,), kw["attn_mask"], kw["kv_lengths"],
                              kw["is_causal"], kw["q_lengths"], kw["window"])
    g = case.n // case.n_kv
    return ~keep.any(2).reshape(case.b, case.n_kv, g, case.skv).any(2)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("kind", list(PADDED))
def test_nan_and_inf_in_padded_keys_change_nothing(kind, name):
    case = PADDED[kind][0]
    arrays = dict(case_arrays(case))
    unseen = _unseen(case, arrays)
    assert unseen.any()
    k, v = arrays["k"].copy(), arrays["v"].copy()
    junk = np.where(np.arange(case.skv) % 2 == 0, np.nan, np.inf)[None, None, :, None]
    k = np.where(unseen[..., None], junk, k)
    v = np.where(unseen[..., None], -junk, v)
    arrays.update(k=k, v=v)
    got = torch_all(case, arrays, name, with_lse=False)
    for key in ("out", "dq", "dk", "dv"):
        assert np.isfinite(got[key]).all(), key
    if got["lse"] is not None:
        assert not np.isnan(got["lse"]).any()
    assert (got["dk"][np.broadcast_to(unseen[..., None], k.shape)] == 0).all()
    assert (got["dv"][np.broadcast_to(unseen[..., None], v.shape)] == 0).all()
    assert_close(case, got, reference_all(case, arrays, with_lse=False))


NAN_CASE = Case("nan-logit", bias=(1, 4, 13, 17), q_lengths=(13, 10))


def _nan_arrays():
    arrays = dict(case_arrays(NAN_CASE))
    bias = arrays["bias"].copy()
    bias.reshape(-1)[3] = 0.5  # no -inf: every key visible, so the reference's NaN pattern is exact
    bias[0, 1, 3, 2] = np.nan  # one visible logit
    arrays["bias"] = bias
    return arrays


@pytest.mark.parametrize("name", [n for n in NAMES if n not in ("sdpa", "sdpa_flash")])
def test_nan_in_a_visible_logit_gives_nan_not_an_empty_row(name):
    """Row 3 of head 1 has a NaN logit: NaN out and NaN lse (not -inf, not zeros), and NaN
    gradients exactly where the reference has them; every other row is finite.
    Not asked of `sdpa`/`sdpa_flash`: torch's CPU flash kernel may drop NaN silently."""
    arrays = _nan_arrays()
    got = torch_all(NAN_CASE, arrays, name, with_lse=False)
    assert np.isnan(got["out"][:, 1, 3]).all()
    assert np.isfinite(np.delete(got["out"], 3, axis=2)).all()
    if got["lse"] is not None:
        assert np.isnan(got["lse"][:, 1, 3]).all()
        assert not np.isinf(got["lse"][:, :, :10]).any()
    for key in ("dv", "dk"):  # every key of kv head 0 saw the NaN row
        assert np.isnan(got[key][:, 0]).all() and np.isfinite(got[key][:, 1]).all()
    assert_close(NAN_CASE, got, reference_all(NAN_CASE, arrays, with_lse=False))


@pytest.mark.parametrize("name", NAMES)
def test_huge_lengths_clamp_without_wrapping(name):
    """int64 2**32 + 2 (int32 would read 2) and 2**40 mean "all"; uint8 255 too."""
    case = Case("huge-lengths", kv_lengths=(2**32 + 2, 7), q_lengths=(2**40, 2**32 + 1), causal=True)
    arrays = case_arrays(case)
    got = torch_all(case, arrays, name)
    assert_close(case, got, reference_all(case, arrays, with_lse=BACKENDS[name].supports_lse))
    q, k, v = (to_torch(case, arrays[x]) for x in "qkv")
    small = torch_ref.attention_forward(q, k, v, backend=name, is_causal=True,
                                        kv_lengths=torch.tensor([255, 7], dtype=torch.uint8),
                                        query_seq_lengths=torch.tensor([200, 255], dtype=torch.uint8))
    assert reference.relative_error(from_torch(case, small), got["out"]) <= TOL["float32"]


# --- routing: what each backend can serve ------------------------------------------------------

def test_every_backend_serves_a_window_or_says_why():
    q = torch.empty(2, 4, 16, 64, device="meta", requires_grad=True)
    for window in (3, (None, 0), (2, None)):
        decision = torch_ref.explain(q, q, q, local_window_size=window, is_causal=True)
        for name, b in BACKENDS.items():
            says = "local_window_size is not supported" in decision.reasons[name]
            assert says == (not b.supports_window), (name, decision.reasons[name])
        assert decision.backend is not None and BACKENDS[decision.backend].supports_window
    for name in ("flash_attn", "sageattention"):
        assert not BACKENDS[name].supports_window
    call = RunContext(device="cuda", grad=True)
    spec = jax_attn.contract.validate(q, q, q, local_window_size=2)
    assert "local_window_size is not supported on CUDA (it needs an attn_mask)" in \
        BACKENDS["sdpa_flash"].reasons(spec, call)


def test_query_lengths_and_unbatched_are_served_by_every_backend():
    """Applied around the backends: no backend may refuse them (nor silently ignore them)."""
    q = torch.empty(4, 16, 64, device="meta")
    decision = torch_ref.explain(q, q, q, query_seq_lengths=torch.tensor(9), is_causal=True)
    base = torch_ref.explain(q[None], q[None], q[None], is_causal=True)
    assert decision.reasons == base.reasons


def test_chunked_skips_chunks_outside_the_window(monkeypatch):
    calls = []
    real = chunked_module._logits

    def counting(plan, q_i, k_j, mask, kv_lengths, qb, kb):
        calls.append((qb, kb))
        return real(plan, q_i, k_j, mask, kv_lengths, qb, kb)

    monkeypatch.setattr(chunked_module, "_logits", counting)
    case = Case("window-skip", window=(2, 1), sq=24, skv=24)
    arrays = case_arrays(case)
    got = torch_all(case, arrays, "chunked")
    assert_close(case, got, reference_all(case, arrays))
    blocks = (24 // 4) * (24 // 6)
    assert 0 < len(calls) < blocks * 2  # forward + backward visit fewer than all pairs
    left, right = 2, 1
    for (q0, q1), (k0, k1) in calls:
        assert k0 <= q1 - 1 + right and k1 - 1 >= q0 - left


# --- errors: the very same types and messages as jax_attn -------------------------------------

def _both(shape=(2, 2, 5, 8)):
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    return jnp.asarray(x), torch.tensor(x)


ERRORS = [
    ("negative kv_lengths", dict(kv_lengths=[-1, 3])),
    ("negative alias", dict(key_value_seq_lengths=[2, -4])),
    ("negative query lengths", dict(query_seq_lengths=[3, -1])),
    ("both kv lengths", dict(kv_lengths=[1, 2], key_value_seq_lengths=[1, 2])),
    ("bad window", dict(local_window_size=-1)),
    ("bad window pair", dict(local_window_size=(1, 2, 3))),
    ("bool bias", dict(bias="bool")),
    ("float mask", dict(mask="float")),
    ("query lengths shape", dict(query_seq_lengths=[1, 2, 3])),
]


@pytest.mark.parametrize("case,extra", ERRORS, ids=[e[0] for e in ERRORS])
def test_cross_framework_errors_are_the_same(case, extra):
    jq, tq = _both()

    def args(framework):
        kw = {}
        for key, val in extra.items():
            if val in ("bool", "float"):
                dt = bool if val == "bool" else np.float32
                kw[key] = jnp.ones((1, 1, 5, 5), dt) if framework == "jax" else torch.ones(
                    1, 1, 5, 5, dtype=torch.bool if val == "bool" else torch.float32)
            elif isinstance(val, list):
                kw[key] = jnp.asarray(val, jnp.int32) if framework == "jax" else torch.tensor(val)
            else:
                kw[key] = val
        return kw

    with pytest.raises((TypeError, ValueError)) as jax_err:
        jax_attn.attention_forward(jq, jq, jq, **args("jax"))
    with pytest.raises((TypeError, ValueError)) as torch_err:
        torch_ref.attention_forward(tq, tq, tq, **args("torch"))
    assert type(torch_err.value) is type(jax_err.value)
    assert str(torch_err.value) == str(jax_err.value)
    if "negative" in case:
        assert ("query_seq_lengths" if "query" in case else "kv_lengths") in str(torch_err.value)


# --- cross-framework: torch_ref and jax_attn on the same inputs --------------------------------

CROSS = [CASES[0], CASES[2], CASES[4], CASES[8], CASES[11], CASES[13]]
JAX_NAMES = [n for n in ("xla", "chunked") if not JAX_BACKENDS[n].unavailable()]


@functools.lru_cache(maxsize=None)
def jax_all(case: Case, jax_name: str, with_lse: bool):
    arrays = case_arrays(case)
    if not with_lse:
        arrays = {**arrays, "d_lse": np.zeros_like(arrays["d_lse"])}
    return _jax_all(case, arrays, jax_name)


def _jax_all(case, arrays, jax_name):
    """out, lse and gradients (q, k, v, bias) from jax_attn, float64 bnsd with the batch axis."""
    dt = case.dtype
    lay = (lambda x: np.swapaxes(x, 1, 2)) if case.layout == "bsnd" else (lambda x: x)  # noqa: E731
    cut = (lambda x: x[0]) if case.unbatched else (lambda x: x)  # noqa: E731
    q, k, v, d_out = (jnp.asarray(cut(lay(arrays[x])), dt) for x in ("q", "k", "v", "d_out"))
    d_lse = jnp.asarray(cut(arrays["d_lse"]), jnp.float32)
    bias = jnp.asarray(arrays["bias"], dt) if "bias" in arrays else None
    kw = dict(is_causal=case.causal, layout=case.layout, local_window_size=case.window, backend=jax_name)
    for key in ("mask", "attn_mask"):
        if key in arrays:
            kw[key] = jnp.asarray(arrays[key])
    if "q_lengths" in arrays:
        kw["query_seq_lengths"] = cut(arrays["q_lengths"])
    if "kv_lengths" in arrays:
        kw["key_value_seq_lengths" if case.alias else "kv_lengths"] = cut(arrays["kv_lengths"])

    def f(q, k, v, bias):
        return jax_attn.attention_forward(q, k, v, bias=bias, return_lse=True, **kw)

    (out, lse), vjp = jax.vjp(f, q, k, v, bias)
    grads = vjp((d_out, jnp.where(jnp.isfinite(lse), d_lse, 0.0)))
    f64 = lambda x: np.asarray(jnp.asarray(x, jnp.float32), np.float64)  # noqa: E731
    back = lambda x: lay(x[None] if case.unbatched else x)  # noqa: E731
    res = dict(out=back(f64(out)), lse=f64(lse)[None] if case.unbatched else f64(lse),
               dq=back(f64(grads[0])), dk=back(f64(grads[1])), dv=back(f64(grads[2])))
    if bias is not None:
        res["dbias"] = f64(grads[3])
    return res


def _jax_serves(case, jax_name):
    arrays = case_arrays(case)
    cut = (lambda x: x[0]) if case.unbatched else (lambda x: x)  # noqa: E731
    shaped = lambda x: jax.ShapeDtypeStruct(cut(x).shape, case.dtype)  # noqa: E731
    spec = jax_attn.contract.validate(*(shaped(arrays[x]) for x in "qkv"), is_causal=case.causal,
                                      local_window_size=case.window)
    return not JAX_BACKENDS[jax_name].reasons(spec)


def assert_agree(case, t, j, jax_name, torch_name):
    tol = TOL[case.dtype]
    for key in ("out", "lse", "dq", "dk", "dv", "dbias"):
        if t.get(key) is None or j.get(key) is None:
            continue
        limit = (2 if key in ("out", "lse") else 4) * (tol if key != "lse" else max(tol, TOL["float32"]))
        err = reference.relative_error(t[key], j[key])
        assert err <= limit, f"{key}: {jax_name} vs {torch_name}: relative difference {err:.2e} > {limit:.0e}"


@pytest.mark.fast_every(3)
@pytest.mark.fast_diagonal  # the fast run: the first three cases, the JAX and torch backends in turn
@pytest.mark.parametrize("torch_name", NAMES)
@pytest.mark.parametrize("jax_name", JAX_NAMES)
@pytest.mark.parametrize("case", [pytest.param(c, id=c.name, marks=() if i < 3 else pytest.mark.slow)
                                  for i, c in enumerate(CROSS)])
def test_cross_framework_new_arguments_agree(case, jax_name, torch_name):
    if not _jax_serves(case, jax_name):
        pytest.skip(f"jax {jax_name} does not serve {case.name}")
    with_lse = BACKENDS[torch_name].supports_lse
    t = torch_all(case, case_arrays(case), torch_name, with_lse=with_lse)
    j = jax_all(case, jax_name, with_lse)
    assert_agree(case, t, j, jax_name, torch_name)


@pytest.mark.parametrize("torch_name", ["naive", pytest.param("chunked", marks=pytest.mark.slow),
                                        pytest.param("sdpa_math", marks=pytest.mark.slow)])
def test_cross_framework_nan_rows_and_padded_keys_agree(torch_name):
    """A NaN logit and NaN/inf at padded keys: the same NaN pattern and finite values in both."""
    case = PADDED["kv_lengths"][0]
    arrays = dict(case_arrays(case))
    unseen = _unseen(case, arrays)
    arrays["k"] = np.where(unseen[..., None], np.nan, arrays["k"])
    arrays["v"] = np.where(unseen[..., None], np.inf, arrays["v"])
    arrays["d_lse"] = np.zeros_like(arrays["d_lse"])
    j = _jax_all(case, arrays, "chunked")
    t = torch_all(case, arrays, torch_name, with_lse=False)
    assert all(np.isfinite(t[key]).all() for key in ("out", "dq", "dk", "dv"))
    assert_agree(case, t, j, "chunked", torch_name)
    arrays = _nan_arrays()
    arrays["d_lse"] = np.zeros_like(arrays["d_lse"])
    j, t = _jax_all(NAN_CASE, arrays, "chunked"), torch_all(NAN_CASE, arrays, torch_name, with_lse=False)
    assert np.isnan(j["out"][:, 1, 3]).all() and np.isnan(j["lse"][:, 1, 3]).all()
    assert_agree(NAN_CASE, t, j, "chunked", torch_name)
