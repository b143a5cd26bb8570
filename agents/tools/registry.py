"""Tools the model may call: Python callables with JSON schemas, a registry, and safe execution.

    @tool
    def add(a: int, b: int = 1) -> int:
        '''Add two integers.

        Args:
            a: the first number
            b: the second number
        '''
        return a + b

    registry = ToolRegistry([add])
    registry.schemas()                               # OpenAI "tools" list
    result = await registry.call("add", '{"a": 2}')  # ToolResult(name="add", content="3", ok=True, ...)
    registry.load_entry_points()                     # third-party tools of the "hearth.tools" group

`call` never raises for a bad call: an unknown tool, arguments that are not JSON, a missing, extra or
wrong-typed argument, a tool that raises or runs past its timeout all give ToolResult(ok=False) whose
content ("error: ...") goes back to the model so it can correct itself.

A plugin package registers tools in its pyproject:

    [project.entry-points."hearth.tools"]
    weather = "my_pkg.tools:weather"      # a function (its hints give the schema) or a Tool
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.metadata
import inspect
import json
import logging
import re
import time
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from pydantic import BaseModel, TypeAdapter, ValidationError

from ..types import AgentInputError
from .schema import ArgumentError, allows_none, function_schema, validate_arguments

__all__ = ["Tool", "ToolError", "ToolRegistry", "ToolResult", "tool", "parse_arguments"]

logger = logging.getLogger(__name__)

_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_PLAIN = (str, int, float, bool, type(None))
DEFAULT_MAX_RESULT_CHARS = 16000


class ToolError(Exception):
    """Raised by a tool for a failure the model should read as is (no exception type in the message)."""


@dataclass
class ToolResult:
    """What one call gave back: `content` is the text of the tool message; ok=False means an error."""

    name: str
    content: str
    ok: bool
    elapsed_s: float


@dataclass
class Tool:
    """A callable the model may use. `parameters` is the JSON schema of its keyword arguments;
    `fn` may be sync (it runs in a worker thread) or async. Calling the Tool calls `fn` directly."""

    name: str
    description: str
    parameters: dict[str, Any]
    fn: Callable[..., Any]
    timeout_s: float = 30.0
    # per-parameter converters from validated JSON to the hinted Python type (Enum, BaseModel ...)
    _convert: dict[str, TypeAdapter] = field(init=False, repr=False, compare=False, default_factory=dict)
    _fill_none: tuple[str, ...] = field(init=False, repr=False, compare=False, default=())

    def __post_init__(self):
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise ValueError(f"tool name {self.name!r} must be 1-64 letters, digits, '_' or '-'")
        if not callable(self.fn):
            raise TypeError(f"tool {self.name!r}: fn must be callable, got {type(self.fn).__name__}")
        if not isinstance(self.parameters, dict) or self.parameters.get("type") != "object":
            raise ValueError(f"tool {self.name!r}: parameters must be a JSON schema of type 'object'")
        if not isinstance(self.timeout_s, (int, float)) or isinstance(self.timeout_s, bool) or self.timeout_s <= 0:
            raise ValueError(f"tool {self.name!r}: timeout_s must be > 0, got {self.timeout_s!r}")
        self.description = self.description or ""
        self._convert, self._fill_none = _converters(self.fn)

    @classmethod
    def from_function(cls, fn: Callable[..., Any], *, name: str | None = None, description: str | None = None,
                      timeout_s: float = 30.0) -> "Tool":
        """A Tool whose schema comes from fn's type hints and docstring."""
        summary, params = function_schema(fn)
        name = name or getattr(fn, "__name__", None) or type(fn).__name__
        return cls(name, description if description is not None else summary, params, fn, timeout_s)

    def schema(self) -> dict[str, Any]:
        """The OpenAI tool definition."""
        return {"type": "function",
                "function": {"name": self.name, "description": self.description, "parameters": self.parameters}}

    def bind(self, arguments: dict[str, Any]) -> dict[str, Any]:
        """Validated JSON arguments -> the keyword arguments of fn (Enum members, pydantic models ...)."""
        kwargs = dict(arguments)
        for key in self._fill_none:
            kwargs.setdefault(key, None)
        for key, adapter in self._convert.items():
            if key in kwargs and kwargs[key] is not None:
                try:
                    kwargs[key] = adapter.validate_python(kwargs[key])
                except ValidationError as e:
                    problems = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or key}: {err['msg']}"
                                         for err in e.errors()[:3])
                    raise ArgumentError(f"argument {key!r} is not valid: {problems}") from None
        return kwargs

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)


