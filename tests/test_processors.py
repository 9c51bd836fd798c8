"""Built-in processors against materialized float64 maps from `jax_attn.reference`.

Tolerances: float32 layer outputs, maps and gradients vs float64 NumPy: `TOL["float32"]` (2e-3
relative; 1e-6 seen on CPU, TF32 matmuls on GPUs reach ~3e-4).
"""
from __future__ import annotations

import ast
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jax_attn import processors as P, reference
from jax_attn.attention import ProcessorState, set_attn_processor
from test_attention_module import (B, SKV, SQ, TOL, Pair, forward, inputs, make, masks, merge,
                                   out_proj, qkv, split, weights, weights_of_grads)


def test_processors_package_imports_no_array_framework():
    files = sorted(pathlib.Path(P.__file__).parent.glob("*.py"))
    assert {f.stem for f in files} >= {"__init__", "base", "layers", "lora", "maps", "prompt_to_prompt", "sliced"}
    for f in files:
        tree = ast.parse(f.read_text())
        imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert not imported & {"jax", "flax", "numpy", "torch"}, (f.name, imported)


def test_processors_package_keeps_every_public_name():
    from jax_attn import module_rules
    for name in P.__all__ + ["AttnProcessorBase", "check_processor", "resolve_processors",
                             "set_layer_processors", "LAYER_FINDERS"]:
        assert getattr(P, name) is not None
    for name in ("check_call", "check_processor_kwargs"):  # moved to the module's rules
        with pytest.deprecated_call():
            assert getattr(P, name) is getattr(module_rules, name)


@pytest.mark.fast_every(2)
@pytest.mark.fast_diagonal  # the fast run: the first three mask kinds, slice sizes 4, 6 and 100
@pytest.mark.parametrize("slice_size", [4, 6, 100, 1])
@pytest.mark.parametrize("mask_kind", ["none", "int_per_query", "additive",
                                       pytest.param("bool_and_kv_lengths", marks=pytest.mark.slow),
                                       pytest.param("kv_lengths_empty", marks=pytest.mark.slow)])
def test_sliced_matches_reference(slice_size, mask_kind):
    attn = make(cross=True, qk_norm="layer_norm")  # b * heads = 6 maps, sliced unevenly by 4
    attn.set_processor(P.SlicedAttnProcessor(slice_size))
    x, ctx = inputs(True)
    mask, lengths, ref_mask, ref_lengths = masks(mask_kind)
    out = attn(x, ctx, mask, kv_lengths=lengths)
    ref = forward(attn, x, ctx, ref_mask, ref_lengths, "layer_norm")
    assert reference.relative_error(out, ref) < TOL["float32"]


def test_sliced_rejects_bad_slice_size():
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="slice_size"):
            P.SlicedAttnProcessor(bad)


def ref_maps(attn, x, ctx, ref_mask, ref_lengths):
    q, k, _ = qkv(attn, x, ctx)
    return reference.probabilities(q, k, ref_mask, ref_lengths, scale=attn.scale)


@pytest.mark.fast_diagonal  # the fast run: each masking once, the options in turn
@pytest.mark.parametrize("queries", [None, (0, 3, -1)], ids=["all", "some"])
@pytest.mark.parametrize("average_heads", [True, False], ids=["mean", "heads"])
@pytest.mark.parametrize("cross, mask_kind", [(True, "bool_and_kv_lengths"), (False, "additive"),
                                              (True, "kv_lengths_empty"), (False, "none")])
