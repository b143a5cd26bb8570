"""`quantize gptq` and its calibration data: an HF GPTQ checkpoint that transformers and hearth both load.

Tiny random LLaMAs are quantized on CPU by gptqmodel (a few seconds each, after a ~10 s import); the
default model is quantized at CI size in one slow test. Option and input errors are checked without
importing gptqmodel: they must fail before any work starts.

    python -m pytest tests/quantize/test_gptq.py -q
"""

from __future__ import annotations

import hashlib
import json
import time

import pytest
import torch

from hearth.runtime import Engine, GenerationRequest, ModelNotFoundError
from hearth.runtime.backends.base import SeqWork
from hearth.runtime.backends.transformers import TransformersBackend
from hearth.runtime.checkpoint import content_hash, read_manifest

from hearth.quantize.calibration import BUILTIN, BUILTIN_PATH, load_calibration, read_records
from hearth.quantize.common import QuantizeError
from hearth.quantize.gptq import quantize_gptq
from tests.conftest import build_tiny_model
from tests.runtime.test_engine_transformers import PROMPTS, greedy, hf_greedy

GROUP = 32  # divides the tiny model's widths (128, 256)
SMALL = {"group_size": GROUP, "num_samples": 16, "seq_len": 64}
HELD_OUT = ["The lazy dog sleeps while the quick brown fox brews tea.", "hearth serves tea on hardware you own 123.",
            "我们一起去喝茶吧 🙂 more text"]
# Relative logit error |q - p| / |p| to the fp32 parent. The tiny model's weights are N(0, 0.3), a chaotic
# net where per-layer error compounds; measured over seeds 0-2 on HELD_OUT: 4-bit 0.45-0.70, 8-bit
# 0.049-0.074 (the CPU kernel computes in bf16), an unrelated model of the same shape 1.40-1.45.
BOUND = {4: 0.85, 8: 0.12}
UNRELATED = 1.4


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def parent(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("gptq-parent"), hidden_size=128, intermediate_size=256)


@pytest.fixture(scope="module")
def gptq_models(parent, tmp_path_factory):
    pytest.importorskip("gptqmodel", reason="gptqmodel is not installed")
    pytest.importorskip("optimum.gptq", reason="optimum is not installed: transformers cannot load GPTQ")
    root = tmp_path_factory.mktemp("gptq")
    return {bits: quantize_gptq(parent, root / f"int{bits}", bits=bits, **SMALL) for bits in (4, 8)}


def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()  # (T, V)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _ids(path) -> list[list[int]]:
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(path)
    return [tok.encode(t) for t in HELD_OUT]


# ----------------------------------------------------------------------------- the artifact


