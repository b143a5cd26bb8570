"""Hermes / Qwen tool calls: `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` blocks.

Used by Hermes-2-Pro, Qwen2, Qwen2.5, Qwen3 and hearth's default ChatML template. Content text may
come before the calls; several calls are consecutive blocks. Small Qwen models often leave the tags
out under `tool_choice: auto` and write the same object in a ```json fenced block, or bare at the
start of the reply, sometimes in the doubled braces of Qwen2.5's template (`{{"name": ...}}`); those
count as calls too when every object in them names a known tool (the shapes llama.cpp's Hermes 2 Pro
parser takes). Any other fence or object stays content, verbatim; a ```json block whose body opens
with "{" streams only once it closes, since only then is it known not to be a call.

    from hearth.serve.tool_parsers import hermes
    msg = hermes.parse('<tool_call>\\n{"name": "get_weather", "arguments": {"city": "Paris"}}\\n</tool_call>', tools)
    msg.tool_calls[0].arguments          # '{"city": "Paris"}'
    lark = hermes.grammar(tools, "required", parallel_tool_calls=True)
"""

from __future__ import annotations

import json
import re
from typing import Any, Mapping

from . import base
from .base import ParsedMessage, ToolCall

START, END = "<tool_call>", "</tool_call>"
FENCE = "```"
# marker texts that may be single special tokens; the server maps the ones that are to token ids
MARKERS = (START, END)
# the head of a call's JSON (llama.cpp's trigger for a Hermes call), with as much of the name as is there
_CALL_HEAD = re.compile(r'\s*(?:\{\s*)?\{\s*"name"\s*:\s*(?:"([a-zA-Z0-9_-]*)(")?)?')
# Qwen2.5's template shows the call as {{"name": ...}} (Python-format braces left doubled in a Jinja
# string), and small Qwen models copy the extra pair
_DOUBLED = re.compile(r"\{\s*(?=\{)")


class StreamParser(base.StreamParser):
    """Incremental parse: `feed(delta)` / `finish()` -> ContentDelta and ToolCallDelta items.

    States: "start" (bare JSON calls may come here), "text", "code" (inside a fence that holds no
    call). A call cut short at the end of the reply (max_tokens) is dropped, never left in content.
    """

    def _step(self, buf: str, final: bool) -> base.Step:
        if self.state == "start":
            return self._bare(buf, final)
        markers = (FENCE,) if self.state == "code" else (START, FENCE)  # inside code only its end counts
        found = [k for k in (buf.find(m) for m in markers) if k != -1]
        if not found:
            if final:
                return [buf], len(buf)
            n = len(buf) - base.partial_suffix(buf, *markers)
            return ([buf[:n]], n) if n else None
        k = min(found)
        if k > 0:
            return [buf[:k]], k
        if self.state == "code":
            self.state = "text"
            return [FENCE], len(FENCE)
        return self._tagged(buf, final) if buf.startswith(START) else self._fenced(buf, final)

    def _bare(self, buf: str, final: bool) -> base.Step:
        pos, step = self._json_opening(buf, final)
        if pos is None:
            return step
        doubled = _DOUBLED.match(buf, pos)
        found = self._decode(buf, doubled.end() if doubled else pos)
        if found is None:
            if not final:
                return None
            if self._cut_call(buf[pos:]):
                return [], len(buf)
            self.state = "text"
            return [], 0
        call = base.call_from_obj(found[0], self.names)
        if call is None:
            self.state = "text"
            return [buf[:found[1]]], found[1]
        end = found[1]
        if doubled:  # and its closing brace, once it is there
            rest = buf[end:].lstrip()
            if not rest and not final:
                return None
            if rest.startswith("}"):
                end = len(buf) - len(rest) + 1
        return [call], end  # still "start": another bare call may follow

    def _tagged(self, buf: str, final: bool) -> base.Step:
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
        if call:
            return [call], end
        if j == -1 and (not body.strip() or body.lstrip().startswith("{")):
            return [], end  # the tag says this was a call: cut short, it is dropped
        return [buf[:end]], end

    def _fenced(self, buf: str, final: bool) -> base.Step:
        nl = buf.find("\n", len(FENCE))
        if nl == -1:
            return ([buf], len(buf)) if final else None
        body = buf[nl + 1:].lstrip()
        if buf[len(FENCE):nl].strip().lower() not in ("", "json") or \
                not (body.startswith("{") or body.startswith(START[:len(body)])):
            self.state = "code"
            return [buf[:nl + 1]], nl + 1
        close = buf.find(FENCE, nl + 1)
        if close == -1 and not final:
            return None
        inner = buf[nl + 1:] if close == -1 else buf[nl + 1:close]
        end = len(buf) if close == -1 else close + len(FENCE)
        inside = StreamParser(None)
        inside.names = self.names
        msg = base.parse_with(inside, inner)
        if msg.tool_calls and not (msg.content or "").strip():
            return msg.tool_calls, end
        if close == -1 and self._cut_call(inner):
            return [], end
        return [buf[:end]], end

    def _cut_call(self, text: str) -> bool:
        """Whether unfinished JSON `text` is the start of a call to a known tool (cut at max_tokens)."""
        m = _CALL_HEAD.match(text)
        if m is None:
            return False
        name, closed = m.group(1) or "", m.group(2)
        return name in self.names if closed else any(n.startswith(name) for n in self.names)


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
    With several calls allowed, the end of the turn may follow any call, before or after a newline:
    Qwen writes "\n" after `</tool_call>` and only then its end token, so a grammar whose "\n" must
    open another call makes it call again and again until max_tokens.
    """
    alts, rules = base.json_call_rules(base.grammar_tools(tools, tool_choice), "arguments")
    open_, close = base.lark_literal(START, special_ids), base.lark_literal(END, special_ids)
    calls = base.repeat("call", chr(10), parallel_tool_calls)
    return "\n".join([
        f'start: {calls} "\\n"?' if parallel_tool_calls else f"start: {calls}",
        f'call: {open_} "\\n" body "\\n" {close}',
        f"body: {alts}",
        *rules,
    ]) + "\n"


def prepare_messages(messages: list[dict], tools: list[dict] | None, tool_choice: Any) -> list[dict]:
    """OpenAI messages for this family's own chat template (which renders tools and calls)."""
    return base.native_messages(messages)
