"""The strategy dispatcher: option checks, budgets, and every strategy reaching its scripted answer.

    nice -n 10 .venv/bin/python -m pytest tests/agents/test_strategies.py -q
"""

from __future__ import annotations

import pytest

from hearth.agents.embed import HashingEmbedder
from hearth.agents.model import ChatReply, ScriptedChatModel, ToolCall
from hearth.agents.strategies import STRATEGIES, StrategyOptions, default_budget, run_strategy
from hearth.agents.tools.calculator import calculator
from hearth.agents.tools.registry import ToolRegistry
from hearth.agents.types import AgentInputError, Budget, Trace


def test_strategy_names():
    assert STRATEGIES == ("plain", "cot", "few_shot_cot", "self_consistency", "react", "plan_execute", "tot",
                          "tools")


async def test_unknown_strategy_names_the_list():
    with pytest.raises(AgentInputError) as e:
        await run_strategy("magic", ScriptedChatModel([]), "hi")
    assert e.value.param == "strategy" and "self_consistency" in str(e.value) and "'magic'" in str(e.value)


@pytest.mark.parametrize("kwargs,param", [
    ({"n": 0}, "n"), ({"n": 33}, "n"), ({"n": 2.5}, "n"), ({"temperature": 2.5}, "temperature"),
    ({"temperature": "hot"}, "temperature"), ({"max_tokens": 0}, "max_tokens"), ({"seed": "7"}, "seed"),
    ({"answer_type": "integer"}, "answer_type"), ({"k_shots": -1}, "k_shots"), ({"beam": 0}, "beam"),
    ({"branch": True}, "branch"), ({"depth": 9}, "depth"),
])
def test_options_are_checked(kwargs, param):
    with pytest.raises(AgentInputError) as e:
        StrategyOptions(**kwargs)
    assert e.value.param == param and param in str(e.value)


def test_default_budgets_fit_the_strategy():
    o = StrategyOptions(n=7, beam=2, branch=3, depth=3)
    assert default_budget("plain", o).max_steps == 1
    assert default_budget("cot", o).max_steps == 2
    assert default_budget("self_consistency", o).max_steps == 7
    assert default_budget("tot", o).max_steps == 4 + 2 * 2 * 4 + 1


async def test_bad_task_fails_before_any_call():
    model = ScriptedChatModel(["x"])
    with pytest.raises(AgentInputError) as e:
        await run_strategy("cot", model, [])
    assert e.value.param == "messages" and model.calls == []


async def test_plain_is_one_call_with_the_messages_as_given():
    model = ScriptedChatModel(["Hello!"])
    task = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    result = await run_strategy("plain", model, task, options=StrategyOptions(temperature=0.2, max_tokens=16))
    assert result.answer == "Hello!" and result.extra == {"strategy": "plain", "model_calls": 1}
    assert model.calls[0]["messages"] == task
    assert model.calls[0]["temperature"] == 0.2 and model.calls[0]["max_tokens"] == 16


@pytest.mark.parametrize("strategy", ["plain", "tools"])
async def test_every_step_has_a_token_limit_by_default(strategy):
    """Without one the README's agent command rambled until its time budget and ended with 0 steps."""
    from hearth.agents.tools import default_registry

    model = ScriptedChatModel(["42"])
    tools = default_registry(plugins=False) if strategy == "tools" else None
    await run_strategy(strategy, model, "What is 6 * 7?", tools=tools)
    assert model.calls[0]["max_tokens"] == 512


async def test_cot_through_the_dispatcher():
    model = ScriptedChatModel(["6 × 7 = 42", "42"])
    result = await run_strategy("cot", model, "What is 6 × 7?")
    assert result.answer == "42" and len(model.calls) == 2
    assert "Therefore, the answer is" in model.calls[1]["messages"][-1]["content"]


async def test_few_shot_cot_uses_k_demos_from_the_bundled_pool():
    model = ScriptedChatModel(["5 + 3 × 2 = 11. The answer is 11."])
    result = await run_strategy("few_shot_cot", model, "Ann has 5 apples and buys 3 bags of 2. How many now?",
                                options=StrategyOptions(k_shots=2))
    assert result.answer == "11" and len(model.calls) == 1
    msgs = model.calls[0]["messages"]
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert msgs[3]["content"].startswith("Tom has 5 apples")  # the closest demo, next to the question


