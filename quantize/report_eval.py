"""The measurements behind `quantize report`: logits over held-out text, greedy answers, decode speed.

    from hearth.quantize.report_eval import EvalConfig, ParentCache, run_parent, run_artifact
    cfg = EvalConfig.for_mode(quick=False)
    with ParentCache() as cache:
        parent = cache.get(parent_dir, "hf-safetensors", cfg)          # computed once, reused after
        art = run_artifact(artifact_gguf, "gguf", parent, cfg)         # KL, top-1, ppl, answers

Every model runs behind hearth's runtime: HF directories through the transformers backend, GGUF
files through the llama.cpp backend. Text logits come from the backend's forward (all positions of a
window); greedy answers and the single-stream decode speed come from hearth's Engine. The parent's
logits are kept (float32, memory-mapped in a temp dir) so several artifacts of one parent are compared
against one parent run. The report module (hearth.quantize.report) turns these numbers into a Report.

`ParentCache(store=...)` also keeps parent runs on disk (the `quantize` CLI uses
$HEARTH_HOME/report-cache): keyed by the parent's content hash, its tokenizer and template files, the
format and the evaluation settings, so a second `quantize report` of the same parent does not score it
again. At most `STORE_ENTRIES` runs are kept (the oldest go); each holds the parent's logits at the scored
positions (float32, tokens x vocabulary: ~600 MB for a 49k-token vocabulary at the full settings).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
import weakref
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Iterable

import numpy as np
from tqdm import tqdm

from hearth.runtime.checkpoint import WEIGHT_SUFFIXES, content_hash, hashed_files
from hearth.runtime.fileio import atomic_write_text, staged

from .common import QuantizeError, say

LANGS = ("en", "zh")
STORE_ENTRIES = 2  # parent runs kept on disk by a ParentCache with a store; the oldest are removed
_STORE_VERSION = 1  # bumped when what a stored run holds changes; older entries are then ignored
_SEQ_BASE = 1 << 30  # seq ids of direct forwards, far from the engine's own counter
_KL_CHUNK = 128  # rows per float64 log-softmax: bounds memory at 128 x V x 8 bytes per array


# ----------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class EvalConfig:
    """How much to measure. `EvalConfig.for_mode(quick=True)` shrinks everything for CI-sized runs."""

    window: int = 512
    """Tokens per forward window over the held-out text (capped by the model's context)."""
    stride: int = 256
    """Start of each window after the first; only tokens not scored before are scored (each with
    at least window - stride tokens of context)."""
    max_text_tokens: int = 1536
    """Held-out tokens used per language (the texts are cut to this many tokens)."""
    prompts: tuple[int, ...] = tuple(range(20))
    """Indices into chat_prompts.jsonl."""
    max_new_tokens: int = 48
    """Greedy tokens generated per prompt (EOS ignored while generating; answers end at the first
    end-of-turn token of either model when compared)."""
    quick: bool = False

    def __post_init__(self) -> None:
        if self.window < 2:
            raise ValueError(f"EvalConfig.window must be at least 2, got {self.window}")
        if not 0 < self.stride <= self.window:
            raise ValueError(f"EvalConfig.stride must be in [1, window={self.window}], got {self.stride}")
        if self.max_text_tokens < 2:
            raise ValueError(f"EvalConfig.max_text_tokens must be at least 2, got {self.max_text_tokens}")
        if self.max_new_tokens < 1:
            raise ValueError(f"EvalConfig.max_new_tokens must be at least 1, got {self.max_new_tokens}")

    @classmethod
    def for_mode(cls, quick: bool = False) -> "EvalConfig":
        if quick:  # ~3 windows per language, 4 prompts (3 English, 1 Chinese)
            return cls(window=128, stride=64, max_text_tokens=256, prompts=(0, 5, 10, 15),
                       max_new_tokens=16, quick=True)
        return cls()

    def tokens_needed(self) -> int:
        """KV room a model needs: a text window or a chat prompt plus its answer."""
        return max(self.window, 512) + self.max_new_tokens + 64


# ----------------------------------------------------------------------------- built-in data


def heldout_text(lang: str) -> str:
    if lang not in LANGS:
        raise ValueError(f"held-out language must be one of {', '.join(LANGS)}; got {lang!r}")
    return resources.files("hearth.quantize").joinpath(f"data/heldout_{lang}.txt").read_text(encoding="utf-8")


def chat_prompts() -> list[dict[str, Any]]:
    """The 20 built-in chat prompts: {"lang": "en"|"zh", "messages": [...]} each."""
    text = resources.files("hearth.quantize").joinpath("data/chat_prompts.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def data_hash(cfg: EvalConfig) -> str:
    """sha256 over the texts, prompts and settings: reports with equal hashes measured the same thing."""
    h = hashlib.sha256()
    for lang in LANGS:
        h.update(heldout_text(lang).encode())
    h.update(json.dumps(chat_prompts(), sort_keys=True, ensure_ascii=False).encode())
    h.update(json.dumps([cfg.window, cfg.stride, cfg.max_text_tokens, list(cfg.prompts),
                         cfg.max_new_tokens]).encode())
    return h.hexdigest()


# ----------------------------------------------------------------------------- windows and math


@dataclass(frozen=True)
class Window:
    """Forward ids[begin:end]; score targets ids[score_from:end] (logit rows score_from-1-begin ..)."""

    begin: int
    end: int
    score_from: int

    @property
    def rows(self) -> slice:
        return slice(self.score_from - 1 - self.begin, self.end - 1 - self.begin)

    @property
    def n_scored(self) -> int:
        return self.end - self.score_from


def plan_windows(n_tokens: int, window: int, stride: int) -> list[Window]:
    """Sliding windows over n_tokens: every token from the second on is scored exactly once, with the
    context of the window it falls in (the usual strided perplexity)."""
    if n_tokens < 2:
        raise QuantizeError(f"the held-out text has {n_tokens} token(s); at least 2 are needed")
    out: list[Window] = []
    begin, prev_end = 0, 0
    while True:
        end = min(begin + window, n_tokens)
        out.append(Window(begin, end, max(prev_end, begin + 1)))
        if end == n_tokens:
            return out
        prev_end = end
        begin = min(begin + stride, end - 1)  # keep one token of context for the next scored one


def log_softmax64(logits: np.ndarray) -> np.ndarray:
    """(R, V) logits -> (R, V) float64 log-probabilities."""
    x = logits.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - (m + np.log(np.exp(x - m).sum(axis=-1, keepdims=True)))


@dataclass
class Compare:
    """Running sums of one text's artifact-vs-parent comparison."""

    nll: float = 0.0
    parent_nll: float = 0.0
    n: int = 0
    top1_same: int = 0
    kl: list[np.ndarray] = field(default_factory=list)

    def add(self, parent_logits: np.ndarray, logits: np.ndarray, targets: np.ndarray) -> None:
        """parent_logits, logits: (R, V); targets: (R,) the next token at each row."""
        for a in range(0, len(targets), _KL_CHUNK):
            b = a + _KL_CHUNK
            lp = log_softmax64(parent_logits[a:b])  # (r, V)
            la = log_softmax64(logits[a:b])  # (r, V)
            p = np.exp(lp)
            with np.errstate(invalid="ignore"):  # tokens the parent rules out (p = 0) add nothing
                terms = np.where(p > 0, p * (lp - la), 0.0)
            self.kl.append(terms.sum(axis=-1))  # KL(parent || artifact) per position, in nats
            rows = np.arange(len(lp))
            self.nll -= float(la[rows, targets[a:b]].sum())
            self.parent_nll -= float(lp[rows, targets[a:b]].sum())
            self.top1_same += int((lp.argmax(-1) == la.argmax(-1)).sum())
            self.n += len(lp)


def ppl(nll: float, n: int) -> float:
    if not n:
        return float("nan")
    try:
        return math.exp(nll / n)
    except OverflowError:  # a mean NLL past ~709 nats: a broken model, not a number to print
        return float("inf")


def answer_agreement(a: list[int], b: list[int], stops: Iterable[int]) -> tuple[bool, float]:
    """(identical, shared-prefix fraction) of two greedy answers, each cut at its first stop token."""
    stops = frozenset(stops)
    a, b = _cut(a, stops), _cut(b, stops)
    if not a and not b:
        return True, 1.0
    k = 0
    for x, y in zip(a, b):
        if x != y:
            break
        k += 1
    return a == b, k / max(len(a), len(b))


def _cut(ids: list[int], stops: frozenset[int]) -> list[int]:
    for i, t in enumerate(ids):
        if t in stops:
            return ids[:i]
    return list(ids)


# ----------------------------------------------------------------------------- one loaded model


def _kv_gb(path: Path, tokens: int) -> float:
    """KV cache size for `tokens` tokens at fp32 (the widest KV dtype the backend uses)."""
    cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))
    cfg = cfg.get("text_config", cfg)
    layers = int(cfg.get("num_hidden_layers", 32))
    heads = int(cfg.get("num_attention_heads", 32))
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or int(cfg.get("hidden_size", 4096)) // heads)
    return 2 * layers * kv_heads * head_dim * 4 * (tokens + 64) / 2**30


