"""Measured data: JSON files keyed by the GPU, one loader (`jax_attn.data`), none in the code.

The expected values below are the spec of the conversion: they are the measurements the code held
before (`kernels/configs.py` TUNED, `mosaic_config.FASTER_THAN_TRITON_SM90`,
`jax_attn/routing_table.json`, all "NVIDIA H100 80GB HBM3", 2026-11-23), copied by hand.
"""
import importlib.resources
import json
import logging
import pathlib
import shutil
import sys
import zipfile

import pytest

from jax_attn import autoselect, data, routing
from jax_attn.backends import BACKENDS
from jax_attn.contract import Spec
from jax_attn.kernels import configs
from jax_attn.kernels import mosaic_attention as M
from jax_attn.kernels.configs import BwdConfig, Config, FwdConfig

REPO = pathlib.Path(__file__).resolve().parents[1]
H100 = "NVIDIA H100 80GB HBM3"
H200 = "NVIDIA H200"
FILES = ("routing", "pallas_tuning", "mosaic_routing")

OLD_TUNED = {
    ("sm90", "bfloat16", 64): Config(FwdConfig(64, 64, 4, 3), BwdConfig(64, 64, 64, 64, 4, 3),
                                     device=H100, measured="2026-11-23"),
    ("sm90", "bfloat16", 128): Config(FwdConfig(128, 128, 8, 3), BwdConfig(64, 64, 64, 64, 4, 2),
                                      device=H100, measured="2026-11-23"),
}
OLD_FASTER_THAN_TRITON = {(64, "self"): True, (128, "self"): True, (64, "cross"): False}
OLD_PREFERENCES = {
    "sm90|bfloat16|d<=128|skv<=8192": ["cudnn", "pallas", "xla", "naive", "chunked"],
    "sm90|bfloat16|d<=128|skv>8192": ["cudnn", "pallas", "chunked"],
    "sm90|bfloat16|d<=64|skv<=512": ["pallas", "naive", "xla", "cudnn", "chunked"],
    "sm90|bfloat16|d<=64|skv<=8192": ["cudnn", "pallas", "xla", "naive", "chunked"],
}
OLD_PREFERENCES_FORWARD = {
    "sm90|bfloat16|d<=128|skv<=8192": ["cudnn", "pallas", "xla", "naive", "chunked"],
    "sm90|bfloat16|d<=128|skv>8192": ["cudnn", "pallas", "chunked"],
    "sm90|bfloat16|d<=64|skv<=512": ["pallas", "cudnn", "naive", "xla", "chunked"],
    "sm90|bfloat16|d<=64|skv<=8192": ["pallas", "cudnn", "xla", "naive", "chunked"],
}


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """No per-user cache of the machine running the tests; fresh caches before and after."""
    monkeypatch.setenv(data.CACHE_ENV, str(tmp_path / "user-cache"))
    data.clear_cache()
    autoselect.table.cache_clear()
    yield
    data.clear_cache()
    autoselect.table.cache_clear()


def pretend(monkeypatch, kind, cc):
    """Make every reader of the data see GPU `kind` of compute capability `cc`."""
    generation = f"sm{cc[0]}{cc[1]}"
    monkeypatch.setattr(data, "device", lambda: (kind, generation))
    monkeypatch.setattr(autoselect, "gpu_compute_capability", lambda: cc)
    monkeypatch.setattr(autoselect, "platform", lambda: "gpu")
    data.clear_cache()
    autoselect.table.cache_clear()


def notes(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "jax_attn.data"]


def spec(d=64, skv=4096, sq=4096, dtype="bfloat16"):
    return Spec(batch=1, heads=2, kv_heads=2, q_len=sq, kv_len=skv, head_dim=d, value_dim=d,
                dtype=dtype)


# --- the loader ---------------------------------------------------------------------------------

