"""`set_attn_processor` and `Attention.set_processor` are all or nothing, in both frameworks.

A bad request (keys, values) is refused before any layer changes; a processor whose `setup`
raises leaves every layer with its previous processor object and its previous processor state
(values and variables), and the original exception propagates.
"""
from __future__ import annotations

import re

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import jax_attn.attention as JA
import torch_ref.attention as TA
from jax_attn import processors as P
from test_attention_module import Pair, inputs


class TorchPair(torch.nn.Module):
    """The torch twin of `test_attention_module.Pair`: a self- then a cross-attention layer."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layers = torch.nn.ModuleList([TA.Attention(16, None, heads=3, dim_head=8, bias=True),
                                           TA.Attention(16, 12, heads=3, dim_head=8, bias=True)])

    def forward(self, x, ctx):
        return self.layers[1](self.layers[0](x), ctx)


class Jax:
    set_attn_processor = staticmethod(JA.set_attn_processor)
    attn_processors = staticmethod(JA.attn_processors)
    layers = staticmethod(JA.attention_layers)
    model = staticmethod(Pair)

    @staticmethod
    def variables(layer):
        return dict(layer.processor_state.items())

    @staticmethod
    def value(var):
        return np.array(var.get_value())

    @staticmethod
    def call(model):
        return np.asarray(model(*inputs(True)))

    array = staticmethod(jnp.asarray)


class Torch:
    set_attn_processor = staticmethod(TA.set_attn_processor)
    attn_processors = staticmethod(TA.attn_processors)
    layers = staticmethod(TA.attention_layers)
    model = staticmethod(TorchPair)

    @staticmethod
    def variables(layer):
        return {**dict(layer.processor_state.named_parameters()),
                **dict(layer.processor_state.named_buffers())}

    @staticmethod
    def value(var):
        return var.detach().clone().numpy()

    array = staticmethod(torch.from_numpy)

    @staticmethod
    def call(model):
        x, ctx = (torch.tensor(np.asarray(a)) for a in inputs(True))
        with torch.no_grad():
            return model(x, ctx).numpy()


@pytest.fixture(params=[Jax, Torch], ids=["jax", "torch"])
def fw(request):
    return request.param


def trained(fw):
    """A model whose layers hold state-owning processors with non-trivial state: LoRA weights
    (random, as if trained) on layer 0 and an `AttentionMapStore` holding maps on layer 1."""
    model = fw.model()
    fw.set_attn_processor(model, {"layers.0": P.LoRAAttnProcessor(rank=2),
                                  "layers.1.processor": P.AttentionMapStore()})
    rng = np.random.default_rng(0)
    lora = fw.layers(model)["layers.0"]
    for name, var in fw.variables(lora).items():
        lora.set_state(name, fw.array(0.3 * rng.standard_normal(tuple(var.shape)).astype(np.float32)))
    out = fw.call(model)  # fills the stored maps
    assert fw.value(fw.variables(fw.layers(model)["layers.1"])["attention_maps"]).size > 0
    return model, out


def snapshot(fw, model):
    """Processor objects, state variables and state values of every layer."""
    procs = fw.attn_processors(model)
    variables = {p: fw.variables(layer) for p, layer in fw.layers(model).items()}
    values = {p: {n: fw.value(v) for n, v in vs.items()} for p, vs in variables.items()}
    return procs, variables, values


def assert_unchanged(fw, model, before, out):
    procs, variables, values = before
    now_procs, now_vars, now_values = snapshot(fw, model)
    assert list(now_procs) == list(procs)
    assert all(now_procs[k] is procs[k] for k in procs), (now_procs, procs)
    assert {p: set(v) for p, v in now_vars.items()} == {p: set(v) for p, v in variables.items()}
    for p in variables:
        for name, var in variables[p].items():
            assert now_vars[p][name] is var, (p, name)
            np.testing.assert_array_equal(now_values[p][name], values[p][name])
    np.testing.assert_array_equal(fw.call(model), out)  # and it computes what it did


BAD_REQUESTS = {
    # id: (request, error type, regexes the message must contain)
    "non_string_key": (lambda: {"layers.0": P.AttnProcessor(), ("layers", 1): P.AttnProcessor()},
                       TypeError, [re.escape("('layers', 1)")]),
    "same_layer_twice": (lambda: {"layers.0": P.AttnProcessor(), "layers.1": P.AttnProcessor(),
                                  "layers.0.processor": P.AttnProcessor()},
                         ValueError, ["'layers.0'", "'layers.0.processor'"]),
    "class_in_dict": (lambda: {"layers.0": P.AttnProcessor(), "layers.1": P.LoRAAttnProcessor},
                      TypeError, [re.escape("pass an instance, e.g. AttnProcessor()"), "'layers.1'",
                                  "LoRAAttnProcessor"]),
    "class_for_all": (lambda: P.AttnProcessor, TypeError,
                      [re.escape("pass an instance, e.g. AttnProcessor()")]),
    "not_callable": (lambda: {"layers.0": P.AttnProcessor(), "layers.1.processor": 42},
                     TypeError, ["'layers.1.processor'", "callable", "int"]),
    "neither_processor_nor_dict": (lambda: [P.AttnProcessor(), P.AttnProcessor()],
                                   TypeError, ["dict", "list"]),
    # Already refused before any change by the old code; kept as regression guards.
    "missing": (lambda: {"layers.0": P.AttnProcessor()}, ValueError,
                [re.escape("missing ['layers.1.processor']")]),
    "unknown": (lambda: {"layers.0": P.AttnProcessor(), "layers.1": P.AttnProcessor(),
                         "layers.7": P.AttnProcessor()},
                ValueError, [re.escape("unknown ['layers.7.processor']")]),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_request_is_refused_before_any_layer_changes(fw, case):
    make_request, error, patterns = BAD_REQUESTS[case]
    model, out = trained(fw)
    before = snapshot(fw, model)
    with pytest.raises(error) as info:
        fw.set_attn_processor(model, make_request())
    for pattern in patterns:
        assert re.search(pattern, str(info.value)), (pattern, str(info.value))
    assert_unchanged(fw, model, before, out)


class SetupFailed(RuntimeError):
    pass


class FailOnSecondSetup(P.AttnProcessor):
    """Creates state in `setup` like LoRA does, then fails on its second layer."""

    def __init__(self, fail_on=2):
        self.fail_on = fail_on
        self.calls = [0]  # a mutable counter: the processor freezes once attached

    def setup(self, attn):
        self.calls[0] += 1
        attn.new_param("extra", (2, 3), init="normal")
        if self.calls[0] == self.fail_on:
            raise SetupFailed(f"setup failed at {attn.layer_name!r}")


def test_setup_failing_on_the_second_layer_rolls_the_first_back(fw):
    model, out = trained(fw)
    before = snapshot(fw, model)
    proc = FailOnSecondSetup()
    with pytest.raises(SetupFailed, match="setup failed at 'layers.1'"):
        fw.set_attn_processor(model, proc)
    assert proc.calls == [2]  # layer 0 was set (and rolled back), layer 1 failed
    assert_unchanged(fw, model, before, out)
    proc.fail_on = 0  # not left frozen: it is attached nowhere
    fw.set_attn_processor(model, proc)  # and it can be set afterwards
    assert all(p is proc for p in fw.attn_processors(model).values())


def test_setup_failing_in_a_dict_rolls_back(fw):
    model, out = trained(fw)
    before = snapshot(fw, model)
    with pytest.raises(SetupFailed):
        fw.set_attn_processor(model, {"layers.0": P.LoRAAttnProcessor(rank=3),
                                      "layers.1": FailOnSecondSetup(fail_on=1)})
    assert_unchanged(fw, model, before, out)


def test_single_layer_set_processor_is_atomic(fw):
    model, out = trained(fw)
    layer = fw.layers(model)["layers.0"]
    before = snapshot(fw, model)
    with pytest.raises(TypeError, match=re.escape("pass an instance, e.g. AttnProcessor()")):
        layer.set_processor(P.SlicedAttnProcessor)
    with pytest.raises(TypeError, match="callable"):
        layer.set_processor("AttnProcessor")
    with pytest.raises(SetupFailed):
        layer.set_processor(FailOnSecondSetup(fail_on=1))
    assert_unchanged(fw, model, before, out)


def test_jax_rollback_restores_nnx_state():
    """The restored LoRA weights are the model's `nnx.Param`s again (what `nnx.grad` trains)."""
    model, _ = trained(Jax)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    with pytest.raises(SetupFailed):
        JA.set_attn_processor(model, FailOnSecondSetup())
    again = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    flat, flat_again = (dict(nnx.traversals.flatten_mapping(d)) for d in (params, again))
    assert set(flat) == set(flat_again)
    assert any("lora" in "/".join(map(str, k)) for k in flat)
    for k in flat:
        np.testing.assert_array_equal(np.asarray(flat[k]), np.asarray(flat_again[k]))


def test_torch_rollback_restores_state_dict():
    model, _ = trained(Torch)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(SetupFailed):
        TA.set_attn_processor(model, FailOnSecondSetup())
    again = model.state_dict()
    assert list(again) == list(sd)
    assert any("lora" in k for k in sd)
    for k in sd:
        torch.testing.assert_close(again[k], sd[k], rtol=0, atol=0)