class LoadedModel:
    """One model behind hearth's runtime. Use logits() first; greedy() starts an Engine on the same
    backend (the engine thread then owns it). close() frees everything."""

    def __init__(self, path: Path, fmt: str, cfg: EvalConfig):
        self.path, self.format = path, fmt
        need = cfg.tokens_needed()
        if fmt == "gguf":
            from hearth.runtime.backends.llamacpp import LlamaCppBackend
            self.backend = LlamaCppBackend(str(path), n_ctx=need, n_seq_max=4)
        elif fmt == "hf-safetensors":
            from hearth.runtime.backends.transformers import TransformersBackend
            self.backend = TransformersBackend(path, max_model_len=need, kv_cache_gb=_kv_gb(path, need))
        else:
            raise QuantizeError(f"{path} is a {fmt} checkpoint; a report needs an HF safetensors "
                                "directory or a GGUF file")
        self.tokenizer = self.backend.tokenizer
        self.max_len = min(self.backend.max_model_len, self.backend.kv.capacity_tokens())
        self._engine = None
        self._next_seq = _SEQ_BASE

    @property
    def backend_name(self) -> str:
        return self.backend.name

    def vocab(self) -> list[bytes]:
        return [self.tokenizer.token_bytes(i) for i in range(self.tokenizer.vocab_size)]

    def logits(self, ids: list[int]) -> np.ndarray:
        """(len(ids), V) float32 logits of one window fed from position 0."""
        from hearth.runtime.backends.base import SeqWork
        if self._engine is not None:
            raise RuntimeError("logits() after greedy(): the engine owns the backend now")
        seq, self._next_seq = self._next_seq, self._next_seq + 1
        if not self.backend.kv.allocate(seq, len(ids)):
            raise QuantizeError(f"no KV room for a {len(ids)}-token window in {self.path}")
        try:
            out = self.backend.forward([SeqWork(seq, list(ids), 0, all_logits=True)])[0]
        finally:
            self.backend.kv.free(seq)
        return np.asarray(out, dtype=np.float32)

    def greedy(self, prompts: list[list[int]], max_new: int, progress: bool, label: str
               ) -> tuple[list[list[int]], float | None]:
        """Greedy answers (max_new tokens each, EOS ignored) one request at a time through hearth's
        Engine, and the single-stream decode speed over them (tokens after the first / their time)."""
        from hearth.runtime import Engine, GenerationRequest, SamplingParams
        if self._engine is None:
            self._engine = Engine(self.backend, max_num_seqs=4)
        params = SamplingParams(max_tokens=max_new, temperature=0.0, ignore_eos=True)
        answers, decoded, seconds = [], 0, 0.0
        for ids in tqdm(prompts, desc=f"greedy answers, {label}", unit="prompt", file=sys.stderr,
                        disable=not progress, leave=False):
            toks: list[int] = []
            first = last = None
            for out in self._engine.stream_sync(GenerationRequest(prompt_token_ids=list(ids), params=params)):
                last = time.perf_counter()
                if first is None:
                    first = last  # prefill ends here: what follows is decode
                toks.extend(out.token_ids)
            answers.append(toks)
            if len(toks) > 1 and first is not None and last is not None:
                decoded += len(toks) - 1
                seconds += last - first
        return answers, (decoded / seconds if seconds > 0 else None)

    def close(self) -> None:
        if self._engine is not None:
            self._engine.shutdown()  # closes the backend too
        else:
            self.backend.close()


