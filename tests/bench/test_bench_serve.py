"""Smoke test of bench/serve.py: a tiny --mode no-ray run against a real `hearth serve` subprocess."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from tests.conftest import default_gguf

BENCH = Path(__file__).resolve().parents[2] / "bench" / "serve.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_serve_under_test", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_bench_arguments_are_checked():
    bench = load_bench()
    assert bench.main(["--concurrency", "1,x"]) == 2
    assert bench.main(["--concurrency", "64"]) == 2  # beyond the server's max_num_seqs
    assert bench.main(["--max-tokens", "1"]) == 2


@pytest.mark.slow
@pytest.mark.skipif(default_gguf() is None, reason="the bundled default model is not installed")
def test_tiny_no_ray_run_writes_every_field(tmp_path):
    out = tmp_path / "serve.json"
    bench = load_bench()
    rc = bench.main(["--mode", "no-ray", "--concurrency", "1,2", "--max-tokens", "8", "--requests-per-level", "2",
                     "--no-llama-server", "--json", str(out)])
    res = json.loads(out.read_text())
    assert rc == 0, (res.get("errors"), res.get("tracebacks"))
    assert not res["errors"]
    assert [p["kind"] for p in res["phases"]] == ["engine", "server", "engine"]  # alternating phases
    assert res["meta"]["command"].startswith("hearth bench serve --mode no-ray --concurrency 1,2 --max-tokens 8")

    server = res["phases"][1]
    assert server["mode"] == "no-ray" and server["startup_s"] > 0 and server["stop"]["rc"] == 0
    assert not server["warmup_errors"]
    for phase in res["phases"]:
        assert [r["concurrency"] for r in phase["levels"]] == [1, 2]
        for row in phase["levels"]:
            assert row["requests"] == 2 and row["ok"] == 2 and row["errors"] == 0, row["error_messages"]
            assert row["tokens"] == 2 * 8 and row["tok_s"] > 0
            assert 0 < row["ttft_p50_ms"] <= row["ttft_p95_ms"]
            assert 0 < row["itl_p50_ms"] <= row["itl_p95_ms"]
            assert row["process_cpu_ms_per_request"] > 0
    # the same prompts on both sides: equal prompt token counts
    assert server["levels"][0]["prompt_tokens"] == res["phases"][0]["levels"][0]["prompt_tokens"] > 0
    assert server["levels"][0]["server_cpu_ms_per_token"] > 0

    single = res["comparison"]["modes"]["no-ray"]["1"]
    assert single["ratio"] > 0 and single["added_ttft_p50_ms"] is not None
    assert res["comparison"]["engine"]["1"]["runs"] == 2
    assert set(res["targets"]) == {"no-ray:single_stream_ratio", "no-ray:added_ttft_p50_ms"}

    report = sys.modules["serve_report"]  # the table RESULTS.md shows, rendered from the saved JSON
    assert "| HTTP, no-ray | 1 | 2 |" in report.markdown_table(report.load_results(str(out)))
