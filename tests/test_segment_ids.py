"""Packed sequences: `q_segment_ids` / `kv_segment_ids` on every backend of both frameworks.

Query i of sample b sees key j only where `q_segment_ids[b, i] == kv_segment_ids[b, j]`, on top of
every other rule. Each runnable backend is checked against the float64 reference
(`jax_attn.reference`, which compares the ids as given) on outputs, the log-sum-exp and the
gradients of q, k, v (and a float bias) through both the output and the lse; tolerances are
`reference.TOLERANCE[dtype]`, gradients 2x. Every case has a query whose segment has no key (an
empty row: zeros, lse -inf) and a key whose segment has no query, holding NaN: it must reach
nothing. Backends a machine cannot run skip with their reasons; `pallas` (interpret mode here)
skips while the Triton kernel of the build does not take segment ids.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jax_attn
import torch_ref
from jax_attn import reference, routing
from jax_attn.backends import BACKENDS as JAX_BACKENDS
from jax_attn.backends.base import Backend
from jax_attn.cases import numpy_dtype
from jax_attn.contract import validate
from jax_attn.inputs import AttentionInputs
from torch_ref.backends import BACKENDS as TORCH_BACKENDS

TOL = reference.TOLERANCE
EMPTY_ID, LONELY_ID = 7, 9  # a query segment with no key, a key segment with no query

# Chunks that do not divide the lengths, in both frameworks: tails and several chunks.
pytestmark = pytest.mark.small_chunks(8, 12, frameworks=("jax", "torch"))


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    sq: int
    skv: int
    b: int = 2
    n: int = 2
    n_kv: int = 2
    d: int = 16
    dv: int = 16
    ids: str = "packed"  # "packed": contiguous runs (self-attention: one id array); "random"
    causal: bool = False
    window: tuple | None = None
    mask: str = "none"  # "none", "bool" (full), "key" (bool per key), "bias" (float, differentiated)
    kv_lengths: bool = False
    q_lengths: bool = False
    layout: str = "bnsd"
    unbatched: bool = False

    @property
    def bias_grad(self):
        return self.mask == "bias"


CASES = [
    Case("packed self-attention, causal", 33, 33, causal=True),
    Case("random ids, cross-attention", 19, 26, ids="random"),
    Case("packed, window, GQA, bsnd", 30, 30, n=4, n_kv=2, window=(5, 3), layout="bsnd"),
    Case("random ids, bool mask, kv and q lengths", 21, 17, ids="random", mask="bool", kv_lengths=True,
         q_lengths=True),
    Case("packed, bias, causal", 24, 24, mask="bias", causal=True),
    Case("per-key mask, dv differs", 18, 22, ids="random", mask="key", dv=8),
    Case("unbatched, causal", 20, 20, b=1, unbatched=True, causal=True),
]
IDS = [c.name for c in CASES]


def numpy_inputs(case: Case, dtype: str, seed: int = 0):
    """q, k, v (bnsd, float64 holding `dtype`'s values, NaN in the lonely key), the keyword
    arguments as NumPy, and the output and lse cotangents."""
    rng = np.random.default_rng(seed)
    rounded = lambda x: x.astype(numpy_dtype(dtype)).astype(np.float64)  # noqa: E731
    b, n, n_kv = case.b, case.n, case.n_kv
    q = rounded(rng.standard_normal((b, n, case.sq, case.d)))
    k = rounded(rng.standard_normal((b, n_kv, case.skv, case.d)))
    v = rounded(rng.standard_normal((b, n_kv, case.skv, case.dv)))
    if case.ids == "packed":
        q_ids = np.sort(rng.integers(0, 4, (b, case.sq)), -1)
        kv_ids = q_ids.copy() if case.sq == case.skv else np.sort(rng.integers(0, 4, (b, case.skv)), -1)
    else:
        q_ids, kv_ids = rng.integers(0, 3, (b, case.sq)), rng.integers(0, 3, (b, case.skv))
    q_ids[0, -1] = EMPTY_ID
    kv_ids[-1, 0] = LONELY_ID
    k[-1, :, 0] = v[-1, :, 0] = np.nan  # no query sees it: it must not matter
    kw = dict(q_segment_ids=q_ids.astype(np.int32), kv_segment_ids=kv_ids.astype(np.int32),
              is_causal=case.causal, layout=case.layout)
    if case.window is not None:
        kw["local_window_size"] = case.window
    if case.mask == "bool":
        kw["attn_mask"] = rng.random((b, 1, case.sq, case.skv)) < 0.8
    elif case.mask == "key":
        kw["attn_mask"] = rng.random((b, 1, 1, case.skv)) < 0.8
    elif case.mask == "bias":
        kw["attn_mask"] = rounded(rng.standard_normal((1, n, case.sq, case.skv)))
    if case.kv_lengths:
        kw["kv_lengths"] = np.array([case.skv - 3, case.skv], np.int32)
    if case.q_lengths:
        kw["query_seq_lengths"] = np.array([case.sq, case.sq - 4], np.int32)
    d_out = rng.standard_normal((b, n, case.sq, case.dv))
    d_lse = rng.standard_normal((b, n, case.sq))
    return q, k, v, kw, d_out, d_lse


def expected(case, q, k, v, kw, d_out, d_lse):
    """float64 reference: out, lse and the gradients of `sum(out * d_out) + sum(lse * d_lse)`
    (finite lse only) w.r.t. q, k, v (and the bias)."""
    mask = kw.get("attn_mask")
    args = (mask, kw.get("kv_lengths"), case.causal)
    extra = dict(q_lengths=kw.get("query_seq_lengths"), window=case.window,
                 q_segment_ids=kw["q_segment_ids"], kv_segment_ids=kw["kv_segment_ids"])
    out, lse = reference.attention(q, k, v, *args, return_lse=True, **extra)
    dq, dk, dv, ds = reference.attention_vjp(q, k, v, d_out, *args, **extra)
    # The lse's own share: d lse / d logits = p, so dS gains p * d_lse.
    p = reference.probabilities(q, k, *args, **extra)
    g = case.n // case.n_kv
    scale = 1 / np.sqrt(case.d)
    ds_lse = p * d_lse[..., None]
    k_seen = np.nan_to_num(k)  # the lonely key is never seen: p is 0 there
    dq = dq + scale * np.einsum("bnqk,bnkd->bnqd", ds_lse, np.repeat(k_seen, g, axis=1))
    dk_lse = scale * np.einsum("bnqk,bnqd->bnkd", ds_lse, q)
    dk = dk + dk_lse.reshape(case.b, case.n_kv, g, case.skv, case.d).sum(2)
    grads = [dq, dk, dv]
    if case.bias_grad:
        grads.append((ds + ds_lse).sum(0, keepdims=True))  # the bias broadcasts over the batch
    return out, lse, grads


def _layout(x, case):
    """bnsd (batched) NumPy to the case's layout and batching."""
    x = x if case.layout == "bnsd" else np.swapaxes(x, 1, 2)
    return x[0] if case.unbatched else x


def _back(x, case):
    """A result in the case's layout and batching back to batched bnsd float64 NumPy."""
    x = np.asarray(x, np.float64)
    x = x[None] if case.unbatched else x
    return x if case.layout == "bnsd" else np.swapaxes(x, 1, 2)


def _kwargs(case, kw, convert):
    out = {}
    for name, x in kw.items():
        if name in ("q_segment_ids", "kv_segment_ids") and case.unbatched:
            x = x[0]
        out[name] = convert(x) if isinstance(x, np.ndarray) else x
    return out


def run_jax(name, case, dtype, q, k, v, kw, d_out, d_lse, with_lse=True):
    """out, lse (or None) and the gradients, as batched bnsd float64 NumPy."""
    dt = jnp.dtype(dtype)
    arrays = [jnp.asarray(_layout(x, case), dt) for x in (q, k, v)]
    kwargs = _kwargs(case, kw, lambda x: jnp.asarray(x, dt) if x.dtype == np.float64 else jnp.asarray(x))
    bias = kwargs.pop("attn_mask", None)
    if bias is not None and not case.bias_grad:
        kwargs["attn_mask"], bias = bias, None
    d_o, d_l = jnp.asarray(_layout(d_out, case), jnp.float32), jnp.asarray(d_lse[0] if case.unbatched else d_lse)

    def loss(q, k, v, bias):
        extra = {} if bias is None else {"attn_mask": bias}
        res = jax_attn.attention_forward(q, k, v, backend=name, return_lse=with_lse, **kwargs, **extra)
        out, lse = res if with_lse else (res, None)
        total = jnp.sum(out.astype(jnp.float32) * d_o)
        if with_lse:
            total = total + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0) * d_l)
        return total, (out, lse)

    grads, (out, lse) = jax.grad(loss, argnums=(0, 1, 2, 3), has_aux=True)(*arrays, bias)
    grads = [_back(g.astype(jnp.float32), case) for g in grads[:3]] + (
        [np.asarray(grads[3], np.float64)] if case.bias_grad else [])
    lse = None if lse is None else np.asarray(lse, np.float64)
    if lse is not None and case.unbatched:
        lse = lse[None]
    return _back(out.astype(jnp.float32), case), lse, grads


TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def run_torch(name, case, dtype, q, k, v, kw, d_out, d_lse, with_lse=True):
    dt = TORCH_DTYPES[dtype]
    arrays = [torch.tensor(_layout(x, case), dtype=dt).requires_grad_() for x in (q, k, v)]
    kwargs = _kwargs(case, kw, lambda x: torch.tensor(x, dtype=dt) if x.dtype == np.float64 else torch.tensor(x))
    bias = kwargs.get("attn_mask") if case.bias_grad else None
    if bias is not None:
        bias.requires_grad_()
    why = torch_ref.explain(*arrays, backend=name, return_lse=with_lse, **kwargs).reasons[name]
    if why:
        pytest.skip(f"{name} declines this case: {'; '.join(why)}")
    res = torch_ref.attention_forward(*arrays, backend=name, return_lse=with_lse, **kwargs)
    out, lse = res if with_lse else (res, None)
    total = (out.float() * torch.tensor(_layout(d_out, case), dtype=torch.float32)).sum()
    if with_lse:
        d_l = torch.tensor(d_lse[0] if case.unbatched else d_lse, dtype=torch.float32)
        total = total + (torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse)) * d_l).sum()
    total.backward()
    grads = [_back(x.grad.float().numpy(), case) for x in arrays]
    if bias is not None:
        grads.append(bias.grad.double().numpy())
    lse = None if lse is None else lse.detach().double().numpy()
    if lse is not None and case.unbatched:
        lse = lse[None]
    return _back(out.detach().float().numpy(), case), lse, grads


