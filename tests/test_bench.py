"""`jax-attn bench`: runs end to end on a CPU, checks before it times, and feeds routing.

Timings on a shared CPU are noise; these tests check structure and logic, never speed.
"""
import argparse
import csv
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_attn
from jax_attn import autoselect, bench, cli
from jax_attn.backends import BACKENDS
from jax_attn.contract import validate

FAST = ["--min-runs", "3", "--measure-s", "0", "--sample-ms", "1", "--quiet"]


def run_bench(tmp_path, *argv):
    out = tmp_path / "bench.json"
    rc = cli.main(["bench", *argv, *FAST, "--json", str(out)])
    return rc, json.loads(out.read_text())


def rows(doc, **match):
    return [r for r in doc["results"] if all(r.get(k) == v for k, v in match.items())]


def test_diffusion_set_and_flop_count():
    shapes = bench.SHAPE_SETS["diffusion"]
    assert [(s.b, s.n, s.sq, s.skv, s.d) for s in shapes] == [
        (2, 8, 4096, 4096, 40), (2, 8, 4096, 77, 40), (2, 10, 4096, 4096, 64), (2, 10, 4096, 77, 64),
        (1, 24, 4608, 4608, 128), (1, 40, 16384, 16384, 128)]
    assert {s.dtype for s in shapes} == {"bfloat16"}
    s = shapes[0]
    assert s.flops("fwd") == 4 * 2 * 8 * 4096 * 4096 * 40
    assert s.flops("fwd+bwd") == 3.5 * s.flops("fwd")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_bench_inputs_are_normal_in_every_dtype(dtype):
    """The timed and gated inputs are standard normal rounded to the dtype, not
    `jax.random.normal` drawn in 16 bits (128 distinct bfloat16 values, mean -0.012), on which a
    quantizer's rounding errors repeat instead of averaging out."""
    shape = bench.Shape(1, 2, 4096, 4096, 64, dtype)
    q = np.asarray(bench.jax_runner.JaxInputs(shape, 1, seed=0).sets[0][0], np.float32)
    assert len(np.unique(q)) > 1000  # 3354 here; the 16-bit draw gives 128
    assert abs(q.mean()) < 5e-3 and abs(q.std() - 1.0) < 5e-3
    assert np.abs(q).max() > 4.0  # the tails are there (the 16-bit draw stops at 2.9)


@pytest.mark.slow
def test_tiny_run_end_to_end_with_every_output(tmp_path, capsys):
    csv_path, png = tmp_path / "bench.csv", tmp_path / "bench.png"
    names = "xla,chunked,naive,auto" + (",torch-math" if bench.torch_kernels() else "")
    rc, doc = run_bench(tmp_path, "--shape", "1,2,64,48,16", "--shape", "2,1,40,77,8", "--backends", names,
                        "--csv", str(csv_path), "--plot", str(png))
    assert rc == 0
    meta = doc["meta"]
    assert meta["platform"] == "cpu" and meta["jax"] == jax.__version__ and meta["modes"] == ["fwd", "fwd+bwd"]
    results = doc["results"]
    assert len(results) == 2 * len(names.split(",")) * 2
    for r in results:
        assert r["status"] == "ok", r
        assert r["ms"] > 0 and r["tflops"] > 0 and r["err"] <= r["tol"]
        assert r["tflops"] == pytest.approx(r["flops"] / (r["ms"] * 1e-3) / 1e12)
        assert r["runs"] >= 3
    for shape in ("1x2x64x48x16", "2x1x40x77x8"):
        for mode in ("fwd", "fwd+bwd"):
            group = [r for r in rows(doc, shape=shape, mode=mode) if r["impl"] != "auto"]
            assert min(r["ratio"] for r in group) == pytest.approx(1.0)
            auto = rows(doc, shape=shape, mode=mode, impl="auto")[0]
            b, n, sq, skv, d = map(int, shape.split("x"))
            kv = jax.ShapeDtypeStruct((b, n, skv, d), jnp.float32)
            assert auto["auto_choice"] == jax_attn.explain(jax.ShapeDtypeStruct((b, n, sq, d), jnp.float32),
                                                           kv, kv).backend
    with open(csv_path) as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(results) and {"shape", "impl", "mode", "ms", "tflops", "ratio"} <= set(table[0])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "1x2x64x48x16" in printed and "auto within 3%" in printed.splitlines()[-1]


