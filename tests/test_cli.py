"""`python -m jax_attn info` and `check`: what they print, what they write, their exit codes."""
import json

import pytest

from jax_attn import cli
from jax_attn.backends import BACKENDS

FAST = ["--shrink", "16", "--quiet"]


def test_info_lists_every_backend_with_availability(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "jax" in out and "devices" in out
    for name in BACKENDS:
        assert any(line.startswith(name) for line in out.splitlines()), name


@pytest.mark.slow  # `check` over every case, twice; the fast run keeps the failing check below
def test_check_passes_and_writes_json(tmp_path, capsys):
    path = tmp_path / "check.json"
    assert cli.main(["check", "--backends", "xla,naive", "--no-torch", "--json", str(path), *FAST]) == 0
    doc = json.loads(path.read_text())
    rows = doc["results"]
    assert {r["backend"] for r in rows} == {"xla", "naive"}
    assert len(rows) == 2 * len(cli.CASES)
    ran = [r for r in rows if r["status"] == "pass"]
    assert len(ran) >= len(cli.CASES)  # naive serves every case; xla skips only dv != d
    assert all(r["out_err"] <= r["tol"] and r["grad_err"] <= 2 * r["tol"] for r in ran)
    assert "0 failed" in capsys.readouterr().out


@pytest.mark.slow  # `check` over every case
def test_check_fails_with_a_wrong_backend(monkeypatch, capsys):
    naive = BACKENDS["naive"]
    right = naive._forward

    def off_by_one_percent(inputs, return_lse):
        res = right(inputs, return_lse)
        return (res[0] * 1.01, res[1]) if return_lse else res * 1.01

    monkeypatch.setattr(naive, "_forward", off_by_one_percent)
    assert cli.main(["check", "--backends", "naive", "--no-torch", *FAST]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and f"{len(cli.CASES)} failed" in out


def test_check_reports_a_backend_that_fails_to_compile(monkeypatch):
    """A crash while compiling is a FAIL row naming the error (it once raised NameError: the
    row's closure read the except clause's variable after Python had unbound it)."""
    naive = BACKENDS["naive"]

    def broken(inputs, return_lse):
        raise RuntimeError("lowering refused this case")

    monkeypatch.setattr(naive, "_forward", broken)
    row = cli.compile_case("naive", cli.CASES[0], "float32")()
    assert row["status"] == "FAIL"
    assert row["note"] == "RuntimeError: lowering refused this case"


def test_check_rejects_an_unknown_backend(capsys):
    assert cli.main(["check", "--backends", "naive,nope", *FAST]) == 2
    assert "nope" in capsys.readouterr().err


@pytest.mark.slow  # `check` over every case, in both frameworks
def test_check_adds_torch_rows_in_the_asked_dtype(tmp_path):
    pytest.importorskip("torch")
    path = tmp_path / "check.json"
    assert cli.main(["check", "--backends", "naive", "--dtype", "float32", "--json", str(path), *FAST]) == 0
    torch_rows = [r for r in json.loads(path.read_text())["results"] if r["backend"].startswith("torch:")]
    assert {r["backend"] for r in torch_rows} >= {"torch:naive", "torch:sdpa", "torch:chunked"}
    assert {r["dtype"] for r in torch_rows} == {"float32"}
    assert all(r["status"] in ("pass", "skip") for r in torch_rows)
