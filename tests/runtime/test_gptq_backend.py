"""GPTQ checkpoints served by the transformers backend on CPU, through gptqmodel's kernels.

A tiny random LLaMA is quantized to 4-bit GPTQ by gptqmodel inside the test (a few seconds) and saved
in the HF GPTQ layout (quantization_config in config.json, packed int32 tensors in safetensors); the
backend then loads it like any other checkpoint.

    python -m pytest tests/runtime/test_gptq_backend.py -q
"""

from __future__ import annotations

import asyncio
import json

import pytest
import torch

from hearth.runtime import Engine, GenerationRequest, ModelLoadError
from hearth.runtime.backends.base import SeqWork
from hearth.runtime.backends.transformers import TransformersBackend

from tests.conftest import CORPUS, build_tiny_model, prompt_request
from tests.runtime.test_engine_transformers import PROMPTS, greedy, hf_greedy

pytestmark = pytest.mark.slow  # importing gptqmodel and quantizing take ~20 s of a ~30 s module

GROUP_SIZE = 32  # divides both in_features of the tiny model (hidden 128, intermediate 256)
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
HELD_OUT = ["The lazy dog sleeps while the quick brown fox brews tea.",
            "hearth serves tea on hardware you own 123.",
            "我们一起去喝茶吧 🙂 more text"]


def _import_gptqmodel():
    from hearth.quantize.gptq import _ensure_cpu_workers

    _ensure_cpu_workers()  # gptqmodel on 2 cores needs >= 2 CPU workers
    gptqmodel = pytest.importorskip("gptqmodel", reason="gptqmodel is not installed: no GPTQ kernels")
    # transformers loads GPTQ checkpoints through optimum's GPTQ integration, which drives gptqmodel
    pytest.importorskip("optimum.gptq", reason="optimum is not installed: transformers cannot load GPTQ")
    return gptqmodel


@pytest.fixture(scope="module")
def parent(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("gptq-parent"), hidden_size=128, intermediate_size=256)


@pytest.fixture(scope="module")
def gptq_path(parent, tmp_path_factory):
    """4-bit GPTQ of the parent, calibrated on the test corpus."""
    gptqmodel = _import_gptqmodel()
    out = tmp_path_factory.mktemp("gptq-4bit")
    # offload_to_disk off: no spill of a 1 MB model to disk; pack_impl="original": pure torch packing,
    # where the default "cpu" JIT-compiles a C++ extension on first use (over a minute here)
    config = gptqmodel.QuantizeConfig(bits=4, group_size=GROUP_SIZE, sym=True, desc_act=False,
                                      offload_to_disk=False, pack_impl="original")
    model = gptqmodel.GPTQModel.load(str(parent), config, device="cpu")
    model.quantize(list(dict.fromkeys(CORPUS)), batch_size=1)
    model.save(str(out))
    del model
    return out


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def engine(request, gptq_path):
    eng = Engine(TransformersBackend(gptq_path, dtype=request.param, device="cpu", kv_cache_gb=0.02))
    eng.backend.model.generation_config.eos_token_id = None  # HF reference runs the full length
    yield eng
    eng.shutdown()


def _dequantize(tensors: dict[str, torch.Tensor], prefix: str) -> torch.Tensor:
    """Our own reading of one GPTQ (v1 format) linear: the float weight (out, in) it stands for."""
    qweight, qzeros = tensors[f"{prefix}.qweight"], tensors[f"{prefix}.qzeros"]
    scales, g_idx = tensors[f"{prefix}.scales"].float(), tensors[f"{prefix}.g_idx"].long()
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)  # eight 4-bit codes per int32, low bits first
    q = ((qweight.unsqueeze(1) >> shifts[None, :, None]) & 0xF).reshape(-1, qweight.shape[1])  # (in, out)
    zeros = ((qzeros.unsqueeze(2) >> shifts[None, None, :]) & 0xF).reshape(qzeros.shape[0], -1) + 1  # v1 stores z-1
    return (scales[g_idx] * (q - zeros[g_idx]).float()).T


