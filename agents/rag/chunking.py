"""Token-aware chunking with overlap; every chunk keeps its character span [start, end) in the source text.

    spans = token_spans_for(embedder)            # the embedder's own tokenizer when it has one
    chunks = chunk_text(text, spans, chunk_tokens=200, overlap_tokens=40)
    assert all(text[c.start:c.end] == c.text for c in chunks)

Tokens are counted with the embedding model's tokenizer (so a chunk never overflows the model's window)
through its character offsets; without one, a fallback counts each CJK character as one token and any
other run of word characters (at most 12) or punctuation mark as one. Chinese and Japanese text has no
spaces, so the fallback must never treat a whole sentence as a single "word".
A chunk prefers to end at a paragraph, line or sentence end found in the last 40% of its window, and its
overlap with the next chunk starts at a sentence boundary where one exists.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from typing import Any, Callable

from ..types import AgentInputError

Spans = list[tuple[int, int]]
SpanFn = Callable[[str], Spans]

_CJK = ("\u2e80-\u2fdf\u3000-\u303f\u3040-\u30ff\u3100-\u312f\u3130-\u318f\u31f0-\u31ff\u3400-\u4dbf"
        "\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff\uff00-\uffef\U00020000-\U0002fa1f")
# one CJK character | a run of (non-CJK) word characters, at most 12 | one other non-space character
_FALLBACK = re.compile(rf"[{_CJK}]|(?:(?![{_CJK}])\w){{1,12}}|[^\w\s]")
_SENTENCE_END = tuple(".!?;:。！？；…")
# segments tokenized at once: long files are cut at line ends so offsets lists stay small
_SEGMENT_CHARS = 50_000


@dataclass(frozen=True)
class Chunk:
    start: int
    end: int
    text: str
    tokens: int


def fallback_spans(text: str) -> Spans:
    """Token spans without a tokenizer (see the module docstring)."""
    return [m.span() for m in _FALLBACK.finditer(text)]


class _TokenizerSpans:
    """Character spans of a Hugging Face fast tokenizer's tokens, from a private copy of its Rust
    tokenizer: the shared one is also used by the embedder, whose truncation settings we must not touch."""

    def __init__(self, backend: Any):
        from tokenizers import Tokenizer

        self._tok = Tokenizer.from_str(backend.to_str())
        self._tok.no_truncation()
        self._tok.no_padding()
        self._lock = threading.Lock()

    def __call__(self, text: str) -> Spans:
        out: Spans = []
        for seg_start, seg in _segments(text):
            with self._lock:
                enc = self._tok.encode(seg, add_special_tokens=False)
            out.extend((seg_start + s, seg_start + e) for s, e in enc.offsets if e > s)
        # subword pieces of one word may repeat the word's offsets (some pre-tokenizers): keep order, drop dups
        dedup: Spans = []
        for sp in out:
            if not dedup or sp != dedup[-1]:
                dedup.append(sp)
        return dedup


def _segments(text: str):
    """(offset, piece) cuts of a long text at line ends (else spaces, else anywhere)."""
    i, n = 0, len(text)
    while i < n:
        j = min(n, i + _SEGMENT_CHARS)
        if j < n:
            cut = text.rfind("\n", i, j)
            if cut <= i:
                cut = text.rfind(" ", i, j)
            j = cut + 1 if cut > i else j
        yield i, text[i:j]
        i = j


def token_spans_for(embedder: Any) -> SpanFn:
    """The span function for an embedder: its fast tokenizer's offsets when it has one, else the fallback."""
    tok = getattr(embedder, "tokenizer", None) if embedder is not None else None
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        return _TokenizerSpans(backend)
    return fallback_spans


def check_chunk_params(chunk_tokens: int, overlap_tokens: int, max_tokens: int | None = None) -> None:
    for name, v in (("chunk_tokens", chunk_tokens), ("overlap_tokens", overlap_tokens)):
        if not isinstance(v, int) or isinstance(v, bool):
            raise AgentInputError(f"{name} must be an integer, got {v!r}", name)
    if chunk_tokens < 8:
        raise AgentInputError(f"chunk_tokens must be at least 8, got {chunk_tokens}", "chunk_tokens")
    if not 0 <= overlap_tokens < chunk_tokens // 2 + 1:
        raise AgentInputError(f"overlap_tokens must be between 0 and half of chunk_tokens ({chunk_tokens // 2}),"
                              f" got {overlap_tokens}", "overlap_tokens")
    # the model's window holds two special tokens ([CLS] ... [SEP]) besides the chunk
    if max_tokens is not None and chunk_tokens > max_tokens - 2:
        raise AgentInputError(f"chunk_tokens {chunk_tokens} is more than the embedding model reads "
                              f"({max_tokens - 2} tokens); the rest of each chunk would be ignored", "chunk_tokens")


def _boundary_score(text: str, spans: Spans, k: int) -> int:
    """How good a cut before token k is: 3 paragraph end, 2 line end, 1 sentence end, 0 none."""
    gap = text[spans[k - 1][1]:spans[k][0]]
    if "\n\n" in gap or "\n\r\n" in gap:
        return 3
    if "\n" in gap:
        return 2
    prev = text[spans[k - 1][0]:spans[k - 1][1]]
    return 1 if prev.endswith(_SENTENCE_END) else 0


def chunk_text(text: str, spans_fn: SpanFn, chunk_tokens: int = 200, overlap_tokens: int = 40) -> list[Chunk]:
    """Cut `text` into chunks of at most `chunk_tokens` tokens, consecutive chunks sharing about
    `overlap_tokens`. Each chunk's text is exactly text[start:end]."""
    spans = spans_fn(text)
    n = len(spans)
    chunks: list[Chunk] = []
    i = 0
    while i < n:
        j = min(n, i + chunk_tokens)
        k = j
        if j < n:  # look back for a natural end in the last 40% of the window
            best, best_score = j, 0
            for cand in range(j, i + max(1, int(chunk_tokens * 0.6)), -1):
                s = _boundary_score(text, spans, cand)
                if s > best_score:
                    best, best_score = cand, s
                    if s == 3:
                        break
            k = best
        start, end = spans[i][0], spans[k - 1][1]
        chunks.append(Chunk(start, end, text[start:end], k - i))
        if k >= n:
            break
        nxt = max(i + 1, k - overlap_tokens)
        # start the overlap at a sentence or line start when one lies inside it
        for cand in range(nxt, k):
            if cand > i and _boundary_score(text, spans, cand) > 0:
                nxt = cand
                break
        i = nxt if overlap_tokens else k
    return chunks
