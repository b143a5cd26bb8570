"""Chain-of-thought: zero-shot (two stages), few-shot with demonstrations picked by similarity, and
self-consistency (sampled paths, majority vote).

    result = await zero_shot_cot(model, "A pen costs 3 yuan. How much do 14 pens cost?")
    result.answer                                   # "42"; result.steps: thought, answer
    pool = DemoPool.bundled(HashingEmbedder())      # agents/reasoning/data/cot_pool.jsonl
    result = await few_shot_cot(model, question, pool=pool, k=3)
    result = await self_consistency(model, question, n=5)
    result.extra                                    # {"votes": {"42": 3, "41": 2}, "agreement": 0.6, "paths": [...]}

Zero-shot follows Kojima et al.: stage 1 asks for reasoning after "Let's think step by step.", stage 2
shows the question and that reasoning and ends with "Therefore, the answer is" to draw out the answer.
Self-consistency (Wang et al.) asks for all paths in one call with n=N and falls back to one call per
missing path for servers that return fewer choices.
"""

from __future__ import annotations

import json
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..embed import Embedder
from ..model import ChatModel
from ..types import AgentInputError, AgentResult, Trace
from .common import BudgetStop, Sampling, assistant, call_model, split_task, user, with_system
from .extract import choice_letters, detect_answer_type, extract_answer, normalize_answer

POOL_PATH = Path(__file__).parent / "data" / "cot_pool.jsonl"
STEP_TRIGGER = "Let's think step by step."
ANSWER_TRIGGER = "Therefore, the answer is"
FEW_SHOT_SYSTEM = ('Solve the problem step by step, like the examples, and end with "The answer is <answer>." '
                   "(in Chinese: 答案是<answer>。).")


@dataclass(frozen=True)
class Demo:
    """One worked example: a question, its reasoning and its answer."""

    question: str
    reasoning: str
    answer: str
    lang: str = "en"
    type: str = "number"
    id: str = ""

    def solution(self) -> str:
        """The reasoning followed by the answer sentence the extractor looks for."""
        end = f"答案是{self.answer}。" if self.lang == "zh" else f"The answer is {self.answer}."
        return f"{self.reasoning} {end}"


def load_demos(path: str | Path = POOL_PATH) -> list[Demo]:
    """Demos from a JSONL file with question, reasoning, answer (lang, type, id optional)."""
    demos = []
    for i, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            demos.append(Demo(row["question"], row["reasoning"], str(row["answer"]), row.get("lang", "en"),
                              row.get("type", "number"), row.get("id", f"{i}")))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise AgentInputError(f"{path} line {i} is not a demo (question, reasoning, answer): {e}",
                                  "demos") from e
    return demos


_BUNDLED: "weakref.WeakKeyDictionary[Any, DemoPool]" = weakref.WeakKeyDictionary()


class DemoPool:
    """Demonstrations chosen by k-nearest-neighbour over their question embeddings (inner product of
    unit vectors = cosine). The pool is embedded once, on the first `select`."""

    def __init__(self, demos: Sequence[Demo], embedder: Embedder):
        if not demos:
            raise AgentInputError("a demonstration pool needs at least one demo", "demos")
        self.demos, self.embedder = list(demos), embedder
        self._vectors: np.ndarray | None = None

    @classmethod
    def bundled(cls, embedder: Embedder) -> "DemoPool":
        """The bundled English/Chinese pool, embedded once per embedder object."""
        try:
            pool = _BUNDLED.get(embedder)
        except TypeError:  # an embedder that cannot be weakly referenced: no cache
            return cls(load_demos(), embedder)
        if pool is None:
            pool = cls(load_demos(), embedder)
            _BUNDLED[embedder] = pool
        return pool

    def select(self, question: str, k: int) -> list[tuple[Demo, float]]:
        """The k demos most similar to `question`, least similar first (the closest sits right before the
        question in the prompt)."""
        if k <= 0:
            return []
        if self._vectors is None:
            self._vectors = self.embedder.embed([d.question for d in self.demos])  # (N, D)
        q = self.embedder.embed([question])[0]  # (D,)
        sims = self._vectors @ q  # (N,)
        # stable order on ties: the earlier demo wins
        top = sorted(range(len(self.demos)), key=lambda i: (-float(sims[i]), i))[:k]
        return [(self.demos[i], float(sims[i])) for i in reversed(top)]


def resolve_answer_type(answer_type: str, question: str) -> str:
    if answer_type == "auto":
        return detect_answer_type(question)
    if answer_type not in ("number", "choice", "text"):
        raise AgentInputError(f"answer_type must be one of auto, number, choice, text; got {answer_type!r}",
                              "answer_type")
    return answer_type


def _what(answer_type: str, letters: str) -> str:
    if answer_type == "number":
        return "the final number (arabic numerals)"
    if answer_type == "choice":
        return f"the letter of the chosen option ({', '.join(letters)})"
    return "the final answer, in a few words"


async def zero_shot_cot(model: ChatModel, task: str | list[dict[str, Any]], *, trace: Trace | None = None,
                        answer_type: str = "auto", sampling: Sampling | None = None) -> AgentResult:
    """Two calls: reasoning after "Let's think step by step.", then the answer after the question, that
    reasoning and "Therefore, the answer is"."""
    trace = trace or Trace()
    history, question = split_task(task)
    kind = resolve_answer_type(answer_type, question)
    letters = choice_letters(question) or "ABCDE"
    first = [*history, user(f"{question}\n\n{STEP_TRIGGER}")]
    try:
        replies = await call_model(model, trace, first, sampling=sampling)
        reasoning = (replies[0].content or "").strip()
        trace.add("thought", reasoning, stage=1)
        second = [*first, assistant(reasoning),
                  user(f"Now give only {_what(kind, letters)}.\n{ANSWER_TRIGGER}")]
        replies = await call_model(model, trace, second, sampling=sampling)
    except BudgetStop as stop:
        return trace.finish(None, stop.reason, answer_type=kind)
    said = (replies[0].content or "").strip()
    answer = extract_answer(said, kind, letters=letters) or extract_answer(reasoning, kind, letters=letters)
    return trace.finish(answer if answer is not None else (said or None), answer_type=kind,
                        extracted=answer is not None, raw_answer=said)


