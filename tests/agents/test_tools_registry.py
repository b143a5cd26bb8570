"""Tool schemas from type hints, argument validation, the registry's error results, plugins."""

from __future__ import annotations

import asyncio
import enum
import importlib.metadata
import json
import logging
import time
from typing import Annotated, Literal, Optional

import pytest
from pydantic import BaseModel, Field

from hearth.agents.tools import (ArgumentError, Tool, ToolRegistry, ToolResult, default_registry, function_schema,
                                 tool, validate_arguments)
from hearth.agents.types import AgentInputError


class Color(enum.Enum):
    RED = "red"
    GREEN = "green"


class Point(BaseModel):
    x: float
    y: float = 0.0
    label: str = Field("", description="a name for the point")


def everything(text: str, count: int, ratio: float, flag: bool, mode: Literal["fast", "slow"], color: Color,
               tags: list[str], matrix: list[list[int]], meta: dict, scores: dict[str, float], point: Point,
               maybe: Optional[int], note: str | None = None, limit: int = 10,
               unit: Annotated[str, "the unit of measure"] = "m") -> str:
    """Do everything at once.

    A second paragraph of the summary.

    Args:
        text: the text to use
        count (int): how many times;
            continued on a second line
        ratio: a fraction
        color: which color

    Returns:
        a string
    """
    return json.dumps({"text": text, "count": count, "ratio": ratio, "flag": flag, "mode": mode,
                       "color": color.name, "tags": tags, "matrix": matrix, "meta": meta, "scores": scores,
                       "point": [type(point).__name__, point.x, point.y], "maybe": maybe, "note": note,
                       "limit": limit, "unit": unit})


GOOD_ARGS = {"text": "hi", "count": 2, "ratio": 0.5, "flag": True, "mode": "fast", "color": "green",
             "tags": ["a"], "matrix": [[1, 2]], "meta": {"k": 1}, "scores": {"a": 1.5}, "point": {"x": 1}}


def test_schema_from_every_supported_hint():
    description, p = function_schema(everything)
    assert description == "Do everything at once.\n\nA second paragraph of the summary."
    props = p["properties"]
    assert p["type"] == "object" and p["additionalProperties"] is False
    assert props["text"] == {"type": "string", "description": "the text to use"}
    assert props["count"] == {"type": "integer", "description": "how many times; continued on a second line"}
    assert props["ratio"]["type"] == "number" and props["flag"] == {"type": "boolean"}
    assert props["mode"] == {"type": "string", "enum": ["fast", "slow"]}
    assert props["color"] == {"type": "string", "enum": ["red", "green"], "description": "which color"}
    assert props["tags"] == {"type": "array", "items": {"type": "string"}}
    assert props["matrix"] == {"type": "array", "items": {"type": "array", "items": {"type": "integer"}}}
    assert props["meta"] == {"type": "object"}
    assert props["scores"] == {"type": "object", "additionalProperties": {"type": "number"}}
    assert props["point"]["properties"]["x"]["type"] == "number"
    assert props["point"]["required"] == ["x"]
    assert props["point"]["properties"]["label"]["description"] == "a name for the point"
    assert props["maybe"] == {"type": ["integer", "null"]}
    assert props["note"] == {"type": ["string", "null"], "default": None}
    assert props["limit"] == {"type": "integer", "default": 10}
    assert props["unit"] == {"type": "string", "description": "the unit of measure", "default": "m"}
    # Optional without a default and anything with a default are not required
    assert p["required"] == ["text", "count", "ratio", "flag", "mode", "color", "tags", "matrix", "meta",
                             "scores", "point"]


class Inner(BaseModel):
    v: int


class Outer(BaseModel):
    inner: Inner
    items: list[Inner] = []


def test_nested_model_definitions_are_hoisted_to_the_root():
    def f(o: Outer) -> str:
        return str(o.inner.v + len(o.items))

    _, p = function_schema(f)
    assert "Inner" in p["$defs"] and p["properties"]["o"]["properties"]["inner"] == {"$ref": "#/$defs/Inner"}
    # the validator follows the $ref, and the tool gets real model instances
    assert validate_arguments(p, {"o": {"inner": {"v": "2"}}}) == {"o": {"inner": {"v": 2}}}
    with pytest.raises(ArgumentError, match="'o.inner.v' must be an integer"):
        validate_arguments(p, {"o": {"inner": {"v": "two"}}})
    res = asyncio.run(ToolRegistry([f]).call("f", {"o": {"inner": {"v": 3}, "items": [{"v": 1}]}}))
    assert res.ok and res.content == "4"


