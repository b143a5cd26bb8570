"""bench/contention.py: its arguments are checked before anything runs, and a tiny run measures every
variant asked for, quiet and busy, and writes the table's numbers to --json.

    python -m pytest tests/bench/test_bench_contention.py -q
"""

from __future__ import annotations

import json

import pytest

from hearth.clients.cmd_bench import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("contention.py")


@pytest.mark.parametrize("argv, says", [
    (["--variants", "t1,vllm"], "--variants takes"),
    (["--variants", ","], "--variants takes"),
    (["--variants", "noomp-t2"], "need --lib noomp=DIR"),
    (["--lib", "noomp"], "--lib takes NAME=DIR"),
    (["--lib", "noomp=/nonexistent-dir"], "holds no llama_cpp package"),
    (["--tokens", "1"], "--tokens must be in"),
    (["--busy", "0"], "--busy must be in"),
    (["--busy", "999"], "--busy must be in"),
    (["--rounds", "0"], "--rounds must be in"),
    (["--phase-seconds", "0"], "--phase-seconds must be in"),
    (["--model", "/nonexistent/model.gguf"], "no such file"),
])
def test_bad_arguments_are_refused_before_measuring(bench, argv, says, capsys):
    assert bench.main(argv) == 2
    assert says in capsys.readouterr().err


def test_a_json_path_that_is_a_folder_is_refused(bench, tmp_path, capsys):
    assert bench.main(["--json", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err


def test_a_tiny_run_measures_quiet_and_busy_for_each_variant(bench, smollm_gguf, tmp_path, capsys):
    out = tmp_path / "r" / "contention.json"
    rc = bench.main(["--variants", "hearth,t1", "--rounds", "1", "--reps", "1", "--tokens", "4",
                     "--phase-seconds", "2", "--model", str(smollm_gguf), "--json", str(out)])
    res = json.loads(out.read_text())
    assert rc == 0, res["errors"]
    assert list(res["results"]) == ["hearth", "t1"]
    for name, row in res["results"].items():
        assert row["quiet_tok_s"] > 0 and row["busy_tok_s"] > 0, name
        assert row["busy_over_quiet"] == pytest.approx(row["busy_tok_s"] / row["quiet_tok_s"])
        assert [p["busy"] for r in res["runs"][name] for p in r["phases"]] == [False, True]
    assert res["results"]["t1"]["n_threads"] == 1
    assert res["results"]["hearth"]["env"] == {"OMP_WAIT_POLICY": None, "GOMP_SPINCOUNT": "1000"}  # hearth's
    assert "busy/quiet" in capsys.readouterr().out