@pytest.mark.parametrize("wrong", [False, True])
def test_another_jax_library_is_a_peer_row_never_a_routing_choice(tmp_path, monkeypatch, wrong):
    # OTHER_JAX rows (tokamax on a GPU): handed (b, s, n, d) inputs, gated like every row,
    # timed as peers; outside ratio_jax and the routing, which only our backends can serve.
    from jax_attn.bench import jax_runner, suite
    from jax_attn.routing_writer import routing_from_results
    seen = []

    def library():  # another library's attention on (b, s, n, d) arrays
        def attn(q, k, v):
            seen.append(q.shape)
            out = jax.nn.dot_product_attention(q, k, v)
            return out * 1.05 if wrong else out
        return attn

    monkeypatch.setitem(jax_runner.OTHER_JAX, "otherlib", ("jax", library))
    monkeypatch.setattr(suite, "other_jax_reasons", lambda name: [])
    _, doc = run_bench(tmp_path, "--shape", "1,2,64,48,16", "--backends", "xla,otherlib", "--no-torch")
    other = rows(doc, impl="otherlib")
    assert {r["mode"] for r in other} == {"fwd", "fwd+bwd"}
    assert seen and set(seen) == {(1, 64, 2, 16)}  # (b, s, n, d)
    assert all(r["framework"] == "jax-other" for r in other)
    if wrong:
        assert all(r["status"] == "FAIL" for r in other)
        return
    assert all(r["status"] == "ok" and r["ratio"] > 0 for r in other)
    # the fastest of our backends sets ratio_jax, whatever the other library timed
    assert all(r["ratio_jax"] == 1.0 for r in rows(doc, impl="xla"))
    table = routing_from_results(doc)
    orders = [*table["preferences"].values(), *table["preferences_forward"].values()]
    assert orders and all("otherlib" not in order for order in orders)


def test_unavailable_backend_shows_its_reasons_instead_of_a_number(tmp_path):
    rc, doc = run_bench(tmp_path, "--shape", "1,1,32,32,8", "--backends", "cudnn,xla", "--no-backward")
    assert rc == 0
    (cudnn,) = rows(doc, impl="cudnn")
    assert cudnn["status"] == "skip" and "GPU" in cudnn["note"] and "ms" not in cudnn
    assert rows(doc, impl="xla")[0]["status"] == "ok"


def test_wrong_results_fail_the_gate_and_are_not_timed(tmp_path, monkeypatch):
    naive = BACKENDS["naive"]
    right = naive._forward

    def off_by_ten_percent(inputs, return_lse):
        res = right(inputs, return_lse)
        return (res[0] * 1.1, res[1]) if return_lse else res * 1.1

    monkeypatch.setattr(naive, "_forward", off_by_ten_percent)
    rc, doc = run_bench(tmp_path, "--shape", "1,2,32,24,8", "--backends", "naive,xla")
    assert rc == 1
    for r in rows(doc, impl="naive"):
        assert r["status"] == "FAIL" and r["err"] > r["tol"] and "ms" not in r
    assert all(r["status"] == "ok" for r in rows(doc, impl="xla"))


def test_in_program_timing_loop_computes_the_call():
    fn = bench._jax_fn("xla", "fwd")
    keys = jax.random.split(jax.random.key(1), 6)
    sets = tuple(tuple(jax.random.normal(k, (1, 2, 16, 8)) for k in keys[i:i + 3]) for i in (0, 3))
    looped = bench._jax_looped(fn, 2).lower(sets, 1).compile(compiler_options=bench.NO_HOISTING)
    outs = looped(sets, 3)
    assert len(outs) == len(sets)  # every call's output leaves the loop, so no call is dead code
    for out, s in zip(outs, sets):
        np.testing.assert_allclose(out, fn(*s), rtol=1e-4, atol=1e-5)


