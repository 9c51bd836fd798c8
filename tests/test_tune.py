"""`jax-attn tune`: measures on the CPU into a per-user cache that `auto` then reads first.

Timings on a shared CPU are noise: the end-to-end test checks that `auto` follows whatever was
measured; the orders themselves are checked with synthetic results.
"""
import argparse
import json
import logging

import jax
import jax.numpy as jnp
import pytest

import jax_attn
from jax_attn import autoselect, cli, data, tune
from jax_attn.contract import validate
from jax_attn.routing_writer import merge_tables, routing_from_results

H100 = "NVIDIA H100 80GB HBM3"
H200 = "NVIDIA H200"
QUICK = ["--quick", "--quiet"]


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    """A fresh per-user cache directory; every reader's caches cleared before and after."""
    monkeypatch.setenv(data.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv("JAX_ATTN_BACKEND", raising=False)
    data.clear_cache()
    autoselect.table.cache_clear()
    yield tmp_path / "cache" / "routing.json"
    data.clear_cache()
    autoselect.table.cache_clear()


def pretend(monkeypatch, kind, cc):
    monkeypatch.setattr(data, "device", lambda: (kind, f"sm{cc[0]}{cc[1]}"))
    monkeypatch.setattr(autoselect, "gpu_compute_capability", lambda: cc)
    monkeypatch.setattr(autoselect, "platform", lambda: "gpu")
    data.clear_cache()
    autoselect.table.cache_clear()


def synthetic(device_key, kind, times, shape=(1, 2, 64, 64, 32), dtype="float32", extra=()):
    """A results document: `times` maps (backend, mode) -> ms; `extra` are more row fields."""
    b, n, sq, skv, d = shape
    rows = [{"shape": f"{b}x{n}x{sq}x{skv}x{d}", "b": b, "n": n, "sq": sq, "skv": skv, "d": d, "dtype": dtype,
             "impl": impl, "framework": "jax", "mode": mode, "status": "ok", "ms": ms}
            for (impl, mode), ms in times.items()]
    for impl, mode, fields in extra:
        rows.append({**rows[0], "impl": impl, "mode": mode, "ms": None, **fields})
    return {"meta": {"device": kind, "device_key": device_key, "date": "2027-01-01T00:00:00+00:00"},
            "results": rows}


def tune_args(*argv):
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    tune.add_parser(sub)
    return parser.parse_args(["tune", *argv])


def q_kv(sq=64, skv=64, d=32):
    return (jax.ShapeDtypeStruct((1, 2, sq, d), jnp.float32), jax.ShapeDtypeStruct((1, 2, skv, d), jnp.float32))


@pytest.mark.slow  # about 10-20 s on a shared CPU: two backends, both modes
def test_tune_on_the_cpu_end_to_end_then_auto_follows_it(cache, tmp_path, capsys):
    results = tmp_path / "tune.json"
    assert cli.main(["tune", "--shape", "1,2,32,32,16", "--backends", "xla,chunked", *QUICK,
                     "--json", str(results)]) == 0
    out = capsys.readouterr().out
    assert f"written: {cache} under 'cpu'" in out and "measure:  xla, chunked" in out
    table = json.loads(cache.read_text())["tables"]["cpu"]
    bucket = "cpu|float32|d<=64|skv<=512"
    train, forward = table["preferences"][bucket], table["preferences_forward"][bucket]
    assert sorted(train) == sorted(forward) == ["chunked", "xla"]
    assert table["source"]["tool"] == "jax-attn tune --quick"
    doc = json.loads(results.read_text())
    assert {r["status"] for r in doc["results"]} == {"ok"} and len(doc["results"]) == 4
    # `auto` in this process reads the cache: the measured first choices, per mode.
    q, kv = q_kv(32, 32, 16)
    d = jax_attn.explain(q, kv, kv)
    assert d.backend == train[0] and (d.forward_only or d.backend) == forward[0]


def test_auto_reads_the_tuned_cache_first_then_the_shipped_table_then_the_generation(cache, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="jax_attn.data")
    notes = lambda: [r.getMessage() for r in caplog.records if r.name == "jax_attn.data"]
    gh200 = "NVIDIA GH200 480GB"  # a Hopper we ship no table for
    pretend(monkeypatch, gh200, (9, 0))
    kv = jnp.zeros((1, 2, 77, 64), jnp.bfloat16)
    s = validate(jnp.zeros((1, 2, 4096, 64), jnp.bfloat16), kv, kv)
    bucket = "sm90|bfloat16|d<=64|skv<=512"
    shipped = data.read(data.path("routing"))["tables"][H100]["preferences"][bucket]
    assert autoselect.preference(s)[:len(shipped)] == shipped  # the sm90 table, measured on the H100
    assert notes() == [f"no measurements for {gh200} in routing; using the sm90 table measured on {H100}"]
    # Tune it (synthetic results): naive fastest, and sage faster still (lossy: never written).
    doc = synthetic("sm90", gh200, {("naive", "fwd+bwd"): 1.0, ("xla", "fwd+bwd"): 2.0, ("sage", "fwd+bwd"): 0.1},
                    shape=(1, 2, 4096, 77, 64), dtype="bfloat16")
    p = tune.Plan(gh200, "sm90", [], ["fwd+bwd"], ["naive", "xla"], {"sage": tune.routable("sage")}, cache, False)
    table = tune.write(doc, p)
    assert table["preferences"][bucket] == ["naive", "xla"]
    # The buckets it did not measure keep what auto used (the H100's), and say so.
    assert table["source"]["inherited"]["device"] == H100 and bucket not in table["source"]["inherited"]["buckets"]
    assert autoselect.preference(s)[:2] == ["naive", "xla"]
    assert len(notes()) == 1  # its own table now: no new note
    # Other sm90 GPUs still fall back to the H100's table: the cache adds no generation alias.
    assert "sm90" not in json.loads(cache.read_text())["tables"]
    pretend(monkeypatch, "NVIDIA H100 NVL", (9, 0))
    assert autoselect.preference(s)[:len(shipped)] == shipped
    # The H100 itself reads its shipped table.
    pretend(monkeypatch, H100, (9, 0))
    assert autoselect.preference(s)[:len(shipped)] == shipped


def test_lossy_unavailable_and_non_automatic_backends_are_never_written(cache):
    p = tune.plan(tune_args("--backends", "xla,chunked,sage,cudnn,pallas"))
    assert p.backends[:2] == ["xla", "chunked"] and "sage" not in p.backends and "cudnn" not in p.backends
    assert p.left_out["sage"].startswith("lossy") and p.left_out["cudnn"].startswith("unavailable")
    if "pallas" in p.backends:  # interpret mode (JAX_ATTN_INTERPRET=1): measured, never written
        assert p.left_out["pallas"] == "automatic selection may not take it here"
    times = {(n, m): ms for n, ms in (("sage", 0.1), ("cudnn", 0.2), ("pallas", 0.3), ("chunked", 1.0),
                                       ("xla", 2.0)) for m in ("fwd", "fwd+bwd")}
    table = tune.write(synthetic("cpu", "cpu", times), p)
    for key in ("preferences", "preferences_forward"):
        assert table[key] == {"cpu|float32|d<=64|skv<=512": ["chunked", "xla"]}
    assert set(table["source"]["not_written"]) >= {"sage", "cudnn"}
    q, kv = q_kv()
    assert jax_attn.explain(q, kv, kv).backend == "chunked"  # not the CPU rule's xla: the tuned order


def test_the_bench_routing_writer_never_orders_a_lossy_backend_either():
    times = {("sage", "fwd"): 0.1, ("xla", "fwd"): 1.0, ("chunked", "fwd"): 1.5}
    table = routing_from_results(synthetic("sm90", H200, times, dtype="bfloat16"))
    assert table["preferences_forward"] == {"sm90|bfloat16|d<=64|skv<=512": ["xla", "chunked"]}
    assert table["preferences"] == {"sm90|bfloat16|d<=64|skv<=512": ["xla", "chunked"]}


def test_lossy_rows_that_pass_the_gate_get_their_own_order():
    # What `auto+8bit` reads: the forward order with the lossy backends that passed the float64
    # gate among the exact ones (a failed one, sage here, is never ranked); the exact orders
    # stay as they were.
    times = {("sage16", "fwd"): 0.5, ("xla", "fwd"): 1.0, ("chunked", "fwd"): 1.5,
             ("xla", "fwd+bwd"): 3.0, ("chunked", "fwd+bwd"): 2.0}
    failed = [("sage", "fwd", {"status": "FAIL", "note": "rel. error 0.12 > 0.03"})]
    table = routing_from_results(synthetic("sm90", H200, times, dtype="bfloat16", extra=failed))
    bucket = "sm90|bfloat16|d<=64|skv<=512"
    assert table["preferences_forward"] == {bucket: ["xla", "chunked"]}
    assert table["preferences"] == {bucket: ["chunked", "xla"]}
    assert table["preferences_forward_lossy"] == {bucket: ["sage16", "xla", "chunked"]}
    assert set(table["scores"][bucket]["fwd_lossy"]) == {"sage16"}
    assert table["scores"][bucket]["fwd_lossy"]["sage16"]["worst"] == 0.5
    assert table["scores"][bucket].get("failed") is None  # a lossy failure marks no exact backend
    # merged over an earlier table: replaced where measured, kept elsewhere
    base = {"preferences_forward_lossy": {bucket: ["xla"], "other": ["sage16", "xla"]},
            "scores": {"other": {"fwd_lossy": {"sage16": {}}}}}
    merged = merge_tables(base, table)
    assert merged["preferences_forward_lossy"] == {bucket: ["sage16", "xla", "chunked"],
                                                   "other": ["sage16", "xla"]}
    assert merged["scores"]["other"] == {"fwd_lossy": {"sage16": {}}}
    # a later run of that bucket without a lossy winner drops the earlier lossy order
    exact = routing_from_results(synthetic("sm90", H200, {("xla", "fwd"): 1.0}, dtype="bfloat16"))
    assert bucket not in merge_tables(merged, exact).get("preferences_forward_lossy", {})


def test_a_lossy_backend_must_beat_every_exact_one_on_every_shape():
    bucket = "sm90|bfloat16|d<=64|skv<=512"

    def doc(*per_shape):  # one results document over several shapes (skv 64, 128, ...)
        rows = []
        for i, (times, extra) in enumerate(per_shape):
            rows += synthetic("sm90", H200, times, shape=(1, 2, 64, 64 * (i + 1), 32),
                              dtype="bfloat16", extra=extra)["results"]
        return {**synthetic("sm90", H200, {}), "results": rows}
    close = {("sage16", "fwd"): 1.005, ("xla", "fwd"): 1.0}  # within the 1% tie, not faster
    assert "preferences_forward_lossy" not in routing_from_results(doc((close, ())))
    fast = {("sage16", "fwd"): 0.5, ("xla", "fwd"): 1.0}
    failed = [("sage16", "fwd", {"status": "FAIL", "note": "rel. error 0.05 > 0.03"})]
    # faster on one shape, failed the gate on the other: not ranked in that bucket
    mixed = routing_from_results(doc((fast, ()), ({("xla", "fwd"): 1.0}, failed)))
    assert "preferences_forward_lossy" not in mixed and mixed["preferences_forward"][bucket] == ["xla"]
    both = routing_from_results(doc((fast, ()), (fast, ())))
    assert both["preferences_forward_lossy"] == {bucket: ["sage16", "xla"]}


def test_lossy_backends_are_measured_only_with_the_lossy_flag(cache):
    without = tune.plan(tune_args("--backends", "xla,sage16"))
    assert without.left_out["sage16"].startswith("lossy") and "--lossy" in without.left_out["sage16"]
    with_flag = tune.plan(tune_args("--lossy", "--backends", "xla,sage16"))
    # on this CPU sage16 cannot run (or runs in interpret mode): never written, no longer as lossy
    why = with_flag.left_out["sage16"]
    assert why.startswith("unavailable") or why.startswith("Pallas interpret mode"), why


def test_a_bucket_the_budget_cut_short_is_left_out(caplog):
    times = {("xla", "fwd"): 2.0, ("xla", "fwd+bwd"): 2.0, ("chunked", "fwd+bwd"): 3.0}
    cut = [("chunked", "fwd", {"status": "skip", "reason": "budget", "note": "not run: the time budget"})]
    with caplog.at_level(logging.WARNING, logger="jax_attn.routing_writer"):
        table = routing_from_results(synthetic("cpu", "cpu", times, extra=cut))
    bucket = "cpu|float32|d<=64|skv<=512"
    assert table["preferences"] == {bucket: ["xla", "chunked"]} and table["preferences_forward"] == {}
    assert table["scores"][bucket]["incomplete"] == ["fwd"]
    assert any("time budget" in r.getMessage() for r in caplog.records)


def test_merge_keeps_what_a_run_did_not_measure():
    base = {"source": {"device": H100, "date": "2026-11-23"},
            "preferences": {"a": ["cudnn", "pallas"], "b": ["pallas", "cudnn"]},
            "preferences_forward": {"a": ["pallas", "cudnn"]},
            "scores": {"a": {"fwd": {"pallas": {}}, "fwd+bwd": {"cudnn": {}}, "failed": ["xla"]}}}
    new = {"source": {"device": H200}, "preferences": {"a": ["xla"]}, "preferences_forward": {"a": ["xla"]},
           "scores": {"a": {"fwd": {"xla": {}}}}}  # measured forward only
    merged = merge_tables(base, new)
    assert merged["preferences_forward"] == {"a": ["xla"]}
    assert merged["preferences"] == {"a": ["cudnn", "pallas"], "b": ["pallas", "cudnn"]}  # training kept
    assert merged["scores"]["a"] == {"fwd": {"xla": {}}, "fwd+bwd": {"cudnn": {}}}
    assert merged["source"] == {"device": H200, "inherited": {"buckets": ["b"], "device": H100,
                                                               "date": "2026-11-23"}}


def test_a_run_that_could_not_measure_a_backend_keeps_it_where_it_won():
    # Round 7 on the H200 tuned without FlashAttention-4: its orders had no fa4, which had won
    # two buckets the day before. An unavailable backend stays where the earlier order put it
    # (ahead of the first backend it beat there, else last), in the lossy order too; one left
    # out by choice (xla) does not.
    base = {"preferences_forward": {"a": ["fa4", "pallas", "cudnn", "xla"], "b": ["cudnn", "fa4", "xla"]},
            "preferences": {"a": ["fa4", "cudnn", "pallas"]},
            "scores": {"a": {"fwd": {}}, "b": {"fwd": {}}}}
    new = {"source": {"device": H200, "not_written": {"fa4": "unavailable: flash-attn-4 is not installed",
                                                      "xla": "not in --backends"}},
           "preferences_forward": {"a": ["cudnn", "pallas"], "b": ["pallas", "cudnn"]},
           "preferences": {"a": ["pallas", "cudnn"]},
           "preferences_forward_lossy": {"a": ["sage16", "cudnn", "pallas"]},
           "scores": {"a": {"fwd": {}, "fwd+bwd": {}, "fwd_lossy": {"sage16": {}}}, "b": {"fwd": {}}}}
    merged = merge_tables(base, new)
    assert merged["preferences_forward"] == {"a": ["fa4", "cudnn", "pallas"],
                                             "b": ["pallas", "cudnn", "fa4"]}  # it beat only xla
    assert merged["preferences"] == {"a": ["fa4", "pallas", "cudnn"]}
    assert merged["preferences_forward_lossy"] == {"a": ["sage16", "fa4", "cudnn", "pallas"]}
    assert merged["source"]["kept_unmeasured"] == {
        "preferences": {"a": ["fa4"]}, "preferences_forward": {"a": ["fa4"], "b": ["fa4"]},
        "preferences_forward_lossy": {"a": ["fa4"]}}


def test_write_shipped_adds_this_gpu_beside_the_others_and_inherits_nothing(tmp_path, monkeypatch):
    path = tmp_path / "routing.json"
    shipped = data.read(data.path("routing"))
    shipped["tables"].pop(H200, None)  # as before the first H200 table was written
    path.write_text(json.dumps(shipped))
    before = data.read(path)
    pretend(monkeypatch, H200, (9, 0))
    p = tune.plan(tune_args("--write-shipped", str(path), "--backends", "xla,chunked"))
    assert p.shipped and p.target == path and p.kind == H200
    doc = synthetic("sm90", H200, {("xla", "fwd"): 1.0, ("chunked", "fwd"): 2.0}, dtype="bfloat16")
    table = tune.write(doc, p)
    written = data.read(path)
    assert written["comment"] == before["comment"] and written["tables"][H100] == before["tables"][H100]
    assert written["tables"]["sm90"] == H100  # the generation keeps its fallback
    assert written["tables"][H200] == table and "inherited" not in table["source"]
    assert table["preferences_forward"] == {"sm90|bfloat16|d<=64|skv<=512": ["xla", "chunked"]}
    # A second run (another dtype) adds its buckets to the H200's.
    doc = synthetic("sm90", H200, {("chunked", "fwd"): 1.0, ("xla", "fwd"): 2.0}, dtype="float16")
    table = tune.write(doc, p)
    assert set(table["preferences_forward"]) == {"sm90|bfloat16|d<=64|skv<=512", "sm90|float16|d<=64|skv<=512"}


def test_dry_run_prints_the_plan_and_writes_nothing(cache, capsys):
    assert cli.main(["tune", "--dry-run", "--shape", "1,2,64,77,40", "--dtype", "float32,bfloat16",
                     "--modes", "inference"]) == 0
    out = capsys.readouterr().out
    assert "1x2x64x77x40 float32, 1x2x64x77x40 bfloat16" in out and "modes:    inference" in out
    assert f"write to: {cache} under 'cpu'" in out and not cache.exists()


def test_expect_device_refuses_another_device(cache, capsys):
    assert cli.main(["tune", "--expect-device", H200, "--dry-run"]) == 2
    assert "not 'NVIDIA H200'" in capsys.readouterr().out and not cache.exists()


@pytest.mark.parametrize("argv, message", [
    (["--modes", "inference,fast"], "expected a comma-separated subset of inference, train"),
    (["--dtype", "float8"], "expected a comma-separated subset of bfloat16, float16, float32"),
])
def test_bad_options_are_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["tune", *argv])
    assert info.value.code == 2 and message in capsys.readouterr().err
