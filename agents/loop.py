"""The tool loop: the model asks for tool calls, we run them, and hand the results back until it answers.

    model = OpenAIChatModel("http://127.0.0.1:8000/v1", model="smollm2-135m-instruct")
    result = await run_tool_agent(model, [{"role": "user", "content": "What is 17 * 23?"}],
                                  default_registry(), budget=Budget(max_steps=6, time_s=60))
    result.answer, result.stopped, [s.kind for s in result.steps]
    # "17 * 23 = 391", "answer", ["tool_call", "tool_result", "answer"]

It speaks the OpenAI protocol through the ChatModel interface, so it runs against hearth's server or any
compatible one. One turn: the model replies; if it asked for tools, the assistant message (with its
tool_calls) is appended, the calls run (concurrently when there are several and `parallel`), and one
{"role": "tool", "tool_call_id", "content"} message per call follows, in the order of the calls. A bad
call (unknown tool, bad JSON, wrong arguments, a tool that raises or times out) becomes an "error: ..."
tool message; the model sees it and may try again.

Budgets: `max_steps` counts model calls; `time_s` bounds the whole run, the model call in flight
included. When either runs out the run stops with stopped="max_steps" / "time_budget" and
answer = the last text the model wrote alongside its tool calls, or None if it wrote none.
A forced tool_choice ("required" or a named function) applies to the first model call only, after
which it falls back to "auto" so the model can answer. With final_answer=True the run ends with an
answer from the tool results it has: the last call the step budget allows, and the call after the
model repeats a call it already made (same tool, same arguments; small models loop on one call), is
made with "none", its tool calls and results written out as plain text (`answer_messages`), since a
model shown tool messages without its tools' prompt (Qwen2.5-Coder-1.5B) refuses to answer.
A ChatModel failure (AgentError) ends the run with stopped="error" and an "error" step; cancellation
propagates and stops any running tools.
The conversation, tool messages included, is in result.extra["messages"].
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from .model import ChatModel, ToolCall
from .tools.registry import ToolRegistry, ToolResult
from .types import AgentError, AgentInputError, AgentResult, Budget, Trace

__all__ = ["run_tool_agent", "answer_messages", "SAMPLING_KEYS"]

SAMPLING_KEYS = ("temperature", "top_p", "max_tokens", "seed", "stop")


def _check_tool_choice(tool_choice: str | dict[str, Any], registry: ToolRegistry) -> None:
    if isinstance(tool_choice, str):
        if tool_choice not in ("auto", "none", "required"):
            raise AgentInputError(f"tool_choice must be 'auto', 'none', 'required' or "
                                  f'{{"type": "function", "function": {{"name": ...}}}}, got {tool_choice!r}',
                                  "tool_choice")
        if tool_choice == "required" and not len(registry):
            raise AgentInputError("tool_choice 'required' needs at least one tool", "tool_choice")
        return
    name = (tool_choice.get("function") or {}).get("name") if isinstance(tool_choice, dict) else None
    if not isinstance(tool_choice, dict) or tool_choice.get("type") != "function" or not isinstance(name, str):
        raise AgentInputError('a tool_choice object must look like {"type": "function", "function": '
                              '{"name": "calculator"}}', "tool_choice")
    if name not in registry:
        raise AgentInputError(f"tool_choice names the tool {name!r}, which is not available; available: "
                              f"{', '.join(registry.names()) or 'none'}", "tool_choice")


def _check_sampling(sampling: dict[str, Any] | None) -> dict[str, Any]:
    sampling = dict(sampling or {})
    unknown = sorted(set(sampling) - set(SAMPLING_KEYS))
    if unknown:
        raise AgentInputError(f"unknown sampling option{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
                              f"allowed: {', '.join(SAMPLING_KEYS)}", unknown[0])
    return {k: v for k, v in sampling.items() if v is not None}


def _arguments_for_trace(call: ToolCall) -> Any:
    try:
        return json.loads(call.arguments) if call.arguments.strip() else {}
    except (json.JSONDecodeError, AttributeError):
        return call.arguments  # kept as the model wrote it; the tool result says what is wrong


def _call_key(call: ToolCall) -> tuple[str, str]:
    args = _arguments_for_trace(call)
    return call.name, json.dumps(args, sort_keys=True, ensure_ascii=False) if isinstance(args, dict) else str(args)


def answer_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The conversation for a call that must answer without tools: each assistant tool call written as
    `name(arguments)` in its message, each tool result as a user turn "Tool result (name): ...", the
    last one followed by the request to answer with them."""
    out: list[dict[str, Any]] = []
    names: dict[str, str] = {}
    for m in messages:
        if m.get("role") == "assistant" and m.get("tool_calls"):
            lines = [m["content"].strip()] if isinstance(m.get("content"), str) and m["content"].strip() else []
            for c in m["tool_calls"]:
                fn = c.get("function") or {}
                names[c.get("id") or ""] = fn.get("name", "the tool")
                lines.append(f"{fn.get('name', '')}({fn.get('arguments', '')})")
            out.append({"role": "assistant", "content": "\n".join(lines)})
        elif m.get("role") == "tool":
            text = f"Tool result ({names.get(m.get('tool_call_id') or '', 'the tool')}): {m.get('content') or ''}"
            if out and out[-1].get("_tool"):
                out[-1]["content"] += "\n" + text
            else:
                out.append({"role": "user", "content": text, "_tool": True})
        else:
            out.append(dict(m))
    if out and out[-1].get("_tool"):
        out[-1]["content"] += "\n\nAnswer with these results."
    for m in out:
        m.pop("_tool", None)
    return out