def test_in_program_timing_loop_keeps_every_call():
    """With each set's output carried, the compiled loop body still holds one attention per set."""
    fn = bench._jax_fn("naive", "fwd")
    keys = jax.random.split(jax.random.key(2), 12)
    sets = tuple(tuple(jax.random.normal(k, (1, 2, 16, 8)) for k in keys[i:i + 3]) for i in range(0, 12, 3))
    looped = bench._jax_looped(fn, 4).lower(sets, 1).compile(compiler_options=bench.NO_HOISTING)
    hlo = looped.as_text()
    assert hlo.count("exponential(") >= len(sets), "calls were removed from the timing loop"


def test_forced_in_program_loop_runs(tmp_path):
    rc, doc = run_bench(tmp_path, "--shape", "1,2,64,64,16", "--backends", "chunked", "--inner-loop", "always")
    assert rc == 0
    for r in doc["results"]:
        assert r["status"] == "ok" and "loop" in r["timing"]


@pytest.mark.slow
def test_memory_chunked_stays_linear_where_xla_goes_quadratic(tmp_path):
    rc, doc = run_bench(tmp_path, "--memory-only", "--backends", "xla,chunked",
                        "--shape", "1,2,1024,1024,32", "--shape", "1,2,4096,4096,32")
    assert rc == 0
    temp = {(r["impl"], r["sq"], r["mode"]): r["temp_bytes"] for r in doc["results"]}
    for mode in ("fwd", "fwd+bwd"):
        assert temp["chunked", 4096, mode] < temp["xla", 4096, mode]
        assert temp["xla", 4096, mode] >= 2 * 4096 * 4096 * 4  # the float32 scores, at least
        growth = {n: temp[n, 4096, mode] / max(temp[n, 1024, mode], 1) for n in ("xla", "chunked")}
        assert growth["xla"] > 8 and growth["chunked"] < 4.5, growth  # 16 vs 4 at the limits


def synthetic_results(device="sm90"):
    """Two buckets; in the 4k self-attention bucket pallas wins, in cross-attention cudnn."""
    times = {  # (b, n, sq, skv, d): {backend: (fwd ms, fwd+bwd ms)}
        (2, 8, 4096, 4096, 40): {"pallas": (0.30, 1.00), "cudnn": (0.33, 1.10), "xla": (0.90, 3.0),
                                 "chunked": (1.2, 4.0)},
        (2, 10, 4096, 4096, 64): {"pallas": (0.50, 1.60), "cudnn": (0.49, 1.80), "xla": (1.5, 5.0)},
        (2, 8, 4096, 77, 40): {"pallas": (0.05, 0.20), "cudnn": (0.02, 0.10), "xla": (0.03, 0.12),
                               "chunked": (0.01, 0.05)},  # chunked is fastest but wrong below
    }
    results = []
    for (b, n, sq, skv, d), per in times.items():
        for name, (f, fb) in per.items():
            for mode, ms in (("fwd", f), ("fwd+bwd", fb)):
                results.append({"shape": f"{b}x{n}x{sq}x{skv}x{d}", "b": b, "n": n, "sq": sq, "skv": skv, "d": d,
                                "dtype": "bfloat16", "impl": name, "framework": "jax", "mode": mode,
                                "status": "FAIL" if name == "chunked" and skv == 77 else "ok", "ms": ms})
        results.append({"shape": f"{b}x{n}x{sq}x{skv}x{d}", "b": b, "n": n, "sq": sq, "skv": skv, "d": d,
                        "dtype": "bfloat16", "impl": "torch-flash", "framework": "torch", "mode": "fwd",
                        "status": "ok", "ms": 0.001})  # torch rows never enter JAX routing
    return {"meta": {"device_key": device, "device": "H100", "date": "2026-01-01", "modes": ["fwd", "fwd+bwd"]},
            "results": results}


def test_routing_table_regenerated_from_results_orders_fastest_first(tmp_path):
    table = bench.routing_from_results(synthetic_results())
    prefs = table["preferences"]
    assert set(prefs) == {"sm90|bfloat16|d<=64|skv<=8192", "sm90|bfloat16|d<=64|skv<=512"}
    # Worst ratio over shapes and modes decides: pallas (1.00, 1.00, 1.02, 1.00) beats cudnn (1.10 worst).
    assert prefs["sm90|bfloat16|d<=64|skv<=8192"] == ["pallas", "cudnn", "xla", "chunked"]
    # chunked failed the correctness gate in this bucket, so it is left out, however fast.
    assert prefs["sm90|bfloat16|d<=64|skv<=512"] == ["cudnn", "xla", "pallas"]
    assert table["scores"]["sm90|bfloat16|d<=64|skv<=512"]["failed"] == ["chunked"]