def assert_close(got, want, dtype, what):
    out, lse, grads = got
    ref_out, ref_lse, ref_grads = want
    tol = TOL[dtype]
    err = reference.relative_error(out, ref_out)
    assert err <= tol, f"{what} out: relative error {err:.2e} > {tol:.0e}"
    if lse is not None:
        err = reference.relative_error(lse, ref_lse)
        assert err <= tol, f"{what} lse: relative error {err:.2e} > {tol:.0e}"
    assert len(grads) == len(ref_grads)
    for label, g, r in zip(("dq", "dk", "dv", "dbias"), grads, ref_grads):
        err = reference.relative_error(g, r)
        assert err <= 2 * tol, f"{what} {label}: relative error {err:.2e} > {2 * tol:.0e}"


# (backend, return the lse?): xla without the lse runs jax.nn with the ids folded into its mask;
# with it, the jnp softmax that returns a float32 lse.
JAX_RUNS = [("naive", True), ("xla", True), ("xla", False), ("chunked", True), ("cudnn", True),
            ("cudnn", False), ("pallas", True), ("tpu", False)]  # tpu: its lse has no gradient


def _fast(run: int, case: int, dtype: str) -> bool:
    """The fast run: each backend on every third case in float32 (shifted per backend, so every
    case runs on several backends) and once in bfloat16; the rest is `slow`."""
    if dtype == "bfloat16":
        return case == run % len(CASES)
    return case % 3 == run % 3


def _jax_params():
    return [pytest.param(name, with_lse, case, dtype,
                         id=f"{name}{'' if with_lse else '-nolse'}-{case.name}-{dtype}",
                         marks=() if _fast(r, i, dtype) else pytest.mark.slow)
            for r, (name, with_lse) in enumerate(JAX_RUNS) for i, case in enumerate(CASES)
            for dtype in ("float32", "bfloat16")]


