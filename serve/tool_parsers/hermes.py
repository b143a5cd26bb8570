"""Hermes / Qwen tool calls: `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` blocks.

Used by Hermes-2-Pro, Qwen2, Qwen2.5, Qwen3 and hearth's default ChatML template. Content text may
come before the calls; several calls are consecutive blocks.

    from hearth.serve.tool_parsers import hermes
    msg = hermes.parse('<tool_call>\\n{"name": "get_weather", "arguments": {"city": "Paris"}}\\n</tool_call>', tools)
    msg.tool_calls[0].arguments          # '{"city": "Paris"}'
    lark = hermes.grammar(tools, "required", parallel_tool_calls=True)
"""

from __future__ import annotations

import json
from typing import Any, Mapping

from . import base
from .base import ParsedMessage, ToolCall

START, END = "<tool_call>", "</tool_call>"
# marker texts that may be single special tokens; the server maps the ones that are to token ids
MARKERS = (START, END)


class StreamParser(base.StreamParser):
    """Incremental parse: `feed(delta)` / `finish()` -> ContentDelta and ToolCallDelta items."""

    def _step(self, buf: str, final: bool) -> base.Step:
        i = buf.find(START)
        if i == -1:
            if final:
                return [buf], len(buf)
            n = len(buf) - base.partial_suffix(buf, START)
            return ([buf[:n]], n) if n else None
        if i > 0:
            return [buf[:i]], i
        j = buf.find(END, len(START))
        if j == -1:
            if not final:
                return None
            # the model may stop right after the JSON, before the closing tag
            body, end = buf[len(START):], len(buf)
        else:
            body, end = buf[len(START):j], j + len(END)
        ok, obj = base.load_json(body)
        call = base.call_from_obj(obj, self.names) if ok else None
        return ([call] if call else [buf[:end]]), end


def parse(text: str, tools: list[dict]) -> ParsedMessage:
    """The final parse of a whole reply; never raises on model text."""
    return base.parse_with(StreamParser(tools), text)


def render_call(call: ToolCall) -> str:
    body = json.dumps({"name": call.name, "arguments": base.call_arguments(call)}, ensure_ascii=False)
    return f"{START}\n{body}\n{END}"


def render_calls(calls: list[ToolCall]) -> str:
    return "\n".join(render_call(c) for c in calls)


def grammar(tools: list[dict], tool_choice: Any, parallel_tool_calls: bool,
            special_ids: Mapping[str, int] | None = None) -> str:
    """Lark grammar forcing one (or, with parallel_tool_calls, several) call blocks.

    tool_choice: "required" or a function name (or the OpenAI {"type": "function", ...} dict).
    special_ids: {marker: token id} for the MARKERS that are special tokens in the tokenizer.
    """
    alts, rules = base.json_call_rules(base.grammar_tools(tools, tool_choice), "arguments")
    open_, close = base.lark_literal(START, special_ids), base.lark_literal(END, special_ids)
    return "\n".join([
        f"start: {base.repeat('call', chr(10), parallel_tool_calls)}",
        f'call: {open_} "\\n" body "\\n" {close}',
        f"body: {alts}",
        *rules,
    ]) + "\n"


def prepare_messages(messages: list[dict], tools: list[dict] | None, tool_choice: Any) -> list[dict]:
    """OpenAI messages for this family's own chat template (which renders tools and calls)."""
    return base.native_messages(messages)
