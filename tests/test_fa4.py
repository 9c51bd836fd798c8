"""The `fa4` backend: its declaration, its reasons, the mapping of our arguments onto FA4's, and
(on a Hopper/Blackwell GPU with FA4 installed) forward, lse and gradients vs the float64 reference."""
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_attn
from jax_attn import reference
from jax_attn.backends import BACKENDS, fa4
from jax_attn.backends.base import gpu_compute_capability, platform
from jax_attn.contract import validate

FA4 = BACKENDS["fa4"]


def spec_of(sq=128, skv=128, d=64, dtype=jnp.bfloat16, **kw):
    q = jax.ShapeDtypeStruct((2, 4, sq, d), dtype)
    k = jax.ShapeDtypeStruct((2, 2, skv, d), dtype)
    return validate(q, k, k, **kw)


def test_declaration():
    caps = FA4.capabilities()
    assert caps["platforms"] == ("gpu",)
    assert caps["dtypes"] == ("float16", "bfloat16")
    assert caps["head_dims"] == (8, 256) and caps["head_dim_multiple"] == 8
    assert not caps["bool mask"] and not caps["bias"] and not caps["bias grad"] and not caps["lse grad"]
    assert caps["causal"] and caps["kv_lengths"] and caps["window"] and not caps["forward AD"]
    assert FA4.automatic is True  # routing data decides: unmeasured buckets list it after the others


def test_auto_takes_fa4_only_where_measured(monkeypatch):
    """Without a measured bucket naming it, fa4 is the last candidate before nothing (never first)."""
    from jax_attn import autoselect
    from jax_attn.contract import validate
    x = jnp.zeros((1, 2, 256, 64), jnp.bfloat16)
    spec = validate(x, x, x)
    monkeypatch.setattr(autoselect, "table", lambda mode="train": {})
    order = autoselect.preference(spec)
    assert order.index("fa4") > order.index("chunked")


@pytest.mark.skipif(platform() == "gpu", reason="checks the reasons given off-GPU")
def test_unavailable_off_gpu_names_the_device():
    why = FA4.unavailable()
    assert why and "GPU" in why[0]
    decision = jax_attn.explain(jnp.zeros((1, 2, 16, 64), jnp.bfloat16), jnp.zeros((1, 2, 16, 64), jnp.bfloat16),
                                jnp.zeros((1, 2, 16, 64), jnp.bfloat16))
    assert decision.reasons["fa4"] and decision.backend != "fa4"


def test_missing_packages_are_named(monkeypatch):
    monkeypatch.setattr(fa4, "platform", lambda: "gpu")
    monkeypatch.setattr("jax_attn.backends.base.platform", lambda: "gpu")
    monkeypatch.setattr(fa4, "_importable", lambda name: name != "flash_attn.cute")
    why = FA4.unavailable()
    assert len(why) == 1 and "flash-attn-4" in why[0] and "jax-tvm-ffi" not in why[0]


def test_compute_capability_is_checked(monkeypatch):
    monkeypatch.setattr("jax_attn.backends.base.platform", lambda: "gpu")
    monkeypatch.setattr(fa4, "_importable", lambda name: True)
    for cc, ok in (((8, 0), False), ((9, 0), True), ((10, 0), True), ((12, 0), False)):
        monkeypatch.setattr(fa4, "gpu_compute_capability", lambda cc=cc: cc)
        assert (FA4.unavailable() == []) is ok, cc


def test_shape_reasons():
    assert any("head dim 4" in r for r in FA4.reasons(spec_of(d=4)))
    assert any("head dim 68" in r for r in FA4.reasons(spec_of(d=68)))  # 68 is not a multiple of 8
    assert any("dtype float32" in r for r in FA4.reasons(spec_of(dtype=jnp.float32)))
    mask = jax.ShapeDtypeStruct((2, 1, 1, 128), jnp.bool_)
    assert any("bool attn_mask" in r for r in FA4.reasons(spec_of(attn_mask=mask)))


