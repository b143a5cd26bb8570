"""Guided (constrained) decoding: JSON schema, JSON object, regex and Lark grammars, with llguidance.

    compiler = compiler_for(engine.tokenizer)          # one per tokenizer; builds llguidance's view of it
    guides = compiler.matchers(GuidedDecoding("json_schema", schema), n=2)   # one per choice
    apply_guidance(work, rows=[0, 3], guides=guides)   # disallowed logits of those rows -> -inf
    guides[0].consume(token)                           # after the token is accepted

The engine samples in NumPy for both backends, so masking the processed logits here covers
llama.cpp and transformers alike. Grammars compile in the caller's thread at submit time (a bad
schema is an InvalidRequestError before anything streams); the engine thread only computes masks
and consumes tokens. When the grammar is complete the mask allows only EOS, so the model ends.
llguidance is imported on first use: the unconstrained path never loads it.
"""

from __future__ import annotations

import json
import logging
import threading
import warnings
import weakref
from collections import OrderedDict
from typing import Any, Sequence

import numpy as np

from .errors import InvalidRequestError
from .schema_check import check_schema_has_values
from .types import GuidedDecoding

log = logging.getLogger("hearth.guided")

JSON_STYLES = {
    "compact": {"whitespace_flexible": False},
    "spaced": {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "},
    "pretty": {"whitespace_flexible": False, "item_separator": ",", "key_separator": ": ",
               "whitespace_pattern": r"\n[ \t]{0,20}"},
}
"""The ways of writing JSON a model learnt: compact, json.dumps' default (", " and ": "), and
line-broken (": ", and any gap between tokens may be one newline and an indent of at most 20)."""
JSON_STYLE: tuple[str, ...] = ("compact", "spaced")
"""The styles a JSON output may take: its first gap picks one, kept to the end of the document. Whitespace
stays bounded (only between tokens, and never a run: a model cannot loop on whitespace) and no space
stands where the style has none (`"a" :`, `,  `). "pretty" is left out by default: given newlines, the
default model loops inside arrays at temperature 0 (`"Python",\n "Java",\n "Python", ...`), where it
closes them compact (bench/RESULTS.md, issue 16). Add it here for a model that ends pretty JSON; a
schema may also choose its own whitespace through its "x-guidance" options."""
CACHE_SIZE = 64
"""Compiled grammars kept per tokenizer (least recently used dropped first)."""


def build_lltokenizer(tokenizer: Any):
    """llguidance's view of an engine tokenizer: the bytes of every token id, and the EOS ids.

    Slow (~0.5 s for a 49k vocabulary); `compiler_for` builds it once per tokenizer."""
    eos = sorted(tokenizer.eos_token_ids)
    vocab = getattr(tokenizer, "_vocab", None)  # LlamaCppTokenizer: llama.cpp's vocab pointer
    if vocab is not None:
        from llguidance.llamacpp import lltokenizer_from_vocab
        with warnings.catch_warnings():  # it calls a llama.cpp function deprecated by name, once per token
            warnings.simplefilter("ignore", DeprecationWarning)
            return lltokenizer_from_vocab(vocab, n_vocab=tokenizer.vocab_size, eos_token=eos)
    hf = getattr(tokenizer, "_tok", None)  # HFTokenizer: a transformers tokenizer
    if hf is not None:
        from llguidance.hf import from_tokenizer
        try:
            # llguidance counts the ids it knows bytes for; wider logits rows (padding ids) are masked
            # in apply_guidance, whatever the width
            return from_tokenizer(hf, eos_token=eos)
        except ValueError as e:
            raise InvalidRequestError(f"guided decoding is not available for this model's tokenizer: {e}",
                                      param="response_format") from e
    raise InvalidRequestError(f"guided decoding is not available for a {type(tokenizer).__name__}",
                              param="response_format")


def grammar_text(guided: GuidedDecoding) -> str:
    """The llguidance grammar (a JSON string) for a GuidedDecoding; not yet checked."""
    from llguidance import LLMatcher, regex_to_lark

    try:
        if guided.kind == "json_schema":
            check_schema_has_values(guided.spec)
            return LLMatcher.grammar_from_lark("start: " + lark_json(guided.spec))
        if guided.kind == "json_object":
            return LLMatcher.grammar_from_lark("start: " + lark_json({"type": "object"}))
        if guided.kind == "regex":
            # JSON Schema (ECMAScript) classes, as in a schema's "pattern": \d and \w are ASCII
            # (Rust's Unicode \d lets a small model wander into exotic digits)
            return LLMatcher.grammar_from_lark(f"start: /{regex_to_lark(guided.spec, 'dw')}/")
        return LLMatcher.grammar_from_lark(guided.spec)
    except ValueError as e:  # the schema is not a JSON object
        raise InvalidRequestError(f"invalid {guided.kind}: {e}", param="response_format") from e


def lark_json(schema: dict, json_format: dict | None = None) -> str:
    """A Lark expression for JSON under `schema`, in one of the JSON_STYLE styles (a bare %json in Lark
    allows free whitespace, and a small model may emit newlines forever):

        GuidedDecoding("lark", f'start: "<tool_call>" {lark_json(schema)} "</tool_call>"')

    json_format, when given, is the whole x-guidance format of a single %json (the schema's own is
    ignored): serve's tool-call grammars pass theirs. A schema with its own "x-guidance" keeps it."""
    if json_format is not None:
        return "%json " + json.dumps({**schema, "x-guidance": json_format})
    own = schema.get("x-guidance") if isinstance(schema, dict) else None
    if own:
        return "%json " + json.dumps({**schema, "x-guidance": {**JSON_STYLES["compact"], **own}})
    options = [JSON_STYLES[name] for name in JSON_STYLE]
    return "(" + " | ".join("%json " + json.dumps({**schema, "x-guidance": o}) for o in options) + ")"


class GuidedMatcher:
    """One sequence's position in its grammar. The engine thread owns it once the sequence runs."""

    __slots__ = ("matcher", "words", "eos_only")

    def __init__(self, matcher, words: int, eos_only: np.ndarray):
        self.matcher = matcher
        self.words = words
        """int32 words in one mask row: ceil(llguidance vocab / 32)."""
        self.eos_only = eos_only
        """(32 * words,) bool: the mask of a matcher that can go no further (EOS only)."""

    def consume(self, token: int) -> bool:
        """Advance past an accepted token; False puts the matcher in its (permanent) error state."""
        return self.matcher.consume_token(token)

    @property
    def error(self) -> str | None:
        """llguidance's message once the matcher has failed, else None."""
        return (self.matcher.get_error() or "error") if self.matcher.is_error() else None


class GuidedCompiler:
    """Compiles GuidedDecoding specs against one tokenizer and hands out one matcher per sequence.

    Thread-safe: requests submit from any thread. A compiled grammar is kept as a matcher in its
    initial state; each sequence gets a deep copy (microseconds), so a repeated schema costs nothing."""

    def __init__(self, tokenizer: Any, cache_size: int = CACHE_SIZE):
        self._tokenizer = tokenizer
        self._lltok = None
        self._lock = threading.Lock()
        self._cache: OrderedDict[str, Any] = OrderedDict()
        self._cache_size = cache_size
        self._words = 0
        self._eos_only: np.ndarray | None = None

    @property
    def lltokenizer(self):
        with self._lock:
            if self._lltok is None:
                lt = build_lltokenizer(self._tokenizer)
                self._words = (lt.vocab_size + 31) // 32
                eos_only = np.zeros(32 * self._words, dtype=bool)
                eos_only[list(lt.eos_tokens)] = True
                self._eos_only = eos_only
                self._lltok = lt
            return self._lltok

    def matchers(self, guided: GuidedDecoding, n: int = 1) -> list[GuidedMatcher]:
        """n fresh matchers for the grammar; InvalidRequestError(param="response_format") if it is bad."""
        template = self._compiled(guided)
        with self._lock:
            copies = [template.deep_copy() for _ in range(n)]
        return [GuidedMatcher(m, self._words, self._eos_only) for m in copies]

    def check(self, guided: GuidedDecoding) -> None:
        """Compile (and cache) the grammar only: raises InvalidRequestError if it is bad."""
        self._compiled(guided)

    def _compiled(self, guided: GuidedDecoding):
        from llguidance import LLMatcher

        # key order is kept: it is the order properties are generated in
        key = json.dumps([guided.kind, guided.spec], separators=(",", ":"))
        with self._lock:
            template = self._cache.get(key)
            if template is not None:
                self._cache.move_to_end(key)
                return template
        lltok = self.lltokenizer
        # builds the lexer outside our lock (llguidance drops the GIL; big grammars take ~100 ms)
        template = LLMatcher(lltok, grammar_text(guided), log_level=0)
        if template.is_error():
            raise InvalidRequestError(f"invalid {guided.kind}: {template.get_error().strip()}",
                                      param="response_format")
        for w in template.get_grammar_warnings():
            log.warning("%s grammar: %s", guided.kind, w)
        with self._lock:
            self._cache[key] = template
            self._cache.move_to_end(key)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return template


_compilers: "weakref.WeakKeyDictionary[Any, GuidedCompiler]" = weakref.WeakKeyDictionary()
_compilers_lock = threading.Lock()
_executor = None


def compiler_for(tokenizer: Any) -> GuidedCompiler:
    """The GuidedCompiler of an engine tokenizer (one per tokenizer object, created on first use)."""
    with _compilers_lock:
        c = _compilers.get(tokenizer)
        if c is None:
            c = _compilers[tokenizer] = GuidedCompiler(tokenizer)
        return c


def apply_guidance(work: np.ndarray, rows: Sequence[int], guides: Sequence[GuidedMatcher]) -> None:
    """Set the logits each grammar disallows to -inf, in place, for work[rows[r]] under guides[r].

    work: (B, V) float32 processed logits. Columns past llguidance's vocabulary (padding ids of a
    model whose logits are wider than its tokenizer) are disallowed. A matcher that has failed, or
    whose mask came out empty, allows only EOS, so its sequence ends at once (the engine logs why)."""
    from llguidance.numpy import fill_next_token_bitmask, fill_next_token_bitmask_par

    words = guides[0].words  # every matcher of one engine shares its tokenizer
    bitmask = np.zeros((len(rows), words), dtype=np.int32)  # (R, W)
    if len(guides) == 1:
        fill_next_token_bitmask(guides[0].matcher, bitmask, 0)
    else:
        fill_next_token_bitmask_par(_get_executor(), [(g.matcher, r) for r, g in enumerate(guides)], bitmask)
    # bit k of word j is token 32 * j + k (little-endian words)
    allowed = np.unpackbits(bitmask.view(np.uint8), axis=1, bitorder="little").view(bool)  # (R, 32 * W)
    vocab = work.shape[1]
    n = min(vocab, allowed.shape[1])
    for r, (i, g) in enumerate(zip(rows, guides)):
        ok = allowed[r]
        if g.matcher.is_error() or not bitmask[r].any():
            ok = g.eos_only
        row = work[i]
        np.copyto(row[:n], -np.inf, where=~ok[:n])
        row[n:] = -np.inf


def _get_executor():
    global _executor
    with _compilers_lock:
        if _executor is None:
            import llguidance
            _executor = llguidance.LLExecutor()
        return _executor
