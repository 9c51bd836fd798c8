"""The end-to-end benchmark (`benchmarks/end_to_end.py`) and its models' pluggable attention."""
from __future__ import annotations

import functools
import importlib.util
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jax_attn
from jax_attn.models import JointDiT, JointDiTConfig, UNet, UNetConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@functools.lru_cache(maxsize=None)
def _bench():
    spec = importlib.util.spec_from_file_location("end_to_end", os.path.join(ROOT, "benchmarks", "end_to_end.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_quick_mode_table(tmp_path, capsys):
    bench = _bench()
    assert bench.main(["--quick", "--out", str(tmp_path), "--compile-workers", "2"]) == 0
    printed = capsys.readouterr().out.rstrip().splitlines()
    assert printed[-1].startswith("| ") and printed[-1].endswith(" |")  # the table comes last
    doc = json.loads((tmp_path / "end_to_end.json").read_text())
    for key in ("date", "device", "jax", "jaxlib"):
        assert key in doc["environment"]
    on_cpu = ["jax.nn", "jax-attn-auto"]  # every implementation a CPU can run
    for model in ("dit", "unet"):
        rows = {r["impl"]: r for r in doc["rows"] if r["model"] == model and r["step"] == "fwd"}
        assert set(on_cpu) | {bench.STANDIN} <= set(rows)
        for impl in on_cpu:
            assert rows[impl]["status"] == "ok" and rows[impl]["ms"] > 0 and rows[impl]["compile_s"] > 0
            assert "attention_share" in rows[impl]
        assert rows["jax.nn"]["speedup_vs_jax_nn"] == 1.0
    assert "jax.nn-cudnn" in doc["not_run"]  # no GPU here: said, not silently dropped
    md = (tmp_path / "end_to_end.md").read_text()
    assert "cuDNN" in md and doc["environment"]["jax"] in md and "stand-in (no attention)" in md
    for impl in on_cpu:
        assert f"| {impl} |" in md


def test_ratios():
    bench = _bench()
    rows = [dict(model="m", size="s", step="fwd", impl=i, status="ok", ms=ms)
            for i, ms in ((bench.STANDIN, 6.0), ("jax.nn", 10.0), ("jax-attn-auto", 8.0))]
    bench.add_ratios(rows)
    assert rows[2]["speedup_vs_jax_nn"] == pytest.approx(1.25)
    assert rows[1]["attention_share"] == pytest.approx(0.4) and rows[2]["attention_share"] == pytest.approx(0.25)
    assert "attention_share" not in rows[0]


def _recording(fn, seen):
    def attn(q, k, v):
        seen.append((q.shape, k.shape))  # at trace time: which attention calls go through `fn`
        return fn(q, k, v)
    return attn


def _naive(q, k, v):
    return jax_attn.attention_forward(q, k, v, layout="bsnd", backend="naive")


def _swap(model, inputs):
    """The same weights run with jax.nn's default and with jax-attn's naive backend."""
    graphdef, weights = nnx.split(model)
    seen = []
    outs = [jax.jit(lambda w, *x, f=f: nnx.merge(graphdef, w)(*x, attn_fn=f))(weights, *inputs)
            for f in (jax.nn.dot_product_attention, _recording(_naive, seen))]
    np.testing.assert_allclose(np.asarray(outs[0]), np.asarray(outs[1]), rtol=2e-4, atol=2e-4)
    assert float(jnp.abs(outs[0]).mean()) > 1e-3  # a real output, not zeros on both sides
    return seen


def test_dit_attention_swap():
    cfg = JointDiTConfig(hidden=32, heads=2, depth=2, in_channels=8, text_dim=16, dtype="float32")
    k1, k2 = jax.random.split(jax.random.key(1))
    inputs = (jax.random.normal(k1, (2, 24, 8)), jax.random.normal(k2, (2, 5, 16)), jnp.array([3.0, 900.0]))
    seen = _swap(JointDiT(cfg, rngs=nnx.Rngs(0)), inputs)
    assert seen == [((2, 29, 2, 16), (2, 29, 2, 16))]  # joint text+image self-attention (traced once: scan)


@pytest.mark.slow
def test_unet_attention_swap():
    cfg = UNetConfig(sample_size=8, channels=(16, 32), transformer_depth=(1, 1), layers_per_block=1,
                     dim_head=8, context_dim=12, groups=4, dtype="float32")
    k1, k2 = jax.random.split(jax.random.key(2))
    inputs = (jax.random.normal(k1, (2, 8, 8, 4)), jnp.array([3.0, 900.0]), jax.random.normal(k2, (2, 5, 12)))
    seen = _swap(UNet(cfg, rngs=nnx.Rngs(0)), inputs)
    # Self- and cross-attention at both resolutions (8x8 and 4x4 positions) go through attn_fn.
    assert {((2, 64, 2, 8), (2, 64, 2, 8)), ((2, 64, 2, 8), (2, 5, 2, 8)),
            ((2, 16, 4, 8), (2, 16, 4, 8)), ((2, 16, 4, 8), (2, 5, 4, 8))} == set(seen)


def test_unet_attention_calls_match_sdxl():
    calls = UNetConfig().attention_calls(2)
    assert {(c["kind"], c["sq"], c["skv"], c["n"], c["count"]) for c in calls} == {
        ("self", 4096, 4096, 10, 10), ("cross", 4096, 77, 10, 10),
        ("self", 1024, 1024, 20, 60), ("cross", 1024, 77, 20, 60)}  # SDXL's 70 transformer blocks