def test_checkpoint_has_the_hf_gptq_layout_and_lineage(gptq_models, parent):
    from safetensors import safe_open

    out = gptq_models[4]
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qcfg["quant_method"] == "gptq" and qcfg["bits"] == 4 and qcfg["group_size"] == GROUP
    assert qcfg["desc_act"] is False and qcfg["sym"] is True and qcfg.get("checkpoint_format", "gptq") == "gptq"
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        qweight = f.get_tensor("model.layers.0.self_attn.q_proj.qweight")
    assert qweight.dtype == torch.int32 and qweight.shape == (128 // 8, 128)  # eight 4-bit codes per int32
    assert "model.layers.0.self_attn.q_proj.weight" not in keys and "lm_head.weight" in keys
    assert not any(p.suffix in (".bin", ".pt") for p in out.iterdir())
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (out / name).read_bytes() == (parent / name).read_bytes(), name  # the source's own files

    m = read_manifest(out)
    assert m.stage == "quantized" and m.method == "gptq-int4"
    assert m.parent.content_hash == content_hash(parent)
    assert m.data_hashes == {"calibration": _sha256(BUILTIN_PATH)}
    assert m.parameters["calibration"] == BUILTIN and m.parameters["bits"] == 4
    assert (m.parameters["num_samples"], m.parameters["seq_len"]) == (16, 64)
    assert m.tool_versions.get("gptqmodel")


@pytest.mark.parametrize("bits", [4, 8])
def test_transformers_loads_it_with_logits_close_to_the_parent(gptq_models, parent, bits, tmp_path):
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(gptq_models[bits]).eval()  # plain call: config drives it
    assert isinstance(model.model.layers[1].mlp.down_proj, BaseQuantLinear)
    fp32 = AutoModelForCausalLM.from_pretrained(parent, dtype=torch.float32).eval()
    other = AutoModelForCausalLM.from_pretrained(
        build_tiny_model(tmp_path / "other", seed=50, hidden_size=128, intermediate_size=256), dtype=torch.float32)
    for ids in _ids(parent):
        p = _logits(fp32, ids)
        err, unrelated = _rel(_logits(model, ids), p), _rel(_logits(other, ids), p)
        assert err < BOUND[bits] and err < BOUND[bits] / UNRELATED * unrelated, (bits, err, unrelated)


def test_8_bit_is_closer_to_the_parent_than_4_bit(gptq_models, parent):
    from transformers import AutoModelForCausalLM

    fp32 = AutoModelForCausalLM.from_pretrained(parent, dtype=torch.float32).eval()
    q4, q8 = (AutoModelForCausalLM.from_pretrained(gptq_models[b]).eval() for b in (4, 8))
    for ids in _ids(parent):
        p = _logits(fp32, ids)
        assert _rel(_logits(q8, ids), p) < 0.25 * _rel(_logits(q4, ids), p)  # measured ratio <= 0.13


def test_hearth_runtime_loads_and_generates(gptq_models):
    from transformers import AutoModelForCausalLM

    out = gptq_models[4]
    engine = Engine(TransformersBackend(out, dtype="float32", device="cpu", kv_cache_gb=0.02))
    try:
        reference = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        reference.generation_config.eos_token_id = None
        backend = engine.backend
        for i, ids in enumerate(_ids(out)):
            assert backend.kv.allocate(i, len(ids))
            ours = torch.from_numpy(backend.forward([SeqWork(i, ids, 0, all_logits=True)])[0])
            backend.kv.free(i)
            assert _rel(ours, _logits(reference, ids)) < 1e-4  # measured 0.0: same kernels, same attention math
        for prompt in PROMPTS[:2]:
            ids = engine.tokenizer.encode(prompt)
            got = engine.generate_sync(GenerationRequest(prompt_token_ids=ids, params=greedy(8)))[0]
            assert got.token_ids == hf_greedy(reference, ids, 8), prompt
        messages = [{"role": "user", "content": "hello"}]
        assert "<|im_start|>user" in engine.tokenizer.apply_chat_template(messages)  # chat template came along
    finally:
        engine.shutdown()


def test_desc_act_and_a_user_calibration_file(parent, tmp_path):
    pytest.importorskip("gptqmodel", reason="gptqmodel is not installed")
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    calib = tmp_path / "calib.jsonl"
    calib.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in [
        {"text": "Tea is best brewed with water just off the boil, and the pot should be warm."},
        {"messages": [{"role": "user", "content": "How long do I steep green tea?"},
                      {"role": "assistant", "content": "Two to three minutes, in water around 80 degrees."}]},
        {"text": "你好，世界！今天天气很好。我们一起去喝茶吧。"}]) + "\n", encoding="utf-8")
    out = quantize_gptq(parent, tmp_path / "act", bits=4, group_size=GROUP, desc_act=True, calib=calib,
                        num_samples=4, seq_len=32)
    assert json.loads((out / "config.json").read_text())["quantization_config"]["desc_act"] is True
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        g_idx = f.get_tensor("model.layers.0.mlp.down_proj.g_idx")
    assert not torch.equal(g_idx, torch.arange(256) // GROUP)  # columns were reordered by activation size
    m = read_manifest(out)
    assert m.data_hashes == {"calibration": _sha256(calib)}
    assert m.parameters["calibration"] == str(calib.resolve()) and m.parameters["desc_act"] is True
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    fp32 = AutoModelForCausalLM.from_pretrained(parent, dtype=torch.float32).eval()
    for ids in _ids(parent):
        assert _rel(_logits(model, ids), _logits(fp32, ids)) < BOUND[4]


# ----------------------------------------------------------------------------- errors before any work


def test_bad_options_and_inputs_are_clear_errors(parent, tmp_path, smollm_gguf):
    out = tmp_path / "out"
    with pytest.raises(ModelNotFoundError, match="no checkpoint at"):
        quantize_gptq(tmp_path / "missing", out)
    with pytest.raises(QuantizeError, match="is a gguf checkpoint; this command needs hf-safetensors"):
        quantize_gptq(smollm_gguf, out, group_size=GROUP)
    with pytest.raises(QuantizeError, match="bits must be 4 or 8; got 3"):
        quantize_gptq(parent, out, bits=3)
    with pytest.raises(QuantizeError, match="group_size must be -1"):
        quantize_gptq(parent, out, group_size=0)
    with pytest.raises(QuantizeError, match=r"group size 96 does not divide the input width 256 of model\.layers"
                                            r".*Group sizes that fit this model: 16, 32, 64, 128"):
        quantize_gptq(parent, out, group_size=96)
    with pytest.raises(QuantizeError, match="seq_len must be an integer >= 16"):
        quantize_gptq(parent, out, group_size=GROUP, seq_len=4)
    with pytest.raises(QuantizeError, match="calibration file not found"):
        quantize_gptq(parent, out, group_size=GROUP, calib=tmp_path / "nope.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"messages": [{"role": "user", "content": 5}]}\n')
    with pytest.raises(QuantizeError, match=rf"{bad}: line 2: field 'messages\[0\]\.content' must be"):
        quantize_gptq(parent, out, group_size=GROUP, calib=bad)
    out.mkdir()
    with pytest.raises(QuantizeError, match="already exists"):
        quantize_gptq(parent, out, group_size=GROUP, overwrite=False)
    assert list(out.iterdir()) == [] and [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []


def test_an_already_quantized_input_is_refused(gptq_models, tmp_path):
    with pytest.raises(QuantizeError, match="already quantized"):
        quantize_gptq(gptq_models[4], tmp_path / "again", group_size=GROUP)


# ----------------------------------------------------------------------------- calibration data


@pytest.fixture(scope="module")
def tokenizer(parent):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(parent)


def test_builtin_set_is_mixed_english_chinese_text_and_chat():
    records, digest = read_records(BUILTIN)
    assert digest == _sha256(BUILTIN_PATH)
    assert len(records) >= 150
    chats = [r for r in records if r.messages]
    texts = [r.text for r in records if r.text]
    assert len(chats) >= 40 and len(texts) >= 100
    has_zh = lambda s: any("\u4e00" <= c <= "\u9fff" for c in s)  # noqa: E731
    assert sum(map(has_zh, texts)) >= 30 and sum(not has_zh(t) for t in texts) >= 60
    assert sum(has_zh(m["content"]) for r in chats for m in r.messages) >= 20
    assert len(set(texts)) == len(texts)


def test_windows_are_deterministic_full_length_and_cover_the_set(tokenizer):
    samples, digest = load_calibration(BUILTIN, tokenizer, num_samples=12, seq_len=128)
    again, _ = load_calibration(BUILTIN, tokenizer, num_samples=12, seq_len=128)
    assert samples == again and digest == _sha256(BUILTIN_PATH)
    assert len(samples) == 12 and all(len(s["input_ids"]) == 128 == len(s["attention_mask"]) for s in samples)
    starts = {tuple(s["input_ids"][:8]) for s in samples}
    assert len(starts) == 12  # evenly spaced, not repeats of one window
    im_start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert any(im_start in s["input_ids"] for s in samples)  # chat records went through the chat template


def test_chat_records_use_the_models_template_and_text_files_split_on_blank_lines(tokenizer, tmp_path):
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "user", "content": "hello there friend"},
                                             {"role": "assistant", "content": "hello to you too"}]}) + "\n")
    (samples,), _ = load_calibration(chat, tokenizer, num_samples=3, seq_len=512)  # shorter than seq_len: one
    text = tokenizer.decode(samples["input_ids"])
    assert text == tokenizer.apply_chat_template(
        [{"role": "user", "content": "hello there friend"}, {"role": "assistant", "content": "hello to you too"}],
        tokenize=False)

    txt = tmp_path / "notes.txt"
    txt.write_text("First paragraph,\nstill the first.\n\n\nSecond paragraph.\n")
    records, digest = read_records(txt)
    assert [(r.text, r.line) for r in records] == [("First paragraph,\nstill the first.", 1),
                                                   ("Second paragraph.", 5)]
    assert digest == _sha256(txt)


