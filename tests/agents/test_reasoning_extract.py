"""Answer extraction, vote, score and list parsing, and the bundled CoT demonstration pool.

    nice -n 10 .venv/bin/python -m pytest tests/agents/test_reasoning_extract.py -q
"""

from __future__ import annotations

import ast
import json
import operator
from fractions import Fraction

import pytest

from hearth.agents.reasoning import (canonical_number, chinese_numeral, choice_letters, detect_answer_type,
                                     extract_answer, load_demos, majority_vote, numbered_items, parse_plan,
                                     parse_score)
from hearth.agents.reasoning.cot import POOL_PATH

NUMBER_CASES = [
    ("So 3 × 14 = 42. The answer is 42.", "42"),
    ("First 6 apples, then 7 more: 6 + 7 = 13", "13"),                 # no marker: the last number
    ("The answer is 42, because 6 × 7 = 42 and 40 + 2 = 42", "42"),    # after the marker: the first
    ("The total is $1,234,567.50", "1234567.5"),                       # thousands commas
    ("1, 2, 3", "3"),                                                   # a list is not 123
    ("10-3 = 7 but the temperature is -3", "-3"),                      # subtraction is not a sign
    ("The answer is −5", "-5"),                                         # unicode minus
    ("The answer is 15 + 8 = 23.", "23"),                               # the result after "=", not 15
    ("答案是 3 × 4 = 12。", "12"),
    ("The answer is 3/4", "0.75"),                                      # fractions, canonical
    ("The answer is 6/4", "1.5"),
    ("The answer is 1/3", "1/3"),
    ("x = 2.50", "2.5"),
    ("The answer is 42.0.", "42"),
    ("Final Answer: 17", "17"),
    ("#### 99", "99"),
    ("so $\\boxed{12}$ and the check gives 13", "12"),
    ("答案是42。", "42"),
    ("一共有 5 + 7 = 12 个苹果，所以答案是 12 个。", "12"),
    ("答案：１，２３４", "1234"),                                        # full-width digits and comma
    ("答案为－７", "-7"),
    ("所以答案是四十二。", "42"),                                        # Chinese numerals after the marker
    ("最终答案：一万零五", "10005"),
    ("他走了一个小时，共 3.5 千米", "3.5"),                               # 一 in 一个 is not a number
    ("No numbers here.", None),
]


@pytest.mark.parametrize("text,expected", NUMBER_CASES)
def test_number_extraction(text, expected):
    assert extract_answer(text, "number") == expected


CHOICE_CASES = [
    ("Therefore, among A through D, the answer is (C).", "ABCD", "C"),
    ("B", "ABCD", "B"),
    ("(D)", "ABCD", "D"),
    ("A train leaves at noon, so I pick option b", "ABCD", "B"),
    ("A is wrong and (B) is right", "ABCD", "B"),
    ("答案是C", "ABCD", "C"),
    ("分析后选Ｂ。", "ABCD", "B"),                                       # full-width letter
    ("The answer is E", "ABCD", None),                                  # not an option of this question
]


@pytest.mark.parametrize("text,letters,expected", CHOICE_CASES)
def test_choice_extraction(text, letters, expected):
    assert extract_answer(text, "choice", letters=letters) == expected


TEXT_CASES = [
    ("Final Answer: Paris.", "Paris"),
    ("Let me think.\nThe capital is big.\nThe answer is **Carol**.", "Carol"),
    ("答案是：乙。", "乙"),
    ("Just yes", "Just yes"),
    ("", None),
]


@pytest.mark.parametrize("text,expected", TEXT_CASES)
def test_text_extraction(text, expected):
    assert extract_answer(text, "text") == expected


@pytest.mark.parametrize("question,kind", [
    ("How many apples are left?", "number"),
    ("What is 17 * 23?", "number"),
    ("小明有几个苹果？", "number"),
    ("一共要付多少钱？", "number"),
    ("Which is prime? (A) 21 (B) 29 (C) 33", "choice"),
    ("下列哪个正确？\nA. 甲\nB. 乙\nC. 丙", "choice"),
    ("What is the capital of France?", "text"),
    ("Who wrote the 1984 novel?", "text"),
])
def test_detect_answer_type(question, kind):
    assert detect_answer_type(question) == kind


