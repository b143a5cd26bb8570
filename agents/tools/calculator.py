"""The `calculator` tool: arithmetic on a parsed syntax tree, never `eval`.

    calculate("2 * (3 + 4) ** 2")      # "98"
    calculate("sqrt(2) * pi")          # "4.44288293815837"
    calculate("9**9**9")               # CalculatorError: the result would be too large

Only numbers, + - * / // % ** (and ^ as a power, since nobody means XOR on a calculator), unary + -,
parentheses, and the functions and constants in FUNCTIONS / CONSTANTS are allowed. Names, attribute
access, subscripts, calls of anything else, lambdas and strings are refused with a message saying
what is allowed. Integer results are bounded (MAX_INT_BITS) so no expression can eat the CPU or memory.
"""

from __future__ import annotations

import ast
import math
import operator
from typing import Any, Callable

from .registry import Tool, ToolError

__all__ = ["CalculatorError", "calculate", "calculator_tool", "FUNCTIONS", "CONSTANTS"]

MAX_EXPRESSION_CHARS = 2000
MAX_INT_BITS = 10_000          # ~3000 decimal digits
MAX_FACTORIAL = 1000
MAX_DEPTH = 60                 # nesting: parentheses that hold an operation, unary signs, calls
MAX_NODES = 2000               # operations, numbers and names in one expression


class CalculatorError(ToolError):
    """The expression is not allowed or cannot be computed; the message says why."""


def _log(x: float, base: float | None = None) -> float:
    return math.log(x) if base is None else math.log(x, base)


def _factorial(n: Any) -> int:
    if isinstance(n, float) and n.is_integer():
        n = int(n)
    if not isinstance(n, int) or n < 0:
        raise CalculatorError("factorial takes a non-negative integer")
    if n > MAX_FACTORIAL:
        raise CalculatorError(f"factorial({n}) is too large (limit {MAX_FACTORIAL})")
    return math.factorial(n)


def _round(x: float, ndigits: Any = None) -> float:
    if ndigits is None:
        return round(x)
    if not isinstance(ndigits, int) or abs(ndigits) > 100:
        raise CalculatorError("round's second argument must be an integer of at most 100 digits")
    return round(x, ndigits)


FUNCTIONS: dict[str, Callable[..., Any]] = {
    "sqrt": math.sqrt, "cbrt": lambda x: math.copysign(abs(x) ** (1 / 3), x), "exp": math.exp,
    "log": _log, "ln": math.log, "log10": math.log10, "log2": math.log2,
    "sin": math.sin, "cos": math.cos, "tan": math.tan, "asin": math.asin, "acos": math.acos, "atan": math.atan,
    "atan2": math.atan2, "sinh": math.sinh, "cosh": math.cosh, "tanh": math.tanh,
    "degrees": math.degrees, "radians": math.radians, "hypot": math.hypot,
    "abs": abs, "round": _round, "floor": math.floor, "ceil": math.ceil, "trunc": math.trunc,
    "factorial": _factorial, "gcd": math.gcd, "lcm": math.lcm, "min": min, "max": max,
}
CONSTANTS: dict[str, float] = {"pi": math.pi, "e": math.e, "tau": math.tau}

_ALLOWED_TEXT = (f"numbers, + - * / // % ** ^, parentheses, the functions {', '.join(sorted(FUNCTIONS))} "
                 f"and the constants {', '.join(CONSTANTS)}")


def _bits(x: Any) -> int:
    return x.bit_length() if isinstance(x, int) else 0


def _check_int(x: Any) -> Any:
    if isinstance(x, int) and x.bit_length() > MAX_INT_BITS:
        raise CalculatorError(f"the result would be too large (more than {MAX_INT_BITS} bits)")
    return x


def _power(a: Any, b: Any) -> Any:
    if isinstance(a, int) and isinstance(b, int) and b > 0 and abs(a) > 1:
        # |a|**b has about b*log2|a| bits: refuse before computing 9**387420489
        if b * math.log2(abs(a)) > MAX_INT_BITS:
            raise CalculatorError(f"the result would be too large (more than {MAX_INT_BITS} bits)")
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and a < 0 and not float(b).is_integer():
        raise CalculatorError("a negative number to a fractional power has no real value")
    if isinstance(b, int) and abs(b) > 100_000 and isinstance(a, float):
        b = float(b)  # float ** huge int is fine in float arithmetic (overflow is caught below)
    return a ** b


def _multiply(a: Any, b: Any) -> Any:
    if _bits(a) + _bits(b) > MAX_INT_BITS + 1:
        raise CalculatorError(f"the result would be too large (more than {MAX_INT_BITS} bits)")
    return a * b


def _divide(a: Any, b: Any) -> Any:
    if isinstance(a, int) and isinstance(b, int) and b != 0 and a % b == 0:
        return a // b  # exact integer division keeps big integers exact
    return a / b


_BINOPS: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: _multiply, ast.Div: _divide,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: _power, ast.BitXor: _power,
}
_UNARY: dict[type, Callable[[Any], Any]] = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_REFUSED = {
    ast.Attribute: "attribute access (a.b) is not allowed", ast.Subscript: "indexing (a[b]) is not allowed",
    ast.Lambda: "lambda is not allowed", ast.Compare: "comparisons are not allowed",
    ast.BoolOp: "and/or are not allowed", ast.IfExp: "if/else is not allowed",
    ast.NamedExpr: "assignment is not allowed", ast.Starred: "* unpacking is not allowed",
    ast.JoinedStr: "strings are not allowed", ast.List: "lists are not allowed", ast.Tuple: "tuples are not allowed",
    ast.Dict: "dicts are not allowed", ast.Set: "sets are not allowed",
    ast.ListComp: "comprehensions are not allowed", ast.GeneratorExp: "comprehensions are not allowed",
    ast.SetComp: "comprehensions are not allowed", ast.DictComp: "comprehensions are not allowed",
    ast.Await: "await is not allowed", ast.Yield: "yield is not allowed",
}


