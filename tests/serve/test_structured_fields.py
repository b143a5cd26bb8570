"""Structured output as the peers' clients ask for it (vLLM's structured_outputs / guided_*, llama.cpp's
grammar and json_schema), through the official openai client's extra_body against the default model;
and tool arguments that take no undeclared keys. One grammar engine behind every field."""

from __future__ import annotations

import json
import re

import jsonschema
import openai
import pytest

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m-instruct"
ASK = [{"role": "user", "content": "Is the sky blue? Answer."}]
FLAG = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}, "sure": {"type": "boolean"}},
        "required": ["answer", "sure"], "additionalProperties": False}
GBNF = 'root ::= "code-" [0-9] [0-9] [0-9]'
LARK = 'start: "code-" /[0-9]{3}/'
CODE = re.compile(r"code-[0-9]{3}")

# (extra_body, what the output must satisfy)
CASES = [
    ({"guided_json": FLAG}, FLAG),
    ({"guided_json": json.dumps(FLAG)}, FLAG),
    ({"json_schema": FLAG}, FLAG),
    ({"structured_outputs": {"json": FLAG}}, FLAG),
    ({"guided_regex": r"code-\d{3}"}, CODE),
    ({"structured_outputs": {"regex": r"code-\d{3}"}}, CODE),
    ({"guided_choice": ["yes", "no", "maybe so"]}, {"yes", "no", "maybe so"}),
    ({"structured_outputs": {"choice": ["yes", "no"]}}, {"yes", "no"}),
    ({"grammar": GBNF}, CODE),
    ({"guided_grammar": LARK}, CODE),
    ({"guided_grammar": GBNF}, CODE),  # vLLM's xgrammar takes GBNF-style EBNF too
    ({"structured_outputs": {"grammar": LARK}}, CODE),
]


def check(text: str, want) -> None:
    if isinstance(want, dict):
        jsonschema.validate(json.loads(text), want)
    elif isinstance(want, set):
        assert text in want, text
    else:
        assert want.fullmatch(text), text


@pytest.mark.parametrize("extra", [c[0] for c in CASES], ids=lambda e: next(iter(e)))
def test_each_field_constrains_chat(served, extra):
    want = dict((json.dumps(e, sort_keys=True), w) for e, w in CASES)[json.dumps(extra, sort_keys=True)]
    r = served.client().chat.completions.create(model=MODEL, messages=ASK, temperature=0, max_tokens=40,
                                                extra_body=extra)
    ch = r.choices[0]
    assert ch.finish_reason == "stop", ch.message.content
    check(ch.message.content, want)


def test_fields_constrain_completions(served):
    c = served.client()
    for extra, want in ((CASES[0][0], FLAG), ({"grammar": GBNF}, CODE), ({"guided_regex": r"code-\d{3}"}, CODE),
                        ({"structured_outputs": {"choice": ["yes", "no"]}}, {"yes", "no"})):
        r = c.completions.create(model=MODEL, prompt="Q: Is the sky blue?\nA:", temperature=0, max_tokens=40,
                                 extra_body=extra)
        assert r.choices[0].finish_reason == "stop", (extra, r.choices[0].text)
        check(r.choices[0].text, want)


@pytest.mark.parametrize("extra, param", [
    ({"guided_regex": "a+", "grammar": GBNF}, "grammar"),
    ({"guided_json": FLAG, "response_format": {"type": "json_object"}}, "guided_json"),
    ({"json_schema": FLAG, "guided_choice": ["a"]}, "json_schema"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs.choice"),
    ({"grammar": "root ::= undefined"}, "grammar"),
    ({"guided_grammar": "start: ("}, "guided_grammar"),
    ({"guided_regex": "(("}, "guided_regex"),
    ({"guided_json": {"type": 5}}, "guided_json"),
    ({"guided_json": "{not json"}, "guided_json"),
    ({"guided_choice": []}, "guided_choice"),
    ({"structured_outputs": {"grammar": "start: nope"}}, "structured_outputs.grammar"),
])
def test_conflicts_and_bad_grammars_are_400_naming_the_field(served, extra, param):
    c = served.client()
    for call in (lambda: c.chat.completions.create(model=MODEL, messages=ASK, max_tokens=5, extra_body=extra),
                 lambda: c.completions.create(model=MODEL, prompt="Hi", max_tokens=5, extra_body=extra)):
        with pytest.raises(openai.BadRequestError) as e:
            call()
        assert e.value.param == param, e.value.message
        both = [f for f in ("guided_regex", "grammar", "guided_json", "response_format", "json_schema",
                            "guided_choice") if f in extra]
        if len(both) == 2:  # a conflict names both fields
            assert all(f in e.value.message for f in both), e.value.message


def test_forced_tool_call_takes_only_declared_arguments(served):
    tool = {"type": "function", "function": {"name": "square", "description": "Square a number.", "parameters": {
        "type": "object", "properties": {"input": {"type": "integer", "minimum": 0, "maximum": 100}},
        "required": ["input"]}}}
    c = served.client()
    for seed in range(3):
        r = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "What is 3 squared?"}],
                                      tools=[tool], tool_choice={"type": "function", "function": {"name": "square"}},
                                      parallel_tool_calls=False, temperature=1.0, seed=seed, max_tokens=60)
        assert r.choices[0].finish_reason == "tool_calls", r.choices[0].message.content
        call = r.choices[0].message.tool_calls[0]
        assert set(json.loads(call.function.arguments)) == {"input"}, call.function.arguments