async def _run_calls(registry: ToolRegistry, calls: list[ToolCall], parallel: bool) -> list[ToolResult]:
    if parallel and len(calls) > 1:
        return list(await asyncio.gather(*(registry.call(c.name, c.arguments) for c in calls)))
    return [await registry.call(c.name, c.arguments) for c in calls]


async def run_tool_agent(model: ChatModel, messages: list[dict[str, Any]], registry: ToolRegistry, *,
                         budget: Budget | None = None, trace: Trace | None = None,
                         tool_choice: str | dict[str, Any] = "auto", parallel: bool = True,
                         sampling: dict[str, Any] | None = None, final_answer: bool = True) -> AgentResult:
    """Run the tool loop until the model answers without tool calls or a budget runs out.

    `budget` makes the Trace when `trace` is None; a given trace carries its own budget (passing both
    is allowed only when `budget is trace.budget`). `sampling` holds temperature / top_p / max_tokens /
    seed / stop for every model call. The caller's `messages` list is not changed. With `final_answer`,
    the last model call the step budget allows, after tools have run, is made with tool_choice "none",
    so a model that would keep calling tools has to answer from the results it has.
    """
    if trace is None:
        trace = Trace(budget)
    elif budget is not None and budget is not trace.budget:
        raise ValueError("pass the budget inside the Trace (Trace(budget)) when you pass a trace")
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise AgentInputError("messages must be a non-empty list of message objects", "messages")
    _check_tool_choice(tool_choice, registry)
    sampling = _check_sampling(sampling)
    tools = registry.schemas() or None
    choice: Any = tool_choice if tools else None
    convo = [dict(m) for m in messages]
    last_text: str | None = None
    made: set[tuple[str, str]] = set()  # (name, arguments) of the calls already run
    must_answer = False

    def stop(reason: str, **extra: Any) -> AgentResult:
        return trace.finish(last_text, reason, messages=convo, **extra)

    while True:
        reason = trace.out_of_budget()
        if reason:
            return stop(reason)
        last_call = trace.model_calls == trace.budget.max_steps - 1 and trace.model_calls > 0
        answer_now = final_answer and tools and (last_call or must_answer) and choice == "auto"
        call_choice = "none" if answer_now else choice
        try:
            async with asyncio.timeout(trace.time_left()):
                replies = await model.chat(answer_messages(convo) if answer_now else convo, tools=tools,
                                           tool_choice=call_choice, n=1, **sampling)
        except TimeoutError:
            trace.add("error", f"the time budget ({trace.budget.time_s:g} s) ran out during model call "
                               f"{trace.model_calls + 1}; set max_tokens or a larger time budget")
            return stop("time_budget")
        except AgentError as e:
            trace.add("error", str(e))
            return stop("error", error=str(e))
        if not replies:
            trace.add("error", "the model returned no reply")
            return stop("error", error="the model returned no reply")
        reply = replies[0]
        trace.count_call(reply.usage)
        if not reply.tool_calls:
            convo.append(reply.to_message())
            return trace.finish(reply.content or "", "answer", messages=convo)
        if reply.content and reply.content.strip():
            last_text = reply.content
            trace.add("thought", reply.content)
        keys = [_call_key(c) for c in reply.tool_calls]
        if final_answer and choice == "auto" and all(k in made for k in keys):
            trace.add("thought", "repeated " + ", ".join(f"{c.name}({c.arguments})" for c in reply.tool_calls)
                      + ": answering from the results so far", repeated=True)
            must_answer = True
            continue
        made.update(keys)
        convo.append(reply.to_message())
        for c in reply.tool_calls:
            trace.add("tool_call", c.arguments, id=c.id, name=c.name, arguments=_arguments_for_trace(c))
        try:
            async with asyncio.timeout(max(trace.time_left(), 0.0)):
                results = await _run_calls(registry, reply.tool_calls, parallel)
        except TimeoutError:
            trace.add("error", f"the time budget ({trace.budget.time_s:g} s) ran out while tools ran")
            return stop("time_budget")
        for c, r in zip(reply.tool_calls, results):
            trace.add("tool_result", r.content, id=c.id, name=r.name, ok=r.ok, elapsed_s=r.elapsed_s)
            convo.append({"role": "tool", "tool_call_id": c.id, "content": r.content})
        if isinstance(choice, dict) or choice == "required":
            choice = "auto"  # forcing a call every turn would never let the model answer
