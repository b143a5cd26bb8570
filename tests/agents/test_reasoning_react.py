"""ReAct as text: parsing, the calculator through the registry, format errors, budgets, plan memory.

    nice -n 10 .venv/bin/python -m pytest tests/agents/test_reasoning_react.py -q
"""

from __future__ import annotations

import asyncio

import pytest

from hearth.agents.embed import HashingEmbedder
from hearth.agents.model import ChatReply, ScriptedChatModel, ToolCall
from hearth.agents.reasoning import PlanMemory, parse_react, react
from hearth.agents.tools.calculator import calculator
from hearth.agents.tools.registry import ToolRegistry, tool
from hearth.agents.types import Budget, Trace


@pytest.fixture
def registry() -> ToolRegistry:
    @tool
    def lookup(city: str, unit: str = "C") -> str:
        """Look up the temperature of a city.

        Args:
            city: the city
            unit: C or F
        """
        return f"{city}: 21 {unit}"

    return ToolRegistry([calculator, lookup])


@pytest.mark.parametrize("text,tool,args,final", [
    ('Thought: multiply\nAction: calculator[{"expression": "17*23"}]', "calculator", '{"expression": "17*23"}', None),
    ("Thought: x\nAction: calculator\nAction Input: 17*23", "calculator", "17*23", None),
    ('Action: calculator({"expression": "(1+2)*3"})', "calculator", '{"expression": "(1+2)*3"}', None),
    ('Action: `calculator`[{"expression": "a[1]"}]\nmore text]', "calculator", '{"expression": "a[1]"}', None),
    ("Thought: done\nFinal Answer: 391", None, None, "391"),
    ("最终答案：三百九十一", None, None, "三百九十一"),
    # an action written before a final answer wins: the model must see the observation first
    ('Action: calculator[{"expression": "2+2"}]\nObservation: 4\nFinal Answer: 4', "calculator",
     '{"expression": "2+2"}', None),
])
def test_parse_react(text, tool, args, final):
    p = parse_react(text)
    assert (p.tool, p.args, p.final) == (tool, args, final)


def test_parse_react_keeps_the_thought():
    assert parse_react("Thought: I need the product.\nAction: calculator[2*3]").thought == "I need the product."
    assert parse_react("just rambling").thought == "just rambling"


async def test_react_calls_the_calculator_and_uses_the_observation(registry):
    model = ScriptedChatModel([
        'Thought: I should multiply.\nAction: calculator[{"expression": "17*23"}]',
        lambda msgs, kw: ("Thought: the calculator says " + msgs[-1]["content"].split(": ", 1)[1]
                          + "\nFinal Answer: " + msgs[-1]["content"].split(": ", 1)[1]),
    ])
    result = await react(model, "What is 17 times 23?", registry)
    assert result.answer == "391" and result.stopped == "answer"
    assert len(model.calls) == 2
    assert all(c["stop"] == ["Observation:"] for c in model.calls)
    system = model.calls[0]["messages"][0]["content"]
    assert "- calculator:" in system and "- lookup:" in system and '"unit": string (optional)' in system
    assert model.calls[0]["messages"][-1] == {"role": "user", "content": "Question: What is 17 times 23?"}
    assert model.calls[1]["messages"][-1] == {"role": "user", "content": "Observation: 391"}
    assert [s.kind for s in result.steps] == ["thought", "action", "observation", "thought", "answer"]
    assert result.steps[1].data == {"tool": "calculator", "arguments": {"expression": "17*23"}}
    assert result.steps[2].data["ok"] is True


async def test_react_action_input_and_plain_text_arguments(registry):
    model = ScriptedChatModel(["Action: lookup\nAction Input: Paris", "Action: CALCULATOR[2 ** 10]",
                               "Final Answer: 21 C and 1024"])
    result = await react(model, "Weather in Paris, and 2^10?", registry, answer_type="text")
    assert result.answer == "21 C and 1024"  # a text answer is kept whole
    assert model.calls[1]["messages"][-1]["content"] == "Observation: Paris: 21 C"
    assert model.calls[2]["messages"][-1]["content"] == "Observation: 1024"


async def test_react_unknown_tool_and_no_format_become_observations(registry):
    model = ScriptedChatModel(["Action: search[cats]", "I think it is four.",
                               'Action: calculator[{"expr": "2+2"}]', "Final Answer: 4"])
    result = await react(model, "What is 2+2?", registry)
    assert result.answer == "4" and len(model.calls) == 4
    obs = [c["messages"][-1]["content"] for c in model.calls[1:]]
    assert "no tool 'search'" in obs[0] and "calculator, lookup" in obs[0] and "Action: tool_name[" in obs[0]
    assert "no action and no final answer" in obs[1] and "Final Answer:" in obs[1]
    # the registry's own validation error goes back to the model
    assert obs[2].startswith("Observation: error:") and "expression" in obs[2]


async def test_react_native_tool_call_reply_is_read_as_an_action(registry):
    model = ScriptedChatModel([ChatReply(None, [ToolCall("c1", "calculator", '{"expression": "6*7"}')]),
                               "Final Answer: 6 × 7 = 42."])
    result = await react(model, "6*7?", registry)
    # a number question: the number is extracted from the final answer
    assert result.answer == "42" and result.extra["extracted"] is True and model.calls[1]["messages"][-1]["content"] == "Observation: 42"


async def test_react_max_steps_stops_a_runaway_loop(registry):
    model = ScriptedChatModel([lambda m, k: 'Thought: again\nAction: calculator[{"expression": "1+1"}]'] * 50)
    result = await react(model, "Loop forever", registry, trace=Trace(Budget(max_steps=3)))
    assert result.stopped == "max_steps" and result.answer is None
    assert len(model.calls) == 3 and sum(s.kind == "action" for s in result.steps) == 3


async def test_react_time_budget_stops_a_runaway_loop(registry):
    model = ScriptedChatModel([lambda m, k: "Action: calculator[1+1]"] * 500, delay_s=0.02)
    t0 = asyncio.get_running_loop().time()
    result = await react(model, "Loop forever", registry, trace=Trace(Budget(max_steps=500, time_s=0.15)))
    assert result.stopped == "time_budget" and result.answer is None
    assert asyncio.get_running_loop().time() - t0 < 1.0
    assert 2 <= len(model.calls) <= 9


async def test_react_remembers_and_reuses_a_solved_task(registry, tmp_path):
    memory = PlanMemory(tmp_path / "mem", HashingEmbedder(), threshold=0.5)
    model = ScriptedChatModel(['Action: calculator[{"expression": "12*4"}]', "Final Answer: 48"])
    await react(model, "How much do 12 boxes of 4 eggs hold?", registry, memory=memory)
    assert len(memory) == 1 and memory.records[0].steps == ['calculator[{"expression": "12*4"}]']
    model = ScriptedChatModel(["Final Answer: 45"])
    result = await react(model, "How much do 15 boxes of 3 eggs hold?", registry, memory=memory)
    system = model.calls[0]["messages"][0]["content"]
    assert "Similar tasks solved before" in system and "How much do 12 boxes of 4 eggs hold?" in system
    assert result.steps[0].kind == "retrieval"
    assert len(memory) == 1  # no action: nothing new to remember