def test_map_store_matches_reference_under_jit(queries, average_heads, cross, mask_kind):
    attn = make(cross=cross)
    store = P.AttentionMapStore(queries=queries, average_heads=average_heads)
    attn.set_processor(store)
    x, ctx = inputs(cross)
    mask, lengths, ref_mask, ref_lengths = masks(mask_kind, cross)
    out = nnx.jit(lambda m, x, c: m(x, c, mask, kv_lengths=lengths))(attn, x, ctx)
    assert reference.relative_error(out, forward(attn, x, ctx, ref_mask, ref_lengths)) < TOL["float32"]
    ref = ref_maps(attn, x, ctx, ref_mask, ref_lengths)
    if queries is not None:
        ref = ref[:, :, [i % SQ for i in queries]]
    if average_heads:
        ref = ref.mean(1)
    maps = store.maps(attn)
    assert list(maps) == [""] and maps[""].shape == ref.shape
    assert reference.relative_error(maps[""], ref) < TOL["float32"]
    assert isinstance(attn.processor_state["attention_maps"], ProcessorState)


def test_map_store_chosen_layers_and_kinds():
    model = Pair()
    x, ctx = inputs(True)
    only_cross = P.AttentionMapStore(kind="cross")
    set_attn_processor(model, only_cross)
    base = forward(model.layers[1], forward(model.layers[0], x), ctx)
    assert reference.relative_error(model(x, ctx), base) < TOL["float32"]
    assert list(only_cross.maps(model)) == ["layers.1"]
    named = P.AttentionMapStore(layers=["layers.0.processor"], queries=[2])
    set_attn_processor(model, named)
    model(x, ctx)
    maps = named.maps(model)
    assert list(maps) == ["layers.0"] and maps["layers.0"].shape == (B, 1, SQ)
    with pytest.raises(ValueError, match="kind"):
        P.AttentionMapStore(kind="both")
    with pytest.raises(ValueError, match="queries"):
        P.AttentionMapStore(queries=[])
    with pytest.raises(ValueError, match="out of range"):
        set_attn_processor(model, P.AttentionMapStore(queries=[SQ]))
        model(x, ctx)


def _largest_intermediate(jaxpr) -> int:
    """Elements of the largest value any equation (at any nesting depth) produces."""
    best = 0
    for eqn in jaxpr.eqns:
        for v in eqn.outvars:
            best = max(best, math.prod(getattr(v.aval, "shape", ())))
        for p in eqn.params.values():
            for sub in (p if isinstance(p, (list, tuple)) else [p]):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    best = max(best, _largest_intermediate(inner))
    return best


@pytest.mark.parametrize("queries, full_map", [((0, 700), False), (None, True)])
def test_map_store_does_not_materialize_full_maps(queries, full_map):
    """With the chunked backend (never an (sq, skv) block) the store adds only (nq, skv) maps."""
    s = 1024
    attn = make(cross=False, heads=1, dim_head=8, backend="chunked")
    attn.set_processor(P.AttentionMapStore(queries=queries, average_heads=False))
    x = jax.random.normal(jax.random.key(0), (1, s, 16))
    graphdef, state = nnx.split(attn)
    jaxpr = jax.make_jaxpr(lambda st, x: nnx.merge(graphdef, st)(x))(state, x)
    assert (_largest_intermediate(jaxpr.jaxpr) >= s * s) == full_map


@pytest.mark.fast_diagonal
@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("backend", ["xla", "chunked"])
def test_reweight_matches_reference(renormalize, backend):
    attn = make(cross=True, backend=backend)
    weights_ = {1: 3.0, 3: 0.0, -1: 0.5} if renormalize else {1: 3.0, 3: -0.5}
    attn.set_processor(P.AttentionReweightProcessor(weights_, renormalize=renormalize,
                                                    batch_indices=[1]))
    x, ctx = inputs(True)
    mask, lengths, ref_mask, ref_lengths = masks("bool_and_kv_lengths")
    out = attn(x, ctx, mask, kv_lengths=lengths)
    q, k, v = qkv(attn, x, ctx)
    p = reference.probabilities(q, k, ref_mask, ref_lengths, scale=attn.scale)
    w = np.ones((B, SKV))
    for j, wj in weights_.items():
        w[1, j] = wj
    pw = p * w[:, None, None, :]
    if renormalize:
        total = pw.sum(-1, keepdims=True)
        pw = np.where(total > 0, pw / np.where(total > 0, total, 1), 0)
    ref = out_proj(attn, np.einsum("bnqk,bnkd->bnqd", pw, v))
    assert reference.relative_error(out, ref) < TOL["float32"]
    untouched = forward(attn, x, ctx, ref_mask, ref_lengths)[0]
    assert reference.relative_error(out[0], untouched) < TOL["float32"]


