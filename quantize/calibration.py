"""Calibration text for GPTQ: the built-in set or a user file, turned into fixed-length token windows.

    from hearth.quantize.calibration import load_calibration
    samples, digest = load_calibration("builtin", tokenizer, num_samples=128, seq_len=512)
    samples, digest = load_calibration("my_data.jsonl", tokenizer, num_samples=32, seq_len=256)

A spec is "builtin" (quantize/data/calibration.jsonl: mixed English and Chinese prose and chat turns) or
a path to a `.jsonl` file of `{"text": ...}` / `{"messages": [{"role", "content"}, ...]}` records, or a
`.txt` file whose blank-line separated paragraphs are records. Chat records are rendered with the
model's own chat template (in the runtime's sandbox), so the quantizer sees the turn markers the model
will see when served. All records are joined into one token stream and `num_samples` windows of
`seq_len` tokens are cut at evenly spaced offsets: deterministic, and covering the whole set.
The digest is the sha256 of the file's bytes (what `sha256sum FILE` prints).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hearth.runtime.chat_template import DEFAULT_CHATML_TEMPLATE, render_chat_template
from hearth.runtime.errors import HearthError

from .common import QuantizeError

__all__ = ["BUILTIN", "BUILTIN_PATH", "CalibrationRecord", "read_records", "load_calibration"]

BUILTIN = "builtin"
BUILTIN_PATH = Path(__file__).parent / "data" / "calibration.jsonl"
_ROLES = ("system", "user", "assistant", "tool")
_MIN_SEQ_LEN = 16  # shorter windows carry too little context to estimate layer inputs


@dataclass(frozen=True)
class CalibrationRecord:
    """One record of a calibration file: plain text or a chat conversation."""

    text: str | None = None
    messages: tuple[dict[str, str], ...] | None = None
    line: int = 0
    """1-based line in the source file where the record starts."""


def _resolve(spec: str | Path) -> Path:
    if str(spec) == BUILTIN:
        return BUILTIN_PATH
    path = Path(spec).expanduser()
    if not path.is_file():
        raise QuantizeError(f"calibration file not found: {path} (give a .jsonl or .txt file, or 'builtin')")
    return path


def _parse_jsonl_line(raw: str, where: str, lineno: int) -> CalibrationRecord:
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as e:
        raise QuantizeError(f"{where}: line {lineno}: not valid JSON ({e.msg} at column {e.colno})") from e
    if not isinstance(obj, dict):
        raise QuantizeError(f"{where}: line {lineno}: a record must be a JSON object with 'text' or 'messages'")
    if "messages" in obj:
        messages = obj["messages"]
        if not isinstance(messages, list) or not messages:
            raise QuantizeError(f"{where}: line {lineno}: field 'messages' must be a non-empty list")
        for i, m in enumerate(messages):
            if not isinstance(m, dict):
                raise QuantizeError(f"{where}: line {lineno}: field 'messages[{i}]' must be an object")
            if m.get("role") not in _ROLES:
                raise QuantizeError(f"{where}: line {lineno}: field 'messages[{i}].role' must be one of "
                                    f"{', '.join(_ROLES)}; got {m.get('role')!r}")
            if not isinstance(m.get("content"), str) or not m["content"].strip():
                raise QuantizeError(f"{where}: line {lineno}: field 'messages[{i}].content' must be a "
                                    f"non-empty string")
        return CalibrationRecord(messages=tuple({"role": m["role"], "content": m["content"]} for m in messages),
                                 line=lineno)
    if "text" in obj:
        if not isinstance(obj["text"], str) or not obj["text"].strip():
            raise QuantizeError(f"{where}: line {lineno}: field 'text' must be a non-empty string")
        return CalibrationRecord(text=obj["text"], line=lineno)
    raise QuantizeError(f"{where}: line {lineno}: a record needs a 'text' or a 'messages' field; "
                        f"found {', '.join(sorted(obj)) or 'no fields'}")


def read_records(spec: str | Path) -> tuple[list[CalibrationRecord], str]:
    """Parse a calibration spec into records and the sha256 of its file; any bad line is a QuantizeError
    naming the file, the line and the field."""
    path = _resolve(spec)
    where = BUILTIN if path == BUILTIN_PATH and str(spec) == BUILTIN else str(path)
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".txt"):
        raise QuantizeError(f"calibration file {path} must be .jsonl (text or messages records) or .txt")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        lineno = data[:e.start].count(b"\n") + 1
        raise QuantizeError(f"{where}: line {lineno}: not UTF-8 text ({e.reason})") from e
    records: list[CalibrationRecord] = []
    if suffix == ".jsonl":
        for lineno, raw in enumerate(text.splitlines(), 1):
            if raw.strip():
                records.append(_parse_jsonl_line(raw, where, lineno))
    else:
        para: list[str] = []
        start = 0
        for lineno, raw in enumerate(text.splitlines() + [""], 1):
            if raw.strip():
                start = start or lineno
                para.append(raw.rstrip())
            elif para:
                records.append(CalibrationRecord(text="\n".join(para), line=start))
                para, start = [], 0
    if not records:
        raise QuantizeError(f"{where}: no calibration records (the file is empty)")
    return records, digest


def _record_ids(rec: CalibrationRecord, tokenizer: Any, template: str, where: str) -> list[int]:
    if rec.messages is None:
        ids = list(tokenizer.encode(rec.text, add_special_tokens=True))
        if tokenizer.eos_token_id is not None:
            ids.append(int(tokenizer.eos_token_id))  # documents end where the model learned they end
        return ids
    try:
        rendered = render_chat_template(template, [dict(m) for m in rec.messages], add_generation_prompt=False,
                                        bos_token=tokenizer.bos_token or "", eos_token=tokenizer.eos_token or "")
    except HearthError as e:
        raise QuantizeError(f"{where}: line {rec.line}: the model's chat template cannot render "
                            f"field 'messages': {e}") from e
    # the template writes any BOS itself
    return list(tokenizer.encode(rendered, add_special_tokens=False))


def load_calibration(spec: str | Path, tokenizer: Any, *, num_samples: int,
                     seq_len: int) -> tuple[list[dict[str, list[int]]], str]:
    """Calibration samples for gptqmodel (`{"input_ids", "attention_mask"}` dicts of equal length) and the
    sha256 of the source file.

    Every record is tokenized (chat records through the tokenizer's chat template) and the records are
    joined into one stream; `num_samples` windows of `seq_len` tokens start at evenly spaced offsets over
    it, so a small set gives overlapping windows and a large one is sampled end to end. A stream shorter
    than `seq_len` gives one sample of the whole stream."""
    if not isinstance(num_samples, int) or num_samples < 1:
        raise QuantizeError(f"num_samples must be a positive integer; got {num_samples!r}")
    if not isinstance(seq_len, int) or seq_len < _MIN_SEQ_LEN:
        raise QuantizeError(f"seq_len must be an integer >= {_MIN_SEQ_LEN}; got {seq_len!r}")
    records, digest = read_records(spec)
    where = BUILTIN if str(spec) == BUILTIN else str(Path(spec).expanduser())
    template = getattr(tokenizer, "chat_template", None) or DEFAULT_CHATML_TEMPLATE
    stream: list[int] = []
    for rec in records:
        stream.extend(_record_ids(rec, tokenizer, template, where))
    width = min(seq_len, len(stream))
    if width < _MIN_SEQ_LEN:
        raise QuantizeError(f"{where}: the calibration data is only {len(stream)} tokens; "
                            f"give at least {_MIN_SEQ_LEN}")
    last = len(stream) - width
    starts = sorted({round(i * last / (num_samples - 1)) for i in range(num_samples)} if num_samples > 1 else {0})
    samples = [{"input_ids": stream[s:s + width], "attention_mask": [1] * width} for s in starts]
    return samples, digest
