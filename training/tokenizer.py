"""Tokenizer stage: train a byte-level BPE tokenizer on a corpus, or extend a model's tokenizer with tokens
learned from domain text and resize the model's embeddings to match (the Chinese-LLaMA / BELLE move).

    hearth train tokenizer --config training/recipes/tokenizer_train.yaml
    hearth train tokenizer --config training/recipes/tokenizer_extend.yaml new_tokens=4000

mode "train": a fresh byte-level BPE (vocab size, special tokens, ChatML chat template) written in HF layout
with hearth.json (stage "base", method "tokenizer-train"); `hearth train pretrain` starts a model from it.

mode "extend": a BPE with the parent tokenizer's own pre-tokenizer is trained on the domain text; each token it
learns that the parent vocabulary lacks is appended after the parent's ids, with one merge that builds it
from pieces the parent tokenizer already produces. Parent ids stay as they were, so the model still reads its
own tokens. The model's input and output embeddings (tied or not) grow to the new vocabulary, the new rows set
to the mean of the rows in use. The output (tokenizer + resized model, stage "base", method
"tokenizer-extend", parent pinned by content hash) is ready for continued pretraining.

Both modes print characters per token on each `compare` text before (the parent's tokenizer, when there is
one) and after, and store the table in the manifest's metrics. The stage has no long loop and keeps no
intermediate state: `--resume` simply runs it again, with the same result.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from hearth.training.common import (MetricsLog, RunDir, TrainingConfigError, bundled, config_to_dict, find_file,
                                    make_temp, peak_memory_mb, publish, say, stage_manifest)
from hearth.training.data import load_texts

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


@dataclass
class Config:
    """The tokenizer recipe (training/recipes/tokenizer_train.yaml and tokenizer_extend.yaml mirror it)."""

    output_dir: str
    """Where the tokenizer (and, in extend mode, the resized model) and metrics.jsonl go."""
    mode: Literal["train", "extend"] = "train"
    data: list[str] = field(default_factory=lambda: ["training/data/corpus_en.txt", "training/data/corpus_zh.txt"])
    """Corpus files (.txt, documents separated by blank lines, or .jsonl with a "text" field)."""
    model: str | None = None
    """extend: the checkpoint whose tokenizer and embeddings grow (a dir or a registered model name).
    train: optional; its tokenizer is the "before" column of the chars/token table."""
    vocab_size: int = 8000
    """train: size of the new vocabulary, special tokens and the 256 byte symbols included."""
    new_tokens: int = 2000
    """extend: tokens the domain BPE learns beyond the byte alphabet; those the parent already has are
    skipped, so fewer are added (the count goes in the manifest)."""
    min_frequency: int = 2
    """A pair must occur this often in the corpus to become a token."""
    special_tokens: list[str] = field(default_factory=lambda: list(SPECIAL_TOKENS))
    """train: special tokens, given the first ids in this order."""
    bos_token: str | None = None
    eos_token: str = "<|im_end|>"
    """train: ends a chat turn and separates documents in pretraining."""
    pad_token: str = "<|endoftext|>"
    unk_token: str | None = "<|endoftext|>"
    split_digits: bool = True
    """train: every digit its own pre-token (as LLaMA and SmolLM do), so numbers tokenize consistently."""
    chat_template: str | None = None
    """train: a Jinja chat template; None gives hearth's ChatML template."""
    pad_to_multiple_of: int = 1
    """extend: round the embedding rows up to a multiple of this (64 suits GPU kernels); extra rows are mean rows."""
    compare: dict[str, str] = field(default_factory=lambda: {"zh": "training/data/corpus_zh.txt",
                                                              "en": "training/data/corpus_en.txt"})
    """Label -> text file whose characters per token are reported before and after."""

    def __post_init__(self) -> None:
        if not self.data:
            raise ValueError("data: give at least one corpus file")
        self.data = [bundled(p) for p in self.data]
        self.compare = {label: bundled(p) for label, p in self.compare.items()}
        if self.mode == "extend" and not self.model:
            raise ValueError("model: extend mode needs the checkpoint whose tokenizer it extends")
        if self.vocab_size < 300:
            raise ValueError(f"vocab_size must be >= 300 (256 byte symbols plus merges); got {self.vocab_size}")
        if self.new_tokens < 1:
            raise ValueError(f"new_tokens must be >= 1; got {self.new_tokens}")
        if self.min_frequency < 1:
            raise ValueError(f"min_frequency must be >= 1; got {self.min_frequency}")
        if self.pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be >= 1; got {self.pad_to_multiple_of}")
        if self.mode == "train":
            for name in ("eos_token", "pad_token", "unk_token", "bos_token"):
                tok = getattr(self, name)
                if tok is not None and tok not in self.special_tokens:
                    raise ValueError(f"{name} {tok!r} must be one of special_tokens {self.special_tokens}")


