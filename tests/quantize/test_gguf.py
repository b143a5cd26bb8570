"""HF → GGUF conversion and llama.cpp quantization: the GGUF loads in llama.cpp and computes what transformers
computes (logits, greedy text, token ids), carries its lineage, and a failure leaves no file behind."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest

from hearth.quantize.common import QuantizeError
from hearth.quantize.gguf import (GGUF_TYPES, MANIFEST_KEY, SUPPORTED_ARCHITECTURES, convert, quantize_gguf,
                                  read_hearth_metadata, write_metadata)
from hearth.quantize.gguf_vocab import LLAMA3_REGEX, QWEN2_REGEX
from hearth.runtime.checkpoint import content_hash, read_gguf_metadata
from hearth.runtime.errors import UnsupportedModelError
from tests.conftest import CORPUS, build_tiny_model

TEXTS = ["The quick brown fox jumps over the lazy dog.", "你好，世界！今天天气很好。", "Emoji: 🙂🔥🚀 done",
         "  I'm 12345 tokens,\n\n  don't   stop!\tok", "<|im_start|>user\nhi<|im_end|>"]


# ----------------------------------------------------------------------------- helpers


def _llama(path: Path, f32_cache: bool = False, **kw):
    import llama_cpp

    if f32_cache:  # llama.cpp's default f16 KV cache rounds K/V; f32 isolates the conversion itself
        kw.update(type_k=int(gguf.GGMLQuantizationType.F32), type_v=int(gguf.GGMLQuantizationType.F32))
    return llama_cpp.Llama(str(path), n_ctx=512, n_batch=512, logits_all=True, n_threads=2, verbose=False, **kw)


def _gguf_logits(path: Path, ids: list[int], f32_cache: bool = False) -> np.ndarray:
    llm = _llama(path, f32_cache)
    try:
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)], dtype=np.float32)  # (T, V)
    finally:
        llm.close()


def _hf(ckpt: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(ckpt)


def _hf_logits(model, ids: list[int]) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()  # (T, V)


def _hf_greedy(model, ids: list[int], n: int, eos: int) -> list[int]:
    import torch

    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=eos,
                             pad_token_id=eos, attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    return out[0, len(ids):].tolist()


def _gguf_greedy(llm, ids: list[int], n: int, eos: int) -> list[int]:
    llm.reset()
    llm.eval(ids)
    out: list[int] = []
    while len(out) < n:
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(nxt)
        if nxt == eos:
            break
        llm.eval([nxt])
    return out


def _tensors(path: Path) -> dict[str, tuple[int, tuple[int, ...], bytes]]:
    r = gguf.GGUFReader(path)
    return {t.name: (int(t.tensor_type), tuple(int(x) for x in t.shape), bytes(np.asarray(t.data).tobytes()))
            for t in r.tensors}


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if ".tmp-" in p.name)


def _tiny(tmp_path_factory, name: str, model_type: str = "llama", **cfg) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp(name), model_type=model_type, **cfg)


@pytest.fixture(scope="module")
def tiny_f16(tiny_llama, tmp_path_factory) -> Path:
    return convert(tiny_llama, tmp_path_factory.mktemp("gguf") / "tiny.f16.gguf", "f16")


# ----------------------------------------------------------------------------- tiny models


@pytest.mark.parametrize("model_type,cfg", [
    ("llama", {}),
    ("llama", {"tie_word_embeddings": True}),  # SmolLM-style: no output.weight in the GGUF
    ("llama", {"head_dim": 32, "num_attention_heads": 4, "num_key_value_heads": 1}),  # head_dim != hidden/heads
    ("qwen2", {}),
    ("mistral", {}),
])
def test_f32_gguf_computes_what_transformers_computes(tmp_path_factory, tmp_path, model_type, cfg):
    ckpt = _tiny(tmp_path_factory, f"tiny-{model_type}", model_type, **cfg)
    out = convert(ckpt, tmp_path / "m.gguf", "f32")
    model, tok = _hf(ckpt)
    ids = tok.encode(" ".join(TEXTS[:3]) * 2, add_special_tokens=False)
    ref, got = _hf_logits(model, ids), _gguf_logits(out, ids, f32_cache=True)
    # f32 weights and cache: only summation order differs; a wrong rotary permutation gives O(1) errors
    assert np.abs(ref - got).max() < 2e-3, np.abs(ref - got).max()
    names = set(_tensors(out))
    assert ("output.weight" in names) == (not cfg.get("tie_word_embeddings", False))
    assert ("blk.1.attn_q.bias" in names) == (model_type == "qwen2")
    llm = _llama(out, f32_cache=True)
    try:  # greedy decoding through llama.cpp's KV cache, token for token
        for prompt in ["The quick brown", "你好", "Tea is best"]:
            p = tok.encode(prompt, add_special_tokens=False)
            want = _hf_greedy(model, p, 16, tok.eos_token_id)
            assert _gguf_greedy(llm, p, 16, tok.eos_token_id) == want, prompt
            assert llm.detokenize(want).decode("utf-8", errors="replace") == tok.decode(want)
    finally:
        llm.close()


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_f16_gguf_logits_match(tmp_path_factory, tmp_path, model_type, tiny_llama, tiny_f16):
    ckpt = tiny_llama if model_type == "llama" else _tiny(tmp_path_factory, "tiny-qwen2-f16", "qwen2")
    out = tiny_f16 if model_type == "llama" else convert(ckpt, tmp_path / "q.gguf", "f16")
    model, tok = _hf(ckpt)
    ids = tok.encode(" ".join(TEXTS), add_special_tokens=False)
    ref, got = _hf_logits(model, ids), _gguf_logits(out, ids)
    # f16 weights, f16 KV cache and f16 activations in llama.cpp's matmuls: about 1% of the logit range
    scale = np.abs(ref).max()
    assert np.abs(ref - got).max() < 0.02 * scale, (np.abs(ref - got).max(), scale)
    assert (ref.argmax(-1) == got.argmax(-1)).all()


@pytest.mark.parametrize("rope", [
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 16},
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
])
def test_rope_scaling_is_converted(tmp_path_factory, tmp_path, rope):
    ckpt = _tiny(tmp_path_factory, f"tiny-rope-{rope['rope_type']}",
                 rope_parameters={"rope_theta": 10000.0, **rope})
    out = convert(ckpt, tmp_path / "r.gguf", "f32")
    model, tok = _hf(ckpt)
    ids = tok.encode(" ".join(CORPUS[:4]), add_special_tokens=False)[:80]
    got = _gguf_logits(out, ids, f32_cache=True)
    assert np.abs(_hf_logits(model, ids) - got).max() < 2e-3
    # the scaling matters at these positions: the same weights without it compute something else
    import torch
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32,
                                                 rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    assert np.abs(_hf_logits(plain.eval(), ids) - got).max() > 0.05


def test_tokenizer_ids_equal_hf(tiny_llama, tiny_f16):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    llm = _llama(tiny_f16, vocab_only=True)
    try:
        for text in TEXTS:
            ids = tok.encode(text, add_special_tokens=False)
            assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids, text
            assert llm.detokenize(ids, special=True).decode() == tok.decode(ids)
    finally:
        llm.close()


def _tiny_with_pre_tokenizer(root: Path, pre_tokenizer) -> Path:
    """A tiny LLaMA whose tokenizer has the given pre-tokenizer (as Qwen2 / Llama 3 / SmolLM build theirs)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    ckpt = build_tiny_model(root)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=380, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS + [" ".join(TEXTS)] * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>")
    for f in ckpt.glob("tokenizer*"):
        f.unlink()
    fast.save_pretrained(ckpt)
    return ckpt