def test_update_routing_command_writes_a_table_autoselect_reads(tmp_path, monkeypatch):
    results = tmp_path / "results.json"
    doc = synthetic_results(device="cpu")
    for r in doc["results"]:
        r["dtype"] = "float32"
    results.write_text(json.dumps(doc))
    path = tmp_path / "routing_table.json"
    path.write_text(json.dumps({"preferences": {"sm80|bfloat16|d<=64|skv<=512": ["cudnn"]}}))
    assert cli.main(["bench", "--update-routing", str(results), "--routing-table", str(path)]) == 0
    written = json.loads(path.read_text())
    assert written["preferences"]["cpu|float32|d<=64|skv<=8192"][0] == "pallas"
    assert written["preferences"]["sm80|bfloat16|d<=64|skv<=512"] == ["cudnn"]  # other devices kept
    assert written["source"]["device_key"] == "cpu"

    monkeypatch.setattr(autoselect, "TABLE_PATH", path)
    autoselect.table.cache_clear()
    try:
        q = jax.ShapeDtypeStruct((1, 2, 64, 40), jnp.float32)
        kv = jax.ShapeDtypeStruct((1, 2, 77, 40), jnp.float32)
        # Measured cross-attention order on "cpu": cudnn, xla, pallas; cudnn cannot run here, so xla.
        assert autoselect.preference(validate(q, kv, kv))[:3] == ["cudnn", "xla", "pallas"]
        assert jax_attn.explain(q, kv, kv).backend == "xla"
    finally:
        autoselect.table.cache_clear()


@pytest.mark.slow
def test_write_routing_then_recheck_auto_in_one_run(tmp_path, monkeypatch):
    monkeypatch.setattr(autoselect, "TABLE_PATH", autoselect.TABLE_PATH)  # restored afterwards
    table_path = tmp_path / "routing_table.json"
    try:
        rc, doc = run_bench(tmp_path, "--shape", "1,2,64,64,16", "--backends", "xla,chunked,auto",
                            "--write-routing", str(table_path), "--recheck-auto")
    finally:
        autoselect.table.cache_clear()
    assert rc == 0
    table = json.loads(table_path.read_text())
    for mode, key in (("fwd", "preferences_forward"), ("fwd+bwd", "preferences")):
        (order,) = table[key].values()
        assert sorted(order) == ["chunked", "xla"] and list(table[key]) == ["cpu|float32|d<=64|skv<=512"]
        # The fastest of this mode's measured rows comes first.
        timed = {r["impl"]: r["ms"] for r in doc["results"] if r["mode"] == mode and r["impl"] in order
                 and r.get("status") == "ok" and r.get("ratio_jax") is not None}
        assert len(timed) == 2 and order[0] == min(timed, key=timed.get)
        assert rows(doc, mode=mode, impl="auto-before")[0]["status"] == "ok"
        (auto,) = rows(doc, mode=mode, impl="auto")
        assert auto["status"] == "ok" and auto["auto_choice"] == order[0] and "ratio_jax" in auto
        # Routing happens at trace time: auto compiles to the very program of its choice, also
        # when the forward and the training choice differ (the custom VJP leaves no trace).
        (chosen,) = rows(doc, mode=mode, impl=order[0])
        assert auto["program"] and auto["program"] == chosen["program"]


def test_auto_summary_counts_the_same_program_as_equal():
    def doc(auto_program):
        common = dict(shape="1x2x64x64x16", dtype="float32", mode="fwd", framework="jax", status="ok")
        return {"meta": {"modes": ["fwd"]}, "results": [
            dict(common, impl="xla", ms=1.0, program="p-xla"),
            dict(common, impl="chunked", ms=1.5, program="p-chunked"),
            dict(common, impl="auto", ms=1.08, ratio_jax=1.08, auto_choice="xla", program=auto_program)]}

    text, ok = bench.auto_summary(doc("p-xla"))
    assert ok and "same compiled program" in text and "MISS" not in text
    text, ok = bench.auto_summary(doc("p-other"))
    assert not ok and "MISS" in text


