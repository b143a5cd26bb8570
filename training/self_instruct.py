"""Self-Instruct: grow an instruction set from a few seed tasks with any OpenAI-compatible teacher.

    hearth data self-instruct --seeds training/data/seed_tasks.jsonl --teacher http://127.0.0.1:8000 \\
        --model smollm2-135m-instruct --n 100 -o self_instruct.jsonl

Each request shows the teacher a few seed tasks and a few already generated ones, and asks for new
(instruction, input, output) triples in a fixed text format. Replies are parsed leniently, then filtered:
empty or too short/long instructions, keywords a text-only model cannot serve ("image", "picture", 图片 ...),
leftover format labels, and anything whose ROUGE-L F1 against an existing instruction (seeds, earlier
output, this run) reaches 0.7 - the diversity filter of Self-Instruct (Wang et al., 2022), with words for
English and single characters for Chinese. Kept tasks are appended to the output (Alpaca JSONL) in one
atomic write per batch; an existing output counts toward N and toward the ROUGE pool, so a rerun resumes.

    from hearth.training.self_instruct import SelfInstructConfig, self_instruct
    res = self_instruct(SelfInstructConfig(teacher="http://127.0.0.1:8000", model="m", n=20))
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from .common import TrainingConfigError, TrainingDataError, atomic_write_text, bundled, progress
from .data import read_jsonl_objects
from .eval_openai import TeacherError, async_client, chat

BUNDLED_SEEDS = Path(__file__).resolve().parent / "data" / "seed_tasks.jsonl"

# Self-Instruct's list of things a text-only model cannot do, plus Chinese counterparts.
BANNED_WORDS = ["image", "images", "picture", "pictures", "photo", "photos", "graph", "graphs", "diagram",
                "flowchart", "map", "maps", "draw", "plot", "video", "videos", "audio", "music", "file",
                "files", "go to", "图片", "图像", "照片", "图表", "流程图", "视频", "音频", "音乐", "绘制",
                "画一", "地图", "文件", "网址"]

_CJK_CLASS = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_TOKEN = re.compile(rf"[{_CJK_CLASS}]|[^\W_{_CJK_CLASS}]+")


# ----------------------------------------------------------------------------- ROUGE-L


def rouge_tokens(text: str) -> list[str]:
    """Lower-cased words for alphabetic scripts, one token per Chinese character, no punctuation."""
    return _TOKEN.findall(text.lower())


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence, bit-parallel over a (Hyyrö 2004): bit i of v is 0
    where a[i] ends a step of the LCS found so far; one big-int update per token of b."""
    if not a or not b:
        return 0
    masks: dict[str, int] = {}
    for i, t in enumerate(a):
        masks[t] = masks.get(t, 0) | (1 << i)
    full = (1 << len(a)) - 1
    v = full
    for t in b:
        u = v & masks.get(t, 0)
        v = ((v + u) | (v - u)) & full
    return len(a) - bin(v).count("1")


def rouge_l(a: Sequence[str], b: Sequence[str]) -> float:
    """ROUGE-L F1 of two token lists (as rouge_score's rougeL fmeasure)."""
    if not a or not b:
        return 0.0
    return 2.0 * lcs_length(a, b) / (len(a) + len(b))


class RougePool:
    """Instructions seen so far; `max_score` finds the highest ROUGE-L of a candidate against them."""

    def __init__(self) -> None:
        self.items: list[list[str]] = []
        self.exact: set[str] = set()

    def add(self, instruction: str) -> None:
        self.items.append(rouge_tokens(instruction))
        self.exact.add(_norm(instruction))

    def max_score(self, instruction: str, stop_at: float = 1.0) -> float:
        cand = rouge_tokens(instruction)
        best = 0.0
        for other in self.items:
            n, m = len(cand), len(other)
            if not n or not m or 2.0 * min(n, m) / (n + m) <= best:
                continue  # cannot beat the best so far, even if all of the shorter one matched
            best = max(best, rouge_l(cand, other))
            if best >= stop_at:
                break
        return best

    def __len__(self) -> int:
        return len(self.items)


def _norm(text: str) -> str:
    return " ".join(rouge_tokens(text))


# ----------------------------------------------------------------------------- data


@dataclass
class Task:
    instruction: str
    input: str = ""
    output: str = ""

    def to_alpaca(self) -> dict[str, str]:
        return {"instruction": self.instruction, "input": self.input, "output": self.output}


