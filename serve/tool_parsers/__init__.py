"""Tool-call parsing and grammars, one module per model family.

    from hearth.serve import tool_parsers
    family = tool_parsers.get_parser(tool_parsers.detect_family(tokenizer.chat_template))
    messages = family.prepare_messages(messages, tools, tool_choice)
    grammar = family.grammar(tools, "required", parallel_tool_calls=True,
                             special_ids=tool_parsers.special_ids(family, lltokenizer))
    parsed = family.parse(text, tools)              # ParsedMessage(content, tool_calls)
    stream = family.StreamParser(tools)             # .feed(delta) / .finish() -> deltas

Every family module exports: MARKERS, parse, StreamParser, render_call, render_calls, grammar,
prepare_messages; `generic` (family "json") also system_prompt.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from . import generic, hermes, llama3, mistral
from .base import (
    ContentDelta,
    ParsedMessage,
    ToolCall,
    ToolCallDelta,
    assemble,
    new_call_id,
    normalize_tool_choice,
    normalize_tools,
)

FAMILIES: dict[str, ModuleType] = {"hermes": hermes, "llama3": llama3, "mistral": mistral, "json": generic}

__all__ = ["FAMILIES", "ContentDelta", "ParsedMessage", "ToolCall", "ToolCallDelta", "assemble",
           "detect_family", "get_parser", "new_call_id", "normalize_tool_choice", "normalize_tools",
           "special_ids"]


def get_parser(name: str) -> ModuleType:
    """The family module for `name`; ValueError names the supported families."""
    try:
        return FAMILIES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown tool-call family {name!r}; supported: {', '.join(FAMILIES)}") from None


def detect_family(chat_template: str | None) -> str:
    """Guess the family from the chat template text; "json" when it shows no tool format."""
    t = chat_template or ""
    if "[TOOL_CALLS]" in t:
        return "mistral"
    if "<tool_call>" in t:
        return "hermes"
    if "<|python_tag|>" in t or ('"parameters"' in t and ("<|eom_id|>" in t or "ipython" in t)):
        return "llama3"
    return "json"


def special_ids(family: ModuleType, lltokenizer: Any) -> dict[str, int]:
    """{marker: token id} for the family's MARKERS that are special tokens to llguidance.

    `lltokenizer` is the llguidance.LLTokenizer the engine masks with. llguidance treats every
    added token as special (Qwen's non-special `<tool_call>` too, and llama.cpp's `<...>`
    user-defined tokens) and never matches one against a string literal, so the grammar must
    name them by id (`<[id]>`): pass the result as grammar(..., special_ids=...).
    """
    out = {}
    for marker in family.MARKERS:
        ids = lltokenizer.tokenize_str(marker)
        if len(ids) == 1 and lltokenizer.is_special_token(ids[0]):
            out[marker] = ids[0]
    return out