def test_sm100_head_dims(monkeypatch):
    monkeypatch.setattr(fa4, "platform", lambda: "gpu")
    monkeypatch.setattr(fa4, "gpu_compute_capability", lambda: (10, 0))
    assert any("sm100" in r for r in FA4.reasons(spec_of(d=160)))
    assert not any("sm100" in r for r in FA4.reasons(spec_of(d=128)))
    monkeypatch.setattr(fa4, "gpu_compute_capability", lambda: (9, 0))
    assert not any("sm100" in r for r in FA4.reasons(spec_of(d=160)))


@pytest.mark.parametrize("kw, expected", [
    ({}, fa4.FA4Args(0.125, False, None, None)),
    ({"is_causal": True}, fa4.FA4Args(0.125, True, None, None)),
    ({"local_window_size": (16, 0)}, fa4.FA4Args(0.125, False, 16, 0)),
    ({"local_window_size": (16, 4)}, fa4.FA4Args(0.125, False, 16, 4)),
    ({"local_window_size": (16, 4), "is_causal": True}, fa4.FA4Args(0.125, False, 16, 0)),
    ({"local_window_size": (None, 8)}, fa4.FA4Args(0.125, False, None, 8)),
    ({"scale": 0.5}, fa4.FA4Args(0.5, False, None, None)),
])
def test_argument_mapping(kw, expected):
    spec = spec_of(**kw)
    assert fa4.mapping_reasons(spec) == []
    assert fa4.fa4_arguments(spec) == expected


def test_mapping_declines_what_fa4_aligns_differently():
    # FA4's masks are bottom-right aligned; ours top-left: equal only when sq == skv and no lengths.
    assert any("bottom-right" in r for r in fa4.mapping_reasons(spec_of(sq=64, skv=128, is_causal=True)))
    lengths = jax.ShapeDtypeStruct((2,), jnp.int32)
    assert any("kv_lengths" in r for r in fa4.mapping_reasons(spec_of(is_causal=True, kv_lengths=lengths)))
    assert fa4.mapping_reasons(spec_of(sq=64, skv=128, kv_lengths=lengths)) == []  # no causality: exact
    assert fa4.mapping_reasons(spec_of(sq=64, skv=128)) == []


def _has_fa4_gpu() -> bool:
    return (platform() == "gpu" and (gpu_compute_capability() or (0,))[0] in (9, 10)
            and importlib.util.find_spec("flash_attn") is not None
            and importlib.util.find_spec("flash_attn.cute") is not None
            and importlib.util.find_spec("jax_tvm_ffi") is not None)


@pytest.mark.skipif(not _has_fa4_gpu(), reason="needs an sm90/sm100 GPU with flash-attn-4 and jax-tvm-ffi")
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("case", ["plain", "causal", "gqa", "lengths", "cross", "window", "bsnd"])
def test_matches_reference_on_gpu(dtype, d, case):
    rng = np.random.default_rng(0)
    b, n, n_kv, sq, skv = 2, 4, 4, 256, 256
    kw, layout = {}, "bnsd"
    if case == "causal":
        kw["is_causal"] = True
    if case == "gqa":
        n_kv = 2
    if case == "lengths":
        kw["kv_lengths"] = jnp.array([skv, 77], jnp.int32)
    if case == "cross":
        sq, skv = 192, 77
    if case == "window":
        kw["local_window_size"] = (32, 16)
    if case == "bsnd":
        layout = "bsnd"
    shape = lambda heads, s, dd: (b, heads, s, dd)
    q, k, v, do = (jnp.asarray(rng.standard_normal(shape(h, s, d)), dtype)
                   for h, s in ((n, sq), (n_kv, skv), (n_kv, skv), (n, sq)))
    t = (lambda x: jnp.swapaxes(x, 1, 2)) if layout == "bsnd" else (lambda x: x)

    @jax.jit
    def run(q, k, v, do):
        def f(q, k, v):
            out, lse = jax_attn.attention_forward(q, k, v, backend="fa4", layout=layout, return_lse=True, **kw)
            return out, lse
        out, vjp, lse = jax.vjp(f, q, k, v, has_aux=True)  # lse as aux: not differentiated (it has no gradient)
        return out, lse, vjp(do)

    out, lse, grads = run(t(q), t(k), t(v), t(do))
    out, grads = t(out), [t(g) for g in grads]
    ref_kw = dict(kv_lengths=kw.get("kv_lengths"), is_causal=kw.get("is_causal", False),
                  window=kw.get("local_window_size"))
    ref_out, ref_lse = reference.attention(q, k, v, return_lse=True, **ref_kw)
    ref_grads = reference.attention_vjp(q, k, v, do, **ref_kw)[:3]
    tol = reference.TOLERANCE[jnp.dtype(dtype).name]
    assert reference.relative_error(out, ref_out) < tol
    assert reference.relative_error(lse, ref_lse) < tol
    for name, g, r in zip("qkv", grads, ref_grads):
        assert reference.relative_error(g, r) < 2 * tol, name


