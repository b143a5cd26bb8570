"""Data curation: exact and near-duplicate removal, language and length filters and perplexity filtering with a
reference model, over every data format hearth reads, with a report of what was dropped and why.

    hearth data curate --config training/recipes/curate.yaml
    hearth data curate data='[mine.jsonl]' output_dir=runs/curated reference_model=smollm2-135m-instruct
    hearth data curate --help                     # every field, with its default and meaning

Inputs: chat records (Alpaca/BELLE, OpenAI messages, ShareGPT), preference pairs, and text corpora (.txt, or
.jsonl with a "text" field), each file read and checked by hearth.training.data. The rules read a record's text
(every turn of a chat, prompt and both answers of a pair) and run in this order, cheapest first, each record
dropped by the first rule it fails:

  exact_duplicate   the same text after NFKC, case folding and whitespace collapsing as an earlier record
  too_short/long    outside [min_chars, max_chars] characters or [min_tokens, max_tokens] tokens
  language          less than min_language_share of its letters in the scripts of `languages` (zh: Han,
                    en: Latin, ja: kana, ko: Hangul, ru: Cyrillic, ar: Arabic); no letters at all passes
  near_duplicate    character-shingle Jaccard similarity to an earlier kept record at or above
                    near_dedup_threshold, the candidates found by MinHash LSH (datasketch)
  perplexity        the reference model's perplexity above max_perplexity or the perplexity_percentile of
                    the scored records (gibberish, boilerplate, broken encodings)

Duplicates are looked for across all inputs, the first occurrence kept. Output in output_dir: each input's kept
records under the input's file name, in its format (JSONL, JSON array or .txt), unchanged; report.json and
report.md (counts and examples per rule) and report.png (histograms of length and perplexity). Every file is
written atomically; the perplexity of each record is saved as it is computed (perplexity_scores.jsonl), so a
killed run started again only scores what it had not.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import sys
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from .common import TrainingConfigError, TrainingDataError, atomic_write_text, bundled, progress
from .data import _records, load_chats, load_preferences, load_texts
from .pretrain import _checkpoint_dir

RULES = ("exact_duplicate", "too_short", "too_long", "language", "near_duplicate", "perplexity")
RULE_DOCS = {
    "exact_duplicate": "the same normalized text as an earlier record",
    "too_short": "fewer characters or tokens than min_chars / min_tokens",
    "too_long": "more characters or tokens than max_chars / max_tokens",
    "language": "too few letters in the scripts of `languages`",
    "near_duplicate": "Jaccard similarity (MinHash LSH candidates) to an earlier kept record >= near_dedup_threshold",
    "perplexity": "the reference model's perplexity above the threshold",
}
SCORES_FILE = "perplexity_scores.jsonl"


def say(msg: str) -> None:
    print(f"curate: {msg}", file=sys.stderr, flush=True)


@dataclass
class Config:
    """A curation run; training/recipes/curate.yaml mirrors it."""

    data: list[str] = field(default_factory=list)
    """Input files: chat records, preference pairs, or text corpora (.txt, .jsonl with "text")."""
    output_dir: str = "runs/curated"
    """Where the kept records (one file per input, its name and format), report.md, report.json and
    report.png go."""
    exact_dedup: bool = True
    """Drop records whose normalized text (NFKC, case folded, whitespace collapsed) was seen before."""
    near_dedup: bool = True
    """Drop records too similar to an earlier kept one (MinHash LSH)."""
    near_dedup_threshold: float = 0.8
    """Jaccard similarity of the character-shingle sets at or above which a record is a near-duplicate."""
    shingle_size: int = 5
    """Characters per shingle for MinHash (character shingles work for Chinese, which has no spaces)."""
    num_perm: int = 128
    """MinHash permutations: more find the candidate pairs more reliably, at more cost."""
    languages: list[str] = field(default_factory=lambda: ["zh", "en"])
    """Languages to keep, by script: zh (Han), en (Latin script, so also other Latin-script languages),
    ja, ko, ru, ar. Empty: no language filter."""
    min_language_share: float = 0.5
    """Share of a record's letters that must be in the kept languages' scripts."""
    min_chars: int = 1
    """Fewest characters a record's text may have."""
    max_chars: int | None = None
    """Most characters a record's text may have (null: no limit)."""
    min_tokens: int | None = None
    """Fewest tokens (with `tokenizer`) a record's text may have (null: no limit)."""
    max_tokens: int | None = None
    """Most tokens (with `tokenizer`) a record's text may have, e.g. the SFT max_length (null: no limit)."""
    tokenizer: str | None = None
    """Model (registered name or checkpoint dir) whose tokenizer counts tokens; default the reference model,
    else the default model."""
    reference_model: str | None = None
    """Model (registered name or checkpoint dir) whose perplexity filters records; null: no perplexity filter."""
    max_perplexity: float | None = None
    """Drop records whose perplexity is above this."""
    perplexity_percentile: float | None = 95.0
    """Drop records above this percentile of the scored records' perplexities (95: the worst 5%); null: off."""
    perplexity_max_tokens: int = 256
    """Tokens of a record's text the reference model reads (the start of the text)."""
    batch_size: int = 8
    """Records per forward pass of the reference model."""
    device: str = "auto"
    """Where the reference model runs: auto (CUDA when present), cpu, cuda or cuda:N."""
    examples: int = 3
    """Examples of dropped records shown per rule in the report."""

    def __post_init__(self) -> None:
        if not self.data:
            raise ValueError("data: give at least one input file")
        self.data = [bundled(p) for p in self.data]
        if not 0 < self.near_dedup_threshold <= 1:
            raise ValueError(f"near_dedup_threshold must be in (0, 1]; got {self.near_dedup_threshold}")
        if not 0 <= self.min_language_share <= 1:
            raise ValueError(f"min_language_share must be in [0, 1]; got {self.min_language_share}")
        unknown = sorted(set(self.languages) - set(LANGUAGE_SCRIPTS))
        if unknown:
            raise ValueError(f"languages: {unknown} unknown; choose from {sorted(LANGUAGE_SCRIPTS)}")
        for name in ("shingle_size", "num_perm", "perplexity_max_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}")
        if self.perplexity_max_tokens < 2:
            raise ValueError("perplexity_max_tokens must be >= 2")
        for lo, hi in (("min_chars", "max_chars"), ("min_tokens", "max_tokens")):
            a, b = getattr(self, lo), getattr(self, hi)
            if (a is not None and a < 0) or (b is not None and b < 1):
                raise ValueError(f"{lo} must be >= 0 and {hi} >= 1")
            if a is not None and b is not None and a > b:
                raise ValueError(f"{lo} ({a}) is above {hi} ({b})")
        if self.perplexity_percentile is not None and not 0 < self.perplexity_percentile < 100:
            raise ValueError(f"perplexity_percentile must be in (0, 100); got {self.perplexity_percentile}")
        if self.max_perplexity is not None and self.max_perplexity <= 1:
            raise ValueError(f"max_perplexity must be > 1; got {self.max_perplexity}")
        if self.examples < 0:
            raise ValueError(f"examples must be >= 0; got {self.examples}")


