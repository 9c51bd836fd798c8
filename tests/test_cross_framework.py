"""jax_attn and torch_ref compute the same function: every JAX backend against every torch backend.

The same float32/bfloat16 inputs and output cotangent go through each pair; outputs, lse and
gradients (q, k, v and a float attn_mask) must agree. Each side is within TOLERANCE[dtype] of the
float64 reference (tests/test_backends.py, tests/test_torch_ref.py), so by the triangle inequality
the pair may differ by up to 2x that for outputs and 4x for gradients, relative to the reference's
norm (we divide by the JAX result's norm, which is within a percent of it).
Pairs a backend declares it cannot serve are not generated; backends whose package or device is
missing here skip with the reason.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jax_attn
import torch_ref
from jax_attn import cases, reference
from jax_attn.backends import BACKENDS as JAX_BACKENDS
from jax_attn.cases import Case
from jax_attn.contract import validate
from torch_ref.backends import BACKENDS as TORCH_BACKENDS
from torch_ref.inputs import RunContext

TOL = reference.TOLERANCE
JAX_NAMES = [n for n in ("naive", "xla", "chunked", "pallas") if not JAX_BACKENDS[n].unavailable()]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TORCH_NAMES = [n for n in TORCH_BACKENDS if not TORCH_BACKENDS[n].unavailable()]


# The cases are `check`'s (`jax_attn.cases.Case`: the same shapes, layout and masking, drawn by
# `cases.inputs`), small, each with the dtype it runs in; `numpy_inputs` adds what `check` does
# not draw: -inf in a bias (an empty row, a key dropped for one head) and a key a bool mask drops.
CASES = [
    (Case("self", 2, 4, 4, 24, 24, 16, 16), "float32"),
    (Case("gqa-causal-bsnd", 1, 4, 2, 20, 28, 16, 16, layout="bsnd", causal=True), "float32"),
    (Case("cross-padded", 2, 2, 2, 24, 13, 8, 8, mask="key", kv_lengths=True), "float32"),  # last: empty
    (Case("bias", 1, 2, 2, 16, 20, 16, 16, mask="bias"), "float32"),
    (Case("dv-differs", 1, 2, 1, 12, 12, 16, 8, causal=True), "float32"),
    (Case("self-bf16", 1, 2, 2, 32, 32, 32, 32, mask="key"), "bfloat16"),
]


@functools.lru_cache(maxsize=None)
def numpy_inputs(case: Case, dtype: str):
    """float32 arrays in bnsd (rounded to `dtype`), the mask and lengths, and a cotangent."""
    seed = CASES.index((case, dtype))
    q, k, v, kw = cases.inputs(case, dtype, seed)
    q, k, v = (x.astype(np.float32) for x in (q, k, v))
    mask = kw.get("attn_mask")
    if case.mask == "key":
        mask[0, 0, 0, 0] = False
    elif case.mask == "bias":  # (1, n, sq, skv)
        mask = mask.astype(np.float32)
        mask[0, 0, 3] = -np.inf  # one empty row
        mask[0, 1, :, 2] = -np.inf
    d_out = cases.output_cotangent(case, seed).astype(cases.numpy_dtype(dtype)).astype(np.float32)
    return q, k, v, mask, kw.get("kv_lengths"), d_out


def _swap(x, layout):
    return x if layout == "bnsd" else np.swapaxes(x, 1, 2)


def _kwargs(case, mask, lengths):
    kw = dict(is_causal=case.causal, layout=case.layout)
    if mask is not None:
        kw["attn_mask"] = mask
    if lengths is not None:
        kw["kv_lengths"] = lengths
    return kw


@functools.lru_cache(maxsize=None)
def jax_results(case: Case, dtype: str, backend: str) -> dict:
    """out, lse and gradients (q, k, v, bias) from a JAX backend, as float64 NumPy in bnsd."""
    q, k, v, mask, lengths, d_out = numpy_inputs(case, dtype)
    q, k, v, d_out = (jnp.asarray(_swap(x, case.layout), dtype) for x in (q, k, v, d_out))
    bias = jnp.asarray(mask, dtype) if case.mask == "bias" else None
    static = _kwargs(case, None if bias is not None else mask, lengths)

    def f(q, k, v, bias):
        kw = static if bias is None else {**static, "attn_mask": bias}
        return jax_attn.attention_forward(q, k, v, backend=backend, return_lse=True, **kw)

    (out, lse), vjp = jax.vjp(f, q, k, v, bias)
    grads = vjp((d_out, jnp.zeros_like(lse)))
    res = {"out": out, "lse": lse, "dq": grads[0], "dk": grads[1], "dv": grads[2], "dbias": grads[3]}
    return {key: None if x is None else _swap(np.asarray(x.astype(jnp.float32), np.float64), case.layout)
            if key not in ("lse", "dbias") else np.asarray(x, np.float64) for key, x in res.items()}


@functools.lru_cache(maxsize=None)
def torch_results(case: Case, dtype: str, backend: str) -> dict:
    q, k, v, mask, lengths, d_out = numpy_inputs(case, dtype)
    dtype = getattr(torch, dtype)
    q, k, v, d_out = (torch.tensor(_swap(x, case.layout)).to(DEVICE, dtype) for x in (q, k, v, d_out))
    for x in (q, k, v):
        x.requires_grad_()
    b = TORCH_BACKENDS[backend]
    kw = _kwargs(case, None if mask is None else torch.tensor(mask, device=DEVICE),
                 None if lengths is None else torch.tensor(lengths, device=DEVICE))
    if case.mask == "bias":
        kw["attn_mask"] = kw["attn_mask"].to(dtype).requires_grad_(b.supports_bias_grad)
    res = torch_ref.attention_forward(q, k, v, backend=backend, return_lse=b.supports_lse, **kw)
    out, lse = res if b.supports_lse else (res, None)
    wrt = [q, k, v] + ([kw["attn_mask"]] if case.mask == "bias" and b.supports_bias_grad else [])
    grads = torch.autograd.grad(out, wrt, d_out) + (None,) * (4 - len(wrt))
    f64 = lambda x, lay: None if x is None else _swap(x.detach().cpu().to(torch.float64).numpy(), lay)
    return {"out": f64(out, case.layout), "lse": f64(lse, "bnsd"), "dq": f64(grads[0], case.layout),
            "dk": f64(grads[1], case.layout), "dv": f64(grads[2], case.layout), "dbias": f64(grads[3], "bnsd")}


def _serves(case, dtype, jax_name, torch_name):
    """Whether both backends declare they can serve the case (the very same `Spec` on both sides)."""
    q, k, v, mask, lengths, _ = numpy_inputs(case, dtype)
    shaped = lambda x: jax.ShapeDtypeStruct(_swap(x, case.layout).shape, dtype)
    mask = None if mask is None else jax.ShapeDtypeStruct(mask.shape, mask.dtype)
    spec = validate(shaped(q), shaped(k), shaped(v), **_kwargs(case, mask, lengths))
    tb = TORCH_BACKENDS[torch_name]
    call = RunContext(device=DEVICE, grad=tb.supports_grad, return_lse=tb.supports_lse)
    return not JAX_BACKENDS[jax_name].reasons(spec) and not tb.reasons(spec, call)


def _fast(case, dtype, jax_name):
    """The fast run pairs the first cases, each with one JAX backend in turn, with every torch
    backend: every JAX and every torch backend, one JAX computation each; the rest is `slow`."""
    return JAX_NAMES.index(jax_name) == CASES.index((case, dtype))


PAIRS = [pytest.param(c, dt, j, t, id=f"{c.name}-{j}-{t}", marks=() if _fast(c, dt, j) else pytest.mark.slow)
         for c, dt in CASES for j in JAX_NAMES for t in TORCH_NAMES if _serves(c, dt, j, t)]


# Chunks that do not divide the lengths, in both frameworks: tails and several chunks
# (tests/conftest.py).
pytestmark = pytest.mark.small_chunks(8, 12, frameworks=("jax", "torch"))


@pytest.mark.fast_every(4)
@pytest.mark.parametrize("case,dtype,jax_name,torch_name", PAIRS)
def test_cross_framework_backends_agree(case, dtype, jax_name, torch_name):
    tol = TOL[dtype]
    j, t = jax_results(case, dtype, jax_name), torch_results(case, dtype, torch_name)
    for key in ("out", "lse", "dq", "dk", "dv", "dbias"):
        if t[key] is None or j[key] is None:  # lse from sdpa, dbias from pallas: not computed
            continue
        if key == "dbias" and not JAX_BACKENDS[jax_name].supports_bias_grad:
            continue
        limit = (2 if key in ("out", "lse") else 4) * (tol if key != "lse" else max(tol, TOL["float32"]))
        err = reference.relative_error(t[key], j[key])
        assert err <= limit, f"{key}: {jax_name} vs {torch_name}: relative difference {err:.2e} > {limit:.0e}"


def test_cross_framework_every_backend_is_compared():
    """Each runnable backend of each framework meets the other framework in at least one pair."""
    pairs = {(p.values[2], p.values[3]) for p in PAIRS}
    assert {j for j, _ in pairs} == set(JAX_NAMES) and {t for _, t in pairs} == set(TORCH_NAMES)
    assert {"naive", "xla", "chunked"} <= set(JAX_NAMES)


@pytest.mark.parametrize("name", [n for n in TORCH_BACKENDS if n not in TORCH_NAMES])
def test_cross_framework_unavailable_torch_backend(name):
    pytest.skip(f"torch backend {name} unavailable here: {'; '.join(TORCH_BACKENDS[name].unavailable())}")


def test_cross_framework_lse_of_empty_rows_is_minus_infinity_in_both():
    case, dtype = CASES[2]  # `cases.inputs` pads the last sample fully
    j, t = jax_results(case, dtype, "naive"), torch_results(case, dtype, "chunked")
    assert np.isneginf(j["lse"][-1]).all() and np.isneginf(t["lse"][-1]).all()
    assert (j["out"][-1] == 0).all() and (t["out"][-1] == 0).all()


# --- modules and processors: the same classes, the same weights, the same results -------------
# Modules run float32 on the CPU through the same math in a different summation order (seen
# ~1e-6 relative); 1e-4 leaves room for that and still catches any real difference.
MODULE_TOL = 1e-4

from flax import nnx  # noqa: E402

import jax_attn.attention as JA  # noqa: E402
import torch_ref.attention as TA  # noqa: E402
from jax_attn import processors as P  # noqa: E402
from torch_ref.convert import flax_state_dict, load_state_dict_into_flax  # noqa: E402

B, SQ, SKV, DIM, CTX, HEADS, DHEAD = 2, 6, 7, 32, 24, 4, 8


def _module_inputs(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((B, SQ, DIM)).astype(np.float32)
    ctx = rng.standard_normal((B, SKV, CTX)).astype(np.float32)
    mask = rng.random((B, SKV)) < 0.7
    mask[:, 0] = True  # every row keeps a key (diffusers' finite -10000 bias differs on empty rows)
    return x, ctx, mask, np.asarray([5, SKV], np.int32), rng


def _pair(cross=True, qk_norm="rms_norm", processor=None, bias=True):
    """A Flax and a torch `Attention` with the same weights (Flax -> torch), same processor object."""
    kw = dict(cross_attention_dim=CTX if cross else None, heads=HEADS, dim_head=DHEAD, bias=bias, qk_norm=qk_norm)
    ja, ta = JA.Attention(DIM, **kw, rngs=nnx.Rngs(0)), TA.Attention(DIM, **kw)
    if processor is not None:
        JA.set_attn_processor(ja, processor)
        TA.set_attn_processor(ta, processor)
        _randomize_processor_params(ja)
    ta.load_state_dict(flax_state_dict(ja))
    return ja, ta


def _randomize_processor_params(flax_model):
    """LoRA's up-projections start at zero (no effect): make every processor parameter random."""
    rng = np.random.default_rng(1)
    for layer in JA.attention_layers(flax_model).values():
        for name in list(layer.processor_state.keys()):
            var = layer.processor_state[name]
            if isinstance(var, nnx.Param):
                var.set_value(jnp.asarray(0.3 * rng.standard_normal(var.get_value().shape), jnp.float32))