def test_lookup_order_kind_then_generation_with_one_note_then_none(caplog):
    caplog.set_level(logging.INFO, logger="jax_attn.data")
    keyed = {"GPU A": {"x": 1}, "sm90": "GPU A", "sm80": {"x": 3}}
    assert data.lookup(keyed, ("GPU A", "sm90"), "t") == {"x": 1}
    assert notes(caplog) == []  # its own measurements: nothing to say
    for _ in range(3):
        assert data.lookup(keyed, ("GPU B", "sm90"), "t") == {"x": 1}  # through the alias
    assert notes(caplog) == ["no measurements for GPU B in t; using the sm90 table measured on GPU A"]
    assert data.lookup(keyed, ("GPU C", "sm80"), "t") == {"x": 3}
    assert notes(caplog)[-1] == "no measurements for GPU C in t; using the sm80 table measured on sm80"
    assert data.lookup(keyed, ("GPU D", "sm75"), "t") == {}
    assert "no measurements for GPU D (sm75) in t; using the defaults" in notes(caplog)
    n = len(notes(caplog))
    assert data.lookup(keyed, ("cpu", None), "t") == {}  # off GPUs: no generation, no note
    assert data.lookup(keyed, (None, "sm90"), "t") == {"x": 1}  # kind unknown: the generation's
    assert len(notes(caplog)) == n


def test_every_file_is_keyed_by_device_kind_and_every_entry_says_where_and_when():
    for name in FILES:
        doc = data.read(data.path(name))
        assert doc["comment"] and doc["tables"]["sm90"] == H100, name
        table = doc["tables"][H100]
        if name == "routing":  # one bench run makes the table: said once, in its source
            assert table["source"]["device"] == H100 and table["source"]["date"].startswith("2026-11-23")
            continue
        for key, entry in table.items():
            assert entry["device"] == H100 and entry["date"] == "2026-11-23", (name, key)
            assert (REPO / entry["source"]).exists(), entry["source"]


def test_converted_values_equal_the_old_ones():
    # Off GPUs (these tests), the views show each generation's table: the H100's.
    assert dict(configs.TUNED) == OLD_TUNED
    assert dict(M.FASTER_THAN_TRITON_SM90) == OLD_FASTER_THAN_TRITON
    h100 = data.load("routing", (H100, "sm90"))
    assert h100["preferences"] == OLD_PREFERENCES
    assert h100["preferences_forward"] == OLD_PREFERENCES_FORWARD
    assert h100["scores"]["sm90|bfloat16|d<=64|skv<=512"]["fwd"]["pallas"] == {
        "worst": 1.6506, "geomean": 1.2848, "entries": 2}
    assert h100["source"]["jax"] == "0.11.2" and h100["source"]["device_key"] == "sm90"


def test_h100_and_h200_get_todays_answers(monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="jax_attn.data")
    # The H200's own routing table, once `benchmarks/h200_routing.sh` has measured it; until then
    # it routes by the H100's.
    h200_routing = data.read(data.path("routing"))["tables"].get(H200)
    for kind in (H100, H200):
        pretend(monkeypatch, kind, (9, 0))
        for (_, dtype, bucket), cfg in OLD_TUNED.items():
            assert configs.get_config(bucket, dtype, (9, 0)) == cfg
            assert configs.get_config(bucket, "float16", (9, 0)) == cfg  # borrows bf16's
        assert configs.get_config(256, "bfloat16", (9, 0)) == configs.default_config(256)
        assert configs.get_config(64, "bfloat16", (8, 0)) == configs.default_config(64)
        assert configs.get_config(64, "bfloat16", None) == configs.default_config(64)
        if kind == H200 and isinstance(h200_routing, dict):
            assert h200_routing["source"]["device"] == H200
            assert autoselect.table("forward") == autoselect.orders(h200_routing, "forward")
        for key, order in ({} if kind == H200 and isinstance(h200_routing, dict) else OLD_PREFERENCES).items():
            _, dtype, d, skv = key.split("|")
            s = spec(d=64 if d == "d<=64" else 128, skv=77 if skv == "skv<=512" else
                     20000 if skv == "skv>8192" else 4096, sq=128, dtype=dtype)
            assert autoselect.bucket(s) == key
            # registry order after the measured ones (lossy ones only where a lossy order ranks them)
            rest = [n for n in BACKENDS if n not in order and not BACKENDS[n].lossy]
            assert autoselect.preference(s) == order + rest
            forward = OLD_PREFERENCES_FORWARD[key]
            assert autoselect.preference(s, "forward") == forward + [n for n in rest if n not in forward]
        # Unmeasured bucket: the GPU rule.
        rule = ["cudnn", "pallas", "xla", "chunked"]
        assert autoselect.preference(spec(dtype="float32")) == rule + [
            n for n in BACKENDS if n not in rule and not BACKENDS[n].lossy]
        assert dict(M.FASTER_THAN_TRITON_SM90) == OLD_FASTER_THAN_TRITON
        monkeypatch.setattr(routing, "interpreting", lambda: False)
        monkeypatch.setattr(routing, "gpu_compute_capability", lambda: (9, 0))
        assert routing.pallas_kernel(spec())[0] == "mosaic"
        assert routing.pallas_kernel(spec(skv=77))[0] == "triton"
        if kind == H100:
            assert notes(caplog) == []  # its own measurements
    # The H200: the sm90 tables, one note per data file however often they are read.
    assert sorted(notes(caplog)) == sorted(
        f"no measurements for {H200} in {name}; using the sm90 table measured on {H100}"
        for name in FILES if not (name == "routing" and isinstance(h200_routing, dict)))