# ----------------------------------------------------------------------------- runs


@dataclass
class TextRun:
    """One held-out text under the parent: its ids, windows and stored parent logits."""

    lang: str
    ids: list[int]
    windows: list[Window]
    logits: np.ndarray
    """(n_scored, V) float32 parent logits at the scored positions (a read-only memmap)."""
    targets: np.ndarray
    """(n_scored,) the token each row predicts."""


@dataclass
class ParentRun:
    """Everything measured on a parent, kept for comparing its artifacts against."""

    path: Path
    format: str
    backend: str
    vocab: list[bytes]
    eos_ids: frozenset[int]
    texts: dict[str, TextRun]
    prompt_ids: list[list[int]]
    answers: list[list[int]]
    decode_tok_s: float | None
    window: int
    hash: str | None = None
    """content_hash of the parent, once some evaluation computed it."""
    measured: str | None = None
    """When a run read back from a report cache was measured (None: measured by this process)."""


@dataclass
class ArtifactRun:
    backend: str
    compare: dict[str, Compare]
    answers: list[list[int]]
    greedy_exact: float
    greedy_prefix: float
    decode_tok_s: float | None
    tokenizer_match: bool
    template_match: bool
    notes: list[str]


def _fingerprint(path: Path) -> tuple:
    files = [path] if path.is_file() else hashed_files(path)
    return tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files)