def _converters(fn: Callable[..., Any]) -> tuple[dict[str, TypeAdapter], tuple[str, ...]]:
    try:
        sig = inspect.signature(fn)
        target = fn if inspect.isfunction(fn) or inspect.ismethod(fn) else getattr(fn, "__call__", fn)
        hints = typing.get_type_hints(target, include_extras=True)
    except Exception:  # a fn without a readable signature or hints takes the JSON values as they are
        return {}, ()
    convert, fill = {}, []
    for p in sig.parameters.values():
        hint = hints.get(p.name)
        if hint is None or hint is Any or p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
            continue
        if p.default is inspect.Parameter.empty and allows_none(hint):
            fill.append(p.name)
        if hint in _PLAIN:  # already exact after schema validation
            continue
        try:
            convert[p.name] = TypeAdapter(hint)
        except Exception:  # pydantic cannot build it: pass the JSON value through unchanged
            logger.debug("no converter for parameter %r of %r", p.name, fn)
    return convert, tuple(fill)


def tool(fn: Callable[..., Any] | None = None, *, name: str | None = None, description: str | None = None,
         timeout_s: float = 30.0) -> Any:
    """Decorator: `@tool` or `@tool(name=..., description=..., timeout_s=...)` turns a function into a Tool."""
    def wrap(f: Callable[..., Any]) -> Tool:
        return Tool.from_function(f, name=name, description=description, timeout_s=timeout_s)
    return wrap(fn) if fn is not None else wrap


def parse_arguments(arguments: str | dict[str, Any] | None) -> dict[str, Any]:
    """The arguments of a tool call as a dict; ArgumentError says what is wrong with the JSON."""
    if arguments is None or (isinstance(arguments, str) and not arguments.strip()):
        return {}
    if isinstance(arguments, dict):
        return arguments
    if not isinstance(arguments, str):
        raise ArgumentError(f"the arguments must be a JSON object, got {type(arguments).__name__}")
    try:
        value = json.loads(arguments)
        if isinstance(value, str) and value.strip().startswith("{"):  # double-encoded by some models
            value = json.loads(value)
    except json.JSONDecodeError as e:
        raise ArgumentError(f"the arguments are not valid JSON ({e.msg} at character {e.pos}); "
                            "send one JSON object of named arguments") from None
    if not isinstance(value, dict):
        raise ArgumentError(f"the arguments must be a JSON object of named arguments, got {type(value).__name__}")
    return value


def render(value: Any) -> str:
    """A tool's return value as the text of the tool message."""
    if isinstance(value, str):
        return value
    if value is None:
        return "(the tool returned nothing)"
    if isinstance(value, BaseModel):
        return value.model_dump_json()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, (dict, list, tuple, int, float, bool)):
        return json.dumps(value, ensure_ascii=False, default=str)
    return str(value)


