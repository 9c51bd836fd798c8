"""The neutral core (`jax_attn.choice`, `jax_attn.cases`, `jax_attn.visibility`): written once,
importing no array framework, and what both `jax_attn` and `torch_ref` run.

The router is specified here on a toy registry; that the two packages instantiate it (and do not
carry copies) is checked by identity, and the shared geometry by running it on NumPy, jnp and
torch arrays alike.
"""
from __future__ import annotations

import ast
import contextvars
import dataclasses
import itertools
import logging
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jax_attn
import torch_ref
from jax_attn import cases, choice, visibility
from jax_attn import masking as jax_masking
from jax_attn import routing as jax_routing
from jax_attn.contract import validate
from torch_ref import masking as torch_masking
from torch_ref import routing as torch_routing

ROOT = pathlib.Path(jax_attn.__file__).parent
ENV = "TOY_ATTN_BACKEND"


# --- the router, on a toy registry ------------------------------------------------------------

@dataclasses.dataclass
class Toy:
    """A backend of the toy registry: it refuses calls for `refuse` (the call is a set of words)."""

    refuse: tuple = ()
    automatic: bool = True

    def reasons(self, call) -> list[str]:
        return [f"cannot do {w}" for w in self.refuse if w in call]


REGISTRY = {"fast": Toy(refuse=("masks",)), "exotic": Toy(automatic=False), "slow": Toy()}
CONTEXT: contextvars.ContextVar = contextvars.ContextVar("toy_backend", default=None)
LOG = logging.getLogger("tests.toy_routing")


@pytest.fixture
def router(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    return choice.Router(REGISTRY, ENV, CONTEXT, LOG)


def decide(router, backend=None, call=(), inference=None):
    return router.decide(backend, lambda b: b.reasons(call), lambda: ["fast", "exotic", "slow"],
                         inference and (lambda: inference))


def test_an_explicit_name_is_taken_or_refused_with_its_reasons(router):
    d = decide(router, "exotic")
    assert (d.backend, d.source, d.candidates) == ("exotic", "argument", ("exotic",))
    assert router.chosen(d) is REGISTRY["exotic"]
    d = decide(router, "fast", call={"masks"})
    assert d.backend is None and d.reasons["fast"] == ["cannot do masks"]
    with pytest.raises(choice.BackendError, match=r"choice 'fast' from argument\):\n  fast: cannot do masks"):
        router.chosen(d)


def test_a_list_falls_through_and_logs_once(router, caplog):
    with caplog.at_level(logging.WARNING, logger=LOG.name):
        for _ in range(3):
            d = decide(router, "fast, slow", call={"masks"})
            assert router.chosen(d) is REGISTRY["slow"]
    records = [r.getMessage() for r in caplog.records]
    assert records == ["attention: using 'slow' from argument; skipped fast (cannot do masks)"]
    assert router.logged  # what `_logged.clear()` resets in the packages' tests


def test_auto_takes_the_first_automatic_backend_that_can_serve(router, caplog):
    d = decide(router)
    assert (d.backend, d.source, d.candidates, d.forward_only) == ("fast", "automatic",
                                                                  ("fast", "exotic", "slow"), None)
    with caplog.at_level(logging.DEBUG, logger=LOG.name):
        d = decide(router, call={"masks"})  # exotic can serve, but is never chosen automatically
        assert (d.backend, d.source) == ("slow", "automatic") and router.chosen(d) is REGISTRY["slow"]
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.DEBUG, "attention: auto chose 'slow' over fast, exotic")]  # no warning for auto
    assert decide(router, "auto").source == "argument"
    d = decide(router, inference=["slow", "fast"])  # another order for undifferentiated calls
    assert (d.backend, d.forward_only) == ("fast", "slow")
    assert decide(router, inference=["fast"]).forward_only is None
    d = decide(router, call={"masks"}, inference=None)
    assert d.reasons == {"fast": ["cannot do masks"], "exotic": [], "slow": []}


def test_nothing_can_serve_lists_every_candidate(router):
    d = decide(router, "fast", call={"masks"})
    d = dataclasses.replace(d, candidates=("fast", "exotic"))
    with pytest.raises(choice.BackendError, match="exotic: not chosen automatically"):
        router.chosen(d)


@pytest.mark.parametrize("bad, match", [("nope", "unknown backend 'nope'; known: fast, exotic, slow, 'auto' or 'auto\\+8bit'"),
                                        ("slow,nope", "unknown backend 'nope'"),
                                        ("auto,slow", "'auto' cannot be combined"),
                                        (" , ", "names no backend"),
                                        (["slow", 3], "list of names"), (3, "got int")])
