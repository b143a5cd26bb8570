"""Plan-and-execute (plain steps, tool-loop steps, replanning, plan memory) and Tree-of-Thought.

    nice -n 10 .venv/bin/python -m pytest tests/agents/test_reasoning_plan.py -q
"""

from __future__ import annotations

from hearth.agents.embed import HashingEmbedder
from hearth.agents.model import ChatReply, ScriptedChatModel, ToolCall
from hearth.agents.reasoning import PlanMemory, plan_and_execute, tree_of_thought
from hearth.agents.tools.calculator import calculator
from hearth.agents.tools.registry import ToolRegistry
from hearth.agents.types import Budget, Trace


def _last(call) -> str:
    return call["messages"][-1]["content"]


async def test_plan_execute_without_tools_feeds_results_forward():
    model = ScriptedChatModel(["Plan:\n1. Find the price of 3 pens\n2. Add the price of a 5 yuan book",
                               "3 pens cost 3 × 4 = 12 yuan", "12 + 5 = 17 yuan",
                               "The total is 17 yuan.\nFinal Answer: 17"])
    result = await plan_and_execute(model, "Pens cost 4 yuan each. What do 3 pens and a 5 yuan book cost?")
    assert result.answer == "17" and result.stopped == "answer" and len(model.calls) == 4
    assert result.extra["plan"] == ["Find the price of 3 pens", "Add the price of a 5 yuan book"]
    assert result.extra["step_results"] == ["3 pens cost 3 × 4 = 12 yuan", "12 + 5 = 17 yuan"]
    assert "numbered plan" in model.calls[0]["messages"][0]["content"]
    assert "Now carry out step 1: Find the price of 3 pens" in _last(model.calls[1])
    assert "Results so far" not in _last(model.calls[1])
    # step 2 sees step 1's result; the synthesis sees both
    assert "Step 1 (Find the price of 3 pens): 3 pens cost 3 × 4 = 12 yuan" in _last(model.calls[2])
    assert "Now carry out step 2" in _last(model.calls[2])
    assert "12 + 5 = 17 yuan" in _last(model.calls[3]) and "Final Answer" in _last(model.calls[3])
    assert [s.kind for s in result.steps] == ["plan", "action", "observation", "action", "observation",
                                              "thought", "answer"]


async def test_plan_execute_replans_once_after_a_failed_step():
    model = ScriptedChatModel(["1. Ask the oracle\n2. Report", "", "1. Compute 2 + 2 directly", "4",
                               "Final Answer: 4"])
    result = await plan_and_execute(model, "What is 2 + 2?")
    assert result.answer == "4" and len(model.calls) == 5
    assert "Step 1 (Ask the oracle) failed" in _last(model.calls[2])
    assert result.extra["replanned"] is True and result.extra["plan"] == ["Compute 2 + 2 directly"]
    assert [s.kind for s in result.steps][:4] == ["plan", "action", "error", "plan"]


async def test_plan_execute_budget_stops_it():
    model = ScriptedChatModel(["1. a\n2. b\n3. c", "ra", "rb", "rc", "Final Answer: x"])
    result = await plan_and_execute(model, "Do three things", trace=Trace(Budget(max_steps=3)))
    assert result.stopped == "max_steps" and result.answer is None and len(model.calls) == 3
    assert result.extra["step_results"] == ["ra", "rb"]


async def test_plan_execute_runs_steps_through_the_tool_loop():
    model = ScriptedChatModel([
        "1. Multiply 17 by 23\n2. Add 9 to it",
        ChatReply(None, [ToolCall("c1", "calculator", '{"expression": "17*23"}')]), "391",
        ChatReply(None, [ToolCall("c2", "calculator", '{"expression": "391+9"}')]), "400",
        "Final Answer: 400"])
    result = await plan_and_execute(model, "What is 17 × 23 + 9?", tools=ToolRegistry([calculator]))
    assert result.answer == "400" and result.extra["step_results"] == ["391", "400"]
    assert len(model.calls) == 6 and result.usage is not None
    assert model.calls[1]["tools"] and model.calls[1]["tools"][0]["function"]["name"] == "calculator"
    # the tool loop's steps land in this trace, tagged with their plan step
    tool_steps = [s for s in result.steps if s.data.get("plan_step") and s.kind in ("tool_call", "tool_result")]
    assert {s.data["plan_step"] for s in tool_steps} == {1, 2}
    assert "Step 1 (Multiply 17 by 23): 391" in _last(model.calls[3])


