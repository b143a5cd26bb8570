"""The tokenizer of a GGUF model, read from llama.cpp's vocab (no HF tokenizer, no torch).

    tok = LlamaCppTokenizer(model)  # a llama_model pointer (LlamaCppBackend builds it for you)
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": "Hi"}]))
    text = tok.decode(ids)

encode parses special tokens in the text, so chat-template output such as `<|im_start|>` becomes
its single special token. decode joins the raw bytes of each token's piece and decodes them once
with errors="replace": a character split over byte tokens shows up as U+FFFD, which is how the
streaming detokenizer knows to hold it back.
"""

from __future__ import annotations

import ctypes
import functools
from typing import Sequence

from .llamacpp_threads import apply_openmp_defaults

apply_openmp_defaults()  # libgomp reads how its threads wait once, as llama_cpp loads it
import llama_cpp  # noqa: E402

from ..errors import InvalidRequestError


class LlamaCppTokenizer:
    """Implements the `Tokenizer` protocol (runtime.backends.base) over a loaded model's vocab."""

    def __init__(self, model: llama_cpp.llama_model_p) -> None:
        self._model = model  # the backend owns and frees the model; it must outlive this object
        self._vocab = llama_cpp.llama_model_get_vocab(model)
        if not self._vocab:
            raise ValueError("the model has no vocabulary")
        v = self._vocab
        self.vocab_size: int = llama_cpp.llama_vocab_n_tokens(v)
        self.bos_token_id: int = llama_cpp.llama_vocab_bos(v)  # -1 when the model has none
        self.eos_token_id: int = llama_cpp.llama_vocab_eos(v)
        self.add_bos: bool = bool(llama_cpp.llama_vocab_get_add_bos(v))
        self._add_eos: bool = bool(llama_cpp.llama_vocab_get_add_eos(v))
        # Every end-of-generation id llama.cpp knows (eos, eot, <|im_end|>, <|eom_id|> ...).
        eog = {t for t in range(self.vocab_size) if llama_cpp.llama_vocab_is_eog(v, t)}
        eog |= {t for t in (self.eos_token_id, llama_cpp.llama_vocab_eot(v)) if t >= 0}
        self.eos_token_ids: frozenset[int] = frozenset(eog)
        self.bos_token: str = self._special_text(self.bos_token_id)
        self.eos_token: str = self._special_text(self.eos_token_id)
        raw = llama_cpp.llama_model_chat_template(model, None)  # GGUF tokenizer.chat_template
        self.chat_template: str | None = raw.decode("utf-8") if raw else None
        # SentencePiece vocabs prepend a space when encoding; decode drops it again (as HF does).
        self._strip_space = (llama_cpp.llama_vocab_type(v) == llama_cpp.LLAMA_VOCAB_TYPE_SPM
                             and self._meta("tokenizer.ggml.add_space_prefix") != "false")
        self._pieces: dict[int, bytes] = {}  # token id -> bytes of its piece (special ones: b"")

    # ---- the Tokenizer protocol ---------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True, parse_special: bool = True) -> list[int]:
        """Text to ids. With parse_special, control-token text becomes its token; runtime/prompt.py
        splits at control tokens itself (llama.cpp's own partitioning is quadratic in their count)."""
        try:
            data = text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise InvalidRequestError(f"the text has a lone surrogate at character {e.start}",
                                      param="prompt") from None
        cap = len(data) + 8  # never more tokens than bytes, plus BOS/EOS
        buf = (llama_cpp.llama_token * cap)()
        n = llama_cpp.llama_tokenize(self._vocab, data, len(data), buf, cap,
                                     add_special_tokens, parse_special)
        if n < 0:  # buffer too small: -n is the size needed
            cap = -n
            buf = (llama_cpp.llama_token * cap)()
            n = llama_cpp.llama_tokenize(self._vocab, data, len(data), buf, cap,
                                         add_special_tokens, parse_special)
            if n < 0:
                raise InvalidRequestError(f"could not tokenize the text ({len(data)} bytes)",
                                          param="prompt")
        return buf[:n]

    @functools.cached_property
    def special_tokens(self) -> dict[str, int]:
        """Text -> id of every control token (what parse_special=False leaves as plain text)."""
        out: dict[str, int] = {}
        control = llama_cpp.LLAMA_TOKEN_ATTR_CONTROL
        for t in range(self.vocab_size):
            if llama_cpp.llama_vocab_get_attr(self._vocab, t) & control:
                text = self._special_text(t)
                if text and text not in out:
                    out[text] = t
        return out

    def wrap_special(self, ids: list[int]) -> list[int]:
        """ids with BOS (and EOS) where llama.cpp's tokenize(add_special=True) puts them."""
        head = [self.bos_token_id] if self.add_bos and self.bos_token_id >= 0 else []
        tail = [self.eos_token_id] if self._add_eos and self.eos_token_id >= 0 else []
        return head + list(ids) + tail

    def decode(self, ids: Sequence[int]) -> str:
        data = b"".join(self.token_bytes(int(t)) for t in ids)
        if self._strip_space and data[:1] == b" ":
            data = data[1:]
        return data.decode("utf-8", errors="replace")

    def apply_chat_template(self, messages: list[dict], tools: list[dict] | None = None,
                            add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            raise InvalidRequestError("this model has no chat template (GGUF key "
                                      "tokenizer.chat_template); send a plain prompt instead",
                                      param="messages")
        from ..chat_template import render_chat_template  # jinja2 loads only for chat requests
        return render_chat_template(self.chat_template, messages, tools=tools,
                                    add_generation_prompt=add_generation_prompt,
                                    bos_token=self.bos_token, eos_token=self.eos_token)

    # ---- helpers ------------------------------------------------------------------------------
    def token_bytes(self, token: int) -> bytes:
        """Raw bytes of one token as decode joins them; b"" for control/special tokens."""
        piece = self._pieces.get(token)
        if piece is None:
            if not 0 <= token < self.vocab_size:
                raise InvalidRequestError(f"token id {token} is out of range [0, {self.vocab_size})")
            piece = self._piece(token, special=False)
            self._pieces[token] = piece
        return piece

    def _piece(self, token: int, special: bool) -> bytes:
        buf = ctypes.create_string_buffer(64)
        n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, special)
        if n < 0:  # piece longer than the buffer: -n is its length
            buf = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, special)
        return buf.raw[:n]

    def _special_text(self, token: int) -> str:
        if token < 0:
            return ""
        return self._piece(token, special=True).decode("utf-8", errors="replace")

    def _meta(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(256)
        n = llama_cpp.llama_model_meta_val_str(self._model, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", errors="replace") if n >= 0 else None
