"""LLM-as-judge against reference answers (BELLE's evaluation-set format), over HTTP: pairwise with the
order swapped, and 1-10 scores per category as the seeds' GPT-4 evaluation gives them.

    hearth eval judge --model-url http://127.0.0.1:8000 --model my-sft \\
        --judge-url https://api.example.com/v1 --judge-model big-judge [--data eval_set.jsonl] \\
        [--mode pairwise|score|both] [--report judge.md]

The candidate model answers each question; the judge then compares the candidate's answer with the
reference twice, once in each position (A/B), because judges favour one position. Each order gives the
candidate 1 (better), 0.5 (tie) or 0 (worse); the question's score is the mean of the two, so a candidate
as good as the reference scores 0.5. A judge reply with no readable verdict counts as a tie, with a
warning. Scores are reported per category (BELLE's `class`) and overall.

`score` mode asks the judge to rate the candidate's answer from 1 to 10 (the reference shown as a guide)
and reads the last score it states; a reply without one is asked again once (score_retries) with a
reminder of the format, then left unrated with a warning. `--report` writes a Markdown report with the
per-category table and every case: question, reference, answer, verdicts or score, and the judge's reason.
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

SCORE_RUBRIC = """Rate the assistant's answer to the user's question below on a scale of 1 to 10.

Judge correctness first (facts, arithmetic, code that works), then whether it does what was asked, then
completeness, clarity and concision. If the question is in Chinese, an answer not in Chinese is worse. A
reference answer is given as a guide; an answer may differ from it and still be excellent. 1 is useless or
wrong, 5 is partly right, 10 is as good as an expert's answer.

[Question]
{question}

[Reference answer]
{reference}

