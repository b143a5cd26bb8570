"""Refuse a JSON schema that no finite JSON value satisfies, before it is compiled into a grammar.

    check_schema_has_values({"type": "object", "properties": {"x": {"$ref": "#"}}, "required": ["x"]})
    # InvalidRequestError(param="response_format"): invalid json_schema: no finite JSON value satisfies it
    # (a required value recursively requires itself: # required property 'x' -> #/properties/x; $ref # -> #)

llguidance accepts such a schema (a $ref cycle with no base case, a required property that requires
itself again) and the model can then only emit '' or '{"'. The check is a least fixpoint over the
subschemas: a subschema has a value when one of its alternatives (anyOf/oneOf members, the types it
allows) needs only subschemas that have values, through $ref, allOf, required properties and the first
minItems array items. A schema without "type" also allows non-objects, which need nothing.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote

from .errors import InvalidRequestError

__all__ = ["MAX_SCHEMA_NODES", "check_schema_has_values", "closed_objects"]

MAX_SCHEMA_NODES = 20_000
"""Subschemas checked; a larger schema is refused (real ones have a few hundred)."""

Need = tuple[str, Any]  # (why, the subschema that needs a value)


def _pointer(root: Any, ref: str) -> Any:
    """The subschema a local $ref ("#", "#/$defs/a") names; None for any other ref (llguidance checks those)."""
    if ref == "#":
        return root
    if not ref.startswith("#/"):
        return None
    node = root
    for part in ref[2:].split("/"):
        part = unquote(part).replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    return node


_SINGLE_SCHEMA_KEYS = ("items", "additionalProperties", "additionalItems", "contains", "not", "if", "then", "else",
                       "propertyNames", "unevaluatedProperties", "unevaluatedItems")


def _subschemas(node: dict) -> list[tuple[str, Any]]:
    """(path suffix, subschema) of every keyword that holds schemas."""
    out: list[tuple[str, Any]] = []
    for key in ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas"):
        if isinstance(node.get(key), dict):
            out += [(f"/{key}/{k}", v) for k, v in node[key].items()]
    for key in ("allOf", "anyOf", "oneOf", "prefixItems"):
        if isinstance(node.get(key), list):
            out += [(f"/{key}/{i}", v) for i, v in enumerate(node[key])]
    for key in _SINGLE_SCHEMA_KEYS:
        if key in node:
            value = node[key]
            if isinstance(value, list):  # draft-4 tuple `items`
                out += [(f"/{key}/{i}", v) for i, v in enumerate(value)]
            else:
                out.append((f"/{key}", value))
    return out


def closed_objects(schema: Any, bare: bool = False, depth: int = 0) -> Any:
    """A copy of `schema` where every object schema that lists `properties` and does not say
    `additionalProperties` takes no others (xgrammar's strict mode): a small model copies the schema
    into its tool arguments, `{"input": 3, "type": "integer"}`, when undeclared keys are allowed.
    bare: also close objects that list no properties (OpenAI's strict mode: `{"type": "object"}` is {}).
    An explicit `additionalProperties` (true, or a schema) is kept as written. Only schema keywords
    are walked: a property named "properties", an `enum` or `default` value is never touched."""
    if not isinstance(schema, dict) or depth > 256:
        return schema
    out = dict(schema)
    for key in _SINGLE_SCHEMA_KEYS:
        if isinstance(schema.get(key), dict):
            out[key] = closed_objects(schema[key], bare, depth + 1)
    for key in ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas"):
        if isinstance(schema.get(key), dict):
            out[key] = {k: closed_objects(v, bare, depth + 1) for k, v in schema[key].items()}
    for key in ("allOf", "anyOf", "oneOf", "prefixItems", "items", "additionalItems"):
        if isinstance(schema.get(key), list):
            out[key] = [closed_objects(v, bare, depth + 1) for v in schema[key]]
    types = schema.get("type")
    is_object = types == "object" or (isinstance(types, list) and "object" in types)
    if ("properties" in schema or (bare and is_object)) and "additionalProperties" not in schema \
            and "unevaluatedProperties" not in schema:
        out["additionalProperties"] = False
    return out


def _needs(root: Any, node: Any) -> list[list[Need]]:
    """What a value of `node` needs, as alternatives, each a list of subschemas that must all have a value.
    [[]]: it needs nothing; []: it never has a value."""
    if node is False:
        return []
    if not isinstance(node, dict):
        return [[]]
    base: list[Need] = []
    if isinstance(node.get("$ref"), str):
        target = _pointer(root, node["$ref"])
        if target is not None:
            base.append((f"$ref {node['$ref']}", target))
    if isinstance(node.get("allOf"), list):
        base += [(f"allOf[{i}]", v) for i, v in enumerate(node["allOf"])]
    alternatives = [base]
    for key in ("anyOf", "oneOf"):
        options = node.get(key)
        if isinstance(options, list) and options:
            alternatives = [alt + [(f"{key}[{i}]", v)] for alt in alternatives for i, v in enumerate(options)]
    types = node.get("type")
    types = [types] if isinstance(types, str) else types if isinstance(types, list) else None
    if types is None or "enum" in node or "const" in node:
        return alternatives  # a value of another type, or a listed value, needs nothing more
    per_type: list[list[Need]] = []
    for t in types:
        need: list[Need] = []
        if t == "object":
            props = node.get("properties") if isinstance(node.get("properties"), dict) else {}
            extra = node.get("additionalProperties", True)
            need = [(f"required property {name!r}", props.get(name, extra))
                    for name in node.get("required") or [] if isinstance(name, str)]
        elif t == "array" and isinstance(node.get("minItems"), int) and node["minItems"] > 0:
            prefix = node.get("prefixItems") if isinstance(node.get("prefixItems"), list) else []
            items = node.get("items", True)
            need = [(f"array item {i}", prefix[i] if i < len(prefix) else items)
                    for i in range(min(node["minItems"], len(prefix) + 1))]
        per_type.append(need)
    return [alt + need for alt in alternatives for need in per_type]


def check_schema_has_values(schema: Any) -> None:
    """InvalidRequestError(param="response_format") naming the problem if no finite JSON value satisfies
    `schema`: a $ref cycle with no base case, a required property or array item that recursively requires
    itself, or `false` where a value is required."""
    if not isinstance(schema, dict):
        return
    nodes: dict[int, Any] = {}
    paths: dict[int, str] = {}
    stack: list[tuple[str, Any]] = [("#", schema)]
    while stack:
        path, node = stack.pop()
        if id(node) in nodes or not isinstance(node, (dict, bool)):
            continue
        nodes[id(node)], paths[id(node)] = node, path
        if len(nodes) > MAX_SCHEMA_NODES:
            raise InvalidRequestError(f"invalid json_schema: more than {MAX_SCHEMA_NODES} subschemas",
                                      param="response_format")
        if isinstance(node, dict):
            stack += [(path + suffix, sub) for suffix, sub in _subschemas(node)]
    needs = {i: _needs(schema, node) for i, node in nodes.items()}
    for alternatives in list(needs.values()):  # a $ref may name a value the walk did not take for a schema
        for _, sub in (n for alt in alternatives for n in alt):
            if id(sub) not in needs:
                nodes[id(sub)], needs[id(sub)] = sub, _needs(schema, sub) if sub is False else [[]]
    # least fixpoint: a node has a value once all needs of one of its alternatives have values
    has_value: set[int] = set()
    dependents: dict[int, list[int]] = {}
    for i, alternatives in needs.items():
        for _, sub in (n for alt in alternatives for n in alt):
            dependents.setdefault(id(sub), []).append(i)
    queue = list(needs)
    while queue:
        i = queue.pop()
        if i not in has_value and any(all(id(s) in has_value for _, s in alt) for alt in needs[i]):
            has_value.add(i)
            queue += dependents.get(i, [])
    if id(schema) in has_value:
        return
    # name the problem: follow the first need without a value from the root until it comes around
    steps, seen, node = [], set(), schema
    while id(node) not in seen and needs.get(id(node)):
        seen.add(id(node))
        why, node = next(n for n in needs[id(node)][0] if id(n[1]) not in has_value)
        steps.append(f"{why} -> {paths.get(id(node), 'a referenced value')}")
    if node is False:
        problem = "a required value must match the schema `false`"
    elif all(step.startswith("$ref") for step in steps):
        problem = "a $ref cycle with no base case"
    else:
        problem = "a required value recursively requires itself"
    raise InvalidRequestError(f"invalid json_schema: no finite JSON value satisfies it ({problem}: "
                              f"# {'; '.join(steps)})", param="response_format")
