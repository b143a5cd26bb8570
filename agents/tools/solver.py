"""The `solve_equation` tool: equations and systems solved exactly with sympy.

    solve("2*x + 3 = 7")                         # "x = 2"
    solve("x^2 = 2")                             # "x = -sqrt(2) ≈ -1.41421356237 or x = sqrt(2) ≈ 1.41421356237"
    solve("x + y = 10; x - y = 2")               # "x = 6, y = 4"
    solve("a*x + b = 0", ["x"])                  # "x = -b/a"

Text is parsed by sympy's parse_expr with a restricted global dict (no builtins, only the sympy
constructors its transformations emit and the functions in FUNCTIONS) after a character whitelist
that refuses '__', attribute access, strings, brackets and keywords, so nothing a model writes is
run as Python. Powers are bounded before anything is evaluated, so `x = 9**9**9` is refused at once.
Equations are separated by ';', newlines or top-level commas; 'a = b' or 'a == b'; an expression
without '=' means 'expression = 0'.

sympy runs in a warm worker process (_solver_worker.py), one solve at a time per worker, at most
MAX_WORKERS of them. A solve past SOLVE_TIMEOUT_S kills its worker's process group, so it really stops
(a thread could not be stopped and kept burning a core); the next call starts a fresh worker. A warm
call costs about a millisecond more than solving in-process.
"""

from __future__ import annotations

import atexit
import json
import keyword
import os
import re
import signal
import subprocess
import sys
import threading
import time
from tokenize import TokenError
from typing import Any

import sympy
from sympy.parsing.sympy_parser import auto_number, auto_symbol, convert_xor, implicit_multiplication, parse_expr

from .registry import Tool, ToolError

__all__ = ["SolverError", "solve", "solve_in_process", "solve_equation_tool", "FUNCTIONS"]

MAX_CHARS = 1000
MAX_EQUATIONS = 10
MAX_EXPONENT = 1000          # degree / exponent bound for powers of unknowns
MAX_RESULT_BITS = 100_000    # numeric powers bigger than this are refused
MAX_OUTPUT_CHARS = 4000
SOLVE_TIMEOUT_S = 15.0       # wall-clock time of one solve, then its worker process is killed
MAX_WORKERS = 2              # solves running at once; more calls wait (inside their timeout)

FUNCTIONS: dict[str, Any] = {
    "sqrt": sympy.sqrt, "cbrt": sympy.cbrt, "root": sympy.root, "exp": sympy.exp, "log": sympy.log,
    "ln": sympy.log, "sin": sympy.sin, "cos": sympy.cos, "tan": sympy.tan, "asin": sympy.asin,
    "acos": sympy.acos, "atan": sympy.atan, "sinh": sympy.sinh, "cosh": sympy.cosh, "tanh": sympy.tanh,
    "abs": sympy.Abs, "Abs": sympy.Abs,
}
CONSTANTS: dict[str, Any] = {"pi": sympy.pi, "e": sympy.E, "E": sympy.E}
# the names parse_expr's transformations write into the code it builds; nothing else is reachable
_GLOBALS_BASE: dict[str, Any] = {"Symbol": sympy.Symbol, "Integer": sympy.Integer, "Float": sympy.Float,
                                 "Rational": sympy.Rational, "Add": sympy.Add, "Mul": sympy.Mul,
                                 "Pow": sympy.Pow}
_TRANSFORMS = (auto_symbol, auto_number, implicit_multiplication, convert_xor)
_ALLOWED_CHARS = re.compile(r"^[A-Za-z0-9_+\-*/^().,=;\s]*$")
_NUMBER = re.compile(r"\d+\.\d*|\.\d+")
_CALL = re.compile(r"([A-Za-z_]\w*)\s*\(")
_NAME = re.compile(r"[A-Za-z_]\w*")


class SolverError(ToolError):
    """The equation is not allowed, cannot be parsed, or sympy cannot solve it; the message says why."""


def _split(text: str) -> list[str]:
    """Equations separated by ';', newlines or commas outside parentheses."""
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch in ";\n" or (ch == "," and depth == 0):
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return [p.strip() for p in parts if p.strip()]


def _check_text(text: str) -> None:
    if "__" in text:
        raise SolverError("names with '__' are not allowed")
    if not _ALLOWED_CHARS.match(text):
        bad = sorted({c for c in text if not _ALLOWED_CHARS.match(c)})
        raise SolverError(f"the characters {' '.join(bad)!r} are not allowed; use numbers, letters, "
                          "+ - * / ^ ** ( ) and =")
    if "." in _NUMBER.sub("", text):
        raise SolverError("attribute access (a.b) is not allowed; '.' only as a decimal point")
    for name in _NAME.findall(_NUMBER.sub(" ", text)):
        if keyword.iskeyword(name):
            raise SolverError(f"the word {name!r} is not allowed in an equation")
    for name in _CALL.findall(text):
        if name not in FUNCTIONS:
            raise SolverError(f"unknown function {name!r}; allowed: {', '.join(sorted(FUNCTIONS))} "
                              f"(write {name}*(...) for a product)")