@dataclass
class Record:
    """One input record: where it is, the record as read (written back unchanged) and the text rules read."""

    file: int
    line: int
    """Where it starts: the line of a JSONL record or JSON array element, the number of a .txt document."""
    raw: Any
    text: str
    dropped: str | None = None
    """The rule that dropped it, None while kept."""
    detail: str = ""
    perplexity: float | None = None

    def where(self, files: list[Path]) -> str:
        return f"{files[self.file].name}:{self.line}"


@dataclass
class Result:
    outputs: list[Path]
    report_json: Path
    report_md: Path
    report_png: Path | None
    total: int
    kept: int
    dropped: dict[str, int]


# ----------------------------------------------------------------------------- reading and writing


def read_input(path: Path, index: int) -> tuple[str, bool, list[Record]]:
    """(kind: chat|preference|text, written as a JSON array?, records) of one input, checked by the loaders of
    hearth.training.data so a bad record is reported as training would report it."""
    if path.suffix not in (".jsonl", ".json"):
        docs = load_texts(path)
        return "text", False, [Record(index, n + 1, d, d) for n, d in enumerate(docs)]
    raws = list(_records(path))
    if not raws:
        raise TrainingDataError(path, None, None, "holds no records")
    first = raws[0][1]
    as_array = path.read_text(encoding="utf-8").lstrip().startswith("[")
    if isinstance(first, dict) and "text" in first:
        docs = load_texts(path)
        return "text", as_array, [Record(index, n, rec, d) for (n, rec), d in zip(raws, docs)]
    if isinstance(first, dict) and ("chosen" in first and "rejected" in first or "responses" in first):
        # a ranking of K answers expands into several pairs: its text is the prompt and each answer once
        parts: dict[int, list[str]] = {}
        for pair in load_preferences(path):
            line = int(pair.source.rpartition(":")[2])
            texts = parts.setdefault(line, [m["content"] for m in pair.prompt])
            texts += [a for a in (pair.chosen, pair.rejected) if a not in texts]
        return "preference", as_array, [Record(index, n, rec, "\n".join(parts[n])) for n, rec in raws]
    chats = load_chats(path)
    texts = ["\n".join(m["content"] for m in c.messages) for c in chats]
    return "chat", as_array, [Record(index, n, rec, t) for (n, rec), t in zip(raws, texts)]