def read_tasks(path: str | Path, allow_empty: bool = False) -> list[Task]:
    """Alpaca JSONL (instruction, input, output), or Self-Instruct seeds (instruction + instances)."""
    path = Path(path)
    tasks = []
    for n, rec in read_jsonl_objects(path):
        if "instances" in rec and "output" not in rec:
            inst = rec["instances"]
            if not (isinstance(inst, list) and inst and isinstance(inst[0], dict)):
                raise TrainingDataError(path, n, "instances", "must be a non-empty list of {input, output}")
            rec = {"instruction": rec.get("instruction"), **inst[0]}
        for key in ("instruction", "output"):
            if not isinstance(rec.get(key), str) or not rec[key].strip():
                raise TrainingDataError(path, n, key, "missing or not a non-empty string")
        if not isinstance(rec.get("input", ""), str):
            raise TrainingDataError(path, n, "input", "must be a string")
        tasks.append(Task(rec["instruction"].strip(), rec.get("input", "").strip(), rec["output"].strip()))
    if not tasks and not allow_empty:
        raise TrainingDataError(path, None, None, "holds no tasks")
    return tasks


# ----------------------------------------------------------------------------- prompt and parsing

PROMPT_HEAD = """You are writing tasks to teach an AI assistant. Below are some example tasks. Write {k} new \
tasks that differ from the examples and from each other: vary the topic, the kind of task (question, \
explanation, rewriting, classification, brainstorming, math, code, advice, summarising ...) and the language \
(English or Chinese). Every task must be doable by a text-only assistant: no images, audio, files or web \
browsing. Give an Input only when the task needs one; otherwise write <noinput>. The Output is a correct, \
helpful answer.

Use exactly this format for every task:

### Task <number>
Instruction: <the instruction>
Input: <the input, or <noinput>>
Output: <the answer>

"""

_HEADER = re.compile(r"^\s*(?:#+\s*|\*\*\s*)?(?:task|任务)\s*[#＃]?\s*\d+\s*[:：.]?\s*(?:\*\*)?\s*$",
                     re.IGNORECASE | re.MULTILINE)
_LABEL = re.compile(r"^\s*(?:[-*]\s*|\d+[.)]\s*)?(?:\*\*)?\s*(instructions?|inputs?|outputs?|response|指令|输入|输出)"
                    r"\s*(?:\*\*)?\s*[:：]\s*(?:\*\*)?", re.IGNORECASE | re.MULTILINE)
# label as written (lower case) -> field; small teachers write "Instructions:" or "Response:"
_FIELD = {"instruction": "instruction", "instructions": "instruction", "指令": "instruction",
          "input": "input", "inputs": "input", "输入": "input",
          "output": "output", "outputs": "output", "response": "output", "输出": "output"}
_NO_INPUT = {"", "<noinput>", "noinput", "<no input>", "none", "n/a", "na", "无", "（无）", "(none)", "-"}


def build_prompt(examples: Sequence[Task], k: int) -> str:
    parts = [PROMPT_HEAD.format(k=k)]
    for i, t in enumerate(examples, 1):
        parts.append(f"### Task {i}\nInstruction: {t.instruction}\nInput: {t.input or '<noinput>'}\n"
                     f"Output: {t.output}\n\n")
    m = len(examples)
    parts.append(f"Now write tasks {m + 1} to {m + k}, starting with \"### Task {m + 1}\".")
    return "".join(parts)


def parse_tasks(text: str) -> list[Task]:
    """Tasks from a teacher's reply: blocks under "### Task N" headers (or, without headers, one per
    Instruction label), each with Instruction / Input / Output labels (English or Chinese, markdown
    bold or list markers tolerated; values may span lines). A block without an instruction is dropped."""
    text = re.sub(r"<think>.*?</think>", "", text or "", flags=re.DOTALL | re.IGNORECASE)
    heads = [m.start() for m in _HEADER.finditer(text)]
    if heads:
        bounds = heads + [len(text)]
        blocks = [text[bounds[i]:bounds[i + 1]] for i in range(len(heads))]
        blocks = [_HEADER.sub("", b, count=1) for b in blocks]
    else:
        starts = [m.start() for m in _LABEL.finditer(text) if _FIELD[m.group(1).lower()] == "instruction"]
        bounds = starts + [len(text)]
        blocks = [text[bounds[i]:bounds[i + 1]] for i in range(len(starts))]
    tasks = []
    for block in blocks:
        labels = list(_LABEL.finditer(block))
        fields: dict[str, str] = {}
        for i, m in enumerate(labels):
            key = _FIELD[m.group(1).lower()]
            end = labels[i + 1].start() if i + 1 < len(labels) else len(block)
            if key not in fields:  # a second "Output:" inside an answer stays part of the first
                fields[key] = block[m.end():end].strip()
            else:
                fields[list(fields)[-1]] += "\n" + block[m.start():end].rstrip()
        fields = {k: _clean(v) for k, v in fields.items()}
        if not fields.get("instruction"):
            continue
        inp = fields.get("input", "")
        if inp.lower() in _NO_INPUT:
            inp = ""
        tasks.append(Task(fields["instruction"], inp, fields.get("output", "")))
    return tasks