class ToolRegistry:
    """Named tools, their schemas, and `call`, which validates and runs one call without ever raising
    (cancellation aside). Results longer than `max_result_chars` are cut with a note."""

    def __init__(self, tools: Iterable[Tool | Callable[..., Any]] = (), *,
                 max_result_chars: int = DEFAULT_MAX_RESULT_CHARS):
        self._tools: dict[str, Tool] = {}
        self.max_result_chars = max_result_chars
        for t in tools:
            self.register(t)

    def register(self, fn_or_tool: Tool | Callable[..., Any], *, name: str | None = None,
                 description: str | None = None) -> Tool:
        """Add a Tool or a function (schema from its hints); a second tool of the same name is an error."""
        if isinstance(fn_or_tool, Tool):
            t = fn_or_tool
            if name is not None or description is not None:
                t = dataclasses.replace(t, name=name or t.name,
                                        description=t.description if description is None else description)
        elif callable(fn_or_tool):
            t = Tool.from_function(fn_or_tool, name=name, description=description)
        else:
            raise TypeError(f"register takes a Tool or a callable, got {type(fn_or_tool).__name__}")
        if t.name in self._tools:
            raise ValueError(f"a tool named {t.name!r} is already registered")
        self._tools[t.name] = t
        return t

    def get(self, name: str) -> Tool:
        try:
            return self._tools[name]
        except KeyError:
            raise KeyError(f"no tool named {name!r}; registered: {', '.join(self._tools) or 'none'}") from None

    def names(self) -> list[str]:
        return list(self._tools)

    def __contains__(self, name: object) -> bool:
        return name in self._tools

    def __len__(self) -> int:
        return len(self._tools)

    def __iter__(self):
        return iter(list(self._tools.values()))

    def _check_names(self, names: Iterable[str]) -> list[str]:
        if isinstance(names, str) or not all(isinstance(n, str) for n in names):
            raise AgentInputError("tools must be a list of tool names", "tools")
        names = list(names)
        unknown = [n for n in names if n not in self._tools]
        if unknown:
            raise AgentInputError(f"unknown tool{'s' if len(unknown) > 1 else ''} "
                                  f"{', '.join(repr(n) for n in unknown)}; available: "
                                  f"{', '.join(self._tools) or 'none'}", "tools")
        return list(dict.fromkeys(names))

    def schemas(self, names: list[str] | None = None) -> list[dict[str, Any]]:
        """OpenAI tool definitions of all tools, or of `names` (an unknown name -> AgentInputError)."""
        chosen = self.names() if names is None else self._check_names(names)
        return [self._tools[n].schema() for n in chosen]

    def subset(self, names: Iterable[str]) -> "ToolRegistry":
        """A registry holding only `names` (the same Tool objects)."""
        sub = ToolRegistry(max_result_chars=self.max_result_chars)
        for n in self._check_names(names):
            sub._tools[n] = self._tools[n]
        return sub

    async def call(self, name: str, arguments: str | dict[str, Any]) -> ToolResult:
        """Validate the arguments, run the tool under its timeout, and return its result or an error."""
        t0 = time.monotonic()

        def fail(message: str) -> ToolResult:
            return ToolResult(name, f"error: {message}", False, round(time.monotonic() - t0, 4))

        t = self._tools.get(name)
        if t is None:
            return fail(f"unknown tool {name!r}; the available tools are: {', '.join(self._tools) or 'none'}")
        try:
            kwargs = t.bind(validate_arguments(t.parameters, parse_arguments(arguments)))
        except ArgumentError as e:
            return fail(f"bad arguments for {name}: {e}")
        timer = asyncio.timeout(t.timeout_s)
        try:
            async with timer:
                value = await _invoke(t.fn, kwargs)
        except TimeoutError as e:
            if timer.expired():
                # a sync tool's thread cannot be stopped; it finishes in the background
                return fail(f"{name} timed out after {t.timeout_s:g} s")
            return fail(f"{name} failed: TimeoutError: {e}")
        except ToolError as e:
            return fail(str(e))
        except Exception as e:  # any tool failure goes back to the model as text
            logger.info("tool %s raised %s: %s", name, type(e).__name__, e)
            return fail(f"{name} failed: {type(e).__name__}: {e}")
        content = render(value)
        if len(content) > self.max_result_chars:
            cut = len(content) - self.max_result_chars
            content = content[: self.max_result_chars] + f"\n[truncated: {cut} more characters]"
        return ToolResult(name, content, True, round(time.monotonic() - t0, 4))

    def load_entry_points(self, group: str = "hearth.tools") -> list[str]:
        """Register the tools of installed plugins; a plugin that fails to load or register is logged
        and skipped. Returns the names registered."""
        try:
            eps = importlib.metadata.entry_points(group=group)
        except Exception as e:  # broken package metadata must not stop the server
            logger.warning("cannot list the %r entry points: %s", group, e)
            return []
        loaded = []
        for ep in eps:
            try:
                obj = ep.load()
                t = self.register(obj) if isinstance(obj, Tool) else self.register(obj, name=ep.name)
            except Exception as e:  # one broken plugin must not take the others down
                logger.warning("skipping the tool plugin %r (%s): %s: %s", ep.name, getattr(ep, "value", "?"),
                               type(e).__name__, e)
                continue
            loaded.append(t.name)
        return loaded


async def _invoke(fn: Callable[..., Any], kwargs: dict[str, Any]) -> Any:
    if inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(getattr(fn, "__call__", None)):
        return await fn(**kwargs)
    value = await asyncio.to_thread(fn, **kwargs)
    if inspect.isawaitable(value):
        value = await value
    return value