def test_reweight_leaves_self_attention_and_checks_weights():
    attn = make(cross=False)
    attn.set_processor(P.AttentionReweightProcessor({0: 5.0}))
    x, _ = inputs(False)
    assert reference.relative_error(attn(x), forward(attn, x)) < TOL["float32"]
    with pytest.raises(ValueError, match="token_weights"):
        P.AttentionReweightProcessor({0: -1.0})
    with pytest.raises(TypeError, match="token_weights"):
        P.AttentionReweightProcessor([(0, 1.0)])


@pytest.mark.parametrize("averaged", [False, True])
def test_map_replace_injects_source_maps(averaged):
    model = Pair()
    x, ctx = inputs(True)
    src = jax.nn.softmax(jax.random.normal(jax.random.key(9), (B, 3, SQ, SKV)) * 2, -1)
    if averaged:
        src = src.mean(1)
    set_attn_processor(model, P.AttentionMapReplaceProcessor())
    out = nnx.jit(lambda m, x, c, s: m(x, c, {"source_maps": s}))(model, x, ctx, {"layers.1": src})
    l0, l1 = model.layers
    h = forward(l0, x)  # self-attention layer: not named, runs the default
    _, _, v = qkv(l1, h, ctx)
    p = np.asarray(src, np.float64)
    p = p[:, None] if averaged else p
    ref = out_proj(l1, np.einsum("bnqk,bnkd->bnqd", np.broadcast_to(p, (B, 3, SQ, SKV)), v))
    assert reference.relative_error(out, ref) < TOL["float32"]
    no_maps = forward(l1, h, ctx)  # no source maps: the default processor
    assert reference.relative_error(model(x, ctx), no_maps) < TOL["float32"]
    with pytest.raises(ValueError, match=r"source_maps\['layers.1'\] must have shape"):
        model(x, ctx, {"source_maps": {"layers.1": src[:, :2]}})


def test_map_store_feeds_map_replace():
    """Maps recorded on a source pass, injected into the same inputs, reproduce the source output."""
    model = Pair()
    x, ctx = inputs(True)
    store = P.AttentionMapStore(kind="cross", average_heads=False)
    set_attn_processor(model, store)
    source = model(x, ctx)
    set_attn_processor(model, P.AttentionMapReplaceProcessor())
    replayed = model(x, ctx, {"source_maps": store.maps(model)})
    assert reference.relative_error(replayed, np.asarray(source, np.float64)) < 1e-5


def lora_params(attn):
    return {k: np.asarray(v.get_value(), np.float64) for k, v in attn.processor_state.items()}


