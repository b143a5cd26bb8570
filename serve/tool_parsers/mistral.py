"""Mistral tool calls: `[TOOL_CALLS]` then a JSON array `[{"name": ..., "arguments": {...}}, ...]`.

Newer (tekken v11+) models write `[TOOL_CALLS]name[ARGS]{...}` per call, some with
`[CALL_ID]id` before `[ARGS]`; parse takes both. `grammar` writes the array form unless the
tokenizer has an `[ARGS]` special token (pass it in special_ids), then the newer one.

    from hearth.serve.tool_parsers import mistral
    msg = mistral.parse('[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}]', tools)
    lark = mistral.grammar(tools, "required", True, special_ids={"[TOOL_CALLS]": 9})
"""

from __future__ import annotations

import json
import re
from typing import Any, Mapping

from . import base
from .base import ParsedMessage, ToolCall

TOOL_CALLS, ARGS, CALL_ID = "[TOOL_CALLS]", "[ARGS]", "[CALL_ID]"
MARKERS = (TOOL_CALLS, ARGS, CALL_ID)
BARE_START = '[{"name"'
_NAME_PART = re.compile(r"[a-zA-Z0-9_-]*")


class StreamParser(base.StreamParser):
    """Incremental parse: `feed(delta)` / `finish()` -> ContentDelta and ToolCallDelta items.

    A decoder that skips special tokens drops `[TOOL_CALLS]` and `[ARGS]`, so a reply that opens
    with `[{"name"` or with `known_tool{` is read as calls without them.
    """

    def _step(self, buf: str, final: bool) -> base.Step:
        if self.state == "start":
            return self._bare_array(buf, final)
        if self.state == "bare":
            return self._bare_named(buf, final)
        i = buf.find(TOOL_CALLS)
        if i == -1:
            if final:
                return [buf], len(buf)
            n = len(buf) - base.partial_suffix(buf, TOOL_CALLS)
            return ([buf[:n]], n) if n else None
        if i > 0:
            return [buf[:i]], i
        pos = len(TOOL_CALLS)
        pos += len(buf) - pos - len(buf[pos:].lstrip())
        if pos == len(buf):
            return ([buf], len(buf)) if final else None
        if buf[pos] == "[":
            found = self._decode(buf, pos)
            if found is None:
                return ([buf], len(buf)) if final else None
            items, end = found
            calls = [base.call_from_obj(x, self.names) for x in items] if isinstance(items, list) else []
            if calls and all(calls):
                return calls, end
            return [buf[:end]], end
        return self._named_call(buf, pos, final)

    def _bare_array(self, buf: str, final: bool) -> base.Step:
        pos = len(buf) - len(buf.lstrip())
        head = re.sub(r"\s+", "", buf[pos:pos + 200])
        if not head or BARE_START.startswith(head):  # may still grow into the array
            return self._to_text() if final else None
        if not head.startswith(BARE_START):
            self.state = "bare"
            return [], 0
        found = self._decode(buf, pos)
        if found is None:
            return None if not final else self._to_text()
        self.state = "text"
        calls = [base.call_from_obj(x, self.names) for x in found[0]] if isinstance(found[0], list) else []
        return (calls if calls and all(calls) else [buf[:found[1]]]), found[1]

    def _bare_named(self, buf: str, final: bool) -> base.Step:
        # `name{...}` back to back: the newer format with its markers stripped
        name = _NAME_PART.match(buf).group()
        if len(name) == len(buf) and not final and any(n.startswith(name) for n in self.names):
            return None
        if len(name) == len(buf) or buf[len(name)] != "{" or name not in self.names:
            return self._to_text()
        found = self._decode(buf, len(name))
        if found is None:
            return self._to_text() if final else None
        call = base.call_from_obj({"name": name, "arguments": found[0]}, self.names)
        return ([call], found[1]) if call else self._to_text()

    def _to_text(self) -> base.Step:
        self.state = "text"
        return [], 0

    def _named_call(self, buf: str, pos: int, final: bool) -> base.Step:
        # `name[ARGS]{...}` or `name[CALL_ID]id[ARGS]{...}`
        name = _NAME_PART.match(buf, pos).group()
        rest = pos + len(name)
        if rest == len(buf) or (CALL_ID.startswith(buf[rest:]) or ARGS.startswith(buf[rest:])):
            return ([buf], len(buf)) if final else None  # still typing the name or a marker
        if buf.startswith(CALL_ID, rest):
            k = buf.find(ARGS, rest)
            if k == -1:
                return ([buf], len(buf)) if final else None
            rest = k
        if not name or not buf.startswith(ARGS, rest):
            return [TOOL_CALLS], len(TOOL_CALLS)  # not a call: the marker is text, go on after it
        at = rest + len(ARGS)
        at += len(buf) - at - len(buf[at:].lstrip())
        found = self._decode(buf, at)
        if found is None:
            return ([buf], len(buf)) if final else None
        call = base.call_from_obj({"name": name, "arguments": found[0]}, self.names)
        return ([call] if call else [buf[:found[1]]]), found[1]


def parse(text: str, tools: list[dict]) -> ParsedMessage:
    """The final parse of a whole reply; never raises on model text."""
    return base.parse_with(StreamParser(tools), text)


def render_call(call: ToolCall) -> str:
    return render_calls([call])


def render_calls(calls: list[ToolCall]) -> str:
    items = [{"name": c.name, "arguments": base.call_arguments(c)} for c in calls]
    return TOOL_CALLS + json.dumps(items, ensure_ascii=False)


def grammar(tools: list[dict], tool_choice: Any, parallel_tool_calls: bool,
            special_ids: Mapping[str, int] | None = None) -> str:
    """Lark grammar forcing `[TOOL_CALLS][{...}, ...]` (or `[TOOL_CALLS]name[ARGS]{...}` per call
    when special_ids has "[ARGS]").

    tool_choice: "required" or a function name (or the OpenAI {"type": "function", ...} dict).
    special_ids: {marker: token id} for the MARKERS that are special tokens in the tokenizer.
    """
    specs = base.grammar_tools(tools, tool_choice)
    tc = base.lark_literal(TOOL_CALLS, special_ids)
    if special_ids and ARGS in special_ids:
        args = base.lark_literal(ARGS, special_ids)
        rules = [f"fn_{i}: {tc} {base.lark_literal(s['name'])} {args} {base.args_json(s['parameters'])}"
                 for i, s in enumerate(specs)]
        body = " | ".join(f"fn_{i}" for i in range(len(specs)))
        return "\n".join([f"start: {'call+' if parallel_tool_calls else 'call'}", f"call: {body}", *rules]) + "\n"
    alts, rules = base.json_call_rules(specs, "arguments")
    return "\n".join([
        f'start: {tc} " "? "[" {base.repeat("call", ", ", parallel_tool_calls)} "]"',
        f"call: {alts}",
        *rules,
    ]) + "\n"


def prepare_messages(messages: list[dict], tools: list[dict] | None, tool_choice: Any) -> list[dict]:
    """OpenAI messages for Mistral's own template, whose call ids must be 9 alphanumerics."""
    out = base.native_messages(messages)
    for m in out:
        for c in m.get("tool_calls") or []:
            if "id" in c:
                c["id"] = _short_id(c["id"])
        if m.get("tool_call_id"):
            m["tool_call_id"] = _short_id(m["tool_call_id"])
    return out


def _short_id(call_id: str) -> str:
    # the same OpenAI id always maps to the same 9 characters, so calls and results still pair up
    return re.sub(r"[^a-zA-Z0-9]", "", str(call_id))[-9:].rjust(9, "0")