def _source_maps():
    rng = np.random.default_rng(2)
    p = rng.random((B, HEADS, SQ, SKV)).astype(np.float32)
    return p / p.sum(-1, keepdims=True)


PROCESSORS = {
    "default": (lambda: P.AttnProcessor(), {}),
    "sliced": (lambda: P.SlicedAttnProcessor(3), {}),
    "map_store": (lambda: P.AttentionMapStore(queries=(0, 4), average_heads=False), {}),
    "map_store_mean": (lambda: P.AttentionMapStore(), {}),
    "reweight": (lambda: P.AttentionReweightProcessor({1: 2.0, 3: 0.0}), {}),
    "reweight_no_renorm": (lambda: P.AttentionReweightProcessor({1: 2.0, 3: -0.5}, renormalize=False), {}),
    "map_replace": (lambda: P.AttentionMapReplaceProcessor(), {"source_maps": {"": _source_maps()}}),
    "lora": (lambda: P.LoRAAttnProcessor(rank=2), {"scale": 0.5}),
}


@pytest.mark.fast_every(4)
@pytest.mark.fast_diagonal  # the fast run: each processor once, the maskings in turn
@pytest.mark.parametrize("masking", ["mask", "both"])
@pytest.mark.parametrize("name", list(PROCESSORS))
def test_cross_framework_processor_gives_the_same_result(name, masking):
    make, kwargs = PROCESSORS[name]
    processor = make()  # one object, attached to both frameworks' modules
    ja, ta = _pair(processor=processor)
    x, ctx, mask, lengths, rng = _module_inputs()
    j_kw = dict(kwargs, **({"attention_mask": jnp.asarray(mask)} if masking != "kv_lengths" else {}),
                **({"kv_lengths": jnp.asarray(lengths)} if masking != "mask" else {}))
    t_kw = {k: torch.tensor(np.asarray(v)) if hasattr(v, "shape") else v for k, v in j_kw.items()}
    if "source_maps" in kwargs:
        t_kw["source_maps"] = {k: torch.tensor(v) for k, v in kwargs["source_maps"].items()}
    cot = rng.standard_normal((B, SQ, DIM)).astype(np.float32)
    j_out = ja(jnp.asarray(x), jnp.asarray(ctx), **j_kw)
    tx = torch.tensor(x, requires_grad=True)
    t_out = ta(tx, torch.tensor(ctx), **t_kw)
    assert reference.relative_error(t_out.detach(), j_out) <= MODULE_TOL
    if not isinstance(processor, P.AttentionMapStore):  # it writes module state: not under jax.grad
        j_dx = jax.grad(lambda x: jnp.sum(ja(x, jnp.asarray(ctx), **j_kw) * cot))(jnp.asarray(x))
        (t_dx,) = torch.autograd.grad(t_out, tx, torch.tensor(cot), materialize_grads=True)
        assert reference.relative_error(t_dx, j_dx) <= MODULE_TOL
    else:
        j_maps, t_maps = processor.maps(ja), processor.maps(ta)
        assert set(j_maps) == set(t_maps) == {""}
        assert reference.relative_error(t_maps[""].detach(), j_maps[""]) <= MODULE_TOL