def test_an_unmeasured_generation_gets_the_defaults(monkeypatch):
    pretend(monkeypatch, "NVIDIA A100-SXM4-80GB", (8, 0))
    assert configs.get_config(64, "bfloat16", (8, 0)) == configs.default_config(64)
    assert autoselect.table() == {}
    assert autoselect.preference(spec())[:4] == ["cudnn", "pallas", "xla", "chunked"]


def test_user_cache_is_read_first(tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="jax_attn.data")
    mine = {"fwd": {"block_q": 32, "block_k": 32, "num_warps": 4, "num_stages": 2},
            "bwd": {"block_q_dkv": 32, "block_k_dkv": 32, "block_q_dq": 32, "block_k_dq": 32,
                    "num_warps": 4, "num_stages": 2}, "device": H200, "date": "2027-01-01"}
    want = Config(FwdConfig(32, 32, 4, 2), BwdConfig(32, 32, 32, 32, 4, 2), H200, "2027-01-01")
    pretend(monkeypatch, H200, (9, 0))
    assert data.cache_path("pallas_tuning") == tmp_path / "user-cache" / "pallas_tuning.json"
    assert configs.get_config(64, "bfloat16", (9, 0)) == OLD_TUNED[("sm90", "bfloat16", 64)]
    data.write(data.cache_path("pallas_tuning"), H200, {"bfloat16|64": mine})
    assert configs.get_config(64, "bfloat16", (9, 0)) == want  # the H200's own, from the cache
    assert notes(caplog) == [  # logged before the cache existed, not since
        f"no measurements for {H200} in pallas_tuning; using the sm90 table measured on {H100}"]
    # A device's table is a whole: a bucket it lacks is not taken from the generation's.
    assert configs.get_config(128, "bfloat16", (9, 0)) == configs.default_config(128)
    pretend(monkeypatch, H100, (9, 0))
    assert configs.get_config(64, "bfloat16", (9, 0)) == OLD_TUNED[("sm90", "bfloat16", 64)]
    # A broken cache file is ignored with a warning.
    data.cache_path("pallas_tuning").write_text("{not json")
    data.clear_cache()
    pretend(monkeypatch, H200, (9, 0))
    assert configs.get_config(64, "bfloat16", (9, 0)) == OLD_TUNED[("sm90", "bfloat16", 64)]
    assert any("ignoring the jax_attn cache file" in m for m in notes(caplog))


