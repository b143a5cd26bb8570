"""The OpenAI-protocol tool loop against a scripted model: every model call and message checked."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from hearth.agents.loop import run_tool_agent
from hearth.agents.model import ChatReply, ScriptedChatModel, ToolCall
from hearth.agents.tools import ToolRegistry, default_registry
from hearth.agents.types import AgentInputError, Budget, Trace

USER = [{"role": "user", "content": "What is 17 * 23?"}]


def calls(*items: tuple[str, str, str], content: str | None = None) -> ChatReply:
    return ChatReply(content=content, tool_calls=[ToolCall(i, n, a) for i, n, a in items], finish_reason="tool_calls",
                     usage={"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15})


async def test_calculator_then_answer_in_two_model_calls():
    model = ScriptedChatModel([calls(("c1", "calculator", '{"expression": "17 * 23"}')), "17 * 23 = 391."])
    registry = default_registry(plugins=False)
    result = await run_tool_agent(model, USER, registry, sampling={"temperature": 0.0, "seed": 7, "max_tokens": 64})
    assert result.answer == "17 * 23 = 391." and result.stopped == "answer"
    assert len(model.calls) == 2 and model.remaining == 0
    assert [s.kind for s in result.steps] == ["tool_call", "tool_result", "answer"]
    call_step, result_step = result.steps[0], result.steps[1]
    assert call_step.data == {"id": "c1", "name": "calculator", "arguments": {"expression": "17 * 23"}}
    assert result_step.content == "391" and result_step.data["ok"] is True
    # the second model call sees the assistant tool_calls message and the tool message
    second = model.calls[1]
    assert second["messages"] == USER + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function",
             "function": {"name": "calculator", "arguments": '{"expression": "17 * 23"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "391"}]
    for c in model.calls:
        assert c["tools"] == registry.schemas() and c["tool_choice"] == "auto"
        assert (c["temperature"], c["seed"], c["max_tokens"], c["n"]) == (0.0, 7, 64, 1)
    assert result.usage == {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
    assert result.extra["messages"][-1] == {"role": "assistant", "content": "17 * 23 = 391."}
    assert USER == [{"role": "user", "content": "What is 17 * 23?"}]  # the caller's list is untouched


async def test_two_calls_in_one_turn_run_in_parallel_and_keep_their_order():
    def slow_a() -> str:
        time.sleep(0.3)
        return "A"

    async def slow_b() -> str:
        await asyncio.sleep(0.3)
        return "B"

    registry = ToolRegistry([slow_a, slow_b])
    model = ScriptedChatModel([calls(("a", "slow_a", "{}"), ("b", "slow_b", "{}"), content="Let me check both."),
                               "A and B"])
    t0 = time.monotonic()
    result = await run_tool_agent(model, USER, registry)
    elapsed = time.monotonic() - t0
    assert result.answer == "A and B" and elapsed < 0.5
    assert [s.kind for s in result.steps] == ["thought", "tool_call", "tool_call", "tool_result", "tool_result",
                                              "answer"]
    assert result.steps[0].content == "Let me check both."
    tail = model.calls[1]["messages"][-2:]
    assert tail == [{"role": "tool", "tool_call_id": "a", "content": "A"},
                    {"role": "tool", "tool_call_id": "b", "content": "B"}]
    # parallel=False runs them one after the other
    model = ScriptedChatModel([calls(("a", "slow_a", "{}"), ("b", "slow_b", "{}")), "done"])
    t0 = time.monotonic()
    await run_tool_agent(model, USER, registry, parallel=False)
    assert time.monotonic() - t0 >= 0.6


async def test_a_model_that_calls_tools_forever_stops_at_max_steps():
    def forever(messages, kwargs):  # a new call each time (a repeated one is answered from its result)
        return calls((f"c{len(messages)}", "calculator", f'{{"expression": "{len(messages)} + 1"}}'),
                     content="still thinking" if len(messages) > 1 else None)

    model = ScriptedChatModel([forever] * 10)
    result = await run_tool_agent(model, USER, default_registry(plugins=False), budget=Budget(max_steps=3))
    assert result.stopped == "max_steps" and len(model.calls) == 3
    assert result.answer == "still thinking"  # the last text it wrote alongside its calls
    assert [s.kind for s in result.steps].count("tool_result") == 3
    assert "answer" not in [s.kind for s in result.steps]

    silent = ScriptedChatModel([calls(("x", "calculator", '{"expression": "1"}'))] * 5)
    result = await run_tool_agent(silent, USER, default_registry(plugins=False), budget=Budget(max_steps=2))
    assert result.stopped == "max_steps" and result.answer is None and len(silent.calls) == 2


async def test_a_slow_model_stops_at_the_time_budget():
    model = ScriptedChatModel(["too late"], delay_s=5.0)
    t0 = time.monotonic()
    result = await run_tool_agent(model, USER, default_registry(plugins=False), budget=Budget(time_s=0.3))
    assert result.stopped == "time_budget" and result.answer is None
    assert time.monotonic() - t0 < 1.0
    # the run says where the time went instead of ending with no step at all
    assert [s.kind for s in result.steps] == ["error"] and "time budget" in result.steps[0].content


async def test_slow_tools_count_against_the_time_budget():
    async def sleepy() -> str:
        await asyncio.sleep(5)
        return "never"

    model = ScriptedChatModel([calls(("s", "sleepy", "{}"), content="waiting"), "unreachable"])
    t0 = time.monotonic()
    result = await run_tool_agent(model, USER, ToolRegistry([sleepy]), trace=Trace(Budget(time_s=0.3)))
    assert result.stopped == "time_budget" and result.answer == "waiting" and time.monotonic() - t0 < 1.0


async def test_bad_calls_become_error_results_and_the_loop_continues():
    def boom() -> str:
        raise ValueError("no luck")

    registry = default_registry(plugins=False)
    registry.register(boom)
    model = ScriptedChatModel([
        calls(("u", "weather", '{"city": "Oslo"}')),
        calls(("j", "calculator", '{"expression": "1 +')),
        calls(("m", "calculator", '{}'), ("e", "calculator", '{"expression": "2 +* 2"}')),
        calls(("b", "boom", "{}")),
        "I could not compute it.",
    ])
    result = await run_tool_agent(model, USER, registry, budget=Budget(max_steps=5))
    assert result.stopped == "answer" and result.answer == "I could not compute it."
    tool_msgs = [m for m in result.extra["messages"] if m["role"] == "tool"]
    assert [m["tool_call_id"] for m in tool_msgs] == ["u", "j", "m", "e", "b"]
    contents = [m["content"] for m in tool_msgs]
    assert contents[0].startswith("error: unknown tool 'weather'; the available tools are: calculator")
    assert contents[1].startswith("error: bad arguments for calculator: the arguments are not valid JSON")
    assert contents[2] == "error: bad arguments for calculator: missing required argument 'expression'"
    assert contents[3].startswith("error: '2 +* 2' is not a valid arithmetic expression")
    assert contents[4] == "error: boom failed: ValueError: no luck"
    results = [s for s in result.steps if s.kind == "tool_result"]
    assert [s.data["ok"] for s in results] == [False] * 5
    # the unparsable arguments are kept as text in the trace
    assert [s for s in result.steps if s.kind == "tool_call"][1].data["arguments"] == '{"expression": "1 +'


async def test_forced_tool_choice_applies_to_the_first_call_only():
    model = ScriptedChatModel([calls(("c", "calculator", '{"expression": "2"}')), "2"])
    forced = {"type": "function", "function": {"name": "calculator"}}
    await run_tool_agent(model, USER, default_registry(plugins=False), tool_choice=forced)
    assert [c["tool_choice"] for c in model.calls] == [forced, "auto"]


async def test_bad_requests_are_agent_input_errors():
    registry = default_registry(plugins=False)
    model = ScriptedChatModel([])
    with pytest.raises(AgentInputError) as e:
        await run_tool_agent(model, USER, registry, tool_choice={"type": "function", "function": {"name": "nope"}})
    assert e.value.param == "tool_choice"
    with pytest.raises(AgentInputError) as e:
        await run_tool_agent(model, USER, registry, tool_choice="sometimes")
    assert e.value.param == "tool_choice"
    with pytest.raises(AgentInputError) as e:
        await run_tool_agent(model, USER, registry, sampling={"temprature": 0.5})
    assert e.value.param == "temprature" and "temperature" in str(e.value)
    with pytest.raises(AgentInputError) as e:
        await run_tool_agent(model, [], registry)
    assert e.value.param == "messages"
    assert model.calls == []


async def test_a_broken_model_ends_the_run_with_an_error_step():
    model = ScriptedChatModel([calls(("c", "calculator", '{"expression": "2"}'))])  # then runs out
    result = await run_tool_agent(model, USER, default_registry(plugins=False))
    assert result.stopped == "error" and result.steps[-1].kind == "error"
    assert "no reply left" in result.extra["error"]


async def test_cancellation_propagates():
    async def hang() -> str:
        await asyncio.sleep(30)
        return ""

    started = asyncio.Event()

    def turn(messages, kwargs):
        started.set()
        return calls(("h", "hang", "{}"))

    model = ScriptedChatModel([turn, "never"])
    task = asyncio.create_task(run_tool_agent(model, USER, ToolRegistry([hang])))
    await asyncio.wait_for(started.wait(), 2)
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_listeners_see_every_step_and_no_tools_means_no_tools_field():
    seen = []
    model = ScriptedChatModel(["Hello!"])
    result = await run_tool_agent(model, [{"role": "user", "content": "hi"}], ToolRegistry(),
                                  trace=Trace(Budget(max_steps=1), on_step=lambda s: seen.append(s.kind)))
    assert result.answer == "Hello!" and seen == ["answer"]
    assert model.calls[0]["tools"] is None and model.calls[0]["tool_choice"] is None
    assert json.loads(json.dumps(result.to_dict()))["answer"] == "Hello!"



async def test_last_call_of_the_budget_asks_for_an_answer_not_another_tool():
    def answer_unless_tools(messages, kwargs):  # a model that calls the tool whenever it is allowed to
        if kwargs["tool_choice"] == "none":
            return "12 + 7 = 19."
        return calls((f"c{len(messages)}", "calculator", '{"expression": "12 + 7"}'))

    model = ScriptedChatModel([answer_unless_tools] * 3)
    registry = default_registry(plugins=False)
    result = await run_tool_agent(model, USER, registry, budget=Budget(max_steps=3, time_s=30))
    assert [c["tool_choice"] for c in model.calls] == ["auto", "auto", "none"]
    assert result.stopped == "answer" and result.answer == "12 + 7 = 19."
    # without it, the same model runs out of steps with no answer
    model = ScriptedChatModel([answer_unless_tools] * 3)
    result = await run_tool_agent(model, USER, registry, budget=Budget(max_steps=3, time_s=30), final_answer=False)
    assert result.stopped == "max_steps" and result.answer is None


async def test_a_repeated_call_is_answered_from_the_results_written_as_text():
    # Qwen2.5-Coder-1.5B asks for calculator("1234 * 5678") again after its result, and, shown the tool
    # messages without its tools' prompt (tool_choice "none"), answers "I can't assist with that"
    def model_turn(messages, kwargs):
        if kwargs["tool_choice"] == "none":
            return "1234 * 5678 = 7006652." if "7006652" in messages[-1]["content"] else "I can't assist with that."
        return calls((f"c{len(messages)}", "calculator", '{"expression": "1234 * 5678"}'), content="Let me see.")

    model = ScriptedChatModel([model_turn] * 3)
    result = await run_tool_agent(model, [{"role": "user", "content": "What is 1234 * 5678?"}],
                                  default_registry(plugins=False), budget=Budget(max_steps=8, time_s=30))
    assert result.stopped == "answer" and result.answer == "1234 * 5678 = 7006652."
    assert [c["tool_choice"] for c in model.calls] == ["auto", "auto", "none"]
    assert [s.kind for s in result.steps].count("tool_result") == 1  # the repeat is not run again
    assert result.steps[-2].data == {"repeated": True}
    assert model.calls[2]["messages"] == [
        {"role": "user", "content": "What is 1234 * 5678?"},
        {"role": "assistant", "content": 'Let me see.\ncalculator({"expression": "1234 * 5678"})'},
        {"role": "user", "content": "Tool result (calculator): 7006652\n\nAnswer with these results."}]
    # the run's own conversation keeps the real tool messages
    assert [m["role"] for m in result.extra["messages"]] == ["user", "assistant", "tool", "assistant"]


def test_answer_messages_write_parallel_calls_and_results_as_text():
    from hearth.agents.loop import answer_messages

    convo = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Oslo and Rome?"},
             {"role": "assistant", "content": None, "tool_calls": [
                 {"id": "a", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}},
                 {"id": "b", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}]},
             {"role": "tool", "tool_call_id": "a", "content": "2 C"}, {"role": "tool", "tool_call_id": "b", "content": "19 C"}]
    assert answer_messages(convo) == convo[:2] + [
        {"role": "assistant", "content": 'get_weather({"city": "Oslo"})\nget_weather({"city": "Rome"})'},
        {"role": "user", "content": "Tool result (get_weather): 2 C\nTool result (get_weather): 19 C\n\n"
                                    "Answer with these results."}]
    assert answer_messages(convo[:2]) == convo[:2]
