"""Tests of the memory planner: parameter counts, config/GGUF reading, fit logic, advice, and a
measured check that the estimate is within 15% of what a real forward allocates.

    python -m pytest tests/runtime/test_planner.py -q
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from hearth.runtime.errors import (InvalidRequestError, ModelLoadError, ModelNotFoundError,
                                   UnsupportedModelError)
from hearth.runtime.planner import (GiB, PRESETS, ModelShape, count_params, format_plan,
                                    load_shape, plan, weight_bytes)

SMOLLM2_135M_CONFIG = {  # HuggingFaceTB/SmolLM2-135M config.json, the fields that matter
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 576,
    "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
    "num_key_value_heads": 3, "head_dim": 64, "vocab_size": 49152, "tie_word_embeddings": True,
    "max_position_embeddings": 8192, "attention_bias": False, "mlp_bias": False,
}


def hf_config(s: ModelShape):
    """The transformers config of a shape, to count its parameters the library's way."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[s.arch]
    return cls(hidden_size=s.hidden, intermediate_size=s.intermediate, num_hidden_layers=s.layers,
               num_attention_heads=s.heads, num_key_value_heads=s.kv_heads, head_dim=s.head_dim,
               vocab_size=s.vocab, tie_word_embeddings=s.tied, max_position_embeddings=s.max_context)


# ---- parameter counts -----------------------------------------------------------------------


def test_smollm2_135m_param_count():
    n = count_params(PRESETS["smollm2-135m"]).total
    assert abs(n - 134.5e6) / 134.5e6 < 0.01
    assert n == 134_515_008  # tied lm_head: the embedding is counted once


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_param_count_equals_transformers(name):
    """Every preset, built on the meta device (no memory), has exactly the counted parameters."""
    from transformers import AutoModelForCausalLM

    s = PRESETS[name]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config(s))
    assert count_params(s).total == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("attention_bias,mlp_bias", [(True, False), (False, True)])
def test_param_count_with_biases(tmp_path, attention_bias, mlp_bias):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = {**SMOLLM2_135M_CONFIG, "attention_bias": attention_bias, "mlp_bias": mlp_bias}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    s = load_shape(str(tmp_path))
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**cfg))
    assert count_params(s).total == sum(p.numel() for p in model.parameters())


def test_known_param_counts():
    assert count_params(PRESETS["llama-3-8b"]).total == pytest.approx(8.03e9, rel=0.005)
    assert count_params(PRESETS["llama-3-70b"]).total == pytest.approx(70.55e9, rel=0.005)
    assert count_params(PRESETS["qwen2-7b"]).total == pytest.approx(7.62e9, rel=0.005)


def test_weight_bytes_match_published_gguf_sizes():
    # Meta-Llama-3-8B GGUF files as published: Q8_0 8.54 GB, Q4_K_M 4.92 GB (decimal GB).
    p = count_params(PRESETS["llama-3-8b"])
    assert weight_bytes(p, "q8_0") == pytest.approx(8.54e9, rel=0.03)
    assert weight_bytes(p, "q4_k_m") == pytest.approx(4.92e9, rel=0.03)
    assert weight_bytes(p, "fp16") == 2 * p.total
    # int8 keeps embeddings and lm_head in fp16, so it is larger than q8_0 on a 128k vocab
    for chain in (("fp32", "fp16", "int8", "int4"), ("fp16", "q8_0", "q4_k_m")):
        sizes = [weight_bytes(p, q) for q in chain]
        assert sizes == sorted(sizes, reverse=True)


# ---- reading models -------------------------------------------------------------------------


def test_hf_checkpoint_dir(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(SMOLLM2_135M_CONFIG))
    s = load_shape(str(tmp_path))
    assert count_params(s).total == count_params(PRESETS["smollm2-135m"]).total
    assert (s.kv_heads, s.head_dim, s.tied, s.max_context) == (3, 64, True, 8192)


def test_unsupported_and_missing(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**SMOLLM2_135M_CONFIG, "model_type": "gpt2"}))
    with pytest.raises(UnsupportedModelError, match="llama"):
        load_shape(str(tmp_path))
    with pytest.raises(ModelNotFoundError):
        load_shape(str(tmp_path / "nope"))
    junk = tmp_path / "model.gguf"  # a name is not a format
    junk.write_bytes(b"not a gguf file")
    with pytest.raises(ModelLoadError):
        load_shape(str(junk))