@pytest.mark.parametrize("line, message", [
    ('{"text": "ok"', r"line 2: not valid JSON"),
    ('["a list"]', r"line 2: a record must be a JSON object"),
    ('{"prompt": "x"}', r"line 2: a record needs a 'text' or a 'messages' field; found prompt"),
    ('{"text": ""}', r"line 2: field 'text' must be a non-empty string"),
    ('{"messages": []}', r"line 2: field 'messages' must be a non-empty list"),
    ('{"messages": [{"role": "robot", "content": "hi"}]}', r"line 2: field 'messages\[0\]\.role' must be one of"),
    ('{"messages": [{"role": "user", "content": "hi"}, "x"]}', r"line 2: field 'messages\[1\]' must be an object"),
])
def test_a_bad_line_names_file_line_and_field(tokenizer, tmp_path, line, message):
    f = tmp_path / "data.jsonl"
    f.write_text('{"text": "a good first record"}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(QuantizeError, match=rf"^{f}: {message}"):
        load_calibration(f, tokenizer, num_samples=2, seq_len=32)


def test_unreadable_or_too_small_calibration_files(tokenizer, tmp_path):
    latin = tmp_path / "latin.txt"
    latin.write_bytes(b"ok line\nbad \xff byte\n")
    with pytest.raises(QuantizeError, match=rf"{latin}: line 2: not UTF-8"):
        read_records(latin)
    csv = tmp_path / "data.csv"
    csv.write_text("a,b\n")
    with pytest.raises(QuantizeError, match=r"must be \.jsonl .* or \.txt"):
        read_records(csv)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(QuantizeError, match="no calibration records"):
        read_records(empty)
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("hi\n")
    with pytest.raises(QuantizeError, match="only .* tokens; give at least 16"):
        load_calibration(tiny, tokenizer, num_samples=2, seq_len=32)


# ----------------------------------------------------------------------------- the default model


@pytest.fixture(scope="module")
def default_hf(smollm_gguf):
    from hearth.runtime.registry import DEFAULT_MODEL, resolve_model

    return resolve_model(DEFAULT_MODEL, prefer="hf")  # built once from the bundled GGUF


def test_default_model_group_128_is_refused_with_the_sizes_that_fit(default_hf, tmp_path):
    # SmolLM2-135M's hidden size is 576 = 4.5 x 128
    with pytest.raises(QuantizeError, match=r"group size 128 does not divide the input width 576 .* 16, 32, 64,"):
        quantize_gptq(default_hf, tmp_path / "out", bits=4, group_size=128)


@pytest.mark.slow
def test_default_model_4bit_ci_size(default_hf, tmp_path):
    """4-bit, group 64, 8 windows of 128 tokens: ~85 s of quantizing on 2 CPU cores. The parent is itself
    dequantized from Q4_1, so a second 4-bit rounding costs more than on an original model. Measured:
    KL to the parent 0.22-0.58 nats/token, top-1 agreement 0.59-0.81, NLL +0.15-0.26 nats/token."""
    pytest.importorskip("gptqmodel", reason="gptqmodel is not installed")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.monotonic()
    out = quantize_gptq(default_hf, tmp_path / "smollm2-gptq", bits=4, group_size=64, num_samples=8, seq_len=128)
    elapsed = time.monotonic() - start
    print(f"default model GPTQ 4-bit g64, 8 x 128 tokens: {elapsed:.0f} s")
    m = read_manifest(out)
    assert m.parent.content_hash == content_hash(default_hf) and m.method == "gptq-int4"

    tok = AutoTokenizer.from_pretrained(default_hf)
    parent = AutoModelForCausalLM.from_pretrained(default_hf, dtype=torch.float32).eval()
    backend = TransformersBackend(out, dtype="float32", device="cpu", kv_cache_gb=0.05)
    try:
        texts = ["The lighthouse stood at the end of a long stone pier, and every evening its keeper climbed "
                 "the spiral stairs to light the lamp.",
                 "To make tea properly, warm the pot first, use one spoonful of leaves per cup, and let it "
                 "steep for four minutes.",
                 "机器学习模型需要大量的数据进行训练，然后才能对新的输入做出准确的预测。"]
        for i, text in enumerate(texts):
            ids = tok.encode(text)
            assert backend.kv.allocate(i, len(ids))
            q = torch.from_numpy(backend.forward([SeqWork(i, ids, 0, all_logits=True)])[0]).log_softmax(-1)
            backend.kv.free(i)
            p = _logits(parent, ids).log_softmax(-1)
            kl = float((p.exp() * (p - q)).sum(-1).mean())
            top1 = float((p.argmax(-1) == q.argmax(-1)).float().mean())
            target = torch.tensor(ids[1:])[:, None]
            nll_gap = float(-q[:-1].gather(1, target).mean() + p[:-1].gather(1, target).mean())
            assert kl < 1.0 and top1 >= 0.45 and nll_gap < 0.5, (text, kl, top1, nll_gap)
    finally:
        backend.close()
