"""`quantize bnb`: a saved bitsandbytes checkpoint (int8 / nf4) that reloads bit-exact and runs in hearth.

A tiny random LLaMA is quantized on CPU, saved, reloaded with no quantization option, and compared with
the model quantized in memory, with its float parent, and with hearth's transformers backend.

    python -m pytest tests/quantize/test_bnb.py -q
"""

from __future__ import annotations

import json

import pytest
import torch

from hearth.runtime import Engine, GenerationRequest, ModelNotFoundError
from hearth.runtime.backends.base import SeqWork
from hearth.runtime.backends.transformers import TransformersBackend
from hearth.runtime.checkpoint import content_hash, read_manifest

from hearth.quantize.bnb import bnb_config, quantize_bnb
from hearth.quantize.common import QuantizeError
from tests.conftest import build_tiny_model
from tests.runtime.test_engine_transformers import PROMPTS, greedy, hf_greedy

pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")

TEXTS = ["The quick brown fox jumps over the lazy dog.", "hearth serves tea on hardware you own 123.",
         "你好，世界！今天天气很好。"]
# mode -> (kwargs, bound on the relative logit error |q - p| / |p| to the fp32 parent). The tiny model's
# weights are N(0, 0.3), a chaotic net where errors grow layer to layer. Measured over seeds 0-2 and
# these texts: int8 0.045-0.105, nf4 0.43-0.61 (double quant within 0.005 of it), unrelated model ~1.4.
MODES = {"int8": ({"mode": "int8"}, 0.15),
         "nf4": ({"mode": "nf4"}, 0.75),
         "nf4-dq": ({"mode": "nf4", "double_quant": True}, 0.75)}
UNRELATED = 1.4


@pytest.fixture(scope="module")
def parent(tmp_path_factory):
    # hidden 128: bnb's 4-bit blocks (64) and int8 rows divide every linear
    return build_tiny_model(tmp_path_factory.mktemp("bnb-parent"), hidden_size=128, intermediate_size=256)


@pytest.fixture(scope="module", params=list(MODES))
def quantized(request, parent, tmp_path_factory):
    kwargs, bound = MODES[request.param]
    out = quantize_bnb(parent, tmp_path_factory.mktemp("bnb") / request.param, **kwargs)
    return request.param, kwargs, bound, out


def _ids(path) -> list[list[int]]:
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(path)
    return [tok.encode(t) for t in TEXTS]