class ParentCache:
    """Parent runs shared between evaluations: a recipe evaluating four artifacts of one parent runs
    the parent once. Parent logits live in a temp dir removed by close() (or at exit); with `store`, runs
    are also kept there across processes (see the module docstring) and read back instead of re-scored."""

    def __init__(self, store: str | Path | None = None) -> None:
        self._dir = Path(tempfile.mkdtemp(prefix="hearth-report-"))
        self._finalizer = weakref.finalize(self, shutil.rmtree, self._dir, True)
        self._runs: dict[tuple, ParentRun] = {}
        self.store = Path(store) if store is not None else None

    def get(self, path: Path, fmt: str, cfg: EvalConfig, progress: bool = True) -> ParentRun:
        key = (str(path.resolve()), _fingerprint(path), cfg)
        run = self._runs.get(key)
        if run is not None:
            say(f"reusing the parent run of {path}")
            return run
        if self._dir is None:
            raise RuntimeError("the ParentCache is closed")
        if self.store is None:
            run = run_parent(path, fmt, cfg, Path(tempfile.mkdtemp(dir=self._dir)), progress)
        else:
            run = self._from_store(path, fmt, cfg, progress)
        self._runs[key] = run
        return run

    def _from_store(self, path: Path, fmt: str, cfg: EvalConfig, progress: bool) -> ParentRun:
        digest = content_hash(path)
        entry = self.store / store_key(path, digest, fmt, cfg)
        run = load_parent_run(entry, path)
        if run is not None:
            say(f"the parent's scores come from the report cache (measured {run.measured}; same content hash "
                f"and settings): {entry}")
            run.hash = digest
            return run
        with staged(entry, is_dir=True) as tmp:
            run = run_parent(path, fmt, cfg, tmp, progress)
            run.hash = digest
            save_parent_run(run, tmp)
        prune_store(self.store, keep=entry)
        stored = load_parent_run(entry, path)  # logits mapped from their final place
        if stored is None:
            return run
        stored.hash, stored.measured, stored.decode_tok_s = digest, None, run.decode_tok_s
        return stored

    def close(self) -> None:
        self._runs.clear()  # drops the memmaps before their files go
        self._finalizer()
        self._dir = None

    def __enter__(self) -> "ParentCache":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ----------------------------------------------------------------------------- parent runs on disk


def store_key(path: Path, digest: str, fmt: str, cfg: EvalConfig) -> str:
    """What a parent run depends on: the weights (content hash), the tokenizer and template files beside
    them, the format (backend) and the texts, prompts and settings."""
    h = hashlib.sha256(f"v{_STORE_VERSION}\0{digest}\0{fmt}\0{data_hash(cfg)}\n".encode())
    if path.is_dir():
        for f in sorted(path.iterdir()):
            if (f.is_file() and not f.name.startswith(".") and f.suffix not in WEIGHT_SUFFIXES
                    and f.suffix in (".json", ".jinja", ".model", ".txt") and f.name != "hearth.json"):
                h.update(f"{f.name}\0{hashlib.sha256(f.read_bytes()).hexdigest()}\n".encode())
    return h.hexdigest()[:32]


