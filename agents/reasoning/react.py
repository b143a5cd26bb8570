"""ReAct as text, for models without native tool calling: Thought / Action / Observation turns.

    registry = default_registry()
    result = await react(model, "What is 17.5% of 2,480?", registry, trace=Trace(Budget(max_steps=6)))
    result.answer, [s.kind for s in result.steps]   # "434", [thought, action, observation, thought, answer]

The model writes "Thought: …" and "Action: tool_name[{json arguments}]" (or "Action: tool_name" with an
"Action Input: …" line); generation stops at "Observation:", the tool runs through the registry and its
result comes back as the next "Observation: …" message. "Final Answer: …" ends the run. A reply that
names an unknown tool or follows no format gets an observation that explains the format, so the model
can correct itself; the Trace's budget bounds the loop (model calls and seconds).
"""

from __future__ import annotations

import asyncio
import json
import re
from dataclasses import dataclass
from typing import Any

from ..model import ChatModel
from ..types import AgentResult, Trace
from .common import BudgetStop, Sampling, assistant, call_model, split_task, user, with_system
from .cot import resolve_answer_type
from .extract import choice_letters, extract_answer
from .memory import PlanMemory, format_memories

STOP = ("Observation:",)
MAX_OBSERVATION_CHARS = 2000
FORMAT_HELP = ('Use the format: "Thought: <your reasoning>" then either "Action: tool_name[{\\"arg\\": '
               '\\"value\\"}]" to call a tool, or "Final Answer: <answer>" when you know the answer.')

_FINAL = re.compile(r"(?:final\s+answer|最终答案)\s*[:：]\s*", re.IGNORECASE)
_ACTION = re.compile(r"^[ \t*]*Action(?:\s*\d+)?\s*[:：][ \t]*", re.IGNORECASE | re.MULTILINE)
_ACTION_INPUT = re.compile(r"^[ \t*]*Action\s+Input(?:\s*\d+)?\s*[:：][ \t]*", re.IGNORECASE | re.MULTILINE)
_THOUGHT = re.compile(r"^\s*Thought(?:\s*\d+)?\s*[:：]\s*", re.IGNORECASE)


@dataclass
class Parsed:
    """One model turn: its thought, and either an action (tool, raw argument text) or a final answer."""

    thought: str
    tool: str | None = None
    args: str | None = None
    final: str | None = None


def parse_react(text: str) -> Parsed:
    """Read one ReAct turn. An action written before a final answer wins (the model went on without its
    observation); neither gives a Parsed with only a thought."""
    text = text.split("Observation:", 1)[0]
    action, final = _ACTION.search(text), _FINAL.search(text)
    first = min((m for m in (action, final) if m), key=lambda m: m.start(), default=None)
    thought = _THOUGHT.sub("", text[:first.start()] if first else text).strip()
    if first is None:
        return Parsed(thought)
    if first is final:
        return Parsed(thought, final=text[final.end():].strip())
    rest = text[action.end():]
    line = rest.split("\n", 1)[0].strip().strip("`")
    m = re.match(r"`?([\w.\-]+)`?\s*([\[(])", line)
    if m:
        # name[args] or name(args): the arguments run to the matching bracket, maybe over lines
        return Parsed(thought, m.group(1), _bracketed(rest[rest.index(m.group(2)):]).strip())
    name = line.split()[0] if line.split() else ""
    inp = _ACTION_INPUT.search(rest)
    args = re.split(r"(?im)^\s*Thought\s*[:：]", rest[inp.end():])[0] if inp else line[len(name):]
    return Parsed(thought, name.strip("`'\""), args.strip().strip("`").strip())


def _bracketed(s: str) -> str:
    """The text inside the bracket that opens `s`, up to its matching close (brackets inside JSON
    strings do not count); the rest of the line when it never closes."""
    open_, close = s[0], "]" if s[0] == "[" else ")"
    depth, in_str, esc = 0, False, False
    for i, ch in enumerate(s):
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
            continue
        if ch == '"':
            in_str = True
        elif ch == open_:
            depth += 1
        elif ch == close:
            depth -= 1
            if depth == 0:
                return s[1:i]
    line = s[1:].split("\n", 1)[0]
    return line[:line.rfind(close)] if close in line else line


def _schema_line(tool: Any) -> str:
    props = (tool.parameters or {}).get("properties", {})
    required = set((tool.parameters or {}).get("required", []))
    args = ", ".join(f'"{k}": {v.get("type", "value")}{"" if k in required else " (optional)"}'
                     for k, v in props.items())
    return f"- {tool.name}: {tool.description.strip()} Arguments: {{{args}}}"


def react_system_prompt(registry: Any, memories: str = "") -> str:
    tools = "\n".join(_schema_line(registry.get(n)) for n in registry.names())
    prompt = ("Answer the question. You can use these tools:\n"
              f"{tools}\n\n"
              "Use exactly this format:\n"
              "Thought: what you should do next\n"
              'Action: tool_name[{"argument": "value"}]\n'
              "Observation: the tool's result (it is given to you; never write it yourself)\n"
              "... (Thought, Action and Observation can repeat)\n"
              "Thought: I know the final answer\n"
              "Final Answer: the answer")
    return f"{prompt}\n\n{memories}" if memories else prompt