def test_process_local_overrides_come_first(monkeypatch):
    """`benchmarks/pallas_gpu.py --tune` assigns fresh picks into TUNED for its own run."""
    pretend(monkeypatch, H100, (9, 0))
    cfg = Config(FwdConfig(16, 16, 4, 2), BwdConfig(16, 16, 16, 16, 4, 2), H100, "2027-01-01")
    configs.TUNED[("sm90", "bfloat16", 64)] = cfg
    try:
        assert configs.get_config(64, "bfloat16", (9, 0)) == cfg
    finally:
        del configs.TUNED[("sm90", "bfloat16", 64)]
    assert configs.get_config(64, "bfloat16", (9, 0)) == OLD_TUNED[("sm90", "bfloat16", 64)]


# --- the writers --------------------------------------------------------------------------------

def test_routing_writer_puts_a_run_under_its_device_kind(tmp_path, monkeypatch, caplog):
    from jax_attn.bench import routing_from_results, write_routing
    path = tmp_path / "routing.json"
    shutil.copy(data.path("routing"), path)
    rows = [{"shape": "1x2x128x128x64", "b": 1, "n": 2, "sq": 128, "skv": 128, "d": 64,
             "dtype": "bfloat16", "impl": name, "framework": "jax", "mode": mode, "status": "ok",
             "ms": ms} for name, ms in (("xla", 1.0), ("cudnn", 2.0)) for mode in ("fwd", "fwd+bwd")]
    doc = {"meta": {"device": H200, "device_key": "sm90", "date": "2027-01-01"}, "results": rows}
    table = write_routing(doc, path)
    assert table["preferences"] == {"sm90|bfloat16|d<=64|skv<=512": ["xla", "cudnn"]}
    written = json.loads(path.read_text())
    assert written["comment"] == data.read(data.path("routing"))["comment"]
    assert written["tables"][H200] == {k: v for k, v in routing_from_results(doc).items() if k != "comment"}
    assert written["tables"]["sm90"] == H100  # the generation's fallback stays the H100's
    assert written["tables"][H100] == data.read(data.path("routing"))["tables"][H100]
    # autoselect reads a keyed file at TABLE_PATH by device kind, as it reads the package's.
    monkeypatch.setattr(autoselect, "TABLE_PATH", path)
    caplog.set_level(logging.INFO, logger="jax_attn.data")
    for kind, first in ((H200, "xla"), (H100, "pallas")):
        pretend(monkeypatch, kind, (9, 0))
        assert autoselect.preference(spec(skv=77))[0] == first
    assert notes(caplog) == []


def test_tune_pallas_apply_writes_the_data_file(tmp_path, monkeypatch):
    """The tuning run's JSON kept in benchmarks/results gives back the packaged entries."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import tune_pallas
    target = tmp_path / "pallas_tuning.json"
    tune_pallas.apply(REPO / "benchmarks/results/2026-11-23-h100-pallas-tuning.json", target)
    written = json.loads(target.read_text())
    assert written["tables"]["sm90"] == H100

    def strip(table):
        return {k: {f: v for f, v in e.items() if f != "source"} for k, e in table.items()}
    assert strip(written["tables"][H100]) == strip(data.read(data.path("pallas_tuning"))["tables"][H100])
    sys.modules.pop("tune_pallas", None)


# --- packaging ----------------------------------------------------------------------------------

# pyproject's `license = { text = ... }` is outside this test's concern.
@pytest.mark.filterwarnings("ignore:`project.license` as a TOML table is deprecated")
def test_data_files_ship_with_the_package(tmp_path, monkeypatch):
    for name in FILES:
        assert json.loads(importlib.resources.files("jax_attn.data").joinpath(f"{name}.json").read_text())
    build_meta = pytest.importorskip("setuptools.build_meta")
    src = tmp_path / "src"
    for package in ("jax_attn", "torch_ref"):
        shutil.copytree(REPO / package, src / package, ignore=shutil.ignore_patterns("__pycache__"))
    for item in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / item, src / item)
    monkeypatch.chdir(src)  # setuptools builds the project in the working directory
    wheel = build_meta.build_wheel(str(tmp_path / "dist"))
    names = zipfile.ZipFile(tmp_path / "dist" / wheel).namelist()
    assert {f"jax_attn/data/{name}.json" for name in FILES} <= set(names)