@pytest.mark.parametrize("name,expected", [("qwen2", "qwen2"), ("llama3", "llama-bpe"), ("smollm", "smollm")])
def test_pre_tokenizer_is_recognised_and_tokenizes_alike(tmp_path, name, expected):
    from tokenizers import Regex, pre_tokenizers as pt
    from transformers import AutoTokenizer

    byte_level = pt.ByteLevel(add_prefix_space=False, use_regex=False)
    pre = {"qwen2": pt.Sequence([pt.Split(Regex(QWEN2_REGEX), behavior="isolated"), byte_level]),
           "llama3": pt.Sequence([pt.Split(Regex(LLAMA3_REGEX), behavior="isolated"), byte_level]),
           "smollm": pt.Sequence([pt.Digits(individual_digits=True),
                                  pt.ByteLevel(add_prefix_space=False, use_regex=True)])}[name]
    ckpt = _tiny_with_pre_tokenizer(tmp_path / "ckpt", pre)
    out = convert(ckpt, tmp_path / "t.gguf", "f16")
    assert read_gguf_metadata(out)["tokenizer.ggml.pre"] == expected
    tok = AutoTokenizer.from_pretrained(ckpt)
    llm = _llama(out, vocab_only=True)
    try:
        for text in TEXTS + ["x=2024 y=1 3.14159 1,000,000", "a\r\n\r\nb  \n c's 'LL 'Ve"]:
            assert llm.tokenize(text.encode(), add_bos=False, special=True) == tok.encode(
                text, add_special_tokens=False), text
    finally:
        llm.close()


