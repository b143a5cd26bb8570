"""The bundled evaluation sets: every arithmetic answer recomputed, every row valid, bad rows named."""

from __future__ import annotations

import ast
import json
import operator
from collections import Counter

import pytest

from hearth.agents.evalsets import (
    EXPECTED_TOOLS,
    EvalSetError,
    load_tool_prompts,
    load_word_problems,
    numbers_match,
)

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}


def arithmetic(expression: str) -> float:
    """Evaluate + - * / and parentheses over number literals by walking the AST; any other node fails."""
    def walk(node: ast.AST) -> float:
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            return _BINARY[type(node.op)](walk(node.left), walk(node.right))
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            return _UNARY[type(node.op)](walk(node.operand))
        raise ValueError(f"not plain arithmetic: {ast.dump(node)}")

    return walk(ast.parse(expression, mode="eval"))


def test_the_arithmetic_helper_refuses_anything_but_arithmetic():
    assert arithmetic("2 * (7 + 3) - -1") == 21
    for bad in ("__import__('os')", "x + 1", "2 ** 8", "[1][0]", "'a' * 3"):
        with pytest.raises(ValueError):
            arithmetic(bad)


def test_every_word_problem_answer_is_its_expression():
    problems = load_word_problems()
    for p in problems:
        assert numbers_match(repr(arithmetic(p.expression)), p.answer), (p.id, p.expression, p.answer)


def test_word_problems_cover_both_languages_with_unique_ids():
    problems = load_word_problems()
    langs = Counter(p.lang for p in problems)
    assert len(problems) == 50 and langs == {"en": 30, "zh": 20}
    assert len({p.id for p in problems}) == len(problems)
    for p in problems:
        assert p.id.startswith(p.lang + "-")
        # a Chinese question is written in Chinese, an English one is not
        has_cjk = any("\u4e00" <= ch <= "\u9fff" for ch in p.question)
        assert has_cjk == (p.lang == "zh"), p.id
        # small grade-school answers: integers or at most two decimals
        assert abs(p.answer) < 10_000 and round(p.answer, 2) == p.answer, p.id


def test_tool_prompts_cover_every_tool_in_both_languages():
    prompts = load_tool_prompts()
    assert len(prompts) == 30 and Counter(p.lang for p in prompts) == {"en": 18, "zh": 12}
    assert len({p.id for p in prompts}) == len(prompts)
    for lang in ("en", "zh"):
        assert {p.expected_tool for p in prompts if p.lang == lang} == set(EXPECTED_TOOLS)
    for p in prompts:
        assert any("\u4e00" <= ch <= "\u9fff" for ch in p.prompt) == (p.lang == "zh"), p.id


@pytest.mark.parametrize("pred, gold, ok", [
    ("42", 42, True), ("42.0", 42, True), (" 4.50 ", 4.5, True), ("1,234", 1234, True), ("-3", -3, True),
    ("9/4", 2.25, True), ("0", 0.0, True), ("2.250001", 2.25, True), ("2.2501", 2.25, False), ("43", 42, False),
    ("1e3", 1000, True), (None, 1, False), ("", 1, False), ("forty-two", 42, False), ("42 apples", 42, False),
    ("1/0", 1, False), ("inf", 1, False), ("nan", 1, False),
])
def test_numbers_match(pred, gold, ok):
    assert numbers_match(pred, gold) is ok


def test_relative_tolerance_scales_with_the_answer():
    assert numbers_match("1000000.5", 1_000_000)  # within 1e-6 relative
    assert not numbers_match("1000002", 1_000_000)


def _write(tmp_path, rows):
    path = tmp_path / "set.jsonl"
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in rows) + "\n",
                    encoding="utf-8")
    return path


GOOD = {"id": "a", "lang": "en", "question": "1+1?", "answer": 2, "expression": "1 + 1"}


@pytest.mark.parametrize("bad, where", [
    ({**GOOD, "lang": "fr"}, ":2:lang"),
    ({**GOOD, "answer": "2"}, ":2:answer"),
    ({**GOOD, "answer": True}, ":2:answer"),
    ({**GOOD, "question": "  "}, ":2:question"),
    ({k: v for k, v in GOOD.items() if k != "expression"}, ":2:expression"),
    ({**GOOD, "id": "a"}, ":2:id"),  # repeats line 1
    ({**GOOD, "id": "b", "extra": 1}, ":2: unknown field"),
    ("{not json", ":2: not valid JSON"),
    ("[1, 2]", ":2: each line must be a JSON object"),
])
def test_bad_word_problem_rows_name_file_line_and_field(tmp_path, bad, where):
    path = _write(tmp_path, [GOOD, bad])
    with pytest.raises(EvalSetError) as e:
        load_word_problems(path)
    assert str(e.value).startswith(f"{path}{where}"), str(e.value)


def test_bad_tool_prompt_rows_name_file_line_and_field(tmp_path):
    row = {"id": "t", "lang": "zh", "prompt": "现在几点？", "expected_tool": "clock"}
    path = _write(tmp_path, ["", row])  # the blank line still counts
    with pytest.raises(EvalSetError, match=rf"^{path}:2:expected_tool: must be one of calculator"):
        load_tool_prompts(path)
    path = _write(tmp_path, [{**row, "expected_tool": "none", "notes": 3}])
    with pytest.raises(EvalSetError, match=rf"^{path}:1:notes"):
        load_tool_prompts(path)
    assert load_tool_prompts(_write(tmp_path, [{**row, "expected_tool": "none"}]))[0].notes is None


def test_missing_or_empty_files_say_so(tmp_path):
    with pytest.raises(EvalSetError, match="no such evaluation file"):
        load_word_problems(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(EvalSetError, match="no rows"):
        load_tool_prompts(tmp_path / "empty.jsonl")