def test_lora_starts_as_identity_and_matches_reference():
    attn = make(cross=True, qk_norm="rms_norm")
    x, ctx = inputs(True)
    mask, lengths, ref_mask, ref_lengths = masks("bool_and_kv_lengths")
    base = attn(x, ctx, mask, kv_lengths=lengths)
    attn.set_processor(P.LoRAAttnProcessor(rank=2, network_alpha=1.0), rngs=nnx.Rngs(3))
    params = lora_params(attn)
    assert {k: v.shape for k, v in params.items()} == {
        "to_q_lora_down": (16, 2), "to_q_lora_up": (2, 24), "to_k_lora_down": (12, 2),
        "to_k_lora_up": (2, 24), "to_v_lora_down": (12, 2), "to_v_lora_up": (2, 24),
        "to_out_lora_down": (24, 2), "to_out_lora_up": (2, 16)}
    assert all(isinstance(v, nnx.Param) for v in attn.processor_state.values())
    np.testing.assert_array_equal(attn(x, ctx, mask, kv_lengths=lengths), base)  # zero up: identity
    for name, var in attn.processor_state.items():  # non-zero updates, then compare
        if name.endswith("_up"):
            var.set_value(0.3 * jax.random.normal(jax.random.key(len(name)), var.get_value().shape))
    params = lora_params(attn)
    for scale in (1.0, 0.5):
        out = attn(x, ctx, mask, kv_lengths=lengths, scale=scale)
        f = scale * 1.0 / 2
        lora = {t: (params[f"to_{t}_lora_down"], params[f"to_{t}_lora_up"], f) for t in ("q", "k", "v", "out")}
        q, k, v = qkv(attn, x, ctx, "rms_norm", lora)
        o = reference.attention(q, k, v, ref_mask, ref_lengths, scale=attn.scale)
        assert reference.relative_error(out, out_proj(attn, o, lora)) < TOL["float32"]


def test_lora_gradients_match_reference():
    attn = make(cross=True)
    attn.set_processor(P.LoRAAttnProcessor(rank=3, targets=("v", "out")))
    up_v = attn.processor_state["to_v_lora_up"]
    up_v.set_value(0.3 * jax.random.normal(jax.random.key(1), up_v.get_value().shape))
    x, ctx = inputs(True)
    g = jax.random.normal(jax.random.key(20), (B, SQ, 16))
    grads = nnx.jit(nnx.grad(lambda m: jnp.sum(m(x, ctx) * g)))(attn)
    got = weights_of_grads(grads)
    p = lora_params(attn)
    lora = {t: (p[f"to_{t}_lora_down"], p[f"to_{t}_lora_up"], 1.0) for t in ("v", "out")}
    q, k, v = qkv(attn, x, ctx, lora=lora)
    o = reference.attention(q, k, v, scale=attn.scale)
    g64, c64 = np.asarray(g, np.float64), np.asarray(ctx, np.float64)
    w = weights(attn)
    w_out = w["to_out.0.kernel"] + p["to_out_lora_down"] @ p["to_out_lora_up"]
    _, _, dv, _ = reference.attention_vjp(q, k, v, split(g64 @ w_out.T, 3), scale=attn.scale)
    ref_up_out = np.einsum("bsr,bso->ro", merge(o) @ p["to_out_lora_down"], g64)
    ref_up_v = np.einsum("bsr,bso->ro", c64 @ p["to_v_lora_down"], merge(dv))
    assert reference.relative_error(got["processor_state.to_out_lora_up"], ref_up_out) < TOL["float32"]
    assert reference.relative_error(got["processor_state.to_v_lora_up"], ref_up_v) < TOL["float32"]
    assert "processor_state.to_q_lora_up" not in got  # not a target


def test_shared_lora_keeps_per_layer_params():
    model = Pair()
    lora = P.LoRAAttnProcessor(rank=2)
    set_attn_processor(model, lora)
    l0, l1 = model.layers
    assert l0.processor is l1.processor is lora
    assert lora_params(l0)["to_k_lora_down"].shape == (16, 2)  # self-attention: query_dim
    assert lora_params(l1)["to_k_lora_down"].shape == (12, 2)  # cross: cross_attention_dim
    assert not np.allclose(lora_params(l0)["to_q_lora_down"], lora_params(l1)["to_q_lora_down"])
    set_attn_processor(model, P.AttnProcessor())  # switching drops the LoRA state
    assert not nnx.to_pure_dict(nnx.state(model, nnx.Param))["layers"][0].get("processor_state")
    for bad in (dict(rank=0), dict(targets=("x",)), dict(targets=())):
        with pytest.raises(ValueError):
            P.LoRAAttnProcessor(**bad)
