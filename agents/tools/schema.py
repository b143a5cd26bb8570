"""JSON schemas for tool parameters: derived from a function's type hints, and checked against the
arguments a model sends.

    description, params = function_schema(fn)        # from hints, defaults and the docstring
    args = validate_arguments(params, {"n": "3"})    # {"n": 3}: safe coercion, else ArgumentError

Supported hints: str, int, float, bool, None, Any, Literal[...], Enum subclasses, list/tuple/set[...],
dict / dict[str, X], Optional[X] / X | None / unions, Annotated[X, "description"], pydantic BaseModel
(its model_json_schema), and anything else pydantic's TypeAdapter can describe (dataclasses, datetime ...).
A parameter with a default (or Optional) is not required. Descriptions come from the docstring's
Google-style "Args:" section when present.

Validation covers the JSON-Schema subset these schemas use (type, enum, const, properties, required,
additionalProperties, items, anyOf/oneOf/allOf, $ref, numeric and length bounds, pattern). Coercion is
only where no meaning can change: "3" -> 3 for an integer, "2.5" -> 2.5 for a number, 2.0 -> 2,
"true"/"false" -> bool, a number -> its text for a string. Anything else is an ArgumentError naming the
argument, so the model gets a message it can act on.
"""

from __future__ import annotations

import dataclasses
import enum
import inspect
import math
import re
import types
import typing
from typing import Any, Callable, Literal, Union

from pydantic import BaseModel, TypeAdapter

__all__ = ["ArgumentError", "allows_none", "function_schema", "hint_schema", "parse_docstring", "validate_arguments"]

_SIMPLE = {str: "string", int: "integer", float: "number", bool: "boolean", type(None): "null"}
_ARRAYS = (list, tuple, set, frozenset, typing.Sequence, typing.Iterable, typing.Collection,
           typing.AbstractSet, typing.MutableSequence)
_SECTION = re.compile(r"^\s*(Args|Arguments|Parameters|Params|Returns|Return|Yields|Raises|Examples?|"
                      r"Notes?|See Also|Attributes)\s*:\s*$")
_ARG_LINE = re.compile(r"^\s*\**(\w+)\s*(\([^)]*\))?\s*:\s*(.*)$")


class ArgumentError(ValueError):
    """The arguments of a tool call do not fit its schema; the message says which and how."""


# ---------------------------------------------------------------- derivation


def parse_docstring(doc: str | None) -> tuple[str, dict[str, str]]:
    """(summary, {parameter: description}) from a Google-style docstring. The summary is the text
    before the first section header; unknown layouts give the whole docstring and no parameters."""
    if not doc:
        return "", {}
    lines = inspect.cleandoc(doc).splitlines()
    summary: list[str] = []
    params: dict[str, str] = {}
    section: str | None = None
    current: str | None = None
    arg_indent: int | None = None
    for line in lines:
        m = _SECTION.match(line)
        if m and not line.startswith((" ", "\t")):
            section, current, arg_indent = m.group(1).lower(), None, None
            continue
        if section is None:
            summary.append(line)
            continue
        if section not in ("args", "arguments", "parameters", "params") or not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        am = _ARG_LINE.match(line)
        if am and (arg_indent is None or indent <= arg_indent):
            arg_indent = indent
            current = am.group(1)
            params[current] = am.group(3).strip()
        elif current is not None:  # a continuation line of the current parameter
            params[current] = (params[current] + " " + line.strip()).strip()
    return "\n".join(summary).strip(), params


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    t = schema.get("type")
    if isinstance(t, str) and set(schema) <= {"type", "items", "additionalProperties", "description"}:
        return {**schema, "type": [t, "null"]}
    return {"anyOf": [schema, {"type": "null"}]}