def _check_size(expr: sympy.Expr) -> None:
    """Refuse powers whose value or degree is too large, before anything is evaluated."""
    for node in sympy.preorder_traversal(expr):
        if isinstance(node, sympy.Integer) and int(node).bit_length() > MAX_RESULT_BITS:
            raise SolverError("a number in the equation is too large")
        if not isinstance(node, sympy.Pow):
            continue
        base, exp = node.args
        if exp.free_symbols:
            continue
        e = abs(sympy.N(exp, 15))  # unevaluated nested powers are estimated in floating point
        if not e.is_number or not e.is_finite:
            raise SolverError("an exponent in the equation is not a finite number")
        if base.free_symbols:
            if e > MAX_EXPONENT:
                raise SolverError(f"an exponent of an unknown is too large (limit {MAX_EXPONENT})")
            continue
        b = abs(sympy.N(base, 15))
        if b.is_number and b > 1 and e * sympy.log(b, 2) > MAX_RESULT_BITS:
            raise SolverError(f"a power in the equation is too large (more than {MAX_RESULT_BITS} bits)")


def _parse(side: str, names: dict[str, Any]) -> sympy.Expr:
    # fresh dicts on every call: parse_expr may add to them
    glob = {"__builtins__": {}, **_GLOBALS_BASE, **FUNCTIONS, **CONSTANTS}
    try:
        unevaluated = parse_expr(side, local_dict=dict(names), global_dict=glob, transformations=_TRANSFORMS,
                                 evaluate=False)
        _check_size(unevaluated)
        glob = {"__builtins__": {}, **_GLOBALS_BASE, **FUNCTIONS, **CONSTANTS}
        return parse_expr(side, local_dict=dict(names), global_dict=glob, transformations=_TRANSFORMS)
    except SolverError:
        raise
    except (SyntaxError, TokenError) as e:
        raise SolverError(f"cannot parse {side!r}: {e}") from None
    except (TypeError, ValueError, NameError, AttributeError, sympy.SympifyError) as e:
        raise SolverError(f"cannot read {side!r} as an equation ({type(e).__name__}: {e})") from None


def _equation(text: str, names: dict[str, Any]) -> sympy.Eq | sympy.Expr:
    text = text.replace("==", "=")
    sides = text.split("=")
    if len(sides) > 2:
        raise SolverError(f"{text!r} has more than one '='")
    if any(not s.strip() for s in sides):
        raise SolverError(f"{text!r} has an empty side")
    if len(sides) == 1:
        return _parse(sides[0], names)
    return _parse(sides[0], names) - _parse(sides[1], names)


def _format_value(value: sympy.Expr) -> str:
    text = str(value)
    if value.is_number and value.is_real and not value.is_Rational:
        approx = sympy.N(value, 12)
        if str(approx) != text:
            text += f" ≈ {approx}"
    return text


def solve_in_process(equation: str, variables: list[str] | None = None) -> str:
    """`solve` in this process, with no time limit (the worker process runs this)."""
    if not isinstance(equation, str) or not equation.strip():
        raise SolverError("give an equation, for example 2*x + 3 = 7")
    if len(equation) > MAX_CHARS:
        raise SolverError(f"the equation is too long ({len(equation)} characters, limit {MAX_CHARS})")
    _check_text(equation)
    parts = _split(equation)
    if len(parts) > MAX_EQUATIONS:
        raise SolverError(f"too many equations ({len(parts)}, limit {MAX_EQUATIONS})")
    names: dict[str, Any] = {}
    for v in variables or []:
        if not isinstance(v, str) or not re.fullmatch(r"[A-Za-z]\w{0,30}", v) or "__" in v:
            raise SolverError(f"{v!r} is not a variable name (letters, digits and _)")
        names[v] = sympy.Symbol(v)
    exprs = [_equation(p, names) for p in parts]
    if variables:
        unknowns = [names[v] for v in variables]
    else:
        unknowns = sorted(set().union(*(e.free_symbols for e in exprs)), key=lambda s: s.name)
    if not unknowns:
        values = [sympy.simplify(e) for e in exprs]
        wrong = [v for v in values if v != 0]
        if not wrong:
            return "every value is a solution (the equation always holds)"
        return f"no solution (the equation reduces to {wrong[0]} = 0)"
    try:
        solutions = sympy.solve(exprs, unknowns, dict=True)
    except NotImplementedError as e:
        raise SolverError(f"sympy cannot solve this exactly: {e}") from None
    except (TypeError, ValueError) as e:
        raise SolverError(f"cannot solve: {e}") from None
    if not solutions:
        return "no solution"
    rows = []
    for sol in solutions:
        items = [f"{u} = {_format_value(sol[u])}" for u in unknowns if u in sol]
        rows.append(", ".join(items) if items else "any value (the equation always holds)")
    free = [u.name for u in unknowns if not any(u in s for s in solutions)]
    text = (" or " if len(unknowns) == 1 else "; or ").join(rows)
    if free:
        text += f" (with {', '.join(free)} free)"
    if any("I" in str(v) for sol in solutions for v in sol.values()):
        text += " (I is the imaginary unit)"
    if len(text) > MAX_OUTPUT_CHARS:
        text = text[:MAX_OUTPUT_CHARS] + " [truncated]"
    return text