def _round_to_nearest(w: torch.Tensor) -> torch.Tensor:
    """The same 4-bit symmetric grid as the checkpoint, without GPTQ's error compensation."""
    groups = w.reshape(w.shape[0], -1, GROUP_SIZE)
    scale = 2 * groups.abs().amax(-1, keepdim=True) / 15
    return ((torch.clamp(torch.round(groups / scale) + 8, 0, 15) - 8) * scale).reshape(w.shape)


def _with_weights(path, weight_fn):
    """The fp32 parent with every decoder linear's weight replaced by weight_fn(layer index, name, weight)."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        for li, layer in enumerate(model.model.layers):
            for name in LINEARS:
                lin = layer.get_submodule(name)
                lin.weight.copy_(weight_fn(li, name, lin.weight))
    return model


def _hf_logprobs(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)  # (T, V)


def _backend_logprobs(backend: TransformersBackend, ids: list[int], seq_id: int) -> torch.Tensor:
    assert backend.kv.allocate(seq_id, len(ids))
    logits = backend.forward([SeqWork(seq_id, ids, 0, all_logits=True)])[0]  # (T, V)
    backend.kv.free(seq_id)
    return torch.log_softmax(torch.from_numpy(logits), -1)


def _kl(p_log: torch.Tensor, q_log: torch.Tensor) -> float:
    """Mean over positions of KL(p || q) in nats."""
    return float((p_log.exp() * (p_log - q_log)).sum(-1).mean())


def test_checkpoint_has_the_hf_gptq_layout(gptq_path):
    from safetensors import safe_open

    qcfg = json.loads((gptq_path / "config.json").read_text())["quantization_config"]
    assert qcfg["quant_method"] == "gptq" and qcfg["bits"] == 4 and qcfg["group_size"] == GROUP_SIZE
    files = sorted(p.name for p in gptq_path.iterdir())
    assert any(f.endswith(".safetensors") for f in files)
    assert not any(f.endswith((".bin", ".pt", ".pth")) for f in files)
    with safe_open(str(next(gptq_path.glob("*.safetensors"))), "pt") as f:
        keys = set(f.keys())
        qweight = f.get_tensor("model.layers.0.self_attn.q_proj.qweight")
    assert qweight.dtype == torch.int32 and qweight.shape == (128 // 8, 128)  # 8 codes per int32
    for suffix in ("qzeros", "scales", "g_idx"):
        assert f"model.layers.0.mlp.down_proj.{suffix}" in keys
    assert "model.layers.0.self_attn.q_proj.weight" not in keys


def test_missing_optimum_is_a_clear_load_error(gptq_path, monkeypatch):
    import transformers.quantizers.quantizer_gptq as hf_gptq

    monkeypatch.setattr(hf_gptq, "is_optimum_available", lambda: False)
    with pytest.raises(ModelLoadError, match="optimum"):
        TransformersBackend(gptq_path, dtype="float32", device="cpu", kv_cache_gb=0.02)


def test_decoder_linears_are_gptqmodel_kernels(engine):
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear

    for layer in engine.backend.model.model.layers:
        for name in LINEARS:
            module = layer.get_submodule(name)
            assert isinstance(module, BaseQuantLinear), (name, type(module))
            assert module.bits == 4 and module.group_size == GROUP_SIZE
    assert not isinstance(engine.backend.model.lm_head, BaseQuantLinear)  # lm_head stays float


def test_greedy_equals_hf_generate_of_the_same_model(engine):
    for prompt in PROMPTS[:4]:
        ids = engine.tokenizer.encode(prompt)
        ours = engine.generate_sync(GenerationRequest(prompt_token_ids=ids, params=greedy(16)))[0]
        assert ours.token_ids == hf_greedy(engine.backend.model, ids, 16), prompt


def test_concurrent_requests_equal_alone(engine):
    alone = [engine.generate_sync(prompt_request(engine, prompt=p, params=greedy(12)))[0].token_ids for p in PROMPTS]

    async def run_all():
        async def one(p):
            toks = []
            async for out in engine.generate(prompt_request(engine, prompt=p, params=greedy(12))):
                toks.extend(out.token_ids)
            return toks
        return await asyncio.gather(*(one(p) for p in PROMPTS))

    assert asyncio.run(run_all()) == alone


def test_logits_are_the_checkpoints_weights(gptq_path, parent):
    """The kernels compute what the packed tensors say: equal to an fp32 model whose linears hold the
    weights we unpack ourselves, up to the kernel's bf16 activations (measured over seeds 0-3: KL <= 0.006,
    top-1 >= 0.88)."""
    from safetensors.torch import load_file

    tensors = load_file(str(next(gptq_path.glob("*.safetensors"))))
    reference = _with_weights(parent, lambda li, name, w: _dequantize(tensors, f"model.layers.{li}.{name}"))
    backend = TransformersBackend(gptq_path, dtype="float32", device="cpu", kv_cache_gb=0.02)
    try:
        for i, text in enumerate(HELD_OUT):
            ids = backend.tokenizer.encode(text)
            ours, ref = _backend_logprobs(backend, ids, i), _hf_logprobs(reference, ids)
            assert _kl(ref, ours) < 0.03, text
            assert (ours.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.75, text
    finally:
        backend.close()


def test_logits_stay_close_to_the_fp32_parent(gptq_path, parent, tmp_path):
    """4-bit error on a tiny random model (weights N(0, 0.3): a chaotic net, top-1 agreement only 0.2-0.4)
    is large per token, so the bounds are relative. Measured over seeds 0-3: KL to the parent 0.7-1.8 nats
    per held-out text against 7.8-9.4 for an unrelated model; on the calibration text GPTQ's KL is
    0.51-0.70x that of plain rounding to the same grid."""
    from safetensors.torch import load_file

    tensors = load_file(str(next(gptq_path.glob("*.safetensors"))))
    fp32 = _with_weights(parent, lambda li, name, w: w)
    rtn = _with_weights(parent, lambda li, name, w: _round_to_nearest(w))
    unrelated = _with_weights(build_tiny_model(tmp_path / "other", seed=100, hidden_size=128,
                                               intermediate_size=256), lambda li, name, w: w)
    for li, layer in enumerate(fp32.model.layers):  # every weight is a 4-bit rounding of its parent
        for name in LINEARS:
            w = layer.get_submodule(name).weight
            rel = (_dequantize(tensors, f"model.layers.{li}.{name}") - w).norm() / w.norm()
            assert rel < 0.2, (li, name, float(rel))  # measured <= 0.143

    backend = TransformersBackend(gptq_path, dtype="float32", device="cpu", kv_cache_gb=0.02)
    try:
        for i, text in enumerate(HELD_OUT):
            ids = backend.tokenizer.encode(text)
            p, q = _hf_logprobs(fp32, ids), _backend_logprobs(backend, ids, i)
            kl_gptq, kl_other = _kl(p, q), _kl(p, _hf_logprobs(unrelated, ids))
            assert kl_gptq < 2.5 and kl_gptq < 0.35 * kl_other, (text, kl_gptq, kl_other)
        calib = [backend.tokenizer.encode(t) for t in dict.fromkeys(CORPUS)]
        kl_gptq = sum(_kl(_hf_logprobs(fp32, ids), _backend_logprobs(backend, ids, 100)) for ids in calib)
        kl_rtn = sum(_kl(_hf_logprobs(fp32, ids), _hf_logprobs(rtn, ids)) for ids in calib)
        assert kl_gptq < 0.9 * kl_rtn, (kl_gptq, kl_rtn)  # GPTQ's error compensation did its work
    finally:
        backend.close()