def _skip_unless_jax_serves(name, case, dtype):
    backend = JAX_BACKENDS[name]
    if backend.unavailable():
        pytest.skip(f"{name}: {'; '.join(backend.unavailable())}")
    if name == "pallas" and not backend.supports_segment_ids:
        pytest.skip("pallas: the Triton kernel (jax_attn/kernels/flash_attention.py) does not take "
                    "q_segment_ids/kv_segment_ids yet")
    q, k, v, kw, _, _ = numpy_inputs(case, dtype)
    shaped = lambda x: jax.ShapeDtypeStruct(_layout(x, case).shape, dtype)  # noqa: E731
    spec = validate(shaped(q), shaped(k), shaped(v), **_kwargs(case, kw, lambda x: x))
    why = backend.reasons(spec)
    if why:
        pytest.skip(f"{name} declines this case: {'; '.join(why)}")


@pytest.mark.fast_every(12)
@pytest.mark.parametrize("name,with_lse,case,dtype", _jax_params())
def test_jax_backend_matches_reference(name, with_lse, case, dtype):
    _skip_unless_jax_serves(name, case, dtype)
    q, k, v, kw, d_out, d_lse = numpy_inputs(case, dtype)
    want = expected(case, q, k, v, kw, d_out, d_lse if with_lse else 0 * d_lse)
    got = run_jax(name, case, dtype, q, k, v, kw, d_out, d_lse, with_lse)
    assert_close(got, want, dtype, name)
    assert np.all(np.isfinite(got[0])), "the NaN of the key no query sees reached the output"


TORCH_RUNS = [(n, TORCH_BACKENDS[n].supports_lse) for n in TORCH_BACKENDS
              if TORCH_BACKENDS[n].supports_segment_ids]


def _torch_params():
    return [pytest.param(name, with_lse, case, dtype, id=f"{name}-{case.name}-{dtype}",
                         marks=() if _fast(r, i, dtype) else pytest.mark.slow)
            for r, (name, with_lse) in enumerate(TORCH_RUNS) for i, case in enumerate(CASES)
            for dtype in ("float32", "bfloat16")]


@pytest.mark.parametrize("name,with_lse,case,dtype", _torch_params())
def test_torch_backend_matches_reference(name, with_lse, case, dtype):
    backend = TORCH_BACKENDS[name]
    if backend.unavailable():
        pytest.skip(f"{name}: {'; '.join(backend.unavailable())}")
    q, k, v, kw, d_out, d_lse = numpy_inputs(case, dtype)
    want = expected(case, q, k, v, kw, d_out, d_lse if with_lse else 0 * d_lse)
    got = run_torch(name, case, dtype, q, k, v, kw, d_out, d_lse, with_lse)
    assert_close(got, want, dtype, name)
    assert np.all(np.isfinite(got[0]))


def test_every_backend_declares_segment_ids():
    """The backends that serve segment ids, in both frameworks; the rest decline with the reason."""
    assert {n for n, b in JAX_BACKENDS.items() if b.supports_segment_ids} >= {"naive", "xla", "chunked", "cudnn", "tpu"}
    assert {n for n, b in TORCH_BACKENDS.items() if b.supports_segment_ids} == {
        "sdpa", "sdpa_math", "sdpa_flash", "sdpa_efficient", "sdpa_cudnn", "chunked", "naive"}
    for b in (*JAX_BACKENDS.values(), *TORCH_BACKENDS.values()):
        assert b.capabilities()["segment ids"] == b.supports_segment_ids


# -- arguments --------------------------------------------------------------------------------

def _small(framework):
    rng = np.random.default_rng(1)
    q, k, v = (rng.standard_normal(s).astype(np.float32) for s in ((2, 2, 6, 8), (2, 2, 5, 8), (2, 2, 5, 8)))
    conv = jnp.asarray if framework == "jax" else torch.tensor
    return [conv(x) for x in (q, k, v)], conv


