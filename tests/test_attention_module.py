"""`jax_attn.attention.Attention` and the model-level processor helpers, against a float64 NumPy
reference of the whole layer (projections, q/k norms, heads) built on `jax_attn.reference`.

The helpers at the top are reused by tests/test_processors.py.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jax_attn import reference
from jax_attn.attention import Attention, attn_processors, set_attn_processor
from jax_attn.processors import AttnProcessor

# Relative error allowed for float32 module outputs against the float64 reference: the module's
# projections run in float32 (1e-6 seen on CPU); on GPUs matmuls may use TF32 (~3e-4).
TOL = {"float32": 2e-3}


def weights(attn) -> dict:
    """The module's parameters as float64 NumPy arrays, keyed by their path ("to_q.kernel")."""
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(attn, nnx.Param)):
        out[".".join(map(str, path))] = np.asarray(var.get_value(), np.float64)
    return out


def linear(w, name, x):
    y = x @ w[f"{name}.kernel"]
    return y + w[f"{name}.bias"] if f"{name}.bias" in w else y


def norm(w, name, x, kind, eps=1e-5):
    if kind is None:
        return x
    if kind == "rms_norm":
        return x / np.sqrt((x ** 2).mean(-1, keepdims=True) + eps) * w[f"{name}.scale"]
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w[f"{name}.scale"] + w[f"{name}.bias"]