def test_backward_at_an_unverified_head_dim_raises():
    """FA4's sm90 backward was wrong at d=40 on the H200: a gradient there must raise, not be wrong."""
    from jax_attn.backends import fa4_kernels
    fa4_kernels.check_backward_head_dim(64)
    fa4_kernels.check_backward_head_dim(128)
    with pytest.raises(ValueError, match="backend='fa4'.*head dim 40"):
        fa4_kernels.check_backward_head_dim(40)


@pytest.mark.parametrize("layout", ["bnsd", "bsnd"])
def test_handlers_hand_either_layout_to_fa4_as_bsnd(monkeypatch, layout):
    """The FFI handlers' bodies, on CPU torch tensors, with a stand-in for FA4's interface that
    computes (b, s, h, d) attention and writes into the buffers it is given: a (b, n, s, d) call
    reaches FA4 as strided (b, s, n, d) views of the same buffers, so results land in place."""
    torch = pytest.importorskip("torch")
    import sys
    import types

    from jax_attn.backends import fa4_kernels

    def attention(q, k, v, scale):  # (b, s, h, d) -> out (b, s, h, d), lse (b, h, s)
        s = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
        lse = torch.logsumexp(s, -1)
        return torch.einsum("bhqk,bkhd->bqhd", torch.softmax(s, -1), v), lse

    def fwd(q, k, v, *, softmax_scale, out, lse, **_):
        assert q.shape[1] == 6 and q.stride(-1) == 1  # (b, s=6, h=3, d): FA4's layout
        o, l_ = attention(q, k, v, softmax_scale)
        out.copy_(o)
        lse.copy_(l_)

    def bwd(q, k, v, out, dout, lse, *, softmax_scale, dq, dk, dv, **_):
        leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
        o, _ = attention(*leaves, softmax_scale)
        for g, x in zip(torch.autograd.grad(o, leaves, dout), (dq, dk, dv)):
            x.copy_(g)

    fake = types.ModuleType("flash_attn.cute.interface")
    fake._flash_attn_fwd, fake._flash_attn_bwd = fwd, bwd
    for name in ("flash_attn", "flash_attn.cute"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "flash_attn.cute.interface", fake)
    args = fa4.FA4Args(softmax_scale=0.5, causal=False, window_size_left=None,
                       window_size_right=None)
    rng = np.random.default_rng(0)
    shape = (2, 3, 6, 4) if layout == "bnsd" else (2, 6, 3, 4)
    q, k, v, do = (torch.tensor(rng.standard_normal(shape), dtype=torch.float64) for _ in range(4))
    out, lse = torch.zeros(shape, dtype=torch.float64), torch.zeros((2, 3, 6), dtype=torch.float64)
    fa4_kernels._fwd_runner(args, False, layout == "bnsd")(q, k, v, out, lse)
    t = (lambda x: np.swapaxes(x, 1, 2)) if layout == "bsnd" else (lambda x: x)
    ref_out, ref_lse = reference.attention(*(t(x.numpy()) for x in (q, k, v)), scale=0.5,
                                           return_lse=True)
    np.testing.assert_allclose(t(out.numpy()), ref_out, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(lse.numpy(), ref_lse, rtol=1e-10, atol=1e-12)
    grads = [torch.zeros(shape, dtype=torch.float64) for _ in range(3)]
    fa4_kernels._bwd_runner(args, False, layout == "bnsd")(q, k, v, out, do, lse, *grads)
    want = reference.attention_vjp(*(t(x.numpy()) for x in (q, k, v, do)), scale=0.5)[:3]
    for g, w in zip(grads, want):
        np.testing.assert_allclose(t(g.numpy()), w, rtol=1e-9, atol=1e-11)