def test_unknown_pre_tokenizer_is_refused(tmp_path):
    from tokenizers import pre_tokenizers as pt

    ckpt = _tiny_with_pre_tokenizer(tmp_path / "ckpt", pt.Sequence([pt.Punctuation(), pt.ByteLevel()]))
    with pytest.raises(UnsupportedModelError, match="pre-tokenizer.*no llama.cpp equivalent"):
        convert(ckpt, tmp_path / "t.gguf", "f16")
    assert not (tmp_path / "t.gguf").exists()


def test_metadata_and_lineage(tiny_llama, tiny_f16):
    from transformers import AutoTokenizer

    meta = read_gguf_metadata(tiny_f16)
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    assert meta["general.architecture"] == "llama"
    assert meta["general.name"] == tiny_llama.name
    assert meta["general.file_type"] == gguf.LlamaFileType.MOSTLY_F16
    assert meta["llama.block_count"] == 2 and meta["llama.attention.head_count_kv"] == 2
    assert meta["llama.context_length"] == 512 and meta["llama.rope.dimension_count"] == 16
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "gpt-2"
    assert meta["tokenizer.ggml.bos_token_id"] == tok.bos_token_id
    assert meta["tokenizer.ggml.eos_token_id"] == tok.eos_token_id
    assert meta["tokenizer.ggml.padding_token_id"] == tok.pad_token_id
    assert meta["tokenizer.ggml.add_bos_token"] is False  # the tiny tokenizer adds no BOS in HF either
    assert meta["tokenizer.chat_template"] == tok.chat_template
    types = gguf.GGUFReader(tiny_f16).get_field("tokenizer.ggml.token_type").contents()
    assert types[tok.convert_tokens_to_ids("<|im_end|>")] == gguf.TokenType.CONTROL
    assert types[tok.encode(" quick", add_special_tokens=False)[0]] == gguf.TokenType.NORMAL
    tensors = _tensors(tiny_f16)
    assert tensors["blk.0.attn_q.weight"][0] == gguf.GGMLQuantizationType.F16
    assert tensors["blk.0.attn_norm.weight"][0] == gguf.GGMLQuantizationType.F32

    m = read_hearth_metadata(tiny_f16)[MANIFEST_KEY]
    assert m["stage"] == "quantized" and m["method"] == "gguf-f16"
    assert m["parent"] == {"path": str(tiny_llama.resolve()), "content_hash": content_hash(tiny_llama)}
    assert m["parameters"]["type"] == "f16" and m["parameters"]["architecture"] == "LlamaForCausalLM"
    assert not (tiny_f16.parent / "hearth.json").exists()  # a GGUF is single-file: lineage lives inside