def resolve_checkpoint(name_or_path: str, field_name: str = "model") -> Path:
    from hearth.runtime.errors import HearthError
    from hearth.runtime.registry import resolve_model

    try:
        path = resolve_model(name_or_path, prefer="hf")
    except HearthError as e:
        raise TrainingConfigError(f"{field_name}: {e}") from None
    if not (path.is_dir() and (path / "config.json").is_file()):
        raise TrainingConfigError(f"{field_name}: {path} is not an HF checkpoint dir (needs config.json)")
    return path


# ----------------------------------------------------------------------------- measuring


def chars_per_token(tokenizer: Any, texts: list[str]) -> tuple[int, int]:
    """(characters, tokens) over the documents, special tokens not added; more chars per token = shorter."""
    chars = sum(len(t) for t in texts)
    tokens = sum(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])
    return chars, tokens


def compare_table(before: Any | None, after: Any, texts: dict[str, list[str]]) -> dict[str, dict[str, float]]:
    """Per label: chars, tokens and chars/token under the old tokenizer (if any) and the new one."""
    table = {}
    for label, docs in texts.items():
        row: dict[str, float] = {}
        if before is not None:
            chars, n = chars_per_token(before, docs)
            row.update(chars=chars, tokens_before=n, chars_per_token_before=round(chars / max(n, 1), 4))
        chars, n = chars_per_token(after, docs)
        row.update(chars=chars, tokens_after=n, chars_per_token_after=round(chars / max(n, 1), 4))
        table[label] = row
    return table


def format_table(table: dict[str, dict[str, float]]) -> str:
    has_before = any("tokens_before" in r for r in table.values())
    head = ["text", "chars"] + (["tokens before", "chars/token before"] if has_before else []) + \
        ["tokens after", "chars/token after"]
    rows = [head]
    for label, r in table.items():
        row = [label, str(r["chars"])]
        if has_before:
            row += [str(r.get("tokens_before", "")), f"{r.get('chars_per_token_before', 0):.3f}"]
        row += [str(r["tokens_after"]), f"{r['chars_per_token_after']:.3f}"]
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in rows]
    return "\n".join([lines[0], "-" * len(lines[0])] + lines[1:])


# ----------------------------------------------------------------------------- train a fresh tokenizer


def train_bpe(texts: list[str], cfg: Config) -> Any:
    """A byte-level BPE tokenizer (HF fast tokenizer object) trained on `texts`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from hearth.runtime.chat_template import DEFAULT_CHATML_TEMPLATE

    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                         if cfg.split_digits else byte_level)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=cfg.vocab_size, min_frequency=cfg.min_frequency,
                                  special_tokens=list(cfg.special_tokens), show_progress=sys.stderr.isatty(),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer, length=len(texts))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=cfg.bos_token, eos_token=cfg.eos_token,
                                   pad_token=cfg.pad_token, unk_token=cfg.unk_token)
    fast.chat_template = cfg.chat_template or DEFAULT_CHATML_TEMPLATE
    return fast


# ----------------------------------------------------------------------------- extend an existing one


def _has_byte_level(pre: dict | None) -> bool:
    if not pre:
        return False
    if pre.get("type") == "ByteLevel":
        return True
    return any(_has_byte_level(p) for p in pre.get("pretokenizers", []))


def _pairs(merges: list) -> list[tuple[str, str]]:
    """tokenizer.json merges come as ["a", "b"] pairs (tokenizers >= 0.20) or "a b" strings (older)."""
    return [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in merges]


def _segment(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """What BPE makes of one pre-token: apply the best-ranked merge until none applies."""
    parts = list(word)
    while len(parts) > 1:
        best = min(((ranks[p], i) for i, p in enumerate(zip(parts, parts[1:])) if p in ranks), default=None)
        if best is None:
            break
        i = best[1]
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return parts


@dataclass
class Extension:
    tokenizer_json: dict[str, Any]
    """The parent's tokenizer.json with the new tokens and merges appended."""
    added: list[str]
    """New tokens in id order (byte-level symbols, e.g. 'åĮĹäº¬'), the first at id `first_id`."""
    first_id: int
    learned: int
    """Tokens the domain BPE learned; those the parent had, or that no merge can reach, are not added."""


