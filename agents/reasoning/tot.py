"""Tree-of-Thought, breadth-first (Yao et al.): propose next thoughts, score each partial solution with
the model, keep the best few, go one level deeper.

    result = await tree_of_thought(model, "Use 4, 6, 8 and 2 once each with + - * / to make 24.",
                                   beam=2, branch=3, depth=3)
    result.answer, result.extra["best_path"], result.extra["best_score"]

At each depth every kept state gets one proposal call listing `branch` candidate next thoughts; each
candidate gets one evaluation call asking for "Score: 1-10" (or sure / likely / impossible); the `beam`
best (ties: the earlier) are kept. The search stops when the best state holds a final answer, or at
`depth`, where one more call turns the best state into an answer. Calls: 1 + branch at depth 1,
beam × (1 + branch) at each deeper level, plus the final one.
"""

from __future__ import annotations

import re
from typing import Any

from ..model import ChatModel
from ..types import AgentInputError, AgentResult, Budget, Trace
from .common import BudgetStop, Sampling, ask, numbered_items, split_task, user
from .cot import resolve_answer_type
from .extract import choice_letters, fold
from .plan import final_answer

_SOLVED = re.compile(r"final\s+answer\s*[:：]|the\s+answer\s+is|答案\s*(?:是|为|[:：])|最终答案", re.IGNORECASE)
# the order matters: "impossible" holds "possible", "不太可能" holds "可能", "not sure" holds "sure"
_SCORE_WORDS = ((re.compile(r"impossible|不可能"), 1.0), (re.compile(r"unlikely|not\s+sure|不太可能"), 3.0),
                (re.compile(r"\bsure\b|certain|确定|肯定"), 10.0), (re.compile(r"\blikely\b|可能"), 5.0))


def parse_score(text: str) -> float | None:
    """A 1-10 score from an evaluation: "Score: 8", "8/10", "评分：8", a bare "8", or sure (10) /
    likely (5) / unlikely (3) / impossible (1) and their Chinese words. None when the reply holds none of these."""
    t = fold(text or "").strip()
    for pattern in (r"(\d+(?:\.\d+)?)\s*/\s*10\b", r"(?:score|rating|评分|分数|得分)\s*(?:is|为|是)?\s*[:：]?\s*"
                                                   r"(\d+(?:\.\d+)?)"):
        m = re.search(pattern, t, re.IGNORECASE)
        if m:
            return max(0.0, min(10.0, float(m.group(1))))
    for pattern, value in _SCORE_WORDS:
        if pattern.search(t.lower()):
            return value
    m = re.fullmatch(r"\D{0,3}(\d+(?:\.\d+)?)\D{0,3}", t)
    return max(0.0, min(10.0, float(m.group(1)))) if m else None


def tot_model_calls(beam: int, branch: int, depth: int) -> int:
    """The most model calls a search makes: proposals and scores at each depth, and the final call."""
    return (1 + branch) + (depth - 1) * beam * (1 + branch) + 1


def _path_text(path: list[str]) -> str:
    return "\n".join(f"{i}. {t}" for i, t in enumerate(path, 1))


def propose_prompt(question: str, path: list[str], branch: int) -> str:
    so_far = f"Steps so far:\n{_path_text(path)}\n\n" if path else ""
    return (f"Question: {question}\n\n{so_far}Propose {branch} different possible next steps toward the answer, "
            f"as a numbered list, one line each. If a step reaches the answer, write it as "
            f'"Final Answer: <answer>".')


def evaluate_prompt(question: str, path: list[str]) -> str:
    return (f"Question: {question}\n\nPartial solution:\n{_path_text(path)}\n\n"
            "Check these steps. How likely do they lead to a correct answer? Reply with a score from 1 "
            '(impossible) to 10 (sure) as "Score: <n>".')


async def tree_of_thought(model: ChatModel, task: str | list[dict[str, Any]], *, beam: int = 2,
                          branch: int = 3, depth: int = 3, trace: Trace | None = None,
                          answer_type: str = "auto", sampling: Sampling | None = None) -> AgentResult:
    """Breadth-first search over thoughts with model-scored pruning; see the module docstring. Without a
    trace, the budget allows the whole search (tot_model_calls)."""
    for name, v in (("beam", beam), ("branch", branch), ("depth", depth)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise AgentInputError(f"{name} must be an integer >= 1, got {v!r}", name)
    trace = trace or Trace(Budget(max_steps=tot_model_calls(beam, branch, depth), time_s=300.0))
    history, question = split_task(task)
    kind = resolve_answer_type(answer_type, question)
    letters = choice_letters(question) or "ABCDE"
    frontier: list[tuple[list[str], float]] = [([], 0.0)]
    best: tuple[list[str], float] | None = None

    def extra() -> dict[str, Any]:
        return {"best_path": list(best[0]) if best else [], "best_score": best[1] if best else None,
                "answer_type": kind}

    try:
        for level in range(1, depth + 1):
            candidates: list[list[str]] = []
            for parent, (path, _) in enumerate(frontier):
                text = await ask(model, trace, [*history, user(propose_prompt(question, path, branch))],
                                 sampling=sampling)
                thoughts = (numbered_items(text) or ([text] if text else []))[:branch]
                for t in thoughts:
                    trace.add("thought", t, depth=level, parent=parent, candidate=len(candidates))
                    candidates.append([*path, t])
            if not candidates:
                break
            scored: list[tuple[list[str], float]] = []
            for idx, path in enumerate(candidates):
                text = await ask(model, trace, [*history, user(evaluate_prompt(question, path))],
                                 sampling=sampling)
                score = parse_score(text)
                trace.add("score", text, depth=level, candidate=idx, score=score if score is not None else 0.0,
                          parsed=score is not None)
                scored.append((path, score if score is not None else 0.0))
            # sorted() is stable: equal scores keep proposal order
            frontier = sorted(scored, key=lambda ps: -ps[1])[:beam]
            best = frontier[0]
            if _SOLVED.search(best[0][-1]):
                answer = final_answer(best[0][-1], kind, letters)
                if answer is not None:
                    return trace.finish(answer, **extra())
        if best is None:
            trace.add("error", "the model proposed no thoughts")
            return trace.finish(None, "error", **extra())
        text = await ask(model, trace, [*history, user(
            f"Question: {question}\n\nReasoning:\n{_path_text(best[0])}\n\n"
            f'Using this reasoning, give the answer. End with "Final Answer: <answer>".')], sampling=sampling)
    except BudgetStop as stop:
        return trace.finish(None, stop.reason, **extra())
    trace.add("thought", text, final=True)
    answer = final_answer(text, kind, letters)
    return trace.finish(answer if answer is not None else (text or None), extracted=answer is not None,
                        **extra())
