"""GPTQ (4- or 8-bit weights, per-group scales) through gptqmodel, on CPU or CUDA.

    quantize gptq CKPT --bits 4 --group-size 128 [--desc-act] [--calib FILE|builtin] -o OUT

    from hearth.quantize.gptq import quantize_gptq
    quantize_gptq("ckpt_dir", "out_dir", bits=4, group_size=64, num_samples=16, seq_len=256)

The output is the standard Hugging Face GPTQ layout: packed int32 `qweight`/`qzeros`, fp16 `scales` and
`g_idx` in safetensors, `quantization_config` in config.json (quant_method "gptq", checkpoint_format
"gptq"), so transformers (+ optimum + gptqmodel), vLLM and TGI load it as is, and so does
hearth's transformers backend. Symmetric quantization, lm_head and embeddings stay in float.
Calibration defaults to the built-in mixed English/Chinese set (see calibration.py); its sha256 goes
into the manifest's data_hashes. A group size must divide every quantized layer's input width: vLLM's
and TGI's kernels reject partial groups, so a size that does not divide is refused up front.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from hearth.runtime.checkpoint import CheckpointInfo, write_manifest

from .calibration import BUILTIN, load_calibration
from .common import (QuantizeError, atomic_output, copy_tokenizer, parent_lineage, quantized_manifest, say,
                     source_checkpoint)

__all__ = ["BITS", "quantize_gptq", "check_group_size", "quantized_in_features"]

BITS = (4, 8)
# decoder-layer tensors that are not quantized linears (norms are 1-D and skipped anyway)
_NOT_LINEAR = ("embed", "norm", "rotary", "lm_head")


def _ensure_cpu_workers() -> None:
    # gptqmodel 7.6 nests a fixed 2-worker loader pool under its CPU pool; with fewer than 2 CPU
    # workers (its default on a 2-core machine) quantizing fails. Read when the pool is first built.
    try:
        workers = int(os.environ.get("GPTQMODEL_CPU_WORKERS", "0"))
    except ValueError:
        workers = 0
    if workers < 2:
        os.environ["GPTQMODEL_CPU_WORKERS"] = "2"


def _import_gptqmodel() -> Any:
    _ensure_cpu_workers()
    try:
        import gptqmodel
    except ImportError as e:
        raise QuantizeError(f"GPTQ needs the gptqmodel package (pip install gptqmodel): {e}") from e
    return gptqmodel


def quantized_in_features(info: CheckpointInfo) -> dict[str, int]:
    """Input width of every 2-D weight inside the decoder layers (the linears GPTQ quantizes), read
    from the safetensors headers without loading any tensor."""
    from safetensors import safe_open

    widths: dict[str, int] = {}
    for f in info.weight_files:
        if f.suffix != ".safetensors":
            continue
        with safe_open(str(f), "pt") as st:
            for name in st.keys():
                if ".layers." not in name or not name.endswith(".weight") or any(s in name for s in _NOT_LINEAR):
                    continue
                shape = st.get_slice(name).get_shape()
                if len(shape) == 2:
                    widths[name[:-len(".weight")]] = int(shape[1])
    return widths


def check_group_size(info: CheckpointInfo, group_size: int) -> None:
    """Refuse a group size that does not divide a quantized layer's input width, naming the layer and
    the sizes that would work."""
    if group_size == -1:
        return
    widths = quantized_in_features(info)
    if not widths:
        raise QuantizeError(f"{info.path} has no decoder-layer linear weights to quantize")
    bad = {name: w for name, w in widths.items() if w % group_size}
    if bad:
        name, width = next(iter(bad.items()))
        common = set.intersection(*({g for g in (16, 32, 64, 128, 256) if w % g == 0} for w in widths.values()))
        fits = ", ".join(str(g) for g in sorted(common)) or "none of 16-256"
        raise QuantizeError(
            f"group size {group_size} does not divide the input width {width} of {name} "
            f"({len(bad)} layers affected); vLLM and TGI kernels need whole groups. "
            f"Group sizes that fit this model: {fits}, or -1 (one group per row)")


def _check_options(bits: int, group_size: int, num_samples: int, seq_len: int) -> None:
    if bits not in BITS:
        raise QuantizeError(f"bits must be 4 or 8; got {bits!r}")
    if not isinstance(group_size, int) or not (group_size == -1 or group_size >= 8):
        raise QuantizeError(f"group_size must be -1 (one group per row) or an integer >= 8; got {group_size!r}")
    if not isinstance(num_samples, int) or num_samples < 1:
        raise QuantizeError(f"num_samples must be a positive integer; got {num_samples!r}")
    if not isinstance(seq_len, int) or seq_len < 16:
        raise QuantizeError(f"seq_len must be an integer >= 16; got {seq_len!r}")


def _resolve_device(device: str | None) -> str:
    import torch

    if device is None:
        return "cuda:0" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        device = "cuda:0"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise QuantizeError(f"device {device!r} asked for, but no CUDA device is available")
        return device
    if device != "cpu":
        raise QuantizeError(f"device must be 'cpu', 'cuda' or 'cuda:N'; got {device!r}")
    return device


def quantize_gptq(ckpt: str | os.PathLike, out: str | os.PathLike, *, bits: int = 4, group_size: int = 128,
                  desc_act: bool = False, calib: str | os.PathLike = BUILTIN, num_samples: int = 128,
                  seq_len: int = 512, device: str | None = None, overwrite: bool = True) -> Path:
    """Quantize an HF safetensors checkpoint with GPTQ into `out` (a directory); returns its path.

    `num_samples` windows of `seq_len` tokens of calibration text are run through the model; fewer and
    shorter make a quicker, slightly less accurate run. `device` None picks CUDA when there is one."""
    from tqdm import tqdm

    _check_options(bits, group_size, num_samples, seq_len)
    info = source_checkpoint(ckpt)
    src = info.path.resolve()
    qcfg = (info.config or {}).get("quantization_config")
    if qcfg:
        raise QuantizeError(f"{src} is already quantized ({qcfg.get('quant_method', 'unknown method')}); "
                            f"GPTQ needs a full-precision checkpoint")
    check_group_size(info, group_size)
    dev = _resolve_device(device)

    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(str(src), local_files_only=True)
    samples, calib_hash = load_calibration(calib, tokenizer, num_samples=num_samples, seq_len=seq_len)
    calib_name = BUILTIN if str(calib) == BUILTIN else str(Path(calib).expanduser().resolve())

    parameters: dict[str, Any] = {
        "bits": bits, "group_size": group_size, "desc_act": desc_act, "sym": True, "calibration": calib_name,
        "num_samples": len(samples), "seq_len": len(samples[0]["input_ids"]), "device": dev,
        "tool": "gptqmodel"}
    lineage = parent_lineage(src)
    if lineage is not None:
        parameters.update(source_stage=lineage.stage, source_method=lineage.method)

    with atomic_output(out, overwrite=overwrite) as tmp, \
            tqdm(total=4, desc="gptq", unit="step", file=sys.stderr) as bar:
        bar.set_postfix_str("import gptqmodel")
        gptqmodel = _import_gptqmodel()
        # offload_to_disk off: layers stay in memory (no spill to disk for models this size);
        # pack_impl "original" on CPU: plain torch packing, where the default JIT-compiles a C++
        # extension on first use (over a minute). desc_act replaces gptqmodel's act_group_aware ordering.
        config = gptqmodel.QuantizeConfig(
            bits=bits, group_size=group_size, sym=True, desc_act=desc_act,
            act_group_aware=False if desc_act else None, offload_to_disk=False,
            **({"pack_impl": "original"} if dev == "cpu" else {}))
        bar.update()
        bar.set_postfix_str("load model")
        model = gptqmodel.GPTQModel.load(str(src), config, device=dev)
        bar.update()
        bar.set_postfix_str(f"quantize ({len(samples)} x {parameters['seq_len']} tokens)")
        model.quantize(samples, batch_size=1)
        parameters["dtype"] = str(getattr(model.model, "dtype", "")).replace("torch.", "")
        bar.update()
        bar.set_postfix_str("save")
        model.save(str(tmp))
        del model
        copy_tokenizer(src, tmp)  # the source's own files, not gptqmodel's re-serialization
        write_manifest(tmp, quantized_manifest(src, f"gptq-int{bits}", parameters,
                                               {"calibration": calib_hash}))
        bar.update()
    final = Path(out).expanduser().resolve()
    say(f"wrote {final} (GPTQ {bits}-bit, group size {group_size}, {len(samples)} calibration samples)")
    return final