BAD = [
    (dict(q_segment_ids=np.zeros((2, 6), np.int32)), ValueError,
     "q_segment_ids was given without kv_segment_ids"),
    (dict(kv_segment_ids=np.zeros((2, 5), np.int32)), ValueError,
     "kv_segment_ids was given without q_segment_ids"),
    (dict(q_segment_ids=np.zeros((2, 5), np.int32), kv_segment_ids=np.zeros((2, 5), np.int32)), ValueError,
     r"q_segment_ids must have shape \(b, sq\) = \(2, 6\), got \(2, 5\)"),
    (dict(q_segment_ids=np.zeros((2, 6), np.int32), kv_segment_ids=np.zeros((5,), np.int32)), ValueError,
     r"kv_segment_ids must have shape \(b, skv\) = \(2, 5\), got \(5\)"),
    (dict(q_segment_ids=np.zeros((2, 6), np.int32), kv_segment_ids=np.zeros((2, 5), np.float32)), TypeError,
     "kv_segment_ids must have an integer dtype, got float32"),
    (dict(q_segment_ids=np.zeros((2, 6), bool), kv_segment_ids=np.zeros((2, 5), np.int32)), TypeError,
     "q_segment_ids must have an integer dtype, got bool"),
]


@pytest.mark.parametrize("framework", ["jax", "torch"])
@pytest.mark.parametrize("bad,error,message", BAD)
def test_bad_segment_ids_raise_naming_the_argument(framework, bad, error, message):
    (q, k, v), conv = _small(framework)
    kw = {name: conv(x) for name, x in bad.items()}
    api = jax_attn if framework == "jax" else torch_ref
    with pytest.raises(error, match=message):
        api.attention_forward(q, k, v, **kw)
    with pytest.raises(error, match=message):
        api.explain(q, k, v, **kw)


def test_segment_ids_that_are_not_arrays_raise():
    (q, k, v), _ = _small("jax")
    with pytest.raises(TypeError, match="q_segment_ids must be an integer array of shape"):
        jax_attn.attention_forward(q, k, v, q_segment_ids=[0] * 6, kv_segment_ids=jnp.zeros((2, 5), int))
    (q, k, v), _ = _small("torch")
    with pytest.raises(TypeError, match="kv_segment_ids must be a torch.Tensor"):
        torch_ref.attention_forward(q, k, v, q_segment_ids=torch.zeros(2, 6, dtype=torch.int64),
                                    kv_segment_ids=np.zeros((2, 5), np.int64))


def test_unbatched_shapes():
    (q, k, v), _ = _small("jax")
    q, k, v = q[0], k[0], v[0]
    with pytest.raises(ValueError, match=r"q_segment_ids must have shape \(sq,\) = \(6,\), got \(2, 6\)"):
        jax_attn.attention_forward(q, k, v, q_segment_ids=jnp.zeros((2, 6), jnp.int32),
                                   kv_segment_ids=jnp.zeros((5,), jnp.int32))
    spec = validate(q, k, v, q_segment_ids=jnp.zeros((1, 6), jnp.int32), kv_segment_ids=jnp.zeros((5,), jnp.int32))
    assert spec.has_segment_ids and spec.can_have_empty_rows


# -- routing and reasons -------------------------------------------------------------------------

class _NoSegments(Backend):
    name = "no_segments"


def test_reason_and_explain():
    (q, k, v), _ = _small("jax")
    ids = dict(q_segment_ids=jnp.zeros((2, 6), jnp.int32), kv_segment_ids=jnp.zeros((2, 5), jnp.int32))
    spec = validate(q, k, v, **ids)
    assert "q_segment_ids/kv_segment_ids are not supported" in _NoSegments().reasons(spec)
    assert not validate(q, k, v).has_segment_ids
    decision = jax_attn.explain(q, k, v, **ids)
    assert decision.backend is not None and not decision.reasons[decision.backend]
    for name in ("naive", "xla", "chunked"):
        assert decision.reasons[name] == []
    (tq, tk, tv), _ = _small("torch")
    tids = dict(q_segment_ids=torch.zeros(2, 6, dtype=torch.int64), kv_segment_ids=torch.zeros(2, 5, dtype=torch.int64))
    decision = torch_ref.explain(tq, tk, tv, **tids)
    for name in ("flash_attn", "xformers", "sageattention"):  # the external packages cannot take them
        assert "q_segment_ids/kv_segment_ids are not supported" in decision.reasons[name]
        assert "q_segment_ids/kv_segment_ids are not supported" in str(decision)
    with pytest.raises(jax_attn.BackendError, match="q_segment_ids/kv_segment_ids are not supported"):
        torch_ref.attention_forward(tq, tk, tv, backend="flash_attn", **tids)


