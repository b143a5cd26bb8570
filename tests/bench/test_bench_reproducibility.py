"""bench/reproducibility.py as `hearth bench reproducibility` loads it: its arguments are checked before
any model loads, and a result path that cannot be written is refused up front."""

from __future__ import annotations

from hearth.clients.cmd_bench import BENCHMARKS, load_benchmark


def test_bench_is_registered_and_its_arguments_are_checked(tmp_path):
    assert "reproducibility" in BENCHMARKS
    bench = load_benchmark("reproducibility.py")
    assert bench.main(["--backends", "llamacpp,vllm"]) == 2
    assert bench.main(["--reps", "0"]) == 2
    assert bench.main(["--json", str(tmp_path)]) == 2  # a folder: refused before measuring
