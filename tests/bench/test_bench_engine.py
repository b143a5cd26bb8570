"""Smoke test of bench/engine.py: a --quick run on the llama.cpp backend writes all four sections."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "engine.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_engine_under_test", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def all_numbers(obj) -> list[float]:
    if isinstance(obj, bool):
        return []
    if isinstance(obj, (int, float)):
        return [obj]
    if isinstance(obj, dict):
        return [x for v in obj.values() for x in all_numbers(v)]
    if isinstance(obj, list):
        return [x for v in obj for x in all_numbers(v)]
    return []


def test_bench_arguments_are_checked():
    bench = load_bench()
    assert bench.main(["--backends", "vllm"]) == 2


@pytest.mark.slow
def test_quick_run_writes_every_section(smollm_gguf, tmp_path, monkeypatch):
    monkeypatch.setenv("HEARTH_HOME", str(tmp_path / "home"))
    out = tmp_path / "engine.json"
    bench = load_bench()
    rc = bench.main(["--quick", "--json", str(out), "--backends", "llamacpp"])
    res = json.loads(out.read_text())
    llama = res["backends"]["llamacpp"]
    assert rc == 0, llama.get("tracebacks")
    assert "transformers" not in res["backends"]

    single = llama["single"]  # 1. single stream, engine vs raw llama-cpp-python
    for path in ("engine", "baseline"):
        assert single[path]["decode_tok_s"] > 0 and single[path]["ttft_ms"] > 0
        assert single[path]["tokens"] == res["settings"]["single_tokens"]
    assert single["ratio"] > 0

    conc = llama["concurrency"]  # 2. concurrency levels and llama.cpp's own prompt rate
    assert [r["concurrency"] for r in conc["levels"]] == [1, 4, 8, 16]
    for row in conc["levels"]:
        assert row["agg_tok_s"] > 0 and row["decode_agg_tok_s"] > 0
        assert row["itl_p50_ms"] > 0 and row["itl_p95_ms"] >= row["itl_p50_ms"]
        assert row["tokens"] == row["concurrency"] * res["settings"]["conc_tokens"]
    assert conc["prompt_rate"]["tok_s"] > 0 and conc["ratio_8_vs_1"] > 0 and conc["pp_fraction_at_16"] > 0

    prefix = llama["prefix"]  # 3. prefix cache on vs off
    assert prefix["cold_ttft_ms"] > 0 and prefix["cached_ttft_ms"] > 0 and prefix["ratio"] > 0
    assert min(prefix["cached_tokens"]) >= prefix["prefix_tokens"] * 0.9  # the second request hit the cache
    assert max(prefix["off_cached_tokens"]) == 0

    bw = res["bandwidth"]  # 4. bandwidth and the decode ceiling
    assert bw["gb_s"] > 0 and bw["numpy_1thread_gb_s"] > 0
    ceiling = res["ceilings"]["llamacpp"]
    assert ceiling["ceiling_tok_s"] > 0 and ceiling["engine_fraction"] > 0 and ceiling["weight_bytes"] > 0

    assert set(res["targets"]) == {"llamacpp_single_vs_raw", "llamacpp_8_vs_1", "llamacpp_prefix_cached_vs_cold"}
    assert all(n >= 0 and math.isfinite(n) for n in all_numbers(llama) if isinstance(n, float))
