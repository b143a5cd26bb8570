"""hearth's own HF → GGUF converter (LLaMA family) and llama.cpp quantization of the result.

    quantize gguf CKPT --type f16|q8_0|q4_0|q4_k_m|q5_k_m -o OUT.gguf

    from hearth.quantize.gguf import convert, quantize_gguf, write_metadata, read_hearth_metadata
    convert("ckpt_dir", "model.q4_k_m.gguf", "q4_k_m")   # f16 GGUF in a temp dir, then llama.cpp's quantizer
    quantize_gguf("model.f16.gguf", "model.q8_0.gguf", "q8_0")

The converter is written on the `gguf` package (names, keys and tensor-name maps come from it) and reads
safetensors one tensor at a time, so memory stays near the size of the largest tensor. Two details
decide whether llama.cpp computes the same function as transformers:
- rotary layout: HF stores q/k rows in "rotate-half" order; llama.cpp's `llama` arch rotates adjacent
  pairs, so q/k rows are permuted per head. Its `qwen2` arch uses the NEOX (rotate-half) layout: no permute.
- tokenizer: llama.cpp picks its pre-tokenizer regex by name (see gguf_vocab.py).
Lineage lives in the file itself: `hearth.manifest` holds the JSON manifest (parent = the HF checkpoint
pinned by content hash). Outputs are written through common.atomic_output: a failure leaves nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import math
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import gguf
import numpy as np

from hearth.runtime.checkpoint import Manifest, read_gguf_metadata
from hearth.runtime.errors import ModelLoadError, UnsupportedModelError

from .common import (QuantizeError, atomic_output, make_temp, parent_lineage, quantized_manifest, refuse_existing,
                     say, source_checkpoint)
from .gguf_kv import read_hearth_metadata, write_metadata
from .gguf_vocab import read_bpe_vocab

__all__ = ["SUPPORTED_ARCHITECTURES", "GGUF_TYPES", "convert", "quantize_gguf", "write_metadata",
           "read_hearth_metadata", "MANIFEST_KEY"]

MANIFEST_KEY = "hearth.manifest"


@dataclass(frozen=True)
class Family:
    """How one HF architecture maps onto a llama.cpp architecture."""

    arch: gguf.MODEL_ARCH
    permute_qk: bool
    """True where llama.cpp rotates adjacent pairs (llama arch) and HF rotates halves."""


FAMILIES: dict[str, Family] = {
    "LlamaForCausalLM": Family(gguf.MODEL_ARCH.LLAMA, permute_qk=True),  # also SmolLM/SmolLM2
    "MistralForCausalLM": Family(gguf.MODEL_ARCH.LLAMA, permute_qk=True),  # llama.cpp runs Mistral as llama
    "Qwen2ForCausalLM": Family(gguf.MODEL_ARCH.QWEN2, permute_qk=False),
}
SUPPORTED_ARCHITECTURES: tuple[str, ...] = tuple(FAMILIES)

# Types written directly by the converter -> (llama file type, element type of 2-D weights).
_DIRECT_TYPES = {"f16": (gguf.LlamaFileType.MOSTLY_F16, gguf.GGMLQuantizationType.F16),
                 "f32": (gguf.LlamaFileType.ALL_F32, gguf.GGMLQuantizationType.F32),
                 "bf16": (gguf.LlamaFileType.MOSTLY_BF16, gguf.GGMLQuantizationType.BF16)}
# Types made by llama.cpp's quantizer from an f16 GGUF -> llama_cpp ftype constant name.
_LLAMA_FTYPES = {"q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
                 "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M", "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M"}
GGUF_TYPES: tuple[str, ...] = ("f16", "q8_0", "q4_0", "q4_k_m", "q5_k_m", "f32", "bf16")
# Float file types llama.cpp quantizes from without `allow_requantize`.
_FLOAT_FILE_TYPES = (gguf.LlamaFileType.ALL_F32, gguf.LlamaFileType.MOSTLY_F16, gguf.LlamaFileType.MOSTLY_BF16)
_SKIP_TENSOR = re.compile(r"(^|\.)rotary_emb\.inv_freq$")  # a buffer some old checkpoints saved
_GENERIC_DIR_NAMES = {"hf", "model", "checkpoint", "final", "merged"}


def _check_type(qtype: str) -> None:
    if qtype not in GGUF_TYPES:
        raise QuantizeError(f"unknown GGUF type {qtype!r}; choose one of {', '.join(GGUF_TYPES)}")


# ----------------------------------------------------------------------------- hyperparameters


@dataclass
class Hparams:
    """The config.json facts llama.cpp needs, checked once."""

    hf_arch: str
    family: Family
    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ctx: int
    rms_eps: float
    rope_theta: float
    rope: dict[str, Any]
    """The rope_parameters / rope_scaling dict (rope_type "default" when there is none)."""
    vocab_size: int
    tied: bool


def _rope_parameters(cfg: dict[str, Any]) -> dict[str, Any]:
    # transformers >= 5 writes rope_parameters (theta included); older configs rope_theta + rope_scaling.
    rp = dict(cfg.get("rope_parameters") or {})
    if "rope_theta" not in rp:
        rp = {**(cfg.get("rope_scaling") or {}), "rope_theta": cfg.get("rope_theta", 10000.0)}
    rp["rope_type"] = rp.get("rope_type", rp.get("type", "default")) or "default"
    return rp


def read_hparams(cfg: dict[str, Any], has_lm_head: bool) -> Hparams:
    archs = cfg.get("architectures") or [cfg.get("model_type", "unknown")]
    hf_arch = archs[0]
    if hf_arch not in FAMILIES:
        raise UnsupportedModelError(f"cannot convert architecture {hf_arch} to GGUF; supported: "
                                    f"{', '.join(SUPPORTED_ARCHITECTURES)}")
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise UnsupportedModelError(f"{hf_arch} with hidden_act={act!r}: llama.cpp's LLaMA graph uses silu")
    try:
        n_head = int(cfg["num_attention_heads"])
        n_embd = int(cfg["hidden_size"])
        hp = Hparams(
            hf_arch=hf_arch, family=FAMILIES[hf_arch], n_layer=int(cfg["num_hidden_layers"]), n_embd=n_embd,
            n_ff=int(cfg["intermediate_size"]), n_head=n_head,
            n_head_kv=int(cfg.get("num_key_value_heads") or n_head),
            head_dim=int(cfg.get("head_dim") or n_embd // n_head),
            n_ctx=int(cfg.get("max_position_embeddings") or 2048), rms_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(_rope_parameters(cfg)["rope_theta"]), rope=_rope_parameters(cfg),
            vocab_size=int(cfg["vocab_size"]),
            # a checkpoint saved with tied weights has no lm_head tensor; llama.cpp then reuses token_embd
            tied=bool(cfg.get("tie_word_embeddings")) or not has_lm_head)
    except KeyError as e:
        raise ModelLoadError(f"config.json of this {hf_arch} checkpoint lacks {e.args[0]}") from e
    window = cfg.get("sliding_window")
    if window and (hf_arch == "MistralForCausalLM" or cfg.get("use_sliding_window")) and window < hp.n_ctx:
        say(f"warning: llama.cpp attends over the full context; this model was trained with a "
            f"{window}-token sliding window, so outputs differ beyond {window} tokens")
    return hp


def _rope_freq_factors(hp: Hparams) -> np.ndarray:
    """Llama 3 rope scaling as llama.cpp's `rope_freqs` tensor: per-frequency divisors of theta."""
    rp = hp.rope
    factor, low, high = float(rp["factor"]), float(rp["low_freq_factor"]), float(rp["high_freq_factor"])
    old_ctx = float(rp["original_max_position_embeddings"])
    freqs = 1.0 / (hp.rope_theta ** (np.arange(0, hp.head_dim, 2, dtype=np.float64) / hp.head_dim))
    wavelen = 2 * math.pi / freqs
    smooth = (old_ctx / wavelen - low) / (high - low)
    mid = 1.0 / ((1 - smooth) / factor + smooth)
    out = np.where(wavelen < old_ctx / high, 1.0, np.where(wavelen > old_ctx / low, factor, mid))
    return out.astype(np.float32)  # (head_dim / 2,)


