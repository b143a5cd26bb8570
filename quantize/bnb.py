"""bitsandbytes INT8 (LLM.int8()) or NF4 weights, saved as a checkpoint that loads with no flag.

    quantize bnb CKPT --int8|--nf4 [--double-quant] -o OUT

    from hearth.quantize.bnb import quantize_bnb
    quantize_bnb("ckpt_dir", "out_dir", mode="nf4", double_quant=True)

The source is loaded through transformers with a `BitsAndBytesConfig`, which quantizes every decoder
linear as it loads (lm_head and embeddings stay in float), and `save_pretrained` writes the quantized
tensors (int8 weights + scales, or packed 4-bit codes + quant state) to safetensors, with the
`quantization_config` in config.json. Loading the directory later needs no quantization option: the
config drives transformers, and hearth's transformers backend, to the same layers. bitsandbytes runs
on CPU and on CUDA.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from hearth.runtime.checkpoint import write_manifest

from .common import (QuantizeError, atomic_output, copy_tokenizer, parent_lineage, quantized_manifest, say,
                     source_checkpoint)

__all__ = ["MODES", "bnb_config", "quantize_bnb"]

MODES = ("int8", "nf4")
_DTYPES = {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16"}


def _source_dtype(config: dict[str, Any]) -> str:
    """The checkpoint's own float dtype (config "dtype", or "torch_dtype" in older configs); float32 if unset."""
    name = str(config.get("dtype") or config.get("torch_dtype") or "float32").replace("torch.", "")
    return _DTYPES.get(name, "float32")


def bnb_config(mode: str, *, double_quant: bool = False, compute_dtype: str = "float32") -> Any:
    """The transformers BitsAndBytesConfig for `mode` ("int8" or "nf4")."""
    import torch
    from transformers import BitsAndBytesConfig

    if mode not in MODES:
        raise QuantizeError(f"mode must be one of {', '.join(MODES)}; got {mode!r}")
    if mode == "int8":
        if double_quant:
            raise QuantizeError("double quantization applies to nf4 only (it quantizes the 4-bit scales)")
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                              bnb_4bit_use_double_quant=double_quant,
                              bnb_4bit_compute_dtype=getattr(torch, compute_dtype))


def quantize_bnb(ckpt: str | os.PathLike, out: str | os.PathLike, *, mode: str = "int8",
                 double_quant: bool = False, overwrite: bool = True) -> Path:
    """Quantize an HF safetensors checkpoint with bitsandbytes into `out` (a directory); returns its path."""
    from tqdm import tqdm

    if mode not in MODES:
        raise QuantizeError(f"mode must be one of {', '.join(MODES)}; got {mode!r}")
    info = source_checkpoint(ckpt)
    src = info.path.resolve()
    qcfg = (info.config or {}).get("quantization_config")
    if qcfg:
        raise QuantizeError(f"{src} is already quantized ({qcfg.get('quant_method', 'unknown method')}); "
                            f"bitsandbytes needs a full-precision checkpoint")
    dtype = _source_dtype(info.config or {})
    qconfig = bnb_config(mode, double_quant=double_quant, compute_dtype=dtype)
    parameters: dict[str, Any] = {"mode": mode, "double_quant": double_quant, "dtype": dtype,
                                  "tool": "bitsandbytes"}
    if mode == "nf4":
        parameters["compute_dtype"] = dtype
    lineage = parent_lineage(src)
    if lineage is not None:
        parameters.update(source_stage=lineage.stage, source_method=lineage.method)

    with atomic_output(out, overwrite=overwrite) as tmp, \
            tqdm(total=2, desc=f"bnb {mode}", unit="step", file=sys.stderr) as bar:
        import torch
        from transformers import AutoModelForCausalLM

        bar.set_postfix_str("load + quantize")
        try:
            model = AutoModelForCausalLM.from_pretrained(
                str(src), quantization_config=qconfig, dtype=getattr(torch, dtype), local_files_only=True,
                use_safetensors=True)
        except ImportError as e:  # transformers reports a missing or too old bitsandbytes this way
            raise QuantizeError(f"bitsandbytes quantization is unavailable: {e}") from e
        bar.update()
        bar.set_postfix_str("save")
        model.save_pretrained(str(tmp), safe_serialization=True)
        del model
        copy_tokenizer(src, tmp)
        write_manifest(tmp, quantized_manifest(src, f"bnb-{mode}", parameters))
        bar.update()
    final = Path(out).expanduser().resolve()
    say(f"wrote {final} (bitsandbytes {mode}{' + double quant' if double_quant else ''})")
    return final
