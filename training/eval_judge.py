"""Pairwise LLM-as-judge against reference answers (BELLE's evaluation-set format), over HTTP.

    hearth eval judge --model-url http://127.0.0.1:8000 --model my-sft \\
        --judge-url https://api.example.com/v1 --judge-model big-judge [--data eval_set.jsonl]

The candidate model answers each question; the judge then compares the candidate's answer with the
reference twice, once in each position (A/B), because judges favour one position. Each order gives the
candidate 1 (better), 0.5 (tie) or 0 (worse); the question's score is the mean of the two, so a candidate
as good as the reference scores 0.5. A judge reply with no readable verdict counts as a tie, with a
warning. Scores are reported per category (BELLE's `class`) and overall.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .common import TrainingConfigError, TrainingDataError, atomic_write_text, bundled, progress
from .eval_openai import TeacherError, async_client, chat

BUNDLED_JUDGE_SET = Path(__file__).resolve().parent / "data" / "judge_set.jsonl"

JUDGE_SYSTEM = "You are a careful, impartial judge of answers written by AI assistants."
JUDGE_RUBRIC = """Compare the two answers to the user's question below.

Judge in this order: first correctness (facts, arithmetic, code that works), then whether the answer does
what was asked, then completeness, clarity and concision. If the question is in Chinese, an answer not in
Chinese is worse. Ignore the order in which the answers appear and their length as such; do not guess
which assistant wrote which.

[Question]
{question}

[Answer A]
{a}

[Answer B]
{b}

Explain your reasoning in a few sentences. Then, on the last line, write exactly one of:
Verdict: A
Verdict: B
Verdict: tie"""

# Candidate's score for each verdict, by the candidate's position.
_SCORE = {"A": {"A": 1.0, "B": 0.0, "tie": 0.5}, "B": {"A": 0.0, "B": 1.0, "tie": 0.5}}


class MalformedVerdictWarning(UserWarning):
    """A judge reply held no verdict; it was counted as a tie."""


_OPT = r"[\s*_`'\"\[\]()（）【】]*"
_WHO = r"(?:(?:assistant|answer|response|回答|答案|助手)\s*)?"
_VERDICT_PATTERNS = [
    # "Verdict: A", "**Verdict:** [[B]]", "Final verdict - tie", "裁决：A", "结论：平局"
    re.compile(r"(?:final\s+)?(?:verdict|decision|winner|裁决|判决|结论|判定|胜者)" + _OPT + r"[:：\-–]" + _OPT + _WHO
               + r"(A|B|tie|draw|equal|平局|平手|持平)(?![A-Za-z])", re.IGNORECASE),
    # MT-bench style: [[A]], [[B]], [[C]] (C is a tie)
    re.compile(r"\[\[\s*(A|B|C|tie)\s*\]\]", re.IGNORECASE),
]
_TIE_WORDS = {"tie", "draw", "equal", "c", "平局", "平手", "持平"}


def parse_verdict(reply: str) -> str | None:
    """"A", "B" or "tie" from a judge's reply (the last verdict it states); None if it states none."""
    text = re.sub(r"<think>.*?</think>", "", reply or "", flags=re.DOTALL | re.IGNORECASE)
    found: list[tuple[int, str]] = []
    for pat in _VERDICT_PATTERNS:
        found += [(m.start(), m.group(1)) for m in pat.finditer(text)]
    if not found:
        return None
    word = max(found)[1].strip().lower()
    return "tie" if word in _TIE_WORDS else word.upper()


@dataclass
class JudgeItem:
    id: str
    question: str
    reference: str
    category: str