def _add_hparams(w: gguf.GGUFWriter, hp: Hparams) -> bool:
    """Write the model's hyperparameters; returns True if a rope_freqs tensor must be written."""
    w.add_vocab_size(hp.vocab_size)
    w.add_context_length(hp.n_ctx)
    w.add_embedding_length(hp.n_embd)
    w.add_block_count(hp.n_layer)
    w.add_feed_forward_length(hp.n_ff)
    w.add_head_count(hp.n_head)
    w.add_head_count_kv(hp.n_head_kv)
    w.add_rope_freq_base(hp.rope_theta)
    w.add_layer_norm_rms_eps(hp.rms_eps)
    w.add_rope_dimension_count(hp.head_dim)
    if hp.head_dim != hp.n_embd // hp.n_head:  # e.g. Mistral Nemo: head_dim is not hidden/heads
        w.add_key_length(hp.head_dim)
        w.add_value_length(hp.head_dim)
    rp, kind = hp.rope, hp.rope["rope_type"]
    if kind == "default":
        return False
    if kind == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rp["factor"]))
        return False
    if kind == "yarn":
        custom = [k for k in ("attention_factor", "mscale", "mscale_all_dim") if rp.get(k) is not None]
        if custom:
            raise UnsupportedModelError(f"YaRN rope scaling with {', '.join(custom)} is not converted")
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(rp["factor"]))
        w.add_rope_scaling_orig_ctx_len(int(rp["original_max_position_embeddings"]))
        w.add_rope_scaling_yarn_beta_fast(float(rp.get("beta_fast") or 32.0))
        w.add_rope_scaling_yarn_beta_slow(float(rp.get("beta_slow") or 1.0))
        return False
    if kind == "llama3":
        return True
    raise UnsupportedModelError(f"rope scaling {kind!r} has no llama.cpp equivalent; supported: "
                                f"default, linear, yarn, llama3")


