"""bench/hostile.py: its arguments, and the verdict it draws from a run's numbers."""

from __future__ import annotations

from hearth.clients.cmd_bench import load_benchmark


def load_bench():
    return load_benchmark("hostile.py")  # as `hearth bench hostile` loads it


def test_bench_arguments_are_checked(tmp_path):
    bench = load_bench()
    assert bench.main(["--layouts", "no-ray,nginx"]) == 2
    assert bench.main(["--attacks", "special_prompt,fork_bomb"]) == 2
    assert bench.main(["--quiet-s", "0"]) == 2
    assert bench.main(["--layouts", "no-ray", "--json", str(tmp_path)]) == 2  # a folder: refused before measuring


def _phase(itl: float, health: float, errors=()) -> dict:
    return {"itl_p99_s": itl, "health_p99_s": health, "errors": list(errors)}


def _run(**over) -> dict:
    r = {"phases": {"quiet": _phase(0.02, 0.01), "one_by_one": _phase(0.03, 0.2),
                    "all_at_once": _phase(0.05, 0.4)},
         "attacks": {"huge_body": {"status": 413, "leak": False}},
         "attacks_together": {"huge_body": {"status": 413, "leak": False}},
         "replicas_restarted": 0, "server_alive": True}
    r.update(over)
    return r


def test_verdict_names_each_missed_target():
    bench = load_bench()
    assert all(bench.verdict(_run()).values())
    assert not bench.verdict(_run(attacks={"huge_body": {"status": 500}}))["no_5xx"]
    assert not bench.verdict(_run(attacks={"huge_body": {"status": 400, "leak": True}}))["no_leak"]
    assert not bench.verdict(_run(replicas_restarted=1))["no_replica_restart"]
    slow = _run(phases={"quiet": _phase(0.02, 0.01), "one_by_one": _phase(0.07, 1.5),
                        "all_at_once": _phase(0.05, 0.4)})
    v = bench.verdict(slow)
    assert not v["one_by_one: health p99 < 1 s"] and not v["one_by_one: ITL p99 <= 3x quiet"]
    assert v["all_at_once: health p99 < 1 s"] and v["all_at_once: ITL p99 <= 3x quiet"]