def test_mosaic_declines_segment_ids(monkeypatch):
    """On Hopper, `pallas` sends calls with segment ids to the Triton kernel, and says why."""
    monkeypatch.setattr(routing, "interpreting", lambda: False)
    monkeypatch.setattr(routing, "gpu_compute_capability", lambda: (9, 0))
    q = k = v = jax.ShapeDtypeStruct((1, 8, 4096, 64), jnp.bfloat16)
    ids = jax.ShapeDtypeStruct((1, 4096), jnp.int32)
    for mode in ("auto", "mosaic"):
        monkeypatch.setenv(routing.ENV_PALLAS_KERNEL, mode)
        kernel, why = routing.pallas_kernel(validate(q, k, v, q_segment_ids=ids, kv_segment_ids=ids))
        assert kernel == "triton" and "q_segment_ids/kv_segment_ids are served by the Triton kernels" in why


# -- ids, jit and padding -------------------------------------------------------------------------

def _ids_call(q_ids, kv_ids, name="naive"):
    rng = np.random.default_rng(3)
    q, k, v = (rng.standard_normal((1, 2, s, 8)) for s in (q_ids.shape[-1], kv_ids.shape[-1], kv_ids.shape[-1]))
    ref = reference.attention(q, k, v, q_segment_ids=np.asarray(q_ids, object).reshape(1, -1),
                              kv_segment_ids=np.asarray(kv_ids, object).reshape(1, -1))
    out = jax_attn.attention_forward(*(jnp.asarray(x, jnp.float32) for x in (q, k, v)), backend=name,
                                     q_segment_ids=q_ids, kv_segment_ids=kv_ids)
    return np.asarray(out, np.float64), ref


@pytest.mark.parametrize("q_ids,kv_ids", [
    # int64 ids past int32: a cast (what jnp.asarray does with x64 disabled) would merge 0 and 2**32
    (np.array([[0, 2**32, 2**32, 5]], np.int64), np.array([[2**32, 0, 0, 5, 2**40]], np.int64)),
    # uint64 beyond int64 against int64: compared as the numbers they are
    (np.array([[2**64 - 1, 1, 1]], np.uint64), np.array([[-1, 1, 2**63 - 1]], np.int64)),
    # one uint32 dtype: cast one to one
    (jnp.array([[2**32 - 1, 3, 3]], jnp.uint32), jnp.array([[2**32 - 1, 2**31 - 1, 3]], jnp.uint32)),
])
def test_ids_compare_exactly_whatever_their_dtype(q_ids, kv_ids):
    out, ref = _ids_call(q_ids, kv_ids)
    assert reference.relative_error(out, ref) <= TOL["float32"]


@pytest.mark.parametrize("name", ["naive", "xla", "chunked"])
def test_under_jit(name):
    case = CASES[0]
    q, k, v, kw, d_out, _ = numpy_inputs(case, "float32")
    want = reference.attention(q, k, v, is_causal=True, q_segment_ids=kw["q_segment_ids"],
                               kv_segment_ids=kw["kv_segment_ids"])
    f = jax.jit(lambda q, k, v, qi, ki: jax_attn.attention_forward(
        q, k, v, is_causal=True, backend=name, q_segment_ids=qi, kv_segment_ids=ki))
    out = f(*(jnp.asarray(x, jnp.float32) for x in (q, k, v)), jnp.asarray(kw["q_segment_ids"]),
            jnp.asarray(kw["kv_segment_ids"]))
    assert reference.relative_error(np.asarray(out, np.float64), want) <= TOL["float32"]