def _clean(value: str) -> str:
    """Strip whitespace and the markdown emphasis left around a value ("**Input:** text**")."""
    value = value.strip()
    for mark in ("**", "__"):
        if value.startswith(mark):
            value = value[len(mark):]
        if value.endswith(mark) and value.count(mark) % 2 == 1:  # a lone closing mark, not a bold pair
            value = value[:-len(mark)]
    return value.strip()


# ----------------------------------------------------------------------------- config and filters


@dataclass
class SelfInstructConfig:
    """`hearth data self-instruct`: new Alpaca tasks from seed tasks through an OpenAI-compatible teacher."""

    teacher: str
    """The teacher's server (http://host:port or .../v1)."""
    model: str
    """The teacher's model name on that server."""
    n: int
    """Tasks wanted in the output in total (an existing output counts)."""
    seeds: str | None = None
    """Seed tasks (Alpaca JSONL or Self-Instruct seeds); None: training/data/seed_tasks.jsonl."""
    output: str = "self_instruct.jsonl"
    api_key: str | None = None
    """Key for the teacher (default $OPENAI_API_KEY)."""
    max_requests: int | None = None
    """Stop after this many requests even short of n; None: 10 + 2 * n."""
    batch_size: int = 4
    """Requests sent together; their kept tasks are appended in one atomic write."""
    seed_examples: int = 3
    """Seed tasks shown per request."""
    generated_examples: int = 2
    """Already generated tasks shown per request (seeds stand in until there are some)."""
    tasks_per_request: int = 4
    rouge_threshold: float = 0.7
    """Keep a task only if its ROUGE-L F1 against every existing instruction is below this."""
    min_instruction_tokens: int = 3
    max_instruction_tokens: int = 150
    """Instruction length bounds, in words (English) / characters (Chinese)."""
    banned_words: list[str] = field(default_factory=lambda: list(BANNED_WORDS))
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 1024
    timeout_s: float = 120.0
    max_retries: int = 3
    seed: int = 0
    """Seeds the choice of in-context examples (and is passed on to the teacher's sampler)."""

    def __post_init__(self) -> None:
        self.seeds = bundled(self.seeds)
        if self.n < 1:
            raise TrainingConfigError(f"n must be >= 1; got {self.n}")
        if self.max_requests is None:
            self.max_requests = 10 + 2 * self.n
        checks = {"max_requests": self.max_requests >= 1, "batch_size": self.batch_size >= 1,
                  "seed_examples": self.seed_examples >= 1, "generated_examples": self.generated_examples >= 0,
                  "tasks_per_request": self.tasks_per_request >= 1, "max_tokens": self.max_tokens >= 1,
                  "timeout_s": self.timeout_s > 0, "max_retries": self.max_retries >= 0,
                  "rouge_threshold": 0.0 < self.rouge_threshold <= 1.0,
                  "min_instruction_tokens": self.min_instruction_tokens >= 1,
                  "max_instruction_tokens": self.max_instruction_tokens >= self.min_instruction_tokens}
        for name, ok in checks.items():
            if not ok:
                raise TrainingConfigError(f"{name}: bad value {getattr(self, name)!r}")


@dataclass
class SelfInstructResult:
    output: str
    existing: int
    """Tasks already in the output before this run."""
    written: int
    """Tasks this run added."""
    requests: int
    failed_requests: int
    parsed: int
    """Tasks parsed from the teacher's replies (before filtering)."""
    rejected: dict[str, int]
    """Why parsed tasks were dropped: empty, length, banned, format, duplicate, similar."""
    seconds: float = 0.0

    @property
    def total(self) -> int:
        return self.existing + self.written


def _banned_pattern(words: Sequence[str]) -> re.Pattern | None:
    alts = []
    for w in words:
        w = w.strip().lower()
        if not w:
            continue
        # Chinese keywords match anywhere; English ones as whole words
        alts.append(re.escape(w) if re.search(f"[{_CJK_CLASS}]", w) else rf"\b{re.escape(w)}\b")
    return re.compile("|".join(alts), re.IGNORECASE) if alts else None


_LEFTOVER = re.compile(r"(?:^|\n)\s*(?:#+\s*task\b|instructions?\s*[:：]|inputs?\s*[:：]|outputs?\s*[:：]|指令\s*[:：])",
                       re.IGNORECASE)