def _write_gguf(path, tied: bool) -> None:
    from gguf import GGUFWriter

    w = GGUFWriter(str(path), arch="llama")
    w.add_block_count(2)
    w.add_context_length(1024)
    w.add_embedding_length(64)
    w.add_feed_forward_length(160)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_token_list([f"t{i}" for i in range(100)])
    w.add_tensor("token_embd.weight", np.zeros((100, 64), dtype=np.float32))
    if not tied:
        w.add_tensor("output.weight", np.zeros((100, 64), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("tied", [True, False])
def test_gguf_metadata(tmp_path, tied):
    path = tmp_path / "tiny.bin"  # detected by its magic bytes, not its name
    _write_gguf(path, tied)
    s = load_shape(str(path))
    assert (s.arch, s.layers, s.hidden, s.intermediate) == ("llama", 2, 64, 160)
    assert (s.heads, s.kv_heads, s.head_dim, s.vocab, s.max_context) == (4, 2, 16, 100, 1024)
    assert s.tied is tied
    p = plan(str(path), "cpu", 256, 2, "q8_0", memory_gb=4)
    assert p.kv_cache_bytes == 2 * 2 * 2 * 16 * 256 * 2 * 2  # f16 KV in llama.cpp


def test_gguf_fast_reader_agrees_with_gguf_package(tmp_path):
    """The planner walks the GGUF tables itself (GGUFReader decodes every vocab string: slow)."""
    from gguf import GGUFReader

    from hearth.runtime.planner import _gguf_tensor_names

    path = tmp_path / "tiny.gguf"
    _write_gguf(path, tied=False)
    reader = GGUFReader(str(path))
    assert _gguf_tensor_names(str(path)) == {t.name for t in reader.tensors}
    assert load_shape(str(path)).vocab == len(reader.fields["tokenizer.ggml.tokens"].data)
    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ModelLoadError):
        load_shape(str(truncated))


# ---- fits / does not fit --------------------------------------------------------------------


def test_kv_formula_and_totals():
    p = plan("llama-3-8b", "a100-80g", 8192, 1, "fp16")
    assert p.kv_cache_bytes == GiB  # 2 x 32 layers x 8 kv heads x 128 x 8192 tokens x 2 bytes
    assert p.total_bytes == p.weights_bytes + p.kv_cache_bytes + p.activation_bytes + p.overhead_bytes
    assert p.headroom_bytes == p.capacity_bytes - p.total_bytes
    assert p.fits and not p.advice
    assert plan("llama-3-8b", "cpu", 8192, 1, "fp32", memory_gb=64).kv_cache_bytes == 2 * GiB


def test_fits_and_limits_are_consistent():
    p = plan("llama-3-8b", "rtx3090", 8192, 16, "fp16")
    assert not p.fits and p.headroom_bytes < 0
    assert p.max_concurrency >= 1 and p.max_context >= 1
    # the limits are exact: one more sequence or token no longer fits
    assert plan("llama-3-8b", "rtx3090", 8192, p.max_concurrency, "fp16").fits
    assert not plan("llama-3-8b", "rtx3090", 8192, p.max_concurrency + 1, "fp16").fits
    assert plan("llama-3-8b", "rtx3090", p.max_context, 16, "fp16").fits
    assert not plan("llama-3-8b", "rtx3090", p.max_context + 1, 16, "fp16").fits
    text = " | ".join(p.advice)
    assert f"--concurrency {p.max_concurrency}" in text and "--context" in text
    # same backend first: int8 (transformers) is offered, with the concurrency that fits
    n = int(text.split("--quant int8 --concurrency ")[1].split(":")[0])
    assert n > p.max_concurrency
    assert plan("llama-3-8b", "rtx3090", 8192, n, "int8").fits
    assert not plan("llama-3-8b", "rtx3090", 8192, n + 1, "int8").fits


def test_weights_alone_do_not_fit():
    p = plan("llama-3-70b", "rtx3090", 4096, 1, "fp16")
    assert not p.fits and p.max_concurrency == 0 and p.max_context == 0
    assert any("more memory" in a for a in p.advice)
    assert "DOES NOT FIT" in format_plan(p)


def test_memory_override_and_cpu_capacity():
    small = plan("smollm2-135m", "cpu", 2048, 1, "fp32", memory_gb=0.25)
    assert not small.fits and small.advice
    big = plan("smollm2-135m", "cpu", 2048, 1, "fp32", memory_gb=64)
    assert big.fits and big.capacity_bytes == 64 * GiB
    assert plan("smollm2-135m", "cpu", 2048, 1, "fp32").capacity_bytes > GiB  # psutil total RAM


def test_bad_input():
    with pytest.raises(InvalidRequestError) as e:
        plan("smollm2-135m", "tpu", 2048, 1, "fp32")
    assert e.value.param == "device"
    with pytest.raises(InvalidRequestError):
        plan("smollm2-135m", "cpu", 2048, 1, "int3")
    with pytest.raises(InvalidRequestError):
        plan("smollm2-135m", "cpu", 0, 1, "fp32")
    assert plan("smollm2-135m", "cpu", 16384, 1, "fp32", memory_gb=64).notes  # beyond trained


def test_cli(capsys, monkeypatch, tmp_path):
    from hearth.clients.cli import main

    monkeypatch.setenv("HEARTH_HOME", str(tmp_path))  # name lookups go to an empty model cache

    assert main(["plan", "smollm2-135m", "--device", "cpu", "--memory-gb", "64", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["fits"] and data["quant"] == "fp32" and data["params"] == 134_515_008
    assert main(["plan", "llama-3-70b", "--device", "rtx3090", "--quant", "int4"]) == 1
    assert "advice:" in capsys.readouterr().out
    assert main(["plan", "no-such-model"]) == 2


def test_a_near_miss_names_the_preset_and_lists_them_all(capsys, monkeypatch, tmp_path):
    from hearth.clients.cli import main

    monkeypatch.setenv("HEARTH_HOME", str(tmp_path))
    assert main(["plan", "llama-3-8"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err  # one line
    assert "did you mean llama-3-8b?" in err
    assert all(name in err for name in PRESETS)
    with pytest.raises(ModelNotFoundError, match="did you mean mistral-7b"):
        load_shape("mistral-7")


# ---- measured: the estimate against what transformers really allocates ----------------------


def _peak_allocated(fn) -> int:
    """Peak bytes held by torch's CPU allocator while fn runs, from the profiler's alloc/free
    events: exact and repeatable, unlike RSS which depends on malloc's caching."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    assert events, "the profiler recorded no allocations"
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


@pytest.mark.parametrize("hidden,inter,layers,heads,kv_heads,vocab,context,concurrency", [
    (512, 1376, 8, 8, 4, 32000, 1024, 4),  # weights dominate; the activation peak is the logits
    (512, 1376, 4, 8, 2, 4096, 2048, 2),  # small vocab: the peak is a layer (MLP + attention)
])
def test_measured_memory_within_15_percent(hidden, inter, layers, heads, kv_heads, vocab,
                                           context, concurrency):
    from transformers import LlamaForCausalLM, StaticCache

    s = ModelShape("measured", "llama", hidden, layers, heads, kv_heads, inter, vocab, False, context)
    chunk = 512
    torch.manual_seed(0)
    model = LlamaForCausalLM(hf_config(s)).eval()  # fp32 on CPU
    weights = sum(p.numel() * p.element_size() for p in model.parameters())

    # The KV cache as the engine holds it: context x concurrency, allocated by transformers itself
    # on a first decode step of every sequence, so its layout (kv heads, head dim) is the library's.
    cache = StaticCache(config=model.config, max_cache_len=context)
    with torch.inference_mode():
        model(torch.zeros(concurrency, 1, dtype=torch.long), past_key_values=cache, use_cache=True)
        kv = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))

        # One engine step of `chunk` tokens spread over the sequences, logits for every token.
        ids = torch.randint(0, vocab, (concurrency, chunk // concurrency))
        positions = torch.arange(1, chunk // concurrency + 1)
        activations = _peak_allocated(
            lambda: model(ids, past_key_values=cache, use_cache=True, cache_position=positions))

    p = plan(s, "cpu", context, concurrency, "fp32", memory_gb=64, prefill_chunk=chunk)
    measured = weights + kv + activations
    planned = p.weights_bytes + p.kv_cache_bytes + p.activation_bytes  # process overhead: bench/
    assert p.weights_bytes == pytest.approx(weights, rel=0.01)
    assert p.kv_cache_bytes == pytest.approx(kv, rel=0.01)
    # the planner may be conservative (it assumes a gathered copy of K/V) but never low
    assert 0.9 <= p.activation_bytes / activations <= 1.5, (p.activation_bytes, activations)
    assert abs(planned - measured) / measured <= 0.15, (planned, measured)


@pytest.mark.parametrize("context", [2048, 8192])  # logits-bound, then KQ-bound
def test_llamacpp_buffers_match_plan(smollm_gguf, context):
    """llama.cpp logs the KV and compute buffers it reserves: compare them with the plan."""
    import ctypes
    import re

    llama_cpp = pytest.importorskip("llama_cpp")
    from llama_cpp import _logger

    lines: list[str] = []

    @llama_cpp.llama_log_callback
    def keep(level, text, user_data):  # only the few lines we need: the full log is slow
        if b"buffer size =" in text:
            lines.append(text.decode("utf-8", "replace"))

    llama_cpp.llama_log_set(keep, ctypes.c_void_p(0))
    try:
        llm = llama_cpp.Llama(model_path=str(smollm_gguf), n_ctx=context, n_batch=512, n_ubatch=512,
                              flash_attn=False, verbose=False)
        del llm
    finally:
        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))
    log = "".join(lines)

    def mib(label: str) -> float:
        found = re.findall(rf"{label} buffer size =\s*([\d.]+) MiB", log)
        if not found:
            pytest.skip(f"this llama.cpp does not log its {label} buffer size")
        return sum(float(x) for x in found) * 2**20

    p = plan(str(smollm_gguf), "cpu", context, 1, "q8_0", memory_gb=64)  # KV and buffers: any GGUF quant
    assert p.kv_cache_bytes == pytest.approx(mib("KV"), rel=0.01)
    reserved = mib("compute") + mib("output")
    assert p.activation_bytes == pytest.approx(reserved, rel=0.15), (p.activation_bytes, reserved)
