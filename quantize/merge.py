"""Merge a (Q)LoRA adapter into its base model and save the result in full precision.

    quantize merge --base BASE --adapter LORA [--base-4bit] -o OUT

    from hearth.quantize.merge import merge_lora
    merge_lora("base_dir", "adapter_dir", "merged_dir", base_4bit=True)

An adapter is a peft LoRA directory (adapter_config.json + adapter_model.safetensors). Each adapted
linear becomes W + (alpha / r) * B @ A. A QLoRA adapter was trained against the NF4-rounded base, not the
float one, so with `base_4bit` the base is loaded in NF4 through bitsandbytes exactly as QLoRA loads it
and each quantized linear is dequantized before the adapter is added: the merged model computes what the
adapter was trained on, in full precision. The output is a plain safetensors checkpoint in the base's
dtype (no quantization_config), ready for `quantize gptq` or `quantize gguf`. Its manifest has stage
"sft", method "lora-merge" or "qlora-merge", the base as parent and the adapter's content hash.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

from hearth.runtime.checkpoint import CheckpointInfo, read_manifest, write_manifest
from hearth.runtime.errors import ModelLoadError, ModelNotFoundError

from .common import (QuantizeError, atomic_output, copy_tokenizer, parent_lineage, quantized_manifest, say,
                     source_checkpoint)

__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "AdapterInfo", "read_adapter", "check_adapter_fits",
           "merge_lora"]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."
_DTYPES = ("float32", "float16", "bfloat16")


class AdapterInfo:
    """What an adapter directory holds: its config, tensor shapes and content hash."""

    def __init__(self, path: Path, config: dict[str, Any], shapes: dict[str, tuple[int, ...]], digest: str):
        self.path = path
        self.config = config
        self.shapes = shapes
        """adapter tensor name -> shape, from the safetensors header."""
        self.content_hash = digest
        """sha256 over (name, sha256) of adapter_config.json and adapter_model.safetensors."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 << 20):
            h.update(chunk)
    return h.hexdigest()


def read_adapter(adapter: str | os.PathLike) -> AdapterInfo:
    """Read and check a peft LoRA adapter directory; anything missing or not LoRA is a clear error."""
    from safetensors import safe_open

    path = Path(adapter).expanduser()
    if not path.is_dir():
        raise ModelNotFoundError(f"no adapter directory at {path}")
    cfg_file, weights = path / ADAPTER_CONFIG, path / ADAPTER_WEIGHTS
    if not cfg_file.is_file():
        raise QuantizeError(f"{path} is not a peft adapter: it has no {ADAPTER_CONFIG}")
    if not weights.is_file():
        pickled = path / "adapter_model.bin"
        hint = " (it has adapter_model.bin: pickle weights are not loaded; re-save with safetensors)" \
            if pickled.is_file() else ""
        raise QuantizeError(f"{path} has no {ADAPTER_WEIGHTS}{hint}")
    try:
        config = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise QuantizeError(f"{cfg_file} is not valid JSON: {e}") from e
    if not isinstance(config, dict):
        raise QuantizeError(f"{cfg_file} must hold a JSON object")
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise QuantizeError(f"{cfg_file}: peft_type is {config.get('peft_type')!r}; only LORA adapters merge")
    if config.get("use_dora"):
        raise QuantizeError(f"{cfg_file}: DoRA adapters (use_dora) are not supported by this merge")
    try:
        with safe_open(str(weights), "pt") as st:
            shapes = {k: tuple(st.get_slice(k).get_shape()) for k in st.keys()}
    except Exception as e:  # safetensors raises its own error types for a corrupt header
        raise QuantizeError(f"{weights} is not a readable safetensors file: {e}") from e
    if not any(".lora_A." in k for k in shapes):
        raise QuantizeError(f"{weights} holds no lora_A/lora_B tensors")
    digest = hashlib.sha256()
    for f in (cfg_file, weights):
        digest.update(f"{f.name}\0{_sha256(f)}\n".encode())
    return AdapterInfo(path.resolve(), config, shapes, digest.hexdigest())


def _base_shapes(info: CheckpointInfo) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for f in info.weight_files:
        if f.suffix == ".safetensors":
            with safe_open(str(f), "pt") as st:
                shapes.update({k: tuple(st.get_slice(k).get_shape()) for k in st.keys()})
    return shapes


def check_adapter_fits(base: CheckpointInfo, adapter: AdapterInfo) -> int:
    """Every lora_A/lora_B pair must sit on a base weight of matching shape; returns the number of
    adapted modules. A mismatch names the module and both shapes."""
    shapes = _base_shapes(base)
    modules: dict[str, dict[str, tuple[int, ...]]] = {}
    for key, shape in adapter.shapes.items():
        for part in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B"):
            marker = f".{part}."
            if marker in key:
                module = key.split(marker)[0]
                module = module[len(_PEFT_PREFIX):] if module.startswith(_PEFT_PREFIX) else module
                modules.setdefault(module, {})[part] = shape
    r = adapter.config.get("r")
    for module, parts in sorted(modules.items()):
        target = shapes.get(f"{module}.weight")
        if target is None:
            raise QuantizeError(
                f"adapter {adapter.path} does not match base {base.path}: it adapts {module}, which the base "
                f"does not have (target_modules {adapter.config.get('target_modules')})")
        if "lora_A" in parts or "lora_B" in parts:
            a, b = parts.get("lora_A"), parts.get("lora_B")
            if a is None or b is None:
                raise QuantizeError(f"adapter {adapter.path}: {module} has only one of lora_A / lora_B")
            want = (b[0], a[1])  # B (out, r) @ A (r, in) -> (out, in)
        else:
            a, b = parts.get("lora_embedding_A"), parts.get("lora_embedding_B")
            if a is None or b is None:
                raise QuantizeError(f"adapter {adapter.path}: {module} has only one of the embedding factors")
            want = (a[1], b[0])  # A (r, vocab), B (dim, r) -> (vocab, dim)
        if len(target) != 2 or tuple(target) != want:
            raise QuantizeError(
                f"adapter {adapter.path} does not match base {base.path}: {module} is {tuple(target)} in the "
                f"base but the adapter's factors make {want}")
        if r is not None and a[0] != r:
            raise QuantizeError(f"adapter {adapter.path}: {module} has rank {a[0]} but adapter_config says r={r}")
    return len(modules)


