"""jax_attn inside diffusers' Flax models (diffusers 0.35.x), against diffusers' own attention.

diffusers dropped its Flax models after 0.35, and the project's environment has a newer diffusers,
so this module skips there (CI skips it). It runs in a separate environment:

    python -m venv /tmp/venv-d035
    /tmp/venv-d035/bin/pip install "diffusers==0.35.2" "jax[cpu]" flax tqdm pytest pytest-xdist
    /tmp/venv-d035/bin/pip install -e . --no-deps
    /tmp/venv-d035/bin/python -m pytest -p no:xdist -o addopts="" -q tests/test_adapter_diffusers_flax.py

Checks, with random parameters: the drop-in modules and the swapped tiny `FlaxUNet2DConditionModel`
/ `FlaxAutoencoderKL` against the unmodified diffusers modules, outputs and parameter gradients,
at float32 round-off (`SAME`: the same math in another order; CPU float32); and the attention
core against the float64 reference (`reference.TOLERANCE`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

try:
    import diffusers
    from diffusers import FlaxAutoencoderKL, FlaxUNet2DConditionModel
    from diffusers.models.attention_flax import FlaxAttention as DiffusersAttention
    from diffusers.models.vae_flax import FlaxAttentionBlock as DiffusersAttentionBlock
except (ImportError, AttributeError) as e:  # diffusers >= 0.36 has no Flax models
    pytest.skip(f"needs diffusers 0.35.x with Flax models ({type(e).__name__}: {e}); see this module's "
                "docstring for the optional environment", allow_module_level=True)

import jax_attn.adapters.diffusers_flax as jdf
from jax_attn import reference

SAME = 1e-5  # relative; observed 1e-7 to 1e-6 on CPU float32 (outputs and gradients)


def rand(seed, *shape):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def grads_and_out(module, params, *args, get=lambda o: o, **kw):
    """Output and the gradient of sum(out * fixed cotangent) w.r.t. every parameter."""
    out = get(module.apply(params, *args, **kw))
    cot = rand(99, *out.shape)
    g = jax.grad(lambda p: jnp.sum(get(module.apply(p, *args, **kw)) * cot))(params)
    return out, g


def assert_same(a, b, tol=SAME):
    """Leaf by leaf relative error. The denominator is floored at 10% of the RMS of all of b's
    entries (times sqrt(leaf size)): the key bias's gradient is analytically zero (softmax ignores a
    constant added to one query's logits) and is only rounding noise in both implementations."""
    la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    assert [p for p, _ in la] == [p for p, _ in lb], "parameter trees differ"
    flat = [np.asarray(y, np.float64).ravel() for _, y in lb]
    rms = np.sqrt(sum(float(np.sum(f * f)) for f in flat) / sum(f.size for f in flat))
    for (path, x), (_, y) in zip(la, lb):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        err = np.linalg.norm(x - y) / max(np.linalg.norm(y), 0.1 * rms * np.sqrt(y.size))
        assert err <= tol, f"{jax.tree_util.keystr(path)}: relative error {err:.2e}"


@pytest.fixture
def calls(monkeypatch):
    """Counts our attention calls (proof that the swap ran, not diffusers' code)."""
    seen = []
    for name in ("attention_call", "attention_block_call"):
        fn = getattr(jdf, name)
        monkeypatch.setattr(jdf, name, lambda *a, _fn=fn, _n=name, **k: (seen.append(_n), _fn(*a, **k))[1])
    return seen


@pytest.mark.parametrize("cross", [False, True])
def test_drop_in_attention_matches_diffusers(cross):
    x, ctx = rand(0, 2, 24, 32), (rand(1, 2, 7, 32) if cross else None)
    theirs = DiffusersAttention(32, heads=4, dim_head=8)
    ours = jdf.FlaxAttention(32, heads=4, dim_head=8)
    params = theirs.init(jax.random.key(0), x, ctx)
    assert jax.tree_util.tree_structure(ours.init(jax.random.key(0), x, ctx)) == jax.tree_util.tree_structure(params)
    assert_same(grads_and_out(ours, params, x, ctx), grads_and_out(theirs, params, x, ctx))


def test_drop_in_attention_vs_float64_reference():
    """The attention core alone, from the module's own projections, in float64."""
    x, ctx = rand(0, 2, 24, 32), rand(1, 2, 7, 32)
    ours = jdf.FlaxAttention(32, heads=4, dim_head=8)
    p = ours.init(jax.random.key(0), x, ctx)["params"]
    f64 = lambda a: np.asarray(a, np.float64)
    split = lambda a: a.reshape(a.shape[0], a.shape[1], 4, 8).transpose(0, 2, 1, 3)
    q, k, v = (split(f64(inp) @ f64(p[n]["kernel"])) for inp, n in ((x, "to_q"), (ctx, "to_k"), (ctx, "to_v")))
    att = reference.attention(q, k, v, scale=8 ** -0.5).transpose(0, 2, 1, 3).reshape(2, 24, 32)
    ref = att @ f64(p["to_out_0"]["kernel"]) + f64(p["to_out_0"]["bias"])
    assert reference.relative_error(ours.apply({"params": p}, x, ctx), ref) <= reference.TOLERANCE["float32"]


@pytest.mark.parametrize("num_head_channels", [None, 8])
def test_drop_in_vae_block_matches_diffusers(num_head_channels):
    x = rand(0, 2, 6, 5, 32)
    theirs = DiffusersAttentionBlock(32, num_head_channels=num_head_channels, num_groups=8)
    ours = jdf.FlaxAttentionBlock(32, num_head_channels=num_head_channels, num_groups=8)
    params = theirs.init(jax.random.key(0), x)
    assert_same(grads_and_out(ours, params, x), grads_and_out(theirs, params, x))


def test_swapped_unet_matches_diffusers(calls):
    unet = FlaxUNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8)
    params = unet.init_weights(jax.random.key(0))
    args = (rand(1, 2, 4, 8, 8), jnp.array([10, 500]), rand(2, 2, 7, 32))

    def run(model, p):
        return model.apply({"params": p}, *args).sample

    def out_and_grads(model):
        cot = rand(99, 2, 4, 8, 8)
        out = jax.jit(lambda p: run(model, p))(params)
        return out, jax.jit(jax.grad(lambda p: jnp.sum(run(model, p) * cot)))(params)

    swapped = jdf.swap_attention(unet)
    ours = out_and_grads(swapped)
    assert calls.count("attention_call") >= 4, calls  # self + cross in each of 2 transformer blocks
    assert_same(ours, out_and_grads(unet))


def test_swapped_vae_matches_diffusers(calls):
    vae = FlaxAutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 32), layers_per_block=1,
        latent_channels=4, norm_num_groups=8, sample_size=16)
    params = vae.init_weights(jax.random.key(0))
    x = rand(1, 2, 3, 16, 16)
    with jdf.use_jax_attn():  # the context manager form; traced inside it
        ours = grads_and_out(vae, {"params": params}, x, get=lambda o: o.sample)
    assert calls.count("attention_block_call") >= 2, calls  # encoder and decoder mid blocks
    assert_same(ours, grads_and_out(vae, {"params": params}, x, get=lambda o: o.sample))


def test_outside_the_block_diffusers_runs_unchanged(calls):
    x = rand(0, 2, 24, 32)
    theirs = DiffusersAttention(32, heads=4, dim_head=8)
    theirs.apply(theirs.init(jax.random.key(0), x), x)
    assert calls == []
    assert diffusers.__version__.startswith("0.35")