def tool_arguments(tool: Any, raw: str) -> dict[str, Any] | None:
    """The arguments dict for `tool` from the model's text: a JSON object, or for a tool with one
    (required) parameter any text (a JSON string literal unquoted). None when neither fits."""
    raw = raw.strip()
    try:
        value = json.loads(raw) if raw else {}
    except json.JSONDecodeError:
        value = raw
    if isinstance(value, dict):
        return value
    props = list((tool.parameters or {}).get("properties", {}))
    required = list((tool.parameters or {}).get("required", []))
    single = required if len(required) == 1 else (props if len(props) == 1 else [])
    if not single:
        return None
    return {single[0]: value if isinstance(value, str) else raw}


def _find_tool(registry: Any, name: str) -> str | None:
    names = registry.names()
    if name in names:
        return name
    low = {n.lower(): n for n in names}
    return low.get(name.lower())


async def react(model: ChatModel, task: str | list[dict[str, Any]], registry: Any, *,
                trace: Trace | None = None, sampling: Sampling | None = None,
                memory: PlanMemory | None = None, answer_type: str = "auto") -> AgentResult:
    """Run the Thought/Action/Observation loop until "Final Answer:" or the budget ends it. A number or
    choice answer is extracted from the final answer (text answers are kept whole). With `memory`,
    similar solved tasks go into the prompt and a solved task is remembered."""
    trace = trace or Trace()
    history, question = split_task(task)
    kind = resolve_answer_type(answer_type, question)
    letters = choice_letters(question) or "ABCDE"
    hits = memory.search(question) if memory is not None else []
    if hits:
        trace.add("retrieval", "\n".join(r.task for r, _ in hits), source="plan_memory",
                  similarities=[round(s, 4) for _, s in hits])
    messages = [*with_system(history, react_system_prompt(registry, format_memories(hits))),
                user(f"Question: {question}")]
    actions: list[str] = []
    try:
        while True:
            reply = (await call_model(model, trace, messages, sampling=sampling, stop=STOP))[0]
            text = (reply.content or "").split("Observation:", 1)[0].rstrip()
            if reply.tool_calls and not _ACTION.search(text) and not _FINAL.search(text):
                # a server that parsed the action into a native tool call: treat it as the text form
                call = reply.tool_calls[0]
                text = f"{text}\nAction: {call.name}[{call.arguments}]".strip()
            parsed = parse_react(text)
            messages.append(assistant(text))
            if parsed.thought:
                trace.add("thought", parsed.thought)
            if parsed.final:
                answer = parsed.final if kind == "text" else extract_answer(parsed.final, kind, letters=letters)
                if memory is not None and actions and answer is not None:
                    memory.add(question, actions, answer, strategy="react")
                return trace.finish(answer if answer is not None else parsed.final, actions=len(actions),
                                    answer_type=kind, extracted=answer is not None)
            observation, ok = await _act(registry, parsed, trace)
            if parsed.tool is not None and ok:
                actions.append(f"{parsed.tool}[{parsed.args}]")
            messages.append(user(f"Observation: {observation}"))
    except BudgetStop as stop:
        return trace.finish(None, stop.reason, actions=len(actions), answer_type=kind)


async def _act(registry: Any, parsed: Parsed, trace: Trace) -> tuple[str, bool]:
    """Run the parsed action; the observation text and whether the tool ran and succeeded."""
    if parsed.tool is None:
        obs = f"Your reply had no action and no final answer. {FORMAT_HELP}"
        trace.add("observation", obs, format_error=True)
        return obs, False
    name = _find_tool(registry, parsed.tool)
    if name is None:
        obs = (f"There is no tool {parsed.tool!r}. Available tools: {', '.join(registry.names())}. "
               f"{FORMAT_HELP}")
        trace.add("observation", obs, tool=parsed.tool, format_error=True)
        return obs, False
    args = tool_arguments(registry.get(name), parsed.args or "")
    if args is None:
        obs = (f"The arguments of {name} must be a JSON object: "
               f"{json.dumps(registry.get(name).parameters, ensure_ascii=False)}. {FORMAT_HELP}")
        trace.add("observation", obs, tool=name, format_error=True)
        return obs, False
    trace.add("action", f"{name}[{json.dumps(args, ensure_ascii=False)}]", tool=name, arguments=args)
    if trace.time_left() <= 0:
        raise BudgetStop("time_budget")
    try:
        result = await asyncio.wait_for(registry.call(name, args), timeout=trace.time_left())
    except asyncio.TimeoutError:
        raise BudgetStop("time_budget") from None
    content = result.content if len(result.content) <= MAX_OBSERVATION_CHARS else (
        result.content[:MAX_OBSERVATION_CHARS] + " …(truncated)")
    obs = content if result.ok or content.lower().startswith("error") else f"error: {content}"
    trace.add("observation", obs, tool=name, ok=result.ok)
    return obs, bool(result.ok)
