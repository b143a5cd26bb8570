"""Smoke test of bench/hangups.py: arguments, and a small no-ray run against a real `hearth serve`."""

from __future__ import annotations

import json

import pytest

from hearth.clients.cmd_bench import load_benchmark
from tests.conftest import default_gguf


def load_bench():
    return load_benchmark("hangups.py")  # as `hearth bench hangups` loads it


def test_bench_arguments_are_checked():
    bench = load_bench()
    assert bench.main(["--variants", "no-ray,nginx"]) == 2
    assert bench.main(["--streams", "1,x"]) == 2
    assert bench.main(["--streams", "64"]) == 2  # beyond the server's max_num_seqs
    assert bench.main(["--repeats", "0"]) == 2


@pytest.mark.slow
@pytest.mark.skipif(default_gguf() is None, reason="the bundled default model is not installed")
def test_no_ray_run_measures_every_case(tmp_path):
    out = tmp_path / "hangups.json"
    bench = load_bench()
    assert bench.main(["--variants", "no-ray", "--streams", "1,3", "--repeats", "1", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    [v] = res["variants"]
    assert v["variant"] == "no-ray" and v["stop"]["rc"] == 0
    for n in ("1", "3"):
        [dt] = v["groups"][n]
        assert 0 < dt < 2  # a server that kept decoding for abandoned streams would take seconds
    assert v["hundred"]["clients"] == 100 and 0 <= v["hundred"]["idle_after_s"] < 2
    assert "| no-ray |" in bench.format_report(res)
