"""Shared types and helpers of the tool-call families (hermes.py, llama3.py, mistral.py, generic.py).

    from hearth.serve.tool_parsers import base
    specs = base.normalize_tools(body_tools)      # ValueError naming the bad field
    msg = base.ParsedMessage("hi", [base.ToolCall("get_weather", '{"city": "Paris"}')])

A family's StreamParser subclasses `StreamParser` here and implements only `_step`, which
recognises calls in the text; the whitespace and delta bookkeeping stay in one place, and a
family's `parse(text)` is that same parser fed once, so streaming and non-streaming agree.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass, field
from typing import Any, Mapping, Union

from hearth.runtime.detokenizer import partial_suffix  # noqa: F401  (the parsers call base.partial_suffix)
from hearth.runtime.guided import lark_json
from hearth.runtime.schema_check import closed_objects


def new_call_id() -> str:
    """"call_" + 24 random alphanumerics, the shape OpenAI clients expect."""
    return "call_" + secrets.token_hex(12)


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text of the arguments object
    id: str = field(default_factory=new_call_id)


@dataclass
class ParsedMessage:
    content: str | None
    tool_calls: list[ToolCall]


@dataclass
class ToolCallDelta:
    """First delta of call `index` carries id and name (arguments ""); later ones only arguments."""
    index: int
    id: str | None
    name: str | None
    arguments: str


@dataclass
class ContentDelta:
    text: str


Delta = Union[ContentDelta, ToolCallDelta]

# OpenAI's own rule for function names; it also keeps names safe inside grammar string literals
NAME_RE = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")


# ---- request validation -------------------------------------------------------------------------

def normalize_tools(tools: list[dict] | None) -> list[dict]:
    """OpenAI `tools` -> [{"name", "description", "parameters"}]; ValueError names the bad field.

    >>> normalize_tools([{"type": "function", "function": {"name": "f"}}])
    [{'name': 'f', 'description': '', 'parameters': {'type': 'object'}}]
    """
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise ValueError("tools must be a list")
    out, seen = [], set()
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict):
            raise ValueError(f"{where} must be an object")
        if "type" not in tool:
            raise ValueError(f"{where}.type is required")
        if tool["type"] != "function":
            raise ValueError(f"{where}.type must be 'function', got {tool['type']!r}")
        fn = tool.get("function")
        if fn is None:
            raise ValueError(f"{where}.function is required")
        if not isinstance(fn, dict):
            raise ValueError(f"{where}.function must be an object")
        name = fn.get("name")
        if name is None:
            raise ValueError(f"{where}.function.name is required")
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise ValueError(f"{where}.function.name must match {NAME_RE.pattern}, got {name!r}")
        if name in seen:
            raise ValueError(f"{where}.function.name {name!r} is used by an earlier tool")
        seen.add(name)
        desc = fn.get("description")
        if desc is not None and not isinstance(desc, str):
            raise ValueError(f"{where}.function.description must be a string")
        params = fn.get("parameters")
        if params is None:
            params = {"type": "object"}
        elif not isinstance(params, dict):
            raise ValueError(f"{where}.function.parameters must be a JSON schema object")
        out.append({"name": name, "description": desc or "", "parameters": params})
    return out


def normalize_tool_choice(tool_choice: Any, tools: list[dict] | None) -> str | dict:
    """"auto" | "none" | "required" | {"type": "function", "function": {"name": N}}, checked against tools.

    None means "auto" when there are tools, else "none" (OpenAI's default).
    """
    names = [t["name"] for t in normalize_tools(tools)]
    if tool_choice is None:
        return "auto" if names else "none"
    if isinstance(tool_choice, str):
        if tool_choice not in ("auto", "none", "required"):
            raise ValueError(f"tool_choice must be 'auto', 'none', 'required' or a function, got {tool_choice!r}")
        if tool_choice == "required" and not names:
            raise ValueError("tool_choice 'required' needs a non-empty tools list")
        return tool_choice
    name = chosen_name(tool_choice)
    if name not in names:
        raise ValueError(f"tool_choice.function.name {name!r} is not one of the tools {names}")
    return {"type": "function", "function": {"name": name}}


def chosen_name(tool_choice: Any) -> str:
    """The function name of a named tool_choice (the OpenAI dict or the bare name)."""
    if isinstance(tool_choice, str):
        return tool_choice
    if not isinstance(tool_choice, dict) or tool_choice.get("type") != "function":
        raise ValueError("tool_choice must be a string or {'type': 'function', 'function': {'name': ...}}")
    fn = tool_choice.get("function")
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise ValueError("tool_choice.function.name is required")
    return fn["name"]


def tool_names(tools: list[dict] | None) -> set[str]:
    return {t["name"] for t in normalize_tools(tools)}


# ---- reading calls out of model text --------------------------------------------------------------

_DECODER = json.JSONDecoder()


def decode_at(text: str, pos: int) -> tuple[Any, int] | None:
    """The JSON value starting exactly at `pos` and the index after it, or None (bad or incomplete)."""
    try:
        return _DECODER.raw_decode(text, pos)
    except ValueError:
        return None


def load_json(text: str) -> tuple[bool, Any]:
    """(True, value) when the whole of `text` (whitespace aside) is one JSON value."""
    text = text.strip()
    found = decode_at(text, 0) if text else None
    if found is None or found[1] != len(text):
        return False, None
    return True, found[0]


def call_from_obj(obj: Any, names: set[str], arg_keys: tuple[str, ...] = ("arguments", "parameters")) -> ToolCall | None:
    """A ToolCall from {"name": N, "arguments": {...}} when N is a known tool, else None.

    Also takes the OpenAI shape {"type": "function", "function": {...}} and arguments given as a
    JSON string (some models double-encode them).
    """
    if not isinstance(obj, dict):
        return None
    if "name" not in obj and isinstance(obj.get("function"), dict):
        obj = obj["function"]
    name = obj.get("name")
    if not isinstance(name, str) or name not in names:
        return None
    args = next((obj[k] for k in arg_keys if k in obj), {})
    if isinstance(args, str):
        ok, args = load_json(args) if args.strip() else (True, {})
        if not ok:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(name, json.dumps(args, ensure_ascii=False))


def call_arguments(call: ToolCall) -> Any:
    """The arguments as a JSON value for re-rendering (the raw string when it is not JSON)."""
    ok, value = load_json(call.arguments)
    return value if ok else call.arguments


# ---- streaming ------------------------------------------------------------------------------------

Step = Union[tuple[list[Union[str, ToolCall]], int], None]


class StreamParser:
    """Incremental tool-call parser; families implement `_step`.

        p = hermes.StreamParser(tools)
        for piece in engine_text_deltas:
            send(p.feed(piece))
        send(p.finish())

    Content is verbatim, except that whitespace touching a tool call is dropped (and so held
    back until the next non-space content shows it was not); with no calls at all the text
    comes back unchanged.
    """

    def __init__(self, tools: list[dict] | None):
        self.names = tool_names(tools)
        self.state = "start"  # family-specific position in the message
        self._buf = ""
        self._ws = ""  # trailing whitespace of content, held back
        self._after_call = False
        self._calls = 0
        self._miss: tuple[int, int] | None = None  # (pos, buffer length) of the last failed decode

    def _decode(self, buf: str, pos: int) -> tuple[Any, int] | None:
        """decode_at, skipped while no closing bracket arrived since it last failed at `pos`:
        keeps a long JSON reply from being re-parsed on every token."""
        if self._miss and self._miss[0] == pos and "}" not in buf[self._miss[1]:] and "]" not in buf[self._miss[1]:]:
            return None
        found = decode_at(buf, pos)
        self._miss = None if found else (pos, len(buf))
        return found

    def _step(self, buf: str, final: bool) -> Step:
        """Settle a prefix of `buf`: ([text or ToolCall, ...], chars used), or None when more text
        is needed. With final=True it must settle everything eventually. May change self.state."""
        raise NotImplementedError

    def _json_opening(self, buf: str, final: bool) -> tuple[int | None, Step]:
        """For a reply that may open with bare JSON: (index of its "{", None), or (None, the step to
        take): wait while only whitespace has come, or go on in state "text" when it opens otherwise."""
        pos = len(buf) - len(buf.lstrip())
        if pos == len(buf):
            return None, (([buf], len(buf)) if final else None)
        if buf[pos] != "{":
            self.state = "text"
            return None, ([], 0)
        return pos, None

    def feed(self, delta: str) -> list[Delta]:
        self._buf += delta
        return self._drain(final=False)

    def finish(self) -> list[Delta]:
        out = self._drain(final=True)
        if self._ws and not self._calls:
            out.append(ContentDelta(self._ws))
        self._ws = ""
        return out

    def _drain(self, final: bool) -> list[Delta]:
        out: list[Delta] = []
        while self._buf:
            step = self._step(self._buf, final)
            if step is None:
                break
            items, used = step
            if used:
                self._buf, self._miss = self._buf[used:], None
            for item in items:
                if isinstance(item, ToolCall):
                    self._emit_call(item, out)
                elif item:
                    self._emit_text(item, out)
        return out

    def _emit_text(self, text: str, out: list[Delta]) -> None:
        if self._after_call:
            text = text.lstrip()
            if not text:
                return
            self._after_call = False
        body = text.rstrip()
        if body:
            out.append(ContentDelta(self._ws + body))
            self._ws = text[len(body):]
        else:
            self._ws += text

    def _emit_call(self, call: ToolCall, out: list[Delta]) -> None:
        self._ws, self._after_call = "", True
        out.append(ToolCallDelta(self._calls, call.id, call.name, ""))
        out.append(ToolCallDelta(self._calls, None, None, call.arguments))
        self._calls += 1


def assemble(deltas: list[Delta]) -> ParsedMessage:
    """Fold deltas into the final message (what a client rebuilds from a stream)."""
    text = "".join(d.text for d in deltas if isinstance(d, ContentDelta))
    calls: dict[int, ToolCall] = {}
    for d in deltas:
        if isinstance(d, ToolCallDelta):
            if d.index not in calls:
                calls[d.index] = ToolCall(d.name or "", "", d.id or new_call_id())
            calls[d.index].arguments += d.arguments
    ordered = [calls[i] for i in sorted(calls)]
    return ParsedMessage(text if (text or not ordered) else None, ordered)


def parse_with(parser: StreamParser, text: str) -> ParsedMessage:
    return assemble(parser.feed(text) + parser.finish())


# ---- grammars (llguidance Lark) -------------------------------------------------------------------

# compact, deterministic JSON inside %json: the separators json.dumps writes, no other whitespace,
# so a small model cannot wander off into spaces and newlines; `lenient` skips unknown keywords
JSON_FORMAT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": ", "lenient": True}


def args_json(parameters: dict) -> str:
    """`%json{...}` for a tool's arguments: its parameters schema with every object closed to the
    properties it declares (unless it says `additionalProperties` itself), so a model cannot copy the
    schema's own keys ("type", "description") into the arguments."""
    return lark_json(closed_objects(parameters), JSON_FORMAT)


def lark_literal(text: str, special_ids: Mapping[str, int] | None = None) -> str:
    """A Lark string literal, or `<[id]>` when `text` is a special token of the model's tokenizer
    (special tokens never match a string literal in llguidance)."""
    if special_ids and text in special_ids:
        return f"<[{int(special_ids[text])}]>"
    return json.dumps(text, ensure_ascii=False)


def grammar_tools(tools: list[dict], tool_choice: Any) -> list[dict]:
    """The normalized tools a grammar may call: all for "required", one for a named choice."""
    specs = normalize_tools(tools)
    if not specs:
        raise ValueError("a tool-call grammar needs a non-empty tools list")
    if tool_choice == "required":
        return specs
    if tool_choice in ("auto", "none"):
        raise ValueError(f"tool_choice {tool_choice!r} needs no grammar; only 'required' or a function name")
    name = chosen_name(tool_choice)
    picked = [t for t in specs if t["name"] == name]
    if not picked:
        raise ValueError(f"tool_choice.function.name {name!r} is not one of the tools {[t['name'] for t in specs]}")
    return picked


def json_call_rules(specs: list[dict], args_key: str, prefix: str = "fn") -> tuple[str, list[str]]:
    """Rules `fn_i: '{"name": "N", "<args_key>": ' %json{schema} '}'`, one per tool.

    Returns the alternation ("fn_0 | fn_1") and the rule lines.
    """
    rules = []
    for i, spec in enumerate(specs):
        head = lark_literal(f'{{"name": "{spec["name"]}", "{args_key}": ')
        rules.append(f"{prefix}_{i}: {head} {args_json(spec['parameters'])} \"}}\"")
    return " | ".join(f"{prefix}_{i}" for i in range(len(specs))), rules


def repeat(item: str, sep: str, parallel: bool) -> str:
    """`item` once, or one or more separated by the literal `sep`."""
    return f"{item} ({lark_literal(sep)} {item})*" if parallel else item


# ---- prompt messages --------------------------------------------------------------------------

def content_text(content: Any) -> str:
    """OpenAI content (None, a string, or a list of parts) as plain text."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, dict) and part.get("type") == "text":
                parts.append(str(part.get("text", "")))
            elif isinstance(part, str):
                parts.append(part)
        return "".join(parts)
    raise ValueError(f"message content must be a string or a list of parts, got {type(content).__name__}")


def message_calls(message: dict) -> list[ToolCall]:
    """An assistant message's OpenAI tool_calls as ToolCalls."""
    out = []
    for i, c in enumerate(message.get("tool_calls") or []):
        fn = c.get("function") if isinstance(c, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise ValueError(f"tool_calls[{i}].function.name is required")
        args = fn.get("arguments", "{}")
        if not isinstance(args, str):
            args = json.dumps(args, ensure_ascii=False)
        out.append(ToolCall(fn["name"], args, c.get("id") or new_call_id()))
    return out


def native_messages(messages: list[dict]) -> list[dict]:
    """Messages for a template that renders tool_calls itself: flat string content, None -> "",
    and call arguments as objects (HF templates `tojson` them; a JSON string would be quoted twice)."""
    out = []
    for m in messages:
        m = dict(m)
        m["content"] = content_text(m.get("content"))
        if m.get("tool_calls"):
            calls = []
            for c in m["tool_calls"]:
                c = dict(c)
                fn = dict(c.get("function") or {})
                if isinstance(fn.get("arguments"), str):
                    ok, value = load_json(fn["arguments"])
                    if ok:
                        fn["arguments"] = value
                c["function"] = fn
                calls.append(c)
            m["tool_calls"] = calls
        out.append(m)
    return out