def extend_bpe(parent_json: dict[str, Any], texts: list[str], new_tokens: int, min_frequency: int = 2) -> Extension:
    """Learn a BPE on `texts` with the parent's normalizer and pre-tokenizer, then append every token the
    parent lacks to its vocabulary (ids after all existing ones, added tokens included) together with one
    merge that builds it, ranked after every parent merge, so old text keeps tokenizing to old ids except
    where a new token now spans it."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    model = parent_json.get("model", {})
    if model.get("type") != "BPE" or not _has_byte_level(parent_json.get("pre_tokenizer")):
        raise NotImplementedError(
            f"extend supports byte-level BPE tokenizers (GPT-2, LLaMA-3, Qwen, SmolLM families); this one is "
            f"{model.get('type')!r} with pre-tokenizer {(parent_json.get('pre_tokenizer') or {}).get('type')!r}")
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        raise NotImplementedError("extend does not support BPE models with subword prefixes or word suffixes")

    parent = Tokenizer.from_str(json.dumps(parent_json))
    domain = Tokenizer(models.BPE())
    domain.normalizer = parent.normalizer
    domain.pre_tokenizer = parent.pre_tokenizer  # the same pre-tokens, so learned merges fit the parent's
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=len(alphabet) + new_tokens, min_frequency=min_frequency,
                                  initial_alphabet=alphabet, show_progress=sys.stderr.isatty())
    domain.train_from_iterator(texts, trainer, length=len(texts))
    domain_merges = _pairs(json.loads(domain.to_str())["model"]["merges"])

    vocab: dict[str, int] = dict(model["vocab"])
    merges = _pairs(model["merges"])
    ranks = {m: r for r, m in enumerate(merges)}
    used_ids = list(vocab.values()) + [t["id"] for t in parent_json.get("added_tokens", [])]
    first_id = next_id = max(used_ids) + 1
    added: list[str] = []

    def add(token: str) -> None:
        nonlocal next_id
        vocab[token] = next_id
        added.append(token)
        next_id += 1

    for a, b in domain_merges:  # in the order learned: the pieces of a token come before it
        token = a + b
        if token in vocab:
            continue
        for ch in token:  # a byte the parent never saw (rare: e.g. 0xF5-0xFF) becomes a base token
            if ch not in vocab:
                add(ch)
        pieces = _segment(token, ranks)
        if len(pieces) != 2:  # the parent's merges split it other than in two: no single merge reaches it
            continue
        add(token)
        ranks[tuple(pieces)] = len(merges)
        merges.append(tuple(pieces))
    model = dict(model, vocab=vocab, merges=[list(m) for m in merges])
    return Extension(tokenizer_json=dict(parent_json, model=model), added=added, first_id=first_id,
                     learned=len(domain_merges))


def resize_embeddings(model: Any, new_rows: int, rows_in_use: int, pad_to_multiple_of: int = 1) -> tuple[int, int]:
    """Grow input and output embeddings to at least `new_rows` (rounded up to `pad_to_multiple_of`); every row
    at or beyond `rows_in_use` becomes the mean of the rows before it. Returns (old rows, new rows)."""
    import torch

    old_rows = model.get_input_embeddings().weight.shape[0]
    target = max(old_rows, -(-new_rows // pad_to_multiple_of) * pad_to_multiple_of)
    if target > old_rows:
        model.resize_token_embeddings(target, mean_resizing=False)
    with torch.no_grad():
        inp = model.get_input_embeddings().weight  # (V, H)
        inp[rows_in_use:] = inp[:rows_in_use].mean(dim=0)
        out = model.get_output_embeddings()
        if out is not None and out.weight.data_ptr() != inp.data_ptr():  # untied head: its own mean
            out.weight[rows_in_use:] = out.weight[:rows_in_use].mean(dim=0)
            if getattr(out, "bias", None) is not None:
                out.bias[rows_in_use:] = out.bias[:rows_in_use].mean()
    return old_rows, target


# ----------------------------------------------------------------------------- the stage


def _load_corpus(paths: list[str], field_name: str) -> tuple[list[str], list[Path]]:
    files = [find_file(p, f"{field_name}[{i}]") for i, p in enumerate(paths)]
    return [doc for f in files for doc in load_texts(f)], files


def run(config: Config, resume: bool = False) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = config
    t0 = time.time()
    run_dir = RunDir(cfg.output_dir)
    if resume:
        say("the tokenizer stage keeps no intermediate state; running it again")
    texts, files = _load_corpus(cfg.data, "data")
    compare_files = {label: find_file(p, f"compare.{label}") for label, p in cfg.compare.items()}
    compare = {label: load_texts(f) for label, f in compare_files.items()}
    parent = resolve_checkpoint(cfg.model) if cfg.model else None
    before = AutoTokenizer.from_pretrained(parent, local_files_only=True) if parent else None
    say(f"mode {cfg.mode}: {len(texts)} documents, {sum(map(len, texts))} characters from {len(files)} file(s)")

    params = config_to_dict(cfg)
    metrics: dict[str, Any] = {}
    if cfg.mode == "train":
        tok = train_bpe(texts, cfg)
        metrics["vocab_size"] = len(tok)

        def fill(tmp: Path) -> None:
            tok.save_pretrained(tmp)
        after = tok
        manifest_parent = None
        method = "tokenizer-train"
    else:
        parent_json = json.loads(before.backend_tokenizer.to_str())
        ext = extend_bpe(parent_json, texts, cfg.new_tokens, cfg.min_frequency)
        if not ext.added:
            raise TrainingConfigError(f"data: the domain text taught no token that {parent} lacks; "
                                      "give more or different text, or raise new_tokens")
        say(f"domain BPE learned {ext.learned} merges; {len(ext.added)} new tokens from id {ext.first_id}")
        staging = make_temp(run_dir.out / "tokenizer", is_dir=True)  # owner-named: a later run clears it if we die
        before.save_pretrained(staging)  # config, special tokens, chat template as the parent had them
        (staging / "tokenizer.json").write_text(json.dumps(ext.tokenizer_json, ensure_ascii=False), encoding="utf-8")
        after = AutoTokenizer.from_pretrained(staging, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(parent, dtype="auto", local_files_only=True)
        # every id below the first new one belongs to the parent tokenizer (rows past them are padding)
        rows_in_use = min(ext.first_id, model.get_input_embeddings().weight.shape[0])
        old_rows, new_rows = resize_embeddings(model, len(after), rows_in_use, cfg.pad_to_multiple_of)
        say(f"embeddings {old_rows} -> {new_rows} rows (tied: {model.config.tie_word_embeddings})")
        metrics.update(added_tokens=len(ext.added), learned_merges=ext.learned, vocab_size=len(after),
                       embedding_rows_before=old_rows, embedding_rows_after=new_rows)

        def fill(tmp: Path) -> None:
            model.save_pretrained(tmp, safe_serialization=True)
            for f in staging.iterdir():
                f.replace(tmp / f.name)
        manifest_parent = parent
        method = "tokenizer-extend"

    table = compare_table(before, after, compare)
    print(format_table(table), flush=True)
    metrics["chars_per_token"] = table
    metrics.update({k: round(v, 1) for k, v in peak_memory_mb().items()}, seconds=round(time.time() - t0, 2))
    MetricsLog(run_dir.metrics).log(step=0, **{f"chars_per_token_after/{k}": r["chars_per_token_after"]
                                              for k, r in table.items()})
    manifest = stage_manifest("base", method, manifest_parent, params, data_files=files, metrics=metrics)
    try:
        publish(run_dir.out, fill, manifest)
    finally:
        if cfg.mode == "extend":
            shutil.rmtree(staging, ignore_errors=True)
    say(f"wrote {run_dir.out} in {time.time() - t0:.1f}s")
    return run_dir.out