def split(x, n):
    b, s, c = x.shape
    return x.reshape(b, s, n, c // n).transpose(0, 2, 1, 3)


def merge(x):
    b, n, s, d = x.shape
    return x.transpose(0, 2, 1, 3).reshape(b, s, n * d)


def qkv(attn, x, ctx=None, qk_norm=None, lora=None):
    """q, k, v (b, n, s, d) float64; `lora` = {target: (down, up, factor)}."""
    w = weights(attn)
    x = np.asarray(x, np.float64)
    ctx = x if ctx is None else np.asarray(ctx, np.float64)
    lora = lora or {}

    def proj(t, inp):
        y = linear(w, f"to_{t}", inp)
        if t in lora:
            down, up, f = lora[t]
            y = y + f * (inp @ down) @ up
        return y

    q, k, v = split(proj("q", x), attn.heads), split(proj("k", ctx), attn.heads), split(proj("v", ctx), attn.heads)
    return norm(w, "norm_q", q, qk_norm), norm(w, "norm_k", k, qk_norm), v


def out_proj(attn, o, lora=None):
    w = weights(attn)
    y = merge(o)
    res = linear(w, "to_out.0", y)
    if lora and "out" in lora:
        down, up, f = lora["out"]
        res = res + f * (y @ down) @ up
    return res


def forward(attn, x, ctx=None, mask=None, kv_lengths=None, qk_norm=None):
    q, k, v = qkv(attn, x, ctx, qk_norm)
    return out_proj(attn, reference.attention(q, k, v, attn_mask=mask, kv_lengths=kv_lengths,
                                              scale=attn.dim_head ** -0.5))


def randomize(module, seed=0):
    """Give every parameter random values (biases and norm scales start at 0/1: too forgiving)."""
    state = nnx.state(module, nnx.Param)
    leaves, treedef = jax.tree_util.tree_flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    new = [0.3 * jax.random.normal(kk, x.shape, x.dtype) + (1.0 if x.ndim == 1 else 0.0)
           for kk, x in zip(keys, leaves)]
    nnx.update(module, jax.tree_util.tree_unflatten(treedef, new))
    return module


def rand(seed, *shape):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def make(cross=True, qk_norm=None, heads=3, dim_head=8, backend="xla", seed=0, **kw):
    attn = Attention(16, 12 if cross else None, heads=heads, dim_head=dim_head, bias=True,
                     qk_norm=qk_norm, backend=backend, rngs=nnx.Rngs(seed), **kw)
    return randomize(attn, seed + 1)


B, SQ, SKV = 2, 7, 5


def inputs(cross=True, seed=10):
    x = rand(seed, B, SQ, 16)
    ctx = rand(seed + 1, B, SKV, 12) if cross else None
    return x, ctx


def masks(kind, cross=True):
    """(module-level mask, kv_lengths, the same as a float64 reference mask, reference kv_lengths)."""
    skv = SKV if cross else SQ
    keep = np.array(jax.random.bernoulli(jax.random.key(3), 0.7, (B, skv)))
    keep[:, 0] = True
    if kind == "none":
        return None, None, None, None
    if kind == "bool":
        return jnp.asarray(keep), None, keep[:, None, None, :], None
    if kind == "int_per_query":
        k3 = np.array(jax.random.bernoulli(jax.random.key(4), 0.6, (B, SQ, skv)))
        k3[:, :, 1] = True
        return jnp.asarray(k3.astype(np.int32)), None, k3[:, None], None
    if kind == "additive":
        bias = np.where(keep, np.asarray(rand(5, B, skv)), -np.inf)
        return jnp.asarray(bias, jnp.float32), None, bias[:, None, None, :].astype(np.float32), None
    lengths = np.array([skv - 2, 0 if kind == "kv_lengths_empty" else skv], np.int32)
    if kind in ("kv_lengths", "kv_lengths_empty"):
        return None, jnp.asarray(lengths), None, lengths
    if kind == "bool_and_kv_lengths":
        return jnp.asarray(keep), jnp.asarray(lengths), keep[:, None, None, :], lengths
    raise ValueError(kind)


MASK_KINDS = ["none", "bool", "int_per_query", "additive", "kv_lengths", "kv_lengths_empty",
              "bool_and_kv_lengths"]


def test_diffusers_names_and_weight_shapes():
    attn = Attention(16, 12, heads=3, dim_head=8, bias=True, qk_norm="rms_norm", rngs=nnx.Rngs(0))
    shapes = {p: w.shape for p, w in weights(attn).items()}
    assert shapes == {"to_q.kernel": (16, 24), "to_q.bias": (24,), "to_k.kernel": (12, 24),
                      "to_k.bias": (24,), "to_v.kernel": (12, 24), "to_v.bias": (24,),
                      "to_out.0.kernel": (24, 16), "to_out.0.bias": (16,),
                      "norm_q.scale": (8,), "norm_k.scale": (8,)}
    assert attn.to_out[0] is attn.to_out.__getitem__(0) and attn.scale == 8 ** -0.5
    plain = Attention(16, rngs=nnx.Rngs(0))  # diffusers' defaults: no qkv bias, out bias, 8x64
    assert set(weights(plain)) == {"to_q.kernel", "to_k.kernel", "to_v.kernel", "to_out.0.kernel",
                                   "to_out.0.bias"}
    assert plain.inner_dim == 512 and plain.cross_attention_dim == 16 and not plain.is_cross_attention


@pytest.mark.fast_every(4)
@pytest.mark.fast_diagonal  # the fast run: each mask kind once, the norms and cross/self in turn
@pytest.mark.parametrize("cross", [True, False], ids=["cross", "self"])
@pytest.mark.parametrize("qk_norm", [None, "layer_norm", "rms_norm"])
@pytest.mark.parametrize("mask_kind", MASK_KINDS)
def test_forward_matches_reference(cross, qk_norm, mask_kind):
    attn = make(cross, qk_norm)
    x, ctx = inputs(cross)
    mask, lengths, ref_mask, ref_lengths = masks(mask_kind, cross)
    out = attn(x, ctx, mask, kv_lengths=lengths)
    ref = forward(attn, x, ctx, ref_mask, ref_lengths, qk_norm)
    assert out.shape == (B, SQ, 16) and out.dtype == jnp.float32
    assert reference.relative_error(out, ref) < TOL["float32"]


def test_gradients_match_reference():
    """d/d(x, W_q, W_v, W_out) of sum(out * g) vs the reference's analytic attention VJP."""
    attn = make(cross=True)
    x, ctx = inputs(True)
    mask, lengths, ref_mask, ref_lengths = masks("bool_and_kv_lengths")
    g = rand(20, B, SQ, 16)

    def loss(m, x):
        return jnp.sum(m(x, ctx, mask, kv_lengths=lengths) * g)

    grads, dx = nnx.grad(loss, argnums=(0, 1))(attn, x)
    w = weights(attn)
    q, k, v = qkv(attn, x, ctx)
    scale = attn.dim_head ** -0.5
    o = reference.attention(q, k, v, ref_mask, ref_lengths, scale=scale)
    g64 = np.asarray(g, np.float64)
    d_merged = g64 @ w["to_out.0.kernel"].T
    dq, dk, dv, _ = reference.attention_vjp(q, k, v, split(d_merged, attn.heads), ref_mask,
                                            ref_lengths, scale=scale)
    x64, c64 = np.asarray(x, np.float64), np.asarray(ctx, np.float64)
    ref = {"to_out.0.kernel": np.einsum("bsi,bso->io", merge(o), g64),
           "to_q.kernel": np.einsum("bsi,bso->io", x64, merge(dq)),
           "to_v.kernel": np.einsum("bsi,bso->io", c64, merge(dv)),
           "to_k.kernel": np.einsum("bsi,bso->io", c64, merge(dk))}
    got = weights_of_grads(grads)
    for name, r in ref.items():
        assert reference.relative_error(got[name], r) < TOL["float32"], name
    assert reference.relative_error(dx, merge(dq) @ w["to_q.kernel"].T) < TOL["float32"]


def weights_of_grads(grads):
    return {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(grads)}


def test_jit_matches_eager_and_routing_applies(monkeypatch):
    from jax_attn.backends import BACKENDS
    from jax_attn import use_backend
    attn = make(cross=True, backend=None)
    x, ctx = inputs(True)
    eager = attn(x, ctx)
    calls = []
    chunked = BACKENDS["chunked"]
    orig = chunked._forward
    monkeypatch.setattr(chunked, "_forward", lambda i, r: calls.append(1) or orig(i, r))
    with use_backend("chunked"):
        jitted = nnx.jit(lambda m, x, c: m(x, c))(attn, x, ctx)
    assert calls, "use_backend did not reach the module's attention_forward"
    assert reference.relative_error(jitted, np.asarray(eager, np.float64)) < 1e-5
    assert reference.relative_error(eager, forward(attn, x, ctx)) < TOL["float32"]


def test_diffusers_helpers():
    attn = make(cross=True)
    x = rand(1, B, SQ, attn.inner_dim)
    bt = attn.head_to_batch_dim(x)
    assert bt.shape == (B * 3, SQ, 8)
    np.testing.assert_array_equal(np.asarray(bt).reshape(B, 3, SQ, 8),
                                  np.asarray(x).reshape(B, SQ, 3, 8).transpose(0, 2, 1, 3))
    np.testing.assert_array_equal(attn.head_to_batch_dim(x, out_dim=4), np.asarray(bt).reshape(B, 3, SQ, 8))
    np.testing.assert_array_equal(attn.batch_to_head_dim(bt), x)
    # get_attention_scores with a prepared (bool + kv_lengths) mask vs the reference map
    mask, lengths, ref_mask, ref_lengths = masks("bool_and_kv_lengths")
    q, k = rand(2, B, 3, SQ, 8), rand(3, B, 3, SKV, 8)
    prepared = attn.prepare_attention_mask(mask, SKV, B, kv_lengths=lengths)
    assert prepared.shape == (B * 3, 1, SKV) and prepared.dtype == jnp.float32
    assert attn.prepare_attention_mask(mask, SKV, B, out_dim=4).shape == (B, 3, 1, SKV)
    p = attn.get_attention_scores(q.reshape(B * 3, SQ, 8), k.reshape(B * 3, SKV, 8), prepared)
    ref = reference.probabilities(q, k, ref_mask, ref_lengths, scale=attn.scale)
    assert reference.relative_error(np.asarray(p).reshape(B, 3, SQ, SKV), ref) < TOL["float32"]
    assert np.all(np.asarray(p).reshape(ref.shape)[ref == 0] == 0)  # masked keys get exactly 0


@pytest.mark.parametrize("call, match", [
    (lambda a, x, c: a(x[0], c), "hidden_states"),
    (lambda a, x, c: a(x[..., :5], c), "hidden_states"),
    (lambda a, x, c: a(x, c[..., :5]), "encoder_hidden_states"),
    (lambda a, x, c: a(x, c[:1]), "encoder_hidden_states"),
    (lambda a, x, c: a(x, c, jnp.ones((B, SKV + 1), bool)), "attention_mask"),
    (lambda a, x, c: a(x, c, jnp.ones((B, 1, 1, 1, SKV), bool)), "attention_mask"),
    (lambda a, x, c: a(x, c, [[1, 0]]), "attention_mask"),
    (lambda a, x, c: a(x, c, kv_lengths=jnp.array([1, 2, 3])), "kv_lengths"),
    (lambda a, x, c: a(x, c, kv_lengths=jnp.array([1.0, 2.0])), "kv_lengths"),
    (lambda a, x, c: a(x, c, kv_lengths=[1, 2]), "kv_lengths"),
])
def test_bad_input_names_the_argument(call, match):
    attn = make(cross=True)
    x, ctx = inputs(True)
    with pytest.raises((ValueError, TypeError), match=match):
        call(attn, x, ctx)


@pytest.mark.parametrize("kwargs, match", [
    (dict(qk_norm="group_norm"), "qk_norm"), (dict(heads=0), "heads"), (dict(dim_head=2.5), "dim_head"),
    (dict(backend="nope"), "unknown backend"), (dict(processor=3), "processor"),
])
def test_bad_construction(kwargs, match):
    args = dict(query_dim=16, rngs=nnx.Rngs(0))
    args.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=match):
        Attention(**args)