def test_unknown_answer_type_is_an_error():
    with pytest.raises(ValueError, match="unknown answer type"):
        extract_answer("42", "integer")


def test_helpers():
    assert canonical_number(Fraction(-1, 2)) == "-0.5"
    assert chinese_numeral("十二") == 12 and chinese_numeral("两百零三") == 203
    assert choice_letters("(A) x (B) y (C) z") == "ABC" and choice_letters("plain") == ""


def test_majority_vote_agreement_and_ties():
    assert majority_vote(["42", "41", "42", None, "42", "41"], "number") == ("42", {"42": 3, "41": 2}, 0.6)
    # a tie goes to the answer seen first, whatever the order of the later ones
    assert majority_vote(["7", "8", "8", "7"], "number")[0] == "7"
    assert majority_vote(["8", "7", "7", "8"], "number")[0] == "8"
    # text answers that differ only in case, articles and punctuation are one answer
    winner, votes, ratio = majority_vote(["The Eiffel Tower.", "eiffel tower", "Louvre"], "text")
    assert winner == "The Eiffel Tower." and votes == {"The Eiffel Tower.": 2, "Louvre": 1}
    assert ratio == pytest.approx(2 / 3)
    assert majority_vote([None, None], "number") == (None, {}, 0.0)


@pytest.mark.parametrize("text,score", [
    ("Score: 8", 8.0), ("I'd give it 7/10.", 7.0), ("评分：9", 9.0), ("sure", 10.0), ("likely", 5.0),
    ("This is impossible.", 1.0), ("unlikely to work", 3.0), ("不可能", 1.0), ("6", 6.0), ("Score: 15", 10.0),
    ("no idea", None),
])
def test_parse_score(text, score):
    assert parse_score(text) == score


def test_numbered_items_and_plans():
    assert numbered_items("Plan:\n1. Find the price\n2) Multiply by 3\nStep 3: Add tax") == [
        "Find the price", "Multiply by 3", "Add tax"]
    assert numbered_items("第一步：算单价\n第二步：乘以数量") == ["算单价", "乘以数量"]
    assert numbered_items("- look up\n- compute") == ["look up", "compute"]
    assert numbered_items("just prose") == []
    assert parse_plan("just do it", 5) == ["just do it"]
    assert parse_plan("\n".join(f"{i}. s{i}" for i in range(1, 10)), 4) == ["s1", "s2", "s3", "s4"]


_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def _exact(node: ast.AST) -> Fraction:
    """Exact value of the pool's own check expressions (+ - * / and numbers only)."""
    if isinstance(node, ast.Expression):
        return _exact(node.body)
    if isinstance(node, ast.Constant):
        return Fraction(str(node.value))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -_exact(node.operand)
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        return _OPS[type(node.op)](_exact(node.left), _exact(node.right))
    raise ValueError(f"unexpected node {ast.dump(node)}")


def test_bundled_pool_answers_are_right():
    demos = load_demos()
    assert len(demos) >= 30
    assert {d.lang for d in demos} == {"en", "zh"} and {d.type for d in demos} == {"number", "choice", "text"}
    rows = [json.loads(line) for line in POOL_PATH.read_text(encoding="utf-8").splitlines()]
    for demo, row in zip(demos, rows):
        if demo.type == "number":
            # the answer equals the exact value of the check expression, and the reasoning ends on it
            exact = canonical_number(_exact(ast.parse(row["expr"], mode="eval")))
            assert extract_answer(demo.answer, "number") == exact, demo.id
            assert extract_answer(demo.reasoning, "number") == extract_answer(demo.answer, "number"), demo.id
            assert extract_answer(demo.solution(), "number") == extract_answer(demo.answer, "number"), demo.id
        elif demo.type == "choice":
            assert demo.answer in choice_letters(demo.question), demo.id
            assert extract_answer(demo.solution(), "choice", letters=choice_letters(demo.question)) == demo.answer
        else:
            assert extract_answer(demo.solution(), "text") == demo.answer, demo.id
