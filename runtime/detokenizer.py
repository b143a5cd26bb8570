"""Streaming detokenization: turn generated token ids into safe text deltas, one sequence at a time.

    detok = StreamingDetokenizer(tokenizer.decode, stop=["###"])
    for tok in generated:
        delta = detok.add([tok])       # text that can be shown now ("" while held back)
        if detok.done:                 # a stop string matched; detok.stop_matched says which
            break
    else:
        delta = detok.finish()         # flush what was held back at the end

Rules:
- A character split over byte tokens decodes to U+FFFD until it is whole: it is held back.
- Text that may be the start of a stop string is held back until it is known not to be one.
  The stop string itself and everything after it are never emitted.
- Without a stop match, the concatenation of all deltas equals decode(all generated ids).

Each step decodes only a short window of ids (a prefix of already-emitted tokens for context,
plus the new ones), so the cost per token stays flat however long the output grows.
"""

from __future__ import annotations

from typing import Callable, Sequence

_REPLACEMENT = "\ufffd"
_MAX_HELD_TOKENS = 16
"""Tokens held while the text keeps ending in U+FFFD before we look for a clean split.
A UTF-8 character is at most 4 bytes; a longer run is invalid bytes from the model, not a character
still forming, and must not grow the window (and the cost) without bound."""
_SPLIT_TRIES = 8


class StreamingDetokenizer:
    """Incremental detokenizer for one generated sequence.

    `decode` must be the tokenizer's own decode (special tokens skipped), the one used for the
    final text. `prompt_ids` is accepted so the engine can pass the prompt, but decoding starts at
    the first generated token on purpose: the contract is text == decode(generated ids), and
    decoding in prompt context would change the first token's text for sentencepiece tokenizers
    (a leading space that decode(generated ids) strips) and could pull prompt bytes into the output.
    """

    def __init__(self, decode: Callable[[Sequence[int]], str], stop: Sequence[str] = (),
                 prompt_ids: Sequence[int] = ()):
        if isinstance(stop, str):
            stop = [stop]
        self._decode = decode
        self.stop: tuple[str, ...] = tuple(s for s in stop if s)
        self.prompt_len = len(prompt_ids)
        self.token_ids: list[int] = []
        """Every generated id added so far."""
        self.text = ""
        """All text emitted so far."""
        self.stop_matched: str | None = None
        self.done = False
        """True after a stop string matched or finish() was called; add() then returns ""."""
        # Window: ids[_prefix:_read] were emitted already and decode to _prefix_text; they give
        # the new ids their context (a leading space, the rest of a multi-byte character).
        self._prefix = 0
        self._read = 0
        self._prefix_text = ""
        self._held = ""  # decoded text held back because a stop string may be forming in it

    def add(self, token_ids: Sequence[int]) -> str:
        """Add newly generated ids; return the text that became safe to show ("" if none)."""
        if self.done:
            return ""
        self.token_ids.extend(int(t) for t in token_ids)
        return self._emit(self._advance(), final=False)

    def finish(self) -> str:
        """Flush the held text at the end of the sequence and reconcile with a full decode."""
        if self.done:
            return ""
        full = self._decode(self.token_ids)
        if full.startswith(self.text):
            # The full decode is the reference: it also repairs any drift in the unemitted part.
            rest = full[len(self.text):]
        else:
            # Emitted text can't be taken back: flush the window as it stands.
            rest = self._held
            if self._read < len(self.token_ids):
                window = self._decode(self.token_ids[self._prefix:])
                rest += _after(window, self._prefix_text)
        self._held = ""
        out = self._emit(rest, final=True)
        self.done = True
        return out

    def _advance(self) -> str:
        """Decode the window with the new ids; return the text it adds, or "" while a character is split."""
        ids = self.token_ids
        if self._read >= len(ids):
            return ""
        new_text = self._decode(ids[self._prefix:])
        split = len(ids)
        if new_text.endswith(_REPLACEMENT):
            if len(ids) - self._read <= _MAX_HELD_TOKENS:
                return ""  # a multi-byte character is still forming
            split, new_text = self._clean_split(new_text)
        delta = _after(new_text, self._prefix_text)
        prefix_text = self._decode(ids[self._read:split])
        if not prefix_text and split - self._prefix <= _MAX_HELD_TOKENS:
            # Only skipped special tokens: they give no context (sentencepiece would strip the next
            # token's leading space), so keep the older start of the window.
            prefix_text = self._decode(ids[self._prefix:split])
        else:
            self._prefix = self._read
        self._read, self._prefix_text = split, prefix_text
        return delta

    def _clean_split(self, window_text: str) -> tuple[int, str]:
        """Latest split point whose text does not end in U+FFFD; if none is near, all of it."""
        ids = self.token_ids
        for j in range(len(ids) - 1, max(self._read, len(ids) - 1 - _SPLIT_TRIES), -1):
            text = self._decode(ids[self._prefix:j])
            if not text.endswith(_REPLACEMENT):
                return j, text
        return len(ids), window_text

    def _emit(self, delta: str, final: bool) -> str:
        """Apply stop strings to held + delta; record and return what can be shown."""
        if not self.stop:
            self.text += delta
            return delta
        pending = self._held + delta
        match = _first_stop(pending, self.stop)
        if match is not None:
            cut, stop = match
            out = pending[:cut]
            self.stop_matched, self.done, self._held = stop, True, ""
        else:
            keep = 0 if final else partial_suffix(pending, *self.stop)
            out, self._held = pending[:len(pending) - keep], pending[len(pending) - keep:]
        self.text += out
        return out


def _after(text: str, prefix: str) -> str:
    """text past prefix; past their common part if the tokenizer rewrote the prefix in context."""
    if text.startswith(prefix):
        return text[len(prefix):]
    n = 0
    for a, b in zip(text, prefix):
        if a != b:
            break
        n += 1
    # The part of the prefix already shown can't change; show only what lies beyond its length.
    return text[max(n, len(prefix)):]


def _first_stop(text: str, stops: tuple[str, ...]) -> tuple[int, str] | None:
    """(position, stop) of the earliest stop string in text, the first listed on a tie."""
    best: tuple[int, str] | None = None
    for s in stops:
        i = text.find(s)
        if i >= 0 and (best is None or i < best[0]):
            best = (i, s)
    return best


def partial_suffix(text: str, *markers: str) -> int:
    """Length of the longest end of `text` that could still grow into one of `markers` (a stop string
    forming here; a tool-call marker in serve's parsers)."""
    longest = 0
    for m in markers:
        for n in range(min(len(m) - 1, len(text)), longest, -1):
            if text.endswith(m[:n]):
                longest = n
                break
    return longest