@pytest.mark.parametrize("framework", ["jax", "torch"])
def test_padding_zeroed_is_a_new_object_and_zeroes_keys_of_segments_without_queries(framework):
    case = CASES[1]
    q, k, v, kw, _, _ = numpy_inputs(case, "float32")
    if framework == "jax":
        conv = lambda x: jnp.asarray(x, jnp.float32) if x.dtype == np.float64 else jnp.asarray(x)  # noqa: E731
        inputs = AttentionInputs.build(*(conv(x) for x in (q, k, v)), local_blocks=True,
                                       **{n: conv(x) for n, x in kw.items() if isinstance(x, np.ndarray)})
    else:
        from torch_ref.inputs import AttentionInputs as TorchInputs
        conv = lambda x: torch.tensor(x, dtype=torch.float32) if x.dtype == np.float64 else torch.tensor(x)  # noqa: E731
        inputs = TorchInputs.build(*(conv(x) for x in (q, k, v)),
                                   **{n: conv(x) for n, x in kw.items() if isinstance(x, np.ndarray)})
    zeroed = inputs.padding_zeroed()
    assert zeroed is not inputs
    assert np.isnan(np.asarray(inputs.k[-1, :, 0])).all(), "padding_zeroed changed its input"
    assert (np.asarray(zeroed.k[-1, :, 0]) == 0).all() and (np.asarray(zeroed.v[-1, :, 0]) == 0).all()
    seen = np.asarray(zeroed.k) != 0  # every other key is some query's: left as it is
    assert seen.sum() == seen.size - case.n_kv * case.d


# -- across frameworks ------------------------------------------------------------------------------

CROSS = [("naive", "naive"), ("xla", "sdpa"), ("chunked", "chunked")]


@pytest.mark.fast_every(7)
@pytest.mark.cross_framework
@pytest.mark.parametrize("jax_name,torch_name,case", [
    pytest.param(j, t, c, id=f"{j}-{t}-{c.name}", marks=() if i % len(CROSS) == r else pytest.mark.slow)
    for r, (j, t) in enumerate(CROSS) for i, c in enumerate(CASES)])
def test_cross_framework_segment_ids_agree(jax_name, torch_name, case):
    """Both frameworks on the very same inputs; each is within 1x (2x for gradients) of the
    reference, so they may differ by 2x (4x) of it."""
    _skip_unless_jax_serves(jax_name, case, "float32")
    with_lse = TORCH_BACKENDS[torch_name].supports_lse
    q, k, v, kw, d_out, d_lse = numpy_inputs(case, "float32", seed=5)
    got_jax = run_jax(jax_name, case, "float32", q, k, v, kw, d_out, d_lse, with_lse)
    got_torch = run_torch(torch_name, case, "float32", q, k, v, kw, d_out, d_lse, with_lse)
    tol = TOL["float32"]
    assert reference.relative_error(got_torch[0], got_jax[0]) <= 2 * tol
    if with_lse:
        assert reference.relative_error(got_torch[1], got_jax[1]) <= 2 * tol
    for g_t, g_j in zip(got_torch[2], got_jax[2]):
        assert reference.relative_error(g_t, g_j) <= 4 * tol


@pytest.mark.parametrize("seed", range(3))
def test_keys_with_query_matches_brute_force(seed):
    """The sort-and-search set test (which keys a query of their segment holds) against the
    pairwise comparison: unsorted ids, ids far apart, query lengths of 0, some and all."""
    from jax_attn.masking import keys_with_query
    rng = np.random.default_rng(seed)
    b, sq, skv = 3, 37, 53
    q_ids = rng.choice([-2**31, -5, 0, 3, 7, 2**31 - 1], (b, sq)).astype(np.int32)
    kv_ids = rng.choice([-2**31, -5, 0, 3, 7, 8, 2**31 - 1], (b, skv)).astype(np.int32)
    for q_lengths in (None, np.array([0, 11, sq], np.int32)):
        got = np.asarray(keys_with_query(jnp.asarray(q_ids), jnp.asarray(kv_ids),
                                         None if q_lengths is None else jnp.asarray(q_lengths)))
        real = np.ones((b, sq), bool) if q_lengths is None else np.arange(sq) < q_lengths[:, None]
        want = ((q_ids[:, :, None] == kv_ids[:, None, :]) & real[:, :, None]).any(1)
        np.testing.assert_array_equal(got, want)