def test_auto_is_held_to_every_peer_row_of_the_run():
    """Torch kernels (SDPA's and any other torch row, like torch's FA4) and every JAX backend
    count, also those auto may not pick (`fa4`); lossy ones (`sage`, or a row marked lossy) do not."""
    common = dict(shape="1x2x64x64x16", dtype="bfloat16", mode="fwd", status="ok")

    def doc(**times):
        rows = [dict(common, impl=impl.replace("_", "-"), ms=ms, program=f"p-{impl}",
                     framework="torch" if impl.startswith("torch") else "jax") for impl, ms in times.items()]
        rows.append(dict(common, impl="auto", framework="jax", ms=1.0, auto_choice="xla", program="p-xla"))
        rows.append(dict(common, impl="torch-sage8", framework="torch", ms=0.05, lossy=True))
        bench._add_ratios(rows)
        return {"meta": {"modes": ["fwd"]}, "results": rows}

    d = doc(xla=1.0, sage=0.1, torch_flash=0.95, fa4=0.9, torch_fa4=0.8)
    text, ok = bench.auto_summary(d)
    assert not ok and "best torch-fa4 0.800 ms (best JAX: fa4 0.900 ms), auto (xla) x1.250 MISS" in text
    assert "of the fastest peer" in text
    by = {r["impl"]: r for r in d["results"]}
    assert by["xla"]["ratio"] == pytest.approx(1.25) and by["xla"]["ratio_jax"] == pytest.approx(1 / 0.9)
    assert by["sage"]["ratio"] == pytest.approx(0.125)  # reported, never the yardstick
    text, ok = bench.auto_summary(doc(xla=1.0, sage=0.1, torch_flash=0.95))
    assert not ok and "best torch-flash" in text and "x1.053 MISS" in text
    text, ok = bench.auto_summary(doc(xla=1.0, sage=0.1, torch_flash=0.99))
    assert ok and "x1.010" in text and "MISS" not in text
    text, ok = bench.auto_summary(doc(xla=1.0, torch_flash=1.2))  # auto's program is the best's
    assert ok and "same compiled program as the best: equal" in text


def test_one_timer_for_every_median(monkeypatch):
    from jax_attn.bench import timing
    calls = []
    t = timing.time_call(lambda x: calls.append(x) or jnp.ones(()), 3, repeats=7, warmup=2)
    assert len(calls) == 9 and t.runs == 7 and t.per_sample == 1 and t.ms > 0
    assert timing.median_ms(lambda: jnp.ones(()), repeats=3, warmup=0) > 0
    # `check`'s timing column goes through it.
    seen = []
    monkeypatch.setattr(timing, "median_ms", lambda fn, *xs, **kw: seen.append(kw) or 1.0)
    assert cli._median_ms(lambda: None) == 1.0 and seen == [{"repeats": 5, "warmup": 1}]


def test_pallas_rows_name_the_kernel_that_ran(tmp_path):
    rc, doc = run_bench(tmp_path, "--shape", "1,2,32,24,8", "--backends", "pallas", "--no-torch",
                        "--no-backward")
    assert rc == 0
    (row,) = rows(doc, impl="pallas")
    assert row["status"] == "ok" and row["kernel"] == "triton"  # no Hopper GPU here