[Assistant's answer]
{answer}

Explain your reasoning in a few sentences. Then, on the last line, write exactly:
Score: N
where N is a whole number from 1 to 10."""
SCORE_REMINDER = "Your reply did not end with the score line. Reply with one line only: Score: N (N from 1 to 10)."

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


class MalformedScoreWarning(UserWarning):
    """A judge reply held no 1-10 score, even when asked again; the question was left unrated."""


_SCORE_PATTERNS = [
    # "Score: 8", "**Rating:** 7/10", "评分：8分", "Overall score - [[6]]"
    re.compile(r"(?:score|rating|grade|评分|得分|分数|打分)" + _OPT + r"[:：\-–=]?" + _OPT + r"(\d{1,2}(?:\.\d+)?)"
               r"(?!\d)(?:\s*(?:/|out of)\s*10(?!\d))?", re.IGNORECASE),
    re.compile(r"\[\[\s*(\d{1,2}(?:\.\d+)?)\s*\]\]"),  # MT-bench style
    re.compile(r"(?<![\d.])(\d{1,2}(?:\.\d+)?)\s*(?:/|out of)\s*10(?!\d)", re.IGNORECASE),  # "7/10"
]


def parse_score(reply: str) -> float | None:
    """The last 1-10 score a judge's reply states ("Score: 8", "Rating: [[7]]", "评分：8分", "7.5/10"); None if
    it states none, or only numbers outside 1-10."""
    text = re.sub(r"<think>.*?</think>", "", reply or "", flags=re.DOTALL | re.IGNORECASE)
    found: list[tuple[int, float]] = []
    for pat in _SCORE_PATTERNS:
        found += [(m.start(), float(m.group(1))) for m in pat.finditer(text)]
    found = [(pos, v) for pos, v in found if 1.0 <= v <= 10.0]
    return max(found)[1] if found else None


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
    mode: str = "pairwise"
    """pairwise (candidate vs reference, both orders), score (1-10 per answer), or both."""
    score_retries: int = 1
    """Times a reply without a score is asked again (with a reminder of the format)."""
    output: str | None = None
    """Write the full result (answers, judge replies, verdicts) as JSON here."""
    report: str | None = None
    """Write a Markdown report here: the per-category table and every case with the judge's reasons."""
    label: str | None = None
    """The candidate's name in tables (default model@host)."""

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise TrainingConfigError(f"concurrency must be >= 1; got {self.concurrency}")
        if self.timeout_s <= 0:
            raise TrainingConfigError(f"timeout_s must be > 0; got {self.timeout_s}")
        if self.max_retries < 0:
            raise TrainingConfigError(f"max_retries must be >= 0; got {self.max_retries}")
        if self.limit is not None and self.limit < 1:
            raise TrainingConfigError(f"limit must be >= 1; got {self.limit}")
        if self.mode not in ("pairwise", "score", "both"):
            raise TrainingConfigError(f"mode must be pairwise, score or both; got {self.mode!r}")
        if not 0 <= self.score_retries <= 5:
            raise TrainingConfigError(f"score_retries must be between 0 and 5; got {self.score_retries}")
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
    rating: float | None = None
    """The judge's 1-10 score of the answer (score mode); None if it gave none."""
    rating_replies: list[str] = field(default_factory=list)
    """The judge's replies in score mode (more than one when it was asked again)."""
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
    rating: float | None = None
    """Mean 1-10 score of its rated answers (score mode)."""
    rated: int = 0


@dataclass
class JudgeResult:
    score: float | None
    """Mean pairwise score (None in score mode)."""
    n: int
    categories: dict[str, CategoryScore]
    records: list[JudgeRecord]
    malformed: int
    errors: int
    seconds: float = 0.0
    rating: float | None = None
    """Mean 1-10 score over the rated answers (None in pairwise mode)."""
    unrated: int = 0
    target: str = ""
    mode: str = "pairwise"

    def summary(self) -> dict[str, Any]:
        return {"kind": "judge", "target": self.target, "mode": self.mode, "score": self.score,
                "rating": self.rating, "n": self.n, "malformed": self.malformed, "unrated": self.unrated,
                "errors": self.errors, "categories": {c: asdict(v) for c, v in self.categories.items()}}

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

    async def rate(rec: JudgeRecord) -> None:
        """The 1-10 score, asking again (bounded) when a reply states none."""
        prompt = SCORE_RUBRIC.format(question=rec.question, reference=rec.reference,
                                     answer=rec.answer.strip() or "(empty answer)")
        messages = [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": prompt}]
        for _ in range(1 + cfg.score_retries):
            reply = await limited(jclient, cfg.judge_model, messages, cfg.judge_max_tokens, 0.0)
            rec.rating_replies.append(reply)
            rec.rating = parse_score(reply)
            if rec.rating is not None:
                return
            messages = messages + [{"role": "assistant", "content": reply}, {"role": "user", "content": SCORE_REMINDER}]
        warnings.warn(f"question {rec.id}: the judge gave no 1-10 score in {len(rec.rating_replies)} replies; "
                      f"left unrated. Last reply: {rec.rating_replies[-1].strip()[:200]!r}", MalformedScoreWarning,
                      stacklevel=2)

    async def one(item: JudgeItem) -> JudgeRecord:
        rec = JudgeRecord(item.id, item.category, item.question, item.reference)
        try:
            rec.answer = await limited(cand, cfg.model, [{"role": "user", "content": item.question}],
                                       cfg.answer_max_tokens, cfg.temperature)
            jobs = [judge_once(rec, "A"), judge_once(rec, "B")] if cfg.mode != "score" else []
            if cfg.mode != "pairwise":
                jobs.append(rate(rec))
            outs = await asyncio.gather(*jobs)
        except TeacherError as e:
            rec.error = str(e)
            warnings.warn(f"question {item.id}: {e}; left out of the scores", RuntimeWarning, stacklevel=2)
        else:
            if cfg.mode != "score":
                for pos, (reply, verdict, bad) in zip("AB", outs[:2]):
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
    from urllib.parse import urlsplit

    data = Path(bundled(cfg.data)) if cfg.data else BUNDLED_JUDGE_SET
    items = read_judge_set(data)[:cfg.limit]
    label = cfg.label or f"{cfg.model}@{urlsplit(cfg.model_url).netloc}"
    t0 = time.perf_counter()
    with progress(len(items), f"eval judge {label}", unit="question") as bar:
        records = asyncio.run(_judge_all(cfg, items, bar))
    done = [r for r in records if r.error is None]
    if not done:
        raise TeacherError(f"no question could be judged; first error: {records[0].error}")
    cats: dict[str, CategoryScore] = {}
    for r in done:
        c = cats.setdefault(r.category, CategoryScore())
        c.n += 1
        if r.score is not None:
            c.score += r.score
            kind = _outcome(r.score)
            c.wins += kind == "win"
            c.ties += kind == "tie"
            c.losses += kind == "loss"
            c.consistent += _outcome(r.order_scores[0]) == _outcome(r.order_scores[1])
        if r.rating is not None:
            c.rating = (c.rating or 0.0) + r.rating
            c.rated += 1
    for c in cats.values():
        c.score /= c.n
        if c.rated:
            c.rating /= c.rated
    pair = cfg.mode != "score"
    rated = [r.rating for r in done if r.rating is not None]
    res = JudgeResult(score=sum(r.score for r in done) / len(done) if pair else None, n=len(done),
                      categories=dict(sorted(cats.items())), records=records,
                      malformed=sum(r.malformed for r in records), errors=sum(r.error is not None for r in records),
                      seconds=time.perf_counter() - t0, rating=sum(rated) / len(rated) if rated else None,
                      unrated=len(done) - len(rated) if cfg.mode != "pairwise" else 0, target=label, mode=cfg.mode)
    if cfg.output:
        atomic_write_text(cfg.output, json.dumps(res.to_dict(), indent=2, ensure_ascii=False) + "\n")
    if cfg.report:
        atomic_write_text(cfg.report, format_judge_markdown(res))
    return res


def format_judge_table(res: JudgeResult) -> str:
    width = max([len("overall")] + [len(c) for c in res.categories])
    pair, rate = res.mode != "score", res.mode != "pairwise"
    head = f"{'category'.ljust(width)}  {'n':>3}" + (f"  {'score':>5}  {'W/T/L':>8}  consistent" if pair else "") + \
        (f"  {'rating':>6}" if rate else "")
    lines = [head]
    for name, c in res.categories.items():
        row = f"{name.ljust(width)}  {c.n:3d}"
        if pair:
            row += f"  {c.score:5.2f}  {f'{c.wins}/{c.ties}/{c.losses}':>8}  {f'{c.consistent}/{c.n}':>10}"
        if rate:
            row += f"  {_num(c.rating, 6)}"
        lines.append(row)
    row = f"{'overall'.ljust(width)}  {res.n:3d}"
    if pair:
        row += f"  {res.score:5.2f}" + " " * 22
    if rate:
        row += f"  {_num(res.rating, 6)}"
    lines.append(row)
    if res.malformed or res.errors or res.unrated:
        lines.append(f"({res.malformed} judge replies without a verdict counted as ties; {res.unrated} answers "
                     f"unrated; {res.errors} questions failed)")
    return "\n".join(lines)


def _num(v: float | None, width: int = 0) -> str:
    return f"{v:{width}.2f}" if v is not None else "-".rjust(width)


def _reason(reply: str, limit: int = 1200) -> str:
    """The judge's reasoning: its reply without the <think> block and the final verdict or score line."""
    text = re.sub(r"<think>.*?</think>", "", reply or "", flags=re.DOTALL | re.IGNORECASE).strip()
    lines = text.splitlines()
    if lines and (parse_verdict(lines[-1]) or parse_score(lines[-1]) is not None):
        lines = lines[:-1]
    text = "\n".join(lines).strip() or "(no reasoning given)"
    return text if len(text) <= limit else text[:limit] + " …"


def _quote(text: str) -> str:
    return "\n".join("> " + line for line in (text.strip() or "(empty)").splitlines())


def format_judge_markdown(res: JudgeResult) -> str:
    """The report: the per-category table, then each case with the answers, scores and the judge's reasons."""
    pair, rate = res.mode != "score", res.mode != "pairwise"
    cols = ["category", "n"] + (["score (0-1)", "W/T/L", "consistent"] if pair else []) + (["rating (1-10)"] if rate else [])
    out = [f"# Judge report: {res.target}", "", f"mode: {res.mode}; {res.n} questions judged, {res.errors} failed, "
           f"{res.malformed} verdicts missing, {res.unrated} answers unrated.", "",
           "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for name, c in list(res.categories.items()) + [("**overall**", None)]:
        if c is None:
            row = [name, str(res.n)] + ([_num(res.score), "", ""] if pair else []) + ([_num(res.rating)] if rate else [])
        else:
            row = [name, str(c.n)] + ([_num(c.score), f"{c.wins}/{c.ties}/{c.losses}", f"{c.consistent}/{c.n}"]
                                      if pair else []) + ([_num(c.rating)] if rate else [])
        out.append("| " + " | ".join(row) + " |")
    out += ["", "## Cases"]
    for r in res.records:
        out += ["", f"### {r.id} ({r.category})", "", "**Question**", "", _quote(r.question), "", "**Reference**", "",
                _quote(r.reference), "", "**Answer**", "", _quote(r.answer if r.error is None else "")]
        if r.error is not None:
            out += ["", f"Not judged: {r.error}"]
            continue
        if r.verdicts:
            out += ["", f"**Pairwise**: score {r.score:.2f} (candidate as A: {r.verdicts[0]}, as B: {r.verdicts[1]})"]
            for pos, reply in zip("AB", r.judge_replies):
                out += ["", f"Judge, candidate as {pos}:", "", _quote(_reason(reply))]
        if r.rating_replies:
            out += ["", f"**Rating**: {_num(r.rating) if r.rating is not None else 'none given'} / 10", "",
                    _quote(_reason(r.rating_replies[-1]))]
    return "\n".join(out) + "\n"