class Opaque:
    pass


def test_varargs_and_unknown_types_are_refused_at_registration():
    def star(*xs: int) -> int:
        return sum(xs)

    with pytest.raises(TypeError, match="named arguments"):
        tool(star)

    def opaque(o: Opaque) -> str:
        return ""

    with pytest.raises(TypeError, match="parameter 'o'"):
        tool(opaque)


@pytest.mark.parametrize("args, expected", [
    ({"n": "3"}, {"n": 3}), ({"n": 3.0}, {"n": 3}), ({"x": "2.5", "n": 1}, {"x": 2.5, "n": 1}),
    ({"n": 1, "on": "true"}, {"n": 1, "on": True}), ({"n": 1, "s": 12}, {"n": 1, "s": "12"}),
])
def test_safe_coercions(args, expected):
    def f(n: int, x: float = 0.0, on: bool = False, s: str = "") -> str:
        return ""

    assert validate_arguments(function_schema(f)[1], args) == expected


@pytest.mark.parametrize("args, message", [
    ({}, "missing required argument 'n'"),
    ({"n": 1, "zzz": 2}, "unexpected argument 'zzz'; the tool takes: n, x, on, s"),
    ({"n": "three"}, "argument 'n' must be an integer; got 'three'"),
    ({"n": 2.5}, "argument 'n' must be an integer; got 2.5"),
    ({"n": True}, "argument 'n' must be an integer; got True"),
    ({"n": 1, "on": "yes"}, "argument 'on' must be true or false"),
    ({"n": 1, "s": [1]}, "argument 's' must be a string"),
])
def test_invalid_arguments_name_the_problem(args, message):
    def f(n: int, x: float = 0.0, on: bool = False, s: str = "") -> str:
        return ""

    with pytest.raises(ArgumentError) as e:
        validate_arguments(function_schema(f)[1], args)
    assert message in str(e.value)


async def test_call_converts_enums_models_and_fills_optional():
    reg = ToolRegistry([everything])
    res = await reg.call("everything", json.dumps(GOOD_ARGS))
    assert res.ok, res.content
    out = json.loads(res.content)
    assert out["color"] == "GREEN" and out["point"] == ["Point", 1.0, 0.0]
    assert out["maybe"] is None and out["limit"] == 10 and out["unit"] == "m"
    bad = await reg.call("everything", {**GOOD_ARGS, "color": "blue"})
    assert not bad.ok and "'color' must be one of 'red', 'green'; got 'blue'" in bad.content


async def test_call_errors_come_back_as_results():
    def boom(x: int) -> int:
        """Always fails."""
        raise RuntimeError(f"broken by {x}")

    async def slow() -> str:
        await asyncio.sleep(5)
        return "late"

    reg = ToolRegistry([boom])
    reg.register(Tool("slow", "sleeps", {"type": "object", "properties": {}}, slow, timeout_s=0.2))
    cases = {
        ("nope", "{}"): "error: unknown tool 'nope'; the available tools are: boom, slow",
        ("boom", "{not json"): "error: bad arguments for boom: the arguments are not valid JSON",
        ("boom", "[1, 2]"): "error: bad arguments for boom: the arguments must be a JSON object",
        ("boom", '{"x": 1}'): "error: boom failed: RuntimeError: broken by 1",
        ("slow", ""): "error: slow timed out after 0.2 s",
    }
    for (name, args), expected in cases.items():
        t0 = time.monotonic()
        res = await reg.call(name, args)
        assert isinstance(res, ToolResult) and not res.ok and res.name == name
        assert res.content.startswith(expected), res.content
        assert time.monotonic() - t0 < 1.0


async def test_results_are_rendered_and_capped():
    def data() -> dict:
        return {"a": [1, 2], "b": "ü"}

    def big() -> str:
        return "x" * 100

    reg = ToolRegistry([data, big], max_result_chars=10)
    assert (await reg.call("data", {})).content == '{"a": [1, 2], "b": "ü"}'[:10] + "\n[truncated: 13 more characters]"
    assert (await reg.call("big", "")).content == "x" * 10 + "\n[truncated: 90 more characters]"