async def test_plan_execute_remembers_plans_and_shows_them_for_similar_tasks(tmp_path):
    memory = PlanMemory(tmp_path, HashingEmbedder(), threshold=0.5)
    model = ScriptedChatModel(["1. Multiply 3 by 2", "6", "Final Answer: 6"])
    await plan_and_execute(model, "What is the total cost of 3 apples at 2 dollars each?", memory=memory)
    assert [r.steps for r in memory.records] == [["Multiply 3 by 2"]] and memory.records[0].answer == "6"
    model = ScriptedChatModel(["1. Multiply 5 by 3", "15", "Final Answer: 15"])
    await plan_and_execute(model, "What is the total cost of 5 apples at 3 dollars each?", memory=memory)
    planner_system = model.calls[0]["messages"][0]["content"]
    assert "Similar tasks solved before" in planner_system and "1. Multiply 3 by 2" in planner_system
    model = ScriptedChatModel(["1. Write it", "done", "Final Answer: waves"])
    await plan_and_execute(model, "Write a haiku about the sea", memory=memory)
    assert "Similar tasks" not in model.calls[0]["messages"][0]["content"]


async def test_tot_keeps_the_best_scored_branch():
    model = ScriptedChatModel([
        "1. Multiply 6 by 7 to get 42\n2. Add 6 and 7 to get 13",    # depth 1 proposals
        "Score: 9", "impossible",                                    # their scores
        "1. Final Answer: 42\n2. Final Answer: 43",                  # depth 2, from the kept branch only
        "sure", "Score: 2"])
    result = await tree_of_thought(model, "What is 6 times 7?", beam=1, branch=2, depth=3)
    assert result.answer == "42" and result.stopped == "answer" and len(model.calls) == 6
    assert "Propose 2 different possible next steps" in _last(model.calls[0])
    assert "1. Multiply 6 by 7 to get 42" in _last(model.calls[1]) and "Score:" in _last(model.calls[1])
    assert "Add 6 and 7" in _last(model.calls[2])
    # the pruned branch never comes back
    assert "Multiply 6 by 7" in _last(model.calls[3]) and "Add 6 and 7" not in _last(model.calls[3])
    assert result.extra["best_path"] == ["Multiply 6 by 7 to get 42", "Final Answer: 42"]
    assert result.extra["best_score"] == 10.0
    scores = [s.data["score"] for s in result.steps if s.kind == "score"]
    assert scores == [9.0, 1.0, 10.0, 2.0]


async def test_tot_beam_of_two_and_final_call_at_the_depth_limit():
    model = ScriptedChatModel([
        "1. a\n2. b\n3. c", "Score: 3", "Score: 8", "Score: 5",      # depth 1: keep b, then c
        "1. b1\n2. b2", "1. c1\n2. c2",                              # depth 2: b first, c second
        "Score: 4", "Score: 6", "Score: 9", "Score: 6",
        "Final Answer: from c1"])
    result = await tree_of_thought(model, "Explain something", beam=2, branch=3, depth=2, answer_type="text")
    assert result.answer == "from c1" and len(model.calls) == 11
    assert "1. b" in _last(model.calls[4]) and "1. c" in _last(model.calls[5])
    assert "1. c\n2. c1" in _last(model.calls[10])
    assert result.extra["best_path"] == ["c", "c1"]


async def test_tot_budget_stops_a_runaway_search():
    model = ScriptedChatModel([lambda m, k: "1. keep going\n2. and going"] * 100)
    result = await tree_of_thought(model, "Never ends", beam=2, branch=2, depth=8,
                                   trace=Trace(Budget(max_steps=7)))
    assert result.stopped == "max_steps" and result.answer is None and len(model.calls) == 7
