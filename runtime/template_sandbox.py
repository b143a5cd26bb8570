"""The sandbox chat templates run in: jinja2's immutable sandbox, plus output, memory and time caps.

    limits = TemplateLimits(output_chars=1 << 20, time_s=2.0)      # or LIMITS, read from the environment
    env = BoundedSandbox(...)                                      # chat_template.py builds the one it uses
    tree = bound_template(env.parse(source))                       # loops tick, `~` is checked
    with render_budget(limits, input_chars=12_345) as budget:
        for piece in env.from_string(tree).generate(...):
            budget.output(piece)

A chat template ships with a model file, so it is untrusted code that can also just allocate: a loop
that prints a megabyte string thousands of times, `~` or `+` doubling a string in a namespace, `join` of
a repeated list, `center(10**9)`, `'{:>999999999}'.format(1)`, `(1).to_bytes(10**9)`, nested loops that
never print. Each route is bounded where the value is built:

- one value (and the whole output) is at most `cap` characters, cap = max(output_chars,
  output_per_input_char * the characters of the input), so a legitimate long prompt still renders;
- everything a template builds (output, `~`, `+`, `*`, `%`, filters, method calls, block captures,
  slices) is charged to a work budget of work_per_output_char * cap, which bounds memory;
- every loop step, call, filter and output piece checks a wall-clock deadline of time_s.

Going over any of them raises UnsafeCheckpointError, as does a RecursionError, OverflowError or
MemoryError inside the template (chat_template.py maps them). Environment variables
HEARTH_TEMPLATE_OUTPUT_CHARS and HEARTH_TEMPLATE_TIME_S set the defaults of LIMITS.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import os
import re
import string
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from jinja2 import nodes
from jinja2.exceptions import SecurityError
from jinja2.sandbox import MAX_RANGE, ImmutableSandboxedEnvironment, safe_range
from jinja2.utils import Namespace
from jinja2.visitor import NodeTransformer

from .errors import UnsafeCheckpointError

__all__ = ["LIMITS", "TemplateLimits", "BoundedSandbox", "bound_template", "input_chars", "render_budget"]

_MAX_INT_BITS = 100_000      # integers a template computes (2**100000 has 30103 digits)
_MAX_JSON_INDENT = 64


@dataclass(frozen=True)
class TemplateLimits:
    """Caps of one chat-template render. See the module docstring."""

    output_chars: int = 1 << 20
    """The smallest output cap (characters): the cap is max(this, output_per_input_char * input)."""
    output_per_input_char: float = 4.0
    work_per_output_char: int = 16
    """Characters the template may build in all (strings, lists, output), per character of the cap."""
    time_s: float = 2.0
    """Wall-clock time of one render."""
    template_chars: int = 512 << 10
    """The longest template accepted (the longest real chat templates are ~30 KB)."""

    def __post_init__(self):
        for name in ("output_chars", "work_per_output_char", "template_chars"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"TemplateLimits.{name} must be an integer >= 1, got {v!r}")
        for name in ("output_per_input_char", "time_s"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not v > 0:
                raise ValueError(f"TemplateLimits.{name} must be > 0, got {v!r}")

    @classmethod
    def from_env(cls) -> "TemplateLimits":
        kw: dict[str, Any] = {}
        if v := os.environ.get("HEARTH_TEMPLATE_OUTPUT_CHARS"):
            kw["output_chars"] = int(v)
        if v := os.environ.get("HEARTH_TEMPLATE_TIME_S"):
            kw["time_s"] = float(v)
        return cls(**kw)


LIMITS = TemplateLimits.from_env()
"""The limits render_chat_template uses; assign a new TemplateLimits here to change them."""


def _stop(what: str) -> UnsafeCheckpointError:
    return UnsafeCheckpointError(f"the chat template is unsafe and was stopped: {what}")


class _Budget:
    """What one render may still build and until when; lives in a context variable during the render."""

    __slots__ = ("cap", "work_left", "deadline", "out_left", "time_s", "factor")

    def __init__(self, limits: TemplateLimits, input_chars: int):
        self.cap = max(limits.output_chars, int(limits.output_per_input_char * input_chars))
        self.factor = limits.work_per_output_char
        self.work_left = self.factor * self.cap
        self.out_left = self.cap
        self.time_s = limits.time_s
        self.deadline = time.monotonic() + limits.time_s

    def tick(self) -> None:
        if time.monotonic() > self.deadline:
            raise _stop(f"it ran longer than {self.time_s:g} s")

    def charge(self, n: int) -> None:
        self.work_left -= n
        if self.work_left < 0:
            raise _stop("it built far more text than its output needs (the limit is "
                        f"{self.factor} x the output cap of {self.cap:,} characters)")
        if time.monotonic() > self.deadline:
            raise _stop(f"it ran longer than {self.time_s:g} s")

    def output(self, piece: str) -> None:
        self.out_left -= len(piece)
        if self.out_left < 0:
            raise _stop(f"its output is longer than {self.cap:,} characters")
        self.tick()


_current: contextvars.ContextVar[_Budget | None] = contextvars.ContextVar("hearth_template_budget", default=None)


@contextlib.contextmanager
def render_budget(limits: TemplateLimits, input_chars: int):
    """The budget of one render, active (for the hooks below) inside the block."""
    budget = _Budget(limits, input_chars)
    token = _current.set(budget)
    try:
        yield budget
    finally:
        _current.reset(token)


def _cap() -> int:
    b = _current.get()
    return b.cap if b is not None else LIMITS.output_chars  # compile-time constant folding has no budget


def _tick() -> None:
    b = _current.get()
    if b is not None:
        b.tick()


def _charge(n: int) -> None:
    b = _current.get()
    if b is not None:
        b.charge(n)


def input_chars(*values: Any) -> int:
    """Characters of the strings in messages, tools and extra variables (walked, not serialised)."""
    total, stack = 0, list(values)
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            total += len(v)
        elif isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, (list, tuple)):
            stack.extend(v)
        else:
            total += 8
    return total


# ---- sizes -----------------------------------------------------------------------------------------

def _size(v: Any) -> int:
    """What building `v` cost, shallow (a new list of old strings costs its pointers)."""
    if isinstance(v, (str, bytes, bytearray)):
        return len(v)
    if isinstance(v, (list, tuple, dict, set, frozenset)):
        return 8 * len(v) + 64
    if isinstance(v, int):
        return v.bit_length() // 8
    return 16


def _text_size(v: Any, limit: int) -> int:
    """About how long str(v) is, counted without building it; stops counting past `limit`."""
    total, stack = 0, [v]
    while stack and total <= limit:
        x = stack.pop()
        if isinstance(x, str):
            total += len(x) + 2
        elif isinstance(x, (bytes, bytearray)):
            total += 4 * len(x) + 3
        elif isinstance(x, (list, tuple, set, frozenset)):
            total += 2 + 2 * len(x)
            stack.extend(x)
        elif isinstance(x, dict):
            total += 2 + 4 * len(x)
            stack.extend(x.keys())
            stack.extend(x.values())
        elif isinstance(x, Namespace):
            total += 16
            stack.append(x._Namespace__attrs)
        elif isinstance(x, int):
            total += x.bit_length() // 3 + 2
        else:
            total += 32  # floats, None, Undefined, macros, loop contexts: short reprs
    return total


def _check_text(v: Any, what: str) -> int:
    cap = _cap()
    n = len(v) if isinstance(v, str) else _text_size(v, cap)
    if n > cap:
        raise _stop(f"{what} would be longer than {cap:,} characters")
    return n


def _check_int(n: Any, what: str, limit: int | None = None) -> None:
    limit = _cap() if limit is None else limit
    if isinstance(n, int) and not isinstance(n, bool) and abs(n) > limit:
        raise _stop(f"{what} {n if n.bit_length() < 64 else 'of ' + str(n.bit_length()) + ' bits'} is larger "
                    f"than the limit of {limit:,}")


def _check_result(v: Any, what: str) -> Any:
    """Charge a value the template built; refuse it if it is longer than the cap."""
    n = _size(v)
    if n > 8 * _cap() + 64 or (isinstance(v, (str, bytes)) and len(v) > _cap()):
        raise _stop(f"{what} built a value of {n:,} characters, more than the cap of {_cap():,}")
    _charge(n)
    return v


def _ticking(items: Any) -> Iterator[Any]:
    """Iterate `items`, checking the deadline at every step (loops, lazy filters)."""
    b = _current.get()
    for x in items:
        if b is not None:
            b.charge(8)
        yield x


_SPEC = re.compile(r"%(?:\([^)]*\))?[#0\- +]*(\*|\d+)?(?:\.(\*|\d+))?[hlL]?[a-zA-Z%]")


def _big_digits(digits: str | None, cap: int) -> int:
    if not digits or digits == "*":
        return 0
    return cap + 1 if len(digits) > 12 else int(digits)


def _check_printf(fmt: Any, args: Any) -> None:
    """`fmt % args` (the % operator and the `format` filter) must stay under the cap."""
    if not isinstance(fmt, (str, bytes)):
        return
    cap = _cap()
    if isinstance(fmt, bytes):
        fmt = fmt.decode("latin-1")
    values = list(args.values()) if isinstance(args, dict) else list(args) if isinstance(args, tuple) else [args]
    specs = _SPEC.findall(fmt)
    widest = max((_big_digits(d, cap) for spec in specs for d in spec), default=0)
    if any("*" in spec for spec in specs):
        widest = max([widest] + [abs(v) for v in values if isinstance(v, int)])
    longest = max((_text_size(v, cap) for v in values), default=0)
    if len(fmt) + len(specs) * (longest + widest) > cap:
        raise _stop(f"a %-format would be longer than {cap:,} characters")


def _check_str_format(fmt: str, args: tuple, kwargs: dict) -> None:
    """str.format / format_map: each field may repeat an argument and pad it to its width."""
    cap = _cap()
    values = list(args) + list(kwargs.values())
    longest = max((_text_size(v, cap) for v in values), default=0)
    widest, fields = 0, 0
    try:
        parsed = list(string.Formatter().parse(fmt))
    except ValueError:
        return  # str.format raises the same error itself
    for _, field, spec, _ in parsed:
        if field is None:
            continue
        fields += 1
        if "{" in (spec or ""):  # a nested width such as {:{w}} comes from the arguments
            widest = max([widest] + [abs(v) for v in values if isinstance(v, int)])
        widest = max([widest] + [_big_digits(d, cap) for d in re.findall(r"\d+", spec or "")])
    if len(fmt) + fields * (longest + widest) > cap:
        raise _stop(f"a str.format would be longer than {cap:,} characters")


def _check_join(sep: Any, items: list) -> None:
    cap = _cap()
    total = len(sep) * max(len(items) - 1, 0) if isinstance(sep, (str, bytes)) else 0
    for x in items:
        total += len(x) if isinstance(x, (str, bytes)) else _text_size(x, cap)
        if total > cap:
            raise _stop(f"a join would be longer than {cap:,} characters")


def _materialise(items: Any) -> list:
    return items if isinstance(items, list) else list(_ticking(items))


# ---- prechecks of methods and filters that can build far more than their inputs --------------------

def _arg(args: tuple, kwargs: dict, i: int, name: str, default: Any = None) -> Any:
    return args[i] if len(args) > i else kwargs.get(name, default)


def _check_method(obj: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """A method of str/bytes/int called from the template: refuse it before it allocates too much."""
    owner = getattr(obj, "__self__", None)
    name = getattr(obj, "__name__", "")
    if isinstance(owner, (str, bytes)):
        if name in ("center", "ljust", "rjust", "zfill"):
            _check_int(_arg(args, kwargs, 0, "width"), f"str.{name} width")
        elif name == "expandtabs":
            size = _arg(args, kwargs, 0, "tabsize", 8)
            tabs = owner.count("\t" if isinstance(owner, str) else b"\t")
            if isinstance(size, int) and size * tabs + len(owner) > _cap():
                raise _stop(f"expandtabs would be longer than {_cap():,} characters")
        elif name == "replace":
            _check_replace(owner, _arg(args, kwargs, 0, "old"), _arg(args, kwargs, 1, "new"),
                           _arg(args, kwargs, 2, "count", -1))
        elif name == "join" and args:
            items = _materialise(args[0])
            _check_join(owner, items)
            args = (items, *args[1:])
        elif name == "translate" and args and isinstance(args[0], dict):
            longest = max((len(v) for v in args[0].values() if isinstance(v, (str, bytes))), default=1)
            if longest * len(owner) > _cap():
                raise _stop(f"translate would be longer than {_cap():,} characters")
    elif isinstance(owner, int) and name == "to_bytes":
        _check_int(_arg(args, kwargs, 0, "length", 1), "int.to_bytes length")
    return args, kwargs


def _check_replace(s: Any, old: Any, new: Any, count: Any) -> None:
    if not isinstance(s, (str, bytes)) or not isinstance(new, (str, bytes)) or not isinstance(old, type(s)):
        return
    hits = s.count(old) if old else len(s) + 1
    if isinstance(count, int) and count >= 0:
        hits = min(hits, count)
    if len(s) + hits * len(new) > _cap():
        raise _stop(f"replace would be longer than {_cap():,} characters")


def _f_center(value, width=80, *_, **__):
    _check_int(width, "center width")


def _f_indent(s, width=4, *_, **__):
    n = _check_text(s, "indent's input")
    lines = (s.count("\n") if isinstance(s, str) else n) + 1
    w = width if isinstance(width, int) else _text_size(width, _cap())
    _check_int(w * lines + n, "indent's output length")


def _f_wordwrap(s, width=79, break_long_words=True, wrapstring=None, *_, **__):
    n = _check_text(s, "wordwrap's input")
    _check_int(n * (1 + (len(wrapstring) if isinstance(wrapstring, str) else 1)), "wordwrap's output length")


def _f_format(value, *args, **kwargs):
    _check_text(value, "format's input")
    _check_printf(str(value), kwargs or args)


def _f_replace(s, old, new, count=None, *_, **__):
    _check_text(s, "replace's input")
    _check_replace(s if isinstance(s, str) else str(s), old, new, count if count is not None else -1)


def _f_tojson(value, ensure_ascii=False, indent=None, separators=None, *_, **__):
    _check_text(value, "tojson's input")
    _check_int(indent, "tojson indent", _MAX_JSON_INDENT)
    if isinstance(indent, str) and len(indent) > _MAX_JSON_INDENT:
        raise _stop("tojson's indent string is too long")
    if separators is not None and sum(len(s) for s in separators if isinstance(s, str)) > 2 * _MAX_JSON_INDENT:
        raise _stop("tojson's separators are too long")


def _f_batch(value, linecount, fill_with=None, *_, **__):
    _check_int(linecount, "batch size", MAX_RANGE)


def _f_slice(value, slices, fill_with=None, *_, **__):
    _check_int(slices, "slice count", MAX_RANGE)


def _f_sum(iterable, attribute=None, start=0, *_, **__):
    if not isinstance(start, (int, float)) or isinstance(start, bool):
        raise _stop("sum only adds numbers in a chat template")


def _f_text(value, *_, **__):
    _check_text(value, "the filter's input")


_FILTER_CHECKS = {
    "center": _f_center, "indent": _f_indent, "wordwrap": _f_wordwrap, "format": _f_format,
    "replace": _f_replace, "tojson": _f_tojson, "batch": _f_batch, "slice": _f_slice, "sum": _f_sum,
    **{name: _f_text for name in ("string", "pprint", "urlencode", "xmlattr", "escape", "e", "forceescape",
                                  "safe", "striptags", "upper", "lower", "title", "capitalize", "trim",
                                  "urlize", "wordcount", "truncate", "list", "reverse", "filesizeformat")},
}


def _bounded_filter(name: str, fn: Any) -> Any:
    """`fn` with its precheck, the deadline, and its result charged (lazy results tick per item)."""
    check = _FILTER_CHECKS.get(name)
    skip = 1 if getattr(fn, "jinja_pass_arg", None) is not None else 0  # context/environment first
    join = name == "join"

    @functools.wraps(fn)
    def bounded(*args: Any, **kwargs: Any) -> Any:
        _tick()
        if join and len(args) > skip:
            items = _materialise(args[skip])
            sep = _arg(args[skip + 1:], kwargs, 0, "d", "")
            _check_join(sep, items)
            args = (*args[:skip], items, *args[skip + 1:])
        elif check is not None and len(args) > skip:
            check(*args[skip:], **kwargs)
        result = fn(*args, **kwargs)
        if inspect.isgenerator(result) or isinstance(result, Iterator):
            return _ticking(result)
        return _check_result(result, f"the filter {name!r}")

    return bounded


def _bounded_range(*args: int) -> Iterator[int]:
    return _ticking(safe_range(*args))


class BoundedSandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox with every allocation route of a template bounded (see the module docstring)."""

    intercepted_binops = frozenset(["+", "*", "**", "%"])

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, finalize=self._finalize_output, **kwargs)
        self.filters["_hearth_concat"] = _concat
        self.filters["_hearth_loop"] = _ticking
        self.filters["_hearth_slice"] = _charged_slice
        self.globals["range"] = _bounded_range
        self.globals.pop("lipsum", None)  # lipsum(10**9) is a bomb, and no chat template uses it

    def bound_filters(self) -> None:
        """Wrap every filter (call after adding the environment's own)."""
        for name, fn in list(self.filters.items()):
            if not name.startswith("_hearth_") and not getattr(fn, "_hearth_bounded", False):
                wrapped = _bounded_filter(name, fn)
                wrapped._hearth_bounded = True
                self.filters[name] = wrapped

    def unsafe_undefined(self, obj: Any, attribute: Any) -> Any:
        # Jinja would return a silent Undefined for some of these (`{{ f.__globals__ }}` prints "");
        # an attempt on Python internals should stop the render instead.
        raise SecurityError(f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe")

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        _tick()
        cap = _cap()
        if operator == "*":
            for seq, count in ((left, right), (right, left)):
                if isinstance(seq, (str, bytes, list, tuple)) and isinstance(count, int) \
                        and len(seq) * count > cap:
                    raise SecurityError("the template builds a sequence that is too long")
            if isinstance(left, int) and isinstance(right, int) \
                    and left.bit_length() + right.bit_length() > _MAX_INT_BITS:
                raise SecurityError("the template computes a product that is too large")
        elif operator == "**" and isinstance(right, (int, float)):
            base_bits = left.bit_length() if isinstance(left, int) else 1
            if abs(right) > _MAX_INT_BITS or (isinstance(left, int) and right > 0 and
                                              max(base_bits - 1, 1) * right > _MAX_INT_BITS):
                raise SecurityError("the template computes a power that is too large")
        elif operator == "+":
            if isinstance(left, (str, bytes, list, tuple)) and isinstance(right, (str, bytes, list, tuple)) \
                    and len(left) + len(right) > cap:
                raise _stop(f"`+` would build a value longer than {cap:,}")
        elif operator == "%" and isinstance(left, (str, bytes)):
            _check_printf(left, right)
        return _check_result(super().call_binop(context, operator, left, right), f"`{operator}`")

    def wrap_str_format(self, value: Any) -> Any:
        wrapper = super().wrap_str_format(value)
        if wrapper is None:
            return None
        fmt, is_map = value.__self__, value.__name__ == "format_map"

        @functools.wraps(wrapper)
        def bounded(*args: Any, **kwargs: Any) -> str:
            _tick()
            if is_map:
                _check_str_format(fmt, (), args[0] if args and isinstance(args[0], dict) else {})
            else:
                _check_str_format(fmt, args, kwargs)
            return _check_result(wrapper(*args, **kwargs), "str.format")

        return bounded

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        _tick()
        args, kwargs = _check_method(__obj, args, kwargs)
        result = super().call(__context, __obj, *args, **kwargs)
        if isinstance(result, Iterator):
            return _ticking(result)
        return _check_result(result, f"calling {getattr(__obj, '__name__', type(__obj).__name__)}")

    def concat(self, parts: Any) -> str:  # type: ignore[override]
        """Joins captured output (macro bodies, {% set %} blocks, {% filter %} blocks)."""
        parts = _materialise(parts)
        _check_join("", parts)
        return _check_result("".join(parts), "captured output")

    @staticmethod
    def _finalize_output(value: Any) -> Any:
        """Every {{ expression }}: its text is charged before str() builds it."""
        _charge(_check_text(value, "an output expression"))
        return value


def _charged_slice(value: Any) -> Any:
    return _check_result(value, "a slice")


def _concat(items: list) -> str:
    """`a ~ b ~ c`, which jinja would join without asking the sandbox."""
    _check_join("", items)
    return _check_result("".join(x if isinstance(x, str) else str(x) for x in items), "`~`")


class _BoundTemplate(NodeTransformer):
    def visit_For(self, node: nodes.For) -> nodes.Node:
        self.generic_visit(node)
        node.iter = nodes.Filter(node.iter, "_hearth_loop", [], [], None, None, lineno=node.lineno)
        return node

    def visit_Getitem(self, node: nodes.Getitem) -> nodes.Node:
        self.generic_visit(node)
        if not isinstance(node.arg, nodes.Slice):
            return node
        # x[a:b] compiles to a plain Python slice, which copies without asking the sandbox
        return nodes.Filter(node, "_hearth_slice", [], [], None, None, lineno=node.lineno)

    def visit_Concat(self, node: nodes.Concat) -> nodes.Node:
        self.generic_visit(node)
        return nodes.Filter(nodes.List(node.nodes, lineno=node.lineno), "_hearth_concat", [], [], None, None,
                            lineno=node.lineno)


def bound_template(tree: nodes.Template) -> nodes.Template:
    """The parsed template with every for-loop ticking and every `~` and slice charged."""
    return _BoundTemplate().visit(tree)
