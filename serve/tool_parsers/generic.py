"""Generic JSON tool calls, for models whose chat template knows nothing of tools (the bundled
SmolLM2-135M-Instruct): the system prompt lists the tools and asks for

    {"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]}

A bare `{"name": ..., "arguments": ...}` object also counts, and either may sit in a ```json
fenced block after some text. Everything else is content.

    from hearth.serve.tool_parsers import generic
    messages = generic.prepare_messages(messages, tools, "auto")   # ChatML-renderable
    msg = generic.parse(reply_text, tools)
    lark = generic.grammar(tools, "required", parallel_tool_calls=True)
"""

from __future__ import annotations

import json
from typing import Any, Mapping

from . import base
from .base import ParsedMessage, ToolCall

FENCE = "```"
OPEN, CLOSE = '{"tool_calls": [', "]}"
MARKERS: tuple[str, ...] = ()


def _calls(obj: Any, names: set[str]) -> list[ToolCall] | None:
    """Calls from {"tool_calls": [...]} or one bare call object; None unless every one is valid."""
    if isinstance(obj, dict) and "tool_calls" in obj:
        items = obj["tool_calls"]
        if not isinstance(items, list) or not items:
            return None
    else:
        items = [obj]
    calls = [base.call_from_obj(x, names) for x in items]
    return calls if all(calls) else None


class StreamParser(base.StreamParser):
    """Incremental parse: `feed(delta)` / `finish()` -> ContentDelta and ToolCallDelta items.

    States: "start" (a bare JSON reply may begin), "text", "code" (inside a non-JSON fence).
    """

    def _step(self, buf: str, final: bool) -> base.Step:
        if self.state == "start":
            pos, step = self._json_opening(buf, final)
            if pos is None:
                return step
            found = self._decode(buf, pos)
            if found is None:
                if not final:
                    return None
                self.state = "text"
                return [], 0
            self.state = "text"
            calls = _calls(found[0], self.names)
            return (calls or [buf[:found[1]]]), found[1]
        i = buf.find(FENCE)
        if i == -1:
            if final:
                return [buf], len(buf)
            n = len(buf) - base.partial_suffix(buf, FENCE)
            return ([buf[:n]], n) if n else None
        if i > 0:
            return [buf[:i]], i
        if self.state == "code":  # the closing fence of a code block
            self.state = "text"
            return [FENCE], len(FENCE)
        return self._fence(buf, final)

    def _fence(self, buf: str, final: bool) -> base.Step:
        nl = buf.find("\n", len(FENCE))
        if nl == -1:
            return self._open_code(buf) if final else None
        if buf[len(FENCE):nl].strip().lower() not in ("", "json"):
            return self._open_code(buf, nl + 1)
        body = buf[nl + 1:]
        first = body.lstrip()[:1]
        if not first:
            return self._open_code(buf, nl + 1) if final else None
        if first != "{":
            return self._open_code(buf, nl + 1)
        close = buf.find(FENCE, nl + 1)
        if close == -1 and not final:
            return None
        end = len(buf) if close == -1 else close + len(FENCE)
        ok, obj = base.load_json(buf[nl + 1:close if close != -1 else len(buf)])
        calls = _calls(obj, self.names) if ok else None
        return (calls or [buf[:end]]), end

    def _open_code(self, buf: str, upto: int | None = None) -> base.Step:
        # a fence that holds no call: text up to its closing fence is plain content
        self.state = "code"
        upto = len(buf) if upto is None else upto
        return [buf[:upto]], upto


def parse(text: str, tools: list[dict]) -> ParsedMessage:
    """The final parse of a whole reply; never raises on model text."""
    return base.parse_with(StreamParser(tools), text)


def _call_obj(call: ToolCall) -> dict:
    return {"name": call.name, "arguments": base.call_arguments(call)}


def render_call(call: ToolCall) -> str:
    return render_calls([call])


def render_calls(calls: list[ToolCall]) -> str:
    return json.dumps({"tool_calls": [_call_obj(c) for c in calls]}, ensure_ascii=False)


def grammar(tools: list[dict], tool_choice: Any, parallel_tool_calls: bool,
            special_ids: Mapping[str, int] | None = None) -> str:
    """Lark grammar forcing `{"tool_calls": [{"name": N, "arguments": {...}}, ...]}`.

    tool_choice: "required" or a function name (or the OpenAI {"type": "function", ...} dict).
    special_ids is accepted for a uniform signature; this format uses no special token.
    """
    alts, rules = base.json_call_rules(base.grammar_tools(tools, tool_choice), "arguments")
    calls = base.repeat("call", ", ", parallel_tool_calls)
    return "\n".join([
        f"start: {base.lark_literal(OPEN)} {calls} {base.lark_literal(CLOSE)}",
        f"call: {alts}",
        *rules,
    ]) + "\n"


def system_prompt(tools: list[dict], tool_choice: Any) -> str:
    """The system-prompt lines that teach a tool-unaware model the tools and the reply format."""
    specs = base.normalize_tools(tools)
    if not specs or tool_choice == "none":
        return ""
    lines = ["You can call these tools:"]
    for s in specs:
        params = json.dumps(s["parameters"], ensure_ascii=False, separators=(",", ":"))
        desc = f" {s['description']}" if s["description"] else ""
        lines.append(f"- {s['name']}:{desc} Arguments schema: {params}")
    example = '{"tool_calls": [{"name": "<tool name>", "arguments": {<arguments>}}]}'
    if tool_choice == "required":
        lines.append(f"You must call one or more tools. Reply with only this JSON:\n{example}")
    elif tool_choice not in (None, "auto"):
        name = base.chosen_name(tool_choice)
        lines.append(f'You must call the tool {name}. Reply with only this JSON:\n'
                     f'{{"tool_calls": [{{"name": "{name}", "arguments": {{<arguments>}}}}]}}')
    else:
        lines.append(f"To call tools, reply with only this JSON:\n{example}\n"
                     "Otherwise answer normally. Tool results come back in a message starting with \"Tool result\".")
    return "\n".join(lines)


def prepare_messages(messages: list[dict], tools: list[dict] | None, tool_choice: Any) -> list[dict]:
    """OpenAI messages -> role/content strings a plain ChatML template renders.

    The tools go into the system message; assistant tool_calls become their JSON text; tool
    results become "user" turns naming the function (consecutive ones merged), which keeps
    user/assistant alternation for templates that insist on it.
    """
    out: list[dict] = []
    call_names: dict[str, str] = {}
    for m in messages:
        role, text = m.get("role"), base.content_text(m.get("content"))
        if role == "assistant" and m.get("tool_calls"):
            calls = base.message_calls(m)
            call_names.update((c.id, c.name) for c in calls)
            text = (text + "\n" if text else "") + render_calls(calls)
        elif role == "tool":
            name = call_names.get(m.get("tool_call_id") or "", m.get("name") or "the tool")
            text = f"Tool result ({name}): {text}"
            if out and out[-1]["role"] == "user" and out[-1].get("_tool"):
                out[-1]["content"] += "\n" + text
                continue
            out.append({"role": "user", "content": text, "_tool": True})
            continue
        out.append({"role": role, "content": text})
    for m in out:
        m.pop("_tool", None)
    prompt = system_prompt(tools, tool_choice) if tools else ""
    if prompt:
        if out and out[0]["role"] == "system":
            out[0]["content"] = (out[0]["content"] + "\n\n" if out[0]["content"] else "") + prompt
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out
