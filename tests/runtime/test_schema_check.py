"""A json_schema no finite JSON value satisfies is a 400 naming the problem, before any output (it used to
give 200 with '' or '{"'); legitimate recursive schemas still compile and generate."""

from __future__ import annotations

import json

import jsonschema
import pytest
from tests.conftest import prompt_request

from hearth.runtime import Engine, GuidedDecoding, InvalidRequestError, SamplingParams
from hearth.runtime.backends.transformers import TransformersBackend
from hearth.runtime.guided import compiler_for
from hearth.runtime.schema_check import check_schema_has_values

TREE = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 4},
                                         "children": {"type": "array", "items": {"$ref": "#"}, "maxItems": 2}},
        "required": ["name", "children"], "additionalProperties": False}
UNSATISFIABLE = {
    "$ref cycle": ({"$defs": {"a": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"}, "$ref cycle with no base case"),
    "required self": ({"type": "object", "properties": {"x": {"$ref": "#"}}, "required": ["x"]},
                      "required property 'x'"),
    "mutual required": ({"$defs": {"a": {"type": "object", "properties": {"b": {"$ref": "#/$defs/b"}},
                                         "required": ["b"]},
                                   "b": {"type": "object", "properties": {"a": {"$ref": "#/$defs/a"}},
                                         "required": ["a"]}}, "$ref": "#/$defs/a"}, "required property 'b'"),
    "non-empty array of itself": ({"type": "array", "items": {"$ref": "#"}, "minItems": 1}, "array item 0"),
    "required false": ({"type": "object", "properties": {"x": False}, "required": ["x"]}, "schema `false`"),
}
SATISFIABLE = {
    "tree with an empty children list": TREE,
    "nullable self": {"type": ["object", "null"], "properties": {"x": {"$ref": "#"}}, "required": ["x"]},
    "linked list ending in null": {"$defs": {"node": {"type": "object", "properties": {
        "v": {"type": "integer"}, "next": {"anyOf": [{"$ref": "#/$defs/node"}, {"type": "null"}]}},
        "required": ["v", "next"]}}, "$ref": "#/$defs/node"},
    "optional self": {"type": "object", "properties": {"x": {"$ref": "#"}}},
    "no type (a number is valid)": {"properties": {"x": {"$ref": "#"}}, "required": ["x"]},
    "remote ref (left to llguidance)": {"$ref": "https://example.invalid/schema.json"},
}


@pytest.mark.parametrize("schema,problem", list(UNSATISFIABLE.values()), ids=list(UNSATISFIABLE))
def test_unsatisfiable_schemas_are_refused_naming_the_problem(schema, problem):
    with pytest.raises(InvalidRequestError, match="no finite JSON value") as e:
        check_schema_has_values(schema)
    assert e.value.param == "response_format" and problem in str(e.value)


@pytest.mark.parametrize("schema", list(SATISFIABLE.values()), ids=list(SATISFIABLE))
def test_satisfiable_recursive_schemas_pass(schema):
    check_schema_has_values(schema)


def test_huge_schemas_are_refused():
    wide = {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(30_000)}}
    with pytest.raises(InvalidRequestError, match="subschemas"):
        check_schema_has_values(wide)


@pytest.fixture(scope="module")
def engine(tiny_llama):
    eng = Engine(TransformersBackend(tiny_llama, dtype="float32", device="cpu", kv_cache_gb=0.05))
    yield eng
    eng.shutdown()


def test_engine_refuses_before_output_and_still_serves_a_tree(engine):
    for schema, problem in UNSATISFIABLE.values():
        with pytest.raises(InvalidRequestError, match="no finite JSON value") as e:
            engine.generate_sync(prompt_request(engine, prompt="hi", params=SamplingParams(
                max_tokens=8, guided={"kind": "json_schema", "spec": schema})))
        assert e.value.param == "response_format" and problem in str(e.value)
        with pytest.raises(InvalidRequestError):
            compiler_for(engine.tokenizer).check(GuidedDecoding("json_schema", schema))
    assert engine.stats().running == 0
    res = engine.generate_sync(prompt_request(engine, prompt="A tree:", params=SamplingParams(
        max_tokens=200, temperature=0.0, guided={"kind": "json_schema", "spec": TREE})))[0]
    assert res.finish_reason in ("stop", "length")
    if res.finish_reason == "stop":
        jsonschema.validate(json.loads(res.text), TREE)
    assert res.text.startswith('{"name":')


# ---- closed_objects: undeclared keys are not allowed unless the schema says so ----------------------
def test_closed_objects_closes_nested_objects_and_keeps_what_the_user_wrote():
    from hearth.runtime.schema_check import closed_objects

    schema = {"type": "object", "properties": {
        "properties": {"type": "object", "properties": {"a": {"type": "integer"}}},  # a property named so
        "list": {"type": "array", "items": {"type": "object", "properties": {"b": {}}}},
        "open": {"type": "object", "properties": {"c": {}}, "additionalProperties": True},
        "typed": {"type": "object", "properties": {}, "additionalProperties": {"type": "object", "properties": {"d": {}}}},
        "any": {"type": "object"},
        "pick": {"anyOf": [{"properties": {"e": {}}}, {"type": "string"}]},
        "enum": {"enum": [{"properties": {}}]}},
        "$defs": {"x": {"properties": {"f": {}}}}}
    out = closed_objects(schema)
    props = out["properties"]
    assert out["additionalProperties"] is False
    assert props["properties"]["additionalProperties"] is False and "additionalProperties" not in props["properties"]["properties"]
    assert props["list"]["items"]["additionalProperties"] is False
    assert props["open"]["additionalProperties"] is True
    assert props["typed"]["additionalProperties"] == {"type": "object", "properties": {"d": {}}, "additionalProperties": False}
    assert "additionalProperties" not in props["any"]  # no properties listed: any object, unless bare
    assert closed_objects(schema, bare=True)["properties"]["any"]["additionalProperties"] is False
    assert props["pick"]["anyOf"][0]["additionalProperties"] is False and props["pick"]["anyOf"][1] == {"type": "string"}
    assert props["enum"] == {"enum": [{"properties": {}}]}  # values are not schemas
    assert out["$defs"]["x"]["additionalProperties"] is False
    assert "additionalProperties" not in schema  # the caller's schema is not changed