def save_parent_run(run: ParentRun, folder: Path) -> None:
    """Everything but the logits (already in folder/<lang>.npy from run_parent) as meta.json, written last."""
    for lang, text in run.texts.items():
        np.save(folder / f"{lang}.targets.npy", np.asarray(text.targets))
    meta = {"version": _STORE_VERSION, "format": run.format, "backend": run.backend,
            "vocab": [b.hex() for b in run.vocab], "eos_ids": sorted(run.eos_ids),
            "texts": {lang: {"ids": t.ids, "windows": [[w.begin, w.end, w.score_from] for w in t.windows]}
                      for lang, t in run.texts.items()},
            "prompt_ids": run.prompt_ids, "answers": run.answers, "decode_tok_s": run.decode_tok_s,
            "window": run.window, "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    atomic_write_text(folder / "meta.json", json.dumps(meta))


def load_parent_run(folder: Path, path: Path) -> ParentRun | None:
    """A stored run (logits memory-mapped), or None when there is none or it cannot be read."""
    try:
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
        if meta.get("version") != _STORE_VERSION:
            return None
        texts = {}
        for lang in LANGS:
            t = meta["texts"][lang]
            logits = np.load(folder / f"{lang}.npy", mmap_mode="r")
            targets = np.load(folder / f"{lang}.targets.npy")
            texts[lang] = TextRun(lang, t["ids"], [Window(*w) for w in t["windows"]], logits, targets)
        os.utime(folder / "meta.json")  # recently used: the last to be pruned
        return ParentRun(path, meta["format"], meta["backend"], [bytes.fromhex(v) for v in meta["vocab"]],
                         frozenset(meta["eos_ids"]), texts, meta["prompt_ids"], meta["answers"],
                         meta["decode_tok_s"], meta["window"], measured=meta["measured"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def prune_store(store: Path, keep: Path, entries: int = STORE_ENTRIES) -> None:
    """Remove all but the `entries` most recently used runs (never `keep`)."""
    runs = [d for d in store.iterdir()  # a hidden name is another writer's temp: never touched here
            if d.is_dir() and not d.name.startswith(".") and (d / "meta.json").is_file() and d != keep]
    runs.sort(key=lambda d: (d / "meta.json").stat().st_mtime, reverse=True)
    for d in runs[max(entries - 1, 0):]:
        shutil.rmtree(d, ignore_errors=True)


def _prompt_ids(model: LoadedModel, cfg: EvalConfig) -> list[list[int]]:
    """The chosen prompts through the model's chat template, tokenized as the Engine does it."""
    prompts = chat_prompts()
    bad = [i for i in cfg.prompts if not 0 <= i < len(prompts)]
    if bad:
        raise QuantizeError(f"prompt index {bad[0]} is out of range (there are {len(prompts)} prompts)")
    tok = model.tokenizer
    return [tok.encode(tok.apply_chat_template(prompts[i]["messages"], add_generation_prompt=True),
                       add_special_tokens=False) for i in cfg.prompts]


def _text_ids(model: LoadedModel, lang: str, cfg: EvalConfig) -> list[int]:
    return model.tokenizer.encode(heldout_text(lang), add_special_tokens=True)[:cfg.max_text_tokens]


def _bar(total: int, desc: str, progress: bool) -> tqdm:
    return tqdm(total=total, desc=desc, unit="window", file=sys.stderr, disable=not progress, leave=False)


def run_parent(path: Path, fmt: str, cfg: EvalConfig, workdir: Path, progress: bool = True) -> ParentRun:
    """Load the parent, score the held-out texts (logits kept under workdir), answer the prompts."""
    say(f"measuring the parent {path}")
    model = LoadedModel(path, fmt, cfg)
    try:
        window = min(cfg.window, model.max_len)
        stride = min(cfg.stride, window)
        texts_ids = {lang: _text_ids(model, lang, cfg) for lang in LANGS}
        plans = {lang: plan_windows(len(ids), window, stride) for lang, ids in texts_ids.items()}
        texts: dict[str, TextRun] = {}
        width = model.tokenizer.vocab_size
        with _bar(sum(map(len, plans.values())), f"scoring parent {path.name}", progress) as bar:
            for lang in LANGS:
                ids, plan = texts_ids[lang], plans[lang]
                n = sum(w.n_scored for w in plan)
                store = np.lib.format.open_memmap(workdir / f"{lang}.npy", mode="w+", dtype=np.float32,
                                                  shape=(n, width))
                targets = np.empty(n, dtype=np.int64)
                row = 0
                for w in plan:
                    lg = model.logits(ids[w.begin:w.end])
                    _check_width(lg, width, path)
                    store[row:row + w.n_scored] = lg[w.rows, :width]
                    targets[row:row + w.n_scored] = ids[w.score_from:w.end]
                    row += w.n_scored
                    bar.update(1)
                store.flush()
                del store
                stored = np.load(workdir / f"{lang}.npy", mmap_mode="r")
                texts[lang] = TextRun(lang, ids, plan, stored, targets)
        prompt_ids = _prompt_ids(model, cfg)
        vocab = model.vocab()
        answers, tok_s = model.greedy(prompt_ids, cfg.max_new_tokens, progress, f"parent {path.name}")
        return ParentRun(path, fmt, model.backend_name, vocab, frozenset(model.tokenizer.eos_token_ids),
                         texts, prompt_ids, answers, tok_s, window)
    finally:
        model.close()


def _check_width(logits: np.ndarray, width: int, path: Path) -> None:
    if logits.shape[-1] < width:
        raise QuantizeError(f"{path} gives {logits.shape[-1]} logits per position but its tokenizer has "
                            f"{width} tokens")


def check_vocab(parent: ParentRun, vocab: list[bytes], artifact: Path) -> tuple[int, str | None]:
    """KL and agreement compare distributions over token ids, so the ids must mean the same text.
    Returns (ids compared, a note when one vocabulary only adds ids past the other's end, e.g. a
    GGUF's padding entries); a real difference is an error."""
    width = min(len(vocab), len(parent.vocab))
    diff = [i for i, (a, b) in enumerate(zip(vocab[:width], parent.vocab[:width])) if a != b]
    if diff:
        i = diff[0]
        raise QuantizeError(
            f"the vocabularies differ: {len(diff)} of {width} token ids map to different text in "
            f"{artifact} ({len(vocab)} tokens) and its parent {parent.path} ({len(parent.vocab)} tokens) "
            f"(first: id {i} is {vocab[i]!r} in the artifact, {parent.vocab[i]!r} in the parent); "
            "KL divergence and token agreement need the same token ids")
    if len(vocab) == len(parent.vocab):
        return width, None
    used = max(max(max(t.ids) for t in parent.texts.values()), max(max(p) for p in parent.prompt_ids))
    if used >= width:
        raise QuantizeError(
            f"the vocabularies differ: {artifact} has {len(vocab)} tokens, its parent {parent.path} has "
            f"{len(parent.vocab)}, and the held-out text uses id {used}, which only the parent has")
    return width, (f"the vocabularies differ in size (artifact {len(vocab)}, parent {len(parent.vocab)} "
                   f"tokens); the first {width} ids are identical and KL is taken over those")


def run_artifact(path: Path, fmt: str, parent: ParentRun, cfg: EvalConfig, progress: bool = True
                 ) -> ArtifactRun:
    """Load the artifact, feed it the parent's token ids, compare logits and greedy answers."""
    say(f"measuring the artifact {path}")
    model = LoadedModel(path, fmt, cfg)
    notes: list[str] = []
    try:
        width, note = check_vocab(parent, model.vocab(), path)
        if note:
            notes.append(note)
        # the parent's ids are what both models are scored on; a different split is reported
        tokenizer_match = all(_text_ids(model, lang, cfg) == parent.texts[lang].ids for lang in LANGS)
        if not tokenizer_match:
            notes.append("the artifact's tokenizer splits the held-out text differently from the parent's "
                         "(same vocabulary); both were scored on the parent's token ids")
        prompt_ids = _prompt_ids(model, cfg)
        template_match = prompt_ids == parent.prompt_ids
        if not template_match:
            notes.append("the artifact's chat template or tokenizer renders the prompts differently; "
                         "both models answered the parent's prompt token ids")
        if model.max_len < parent.window:
            raise QuantizeError(f"{path} holds {model.max_len} tokens of context; the parent was scored "
                                f"in {parent.window}-token windows")
        compare = {lang: Compare() for lang in LANGS}
        n_windows = sum(len(t.windows) for t in parent.texts.values())
        with _bar(n_windows, f"scoring {path.name}", progress) as bar:
            for lang in LANGS:
                text, row = parent.texts[lang], 0
                for w in text.windows:
                    lg = model.logits(text.ids[w.begin:w.end])
                    _check_width(lg, width, path)
                    k = w.n_scored
                    compare[lang].add(text.logits[row:row + k, :width], lg[w.rows, :width],
                                      text.targets[row:row + k])
                    row += k
                    bar.update(1)
        answers, tok_s = model.greedy(parent.prompt_ids, cfg.max_new_tokens, progress, path.name)
        stops = parent.eos_ids | frozenset(model.tokenizer.eos_token_ids)
        agree = [answer_agreement(a, b, stops) for a, b in zip(answers, parent.answers)]
        return ArtifactRun(model.backend_name, compare, answers,
                           sum(same for same, _ in agree) / len(agree),
                           sum(frac for _, frac in agree) / len(agree),
                           tok_s, tokenizer_match, template_match, notes)
    finally:
        model.close()