def test_cross_framework_processor_dict_and_kwargs_errors_match():
    ja, ta = _pair()
    for set_fn, m in ((JA.set_attn_processor, ja), (TA.set_attn_processor, ta)):
        with pytest.raises(ValueError, match=r"missing \['processor'\]"):
            set_fn(m, {"nope.processor": P.AttnProcessor()})
    x, ctx, _, _, _ = _module_inputs()
    with pytest.raises(TypeError) as j_err:
        ja(jnp.asarray(x), jnp.asarray(ctx), scale=2.0)
    with pytest.raises(TypeError) as t_err:
        ta(torch.tensor(x), torch.tensor(ctx), scale=2.0)
    assert str(j_err.value) == str(t_err.value)
    assert set(JA.attn_processors(ja)) == set(TA.attn_processors(ta)) == {"processor"}


# --- weight conversion -------------------------------------------------------------------------

def test_cross_framework_weights_round_trip_and_errors_name_every_problem():
    ja, ta = _pair(qk_norm="layer_norm")
    sd = ta.state_dict()
    fresh = JA.Attention(DIM, CTX, heads=HEADS, dim_head=DHEAD, bias=True, qk_norm="layer_norm", rngs=nnx.Rngs(7))
    load_state_dict_into_flax(fresh, sd)
    back = flax_state_dict(fresh)
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
    bad = dict(sd)
    bad["to_q.weight"] = bad["to_q.weight"].T.contiguous()[:, :5]
    bad["to_v.weight"] = bad["to_v.weight"].half()
    bad["extra.weight"] = torch.zeros(1)
    del bad["to_k.bias"]
    with pytest.raises(ValueError) as err:
        load_state_dict_into_flax(fresh, bad)
    text = str(err.value)
    for expected in ("missing keys: ['to_k.bias']", "unexpected keys: ['extra.weight']",
                     "to_q.weight: shape (32, 5)", "to_v.weight: dtype float16 differs"):
        assert expected in text
    load_state_dict_into_flax(fresh, {**sd, "to_v.weight": sd["to_v.weight"].half()}, cast=True)