def _eval(node: ast.AST, depth: int = 0) -> Any:
    if depth > MAX_DEPTH:
        raise CalculatorError("the expression is nested too deeply")
    if isinstance(node, ast.Constant):
        if isinstance(node.value, bool) or not isinstance(node.value, (int, float)):
            raise CalculatorError(f"only numbers are allowed, not {node.value!r}")
        return _check_int(node.value)
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        # a flat chain like 1 + 2 + ... + 1000 parses left-nested: walk its left spine in a loop, so only
        # real nesting (a right operand holding an operation) counts as depth
        spine = []
        while isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            spine.append(node)
            node = node.left
        value = _eval(node, depth + 1)
        for op_node in reversed(spine):
            value = _check_int(_BINOPS[type(op_node.op)](value, _eval(op_node.right, depth + 1)))
        return value
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_eval(node.operand, depth + 1))
    if isinstance(node, ast.Name):
        if node.id in CONSTANTS:
            return CONSTANTS[node.id]
        if node.id in FUNCTIONS:
            raise CalculatorError(f"{node.id} is a function; call it like {node.id}(x)")
        raise CalculatorError(f"unknown name {node.id!r}; only {_ALLOWED_TEXT} are allowed")
    if isinstance(node, ast.Call):
        if not isinstance(node.func, ast.Name):
            raise CalculatorError(f"only calls of the functions {', '.join(sorted(FUNCTIONS))} are allowed")
        if node.func.id not in FUNCTIONS:
            raise CalculatorError(f"unknown function {node.func.id!r}; allowed: {', '.join(sorted(FUNCTIONS))}")
        if node.keywords:
            raise CalculatorError("keyword arguments are not allowed")
        if len(node.args) > 10:
            raise CalculatorError("too many arguments")
        args = [_eval(a, depth + 1) for a in node.args]
        try:
            return _check_int(FUNCTIONS[node.func.id](*args))
        except TypeError as e:
            raise CalculatorError(f"{node.func.id}: {e}") from None
    if isinstance(node, (ast.BinOp, ast.UnaryOp)):
        op = type(node.op).__name__
        raise CalculatorError(f"the operator {op} is not allowed; only {_ALLOWED_TEXT} are allowed")
    raise CalculatorError(_REFUSED.get(type(node), f"{type(node).__name__} is not allowed") +
                          f"; only {_ALLOWED_TEXT} are allowed")


def _format(x: Any) -> str:
    if isinstance(x, int):
        return str(x)
    if math.isnan(x):
        raise CalculatorError("the result is not a number (NaN)")
    if math.isinf(x):  # float arithmetic overflowed quietly
        raise CalculatorError("the result is too large for a floating-point number")
    return f"{x:.15g}"  # 0.1 + 0.2 -> 0.3, not 0.30000000000000004


def calculate(expression: str) -> str:
    """Evaluate an arithmetic expression and return the result as text."""
    if not isinstance(expression, str) or not expression.strip():
        raise CalculatorError("give an arithmetic expression, for example 2 * (3 + 4)")
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise CalculatorError(f"the expression is too long ({len(expression)} characters, limit "
                              f"{MAX_EXPRESSION_CHARS})")
    text = expression.strip().replace("×", "*").replace("÷", "/").replace("−", "-").replace("√", "sqrt")
    if "__" in text:
        raise CalculatorError(f"names with '__' are not allowed; only {_ALLOWED_TEXT} are allowed")
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError as e:
        raise CalculatorError(f"{expression!r} is not a valid arithmetic expression ({e.msg})") from None
    except (RecursionError, MemoryError):  # the parser's own nesting limit
        raise CalculatorError("the expression is nested too deeply") from None
    nodes = sum(isinstance(n, ast.expr) for n in ast.walk(tree))
    if nodes > MAX_NODES:
        raise CalculatorError(f"the expression has {nodes} parts; the limit is {MAX_NODES}")
    try:
        return _format(_eval(tree.body))
    except ZeroDivisionError:
        raise CalculatorError("division by zero") from None
    except OverflowError:
        raise CalculatorError("the result is too large for a floating-point number") from None
    except ValueError as e:  # math domain errors: sqrt(-1), log(0)
        raise CalculatorError(f"math error: {e}") from None
    except RecursionError:
        raise CalculatorError("the expression is nested too deeply") from None


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression exactly: + - * / // % ** (or ^), parentheses, and functions
    sqrt, cbrt, exp, log(x[, base]), ln, log10, log2, sin, cos, tan, asin, acos, atan, atan2, abs,
    round, floor, ceil, factorial, gcd, lcm, min, max, with constants pi, e and tau. Angles are in radians.

    Args:
        expression: the expression, e.g. "(12.5 * 4) / 3" or "sqrt(2) ^ 2"
    """
    return calculate(expression)


calculator_tool = Tool.from_function(calculator, timeout_s=5.0)
calculator_tool.parameters["properties"]["expression"]["maxLength"] = MAX_EXPRESSION_CHARS
