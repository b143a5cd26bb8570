"""The bundled agent evaluation sets: arithmetic word problems and tool-selection prompts (en + zh).

    from hearth.agents.evalsets import load_word_problems, load_tool_prompts, numbers_match
    problems = load_word_problems()            # agents/data/arith_word_problems.jsonl, 50 problems
    prompts = load_tool_prompts()              # agents/data/tool_selection.jsonl, 30 prompts
    numbers_match("4.50", problems[0].answer)

`hearth bench agents` (bench/agents.py) runs them; agents/data/README.md describes the row formats.
A bad row raises EvalSetError naming file:line and the field, so a hand-edited or user-supplied file
fails with a message that says what to fix.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DATA_DIR = Path(__file__).parent / "data"
WORD_PROBLEMS_FILE = DATA_DIR / "arith_word_problems.jsonl"
TOOL_PROMPTS_FILE = DATA_DIR / "tool_selection.jsonl"

LANGS = ("en", "zh")
EXPECTED_TOOLS = ("calculator", "solve_equation", "current_datetime", "rag_search", "none")
"""Names of the built-in tools a prompt may expect; "none" means the model should call no tool."""

REL_TOL = 1e-6


class EvalSetError(ValueError):
    """A row of an evaluation file is wrong; the message starts with file:line and names the field."""


@dataclass(frozen=True)
class WordProblem:
    """One arithmetic word problem. `expression` is the arithmetic that yields `answer` (tests recompute it)."""

    id: str
    lang: str
    question: str
    answer: float
    expression: str


@dataclass(frozen=True)
class ToolPrompt:
    """One prompt and the built-in tool (or "none") a good first reply calls."""

    id: str
    lang: str
    prompt: str
    expected_tool: str
    notes: str | None = None


def _rows(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) of each non-blank line; malformed JSON names its line."""
    if not path.is_file():
        raise EvalSetError(f"{path}: no such evaluation file")
    out = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise EvalSetError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise EvalSetError(f"{path}:{lineno}: each line must be a JSON object, got {type(obj).__name__}")
        out.append((lineno, obj))
    if not out:
        raise EvalSetError(f"{path}: the file has no rows")
    return out


class _Row:
    """Field checks of one row; every error names file:line:field."""

    def __init__(self, path: Path, lineno: int, obj: dict[str, Any], allowed: set[str]):
        self.where, self.obj = f"{path}:{lineno}", obj
        unknown = sorted(set(obj) - allowed)
        if unknown:
            raise EvalSetError(f"{self.where}: unknown field(s) {unknown}; allowed: {sorted(allowed)}")

    def fail(self, name: str, why: str) -> EvalSetError:
        return EvalSetError(f"{self.where}:{name}: {why}")

    def text(self, name: str, optional: bool = False) -> str | None:
        v = self.obj.get(name)
        if v is None and optional:
            return None
        if not isinstance(v, str) or not v.strip():
            raise self.fail(name, f"must be a non-empty string, got {v!r}")
        return v

    def choice(self, name: str, options: tuple[str, ...]) -> str:
        v = self.obj.get(name)
        if v not in options:
            raise self.fail(name, f"must be one of {', '.join(options)}, got {v!r}")
        return v

    def number(self, name: str) -> float:
        v = self.obj.get(name)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise self.fail(name, f"must be a finite number, got {v!r}")
        return float(v)


def _unique(path: Path, items: list, linenos: list[int]) -> None:
    seen: dict[str, int] = {}
    for item, lineno in zip(items, linenos):
        if item.id in seen:
            raise EvalSetError(f"{path}:{lineno}:id: {item.id!r} repeats the id of line {seen[item.id]}")
        seen[item.id] = lineno


def load_word_problems(path: str | Path | None = None) -> list[WordProblem]:
    """The word problems of a JSONL file (None: the bundled set), in file order."""
    path = Path(path) if path is not None else WORD_PROBLEMS_FILE
    items, linenos = [], []
    for lineno, obj in _rows(path):
        r = _Row(path, lineno, obj, {"id", "lang", "question", "answer", "expression"})
        items.append(WordProblem(r.text("id"), r.choice("lang", LANGS), r.text("question"), r.number("answer"),
                                 r.text("expression")))
        linenos.append(lineno)
    _unique(path, items, linenos)
    return items


def load_tool_prompts(path: str | Path | None = None) -> list[ToolPrompt]:
    """The tool-selection prompts of a JSONL file (None: the bundled set), in file order."""
    path = Path(path) if path is not None else TOOL_PROMPTS_FILE
    items, linenos = [], []
    for lineno, obj in _rows(path):
        r = _Row(path, lineno, obj, {"id", "lang", "prompt", "expected_tool", "notes"})
        items.append(ToolPrompt(r.text("id"), r.choice("lang", LANGS), r.text("prompt"),
                                r.choice("expected_tool", EXPECTED_TOOLS), r.text("notes", optional=True)))
        linenos.append(lineno)
    _unique(path, items, linenos)
    return items


_NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")
_FRACTION = re.compile(r"([+-]?\d+)\s*/\s*(\d+)")


def _to_float(text: str) -> float | None:
    """A number written as "1,234.5", "-3", "1e3" or "9/4"; anything else is None."""
    s = text.strip().replace(",", "").replace("\u2212", "-")  # U+2212 is the typographic minus
    if _NUMBER.fullmatch(s):
        return float(s)
    m = _FRACTION.fullmatch(s)
    if m and int(m.group(2)) != 0:
        return int(m.group(1)) / int(m.group(2))
    return None


def numbers_match(pred: str | None, gold: float) -> bool:
    """Does the predicted number (already extracted: "42", "4.50", "1,234", "9/4") equal `gold` within a
    relative tolerance of 1e-6? None or text that is not one number never matches."""
    if pred is None:
        return False
    value = _to_float(str(pred))
    if value is None or not math.isfinite(value):
        return False
    return math.isclose(value, gold, rel_tol=REL_TOL, abs_tol=1e-12)
