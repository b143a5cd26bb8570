"""The structured-output request fields of the peers, read into one GuidedDecoding (one grammar engine).

    OpenAI:     response_format {"type": "json_schema" | "json_object"}
    vLLM:       structured_outputs {"json" | "regex" | "choice" | "grammar" | "json_object"},
                guided_json, guided_regex, guided_choice, guided_grammar
    llama.cpp:  grammar (GBNF), json_schema

A grammar (guided_grammar, structured_outputs.grammar, grammar) may be llguidance Lark or GBNF
(`root ::= ...`, as llama.cpp and vLLM's xgrammar take it); GBNF is converted to Lark. At most one
of these fields per request: two are a 400 naming both. A bad spec is a 400 naming its field,
checked here before the request reaches the engine.

A JSON schema's objects take only the properties they list unless they say `additionalProperties`
(llama.cpp's and xgrammar's reading): open, a small model copies the schema, or keeps inventing keys,
until max_tokens (`hearth bench structured`, bench/RESULTS.md).
"""

from __future__ import annotations

import json
from typing import Any

from hearth.runtime.errors import InvalidRequestError
from hearth.runtime.guided import grammar_text
from hearth.runtime.schema_check import closed_objects
from hearth.runtime.types import GuidedDecoding

from .errors import invalid

MAX_SPEC_CHARS = 100_000
"""The longest grammar, regex or JSON schema (as JSON text) one request may send."""
MAX_CHOICES = 1024
"""The most strings a guided_choice / structured_outputs.choice may list."""

FIELDS = ("response_format", "structured_outputs", "guided_json", "guided_regex", "guided_choice", "guided_grammar",
          "grammar", "json_schema")
_STRUCTURED_KEYS = {"json": "json", "regex": "regex", "choice": "choice", "grammar": "grammar",
                    "json_object": "json_object"}


def request_guided(body: Any) -> tuple[GuidedDecoding | None, str | None]:
    """The request's grammar and the field it came from, or (None, None); 400 on a conflict or a bad spec."""
    present = [f for f in FIELDS if _present(f, getattr(body, f, None))]
    if len(present) > 1:
        raise invalid(f"{present[0]} and {present[1]} both constrain the output; send only one of them",
                      present[1])
    if not present:
        return None, None
    field = present[0]
    value = getattr(body, field)
    if field == "response_format":
        guided = _response_format(value)
    elif field == "structured_outputs":
        guided, field = _structured(value)
    else:
        kind = {"guided_json": "json", "json_schema": "json", "guided_regex": "regex", "guided_choice": "choice",
                "guided_grammar": "grammar", "grammar": "grammar"}[field]
        guided = _guided(kind, value, field)
    _check(guided, field)
    return guided, field


def _present(field: str, value: Any) -> bool:
    if value is None:
        return False
    if field == "response_format":
        return value.type != "text"
    if field == "structured_outputs":
        return any(value.get(k) not in (None, False) for k in _STRUCTURED_KEYS)
    return True


def _response_format(rf: Any) -> GuidedDecoding:
    if rf.type == "json_object":
        return GuidedDecoding("json_object", None)
    spec = rf.json_schema
    if spec is None or spec.schema_ is None:
        raise invalid("response_format json_schema needs json_schema.schema", "response_format")
    # an object takes no properties beyond those it lists, unless it says so (as llama.cpp's and xgrammar's
    # grammars read a schema); OpenAI's strict mode also closes objects that list none
    return GuidedDecoding("json_schema", closed_objects(spec.schema_, bare=bool(spec.strict)))


def _structured(so: dict) -> tuple[GuidedDecoding, str]:
    keys = [k for k in _STRUCTURED_KEYS if so.get(k) not in (None, False)]
    if len(keys) > 1:
        raise invalid(f"structured_outputs.{keys[0]} and structured_outputs.{keys[1]} both constrain the output; "
                      "send only one of them", f"structured_outputs.{keys[1]}")
    field = f"structured_outputs.{keys[0]}"
    if keys[0] == "json_object":
        if so["json_object"] is not True:
            raise invalid("structured_outputs.json_object must be true", field)
        return GuidedDecoding("json_object", None), field
    return _guided(keys[0], so[keys[0]], field), field


def _guided(kind: str, value: Any, field: str) -> GuidedDecoding:
    try:
        if kind == "json":
            if isinstance(value, str):
                _cap(value, field)
                try:
                    value = json.loads(value)
                except ValueError as e:
                    raise invalid(f"{field} is not valid JSON: {e}", field) from None
            if not isinstance(value, dict):
                raise invalid(f"{field} must be a JSON schema object", field)
            _cap(json.dumps(value), field)
            return GuidedDecoding("json_schema", closed_objects(value))
        if kind == "choice":
            if not isinstance(value, list) or not value or not all(isinstance(c, str) and c for c in value):
                raise invalid(f"{field} must be a non-empty list of non-empty strings", field)
            if len(value) > MAX_CHOICES:
                raise invalid(f"{field} lists {len(value)} choices; at most {MAX_CHOICES} are allowed", field)
            _cap("".join(value), field)
            return GuidedDecoding("lark", "start: " + " | ".join(json.dumps(c, ensure_ascii=False) for c in value))
        if not isinstance(value, str) or not value.strip():
            raise invalid(f"{field} must be a non-empty string", field)
        _cap(value, field)
        if kind == "regex":
            return GuidedDecoding("regex", value)
        return GuidedDecoding("lark", _to_lark(value, field))
    except InvalidRequestError as e:
        raise invalid(str(e), field) from None


def _to_lark(grammar: str, field: str) -> str:
    from llguidance.gbnf_to_lark import any_to_lark

    try:
        return any_to_lark(grammar)
    except Exception as e:  # noqa: BLE001 - the converter raises its own errors and plain ones on bad input
        raise invalid(f"{field} is not a valid grammar (Lark or GBNF): {e}", field) from None


def _cap(text: str, field: str) -> None:
    if len(text) > MAX_SPEC_CHARS:
        raise invalid(f"{field} is {len(text)} characters long; at most {MAX_SPEC_CHARS} are allowed", field)


def _check(guided: GuidedDecoding, field: str) -> None:
    """Refuse a grammar llguidance cannot build (without a tokenizer: the engine compiles it later)."""
    from llguidance import LLMatcher

    try:
        is_error, messages = LLMatcher.validate_grammar_with_warnings(grammar_text(guided))
    except InvalidRequestError as e:
        raise invalid(f"{field}: {e}", field) from None
    if is_error:
        raise invalid(f"{field} is not a valid {guided.kind}: {' '.join(messages).strip()[:500]}", field)