def _logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()  # (T, V)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_saved_checkpoint_holds_quantized_weights(quantized, parent):
    from safetensors import safe_open

    name, kwargs, _, out = quantized
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qcfg["quant_method"] == "bitsandbytes"
    assert qcfg["load_in_8bit"] == (kwargs["mode"] == "int8") and qcfg["load_in_4bit"] == (kwargs["mode"] == "nf4")
    if kwargs["mode"] == "nf4":
        assert qcfg["bnb_4bit_quant_type"] == "nf4"
        assert qcfg["bnb_4bit_use_double_quant"] == kwargs.get("double_quant", False)
    files = [p.name for p in out.iterdir()]
    assert not any(f.endswith((".bin", ".pt")) for f in files)
    assert {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja"} <= set(files)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        w = f.get_tensor("model.layers.0.self_attn.q_proj.weight")
        keys = set(f.keys())
    if kwargs["mode"] == "int8":
        assert w.dtype == torch.int8 and w.shape == (128, 128)
        assert "model.layers.0.self_attn.q_proj.SCB" in keys  # the per-row scales
    else:
        assert w.dtype == torch.uint8 and w.numel() == 128 * 128 // 2  # two 4-bit codes per byte
        assert any(k.startswith("model.layers.0.self_attn.q_proj.weight.quant_state") for k in keys)
    assert (out / "model.safetensors").stat().st_size < 0.75 * (parent / "model.safetensors").stat().st_size


def test_manifest_pins_the_parent(quantized, parent):
    name, kwargs, _, out = quantized
    m = read_manifest(out)
    assert m.stage == "quantized" and m.method == f"bnb-{kwargs['mode']}"
    assert m.parent.content_hash == content_hash(parent)
    assert m.parameters["double_quant"] == kwargs.get("double_quant", False)
    assert m.tool_versions.get("bitsandbytes")


def test_reloaded_equals_in_memory_and_stays_close_to_parent(quantized, parent, tmp_path):
    from transformers import AutoModelForCausalLM

    name, kwargs, bound, out = quantized
    in_memory = AutoModelForCausalLM.from_pretrained(
        parent, quantization_config=bnb_config(kwargs["mode"], double_quant=kwargs.get("double_quant", False)),
        dtype=torch.float32).eval()
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()  # no quantization option: config drives it
    fp32 = AutoModelForCausalLM.from_pretrained(parent, dtype=torch.float32).eval()
    other = AutoModelForCausalLM.from_pretrained(build_tiny_model(tmp_path / "other", seed=7, hidden_size=128,
                                                                  intermediate_size=256), dtype=torch.float32)
    for ids in _ids(parent):
        q = _logits(reloaded, ids)
        assert torch.equal(q, _logits(in_memory, ids))
        p = _logits(fp32, ids)
        err, unrelated = _rel(q, p), _rel(_logits(other, ids), p)
        assert err < bound and err < bound / UNRELATED * unrelated, (name, err, unrelated)


def test_int8_is_closer_to_the_parent_than_nf4(parent, tmp_path):
    from transformers import AutoModelForCausalLM

    int8 = quantize_bnb(parent, tmp_path / "int8", mode="int8")
    nf4 = quantize_bnb(parent, tmp_path / "nf4", mode="nf4")
    fp32 = AutoModelForCausalLM.from_pretrained(parent, dtype=torch.float32).eval()
    q8, q4 = AutoModelForCausalLM.from_pretrained(int8).eval(), AutoModelForCausalLM.from_pretrained(nf4).eval()
    for ids in _ids(parent):
        p = _logits(fp32, ids)
        assert _rel(_logits(q8, ids), p) < 0.3 * _rel(_logits(q4, ids), p)  # measured ratio <= 0.2


def test_hearth_runtime_loads_it_without_a_flag(quantized):
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM

    name, kwargs, _, out = quantized
    engine = Engine(TransformersBackend(out, dtype="float32", device="cpu", kv_cache_gb=0.02))
    try:
        backend = engine.backend
        layer = backend.model.model.layers[0].self_attn.q_proj
        assert isinstance(layer, bnb.nn.Linear8bitLt if kwargs["mode"] == "int8" else bnb.nn.Linear4bit)
        reference = AutoModelForCausalLM.from_pretrained(out).eval()
        reference.generation_config.eos_token_id = None
        for i, ids in enumerate(_ids(out)):
            assert backend.kv.allocate(i, len(ids))
            ours = torch.from_numpy(backend.forward([SeqWork(i, ids, 0, all_logits=True)])[0])
            backend.kv.free(i)
            ref = _logits(reference, ids)
            assert _rel(ours, ref) < 1e-3, name
        for prompt in PROMPTS[:3]:
            ids = engine.tokenizer.encode(prompt)
            got = engine.generate_sync(GenerationRequest(prompt_token_ids=ids, params=greedy(12)))[0]
            assert len(got.token_ids) == 12
            assert got.token_ids == hf_greedy(reference, ids, 12), (name, prompt)
    finally:
        engine.shutdown()


def test_bad_inputs_are_clear_errors(parent, tmp_path, smollm_gguf):
    with pytest.raises(QuantizeError, match="mode must be one of int8, nf4"):
        quantize_bnb(parent, tmp_path / "x", mode="int4")
    with pytest.raises(QuantizeError, match="nf4 only"):
        quantize_bnb(parent, tmp_path / "x", mode="int8", double_quant=True)
    with pytest.raises(ModelNotFoundError, match="no checkpoint"):
        quantize_bnb(tmp_path / "missing", tmp_path / "x", mode="int8")
    with pytest.raises(QuantizeError, match="gguf checkpoint"):
        quantize_bnb(smollm_gguf, tmp_path / "x", mode="int8")
    assert not (tmp_path / "x").exists()


def test_an_already_quantized_input_is_refused(quantized, tmp_path):
    name, _, _, out = quantized
    with pytest.raises(QuantizeError, match="already quantized"):
        quantize_bnb(out, tmp_path / "again", mode="nf4")
