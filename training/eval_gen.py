"""Generation metrics: BLEU (sacrebleu), ROUGE-1/2/L (rouge-score), and SQuAD-style exact match / F1, of a
model's answers to prompts against reference answers.

    hearth eval gen --data pairs.jsonl --model runs/sft-merged          # the checkpoint, served in-process
    hearth eval gen --data pairs.jsonl --url http://127.0.0.1:8000 --model-name M [--api-key K]

`pairs.jsonl`: one object a line, `prompt` (or question / instruction) and `reference` (or answer / output;
a list of strings for several references), optional `id`. Chinese text is scored by character (sacrebleu's
`zh` tokenizer for BLEU; characters for ROUGE and F1), so no word segmenter or downloaded data is needed.
"""

from __future__ import annotations

import asyncio
import json
import re
import string
import time
import unicodedata
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .common import TrainingConfigError, TrainingDataError, atomic_write_text, bundled, progress
from .data import read_jsonl_objects
from .eval_openai import TeacherError, async_client, chat

MAX_ITEMS = 100_000
_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")


def has_cjk(text: str) -> bool:
    return bool(_CJK.search(text))


# ----------------------------------------------------------------------------- metrics


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, no punctuation (ASCII and Unicode, so Chinese too), no English
    articles, single spaces."""
    text = "".join(" " if c in string.punctuation or unicodedata.category(c).startswith("P") else c
                   for c in text.lower())
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def answer_tokens(text: str) -> list[str]:
    """Tokens of a normalised answer: words, and each Chinese character on its own."""
    return re.findall(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]|[^\s\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]+",
                      normalize_answer(text))


def exact_match(prediction: str, references: list[str]) -> float:
    return float(any(normalize_answer(prediction) == normalize_answer(r) for r in references))


def f1_score(prediction: str, references: list[str]) -> float:
    """SQuAD token F1, the best over the references."""
    best = 0.0
    pred = answer_tokens(prediction)
    for ref in references:
        gold = answer_tokens(ref)
        if not pred or not gold:
            best = max(best, float(pred == gold))
            continue
        same = sum((Counter(pred) & Counter(gold)).values())
        if same:
            p, r = same / len(pred), same / len(gold)
            best = max(best, 2 * p * r / (p + r))
    return best


def bleu(predictions: list[str], references: list[list[str]], tokenize: str = "auto") -> float:
    """Corpus BLEU (0-100) through sacrebleu; `auto` tokenizes by Chinese character when a reference is
    Chinese (sacrebleu's `zh`), else with its standard `13a`."""
    import sacrebleu

    if tokenize == "auto":
        tokenize = "zh" if any(has_cjk(r) for refs in references for r in refs) else "13a"
    width = max(len(r) for r in references)
    streams = [[refs[i] if i < len(refs) else refs[0] for refs in references] for i in range(width)]
    return float(sacrebleu.corpus_bleu(predictions, streams, tokenize=tokenize).score)


class _RougeTokens:
    """rouge-score's own tokenizer keeps only [a-z0-9] and would drop Chinese: here each Chinese character is
    a token and the rest is split as rouge-score splits it."""

    def tokenize(self, text: str) -> list[str]:
        return re.findall(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]|[a-z0-9]+", text.lower())


def rouge(predictions: list[str], references: list[list[str]]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F-measure (0-100) through rouge-score, the best reference per item."""
    from rouge_score import rouge_scorer

    kinds = ("rouge1", "rouge2", "rougeL")
    scorer = rouge_scorer.RougeScorer(list(kinds), tokenizer=_RougeTokens())
    sums = dict.fromkeys(kinds, 0.0)
    for pred, refs in zip(predictions, references):
        best = [scorer.score(r, pred) for r in refs]
        for k in kinds:
            sums[k] += max(s[k].fmeasure for s in best)
    return {k: 100 * v / max(1, len(predictions)) for k, v in sums.items()}


# ----------------------------------------------------------------------------- data and config


@dataclass
class GenItem:
    id: str
    prompt: str
    references: list[str]


def read_gen_set(path: str | Path) -> list[GenItem]:
    """prompt/reference pairs (see the module docstring); errors name the file, line and field."""
    path = Path(path)
    items = []
    for n, rec in read_jsonl_objects(path):
        prompt = next((rec[k] for k in ("prompt", "question", "instruction") if isinstance(rec.get(k), str)), None)
        if not prompt or not prompt.strip():
            raise TrainingDataError(path, n, "prompt", "missing or empty (also accepted: question, instruction)")
        ref = next((rec[k] for k in ("reference", "references", "answer", "output") if k in rec), None)
        refs = [ref] if isinstance(ref, str) else ref
        if not (isinstance(refs, list) and refs and all(isinstance(r, str) for r in refs)):
            raise TrainingDataError(path, n, "reference", "missing, or not a string or a list of strings (also "
                                    "accepted: answer, output)")
        items.append(GenItem(id=str(rec.get("id", n)), prompt=prompt, references=refs))
        if len(items) > MAX_ITEMS:
            raise TrainingDataError(path, n, None, f"more than {MAX_ITEMS} items")
    if not items:
        raise TrainingDataError(path, None, None, "holds no prompts")
    return items


@dataclass
class GenConfig:
    """`hearth eval gen`: a model's answers to prompts scored against references."""

    data: str
    """JSONL of prompt/reference pairs."""
    url: str
    """OpenAI-compatible server of the model (a checkpoint is served in-process by the CLI)."""
    model_name: str
    api_key: str | None = None
    label: str | None = None
    """The target's name in tables (default model_name@host)."""
    system: str | None = None
    """A system message before each prompt."""
    max_tokens: int = 256
    temperature: float = 0.0
    concurrency: int = 4
    timeout_s: float = 120.0
    max_retries: int = 3
    limit: int | None = None
    tokenize: str = "auto"
    """BLEU's tokenizer: auto (zh for Chinese references, else 13a), or any sacrebleu name (13a, zh, char...)."""
    output: str | None = None
    """Write the result with every answer as JSON here."""

    def __post_init__(self) -> None:
        self.data = bundled(self.data)
        for name in ("max_tokens", "concurrency"):
            if getattr(self, name) < 1:
                raise TrainingConfigError(f"{name} must be >= 1; got {getattr(self, name)}")
        if self.limit is not None and self.limit < 1:
            raise TrainingConfigError(f"limit must be >= 1; got {self.limit}")
        if self.timeout_s <= 0 or self.max_retries < 0:
            raise TrainingConfigError("timeout_s must be > 0 and max_retries >= 0")


@dataclass
class GenRecord:
    id: str
    prompt: str
    references: list[str]
    answer: str = ""
    exact_match: float = 0.0
    f1: float = 0.0
    error: str | None = None


@dataclass
class GenResult:
    bleu: float
    rouge1: float
    rouge2: float
    rougeL: float
    exact_match: float
    """Percent of answers equal to a reference after normalisation."""
    f1: float
    """Mean SQuAD token F1, percent."""
    n: int
    errors: int
    target: str = ""
    data: str = ""
    seconds: float = 0.0
    records: list[GenRecord] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {"kind": "gen", "target": self.target, "data": Path(self.data).name, "n": self.n,
                "errors": self.errors, "bleu": self.bleu, "rouge1": self.rouge1, "rouge2": self.rouge2,
                "rougeL": self.rougeL, "exact_match": self.exact_match, "f1": self.f1}

    def to_dict(self) -> dict[str, Any]:
        return dict(self.summary(), data=self.data, seconds=self.seconds, records=[asdict(r) for r in self.records])


def score_answers(records: list[GenRecord], tokenize: str = "auto") -> dict[str, float]:
    """All metrics over the records that have an answer (percent)."""
    ok = [r for r in records if r.error is None]
    if not ok:
        raise TeacherError(f"no prompt was answered; first error: {records[0].error if records else None}")
    for r in ok:
        r.exact_match = exact_match(r.answer, r.references)
        r.f1 = f1_score(r.answer, r.references)
    preds, refs = [r.answer for r in ok], [r.references for r in ok]
    return dict(bleu=bleu(preds, refs, tokenize), **rouge(preds, refs),
                exact_match=100 * sum(r.exact_match for r in ok) / len(ok), f1=100 * sum(r.f1 for r in ok) / len(ok))


async def _answer_all(cfg: GenConfig, items: list[GenItem], bar: Any) -> list[GenRecord]:
    client = async_client(cfg.url, cfg.api_key, cfg.timeout_s, cfg.max_retries)
    gate = asyncio.Semaphore(cfg.concurrency)

    async def one(item: GenItem) -> GenRecord:
        rec = GenRecord(item.id, item.prompt, item.references)
        msgs = ([{"role": "system", "content": cfg.system}] if cfg.system else []) + \
            [{"role": "user", "content": item.prompt}]
        try:
            async with gate:
                rec.answer = (await chat(client, cfg.model_name, msgs, max_tokens=cfg.max_tokens,
                                         temperature=cfg.temperature)).strip()
        except TeacherError as e:
            rec.error = str(e)
            warnings.warn(f"prompt {item.id}: {e}; left out of the scores", RuntimeWarning, stacklevel=2)
        bar.update(1)
        return rec

    try:
        return list(await asyncio.gather(*(one(it) for it in items)))
    finally:
        await client.close()


def gen(cfg: GenConfig) -> GenResult:
    """Answer every prompt (bounded concurrency, retries and timeouts per request), then score."""
    from urllib.parse import urlsplit

    items = read_gen_set(cfg.data)[:cfg.limit]
    label = cfg.label or f"{cfg.model_name}@{urlsplit(cfg.url).netloc}"
    t0 = time.perf_counter()
    with progress(len(items), f"eval gen {label}", unit="prompt") as bar:
        records = asyncio.run(_answer_all(cfg, items, bar))
    scores = score_answers(records, cfg.tokenize)
    res = GenResult(**scores, n=sum(r.error is None for r in records), errors=sum(r.error is not None for r in records),
                    target=label, data=cfg.data, seconds=time.perf_counter() - t0, records=records)
    if cfg.output:
        atomic_write_text(cfg.output, json.dumps(res.to_dict(), indent=2, ensure_ascii=False) + "\n")
    return res


def format_gen_table(res: GenResult) -> str:
    lines = [f"{'metric':<12} {'value':>7}"]
    for k in ("bleu", "rouge1", "rouge2", "rougeL", "exact_match", "f1"):
        lines.append(f"{k:<12} {getattr(res, k):7.2f}")
    lines.append(f"{'n':<12} {res.n:7d}" + (f"  ({res.errors} prompts failed)" if res.errors else ""))
    return "\n".join(lines)