async def test_self_consistency_through_the_dispatcher():
    model = ScriptedChatModel(["The answer is 42", "The answer is 41", "The answer is 42", "The answer is 41",
                               "The answer is 42"])
    result = await run_strategy("self_consistency", model, "What is 6 × 7?", options=StrategyOptions(n=5, seed=1))
    assert result.answer == "42" and result.extra["votes"] == {"42": 3, "41": 2}
    assert result.extra["agreement"] == pytest.approx(0.6) and len(result.extra["paths"]) == 5
    assert result.extra["strategy"] == "self_consistency" and result.extra["model_calls"] == 1
    assert model.calls[0]["n"] == 5 and model.calls[0]["temperature"] == 0.7 and model.calls[0]["seed"] == 1


async def test_self_consistency_with_an_embedder_uses_demos():
    model = ScriptedChatModel(["The answer is 4"] * 3)
    result = await run_strategy("self_consistency", model, "What is 2 + 2?", embedder=HashingEmbedder(),
                                options=StrategyOptions(n=3, k_shots=2))
    assert result.answer == "4" and result.extra["agreement"] == 1.0
    assert sum(m["role"] == "assistant" for m in model.calls[0]["messages"]) == 2


async def test_react_through_the_dispatcher():
    model = ScriptedChatModel(['Action: calculator[{"expression": "2**10"}]', "Final Answer: 1024"])
    result = await run_strategy("react", model, "What is 2 to the 10th?", tools=ToolRegistry([calculator]))
    assert result.answer == "1024" and model.calls[1]["messages"][-1]["content"] == "Observation: 1024"


async def test_plan_execute_through_the_dispatcher():
    model = ScriptedChatModel(["1. Add 2 and 3\n2. Double it", "5", "10", "Final Answer: 10"])
    result = await run_strategy("plan_execute", model, "Add 2 and 3, then double it. What do you get?")
    assert result.answer == "10" and result.extra["plan"] == ["Add 2 and 3", "Double it"]
    assert len(model.calls) == 4


async def test_tot_through_the_dispatcher_uses_the_options():
    model = ScriptedChatModel(["1. Final Answer: 12\n2. Final Answer: 13", "Score: 9", "Score: 3"])
    result = await run_strategy("tot", model, "What is 3 × 4?", options=StrategyOptions(beam=1, branch=2, depth=2))
    assert result.answer == "12" and len(model.calls) == 3
    assert "Propose 2 different" in model.calls[0]["messages"][-1]["content"]


async def test_tools_delegates_to_the_tool_loop():
    model = ScriptedChatModel([ChatReply(None, [ToolCall("c1", "calculator", '{"expression": "17*23"}')]),
                               "17 × 23 = 391"])
    result = await run_strategy("tools", model, "What is 17 × 23?", tools=ToolRegistry([calculator]))
    assert result.answer == "17 × 23 = 391" and len(model.calls) == 2
    assert model.calls[0]["tools"][0]["function"]["name"] == "calculator"
    assert model.calls[1]["messages"][-1]["role"] == "tool" and model.calls[1]["messages"][-1]["content"] == "391"
    assert result.extra["strategy"] == "tools"


async def test_a_given_trace_streams_steps_and_a_given_budget_rules():
    seen = []
    trace = Trace(Budget(max_steps=50), on_step=seen.append)
    model = ScriptedChatModel([lambda m, k: "Action: calculator[1+1]"] * 10)
    result = await run_strategy("react", model, "loop", tools=ToolRegistry([calculator]), trace=trace,
                                budget=Budget(max_steps=2))
    assert result.stopped == "max_steps" and len(model.calls) == 2
    assert [s.kind for s in seen] == [s.kind for s in result.steps] and seen


async def test_react_without_tools_uses_the_default_registry():
    model = ScriptedChatModel(['Action: calculator[{"expression": "3*7"}]', "Final Answer: 21"])
    result = await run_strategy("react", model, "What is 3 × 7?")
    system = model.calls[0]["messages"][0]["content"]
    assert "- calculator:" in system and "- solve_equation:" in system and "- current_datetime:" in system
    assert result.answer == "21" and model.calls[1]["messages"][-1]["content"] == "Observation: 21"


async def test_a_strategy_cut_by_its_time_budget_says_so_in_its_steps():
    model = ScriptedChatModel(["too late"], delay_s=5.0)
    result = await run_strategy("cot", model, "What is 6 * 7?", budget=Budget(time_s=0.3))
    assert result.stopped == "time_budget"
    assert any(s.kind == "error" and "time budget" in s.content for s in result.steps)
