"""The MaxDiffusion kernel adapter, against the float64 reference, with inputs shaped as
MaxDiffusion's attention dispatch sends them.

MaxDiffusion is not on PyPI, so CI cannot install it. `FakeAttentionFlax` below is our own
stand-in for the part of `maxdiffusion.models.attention_flax` that the adapter touches: a
`KERNEL_REGISTRY` dict and an `_apply_attention(query, key, value, heads=..., attention_kernel=...,
...)` that casts a `[B, K]` keep mask to bool, builds the `context` dict and calls the registered
kernel (what MaxDiffusion does for non-dot-product kernels as of August 2026). The layouts are
the two MaxDiffusion uses: heads merged `(b, s, heads*d)` (projection output) and heads split
`(b, heads, s, d)` (`FlaxWanAttention` after RoPE); outputs are `(b, sq, heads*d)`.

Multi-device cases use 4 of the 8 simulated CPU devices (tests/conftest.py) on a mesh with
MaxDiffusion's axis names (data, fsdp, context, tensor) and logical axis rules like those its
config installs per kernel name. Tolerance: `reference.TOLERANCE["float32"]`, gradients 2x, as in
test_parallel.
"""
from __future__ import annotations

import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

import jax_attn.adapters.maxdiffusion as jam
from jax_attn import reference

TOL = reference.TOLERANCE["float32"]

# Logical names, as MaxDiffusion's common_types spells them.
BATCH, D_KV = "activation_batch", "activation_kv"
SELF_Q = ("activation_batch", "activation_self_attn_heads", "activation_self_attn_q_length", D_KV)
SELF_KV = ("activation_batch", "activation_self_attn_heads", "activation_self_attn_kv_length", D_KV)
CROSS_Q = ("activation_batch", "activation_cross_attn_heads", "activation_cross_attn_q_length", D_KV)
CROSS_KV = ("activation_batch", "activation_cross_attn_heads", "activation_cross_attn_kv_length", D_KV)
BASE_RULES = [("activation_batch", ("data", "fsdp")), ("activation_heads", "tensor")]
# Queries on `context`, k/v whole (the rules for kernel names without "ring"/"ulysses").
SEQ_RULES = BASE_RULES + [("activation_self_attn_heads", "tensor"), ("activation_self_attn_q_length", "context"),
                          ("activation_self_attn_kv_length", None), ("activation_cross_attn_heads", "tensor"),
                          ("activation_cross_attn_q_length", "context"), ("activation_cross_attn_kv_length", None)]
# q and k/v lengths on `context` (names with "ring"/"ulysses").
SP_RULES = BASE_RULES + [("activation_self_attn_heads", "tensor"), ("activation_self_attn_q_length", "context"),
                         ("activation_self_attn_kv_length", "context"), ("activation_cross_attn_heads", "tensor"),
                         ("activation_cross_attn_q_length", "context"),
                         ("activation_cross_attn_kv_length", "context")]


class FakeAttentionFlax(types.ModuleType):
    """Our stand-in for maxdiffusion.models.attention_flax's kernel registry and dispatch."""

    def __init__(self, with_registry=True):
        super().__init__("fake_maxdiffusion_attention_flax")
        if with_registry:
            self.KERNEL_REGISTRY = {"flash": lambda *a: "theirs"}
            self._apply_attention = self._dispatch
        else:  # a release before the registry: unknown names raise
            def _apply_attention(query, key, value, **kw):
                if kw["attention_kernel"] == "flash":
                    return "theirs"
                raise ValueError(f"Unexpected attention kernel {kw['attention_kernel']}")
            self._apply_attention = _apply_attention

    def _dispatch(self, query, key, value, *, heads, attention_kernel, scale, mesh=None,
                  axis_names_q=None, axis_names_kv=None, attention_mask=None, is_causal=False, **other):
        if attention_mask is not None:
            attention_mask = attention_mask.astype(jnp.bool_)
        context = dict(other, heads=heads, scale=scale, mesh=mesh, axis_names_q=axis_names_q,
                       axis_names_kv=axis_names_kv, attention_mask=attention_mask, is_causal=is_causal,
                       flash_block_sizes=None, dtype=query.dtype, mask_padding_tokens=True,
                       residual_checkpoint_name=None, dim_head=None)
        return self.KERNEL_REGISTRY[attention_kernel](query, key, value, context)