def write_output(path: Path, kind: str, as_array: bool, records: list[Record]) -> Path:
    if kind == "text" and path.suffix not in (".jsonl", ".json"):
        text = "".join(r.raw.rstrip("\n") + "\n\n" for r in records)
    elif as_array:
        text = json.dumps([r.raw for r in records], ensure_ascii=False, indent=1) + "\n"
    else:
        text = "".join(json.dumps(r.raw, ensure_ascii=False) + "\n" for r in records)
    return atomic_write_text(path, text)


# ----------------------------------------------------------------------------- the rules


def normalize(text: str) -> str:
    """What "the same text" means for exact deduplication: NFKC, case folded, whitespace runs as one space."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def text_hash(text: str) -> str:
    return hashlib.blake2b(normalize(text).encode("utf-8"), digest_size=16).hexdigest()


# Code point ranges of each script the language filter knows (a language is kept or dropped by its script).
SCRIPT_RANGES = {
    "han": [(0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xF900, 0xFAFF), (0x20000, 0x2A6DF)],
    "kana": [(0x3040, 0x30FF), (0x31F0, 0x31FF), (0xFF66, 0xFF9D)],
    "hangul": [(0x1100, 0x11FF), (0x3130, 0x318F), (0xAC00, 0xD7AF)],
    "latin": [(0x41, 0x5A), (0x61, 0x7A), (0xC0, 0xD6), (0xD8, 0xF6), (0xF8, 0x24F), (0xFF21, 0xFF3A),
              (0xFF41, 0xFF5A)],
    "cyrillic": [(0x400, 0x4FF)],
    "arabic": [(0x600, 0x6FF)],
}
LANGUAGE_SCRIPTS = {"zh": "han", "ja": "kana", "ko": "hangul", "en": "latin", "ru": "cyrillic", "ar": "arabic"}
_SCRIPT_OF = {v: k for k, v in LANGUAGE_SCRIPTS.items()}


def _script(ch: str) -> str | None:
    cp = ord(ch)
    for name, ranges in SCRIPT_RANGES.items():
        if any(a <= cp <= b for a, b in ranges):
            return name
    return "other" if ch.isalpha() else None


def language_shares(text: str) -> dict[str, float]:
    """Share of the letters of `text` per language (by script), e.g. {"zh": 0.9, "en": 0.1}; {} with no letters.
    Han characters beside kana (at least a tenth of the two) count as Japanese."""
    counts = Counter(s for s in map(_script, text) if s is not None)
    letters = sum(counts.values())
    if not letters:
        return {}
    if counts["kana"] and counts["kana"] >= 0.1 * (counts["kana"] + counts["han"]):
        counts["kana"] += counts.pop("han", 0)
    return {_SCRIPT_OF.get(s, "other"): n / letters for s, n in counts.items() if n}


def _shingles(text: str, k: int) -> set[bytes]:
    t = normalize(text)
    if len(t) <= k:
        return {t.encode("utf-8")}
    return {t[i:i + k].encode("utf-8") for i in range(len(t) - k + 1)}


def near_duplicates(texts: list[str], threshold: float, shingle_size: int, num_perm: int,
                    keep: Iterable[bool] | None = None, bar: Any = None) -> dict[int, tuple[int, float]]:
    """{index: (index of the earlier kept text it nearly repeats, Jaccard)} over `texts` in order, only texts
    whose `keep` is true taking part. MinHash signatures of the character shingles find candidates through LSH
    bands that catch a pair at `threshold` 99 times in 100 (lsh_bands; more similar pairs more surely); each
    candidate's Jaccard similarity is then computed exactly from the two shingle sets, so no pair below the
    threshold is dropped."""
    from datasketch import MinHash, MinHashLSH

    lsh = MinHashLSH(num_perm=num_perm, params=lsh_bands(threshold, num_perm))
    found: dict[int, tuple[int, float]] = {}
    for i, (text, ok) in enumerate(zip(texts, keep if keep is not None else [True] * len(texts))):
        if bar is not None:
            bar.update(1)
        if not ok:
            continue
        grams = _shingles(text, shingle_size)
        m = MinHash(num_perm=num_perm, seed=1)
        m.update_batch(sorted(grams))
        best = None
        for j in sorted(lsh.query(m)):
            other = _shingles(texts[j], shingle_size)
            sim = len(grams & other) / len(grams | other)
            if sim >= threshold and (best is None or sim > best[1]):
                best = (j, sim)
        if best is not None:
            found[i] = best
            continue
        lsh.insert(i, m)
    return found


def lsh_bands(threshold: float, num_perm: int, recall: float = 0.99) -> tuple[int, int]:
    """(bands, rows per band) for LSH: the most rows per band (the fewest dissimilar candidates) that still make
    a pair at exactly `threshold` a candidate with probability `recall`; the exact check then drops the rest."""
    for rows in range(num_perm, 0, -1):
        bands = num_perm // rows
        if 1 - (1 - threshold ** rows) ** bands >= recall:
            return bands, rows
    return num_perm, 1


def _load_tokenizer(name: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(_model_dir(name, "tokenizer"), local_files_only=True)


def _model_dir(name: str, field_name: str) -> Path:
    return _checkpoint_dir(name, field_name)  # a GGUF file cannot score: a checkpoint dir is needed


def perplexities(texts: list[str], model_name: str, max_tokens: int, batch_size: int, device: str,
                 cache: Path | None = None) -> list[float | None]:
    """Per text, exp(mean next-token cross-entropy) of its first `max_tokens` tokens under the model; None for
    a text of fewer than two tokens. With `cache`, scores already there (same model and max_tokens) are reused
    and each batch's scores are appended as they are computed."""
    import torch
    from transformers import AutoModelForCausalLM

    model_dir = _model_dir(model_name, "reference_model")
    key = {"model": str(model_dir.resolve()), "max_tokens": max_tokens}
    hashes = [text_hash(t) + hashlib.blake2b(t.encode("utf-8"), digest_size=4).hexdigest() for t in texts]
    known = _read_scores(cache, key) if cache is not None else {}
    todo = sorted({h: i for i, h in enumerate(hashes) if h not in known}.values(), key=lambda i: len(texts[i]))
    if todo:
        tok = _load_tokenizer(model_name)
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        device = device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = "auto" if device.startswith("cuda") else torch.float32  # bf16 matmuls are slow on most CPUs
        model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True, dtype=dtype).to(device).eval()
        if cache is not None and not known:
            atomic_write_text(cache, json.dumps({"key": key}) + "\n")
        bar = progress(len(todo), "perplexity", unit="record")
        for b in range(0, len(todo), batch_size):
            idx = todo[b:b + batch_size]
            enc = tok([texts[i] for i in idx], add_special_tokens=False, truncation=True, max_length=max_tokens,
                      padding=True, return_tensors="pt").to(device)
            with torch.no_grad():
                logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits  # (B, T, V)
            nll = torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), enc["input_ids"][:, 1:],
                                                    reduction="none")  # (B, T-1)
            mask = enc["attention_mask"][:, 1:].float() * enc["attention_mask"][:, :-1].float()
            counts = mask.sum(1)
            means = (nll * mask).sum(1) / counts.clamp(min=1)
            scores = {hashes[i]: (math.exp(m) if n >= 1 else None)
                      for i, m, n in zip(idx, means.tolist(), counts.tolist())}
            known.update(scores)
            if cache is not None:
                with open(cache, "a", encoding="utf-8") as f:
                    f.write("".join(json.dumps({"h": h, "ppl": v}) + "\n" for h, v in scores.items()))
            bar.update(len(idx))
        bar.close()
    return [known[h] for h in hashes]


