"""Structured output as LangChain's `with_structured_output` asks for it (issue 16): a JSON schema in
response_format, not strict, no max_tokens worth speaking of. The objects of such a schema take only the
properties they list (as llama.cpp's and xgrammar's grammars read it), and the default model ends its JSON."""

from __future__ import annotations

import json

import jsonschema
import pytest

from hearth.serve.guided_fields import request_guided
from hearth.serve.protocol import ChatCompletionRequest

MODEL = "smollm2-135m-instruct"
# LangChain's standard-test Joke, as langchain-openai sends a pydantic model with method="json_schema"
JOKE = {"type": "object", "properties": {"setup": {"description": "question to set up a joke", "type": "string"},
                                         "punchline": {"description": "answer to resolve the joke", "type": "string"}},
        "required": ["setup", "punchline"]}
RESPONSE_FORMAT = {"type": "json_schema", "json_schema": {"name": "Joke", "description": "Joke to tell user.",
                                                          "schema": JOKE}}


def guided_spec(**fields):
    body = ChatCompletionRequest(model=MODEL, messages=[{"role": "user", "content": "hi"}], **fields)
    guided, _ = request_guided(body)
    return guided.spec


def test_listed_properties_only_unless_the_schema_says_otherwise():
    nested = {"type": "object", "properties": {"who": {"type": "object", "properties": {"name": {"type": "string"}}},
                                               "meta": {"type": "object"},
                                               "extra": {"type": "object", "properties": {},
                                                         "additionalProperties": {"type": "integer"}}}}
    for fields in ({"response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": nested}}},
                   {"guided_json": nested}, {"json_schema": nested}, {"structured_outputs": {"json": nested}}):
        spec = guided_spec(**fields)
        assert spec["additionalProperties"] is False, fields
        assert spec["properties"]["who"]["additionalProperties"] is False, fields
        assert "additionalProperties" not in spec["properties"]["meta"], fields  # lists none: any object
        assert spec["properties"]["extra"]["additionalProperties"] == {"type": "integer"}, fields
    strict = guided_spec(response_format={"type": "json_schema",
                                          "json_schema": {"name": "n", "schema": nested, "strict": True}})
    assert strict["properties"]["meta"]["additionalProperties"] is False  # OpenAI's strict: {} only


@pytest.mark.slow
def test_langchain_joke_ends_valid_within_a_small_max_tokens(served):
    c = served.client()
    for seed in range(4):
        r = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Tell me a joke about cats."}],
                                      response_format=RESPONSE_FORMAT, temperature=1.0, seed=seed, max_tokens=120)
        ch = r.choices[0]
        assert ch.finish_reason == "stop", (seed, ch.message.content)
        joke = json.loads(ch.message.content)
        jsonschema.validate(joke, JOKE)
        assert set(joke) == {"setup", "punchline"}, (seed, ch.message.content)