@pytest.mark.parametrize("main", [lambda argv: cli.main(["bench", *argv]), bench.main], ids=["cli", "bench"])
@pytest.mark.parametrize("argv, message", [
    (["--shape", "1,2,3"], r"argument --shape: expected B,N,SQ,SKV,D \(five positive integers\), got '1,2,3'"),
    (["--shape", "1,2,64,a,16"], r"argument --shape: expected B,N,SQ,SKV,D .* got '1,2,64,a,16'"),
    (["--shape", "1,2,64,48,0"], r"argument --shape: expected B,N,SQ,SKV,D .* got '1,2,64,48,0'"),
    (["--shapes", "tiny,huge"], r"argument --shapes: unknown shape set\(s\) 'huge'; known: diffusion, tiny"),
])
def test_bad_shape_options_are_usage_errors(main, argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "usage:" in err and "Traceback" not in err
    assert re.search(message, err), err


def test_shape_options_parse_to_shapes():
    parser = argparse.ArgumentParser()
    bench._add_arguments(parser)
    args = parser.parse_args(["--shapes", "tiny", "--shape", "1x2x64x48x16", "--shape", "2,1,40,77,8",
                              "--dtype", "float32"])
    assert args.shape == [(1, 2, 64, 48, 16), (2, 1, 40, 77, 8)] and args.shapes == ["tiny"]
    names = [s.name for s in bench.select_shapes(args)]
    assert names == [s.name for s in bench.SHAPE_SETS["tiny"]] + ["1x2x64x48x16", "2x1x40x77x8"]


def test_tokamax_compat_renames_only_the_removed_kernel_keywords():
    # tokamax 0.0.12 passes plgpu.kernel(out_shape=, scratch_shapes=); JAX 0.11.2 takes only
    # out_type= / scratch_types=. The shim renames those two and forwards everything else.
    from jax_attn.bench import tokamax_compat as T

    class NewJax:  # plgpu.kernel as JAX 0.11.2 has it
        Barrier = object()

        @staticmethod
        def kernel(body, *, out_type, scratch_types=(), grid=()):
            return body, out_type, scratch_types, grid

    class OldJax:  # JAX <= 0.11.1: the old names still accepted
        @staticmethod
        def kernel(body, out_shape=None, *, out_type=None, scratch_shapes=(), scratch_types=()):
            return body

    assert T.kernel_needs_renames(NewJax) and not T.kernel_needs_renames(OldJax)
    shim = T._RenamingPlgpu(NewJax)
    assert shim.Barrier is NewJax.Barrier
    assert shim.kernel("body", out_shape="o", scratch_shapes="s", grid=(2,)) == ("body", "o", "s", (2,))
    assert shim.kernel("body", out_type="o") == ("body", "o", (), ())


def test_tokamax_compat_leaves_the_bench_arguments_out_of_absl(monkeypatch):
    # tokamax parses sys.argv as absl flags on first use; the bench's own arguments must not
    # reach it. prepare() marks the flags parsed before tokamax is imported.
    import sys
    import types

    from absl import flags

    from jax_attn.bench import tokamax_compat as T
    fake = types.ModuleType("tokamax")
    monkeypatch.setitem(sys.modules, "tokamax", fake)
    monkeypatch.setattr(T, "kernel_needs_renames", lambda plgpu: False)
    monkeypatch.setattr(sys, "argv", ["jax-attn", "bench", "--shapes", "diffusion"])
    was_parsed = flags.FLAGS.is_parsed()
    try:
        if was_parsed:
            flags.FLAGS.unparse_flags()
        assert T.prepare() is fake
        assert flags.FLAGS.is_parsed()
    finally:
        if not was_parsed:
            flags.FLAGS.unparse_flags()


def test_tokamax_compat_patches_only_tokamax_modules(monkeypatch):
    # Where this JAX's plgpu.kernel lacks the old names, every loaded tokamax module that holds
    # JAX's plgpu gets the renaming one; JAX's module itself and other modules keep theirs.
    import sys
    import types

    from jax.experimental.pallas import mosaic_gpu as plgpu

    from jax_attn.bench import tokamax_compat as T
    fake, kernel_mod, other = (types.ModuleType(n) for n in ("tokamax", "tokamax._k", "notokamax"))
    kernel_mod.plgpu = other.plgpu = plgpu
    for name, mod in (("tokamax", fake), ("tokamax._k", kernel_mod), ("notokamax", other)):
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.setattr(T, "KERNEL_MODULES", ())
    monkeypatch.setattr(T, "kernel_needs_renames", lambda p: p is plgpu)
    assert T.prepare() is fake
    assert isinstance(kernel_mod.plgpu, T._RenamingPlgpu) and kernel_mod.plgpu._plgpu is plgpu
    assert other.plgpu is plgpu and sys.modules["jax.experimental.pallas.mosaic_gpu"] is plgpu