def demo_messages(history: list[dict[str, Any]], question: str,
                  demos: Sequence[tuple[Demo, float]]) -> list[dict[str, Any]]:
    """Few-shot chat: each demo as a user question and an assistant solution, then the question."""
    msgs = with_system(history, FEW_SHOT_SYSTEM)
    for demo, _ in demos:
        msgs += [user(demo.question), assistant(demo.solution())]
    return [*msgs, user(question)]


async def few_shot_cot(model: ChatModel, task: str | list[dict[str, Any]], *, pool: DemoPool,
                       k: int = 3, trace: Trace | None = None, answer_type: str = "auto",
                       sampling: Sampling | None = None) -> AgentResult:
    """One call with the k most similar worked examples in front of the question."""
    trace = trace or Trace()
    history, question = split_task(task)
    kind = resolve_answer_type(answer_type, question)
    letters = choice_letters(question) or "ABCDE"
    demos = pool.select(question, k)
    trace.add("retrieval", "\n".join(d.question for d, _ in demos), source="demos",
              demos=[{"id": d.id, "similarity": round(s, 4)} for d, s in demos])
    try:
        replies = await call_model(model, trace, demo_messages(history, question, demos), sampling=sampling)
    except BudgetStop as stop:
        return trace.finish(None, stop.reason, answer_type=kind)
    text = (replies[0].content or "").strip()
    trace.add("thought", text)
    answer = extract_answer(text, kind, letters=letters)
    return trace.finish(answer if answer is not None else (text or None), answer_type=kind,
                        extracted=answer is not None, demos=[d.id for d, _ in demos])


def majority_vote(answers: Sequence[str | None], answer_type: str) -> tuple[str | None, dict[str, int], float]:
    """(winner, votes, agreement): votes count equal answers (after normalize_answer) under the first
    spelling seen; ties go to the answer seen first; agreement = winner's count / paths with an answer."""
    counts: dict[str, int] = {}
    shown: dict[str, str] = {}
    for a in answers:
        if a is None:
            continue
        key = normalize_answer(a, answer_type)
        shown.setdefault(key, a)
        counts[key] = counts.get(key, 0) + 1
    if not counts:
        return None, {}, 0.0
    # max() keeps the first of equal counts, and dicts keep first-seen order
    best = max(counts, key=lambda key: counts[key])
    valid = sum(counts.values())
    return shown[best], {shown[key]: c for key, c in counts.items()}, counts[best] / valid


async def self_consistency(model: ChatModel, task: str | list[dict[str, Any]], *, n: int = 5,
                           trace: Trace | None = None, answer_type: str = "auto",
                           sampling: Sampling | None = None, pool: DemoPool | None = None,
                           k: int = 3) -> AgentResult:
    """N sampled reasoning paths (temperature 0.7 unless `sampling` sets one), one answer per path,
    majority vote. With a `pool`, each path starts from k few-shot demos; else zero-shot."""
    trace = trace or Trace()
    history, question = split_task(task)
    kind = resolve_answer_type(answer_type, question)
    letters = choice_letters(question) or "ABCDE"
    sampling = sampling or Sampling()
    if sampling.temperature is None:
        sampling = Sampling(0.7, sampling.max_tokens, sampling.seed)
    if pool is not None and k > 0:
        demos = pool.select(question, k)
        trace.add("retrieval", "\n".join(d.question for d, _ in demos), source="demos",
                  demos=[{"id": d.id, "similarity": round(s, 4)} for d, s in demos])
        messages = demo_messages(history, question, demos)
    else:
        messages = [*history, user(f'{question}\n\n{STEP_TRIGGER} End with "The answer is <answer>."')]

    texts: list[str] = []
    stopped = "answer"
    try:
        replies = await call_model(model, trace, messages, sampling=sampling, n=n)
        texts += [(r.content or "").strip() for r in replies[:n]]
        # a server that ignores n: one call per missing path, each with its own seed
        while len(texts) < n:
            s = sampling if sampling.seed is None else Sampling(sampling.temperature, sampling.max_tokens,
                                                                 sampling.seed + len(texts))
            replies = await call_model(model, trace, messages, sampling=s)
            texts.append((replies[0].content or "").strip())
    except BudgetStop as stop:
        stopped = stop.reason
    answers = []
    for i, text in enumerate(texts):
        a = extract_answer(text, kind, letters=letters)
        answers.append(a)
        trace.add("sample", text, path=i, answer=a)
    answer, votes, agreement = majority_vote(answers, kind)
    valid = sum(a is not None for a in answers)
    trace.add("vote", f"{answer} ({votes.get(answer, 0) if answer is not None else 0}/{valid})", votes=votes,
              agreement=round(agreement, 4), paths=len(texts), valid=valid)
    extra = {"votes": votes, "agreement": agreement, "valid": valid, "answer_type": kind,
             "paths": [{"text": t, "answer": a} for t, a in zip(texts, answers)]}
    if answer is None and stopped == "answer":
        trace.add("error", f"none of the {len(texts)} paths gave a {kind} answer")
        return trace.finish(None, "error", **extra)
    # when the budget cut the sampling short, `stopped` says so and the vote is over the paths there are
    return trace.finish(answer, stopped, **extra)