# ----------------------------------------------------------------------------- tensors


@dataclass
class _TensorPlan:
    name: str
    """GGUF tensor name."""
    hf_name: str
    file: Path | None
    """Safetensors file holding it (None for tensors computed here, like rope_freqs)."""
    shape: tuple[int, ...]
    dtype: gguf.GGMLQuantizationType
    permute_heads: int = 0
    """Number of heads to permute q/k rows over (0 = none)."""

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * (4 if self.dtype == gguf.GGMLQuantizationType.F32 else 2)


def _permute_rotary(w: Any, n_head: int) -> Any:
    """HF rotate-half rows -> llama.cpp interleaved pairs, per head: (n_head*D, ...) -> same shape."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _plan_tensors(files: list[Path], hp: Hparams, weight_type: gguf.GGMLQuantizationType) -> list[_TensorPlan]:
    from safetensors import safe_open

    tmap = gguf.get_tensor_name_map(hp.family.arch, hp.n_layer)
    plans: list[_TensorPlan] = []
    for f in files:
        with safe_open(f, framework="pt") as sf:
            for hf_name in sf.keys():
                if _SKIP_TENSOR.search(hf_name) or (hp.tied and hf_name == "lm_head.weight"):
                    continue
                found = tmap.get_type_and_name(hf_name, try_suffixes=(".weight", ".bias"))
                if found is None:
                    raise UnsupportedModelError(f"tensor {hf_name} in {f.name} has no GGUF name for the "
                                                f"{hp.family.arch.name.lower()} architecture")
                kind, name = found
                shape = tuple(sf.get_slice(hf_name).get_shape())
                permute = 0
                if hp.family.permute_qk and kind == gguf.MODEL_TENSOR.ATTN_Q:
                    permute = hp.n_head
                elif hp.family.permute_qk and kind == gguf.MODEL_TENSOR.ATTN_K:
                    permute = hp.n_head_kv
                # llama.cpp keeps norms and biases in f32; 2-D weights take the file's type
                dtype = weight_type if len(shape) >= 2 else gguf.GGMLQuantizationType.F32
                plans.append(_TensorPlan(name, hf_name, f, shape, dtype, permute))
    names = [p.name for p in plans]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ModelLoadError(f"tensors {', '.join(dup)} appear more than once in the checkpoint")
    needed = [gguf.TENSOR_NAMES[t] + ".weight" for t in (gguf.MODEL_TENSOR.TOKEN_EMBD, gguf.MODEL_TENSOR.OUTPUT_NORM)]
    if not hp.tied:
        needed.append(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.OUTPUT] + ".weight")
    missing = [n for n in needed if n not in names]
    if missing:
        raise ModelLoadError(f"the checkpoint lacks {', '.join(missing)} (HF: embed_tokens / norm / lm_head)")
    return plans


def _load_tensor(plan: _TensorPlan, handles: dict[Path, Any]) -> np.ndarray:
    import torch

    t = handles[plan.file].get_tensor(plan.hf_name).to(torch.float32)
    if plan.permute_heads:
        t = _permute_rotary(t, plan.permute_heads)
    if plan.dtype == gguf.GGMLQuantizationType.F32:
        return t.contiguous().numpy()
    if plan.dtype == gguf.GGMLQuantizationType.F16:
        return t.to(torch.float16).contiguous().numpy()
    # numpy has no bfloat16: hand the raw 16-bit patterns to the writer
    return t.to(torch.bfloat16).contiguous().view(torch.int16).numpy()


def _model_name(ckpt: Path, cfg: dict[str, Any]) -> str:
    for key in ("_name_or_path", "_model_name_or_path"):
        value = cfg.get(key)
        if isinstance(value, str) and value.strip():
            return Path(value.strip()).name or value.strip()
    return ckpt.parent.name if ckpt.name in _GENERIC_DIR_NAMES and ckpt.parent.name else ckpt.name


def _write_gguf(ckpt: Path, files: list[Path], cfg: dict[str, Any], out: Path, qtype: str,
                manifest: Manifest) -> None:
    """Write one GGUF file of a direct type (f16/f32/bf16) to `out`, tensor by tensor."""
    from safetensors import safe_open
    from tqdm import tqdm

    file_type, weight_type = _DIRECT_TYPES[qtype]
    has_lm_head = False
    for f in files:
        with safe_open(f, framework="pt") as sf:
            has_lm_head = has_lm_head or "lm_head.weight" in sf.keys()
    hp = read_hparams(cfg, has_lm_head)
    vocab = read_bpe_vocab(ckpt, hp.vocab_size)
    plans = _plan_tensors(files, hp, weight_type)

    w = gguf.GGUFWriter(out, gguf.MODEL_ARCH_NAMES[hp.family.arch])
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(_model_name(ckpt, cfg))
    w.add_file_type(int(file_type))
    if _add_hparams(w, hp):
        plans.insert(0, _TensorPlan(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", "", None,
                                    (hp.head_dim // 2,), gguf.GGMLQuantizationType.F32))
    vocab.add_to(w)
    w.add_string(MANIFEST_KEY, json.dumps(manifest.to_dict(), ensure_ascii=False))
    for p in plans:
        np_dtype = {gguf.GGMLQuantizationType.F32: np.float32, gguf.GGMLQuantizationType.F16: np.float16,
                    gguf.GGMLQuantizationType.BF16: np.int16}[p.dtype]
        w.add_tensor_info(p.name, p.shape, np.dtype(np_dtype), p.nbytes, raw_dtype=p.dtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    with contextlib.ExitStack() as stack:
        handles = {f: stack.enter_context(safe_open(f, framework="pt")) for f in files}
        bar = stack.enter_context(tqdm(total=sum(p.nbytes for p in plans), unit="B", unit_scale=True,
                                       desc=f"writing {qtype} GGUF", file=sys.stderr, mininterval=0.5))
        for p in plans:
            data = _rope_freq_factors(hp) if p.file is None else _load_tensor(p, handles)
            if data.nbytes != p.nbytes:
                raise ModelLoadError(f"tensor {p.hf_name}: {data.nbytes} bytes, expected {p.nbytes}")
            w.write_tensor_data(data)
            bar.update(p.nbytes)
    w.close()


# ----------------------------------------------------------------------------- llama.cpp quantizer


_PROGRESS = re.compile(r"\[\s*(\d+)\s*/\s*(\d+)\s*\]")


@contextlib.contextmanager
def _llama_log_to(on_text: Callable[[int, str], None]) -> Iterator[None]:
    """Route llama.cpp's (global) log to `on_text` for the duration, then restore the previous logger."""
    import llama_cpp

    prev_cb, prev_ud = llama_cpp.llama_log_callback(), ctypes.c_void_p()
    llama_cpp.llama_log_get(ctypes.byref(prev_cb), ctypes.byref(prev_ud))

    def _cb(level: int, text: bytes, _ud: object) -> None:
        on_text(level, text.decode("utf-8", errors="replace"))

    callback = llama_cpp.llama_log_callback(_cb)  # kept referenced until restored below
    llama_cpp.llama_log_set(callback, None)
    try:
        yield
    finally:
        llama_cpp.llama_log_set(prev_cb, prev_ud)