def reject_reason(task: Task, pool: RougePool, cfg: SelfInstructConfig, banned: re.Pattern | None) -> str | None:
    """Why a parsed task must not be kept, or None to keep it."""
    if not task.instruction or not task.output:
        return "empty"
    n = len(rouge_tokens(task.instruction))
    if not cfg.min_instruction_tokens <= n <= cfg.max_instruction_tokens:
        return "length"
    if banned is not None and banned.search(task.instruction + "\n" + task.input):
        return "banned"
    if (not re.match(rf"[\w{_CJK_CLASS}\"'“‘(（]", task.instruction) or _LEFTOVER.search(task.instruction)
            or _LEFTOVER.search(task.output) or _norm(task.output) == _norm(task.instruction)
            or _norm(task.input) == _norm(task.instruction)):
        return "format"
    if _norm(task.instruction) in pool.exact:
        return "duplicate"
    if pool.max_score(task.instruction, stop_at=cfg.rouge_threshold) >= cfg.rouge_threshold:
        return "similar"
    return None


# ----------------------------------------------------------------------------- the run


def _append(path: Path, tasks: list[Task]) -> None:
    """Rewrite the file with the new lines added, atomically: a kill leaves the old file or the new one."""
    old = path.read_text(encoding="utf-8") if path.exists() else ""
    if old and not old.endswith("\n"):
        old += "\n"
    new = "".join(json.dumps(t.to_alpaca(), ensure_ascii=False) + "\n" for t in tasks)
    atomic_write_text(path, old + new)


async def _run(cfg: SelfInstructConfig, seeds: list[Task], generated: list[Task], pool: RougePool,
               out: Path, res: SelfInstructResult, bar: Any) -> None:
    client = async_client(cfg.teacher, cfg.api_key, cfg.timeout_s, cfg.max_retries)
    rng = random.Random(f"{cfg.seed}:{len(generated)}")  # a resumed run does not repeat the same prompts
    banned = _banned_pattern(cfg.banned_words)
    try:
        while res.total < cfg.n and res.requests < cfg.max_requests:
            k = min(cfg.batch_size, cfg.max_requests - res.requests)
            prompts = []
            for _ in range(k):
                shown = rng.sample(seeds, min(cfg.seed_examples, len(seeds)))
                if generated and cfg.generated_examples:
                    shown += rng.sample(generated, min(cfg.generated_examples, len(generated)))
                rng.shuffle(shown)
                prompts.append(build_prompt(shown, cfg.tasks_per_request))
            calls = [asyncio.ensure_future(chat(client, cfg.model, [{"role": "user", "content": p}],
                                                max_tokens=cfg.max_tokens, temperature=cfg.temperature,
                                                top_p=cfg.top_p, seed=cfg.seed + res.requests + i))
                     for i, p in enumerate(prompts)]
            errors: list[BaseException] = []
            kept: list[Task] = []
            try:
                for call in calls:  # in request order (the result does not depend on timing), each reply at once
                    try:
                        reply = await call
                    except TeacherError as e:
                        errors.append(e)
                        res.failed_requests += 1
                        continue
                    finally:
                        res.requests += 1
                    for task in parse_tasks(reply):
                        if res.total + len(kept) >= cfg.n:
                            break
                        res.parsed += 1
                        why = reject_reason(task, pool, cfg, banned)
                        if why:
                            res.rejected[why] = res.rejected.get(why, 0) + 1
                            continue
                        kept.append(task)
                        pool.add(task.instruction)
                        bar.update(1)  # one generated task kept
                    bar.set_postfix(requests=res.requests, rejected=sum(res.rejected.values()), refresh=True)
            finally:
                for call in calls:
                    call.cancel()
            if kept:
                _append(out, kept)
                generated.extend(kept)
                res.written += len(kept)
            if len(errors) == k:  # a dead teacher should stop the run, not burn the budget
                raise errors[0]
    finally:
        await client.close()


def self_instruct(cfg: SelfInstructConfig) -> SelfInstructResult:
    """Generate until the output holds cfg.n tasks or cfg.max_requests requests were made."""
    seeds = read_tasks(cfg.seeds or BUNDLED_SEEDS)
    out = Path(cfg.output)
    existing = read_tasks(out, allow_empty=True) if out.exists() else []
    pool = RougePool()
    for t in seeds + existing:
        pool.add(t.instruction)
    res = SelfInstructResult(output=str(out), existing=len(existing), written=0, requests=0, failed_requests=0,
                             parsed=0, rejected={})
    t0 = time.perf_counter()
    if res.total < cfg.n:
        print(f"self-instruct: asking {cfg.model} at {cfg.teacher} for {cfg.n - res.total} new tasks "
              f"({len(existing)} already in {out}), {cfg.batch_size} requests at a time; the bar counts kept tasks",
              file=sys.stderr, flush=True)
        with progress(cfg.n, "self-instruct", unit="task", initial=len(existing)) as bar:
            asyncio.run(_run(cfg, seeds, list(existing), pool, out, res, bar))
    res.seconds = time.perf_counter() - t0
    return res