async def test_sync_tools_run_in_threads_async_tools_are_awaited():
    def blocking() -> str:
        time.sleep(0.3)
        return "b"

    async def waiting() -> str:
        await asyncio.sleep(0.3)
        return "w"

    reg = ToolRegistry([blocking, waiting])
    t0 = time.monotonic()
    results = await asyncio.gather(reg.call("blocking", {}), reg.call("waiting", {}), reg.call("blocking", {}))
    assert [r.content for r in results] == ["b", "w", "b"]
    assert time.monotonic() - t0 < 0.55  # the event loop was never blocked


def test_decorator_forms_and_registry_api():
    @tool
    def add(a: int, b: int = 1) -> int:
        """Add two integers."""
        return a + b

    @tool(name="mul", description="Multiply.", timeout_s=2)
    def times(a: int, b: int) -> int:
        return a * b

    assert isinstance(add, Tool) and add(2, 3) == 5  # a Tool still calls like the function
    assert times.name == "mul" and times.timeout_s == 2
    assert add.schema() == {"type": "function", "function": {
        "name": "add", "description": "Add two integers.",
        "parameters": {"type": "object", "properties": {"a": {"type": "integer"},
                                                        "b": {"type": "integer", "default": 1}},
                       "required": ["a"], "additionalProperties": False}}}
    reg = ToolRegistry([add])
    reg.register(times)
    assert reg.names() == ["add", "mul"] and "mul" in reg and "div" not in reg and reg.get("add") is add
    with pytest.raises(ValueError, match="already registered"):
        reg.register(add)
    renamed = reg.register(add, name="plus", description="Plus.")
    assert renamed.name == "plus" and renamed.fn is add.fn and reg.names() == ["add", "mul", "plus"]
    assert [s["function"]["name"] for s in reg.schemas(["mul"])] == ["mul"]
    with pytest.raises(AgentInputError) as e:
        reg.schemas(["mul", "div"])
    assert e.value.param == "tools" and "'div'" in str(e.value)
    with pytest.raises(AgentInputError):
        reg.subset(["nope"])
    sub = reg.subset(["plus"])
    assert sub.names() == ["plus"] and reg.names() == ["add", "mul", "plus"]
    with pytest.raises(KeyError, match="no tool named 'div'"):
        reg.get("div")
    with pytest.raises(ValueError, match="tool name"):
        Tool("bad name!", "", {"type": "object"}, add.fn)


class FakeEntryPoint:
    def __init__(self, name: str, obj=None, error: Exception | None = None):
        self.name, self.value, self._obj, self._error = name, f"fake_pkg:{name}", obj, error

    def load(self):
        if self._error:
            raise self._error
        return self._obj


def test_plugins_load_from_entry_points_and_broken_ones_are_skipped(monkeypatch, caplog):
    def weather(city: str) -> str:
        """The weather in a city."""
        return f"sunny in {city}"

    shout = Tool("shout", "Upper-case text.", {"type": "object", "properties": {"text": {"type": "string"}},
                                               "required": ["text"]}, lambda text: text.upper())

    def star(*args: int) -> int:
        return 0

    eps = [FakeEntryPoint("weather", weather), FakeEntryPoint("shout", shout),
           FakeEntryPoint("broken", error=ImportError("No module named 'fake_pkg'")),
           FakeEntryPoint("calculator", weather),  # clashes with a built-in
           FakeEntryPoint("star", star)]
    seen_groups = []

    def fake_entry_points(**kw):
        seen_groups.append(kw.get("group"))
        return eps

    monkeypatch.setattr(importlib.metadata, "entry_points", fake_entry_points)
    with caplog.at_level(logging.WARNING, logger="hearth.agents.tools.registry"):
        reg = default_registry()
    assert seen_groups == ["hearth.tools"]
    assert reg.names() == ["calculator", "solve_equation", "current_datetime", "weather", "shout"]
    logged = caplog.text
    assert "'broken'" in logged and "No module named 'fake_pkg'" in logged
    assert "'calculator'" in logged and "already registered" in logged and "'star'" in logged
    assert asyncio.run(reg.call("weather", '{"city": "Oslo"}')).content == "sunny in Oslo"
    assert asyncio.run(reg.call("shout", '{"text": "hi"}')).content == "HI"
    # an extra argument to a hand-written schema is refused before the lambda sees it
    assert "unexpected argument 'x'" in asyncio.run(reg.call("shout", '{"text": "hi", "x": 1}')).content
    assert default_registry(plugins=False).names() == ["calculator", "solve_equation", "current_datetime"]