def _dtype_name(config: dict[str, Any]) -> str:
    name = str(config.get("dtype") or config.get("torch_dtype") or "float32").replace("torch.", "")
    return name if name in _DTYPES else "float32"


def _dequantized_nf4_linears(base: Path, dtype: Any, double_quant: bool) -> dict[str, Any]:
    """Load the base in NF4 as QLoRA does and return {module name: dequantized weight} for every
    quantized linear."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf
    from transformers import AutoModelForCausalLM

    from .bnb import bnb_config

    dtype_name = str(dtype).replace("torch.", "")
    qmodel = AutoModelForCausalLM.from_pretrained(
        str(base), quantization_config=bnb_config("nf4", double_quant=double_quant, compute_dtype=dtype_name),
        dtype=dtype, local_files_only=True, use_safetensors=True)
    weights = {}
    for name, module in qmodel.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            w = module.weight
            weights[name] = bnbf.dequantize_4bit(w.data, w.quant_state).to(dtype).cpu()  # (out, in)
    del qmodel
    if not weights:
        raise QuantizeError(f"loading {base} in nf4 quantized no linear layer; nothing to dequantize")
    return weights


def merge_lora(base: str | os.PathLike, adapter: str | os.PathLike, out: str | os.PathLike, *,
               base_4bit: bool = False, double_quant: bool = True, overwrite: bool = True) -> Path:
    """Merge the LoRA adapter into the base and save a full-precision checkpoint in `out`; returns its path.

    `base_4bit`: the adapter was trained with QLoRA, so merge into the NF4-dequantized base (with
    `double_quant`, QLoRA's default, as the base was loaded for training)."""
    from tqdm import tqdm

    info = source_checkpoint(base)
    src = info.path.resolve()
    qcfg = (info.config or {}).get("quantization_config")
    if qcfg:
        raise QuantizeError(f"base {src} is already quantized ({qcfg.get('quant_method', 'unknown method')}); "
                            f"give the full-precision base (with base_4bit for a QLoRA adapter)")
    ad = read_adapter(adapter)
    n_modules = check_adapter_fits(info, ad)
    dtype_name = _dtype_name(info.config or {})
    method = "qlora-merge" if base_4bit else "lora-merge"
    parameters: dict[str, Any] = {
        "adapter": str(ad.path), "adapter_hash": ad.content_hash, "r": ad.config.get("r"),
        "lora_alpha": ad.config.get("lora_alpha"), "target_modules": ad.config.get("target_modules"),
        "adapted_modules": n_modules, "base_4bit": base_4bit, "dtype": dtype_name}
    if base_4bit:
        parameters.update(quant_type="nf4", double_quant=double_quant)
    lineage = parent_lineage(src)
    if lineage is not None:
        parameters.update(source_stage=lineage.stage, source_method=lineage.method)
    data_hashes = {"adapter": ad.content_hash}
    try:
        adapter_manifest = read_manifest(ad.path)
    except ModelLoadError:
        adapter_manifest = None
    if adapter_manifest is not None:  # the adapter's training data is this model's training data
        data_hashes.update(adapter_manifest.data_hashes)

    with atomic_output(out, overwrite=overwrite) as tmp, \
            tqdm(total=4, desc=method, unit="step", file=sys.stderr) as bar:
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        dtype = getattr(torch, dtype_name)
        bar.set_postfix_str("load base")
        model = AutoModelForCausalLM.from_pretrained(str(src), dtype=dtype, local_files_only=True,
                                                     use_safetensors=True)
        bar.update()
        if base_4bit:
            bar.set_postfix_str("nf4 round trip")
            deq = _dequantized_nf4_linears(src, dtype, double_quant)
            with torch.no_grad():
                for name, w in deq.items():
                    model.get_submodule(name).weight.copy_(w)
            del deq
        bar.update()
        bar.set_postfix_str("merge adapter")
        try:
            peft_model = PeftModel.from_pretrained(model, str(ad.path), is_trainable=False)
        except (RuntimeError, ValueError, KeyError) as e:  # shapes or module names peft could not place
            raise QuantizeError(f"adapter {ad.path} does not fit base {src}: {e}") from e
        merged = peft_model.merge_and_unload()
        bar.update()
        bar.set_postfix_str("save")
        merged.save_pretrained(str(tmp), safe_serialization=True)
        del merged, peft_model, model
        copy_tokenizer(src, tmp)
        write_manifest(tmp, quantized_manifest(src, method, parameters, data_hashes, stage="sft"))
        bar.update()
    final = Path(out).expanduser().resolve()
    say(f"wrote {final} ({method}: {n_modules} modules from {ad.path.name}, {dtype_name})")
    return final