def read_judge_set(path: str | Path) -> list[JudgeItem]:
    """BELLE eval-set records, one JSON object a line (or one JSON list): question (or instruction),
    std_answer (or reference / answer / output), class (or category), optional id."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TrainingDataError(path, None, None, "no such file") from None
    if text.lstrip().startswith("["):
        try:
            rows = [(i + 1, r) for i, r in enumerate(json.loads(text))]
        except json.JSONDecodeError as e:
            raise TrainingDataError(path, e.lineno, None, f"not valid JSON ({e.msg})") from None
    else:
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append((n, json.loads(line)))
                except json.JSONDecodeError as e:
                    raise TrainingDataError(path, n, None, f"not valid JSON ({e.msg})") from None
    items = []
    for n, rec in rows:
        if not isinstance(rec, dict):
            raise TrainingDataError(path, n, None, "each record must be a JSON object")

        def pick(names: tuple[str, ...], required: bool = True) -> str:
            for k in names:
                if isinstance(rec.get(k), str) and rec[k].strip():
                    return rec[k].strip()
            if required:
                raise TrainingDataError(path, n, names[0], f"missing (also accepted: {', '.join(names[1:])})")
            return "other"

        items.append(JudgeItem(id=str(rec.get("id", n)), question=pick(("question", "instruction")),
                               reference=pick(("std_answer", "reference", "answer", "output")),
                               category=pick(("class", "category", "type"), required=False)))
    if not items:
        raise TrainingDataError(path, None, None, "holds no questions")
    return items


@dataclass
class JudgeConfig:
    """`hearth eval judge`: a candidate model against reference answers, judged by another model."""

    model_url: str
    """OpenAI-compatible server of the candidate (http://host:port or .../v1)."""
    model: str
    """The candidate's model name on that server."""
    judge_url: str
    judge_model: str
    data: str | None = None
    """BELLE-style eval set (JSONL); None: the bundled training/data/judge_set.jsonl."""
    api_key: str | None = None
    """Key for the candidate's server (default $OPENAI_API_KEY)."""
    judge_api_key: str | None = None
    """Key for the judge's server (default: api_key, then $OPENAI_API_KEY)."""
    concurrency: int = 4
    """Most requests in flight at once, over both servers."""
    timeout_s: float = 120.0
    max_retries: int = 3
    """Retries per request (exponential backoff) on connection errors, 429 and 5xx."""
    answer_max_tokens: int = 512
    judge_max_tokens: int = 512
    temperature: float = 0.0
    """Sampling temperature of the candidate's answers (the judge always runs at 0)."""
    limit: int | None = None
    """Only the first `limit` questions."""
    output: str | None = None
    """Write the full result (answers, judge replies, verdicts) as JSON here."""

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise TrainingConfigError(f"concurrency must be >= 1; got {self.concurrency}")
        if self.timeout_s <= 0:
            raise TrainingConfigError(f"timeout_s must be > 0; got {self.timeout_s}")
        if self.max_retries < 0:
            raise TrainingConfigError(f"max_retries must be >= 0; got {self.max_retries}")
        if self.limit is not None and self.limit < 1:
            raise TrainingConfigError(f"limit must be >= 1; got {self.limit}")
        for name in ("answer_max_tokens", "judge_max_tokens"):
            if getattr(self, name) < 1:
                raise TrainingConfigError(f"{name} must be >= 1; got {getattr(self, name)}")


@dataclass
class JudgeRecord:
    id: str
    category: str
    question: str
    reference: str
    answer: str = ""
    judge_replies: list[str] = field(default_factory=list)
    """The judge's replies: [candidate as A, candidate as B]."""
    verdicts: list[str] = field(default_factory=list)
    """Parsed verdicts ("A"/"B"/"tie"), same order; a malformed reply reads "tie"."""
    order_scores: list[float] = field(default_factory=list)
    """The candidate's score in each order (1 better, 0.5 tie, 0 worse)."""
    score: float | None = None
    malformed: int = 0
    error: str | None = None


@dataclass
class CategoryScore:
    n: int = 0
    score: float = 0.0
    """Mean candidate score (0.5 = as good as the reference)."""
    wins: int = 0
    ties: int = 0
    losses: int = 0
    consistent: int = 0
    """Questions where both orders gave the same outcome (a position-bias check)."""


@dataclass
class JudgeResult:
    score: float
    n: int
    categories: dict[str, CategoryScore]
    records: list[JudgeRecord]
    malformed: int
    errors: int
    seconds: float = 0.0

    def summary(self) -> dict[str, Any]:
        return {"score": self.score, "n": self.n, "malformed": self.malformed, "errors": self.errors,
                "categories": {c: asdict(v) for c, v in self.categories.items()}}

    def to_dict(self) -> dict[str, Any]:
        return dict(self.summary(), seconds=self.seconds, records=[asdict(r) for r in self.records])


def _outcome(s: float) -> str:
    return "win" if s > 0.5 else "loss" if s < 0.5 else "tie"


async def _judge_all(cfg: JudgeConfig, items: list[JudgeItem], bar: Any) -> list[JudgeRecord]:
    cand = async_client(cfg.model_url, cfg.api_key, cfg.timeout_s, cfg.max_retries)
    jclient = async_client(cfg.judge_url, cfg.judge_api_key or cfg.api_key, cfg.timeout_s, cfg.max_retries)
    gate = asyncio.Semaphore(cfg.concurrency)

    async def limited(client, model: str, messages: list[dict], max_tokens: int, temperature: float) -> str:
        async with gate:
            return await chat(client, model, messages, max_tokens=max_tokens, temperature=temperature)

    async def judge_once(rec: JudgeRecord, cand_pos: str) -> tuple[str, str, bool]:
        a, b = (rec.answer, rec.reference) if cand_pos == "A" else (rec.reference, rec.answer)
        prompt = JUDGE_RUBRIC.format(question=rec.question, a=a.strip() or "(empty answer)",
                                     b=b.strip() or "(empty answer)")
        reply = await limited(jclient, cfg.judge_model, [{"role": "system", "content": JUDGE_SYSTEM},
                                                         {"role": "user", "content": prompt}],
                              cfg.judge_max_tokens, 0.0)
        verdict = parse_verdict(reply)
        if verdict is None:
            warnings.warn(f"question {rec.id}: the judge's reply (candidate as {cand_pos}) states no verdict; "
                          f"counted as a tie. Reply: {reply.strip()[:200]!r}", MalformedVerdictWarning,
                          stacklevel=2)
        return reply, verdict or "tie", verdict is None

    async def one(item: JudgeItem) -> JudgeRecord:
        rec = JudgeRecord(item.id, item.category, item.question, item.reference)
        try:
            rec.answer = await limited(cand, cfg.model, [{"role": "user", "content": item.question}],
                                       cfg.answer_max_tokens, cfg.temperature)
            outs = await asyncio.gather(judge_once(rec, "A"), judge_once(rec, "B"))
        except TeacherError as e:
            rec.error = str(e)
            warnings.warn(f"question {item.id}: {e}; left out of the scores", RuntimeWarning, stacklevel=2)
        else:
            for pos, (reply, verdict, bad) in zip("AB", outs):
                rec.judge_replies.append(reply)
                rec.verdicts.append(verdict)
                rec.order_scores.append(_SCORE[pos][verdict])
                rec.malformed += bad
            rec.score = sum(rec.order_scores) / 2
        bar.update(1)
        return rec

    try:
        return list(await asyncio.gather(*(one(it) for it in items)))
    finally:
        await cand.close()
        await jclient.close()


def judge(cfg: JudgeConfig) -> JudgeResult:
    """Answer, judge both orders, aggregate per category. Requests that fail after retries leave their
    question out (with a warning); if every question fails, TeacherError."""
    data = Path(bundled(cfg.data)) if cfg.data else BUNDLED_JUDGE_SET
    items = read_judge_set(data)[:cfg.limit]
    t0 = time.perf_counter()
    with progress(len(items), "eval judge", unit="question") as bar:
        records = asyncio.run(_judge_all(cfg, items, bar))
    scored = [r for r in records if r.score is not None]
    if not scored:
        raise TeacherError(f"no question could be judged; first error: {records[0].error}")
    cats: dict[str, CategoryScore] = {}
    for r in scored:
        c = cats.setdefault(r.category, CategoryScore())
        c.n += 1
        c.score += r.score
        kind = _outcome(r.score)
        c.wins += kind == "win"
        c.ties += kind == "tie"
        c.losses += kind == "loss"
        c.consistent += _outcome(r.order_scores[0]) == _outcome(r.order_scores[1])
    for c in cats.values():
        c.score /= c.n
    res = JudgeResult(score=sum(r.score for r in scored) / len(scored), n=len(scored),
                      categories=dict(sorted(cats.items())), records=records,
                      malformed=sum(r.malformed for r in records), errors=sum(r.error is not None for r in records),
                      seconds=time.perf_counter() - t0)
    if cfg.output:
        atomic_write_text(cfg.output, json.dumps(res.to_dict(), indent=2, ensure_ascii=False) + "\n")
    return res


def format_judge_table(res: JudgeResult) -> str:
    width = max([len("overall")] + [len(c) for c in res.categories])
    lines = [f"{'category'.ljust(width)}  {'score':>5}  {'n':>3}  {'W/T/L':>8}  consistent"]
    for name, c in res.categories.items():
        lines.append(f"{name.ljust(width)}  {c.score:5.2f}  {c.n:3d}  {f'{c.wins}/{c.ties}/{c.losses}':>8}  "
                     f"{c.consistent}/{c.n}")
    lines.append(f"{'overall'.ljust(width)}  {res.score:5.2f}  {res.n:3d}")
    if res.malformed or res.errors:
        lines.append(f"({res.malformed} judge replies without a verdict counted as ties; "
                     f"{res.errors} questions failed)")
    return "\n".join(lines)