def test_unsupported_architecture_names_it_and_the_list(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    ckpt = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(ckpt)
    with pytest.raises(UnsupportedModelError) as e:
        convert(ckpt, tmp_path / "g.gguf", "f16")
    assert "GPT2LMHeadModel" in str(e.value)
    assert all(a in str(e.value) for a in SUPPORTED_ARCHITECTURES)
    assert not (tmp_path / "g.gguf").exists() and _leftovers(tmp_path) == []


def test_bad_type_is_refused(tiny_llama, tmp_path):
    with pytest.raises(QuantizeError, match="q4_k_m"):
        convert(tiny_llama, tmp_path / "x.gguf", "q3_k_s")
    assert not (tmp_path / "x.gguf").exists()


def test_failed_conversion_leaves_no_file(tiny_llama, tmp_path, monkeypatch):
    import hearth.quantize.gguf as mod

    real, calls = mod._load_tensor, []

    def dies_midway(plan, handles):
        calls.append(plan.name)
        if len(calls) == 5:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C while tensors are written
        return real(plan, handles)

    monkeypatch.setattr(mod, "_load_tensor", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        convert(tiny_llama, tmp_path / "m.gguf", "f16")
    assert not (tmp_path / "m.gguf").exists() and _leftovers(tmp_path) == []

    # an existing output survives a failed overwrite untouched
    (tmp_path / "m.gguf").write_bytes(b"old")
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        convert(tiny_llama, tmp_path / "m.gguf", "q8_0")  # dies while writing the f16 intermediate
    assert (tmp_path / "m.gguf").read_bytes() == b"old" and _leftovers(tmp_path) == []


def test_failed_quantization_leaves_no_file(tiny_llama, tmp_path, monkeypatch):
    import llama_cpp

    monkeypatch.setattr(llama_cpp, "llama_model_quantize", lambda *a: 1)
    with pytest.raises(QuantizeError, match="could not quantize"):
        convert(tiny_llama, tmp_path / "m.gguf", "q4_0")
    assert not (tmp_path / "m.gguf").exists()
    assert _leftovers(tmp_path) == []  # the f16 intermediate's temp dir is gone too


def test_existing_output_kept_without_overwrite(tiny_llama, tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"mine")
    with pytest.raises(QuantizeError, match="already exists"):
        convert(tiny_llama, tmp_path / "m.gguf", "q8_0", overwrite=False)
    assert (tmp_path / "m.gguf").read_bytes() == b"mine" and _leftovers(tmp_path) == []


@pytest.mark.parametrize("qtype", ["q8_0", "q4_0", "q4_k_m", "q5_k_m"])
def test_quantized_types_load_with_lineage(tiny_llama, tmp_path, qtype):
    out = convert(tiny_llama, tmp_path / f"m.{qtype}.gguf", qtype)
    assert _leftovers(tmp_path) == [] and sorted(p.name for p in tmp_path.iterdir()) == [out.name]
    meta = read_gguf_metadata(out)
    ftype = getattr(gguf.LlamaFileType, f"MOSTLY_{qtype.upper()}")
    assert meta["general.file_type"] == ftype
    assert meta["tokenizer.chat_template"] and meta["tokenizer.ggml.pre"] == "gpt-2"  # KV pairs survive
    m = read_hearth_metadata(out)[MANIFEST_KEY]
    assert m["method"] == f"gguf-{qtype}" and m["parameters"]["type"] == qtype
    assert m["parent"]["content_hash"] == content_hash(tiny_llama)
    model, tok = _hf(tiny_llama)
    ids = tok.encode(" ".join(TEXTS), add_special_tokens=False)
    ref, got = _hf_logits(model, ids), _gguf_logits(out, ids)
    # random weights of std 0.3 quantize badly at 4 bits; the logits must still follow the parent's
    assert np.corrcoef(ref.ravel(), got.ravel())[0, 1] > (0.98 if qtype == "q8_0" else 0.6)


def test_quantize_gguf_from_a_gguf(tiny_f16, tmp_path):
    out = quantize_gguf(tiny_f16, tmp_path / "q.gguf", "q8_0")
    m = read_hearth_metadata(out)[MANIFEST_KEY]
    assert m["parent"] == {"path": str(tiny_f16.resolve()), "content_hash": content_hash(tiny_f16)}
    assert m["parameters"] == {"type": "q8_0", "source_stage": "quantized", "source_method": "gguf-f16"}
    with pytest.raises(QuantizeError, match="already quantized"):
        quantize_gguf(out, tmp_path / "q4.gguf", "q4_0")
    with pytest.raises(QuantizeError, match="quantizes to"):
        quantize_gguf(tiny_f16, tmp_path / "f.gguf", "f16")
    assert not (tmp_path / "q4.gguf").exists()


def test_write_metadata_round_trip_keeps_tensors(tiny_llama, tiny_f16, tmp_path):
    path = tmp_path / "m.gguf"
    path.write_bytes(tiny_f16.read_bytes())
    before, meta_before = _tensors(path), read_gguf_metadata(path)
    quality = {"ppl": 12.5, "notes": ["ok", "你好"]}
    write_metadata(path, {"hearth.quality": json.dumps(quality), "hearth.flag": True, "hearth.count": 3,
                          "hearth.ratio": 0.25, "general.name": "renamed", "general.file_type": 1})
    assert _tensors(path) == before
    meta = read_gguf_metadata(path)
    assert meta["general.name"] == "renamed" and meta["general.file_type"] == 1
    assert {k: v for k, v in meta.items() if not k.startswith(("hearth.", "general.name"))} == \
        {k: v for k, v in meta_before.items() if not k.startswith(("hearth.", "general.name"))}
    h = read_hearth_metadata(path)
    assert h["hearth.quality"] == quality and h["hearth.flag"] is True and h["hearth.count"] == 3
    assert h["hearth.ratio"] == 0.25 and h[MANIFEST_KEY]["method"] == "gguf-f16"
    write_metadata(path, {"hearth.quality": json.dumps({"ppl": 13.0})})  # replace: one key, new value
    assert read_hearth_metadata(path)["hearth.quality"] == {"ppl": 13.0}
    assert _tensors(path) == before and _leftovers(tmp_path) == []
    # llama.cpp checks KV types strictly: the rewritten file still loads and computes the same logits
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(tiny_llama).encode(TEXTS[0], add_special_tokens=False)
    assert np.array_equal(_gguf_logits(path, ids), _gguf_logits(tiny_f16, ids))
    with pytest.raises(QuantizeError, match="alignment"):
        write_metadata(path, {"general.alignment": 64})
    with pytest.raises(QuantizeError, match="fit"):
        write_metadata(path, {"general.file_type": -1})


def test_gguf_types_listed():
    assert GGUF_TYPES[:5] == ("f16", "q8_0", "q4_0", "q4_k_m", "q5_k_m")
    assert SUPPORTED_ARCHITECTURES == ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


# ----------------------------------------------------------------------------- the default model


CHATS = ["What is the capital of France?", "Name three kinds of tea.", "Write one sentence about the sea."]


@pytest.fixture(scope="module")
def default_hf(smollm_gguf) -> Path:
    from hearth.runtime.registry import DEFAULT_MODEL, resolve_model

    return resolve_model(DEFAULT_MODEL, prefer="hf")  # built once from the bundled GGUF


@pytest.fixture(scope="module")
def default_f16(default_hf, tmp_path_factory) -> Path:
    return convert(default_hf, tmp_path_factory.mktemp("default-gguf") / "smollm2.f16.gguf", "f16")


@pytest.mark.slow
def test_default_model_f16_matches_transformers(default_hf, default_f16):
    model, tok = _hf(default_hf)
    llm = _llama(default_f16)
    try:
        for q in CHATS:
            ids = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                          tokenize=True, return_dict=False)
            assert llm.tokenize(tok.decode(ids).encode(), add_bos=False, special=True) == ids
            ref = _hf_logits(model, ids)
            llm.reset()
            llm.eval(ids)
            got = np.array(llm.scores[: len(ids)])
            assert np.abs(ref - got).max() < 0.01 * np.abs(ref).max(), np.abs(ref - got).max()
            want = _hf_greedy(model, ids, 24, tok.eos_token_id)
            assert _gguf_greedy(llm, ids, 24, tok.eos_token_id) == want, q
    finally:
        llm.close()


@pytest.mark.slow
def test_default_model_vocab_equals_the_bundled_gguf(default_hf, default_f16, smollm_gguf):
    from transformers import AutoTokenizer

    ours, bundled = gguf.GGUFReader(default_f16), gguf.GGUFReader(smollm_gguf)
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges"):
        assert ours.get_field(key).contents() == bundled.get_field(key).contents(), key
    a, b = read_gguf_metadata(default_f16), read_gguf_metadata(smollm_gguf)
    for key in ("general.name", "llama.context_length", "llama.rope.freq_base", "llama.attention.head_count_kv",
                "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.padding_token_id",
                "tokenizer.ggml.add_bos_token", "tokenizer.chat_template"):
        assert a[key] == b[key], key
    # the HF build restores SmolLM2's digit splitting, and the converter reads it back from tokenizer.json
    assert a["tokenizer.ggml.pre"] == b["tokenizer.ggml.pre"] == "smollm"
    tok = AutoTokenizer.from_pretrained(default_hf)
    ours_llm, bundled_llm = _llama(default_f16, vocab_only=True), _llama(smollm_gguf, vocab_only=True)
    try:
        ascii_digits = ["x=2024 y=1 3.14159 1,000,000", "def f(a, b):\n    return a**2 + b"]
        for text in TEXTS + ascii_digits + ["x² ½ ④"]:
            assert ours_llm.tokenize(text.encode(), add_bos=False, special=True) == tok.encode(
                text, add_special_tokens=False), text
        for text in TEXTS + ascii_digits:  # the two regexes differ only on non-ASCII numerals
            assert bundled_llm.tokenize(text.encode(), add_bos=False, special=True) == tok.encode(
                text, add_special_tokens=False), text
    finally:
        ours_llm.close()
        bundled_llm.close()


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.mark.slow
@pytest.mark.parametrize("qtype,min_agree,max_nll_increase", [("q8_0", 0.93, 0.05), ("q4_k_m", 0.8, 0.2)])
def test_default_model_quantized_generates_sensible_text(default_hf, default_f16, tmp_path, qtype, min_agree,
                                                         max_nll_increase):
    from transformers import AutoTokenizer

    out = quantize_gguf(default_f16, tmp_path / f"smollm2.{qtype}.gguf", qtype)
    assert out.stat().st_size < 0.6 * default_f16.stat().st_size
    assert read_hearth_metadata(out)[MANIFEST_KEY]["method"] == f"gguf-{qtype}"
    tok = AutoTokenizer.from_pretrained(default_hf)
    system = {"role": "system", "content": "You are a helpful assistant."}
    ref_llm, q_llm = _llama(default_f16), _llama(out)
    try:
        agree, nll_ref, nll_q = [], [], []
        for q in CHATS + ["What is 2 + 2?", "What colour is the sky?", "What is the capital of Germany?"]:
            ids = tok.apply_chat_template([system, {"role": "user", "content": q}], add_generation_prompt=True,
                                          tokenize=True, return_dict=False)
            answer = _gguf_greedy(ref_llm, ids, 32, tok.eos_token_id)
            seq, n = ids + answer, len(ids)
            ref = np.array(ref_llm.scores[n - 1: len(seq) - 1])  # (len(answer), V), teacher-forced
            q_llm.reset()
            q_llm.eval(seq)
            got = np.array(q_llm.scores[n - 1: len(seq) - 1])
            agree.extend(ref.argmax(-1) == got.argmax(-1))
            rows = np.arange(len(answer))
            nll_ref.extend(-_log_softmax(ref)[rows, answer])
            nll_q.extend(-_log_softmax(got)[rows, answer])
            if "Germany" in q:  # and the quantized model answers by itself
                mine = tok.decode(_gguf_greedy(q_llm, ids, 24, tok.eos_token_id))
                assert "Berlin" in mine, mine
        # top-1 agreement with the f16 model along its own answers, and their likelihood under the quantized one
        assert np.mean(agree) >= min_agree, np.mean(agree)
        assert np.mean(nll_q) - np.mean(nll_ref) < max_nll_increase, (np.mean(nll_q), np.mean(nll_ref))
    finally:
        ref_llm.close()
        q_llm.close()