def _llama_quantize(src: Path, dst: Path, qtype: str) -> None:
    import llama_cpp
    from tqdm import tqdm

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, _LLAMA_FTYPES[qtype])
    params.nthread = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    errors: list[str] = []
    with tqdm(total=None, unit="tensor", desc=f"llama.cpp {qtype}", file=sys.stderr, mininterval=0.5) as bar:
        def on_text(level: int, text: str) -> None:
            if level == 3:  # GGML_LOG_LEVEL_ERROR
                errors.append(text.strip())
            m = _PROGRESS.search(text)
            if m:
                bar.total = int(m.group(2))
                bar.update(int(m.group(1)) - bar.n)

        with _llama_log_to(on_text):
            rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        detail = "; ".join(e for e in errors if e) or "see llama.cpp's log"
        raise QuantizeError(f"llama.cpp could not quantize {src.name} to {qtype} (code {rc}): {detail}")


def quantize_gguf(src_gguf: str | os.PathLike, out: str | os.PathLike, qtype: str, *,
                  overwrite: bool = True, manifest: Manifest | None = None) -> Path:
    """Quantize an f32/f16/bf16 GGUF with llama.cpp's own quantizer (`llama_model_quantize`).

    The output's `hearth.manifest` is `manifest` if given (convert passes the HF checkpoint's), else one
    whose parent is `src_gguf` pinned by content hash. Other metadata is copied by llama.cpp."""
    if qtype not in _LLAMA_FTYPES:
        raise QuantizeError(f"llama.cpp quantizes to {', '.join(_LLAMA_FTYPES)}; got {qtype!r}")
    src = source_checkpoint(src_gguf, want="gguf").model_file
    meta = read_gguf_metadata(src)
    file_type = meta.get(gguf.Keys.General.FILE_TYPE)
    if file_type not in [int(t) for t in _FLOAT_FILE_TYPES]:
        raise QuantizeError(f"{src} is already quantized (general.file_type {file_type}); quantize from an "
                            f"f16, bf16 or f32 GGUF")
    if manifest is None:
        params: dict[str, Any] = {"type": qtype}
        src_manifest = read_hearth_metadata(src).get(MANIFEST_KEY)
        if isinstance(src_manifest, dict):
            params.update(source_stage=src_manifest.get("stage"), source_method=src_manifest.get("method"))
        manifest = quantized_manifest(src, f"gguf-{qtype}", params)
    final = Path(out).expanduser().resolve()
    if final == src.resolve():
        raise QuantizeError(f"output {final} is the input; choose another output path")
    with atomic_output(final, is_file=True, overwrite=overwrite) as tmp:
        _llama_quantize(src, tmp, qtype)
        write_metadata(tmp, {MANIFEST_KEY: json.dumps(manifest.to_dict(), ensure_ascii=False)})
    say(f"wrote {final} ({qtype}, {final.stat().st_size / 2**20:.1f} MiB)")
    return final