def test_cross_framework_bfloat16_weights_convert():
    ja = JA.Attention(DIM, heads=HEADS, dim_head=DHEAD, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    sd = flax_state_dict(ja)
    assert all(t.dtype == torch.bfloat16 for t in sd.values())
    ta = TA.Attention(DIM, heads=HEADS, dim_head=DHEAD, dtype=torch.bfloat16)
    ta.load_state_dict(sd)
    load_state_dict_into_flax(ja, ta.state_dict())


# --- diffusers' own Attention ---------------------------------------------------------------

@pytest.fixture(scope="module")
def diffusers_attention():
    ap = pytest.importorskip("diffusers.models.attention_processor",
                             reason="diffusers is not installed (pip install diffusers)")
    return ap


@pytest.mark.fast_diagonal  # the fast run: each configuration once, the processors in turn
@pytest.mark.parametrize("diffusers_processor", ["AttnProcessor2_0", "AttnProcessor"])
@pytest.mark.parametrize("cross,qk_norm,mask", [
    (False, None, "none"), (True, None, "bool"), (True, "layer_norm", "bias"),
    (False, "rms_norm", "bias"), (True, "rms_norm", "none"), (True, None, "bias")])
def test_cross_framework_flax_attention_matches_diffusers(diffusers_attention, diffusers_processor,
                                                         cross, qk_norm, mask):
    if diffusers_processor == "AttnProcessor" and mask == "bool":
        pytest.skip("diffusers' AttnProcessor adds the mask as a bias: it takes float masks only")
    if diffusers_processor == "AttnProcessor" and qk_norm is not None:
        pytest.skip("diffusers' AttnProcessor does not apply norm_q / norm_k")
    torch.manual_seed(0)
    kw = dict(cross_attention_dim=CTX if cross else None, heads=HEADS, dim_head=DHEAD, bias=True, qk_norm=qk_norm)
    da = diffusers_attention.Attention(DIM, **kw, processor=getattr(diffusers_attention, diffusers_processor)())
    ja = JA.Attention(DIM, **kw, rngs=nnx.Rngs(3))
    load_state_dict_into_flax(ja, da.state_dict())
    ta = TA.Attention(DIM, **kw)
    ta.load_state_dict(da.state_dict())  # strict: the very same names and shapes
    x, ctx, keep, _, rng = _module_inputs()
    ctx = ctx if cross else None
    m = None
    if mask == "bool":
        m = keep[:, None, :]  # (b, 1, skv), as diffusers' processors expect
    elif mask == "bias":  # diffusers' convention: -10000 on dropped keys, plus a real bias here
        m = (np.where(keep, 0.0, -10000.0) + rng.standard_normal(keep.shape))[:, None, :].astype(np.float32)
        if not cross:
            m = m[..., :1].repeat(SQ, -1)  # self-attention: skv = sq
    t = lambda a: None if a is None else torch.tensor(a)
    with torch.no_grad():
        ref = da(t(x), t(ctx), attention_mask=t(m))
        t_out = ta(t(x), t(ctx), attention_mask=t(m))
    j_out = ja(jnp.asarray(x), None if ctx is None else jnp.asarray(ctx),
               attention_mask=None if m is None else jnp.asarray(m))
    assert reference.relative_error(j_out, ref) <= MODULE_TOL
    assert reference.relative_error(t_out, ref) <= MODULE_TOL


# --- the example model ---------------------------------------------------------------------

from jax_attn.models.dit import DiTConfig, TinyDiT as FlaxDiT  # noqa: E402
from torch_ref.models import TinyDiT as TorchDiT  # noqa: E402


def _dit_inputs(cfg, seed=0):
    rng = np.random.default_rng(seed)
    lat = rng.standard_normal((2, cfg.sample_size, cfg.sample_size, cfg.in_channels)).astype(np.float32)
    txt = rng.standard_normal((2, 6, cfg.cross_attention_dim)).astype(np.float32)
    keep = np.array([[1, 1, 1, 0, 0, 0], [1] * 6], np.int32)
    return lat, np.array([10.0, 500.0], np.float32), txt, keep, rng


@pytest.mark.slow  # a whole model, jitted, forward and backward in both frameworks
@pytest.mark.parametrize("direction", ["flax_to_torch", "torch_to_flax"])
def test_cross_framework_example_model_matches_its_torch_twin(direction):
    cfg = DiTConfig(sample_size=8, depth=2)
    jm, tm = FlaxDiT(cfg, rngs=nnx.Rngs(0)), TorchDiT(cfg)
    if direction == "flax_to_torch":
        tm.load_state_dict(flax_state_dict(jm))
    else:
        load_state_dict_into_flax(jm, tm.state_dict())
    self_lora, cross_lora = P.LoRAAttnProcessor(rank=2, targets=("q", "v")), P.LoRAAttnProcessor(rank=3)
    procs = {k: cross_lora if "attn2" in k else self_lora for k in JA.attn_processors(jm)}
    assert set(procs) == set(TA.attn_processors(tm))
    JA.set_attn_processor(jm, procs)
    TA.set_attn_processor(tm, procs)
    _randomize_processor_params(jm)
    tm.load_state_dict(flax_state_dict(jm))  # carries the LoRA weights
    lat, ts, txt, keep, rng = _dit_inputs(cfg)
    cot = rng.standard_normal(lat.shape).astype(np.float32)
    kw = dict(cross_attention_kwargs={"scale": 0.7})
    @nnx.jit  # one compiled program: op-by-op eager dispatch takes ~10 s here
    def out_and_grad(model, lat, cot):
        out, vjp = jax.vjp(lambda l: model(l, jnp.asarray(ts), jnp.asarray(txt), jnp.asarray(keep), **kw), lat)
        return out, vjp(cot)[0]

    j_out, j_grad = out_and_grad(jm, jnp.asarray(lat), jnp.asarray(cot))
    tl = torch.tensor(lat, requires_grad=True)
    t_out = tm(tl, torch.tensor(ts), torch.tensor(txt), torch.tensor(keep), **kw)
    (t_grad,) = torch.autograd.grad(t_out, tl, torch.tensor(cot))
    assert reference.relative_error(t_out.detach(), j_out) <= MODULE_TOL
    assert reference.relative_error(t_grad, j_grad) <= MODULE_TOL


@pytest.mark.slow  # `check` over two cases in both frameworks
def test_cross_framework_cli_check_pairs_pass():
    from jax_attn.cli import CASES
    from torch_ref.check import compare_with_jax
    rows = compare_with_jax([CASES[2].scaled(32), CASES[3].scaled(32)], jax_backends=["xla", "chunked"])
    assert len(rows) >= 4 and all(r["status"] == "pass" for r in rows), rows