def test_bad_choices_raise_naming_their_source(router, monkeypatch, bad, match):
    error = TypeError if not isinstance(bad, str) else ValueError
    with pytest.raises(error, match=match):
        router.current_choice(bad)
    with pytest.raises(error, match=f"use_backend.*{match}" if error is ValueError else match):
        with router.use_backend(bad):
            pass
    if isinstance(bad, str):
        monkeypatch.setenv(ENV, bad)
        with pytest.raises(ValueError, match=ENV):
            router.current_choice()


def test_priority_argument_context_env_and_nesting(router, monkeypatch):
    assert router.current_choice() == (("auto",), "automatic")
    monkeypatch.setenv(ENV, " slow , fast ")
    assert router.current_choice() == (("slow", "fast"), ENV)
    with router.use_backend("exotic"):
        assert router.current_choice() == (("exotic",), "use_backend")
        with router.use_backend(["fast", "slow"]):
            assert router.current_choice() == (("fast", "slow"), "use_backend")
            assert router.current_choice("slow") == (("slow",), "argument")
        assert router.current_choice() == (("exotic",), "use_backend")
    assert CONTEXT.get() is None and router.current_choice() == (("slow", "fast"), ENV)
    with pytest.raises(RuntimeError):  # an exception inside a block still restores the context
        with router.use_backend("slow"):
            raise RuntimeError
    assert CONTEXT.get() is None


def test_parse_choice_checks_against_the_registry_or_the_names_given(router):
    assert router.parse_choice("slow") == ("slow",) and router.parse_choice("auto") == ("auto",)
    assert router.parse_choice("other", known=["other"]) == ("other",)
    assert choice.parse_choice(("a", " b "), "x", ["a", "b"]) == ("a", "b")


def test_decision_prints_the_choice_then_every_backend():
    d = choice.Decision("slow", "automatic", ("fast", "slow"), {"fast": ["cannot do masks"], "slow": []},
                        forward_only="fast")
    assert str(d) == ("chosen: slow (by automatic; tried fast, slow); fast when nothing differentiates"
                      " the call\n  fast     cannot do masks\n  slow     ok")
    d = choice.Decision(None, "argument", ("fast",), {"fast": []}, kernel="k", kernel_why="why")
    assert str(d).splitlines()[:2] == ["chosen: none (by argument; tried fast)", "kernel: k (why)"]


# --- both packages run that router -------------------------------------------------------------

def test_jax_attn_and_torch_ref_instantiate_the_one_router():
    for routing, env, registry in ((jax_routing, "JAX_ATTN_BACKEND", jax_attn.backends.BACKENDS),
                                   (torch_routing, "TORCH_REF_ATTN_BACKEND", torch_ref.backends.BACKENDS)):
        router = routing.ROUTER
        assert type(router) is choice.Router and router.registry is registry
        assert router.env_var == routing.ENV_VAR == env and router.context is routing._context
        assert router.logged is routing._logged and router.log is logging.getLogger(routing.__name__)
        for name in ("parse_choice", "use_backend", "current_choice"):
            assert getattr(routing, name).__self__ is router
            assert getattr(routing, name).__func__ is getattr(choice.Router, name)
        assert issubclass(routing.Decision, choice.Decision)
    assert jax_routing.ROUTER is not torch_routing.ROUTER
    assert jax_attn.BackendError is jax_routing.BackendError is choice.BackendError is torch_ref.BackendError
    assert torch_routing.Decision is choice.Decision
    assert jax_attn.use_backend == jax_routing.ROUTER.use_backend
    assert torch_ref.use_backend == torch_routing.ROUTER.use_backend


def test_each_package_routes_by_its_own_registry_and_env_var(monkeypatch):
    monkeypatch.setenv("JAX_ATTN_BACKEND", "naive")
    monkeypatch.setenv("TORCH_REF_ATTN_BACKEND", "sdpa")
    s = jax.ShapeDtypeStruct((1, 2, 8, 8), jnp.float32)
    assert jax_attn.explain(s, s, s).backend == "naive"
    t = torch.zeros(1, 2, 8, 8)
    assert torch_ref.explain(t, t, t).backend == "sdpa"
    with pytest.raises(ValueError, match="unknown backend 'sdpa'; known: pallas, "):  # jax's registry
        jax_routing.parse_choice("sdpa")
    assert torch_routing.parse_choice("sdpa") == ("sdpa",)
    d = jax_routing.Decision("pallas", "argument", ("pallas",), {}, kernel="triton", kernel_why="why")
    assert str(d).splitlines()[1] == ("kernel: pallas runs the triton kernel (why); override with "
                                      "JAX_ATTN_PALLAS_KERNEL=triton|mosaic|auto")


