"""bench/serve.py's llama-server column: where the binary is found, its flags, the hearth ÷ llama-server
report (fake numbers), and a tiny real llama-server phase when bench/build_llama_server.sh has built it."""

from __future__ import annotations

import os
import stat
import sys

import pytest

from tests.bench.test_bench_serve import load_bench
from tests.conftest import default_gguf


def _fake_binary(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\necho 'version: 1 (fake)'\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def test_missing_llama_server_is_skipped_with_a_one_line_note(tmp_path, monkeypatch):
    bench = load_bench()
    monkeypatch.setenv("HEARTH_HOME", str(tmp_path))
    binary, note = bench.find_llama_server(None, off=False)
    assert binary is None
    assert "\n" not in note and "skipped" in note and "build_llama_server.sh" in note and "--llama-server" in note
    s = bench.Settings(modes=("no-ray",), rounds=2)
    assert s.schedule() == ["no-ray", "no-ray"]

    # once built where the build script puts it, it is found and measured once per round
    built = _fake_binary(bench.default_llama_server())
    assert str(built).startswith(str(tmp_path)) and built.name == "llama-server"
    assert bench.find_llama_server(None, off=False) == (str(built), None)
    assert bench.find_llama_server(None, off=True)[0] is None
    s = bench.Settings(modes=("no-ray", "ray"), rounds=2, llama_server=str(built))
    assert s.schedule() == ["no-ray", "ray", "llama-server"] * 2


def test_llama_server_arguments_are_checked(tmp_path, capsys):
    bench = load_bench()
    assert bench.main(["--llama-server", str(tmp_path / "nowhere" / "llama-server")]) == 2
    assert "is not an executable file" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # one or the other
        bench.main(["--llama-server", str(tmp_path), "--no-llama-server"])


def test_llama_server_gets_hearths_settings(tmp_path, monkeypatch):
    bench = load_bench()
    monkeypatch.setattr(bench, "_gguf", lambda: tmp_path / "model.gguf")
    fake = str(_fake_binary(tmp_path / "bin" / "llama-server"))
    s = bench.Settings(levels=(1, 8, 32), threads=3, llama_server=fake)
    args = s.llama_server_args()

    def flag(name):
        return args[args.index(name) + 1]

    assert flag("-np") == "32" and "-cb" in args  # a slot for every stream of the highest level
    assert flag("-t") == flag("-tb") == "3"
    assert int(flag("-c")) == 32 * s.context and "--no-kv-unified" in args  # hearth's context per slot
    assert flag("-m") == str(tmp_path / "model.gguf") and flag("--alias") == bench.MODEL
    srv = bench.LlamaServerProcess(bench.LLAMA, s, tmp_path)
    cmd = srv.command()
    assert cmd[0] == fake and cmd[cmd.index("--host") + 1] == "127.0.0.1"
    assert cmd[cmd.index("--api-key") + 1] == srv.key
    for var in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT"):
        monkeypatch.delenv(var, raising=False)
    from hearth.runtime.backends.llamacpp_threads import OPENMP_DEFAULTS

    env = srv.environment()  # llama.cpp's threads wait as hearth's do
    assert all(env[k] == v for k, v in OPENMP_DEFAULTS.items())
    monkeypatch.setenv("GOMP_SPINCOUNT", "300000")  # unless the user chose
    assert srv.environment()["GOMP_SPINCOUNT"] == "300000"
    line = bench.command_line(s, "out.json", f"--llama-server {fake}")
    assert line.endswith(f"--llama-server {fake} --json out.json")


def _level(c, tok_s, ttft=100.0, itl=20.0, cpu=30.0):
    return {"concurrency": c, "requests": 8, "ok": 8, "errors": 0, "error_messages": [], "tokens": 512,
            "prompt_tokens": 400, "wall_s": 512 / tok_s, "tok_s": tok_s, "ttft_p50_ms": ttft, "ttft_p95_ms": ttft * 2,
            "ttft_mean_ms": ttft, "itl_p50_ms": itl, "itl_p95_ms": itl * 2, "itl_mean_ms": itl,
            "process_cpu_ms_per_request": 10.0, "process_cpu_ms_per_token": 1.0, "server_cpu_ms_per_token": cpu,
            "server_cpu_s": {"server": cpu * 512 / 1e3}, "foreign_cpu_share": 0.0}


def _phase(kind, mode, rates, **kw):
    p = {"kind": kind, "name": f"{mode}", "levels": [_level(c, r, **kw) for c, r in rates.items()]}
    if kind == "server":
        p["mode"] = mode
    return p


def test_report_has_a_llama_server_column_and_the_issue_targets():
    bench = load_bench()
    report = sys.modules["serve_report"]
    engine = {1: 50.0, 8: 90.0, 32: 80.0}
    results = {"settings": {"max_tokens": 64, "threads": 2, "context": 2048},
               "meta": {"command": "hearth bench serve --mode no-ray", "llama_server": {"note": None}},
               "errors": {},
               "phases": [_phase("engine", "engine", engine),
                          _phase("server", "no-ray", {1: 50.0, 8: 85.0, 32: 72.0}, ttft=110.0, cpu=32.0),
                          _phase("engine", "engine", engine),
                          _phase("server", bench.LLAMA, {1: 40.0, 8: 100.0, 32: 90.0}, ttft=90.0, cpu=25.0),
                          _phase("engine", "engine", engine)]}
    results["comparison"] = report.compare(results)
    results["targets"] = t = report.targets(results)
    vs = results["comparison"]["vs_llama"]["no-ray"]
    assert vs[1]["ratio"] == pytest.approx(1.25) and vs[8]["ratio"] == pytest.approx(0.85)
    assert vs[32]["ratio"] == pytest.approx(0.8)
    assert results["comparison"]["scaling"] == {"no-ray": pytest.approx(1.7), bench.LLAMA: pytest.approx(2.5)}
    assert {k: v["pass"] for k, v in t.items() if "llama" in k or "scaling" in k} == {
        "no-ray:vs_llama_server_1": True, "no-ray:vs_llama_server_8": False, "no-ray:vs_llama_server_32": False,
        "no-ray:scaling_8": False}
    assert not any(k.startswith(bench.LLAMA) for k in t)  # llama-server is the yardstick, not a subject

    text = report.format_report(results)
    assert "| no-ray | 1 | 50.0 | 40.0 | 1.25 | 110 / 90.0 | 20.0 / 20.0 | 32.0 / 25.0 | ≥ 1: met |" in text
    assert "| no-ray | 8 | 85.0 | 100 | 0.85 |" in text and "≥ 1: MISSED" in text
    assert "| no-ray | 32 | 72.0 | 90.0 | 0.80 |" in text and "≥ 0.9: MISSED" in text
    assert "no-ray 1.70×, llama-server 2.50×" in text
    assert "[MISS] no-ray: hearth tok/s / llama-server tok/s at 8 streams: 0.850 (target >= 1)" in text
    assert "| HTTP, llama-server | 1 |" in report.markdown_table(results)  # beside hearth's rows too

    # a level where hearth's requests failed has no ratio, and says why
    results["phases"][1]["levels"][2].update(errors=8, ok=0, tokens=0, tok_s=0.0)
    results["comparison"] = report.compare(results)
    text = report.llama_table(results)
    assert "| no-ray | 32 | 0.00 | 90.0 | – |" in text and "8 failed requests |" in text


@pytest.mark.slow
@pytest.mark.skipif(default_gguf() is None, reason="the bundled default model is not installed")
def test_tiny_llama_server_phase(tmp_path):
    bench = load_bench()
    binary = bench.default_llama_server()
    if not os.access(binary, os.X_OK):
        pytest.skip("llama-server is not built (bench/build_llama_server.sh)")
    s = bench.Settings(levels=(1, 2), max_tokens=8, requests_per_level=2, llama_server=str(binary))
    warm, levels = bench.phase_prompts(s)
    res = bench.server_phase(bench.LLAMA, s, warm, levels, tmp_path)
    assert res["stop"]["rc"] == 0 and not res["stop"]["killed"], res["log_tail"]
    assert not res["warmup_errors"] and "-np 2 -cb" in res["command"] and "KEY" in res["command"]
    for row in res["levels"]:
        assert row["ok"] == 2 and row["errors"] == 0, row["error_messages"]
        assert row["tokens"] == 2 * 8  # ignore_eos and max_tokens honoured: exactly --max-tokens each
        assert row["chunks_per_request"] == 8 and 0 < row["ttft_p50_ms"] and 0 < row["itl_p50_ms"]
        assert row["server_cpu_ms_per_token"] > 0

    # the same prompt tokens as hearth's chat template gives the same messages
    from hearth.runtime import Engine
    from hearth.runtime.prompt import encode_chat

    engine = Engine.from_model(str(bench._gguf()), **s.engine_kwargs())
    try:
        hearth_tokens = sum(len(encode_chat(engine.tokenizer, m)) for m in levels[1])
    finally:
        engine.shutdown()
    assert res["levels"][0]["prompt_tokens"] == hearth_tokens


def test_server_gets_its_default_deadline():
    """With the bench's former 120 s deadline, 32 streams on a busy machine all ended in errors."""
    from hearth.serve.config import ServeConfig

    bench = load_bench()
    s = bench.Settings()
    assert s.request_timeout_s == ServeConfig().request_timeout_s
    assert f"request_timeout_s: {s.request_timeout_s}" in s.models_yaml()