def _hoist(schema: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """Move a pydantic schema's $defs into the shared `defs` (refs point at the parameters' root)."""
    for key, sub in (schema.pop("$defs", None) or {}).items():
        if key in defs and defs[key] != sub:
            raise TypeError(f"two different types are both named {key!r}; rename one")
        defs[key] = sub
    return schema


def hint_schema(hint: Any, defs: dict[str, Any]) -> dict[str, Any]:
    """The JSON schema of one type hint; nested definitions go into `defs`."""
    if hint is inspect.Parameter.empty or hint is Any or hint is object:
        return {}
    if hint in _SIMPLE:
        return {"type": _SIMPLE[hint]}
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Annotated:
        inner = hint_schema(args[0], defs)
        notes = [a for a in args[1:] if isinstance(a, str)]
        return {**inner, "description": notes[0]} if notes else inner
    if origin is Literal:
        values = list(args)
        kinds = {_SIMPLE.get(type(v)) for v in values}
        out: dict[str, Any] = {"enum": values}
        if len(kinds) == 1 and None not in kinds:
            out = {"type": kinds.pop(), "enum": values}
        return out
    if origin is Union or origin is types.UnionType:
        members = [a for a in args if a is not type(None)]
        inner = (hint_schema(members[0], defs) if len(members) == 1
                 else {"anyOf": [hint_schema(a, defs) for a in members]})
        return _nullable(inner) if len(members) < len(args) else inner
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        values = [m.value for m in hint]
        kinds = {_SIMPLE.get(type(v)) for v in values}
        return {"type": kinds.pop(), "enum": values} if len(kinds) == 1 and None not in kinds else {"enum": values}
    if isinstance(hint, type) and issubclass(hint, BaseModel):
        return _hoist(hint.model_json_schema(ref_template="#/$defs/{model}"), defs)
    if hint in _ARRAYS or origin in _ARRAYS:
        out = {"type": "array"}
        if args and not (origin is tuple and len(args) != 2):
            out["items"] = hint_schema(args[0], defs)
        elif origin is tuple and args:  # a fixed-length tuple: pydantic knows prefixItems
            return _hoist(TypeAdapter(hint).json_schema(ref_template="#/$defs/{model}"), defs)
        return out
    if hint is dict or origin in (dict, typing.Mapping, typing.MutableMapping):
        out = {"type": "object"}
        if len(args) == 2 and args[1] is not Any:
            out["additionalProperties"] = hint_schema(args[1], defs)
        return out
    try:  # dataclasses, TypedDicts, datetime, UUID ...: pydantic describes them
        return _hoist(TypeAdapter(hint).json_schema(ref_template="#/$defs/{model}"), defs)
    except Exception as e:  # pydantic raises several error types for types it cannot describe
        raise TypeError(f"cannot describe the type {hint!r} as a JSON schema: {e}") from e


def allows_none(hint: Any) -> bool:
    """Whether the hint names None explicitly (Optional[X], X | None, Annotated[Optional[X], ...])."""
    if hint is type(None) or hint is None:
        return True
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Annotated:
        return allows_none(args[0])
    if origin is Union or origin is types.UnionType:
        return any(allows_none(a) for a in args)
    if origin is Literal:
        return None in args
    return False


def _json_default(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, (tuple, set, frozenset)):
        return list(value)
    return value


def function_schema(fn: Callable[..., Any]) -> tuple[str, dict[str, Any]]:
    """(description, parameters schema) of a Python callable, from its signature, type hints and
    docstring. *args is refused (a model sends named arguments); **kwargs allows extra arguments."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError) as e:
        raise TypeError(f"cannot read the signature of {fn!r}: {e}") from e
    target = fn if inspect.isfunction(fn) or inspect.ismethod(fn) else getattr(fn, "__call__", fn)
    try:
        hints = typing.get_type_hints(target, include_extras=True)
    except Exception as e:  # a forward reference that does not resolve: say which function
        raise TypeError(f"cannot resolve the type hints of {getattr(fn, '__name__', fn)!r}: {e}") from e
    summary, docs = parse_docstring(inspect.getdoc(fn))
    defs: dict[str, Any] = {}
    props: dict[str, Any] = {}
    required: list[str] = []
    extra = False
    for p in sig.parameters.values():
        if p.kind is p.VAR_POSITIONAL:
            raise TypeError(f"tool function {getattr(fn, '__name__', fn)!r} takes *{p.name}; "
                            "tools take named arguments only")
        if p.kind is p.VAR_KEYWORD:
            extra = True
            continue
        if p.kind is p.POSITIONAL_ONLY:
            raise TypeError(f"tool function {getattr(fn, '__name__', fn)!r} has the positional-only "
                            f"parameter {p.name!r}; tools take named arguments only")
        hint = hints.get(p.name, p.annotation)
        try:
            schema = dict(hint_schema(hint, defs))
        except TypeError as e:
            raise TypeError(f"parameter {p.name!r} of {getattr(fn, '__name__', fn)!r}: {e}") from e
        if p.name in docs and docs[p.name]:
            schema["description"] = docs[p.name]
        if p.default is not inspect.Parameter.empty:
            default = _json_default(p.default)
            if isinstance(default, (str, int, float, bool, list, dict, type(None))):
                schema["default"] = default
        elif not allows_none(hint):  # Optional[X] without a default is filled with None when absent
            required.append(p.name)
        props[p.name] = schema
    params: dict[str, Any] = {"type": "object", "properties": props, "required": required,
                              "additionalProperties": extra}
    if defs:
        params["$defs"] = defs
    return summary, params


# ---------------------------------------------------------------- validation


_INT_TEXT = re.compile(r"^\s*[+-]?\d+\s*$")
_TYPE_NAMES = {"string": "a string", "integer": "an integer", "number": "a number", "boolean": "true or false",
               "null": "null", "array": "an array", "object": "an object"}


def _show(value: Any) -> str:
    text = repr(value) if not isinstance(value, (dict, list)) else type(value).__name__
    return text if len(text) <= 60 else text[:57] + "..."


def _where(path: str) -> str:
    return f"argument {path!r}" if path else "the arguments"


def _as_type(t: str, value: Any, coerce: bool) -> tuple[bool, Any]:
    """(matches, value after coercion) for one JSON type name."""
    is_num = isinstance(value, (int, float)) and not isinstance(value, bool)
    if t == "string":
        if isinstance(value, str):
            return True, value
        if coerce and is_num:
            return True, str(value)
    elif t == "integer":
        if isinstance(value, int) and not isinstance(value, bool):
            return True, value
        if isinstance(value, float) and value.is_integer():  # JSON Schema counts 2.0 as an integer
            return True, int(value)
        if coerce and isinstance(value, str) and _INT_TEXT.match(value):
            return True, int(value)
    elif t == "number":
        if is_num:
            return True, value
        if coerce and isinstance(value, str):
            try:
                f = float(value)
            except ValueError:
                return False, value
            if math.isfinite(f):
                return True, int(f) if _INT_TEXT.match(value) else f
    elif t == "boolean":
        if isinstance(value, bool):
            return True, value
        if coerce and isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return True, value.strip().lower() == "true"
    elif t == "null":
        return value is None, value
    elif t == "array":
        return isinstance(value, list), value
    elif t == "object":
        return isinstance(value, dict), value
    return False, value


class _Validator:
    def __init__(self, root: dict[str, Any]):
        self.root = root

    def resolve(self, ref: str) -> dict[str, Any]:
        if not ref.startswith("#/"):
            raise ArgumentError(f"the tool's schema uses the external reference {ref!r}, which is not supported")
        node: Any = self.root
        for part in ref[2:].split("/"):
            part = part.replace("~1", "/").replace("~0", "~")
            if not isinstance(node, dict) or part not in node:
                raise ArgumentError(f"the tool's schema has a dangling reference {ref!r}")
            node = node[part]
        return node

    def check(self, schema: dict[str, Any] | bool, value: Any, path: str, coerce: bool) -> Any:
        if schema is True or schema == {}:
            return value
        if schema is False:
            raise ArgumentError(f"{_where(path)} is not allowed")
        if "$ref" in schema:
            value = self.check(self.resolve(schema["$ref"]), value, path, coerce)
        for sub in schema.get("allOf", ()):
            value = self.check(sub, value, path, coerce)
        branches = schema.get("anyOf") or schema.get("oneOf")
        if branches:
            value = self._any(branches, value, path, coerce)
        if "type" in schema:
            value = self._type(schema["type"], value, path, coerce)
        if "enum" in schema and value not in schema["enum"]:
            choices = ", ".join(_show(v) for v in schema["enum"])
            raise ArgumentError(f"{_where(path)} must be one of {choices}; got {_show(value)}")
        if "const" in schema and value != schema["const"]:
            raise ArgumentError(f"{_where(path)} must be {_show(schema['const'])}; got {_show(value)}")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            self._bounds(schema, value, path)
        if isinstance(value, str):
            self._text(schema, value, path)
        if isinstance(value, list):
            value = self._array(schema, value, path, coerce)
        if isinstance(value, dict):
            value = self._object(schema, value, path, coerce)
        return value

    def _any(self, branches: list[Any], value: Any, path: str, coerce: bool) -> Any:
        errors = []
        # an exact match wins over a coerced one: "3" stays a string when a string is allowed
        for c in ((False, True) if coerce else (False,)):
            for sub in branches:
                try:
                    return self.check(sub, value, path, c)
                except ArgumentError as e:
                    errors.append(str(e))
        raise ArgumentError(errors[0] if len(set(errors)) == 1 else
                            f"{_where(path)} matches none of the allowed forms ({'; '.join(dict.fromkeys(errors))})")

    def _type(self, t: str | list[str], value: Any, path: str, coerce: bool) -> Any:
        names = [t] if isinstance(t, str) else list(t)
        for c in ((False, True) if coerce else (False,)):
            for name in names:
                ok, out = _as_type(name, value, c)
                if ok:
                    return out
        want = " or ".join(_TYPE_NAMES.get(n, n) for n in names)
        raise ArgumentError(f"{_where(path)} must be {want}; got {_show(value)}")

    def _bounds(self, s: dict[str, Any], v: float, path: str) -> None:
        for key, bad, word in (("minimum", lambda b: v < b, ">="), ("maximum", lambda b: v > b, "<="),
                               ("exclusiveMinimum", lambda b: v <= b, ">"),
                               ("exclusiveMaximum", lambda b: v >= b, "<")):
            if key in s and isinstance(s[key], (int, float)) and bad(s[key]):
                raise ArgumentError(f"{_where(path)} must be {word} {s[key]}; got {_show(v)}")

    def _text(self, s: dict[str, Any], v: str, path: str) -> None:
        if "minLength" in s and len(v) < s["minLength"]:
            raise ArgumentError(f"{_where(path)} must have at least {s['minLength']} characters")
        if "maxLength" in s and len(v) > s["maxLength"]:
            raise ArgumentError(f"{_where(path)} must have at most {s['maxLength']} characters; got {len(v)}")
        if "pattern" in s and not re.search(s["pattern"], v):
            raise ArgumentError(f"{_where(path)} must match the pattern {s['pattern']!r}; got {_show(v)}")

    def _array(self, s: dict[str, Any], v: list[Any], path: str, coerce: bool) -> list[Any]:
        if "minItems" in s and len(v) < s["minItems"]:
            raise ArgumentError(f"{_where(path)} must have at least {s['minItems']} items; got {len(v)}")
        if "maxItems" in s and len(v) > s["maxItems"]:
            raise ArgumentError(f"{_where(path)} must have at most {s['maxItems']} items; got {len(v)}")
        prefix = s.get("prefixItems") or []
        out = [self.check(prefix[i], x, f"{path}[{i}]", coerce) if i < len(prefix)
               else self.check(s.get("items", {}), x, f"{path}[{i}]", coerce) for i, x in enumerate(v)]
        return out

    def _object(self, s: dict[str, Any], v: dict[str, Any], path: str, coerce: bool) -> dict[str, Any]:
        props = s.get("properties") or {}
        missing = [k for k in s.get("required") or () if k not in v]
        if missing:
            where = f" of {_where(path)}" if path else ""
            raise ArgumentError(f"missing required argument{'s' if len(missing) > 1 else ''} "
                                f"{', '.join(repr(m) for m in missing)}{where}")
        extra_schema = s.get("additionalProperties", True if path else None)
        out = {}
        for key, item in v.items():
            sub_path = f"{path}.{key}" if path else key
            if key in props:
                out[key] = self.check(props[key], item, sub_path, coerce)
            elif extra_schema is None or extra_schema is False:
                # at the top level a schema without additionalProperties still means "these names only":
                # the function would fail on an unexpected keyword anyway
                known = ", ".join(props) or "no arguments"
                raise ArgumentError(f"unexpected argument {sub_path!r}; the tool takes: {known}")
            else:
                out[key] = self.check(extra_schema, item, sub_path, coerce) if isinstance(extra_schema, dict) else item
        return out


def validate_arguments(schema: dict[str, Any], arguments: dict[str, Any], *, coerce: bool = True) -> dict[str, Any]:
    """The arguments checked against a parameters schema, with safe coercion; ArgumentError otherwise."""
    if not isinstance(arguments, dict):
        raise ArgumentError(f"the arguments must be a JSON object; got {_show(arguments)}")
    return _Validator(schema).check(schema, arguments, "", coerce)