# ----------------------------------------------------------------------------- entry point


def convert(ckpt: str | os.PathLike, out: str | os.PathLike, qtype: str = "f16", *,
            overwrite: bool = True) -> Path:
    """HF safetensors checkpoint dir (Llama, Mistral, Qwen2, SmolLM) -> one GGUF file of type `qtype`.

    f16/f32/bf16 are written directly; quantized types go through an f16 GGUF in a temp dir beside
    `out` (removed afterwards) and llama.cpp's quantizer. Returns the output path."""
    _check_type(qtype)
    info = source_checkpoint(ckpt, want="hf-safetensors")
    src = Path(ckpt).expanduser().resolve()
    final = refuse_existing(out, overwrite)
    cfg = info.config or {}
    arch = (cfg.get("architectures") or [cfg.get("model_type", "unknown")])[0]
    if arch not in FAMILIES:  # before hashing gigabytes of weights
        raise UnsupportedModelError(f"cannot convert architecture {arch} to GGUF; supported: "
                                    f"{', '.join(SUPPORTED_ARCHITECTURES)}")
    parameters: dict[str, Any] = {"type": qtype, "architecture": arch}
    lineage = parent_lineage(src)
    if lineage is not None:
        parameters.update(source_stage=lineage.stage, source_method=lineage.method)
    manifest = quantized_manifest(src, f"gguf-{qtype}", parameters)
    files = [f for f in info.weight_files if f.suffix == ".safetensors"]

    if qtype in _DIRECT_TYPES:
        with atomic_output(final, is_file=True, overwrite=overwrite) as tmp:
            _write_gguf(src, files, cfg, tmp, qtype, manifest)
    else:
        # beside the output, not in /tmp: the f16 copy of a large model needs the output's disk
        tmpdir = make_temp(final, is_dir=True, kind="f16")
        try:
            f16 = tmpdir / "model.f16.gguf"
            _write_gguf(src, files, cfg, f16, "f16", manifest)
            quantize_gguf(f16, final, qtype, overwrite=overwrite, manifest=manifest)
        finally:
            shutil.rmtree(tmpdir, ignore_errors=True)
        return final
    say(f"wrote {final} ({qtype}, {final.stat().st_size / 2**20:.1f} MiB)")
    return final
