"""The example diffusion transformer (`jax_attn.models.TinyDiT`) and its runnable example."""
from __future__ import annotations

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jax_attn import processors as P, reference
from jax_attn.attention import attn_processors, set_attn_processor
from jax_attn.models import DiTConfig, TinyDiT, embed_prompt

CFG = DiTConfig(sample_size=8, patch_size=2, heads=2, dim_head=8, depth=2, cross_attention_dim=16,
                backend="xla")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A whole model (and the example script), jitted, forward and backward: the full run only. The
# fast run covers its parts: the attention module, processors and padding contract.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def setup():
    model = TinyDiT(CFG, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 4))
    text = jnp.stack([embed_prompt(["a", "red", "cat"], 16, 5), embed_prompt(["a", "dog"], 16, 5)])
    return model, x, jnp.array([10.0, 700.0]), text, jnp.array([3, 2], jnp.int32)


def test_structure_and_shapes(setup):
    model, x, t, text, lengths = setup
    assert list(attn_processors(model)) == [f"blocks.{i}.attn{j}.processor" for i in (0, 1) for j in (1, 2)]
    out = model(x, t, text, kv_lengths=lengths)
    assert out.shape == x.shape and bool(jnp.all(jnp.isfinite(out)))
    with pytest.raises(ValueError, match="latents"):
        model(x[:, :4], t, text)


def test_padding_forms_agree_and_text_matters(setup):
    model, x, t, text, lengths = setup
    by_lengths = model(x, t, text, kv_lengths=lengths)
    keep = jnp.arange(5)[None] < lengths[:, None]
    by_mask = nnx.jit(lambda m, *a: m(*a))(model, x, t, text, keep.astype(jnp.int32))
    assert reference.relative_error(by_mask, by_lengths) < 1e-5
    # padding slots are ignored: changing them changes nothing, changing a word does
    junk = text.at[1, 3:].set(5.0)
    assert reference.relative_error(model(x, t, junk, kv_lengths=lengths), by_lengths) < 1e-6
    changed = model(x, t, text.at[0, 2].set(1.0), kv_lengths=lengths)
    assert reference.relative_error(changed, by_lengths) > 1e-4


def test_processors_inside_the_model_and_gradients(setup):
    model, x, t, text, lengths = setup
    base = model(x, t, text, kv_lengths=lengths)
    lora = P.LoRAAttnProcessor(rank=2)
    set_attn_processor(model, lora)
    try:
        fresh = model(x, t, text, kv_lengths=lengths)
        assert reference.relative_error(fresh, base) < 1e-6  # fresh LoRA: identity

        def loss(m):
            return jnp.mean(m(x, t, text, kv_lengths=lengths, cross_attention_kwargs={"scale": 1.0}) ** 2)

        grads = nnx.jit(nnx.grad(loss, argnums=nnx.DiffState(0, nnx.PathContains("processor_state"))))(model)
        flat = {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(grads)}
        assert len(flat) == 4 * 8 and all(k.split(".")[3] == "processor_state" for k in flat)
        assert all(np.any(v != 0) for k, v in flat.items() if k.endswith("_up"))
        store = P.AttentionMapStore(kind="cross", queries=[0, 5])
        set_attn_processor(model, store)
        nnx.jit(lambda m: m(x, t, text, kv_lengths=lengths))(model)
        maps = store.maps(model)
        assert list(maps) == ["blocks.0.attn2", "blocks.1.attn2"]
        for m in maps.values():
            assert m.shape == (2, 2, 5)
            # rows sum to 1 up to the kernel's lse precision (TF32 matmuls on GPUs: ~5e-4)
            np.testing.assert_allclose(np.asarray(m).sum(-1), 1.0, rtol=reference.TOLERANCE["float32"])
            assert np.all(np.asarray(m)[1, :, 2:] == 0)  # the padded keys of prompt 2
    finally:
        set_attn_processor(model, P.AttnProcessor())


def test_example_script_runs(tmp_path):
    spec = importlib.util.spec_from_file_location("denoise_and_maps",
                                                  os.path.join(ROOT, "examples", "denoise_and_maps.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    res = mod.main(["--out", str(tmp_path), "--steps", "2", "--backend", "xla"])
    assert os.path.getsize(res["png"]) > 1000
    assert res["token_maps"].shape == (2, 8, 8) and np.all(res["token_maps"] >= 0)
    assert res["reweighted"] > 1e-4 and res["swap"] > 1e-4  # the edits change the result


@pytest.mark.slow
def test_example_compares_8bit_attention_with_bf16(tmp_path):
    """`--attention-8bit` samples with `sage` and `sage16` (the kernel in interpret mode on the
    CPU) and with bf16 attention, and reports the PSNR and the largest pixel difference of each
    8-bit PNG against the bf16 one."""
    spec = importlib.util.spec_from_file_location("denoise_and_maps",
                                                  os.path.join(ROOT, "examples", "denoise_and_maps.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    res = mod.main(["--out", str(tmp_path), "--steps", "1", "--attention-8bit"])
    for png in ("sage.png", "sage16.png", "bf16.png"):
        assert os.path.getsize(tmp_path / png) > 100
    for name in ("sage", "sage16"):
        assert 0 <= res[f"max_pixel_diff_{name}"] <= 255
        # 8-bit attention changes the picture a little, not wholesale; exactly equal latents
        # would mean the 8-bit run reused the bf16 program (routing is decided at trace time).
        assert 20 < res[f"psnr_{name}"] and 0 < res[f"latent_rel_l2_{name}"] < 0.1
    # The 16-bit P V is the closer of the two (FP8 P and V is what the 8-bit one adds).
    assert res["latent_rel_l2_sage16"] < res["latent_rel_l2_sage"]