class Pair(nnx.Module):
    def __init__(self):
        self.layers = nnx.List([make(cross=False, seed=1), make(cross=True, seed=2)])

    def __call__(self, x, ctx, cross_attention_kwargs=None):
        kw = cross_attention_kwargs or {}
        return self.layers[1](self.layers[0](x, **kw), ctx, **kw)


class Gain(AttnProcessor):
    """A user processor taking a keyword through cross_attention_kwargs."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 kv_lengths=None, gain=1.0):
        return gain * super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask,
                                       kv_lengths)


def test_set_and_get_processors():
    model = Pair()
    procs = attn_processors(model)
    assert list(procs) == ["layers.0.processor", "layers.1.processor"]
    assert all(type(p) is AttnProcessor for p in procs.values())
    shared = Gain()
    set_attn_processor(model, shared)
    assert all(p is shared for p in attn_processors(model).values())
    a, b = Gain(), AttnProcessor()
    set_attn_processor(model, {"layers.0.processor": a, "layers.1": b})  # suffix optional
    assert list(attn_processors(model).values()) == [a, b]
    with pytest.raises(ValueError, match=r"missing \['layers.1.processor'\]"):
        set_attn_processor(model, {"layers.0.processor": a})
    with pytest.raises(ValueError, match=r"unknown \['layers.7.processor'\]"):
        set_attn_processor(model, {"layers.0": a, "layers.1": b, "layers.7": b})
    with pytest.raises(AttributeError, match="frozen"):
        shared.anything = 1  # attached processors are static under nnx.jit: immutable
    with pytest.raises(TypeError, match="flax.nnx.Module"):
        attn_processors(object())


def test_cross_attention_kwargs_reach_every_processor():
    model = Pair()
    x, ctx = inputs(True)
    base = model(x, ctx)
    set_attn_processor(model, Gain())
    out = nnx.jit(lambda m, x, c: m(x, c, {"gain": 2.0}))(model, x, ctx)
    # both layers got gain=2: layer 0's doubled output feeds layer 1, whose output is doubled
    l0, l1 = model.layers
    ref = 2.0 * forward(l1, 2.0 * forward(l0, x), ctx)
    assert reference.relative_error(out, ref) < TOL["float32"]
    assert reference.relative_error(base, forward(l1, forward(l0, x), ctx)) < TOL["float32"]
    set_attn_processor(model, AttnProcessor())
    with pytest.raises(TypeError, match=r"AttnProcessor at layer 'layers.0' does not accept 'gain'"):
        model(x, ctx, {"gain": 2.0})


def test_grad_through_model_with_processors():
    model = Pair()
    set_attn_processor(model, {"layers.0": Gain(), "layers.1": Gain()})
    x, ctx = inputs(True)
    grads = nnx.jit(nnx.grad(lambda m: jnp.sum(m(x, ctx, {"gain": 0.5}) ** 2)))(model)
    flat = weights_of_grads(grads)
    assert set(flat) == {f"layers.{i}.{w}" for i in (0, 1) for w in weights(model.layers[0])}
    assert all(np.all(np.isfinite(v)) and np.any(v != 0) for v in flat.values())
