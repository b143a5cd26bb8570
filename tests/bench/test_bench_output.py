"""Every benchmark keeps its results: `--json bench/x.json` from a folder without `bench/` creates it,
the file is written whole, and a path that cannot be written is refused before the run starts.

    python -m pytest tests/bench/test_bench_output.py -q
"""

from __future__ import annotations

import json
import time

import pytest

from hearth.clients.cmd_bench import BENCHMARKS, load_benchmark, output_problem, write_json

EDGE_RUN = {"start_to_first_token_s": 0.5, "start_to_prompt_s": 0.3, "first_token_in_app_s": 0.2,
            "peak_rss_mb": 200.0, "decode_tok_s": 30.0, "answer": "Paris"}


def test_write_json_creates_the_folder_and_writes_null_for_nan(tmp_path):
    out = write_json(tmp_path / "new" / "deeper" / "r.json", {"x": float("nan"), "y": [1, float("inf")]})
    assert json.loads(out.read_text()) == {"x": None, "y": [1, None]}
    assert [p.name for p in out.parent.iterdir()] == ["r.json"]  # no temp left beside it


def test_an_unwritable_result_goes_to_a_temp_file_instead_of_being_lost(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    out = write_json(blocker / "r.json", {"kept": True})  # a folder that is a file: cannot be created
    try:
        assert json.loads(out.read_text()) == {"kept": True}
        assert str(out) in capsys.readouterr().err
    finally:
        out.unlink()


def test_bench_edge_from_a_folder_without_bench_keeps_its_results(tmp_path, monkeypatch, capsys):
    edge = load_benchmark("edge.py")
    monkeypatch.setattr(edge, "one_run", lambda args, folder: dict(EDGE_RUN))
    monkeypatch.chdir(tmp_path)
    assert edge.main(["--runs", "1", "--json", "bench/edge.json"]) == 0
    res = json.loads((tmp_path / "bench" / "edge.json").read_text())
    assert res["median"]["peak_rss_mb"] == 200.0


def test_bench_engine_from_a_folder_without_bench_keeps_its_results(tmp_path, monkeypatch):
    engine = load_benchmark("engine.py")
    monkeypatch.setattr(engine, "bench_bandwidth", lambda s: {"gb_s": 10.0})

    def fake_backend(s, out):
        out["single"] = {"engine": {"decode_tok_s": 50.0}}

    monkeypatch.setattr(engine, "bench_llamacpp", fake_backend)
    monkeypatch.setattr(engine, "format_report", lambda results: "table")
    monkeypatch.chdir(tmp_path)
    assert engine.main(["--quick", "--backends", "llamacpp", "--json", "bench/engine.json"]) == 0
    res = json.loads((tmp_path / "bench" / "engine.json").read_text())
    assert res["backends"]["llamacpp"]["single"]["engine"]["decode_tok_s"] == 50.0


@pytest.mark.parametrize("name", [n for n in BENCHMARKS if n != "hostile"])
def test_a_json_path_that_is_a_folder_is_refused_before_any_work(name, tmp_path, capsys):
    bench = load_benchmark(BENCHMARKS[name][0])
    argv = ["--json", str(tmp_path)]
    if name == "agents":
        argv += ["--limit", "1"]
    t0 = time.monotonic()
    assert bench.main(argv) == 2
    assert time.monotonic() - t0 < 10
    assert "is a folder" in capsys.readouterr().err


def test_output_problem_creates_missing_folders(tmp_path):
    assert output_problem(tmp_path / "a" / "b" / "r.json") is None
    assert (tmp_path / "a" / "b").is_dir()
    assert output_problem(None) is None
