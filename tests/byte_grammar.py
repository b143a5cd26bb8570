"""A byte-level tokenizer for llguidance (one token per byte, and EOS): grammar-level tests ask
whether a grammar accepts a text, without a model and independently of any vocabulary."""

from __future__ import annotations

EOS = 256


class _Bytes:
    eos_token_id = EOS
    bos_token_id = None
    tokens = [bytes([i]) for i in range(256)] + [b"</s>"]

    def __call__(self, text: bytes) -> list[int]:
        return list(text)


_TOKENIZER = None


def byte_tokenizer():
    global _TOKENIZER
    if _TOKENIZER is None:
        from llguidance import LLTokenizer, TokenizerWrapper
        _TOKENIZER = LLTokenizer(TokenizerWrapper(_Bytes()))
    return _TOKENIZER


def accepts(grammar: str, text: str) -> bool:
    """True when the llguidance grammar (e.g. runtime.guided.grammar_text's) matches all of `text`."""
    from llguidance import LLMatcher

    m = LLMatcher(byte_tokenizer(), grammar, log_level=0)
    assert not m.is_error(), m.get_error()
    return all(m.consume_token(b) for b in text.encode()) and m.is_accepting()
