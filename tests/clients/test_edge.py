"""`hearth edge` end to end: the real program on the bundled model, driven through a pseudo-terminal
like a user at a keyboard (typing, Enter, Ctrl-C, Ctrl-D). The pty driver is bench/edge.py's Terminal."""

from __future__ import annotations

import json
import sys

import pytest

from hearth.clients.cmd_bench import load_benchmark

pytestmark = pytest.mark.slow

bench = load_benchmark("edge.py")
STATS = bench.STATS_LINE.pattern
FORBIDDEN = ("torch", "transformers", "ray", "fastapi", "gradio", "sentence_transformers")
# runs the CLI like `hearth ...` and writes sys.modules to the file named by its first argument at exit
RECORD_MODULES = ("import atexit, json, sys; out = sys.argv.pop(1);"
                  "atexit.register(lambda: open(out, 'w').write(json.dumps(sorted(sys.modules))));"
                  "from hearth.clients.cli import main; sys.exit(main(sys.argv[1:]))")


def edge(model, history, *extra: str) -> list[str]:
    return bench.edge_argv(str(model), "--history", str(history), "--threads", "2", "--temperature", "0",
                           *extra)


def test_answer_streams_history_persists_and_resumes_without_torch(smollm_gguf, tmp_path):
    history = tmp_path / "edge" / "history.json"
    modules = tmp_path / "modules.json"
    argv = edge(smollm_gguf, history, "--system", "You are a helpful assistant.", "--max-tokens", "24")
    argv = [sys.executable, "-c", RECORD_MODULES, str(modules), *argv[3:]]  # in place of `-m hearth.clients.cli`
    with bench.Terminal(argv) as term:
        term.expect(r"you> ", timeout=60)
        term.sendline("What is the capital of Germany?")
        answer = term.expect(r"assistant> ([^\n]*)\n", timeout=60).group(1)
        m = term.expect(STATS, timeout=60)
        assert "Berlin" in answer
        assert 0 < int(m.group(1)) <= 24 and float(m.group(2)) > 0 and float(m.group(3)) >= 0
        term.expect(r"you> ", timeout=10)
        term.sendline("/quit")
        assert term.wait(30) == 0

    loaded = set(json.loads(modules.read_text()))
    assert "hearth.clients.edge" in loaded and "llama_cpp" in loaded  # the record covers the real session
    assert not [m for m in FORBIDDEN if m in loaded or any(k.startswith(m + ".") for k in loaded)]
    saved = json.loads(history.read_text())
    assert saved["system"] == "You are a helpful assistant."
    assert [m["role"] for m in saved["messages"]] == ["user", "assistant"]
    assert "Berlin" in saved["messages"][1]["content"]

    with bench.Terminal(edge(smollm_gguf, history)) as term:  # a restart continues the conversation
        term.expect(r"resumed 2 messages", timeout=60)
        term.expect(r"you> ", timeout=10)
        term.sendline("/history")
        term.expect(r"system: You are a helpful assistant\.\n", timeout=10)
        term.expect(r"user: What is the capital of Germany\?\nassistant: [^\n]*Berlin", timeout=10)
        term.expect(r"you> ", timeout=10)
        term.send("\x04")  # Ctrl-D
        assert term.wait(30) == 0


def test_commands_in_a_terminal_and_a_corrupt_history(smollm_gguf, tmp_path):
    history = tmp_path / "history.json"
    history.write_text('{"messages": [{"role": "user"')  # cut off mid-write by some other tool
    with bench.Terminal(edge(smollm_gguf, history, "--max-tokens", "8")) as term:
        term.expect(r"history file .*history\.json is unusable: not valid JSON.*fresh conversation", timeout=60)
        term.expect(r"you> ", timeout=60)
        term.sendline("/system You answer in one word.")
        term.expect(r"\[system prompt set\]", timeout=10)
        term.sendline("/system")
        term.expect(r"\[system prompt: You answer in one word\.\]", timeout=10)
        term.sendline("Name a color.")
        term.expect(STATS, timeout=60)
        term.sendline("/save colors")
        term.expect(r"\[saved 2 messages as 'colors'", timeout=10)
        term.sendline("/reset")
        term.expect(r"\[conversation cleared\]", timeout=10)
        term.sendline("/history")
        term.expect(r"system: You answer in one word\.\n\[the conversation is empty\]", timeout=10)
        term.sendline("/load")
        term.expect(r"\[saved conversations: colors\]", timeout=10)
        term.sendline("/load colors")
        term.expect(r"\[loaded 'colors': 2 messages\]", timeout=10)
        term.sendline("/history")
        term.expect(r"user: Name a color\.\nassistant: ", timeout=10)
        term.sendline("/quit")
        assert term.wait(30) == 0
    assert [p.name for p in tmp_path.glob("history.json.corrupt-*")]  # the broken file was kept aside
    assert json.loads(history.read_text())["messages"][0]["content"] == "Name a color."
    assert json.loads((tmp_path / "colors.json").read_text())["system"] == "You answer in one word."


def test_ctrl_c_stops_an_answer_and_the_chat_goes_on(smollm_gguf, tmp_path):
    history = tmp_path / "history.json"
    with bench.Terminal(edge(smollm_gguf, history, "--max-tokens", "1000",
                             "--system", "You are a helpful assistant.")) as term:
        term.expect(r"you> ", timeout=60)
        term.sendline("Count from 1 to 500, separated by commas.")
        term.expect(r"assistant> [^\n]*\d", timeout=60)  # streamed: seen long before the answer could end
        term.interrupt()
        stopped = term.expect(r"\[stopped: (\d+) tokens", timeout=20)
        assert int(stopped.group(1)) < 1000
        term.expect(r"you> ", timeout=10)
        assert term.alive()
        term.sendline("/history")  # the loop still runs, and the partial answer was kept
        term.expect(r"user: Count from 1 to 500, separated by commas\.\nassistant: \S", timeout=10)
        term.expect(r"you> ", timeout=10)
        # At the prompt the first Ctrl-C asks, the second exits. Each is followed by Enter: CPython's
        # input() misses a signal that lands between printing the prompt and waiting for a key, and
        # acts on it only when input() returns. A person never types that fast; a test does.
        term.interrupt()
        term.sendline("")
        term.expect(r"Ctrl-C again", timeout=10)
        term.expect(r"you> ", timeout=10)
        term.interrupt()
        term.sendline("")
        assert term.wait(30) == 0
    assert json.loads(history.read_text())["messages"][1]["role"] == "assistant"


def test_bench_edge_one_run(tmp_path):
    out = tmp_path / "edge.json"
    assert bench.main(["--runs", "1", "--max-tokens", "8", "--threads", "2", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    run = result["runs"][0]
    assert run["start_to_prompt_s"] < run["start_to_first_token_s"]
    assert 0 < run["peak_rss_mb"] <= bench.TARGETS["peak_rss_mb"]
    assert set(result["pass"]) == set(bench.TARGETS)
