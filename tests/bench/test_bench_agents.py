"""bench/agents.py: the evaluation core against a scripted model (exact accuracy arithmetic, JSON shape),
argument checks, and a `--limit 2` run of `hearth bench agents` on the real default model."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from hearth.agents.evalsets import load_tool_prompts, load_word_problems
from hearth.clients.cmd_bench import finite
from hearth.agents.model import ChatReply, ScriptedChatModel, ToolCall
from tests.conftest import default_gguf

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "bench" / "agents.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_agents_under_test", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


class Responder:
    """Plays a model that knows the gold answers, except where told to be wrong:
    plain_wrong: ids answered gold + 1 by the plain strategy; sc_split: ids whose 5 sampled paths vote
    2 right / 3 wrong; select: prompt id -> the tool the model calls first (None: no call)."""

    def __init__(self, problems, prompts, plain_wrong=(), sc_split=(), select=None):
        self.problems, self.prompts = problems, prompts
        self.plain_wrong, self.sc_split = set(plain_wrong), set(sc_split)
        self.select = select or {}
        self.sc_paths: Counter = Counter()
        self.kinds: Counter = Counter()

    def __call__(self, messages, kw):
        users = [m["content"] for m in messages if m["role"] == "user" and isinstance(m.get("content"), str)]
        prompt = next((p for p in self.prompts if any(u == p.prompt for u in users)), None)
        if prompt is not None:
            self.kinds["select"] += 1
            assert kw["tool_choice"] == "auto" and kw["temperature"] == 0.0
            offered = {t["function"]["name"] for t in kw["tools"]}
            assert {"calculator", "solve_equation", "current_datetime", "rag_search"} <= offered
            name = self.select.get(prompt.id, prompt.expected_tool)
            if name in (None, "none"):
                return ChatReply(content="Here is my answer without tools.")
            return ChatReply(tool_calls=[ToolCall("c0", name, "{}")], finish_reason="tool_calls")
        p = next(p for p in self.problems if any(p.question in u for u in users))
        gold = p.answer
        if kw["tools"]:  # the tool loop: call the calculator, then read its result back
            self.kinds["tools"] += 1
            assert [t["function"]["name"] for t in kw["tools"]] == ["calculator"]
            results = [m["content"] for m in messages if m["role"] == "tool"]
            if not results:
                return ChatReply(tool_calls=[ToolCall("c1", "calculator",
                                                      json.dumps({"expression": p.expression}))],
                                 finish_reason="tool_calls")
            return f"The calculator says {results[-1]}. The answer is {results[-1]}."
        if kw["n"] > 1:  # self-consistency: one call, n sampled paths
            self.kinds["sc_path"] += 1
            assert kw["temperature"] == 0.7 and kw["seed"] == 1234
            i = self.sc_paths[p.id]
            self.sc_paths[p.id] += 1
            value = gold + 1 if p.id in self.sc_split and i >= 2 else gold
            return f"Reasoning path {i}. The answer is {value:g}."
        assert kw["temperature"] == 0.0 and kw["seed"] is None
        if len(users) == 1 and users[0] == p.question:  # plain: the bare question
            self.kinds["plain"] += 1
            return f"{gold + 1:g}" if p.id in self.plain_wrong else f"It is {gold:g}."
        self.kinds["cot"] += 1
        if "Therefore, the answer is" in users[-1]:
            return f"{gold:g}"
        return "First I add, then I check. 1 + 1 = 2."


async def test_evaluate_counts_every_strategy_and_tool_choice_exactly():
    bench = load_bench()
    problems = bench.limited(load_word_problems(), 4)
    assert [p.id for p in problems] == ["en-01", "zh-01", "en-02", "zh-02"]  # alternating languages
    want = ["en-calc-1", "en-solve-1", "en-time-1", "en-rag-1", "en-none-1", "zh-rag-1", "zh-none-1"]
    prompts = [p for p in load_tool_prompts() if p.id in want]
    responder = Responder(problems, prompts, plain_wrong={"en-01"}, sc_split={"zh-02"},
                          select={"en-rag-1": None, "zh-none-1": "calculator"})
    # plain 1 + cot 2 + self-consistency 5 (one call, n=5) + tools 2 model calls per problem, 1 per prompt
    model = ScriptedChatModel([responder] * (4 * (1 + 2 + 5 + 2) + len(prompts)))
    s = bench.Settings(concurrency=3, max_tokens=64)
    done = []
    res = await bench.evaluate(model, problems, prompts, s, on_item=lambda: done.append(1))

    assert model.remaining == 0 and len(done) == 4 * 4 + len(prompts)
    assert responder.kinds == {"plain": 4, "cot": 8, "sc_path": 20, "tools": 8, "select": len(prompts)}
    # word problems: --max-tokens on every call (one call carries the n=5 paths); selection: its own cap
    assert Counter(c["max_tokens"] for c in model.calls) == {64: 4 * (1 + 2 + 1 + 2), 96: len(prompts)}
    summ = res["word_problems"]["summary"]
    assert list(summ) == list(bench.STRATEGIES)
    assert summ["plain"]["all"] == {"correct": 3, "total": 4, "accuracy": 0.75}
    assert summ["plain"]["en"] == {"correct": 1, "total": 2, "accuracy": 0.5}
    assert summ["plain"]["zh"]["accuracy"] == 1.0
    assert summ["cot"]["all"]["accuracy"] == 1.0
    assert summ["self_consistency"]["all"]["correct"] == 3 and summ["self_consistency"]["zh"]["correct"] == 1
    assert summ["tools"]["all"]["accuracy"] == 1.0
    assert all(row["errors"] == 0 and row["no_answer"] == 0 for row in summ.values())

    items = {(r["strategy"], r["id"]): r for r in res["word_problems"]["items"]}
    assert len(items) == 16
    wrong = items[("plain", "en-01")]
    assert wrong["prediction"] == "20" and wrong["gold"] == 19 and not wrong["correct"]
    assert items[("self_consistency", "zh-02")]["votes"] == {"8": 2, "9": 3}
    assert items[("self_consistency", "zh-02")]["prediction"] == "9"
    tools_row = items[("tools", "en-02")]  # 24 * 5, computed by the real calculator tool
    assert tools_row["prediction"] == "120"
    assert tools_row["tool_calls"] == [{"name": "calculator", "arguments": {"expression": "24 * 5"}, "result": "120"}]

    ts = res["tool_selection"]["summary"]
    assert ts["all"] == {"correct": 5, "total": 7, "accuracy": 5 / 7}
    assert ts["en"]["correct"] == 4 and ts["zh"]["correct"] == 1
    assert ts["by_tool"]["rag_search"] == {"correct": 1, "total": 2, "accuracy": 0.5}
    assert ts["by_tool"]["none"]["correct"] == 1
    assert ts["confusion"]["rag_search"] == {"none": 1, "rag_search": 1}
    assert ts["confusion"]["none"] == {"none": 1, "calculator": 1}
    assert "rag_search" in res["tool_selection"]["tools_offered"]

    # JSON with every item's prediction; the Markdown table shows the per-language cells
    text = json.dumps(finite({"meta": {"model": "scripted"}, **res}), default=str)
    back = json.loads(text)
    assert all({"id", "lang", "strategy", "gold", "prediction", "answer", "correct", "usage"} <= set(r)
               for r in back["word_problems"]["items"])
    assert all({"id", "lang", "expected", "predicted", "correct", "content"} <= set(r)
               for r in back["tool_selection"]["items"])
    report = bench.format_report({"meta": {"model": "scripted", "endpoint": "test"}, **res})
    assert "| plain | 75% (3/4) | 50% (1/2) | 100% (2/2) |" in report
    assert "| **all** | 71% (5/7) |" in report
    assert "rag_search → none ×1" in report


async def test_a_broken_endpoint_is_recorded_per_item_not_raised():
    bench = load_bench()
    problems = bench.limited(load_word_problems(), 2)
    model = ScriptedChatModel([])  # every call fails: no reply left
    res = await bench.evaluate(model, problems, [], bench.Settings(strategies=("plain", "tools")))
    rows = res["word_problems"]["items"]
    assert [(r["strategy"], r["correct"]) for r in rows] == [("plain", False)] * 2 + [("tools", False)] * 2
    # plain raises; the tool loop returns stopped="error": both are counted as errors
    assert all("no reply left" in r["error"] and r["stopped"] == "error" for r in rows)
    assert [v["errors"] for v in res["word_problems"]["summary"].values()] == [2, 2]
    assert "tool_selection" not in res


def test_limit_takes_both_languages_and_arguments_are_checked(capsys):
    bench = load_bench()
    probs = load_word_problems()
    assert [p.lang for p in bench.limited(probs, 3)] == ["en", "zh", "en"]
    assert bench.limited(probs, 500) == probs
    assert bench.main(["--strategies", "plain,magic"]) == 2
    assert "unknown strategies ['magic']" in capsys.readouterr().err
    assert bench.main(["--limit", "0"]) == 2
    assert bench.main(["--model", "x"]) == 2  # --model belongs to --url


def test_a_model_path_that_cannot_be_served_is_a_one_line_error(tmp_path, capsys):
    bench = load_bench()
    missing = tmp_path / "missing.gguf"
    assert bench.main(["--limit", "1", "--model-path", str(missing)]) == 1
    assert f"bench agents: cannot serve {missing}: no model at" in capsys.readouterr().err


def test_hearth_bench_lists_agents():
    from hearth.clients.cmd_bench import BENCHMARKS, load_benchmark

    assert BENCHMARKS["agents"][0] == "agents.py"
    module = load_benchmark("agents.py")
    assert callable(module.add_arguments) and callable(module.run)


@pytest.mark.slow
@pytest.mark.skipif(default_gguf() is None, reason="the bundled default model is not installed")
def test_limit_2_run_on_the_default_model(tmp_path):
    out = tmp_path / "agents.json"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    p = subprocess.run([sys.executable, "-m", "hearth.clients.cli", "bench", "agents", "--limit", "2",
                        "--n", "2", "--max-tokens", "48", "--json", str(out)],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(out.read_text(encoding="utf-8"))
    assert res["meta"]["model"] == "smollm2-135m-instruct"
    assert res["meta"]["command"].startswith("hearth bench agents --n 2 --limit 2 --max-tokens 48")
    items = res["word_problems"]["items"]
    assert Counter(r["strategy"] for r in items) == {s: 2 for s in ("plain", "cot", "self_consistency", "tools")}
    assert {r["lang"] for r in items} == {"en", "zh"} and not any(r["error"] for r in items)
    assert all(r["answer"] is not None or r["stopped"] != "answer" for r in items)
    assert all(len(r["votes"]) >= 1 for r in items if r["strategy"] == "self_consistency" and r["votes"])
    sel = res["tool_selection"]["items"]
    assert len(sel) == 2 and all(r["predicted"] is not None and r["error"] is None for r in sel)
    summ = res["word_problems"]["summary"]["plain"]
    assert summ["all"]["total"] == 2 and summ["en"]["total"] == 1 and summ["zh"]["total"] == 1
    assert "| strategy | all | en | zh |" in p.stdout and "Tool selection" in p.stdout