def _read_scores(cache: Path, key: dict[str, Any]) -> dict[str, float | None]:
    try:
        lines = cache.read_text(encoding="utf-8").splitlines()
    except OSError:
        return {}
    try:
        if not lines or json.loads(lines[0]).get("key") != key:
            return {}
    except json.JSONDecodeError:
        return {}
    out = {}
    for line in lines[1:]:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            break  # a line cut by a kill
        out[rec["h"]] = rec["ppl"]
    return out


def _percentile(values: list[float], q: float) -> float:
    """The q-th percentile (linear interpolation between the nearest ranks, as numpy's default)."""
    s = sorted(values)
    pos = (len(s) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


# ----------------------------------------------------------------------------- the run


def run(cfg: Config) -> Result:
    """Apply the rules to cfg.data; write the kept records and the report into cfg.output_dir."""
    files = [Path(p) for p in cfg.data]
    for i, f in enumerate(files):
        if not f.is_file():
            raise TrainingConfigError(f"data[{i}]: no file at {f}")
    out = Path(cfg.output_dir).expanduser()
    names = [f.name for f in files]
    names = [n if names.count(n) == 1 else f"{i}-{n}" for i, n in enumerate(names)]
    if any(out.resolve() / n == f.resolve() for n, f in zip(names, files)):
        raise TrainingConfigError("output_dir: would overwrite an input; choose another folder")
    out.mkdir(parents=True, exist_ok=True)

    inputs = [read_input(f, i) for i, f in enumerate(files)]
    records = [r for _, _, recs in inputs for r in recs]
    say(f"curating {len(records)} records from {len(files)} file(s)")

    def drop(r: Record, rule: str, detail: str) -> None:
        r.dropped, r.detail = rule, detail

    seen: dict[str, Record] = {}
    for r in records:
        h = text_hash(r.text)
        if cfg.exact_dedup and h in seen:
            drop(r, "exact_duplicate", f"same text as {seen[h].where(files)}")
        seen.setdefault(h, r)
    _length_rules(cfg, records, drop)
    if cfg.languages:
        allowed = set(cfg.languages)
        for r in records:
            if r.dropped:
                continue
            shares = language_shares(r.text)
            share = sum(v for k, v in shares.items() if k in allowed)
            if shares and share < cfg.min_language_share:
                main = max(shares.items(), key=lambda kv: kv[1])
                drop(r, "language", f"{main[0]} {main[1]:.0%} of letters; {'+'.join(cfg.languages)} {share:.0%}")
    if cfg.near_dedup:
        bar = progress(len(records), "near-duplicates", unit="record")
        near = near_duplicates([r.text for r in records], cfg.near_dedup_threshold, cfg.shingle_size, cfg.num_perm,
                               keep=[r.dropped is None for r in records], bar=bar)
        bar.close()
        for i, (j, sim) in near.items():
            drop(records[i], "near_duplicate", f"Jaccard {sim:.2f} with {records[j].where(files)}")

    ppl_info = _perplexity_rule(cfg, records, out, drop)

    kept_by_file: list[list[Record]] = [[] for _ in files]
    for r in records:
        if r.dropped is None:
            kept_by_file[r.file].append(r)
    outputs = [write_output(out / n, kind, arr, kept) for n, (kind, arr, _), kept in zip(names, inputs, kept_by_file)]
    report = _report(cfg, files, inputs, records, kept_by_file, outputs, ppl_info)
    png = _plot(cfg, records, ppl_info, out / "report.png")
    report_json = atomic_write_text(out / "report.json", json.dumps(report, ensure_ascii=False, indent=2) + "\n")
    report_md = atomic_write_text(out / "report.md", _markdown(report, png))
    dropped = {k: v["dropped"] for k, v in report["rules"].items()}
    say(f"kept {report['kept']} of {report['total']}; dropped: "
        + (", ".join(f"{k} {v}" for k, v in dropped.items() if v) or "none"))
    return Result(outputs, report_json, report_md, png, report["total"], report["kept"], dropped)


def _length_rules(cfg: Config, records: list[Record], drop: Any) -> None:
    for r in records:
        if r.dropped:
            continue
        n = len(r.text)
        if n < cfg.min_chars:
            drop(r, "too_short", f"{n} chars < min_chars {cfg.min_chars}")
        elif cfg.max_chars is not None and n > cfg.max_chars:
            drop(r, "too_long", f"{n} chars > max_chars {cfg.max_chars}")
    if cfg.min_tokens is None and cfg.max_tokens is None:
        return
    from hearth.runtime.registry import DEFAULT_MODEL

    tok = _load_tokenizer(cfg.tokenizer or cfg.reference_model or DEFAULT_MODEL)
    live = [r for r in records if not r.dropped]
    lengths = [len(ids) for ids in tok([r.text for r in live], add_special_tokens=False)["input_ids"]] if live else []
    for r, n in zip(live, lengths):
        if cfg.min_tokens is not None and n < cfg.min_tokens:
            drop(r, "too_short", f"{n} tokens < min_tokens {cfg.min_tokens}")
        elif cfg.max_tokens is not None and n > cfg.max_tokens:
            drop(r, "too_long", f"{n} tokens > max_tokens {cfg.max_tokens}")


def _perplexity_rule(cfg: Config, records: list[Record], out: Path, drop: Any) -> dict[str, Any]:
    if not cfg.reference_model or (cfg.max_perplexity is None and cfg.perplexity_percentile is None):
        return {}
    live = [r for r in records if r.dropped is None]
    if not live:
        return {}
    scores = perplexities([r.text for r in live], cfg.reference_model, cfg.perplexity_max_tokens, cfg.batch_size,
                          cfg.device, cache=out / SCORES_FILE)
    scored = [s for s in scores if s is not None and math.isfinite(s)]
    limits = []
    if cfg.max_perplexity is not None:
        limits.append(cfg.max_perplexity)
    if cfg.perplexity_percentile is not None and scored:
        limits.append(_percentile(scored, cfg.perplexity_percentile))
    threshold = min(limits) if limits else math.inf
    for r, s in zip(live, scores):
        r.perplexity = s
        if s is not None and (not math.isfinite(s) or s > threshold):
            drop(r, "perplexity", f"perplexity {s:.1f} > {threshold:.1f}")
    return {"model": cfg.reference_model, "threshold": threshold if math.isfinite(threshold) else None,
            "scores": scores, "scored": len(scored),
            "median": _percentile(scored, 50) if scored else None}


def _excerpt(text: str, n: int = 160) -> str:
    one = re.sub(r"\s+", " ", text).strip()
    return one if len(one) <= n else one[:n - 1] + "…"


def _report(cfg: Config, files: list[Path], inputs: list, records: list[Record], kept_by_file: list[list[Record]],
            outputs: list[Path], ppl: dict[str, Any]) -> dict[str, Any]:
    rules: dict[str, Any] = {}
    for rule in RULES:
        hit = [r for r in records if r.dropped == rule]
        rules[rule] = {"dropped": len(hit), "what": RULE_DOCS[rule],
                       "examples": [{"where": r.where(files), "why": r.detail, "text": _excerpt(r.text)}
                                    for r in hit[:cfg.examples]]}
    per_file = [{"input": str(f), "output": str(o), "kind": kind, "records": len(recs),
                 "kept": len(kept), "dropped": dict(Counter(r.dropped for r in recs if r.dropped))}
                for f, o, (kind, _, recs), kept in zip(files, outputs, inputs, kept_by_file)]
    total, kept = len(records), sum(len(k) for k in kept_by_file)
    report: dict[str, Any] = {"total": total, "kept": kept, "dropped": total - kept, "rules": rules, "files": per_file,
                              "config": {k: v for k, v in vars(cfg).items()}}
    if ppl:
        report["perplexity"] = {k: v for k, v in ppl.items() if k != "scores"}
    return report


def _markdown(report: dict[str, Any], png: Path | None) -> str:
    lines = ["# Curation report", "",
             f"Kept **{report['kept']}** of {report['total']} records ({report['dropped']} dropped).", "",
             "| input | kind | records | kept |", "|---|---|---:|---:|"]
    lines += [f"| {Path(f['input']).name} | {f['kind']} | {f['records']} | {f['kept']} |" for f in report["files"]]
    lines += ["", "| rule | dropped | drops a record with |", "|---|---:|---|"]
    lines += [f"| {name} | {r['dropped']} | {r['what']} |" for name, r in report["rules"].items()]
    if "perplexity" in report:
        p = report["perplexity"]
        thr = f"{p['threshold']:.1f}" if p.get("threshold") is not None else "none"
        med = f"{p['median']:.1f}" if p.get("median") is not None else "n/a"
        lines += ["", f"Perplexity under {p['model']}: {p['scored']} records scored, median {med}, threshold {thr}."]
    if png is not None:
        lines += ["", f"![length and perplexity histograms]({png.name})"]
    for name, r in report["rules"].items():
        if r["examples"]:
            lines += ["", f"## {name}", ""]
            lines += [f"- `{e['where']}` ({e['why']}): {e['text'].replace('|', '/')}" for e in r["examples"]]
    return "\n".join(lines) + "\n"


def _plot(cfg: Config, records: list[Record], ppl: dict[str, Any], png: Path) -> Path | None:
    """Histograms of characters per record (kept and dropped) and of perplexity with its threshold."""
    if not records:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from hearth.runtime.fileio import staged

    scores = [s for s in ppl.get("scores", []) if s is not None and math.isfinite(s)]
    panels = 2 if scores else 1
    fig = Figure(figsize=(6, 1.0 + 2.6 * panels), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(panels, 1, 1)
    kept = [math.log10(max(1, len(r.text))) for r in records if r.dropped is None]
    gone = [math.log10(max(1, len(r.text))) for r in records if r.dropped is not None]
    ax.hist([kept, gone], bins=30, stacked=True, label=["kept", "dropped"])
    for limit in (cfg.min_chars, cfg.max_chars):
        if limit:
            ax.axvline(math.log10(limit), color="k", linestyle="--", linewidth=1)
    ax.set_xlabel("log10(characters per record)")
    ax.set_ylabel("records")
    ax.legend()
    ax.set_title("curation")
    if scores:
        ax = fig.add_subplot(panels, 1, 2)
        ax.hist([math.log10(s) for s in scores], bins=30)
        if ppl.get("threshold"):
            ax.axvline(math.log10(ppl["threshold"]), color="r", linestyle="--", label="threshold")
            ax.legend()
        ax.set_xlabel(f"log10(perplexity) under {Path(str(ppl['model'])).name}")
        ax.set_ylabel("records")
    fig.tight_layout()
    with staged(png) as tmp:
        fig.savefig(tmp, format="png")
    return png