def rand(rng, *shape):
    return jnp.asarray(rng.standard_normal(shape), jnp.float32)


def to_bnsd(x, heads, layout):
    """Our float64 copy in (b, n, s, d) from MaxDiffusion's layouts."""
    x = np.asarray(x, np.float64)
    if layout == "split":
        return x
    b, s, w = x.shape
    return x.reshape(b, s, heads, w // heads).transpose(0, 2, 1, 3)


def merged(out_bnsd):
    b, n, s, d = out_bnsd.shape
    return out_bnsd.transpose(0, 2, 1, 3).reshape(b, s, n * d)


def make_inputs(rng, layout, b=2, heads=4, kv_heads=None, sq=37, skv=37, d=8):
    kv_heads = heads if kv_heads is None else kv_heads
    if layout == "split":
        return rand(rng, b, heads, sq, d), rand(rng, b, kv_heads, skv, d), rand(rng, b, kv_heads, skv, d)
    return rand(rng, b, sq, heads * d), rand(rng, b, skv, kv_heads * d), rand(rng, b, skv, kv_heads * d)


def check(fake, name, q, k, v, heads, layout, mask=None, is_causal=False, scale=0.3, rules=(), mesh=None,
          axis_names=(SELF_Q, SELF_KV), seed=0):
    """Forward and q/k/v gradients through the fake dispatch vs the float64 reference."""
    if layout == "split":
        n_kv, sq, dv = k.shape[1], q.shape[2], v.shape[-1]
    else:
        n_kv, sq = k.shape[-1] // (q.shape[-1] // heads), q.shape[1]
        dv = v.shape[-1] // n_kv
    d_out_shape = (q.shape[0], sq, heads * dv)
    d_out = rand(np.random.default_rng(seed), *d_out_shape)

    def loss(q, k, v):
        out = fake._apply_attention(q, k, v, heads=heads, attention_kernel=name, scale=scale, mesh=mesh,
                                    axis_names_q=axis_names[0], axis_names_kv=axis_names[1],
                                    attention_mask=mask, is_causal=is_causal)
        return jnp.sum(out * d_out), out

    with nn.logical_axis_rules(rules):  # read at trace time, as in MaxDiffusion
        grads, out = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    assert out.shape == d_out_shape and out.dtype == q.dtype
    qn, kn, vn = to_bnsd(q, heads, layout), to_bnsd(k, n_kv, layout), to_bnsd(v, n_kv, layout)
    ref_mask = None if mask is None else (np.asarray(mask) != 0)[:, None, None, :]
    ref = reference.attention(qn, kn, vn, ref_mask, None, is_causal, scale)
    assert reference.relative_error(out, merged(ref)) <= TOL
    don = to_bnsd(d_out, heads, "merged")
    ref_grads = reference.attention_vjp(qn, kn, vn, don, ref_mask, None, is_causal, scale)
    for nm, g, r, n in zip("qkv", grads, ref_grads, (heads, n_kv, n_kv)):
        err = reference.relative_error(to_bnsd(g, n, layout), r)
        assert err <= 2 * TOL, f"d{nm}: relative error {err:.2e}"


def keep(rng, b, skv):
    m = rng.random((b, skv)) < 0.6
    m[:, 0] = True
    return jnp.asarray(m)


def mesh4(shape):
    if len(jax.devices()) < 4:
        pytest.skip("needs 4 devices (XLA_FLAGS=--xla_force_host_platform_device_count=4 or more)")
    return Mesh(np.array(jax.devices()[:4]).reshape(shape), ("data", "fsdp", "context", "tensor"))


@pytest.fixture
def fake():
    f = FakeAttentionFlax()
    assert jam.register(module=f, backend="naive") == ["jax_attn", "jax_attn_ring", "jax_attn_ulysses"]
    return f


@pytest.fixture
def plans(monkeypatch):
    """Records which parallel context the kernel chose ("sp:<method>" or "local:<query_axis>")."""
    seen = []
    sp, local = jam.sequence_parallel, jam.shard_local

    def spy_sp(mesh, axis, method, **kw):
        seen.append(f"sp:{method}:{axis}")
        return sp(mesh, axis, method, **kw)

    def spy_local(mesh, **kw):
        seen.append(f"local:{kw.get('query_axis')}")
        return local(mesh, **kw)

    monkeypatch.setattr(jam, "sequence_parallel", spy_sp)
    monkeypatch.setattr(jam, "shard_local", spy_local)
    return seen


# ---- one device ------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["merged", "split"])
@pytest.mark.parametrize("case", ["self", "causal", "cross_mask", "gqa"])
def test_single_device_layouts(fake, layout, case):
    rng = np.random.default_rng(list(("self", "causal", "cross_mask", "gqa")).index(case))
    kw = dict(kv_heads=2) if case == "gqa" else dict(sq=37, skv=11) if case == "cross_mask" else {}
    q, k, v = make_inputs(rng, layout, **kw)
    mask = keep(rng, 2, 11) if case == "cross_mask" else None
    check(fake, "jax_attn", q, k, v, 4, layout, mask=mask, is_causal=case == "causal")


def test_mask_batch_one_and_integer(fake):
    """A `[1, K]` integer keep mask broadcasts over the batch."""
    rng = np.random.default_rng(5)
    q, k, v = make_inputs(rng, "merged", sq=20, skv=9)
    mask = jnp.asarray(np.array([[1, 0, 1, 1, 0, 1, 1, 1, 0]], np.int32))
    check(fake, "jax_attn", q, k, v, 4, "merged", mask=mask)


# ---- four devices ----------------------------------------------------------------------------
@pytest.mark.parametrize("name,rules,shape,layout,plan", [
    # default name, config's rules for it: queries split on context, k/v whole
    ("jax_attn", SEQ_RULES, (1, 1, 4, 1), "merged", "local:context"),
    ("jax_attn_ulysses", SP_RULES, (1, 1, 4, 1), "split", "sp:ulysses:context"),
    ("jax_attn_ring", SP_RULES, (1, 1, 4, 1), "merged", "sp:ring:context"),
    # 4 heads over context 2 x tensor 2: 2 heads per tensor shard divide over context -> Ulysses
    ("jax_attn", SP_RULES, (1, 1, 2, 2), "split", "sp:ulysses:context"),
    # data 2 x context 2
    ("jax_attn_ring", SP_RULES, (2, 1, 2, 1), "split", "sp:ring:context"),
])
@pytest.mark.fast_every(3)
def test_mesh_self_attention(fake, plans, name, rules, shape, layout, plan):
    rng = np.random.default_rng(list(shape))
    q, k, v = make_inputs(rng, layout, sq=37, skv=37)  # 37: not divisible by the axis, padded
    check(fake, name, q, k, v, 4, layout, rules=rules, mesh=mesh4(shape))
    assert plans == [plan]


def test_auto_falls_back_to_ring_when_heads_do_not_divide(fake, plans):
    rng = np.random.default_rng(7)
    q, k, v = make_inputs(rng, "merged", heads=6, sq=21, skv=21)
    check(fake, "jax_attn", q, k, v, 6, "merged", rules=SP_RULES, mesh=mesh4((1, 1, 4, 1)))
    assert plans == ["sp:ring:context"]


def test_ulysses_by_name_raises_when_heads_do_not_divide(fake):
    rng = np.random.default_rng(7)
    q, k, v = make_inputs(rng, "merged", heads=6, sq=21, skv=21)
    with pytest.raises(ValueError, match="ring"):
        check(fake, "jax_attn_ulysses", q, k, v, 6, "merged", rules=SP_RULES, mesh=mesh4((1, 1, 4, 1)))


@pytest.mark.parametrize("name", ["jax_attn", "jax_attn_ring"])
def test_mesh_cross_attention_replicates_kv(fake, plans, name):
    """Text/image cross-attention: queries split over context, k/v (and the keep mask) whole,
    even where the rules put the k/v length on context too."""
    rng = np.random.default_rng(8)
    q, k, v = make_inputs(rng, "merged", sq=37, skv=13)
    check(fake, name, q, k, v, 4, "merged", mask=keep(rng, 2, 13), rules=SP_RULES, mesh=mesh4((1, 1, 4, 1)),
          axis_names=(CROSS_Q, CROSS_KV))
    assert plans == ["local:context"]


def test_mesh_causal_with_only_queries_on_context(fake, plans):
    rng = np.random.default_rng(9)
    q, k, v = make_inputs(rng, "split", sq=30, skv=30)
    check(fake, "jax_attn", q, k, v, 4, "split", is_causal=True, rules=SEQ_RULES, mesh=mesh4((1, 1, 4, 1)))
    assert plans == ["sp:ulysses:context"]


def test_batch_and_heads_only(fake, plans):
    """No sequence axis: batch over data, heads over tensor, each device its own shard."""
    rng = np.random.default_rng(10)
    q, k, v = make_inputs(rng, "merged", sq=19, skv=7)
    check(fake, "jax_attn", q, k, v, 4, "merged", mask=keep(rng, 2, 7), rules=BASE_RULES,
          mesh=mesh4((2, 1, 1, 2)), axis_names=((BATCH, "activation_heads", None, D_KV),) * 2)
    assert plans == ["local:None"]


def test_batch_that_does_not_divide_is_left_unsplit(fake, plans):
    rng = np.random.default_rng(11)
    q, k, v = make_inputs(rng, "merged", b=3, sq=16, skv=16)
    check(fake, "jax_attn_ring", q, k, v, 4, "merged", rules=SP_RULES, mesh=mesh4((2, 1, 2, 1)))
    assert plans == ["sp:ring:context"]


# ---- errors and registration ----------------------------------------------------------------
def test_bad_inputs_raise(fake):
    rng = np.random.default_rng(12)
    q, k, v = make_inputs(rng, "merged", sq=8, skv=5)
    call = lambda **kw: fake._apply_attention(*kw.pop("qkv", (q, k, v)), heads=kw.pop("heads", 4),
                                              attention_kernel="jax_attn", scale=0.3, **kw)
    with pytest.raises(ValueError, match="attention_mask"):
        call(attention_mask=jnp.ones((2, 6), bool))
    with pytest.raises(ValueError, match="attention_mask"):
        call(attention_mask=jnp.ones((2, 1, 5), bool))
    with pytest.raises(ValueError, match="heads"):
        call(heads=5)
    with pytest.raises(ValueError, match="query, key and value"):
        call(qkv=(q, k, v.reshape(2, 5, 4, 8)))
    kernel = fake.KERNEL_REGISTRY["jax_attn"]
    ctx = dict(heads=4, scale=0.3, attention_mask=jnp.zeros((2, 5), jnp.float32))
    with pytest.raises(TypeError, match="attention_mask"):
        kernel(q, k, v, ctx)
    with nn.logical_axis_rules(BASE_RULES + [(D_KV, "context")]):
        with pytest.raises(ValueError, match="d_kv"):
            kernel(q, k, v, dict(heads=4, scale=0.3, mesh=mesh4((1, 1, 4, 1)),
                                 axis_names_q=SELF_Q, axis_names_kv=SELF_KV))
    with pytest.raises(ValueError, match="method"):
        jam.make_kernel("splash")


def test_register_keeps_their_kernels_and_refuses_their_names():
    f = FakeAttentionFlax()
    jam.register(module=f)
    jam.register(module=f)  # again: replaces our own entries
    assert f.KERNEL_REGISTRY["flash"]() == "theirs"
    with pytest.raises(ValueError, match="flash"):
        jam.register({"flash": "ring"}, module=f)


def test_register_without_registry_wraps_dispatch():
    """A MaxDiffusion from before the registry: our names are routed, theirs pass through."""
    f = FakeAttentionFlax(with_registry=False)
    jam.register(module=f, backend="naive")
    jam.register(module=f, backend="naive")  # not wrapped twice
    assert f._apply_attention(None, None, None, attention_kernel="flash") == "theirs"
    rng = np.random.default_rng(13)
    q, k, v = make_inputs(rng, "merged", sq=8, skv=8)
    out = f._apply_attention(q, k, v, heads=4, attention_kernel="jax_attn", scale=0.3, mesh=None,
                             attention_mask=None)
    ref = reference.attention(to_bnsd(q, 4, "merged"), to_bnsd(k, 4, "merged"), to_bnsd(v, 4, "merged"),
                              scale=0.3)
    assert reference.relative_error(out, merged(ref)) <= TOL


def test_register_without_maxdiffusion_raises_import_error():
    try:
        import maxdiffusion  # noqa: F401
        pytest.skip("maxdiffusion is installed")
    except ImportError:
        pass
    with pytest.raises(ImportError, match="MaxDiffusion"):
        jam.register()