# --- the neutral modules import no array framework ---------------------------------------------

@pytest.mark.parametrize("module", ["choice", "cases", "visibility", "module_rules"])
def test_neutral_modules_import_no_framework(module):
    tree = ast.parse((ROOT / f"{module}.py").read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add("." if node.level else node.module.split(".")[0])
    assert not imported & {"jax", "jaxlib", "flax", "torch"}, imported


def test_torch_ref_check_no_longer_imports_the_cli():
    """The former import cycle: `jax_attn.cli` imports `torch_ref.check` for its torch rows."""
    source = (ROOT.parent / "torch_ref" / "check.py").read_text()
    assert "jax_attn.cli" not in source and "jax_attn import cli" not in source


# --- check cases: one definition, the same numbers in both frameworks --------------------------

def test_the_cli_serves_the_neutral_cases():
    from jax_attn import cli
    assert cli.CASES is cases.CASES and cli.Case is cases.Case


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_both_frameworks_check_the_same_values(dtype):
    """torch_ref's inputs hold exactly the values JAX checks (NumPy's rounding, as `jnp.asarray`:
    torch's own float64 -> float16 conversion rounds twice and would differ in the last bit)."""
    from torch_ref.check import _case_inputs
    for case in (cases.CASES[4], cases.CASES[5], cases.CASES[12]):  # bool mask, bias, NaN padding
        case = case.scaled(16)
        q, k, v, kw = cases.inputs(case, dtype, 3, jnp.asarray)
        tq, tk, tv, mask, lengths, d_out, extra = _case_inputs(case, dtype, 3)
        f64 = lambda x: np.asarray(x.astype(jnp.float32), np.float64)  # noqa: E731
        for j, t in ((q, tq), (k, tk), (v, tv)):
            np.testing.assert_array_equal(f64(j), t)
            assert np.array_equal(t, torch.tensor(t, dtype=getattr(torch, dtype)).double().numpy(),
                                  equal_nan=True)  # torch holds them exactly
        if "attn_mask" in kw:
            np.testing.assert_array_equal(f64(kw["attn_mask"]) if mask.dtype != bool else kw["attn_mask"], mask)
        if "kv_lengths" in kw:
            np.testing.assert_array_equal(kw["kv_lengths"], lengths)
        np.testing.assert_array_equal(d_out, cases.output_cotangent(case, 3))


@pytest.mark.slow
def test_torch_rows_run_on_the_neutral_cases():
    from torch_ref.check import compare_with_jax, compare_with_reference
    some = [c.scaled(64) for c in (cases.CASES[5], cases.CASES[11])]  # a bias; query and key padding
    rows = compare_with_reference(some, backends=["naive"])
    assert [r["status"] for r in rows] == ["pass", "pass"]
    rows = compare_with_jax(some, jax_backends=["naive"], torch_backends=["naive"])
    assert [r["status"] for r in rows] == ["pass", "pass"]


def test_case_inputs_follow_the_case():
    case = cases.Case("t", 3, 4, 2, 10, 12, 8, 6, mask="key", kv_lengths=True, q_lengths=True,
                      poison=True, window=(2, 1), layout="bsnd")
    q, k, v, kw = cases.inputs(case, "float32", 0)
    assert (q.shape, k.shape, v.shape) == ((3, 4, 10, 8), (3, 2, 12, 8), (3, 2, 12, 6))
    assert q.dtype == np.float32 and kw["attn_mask"].dtype == bool and kw["kv_lengths"].dtype == np.int32
    assert kw["kv_lengths"][-1] == 0 and kw["query_seq_lengths"][-1] == 10
    assert kw["local_window_size"] == (2, 1) and kw["layout"] == "bsnd" and not kw["is_causal"]
    pad = np.arange(12) >= kw["kv_lengths"][:, None]
    assert np.isnan(k[pad.nonzero()[0], :, pad.nonzero()[1]]).all() and not np.isnan(q).any()
    again = cases.inputs(case, "float32", 0)
    assert all(np.array_equal(a, b, equal_nan=True) for a, b in zip((q, k, v), again[:3]))
    assert cases.inputs(case, "bfloat16", 0)[0].dtype.name == "bfloat16"


# --- visibility: one geometry for NumPy, jnp and torch arrays ----------------------------------

def test_masking_modules_use_the_neutral_geometry():
    assert jax_masking.window_keep is visibility.window_keep is torch_masking.window_keep
    assert torch_ref.api.lengths_alias is visibility.lengths_alias


GEOMETRIES = [dict(is_causal=c, local_window_size=w) for c, w in
              itertools.product((False, True), (None, 2, (None, 1), (3, None), (1, 0)))]


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=str)
@pytest.mark.parametrize("masking", ["none", "bool-full", "bias-per-key", "bias-full-gqa-heads"])
def test_seen_keys_agree_on_numpy_jnp_and_torch(geometry, masking):
    rng = np.random.default_rng(len(masking))
    b, n, n_kv, sq, skv = 3, 4, 2, 7, 9
    mask = {"none": None,
            "bool-full": rng.random((b, 1, sq, skv)) < 0.6,
            "bias-per-key": np.where(rng.random((b, 1, 1, skv)) < 0.7, 0.5, -np.inf).astype(np.float32),
            "bias-full-gqa-heads": np.where(rng.random((1, n, sq, skv)) < 0.5, 1.0, -np.inf).astype(np.float32),
            }[masking]
    kv_lengths = np.array([9, 4, 0], np.int32)
    for q_lengths in (None, np.array([7, 3, 0], np.int32)):
        spec = validate(jax.ShapeDtypeStruct((b, n, sq, 8), jnp.float32),
                        *[jax.ShapeDtypeStruct((b, n_kv, skv, 8), jnp.float32)] * 2,
                        attn_mask=mask, kv_lengths=kv_lengths, query_seq_lengths=q_lengths, **geometry)
        want = visibility.seen_keys(spec, mask, kv_lengths, q_lengths, np)
        as_jnp = lambda x: None if x is None else jnp.asarray(x)  # noqa: E731
        as_torch = lambda x: None if x is None else torch.from_numpy(np.asarray(x))  # noqa: E731
        got_jax = jax_masking.seen_keys(spec, as_jnp(mask), as_jnp(kv_lengths), as_jnp(q_lengths))
        got_torch = torch_masking.seen_keys(spec, as_torch(mask), as_torch(kv_lengths), as_torch(q_lengths),
                                            "cpu")
        np.testing.assert_array_equal(np.asarray(got_jax), want)
        np.testing.assert_array_equal(got_torch.numpy(), want)
        # Brute force: a key is seen when some valid query keeps it (per k/v head).
        q_pos, k_pos = np.arange(sq), np.arange(skv)
        keep = np.broadcast_to(True if mask is None else (mask if mask.dtype == bool else mask > -np.inf),
                               (b, n, sq, skv))
        keep = keep & (k_pos < kv_lengths[:, None, None, None])
        keep = keep & (q_pos[:, None] < (sq if q_lengths is None else q_lengths[:, None, None, None]))
        window = visibility.window_keep(spec, q_pos, k_pos)
        keep = keep if window is None else keep & window
        brute = keep.any(2).reshape(b, n_kv, n // n_kv, skv).any(2)
        np.testing.assert_array_equal(np.broadcast_to(want, brute.shape), brute)


def test_merge_masks_and_lengths_rules_are_shared():
    parts = [np.array([[True, False]]), None, np.array([[1.0, 2.0]]), np.array([[True, True]])]
    merged = visibility.merge_masks(parts, lambda x: x.dtype == bool,
                                    lambda keep, add: np.where(keep, add, -np.inf))
    np.testing.assert_array_equal(merged, [[1.0, -np.inf]])
    assert visibility.merge_masks([None, None], None, None) is None
    t = torch_ref.inputs.merge_masks(torch.tensor([[True, False]]), torch.tensor([[1.0, 2.0]]), None)
    j = jax_attn.inputs.merge_masks(jnp.array([[True, False]]), jnp.array([[1.0, 2.0]]), None)
    np.testing.assert_array_equal(t.numpy(), np.asarray(j))
    for lengths in (np.array([3, -1]), torch.tensor([3, -1])):
        with pytest.raises(ValueError, match=r"kv_lengths must be >= 0, got \[3, -1\]"):
            visibility.check_lengths(lengths, "kv_lengths")
    with pytest.raises(ValueError, match="not both"):
        visibility.lengths_alias(1, 2)