class _Worker:
    """One worker process, in its own process group, answering one request at a time over pipes."""

    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, "-I", "-m", "hearth.agents.tools._solver_worker"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     text=True, start_new_session=True)

    def ask(self, request: dict, timeout_s: float) -> dict | None:
        """The answer, or None if the worker did not answer in time (or died); then it is killed."""
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        answer: list[str] = []
        reader = threading.Thread(target=lambda: answer.append(self.proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout_s)
        if not answer or not answer[0]:
            self.kill()
            reader.join(1.0)
            return None
        return json.loads(answer[0])

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            try:
                pipe.close()
            except OSError:  # a broken pipe to a killed worker
                pass


class _Pool:
    """Idle warm workers and a bound on busy ones."""

    def __init__(self, size: int):
        self._slots = threading.BoundedSemaphore(size)
        self._idle: list[_Worker] = []
        self._all: list[_Worker] = []
        self._lock = threading.Lock()

    def run(self, request: dict, timeout_s: float) -> dict | None:
        deadline = time.monotonic() + timeout_s
        if not self._slots.acquire(timeout=timeout_s):
            return None
        try:
            with self._lock:
                worker = self._idle.pop() if self._idle else None
            if worker is None or not worker.alive():
                worker = _Worker()
                with self._lock:
                    self._all = [w for w in self._all if w.alive()] + [worker]
            answer = worker.ask(request, max(deadline - time.monotonic(), 0.01))
            if answer is not None and worker.alive():
                with self._lock:
                    self._idle.append(worker)
            return answer
        finally:
            self._slots.release()

    def close(self) -> None:
        with self._lock:
            workers, self._all, self._idle = self._all, [], []
        for w in workers:
            w.kill()


_pool = _Pool(MAX_WORKERS)
atexit.register(_pool.close)


def solve(equation: str, variables: list[str] | None = None, timeout_s: float = SOLVE_TIMEOUT_S) -> str:
    """Solve one equation or a system; the solutions as text ("x = 2", "x = 6, y = 4", "no solution").
    sympy runs in a worker process that is killed if it takes longer than timeout_s."""
    if not isinstance(equation, str) or not equation.strip():
        raise SolverError("give an equation, for example 2*x + 3 = 7")
    if len(equation) > MAX_CHARS:
        raise SolverError(f"the equation is too long ({len(equation)} characters, limit {MAX_CHARS})")
    _check_text(equation)  # the cheap refusals need no worker
    if variables is not None and not (isinstance(variables, list) and all(isinstance(v, str) for v in variables)):
        raise SolverError("variables must be a list of names")
    answer = _pool.run({"equation": equation, "variables": variables}, timeout_s)
    if answer is None:
        raise SolverError(f"solving took longer than {timeout_s:g} s and was stopped; try a simpler equation "
                          "or fewer unknowns")
    if not answer["ok"]:
        raise SolverError(answer["error"])
    return answer["text"]


def solve_equation(equation: str, variables: list[str] | None = None) -> str:
    """Solve an equation or a system of equations exactly (sympy). Use ^ or ** for powers and
    functions like sqrt, exp, log, sin. Example: "2*x + 3 = 7", or "x + y = 10; x - y = 2" for a system.

    Args:
        equation: one equation like "x^2 - 4 = 0", or several separated by ';' for a system
        variables: the unknowns to solve for, e.g. ["x"]; default: every name in the equations
    """
    return solve(equation, variables)


solve_equation_tool = Tool.from_function(solve_equation, timeout_s=SOLVE_TIMEOUT_S + 5.0)  # ours fires first
solve_equation_tool.parameters["properties"]["equation"]["maxLength"] = MAX_CHARS
