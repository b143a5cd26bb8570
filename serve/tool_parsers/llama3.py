"""Llama 3.1 / 3.2 JSON tool calls: the whole reply is `{"name": ..., "parameters": {...}}`.

The object may follow `<|python_tag|>`; several calls are separated by `;` (newlines also pass).
"arguments" is accepted in place of "parameters". A reply that does not start with a call is
plain content.

    from hearth.serve.tool_parsers import llama3
    msg = llama3.parse('{"name": "get_weather", "parameters": {"city": "Paris"}}', tools)
    lark = llama3.grammar(tools, "get_weather", parallel_tool_calls=False)
"""

from __future__ import annotations

import json
from typing import Any, Mapping

from . import base
from .base import ParsedMessage, ToolCall

PYTHON_TAG = "<|python_tag|>"
MARKERS = (PYTHON_TAG,)
SEPARATOR = "; "


class StreamParser(base.StreamParser):
    """Incremental parse: `feed(delta)` / `finish()` -> ContentDelta and ToolCallDelta items.

    States: "start" (a call may begin here), "sep" (after a call), "content" (the rest is text).
    """

    def _step(self, buf: str, final: bool) -> base.Step:
        if self.state == "content":
            return [buf], len(buf)
        pos = len(buf) - len(buf.lstrip())
        if pos == len(buf):  # only whitespace so far
            return ([buf], len(buf)) if final else None
        if self.state == "sep":
            if buf[pos] == ";":
                self.state = "start"
                return [], pos + 1
            self.state = "start" if buf[pos] == "{" else "content"
            return [], 0
        # state "start"
        if buf.startswith(PYTHON_TAG, pos):
            pos += len(PYTHON_TAG)
            pos += len(buf) - pos - len(buf[pos:].lstrip())
            if pos == len(buf):
                return self._undecided(buf, final)
        elif PYTHON_TAG.startswith(buf[pos:]):
            return self._undecided(buf, final)
        if buf[pos] != "{":
            self.state = "content"
            return [], 0
        found = self._decode(buf, pos)
        if found is None:
            return self._undecided(buf, final)
        call = base.call_from_obj(found[0], self.names, ("parameters", "arguments"))
        if call is None:
            self.state = "content"
            return [], 0
        self.state = "sep"
        return [call], found[1]

    def _undecided(self, buf: str, final: bool) -> base.Step:
        if not final:
            return None
        self.state = "content"
        return [], 0


def parse(text: str, tools: list[dict]) -> ParsedMessage:
    """The final parse of a whole reply; never raises on model text."""
    return base.parse_with(StreamParser(tools), text)


def render_call(call: ToolCall) -> str:
    return json.dumps({"name": call.name, "parameters": base.call_arguments(call)}, ensure_ascii=False)


def render_calls(calls: list[ToolCall]) -> str:
    return SEPARATOR.join(render_call(c) for c in calls)


def grammar(tools: list[dict], tool_choice: Any, parallel_tool_calls: bool,
            special_ids: Mapping[str, int] | None = None) -> str:
    """Lark grammar forcing `{"name": N, "parameters": {...}}` (several joined by "; ").

    tool_choice: "required" or a function name (or the OpenAI {"type": "function", ...} dict).
    special_ids is accepted for a uniform signature; the JSON format uses no special token.
    """
    alts, rules = base.json_call_rules(base.grammar_tools(tools, tool_choice), "parameters")
    return "\n".join([
        f"start: {base.repeat('call', SEPARATOR, parallel_tool_calls)}",
        f"call: {alts}",
        *rules,
    ]) + "\n"


def prepare_messages(messages: list[dict], tools: list[dict] | None, tool_choice: Any) -> list[dict]:
    """OpenAI messages for this family's own chat template (which renders tools and calls)."""
    return base.native_messages(messages)
