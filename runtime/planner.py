"""Memory planner: will this model fit this device at this context, concurrency and quant?

    hearth plan llama-3-8b --device rtx3090 --context 8192 --concurrency 4 --quant int4

The estimate is the sum of four parts, each computed from the model's shape alone:
weights (parameter count x bytes per weight of the quant), the KV cache
(2 x layers x kv_heads x head_dim x context x concurrency x KV bytes), the activation peak of
one engine step (a prefill chunk, attention over the context, its logits) and a fixed runtime
overhead (CUDA context, the framework's own memory). When it does not fit, the planner says which settings would:
a lower quant, the largest concurrency at this context, the largest context at this concurrency.

MODEL is a preset name (PRESETS), an HF checkpoint directory (config.json) or a GGUF file
(hyperparameters read from its metadata). Only LLaMA-family layouts are modelled.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import struct
from dataclasses import dataclass, field
from typing import Callable

from .checkpoint import is_gguf, read_gguf_metadata
from .errors import InvalidRequestError, ModelLoadError, ModelNotFoundError, UnsupportedModelError

GiB = 1024**3

# ---- model shapes ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelShape:
    """The hyperparameters that decide memory use of a LLaMA-family decoder."""

    name: str
    arch: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied: bool
    """lm_head shares the embedding matrix (no separate output weight)."""
    max_context: int
    head_dim: int = 0
    """0 means hidden // heads."""
    qkv_bias: bool = False
    """Biases on the q/k/v projections (Qwen2; LLaMA configs with attention_bias)."""
    o_bias: bool = False
    """A bias on o_proj (LLaMA's attention_bias; Qwen2 has none)."""
    mlp_bias: bool = False

    def __post_init__(self) -> None:
        for f in ("hidden", "layers", "heads", "kv_heads", "intermediate", "vocab"):
            if getattr(self, f) <= 0:
                raise ModelLoadError(f"model {self.name!r}: {f} must be positive, got {getattr(self, f)}")
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.hidden // self.heads)


# Numbers from each model's public config.json on the Hugging Face hub.
PRESETS: dict[str, ModelShape] = {
    "smollm2-135m": ModelShape("smollm2-135m", "llama", 576, 30, 9, 3, 1536, 49152, True, 8192),
    "smollm2-1.7b": ModelShape("smollm2-1.7b", "llama", 2048, 24, 32, 32, 8192, 49152, True, 8192),
    "llama-3-8b": ModelShape("llama-3-8b", "llama", 4096, 32, 32, 8, 14336, 128256, False, 8192),
    "llama-3-70b": ModelShape("llama-3-70b", "llama", 8192, 80, 64, 8, 28672, 128256, False, 8192),
    "mistral-7b": ModelShape("mistral-7b", "mistral", 4096, 32, 32, 8, 14336, 32000, False, 32768),
    "qwen2-7b": ModelShape("qwen2-7b", "qwen2", 3584, 28, 28, 4, 18944, 152064, False, 32768,
                           qkv_bias=True),
}

SUPPORTED_ARCHS = ("llama", "mistral", "qwen2")


def load_shape(model: str) -> ModelShape:
    """A preset name, an HF checkpoint directory or a GGUF file -> its ModelShape."""
    if model.lower() in PRESETS:
        return PRESETS[model.lower()]
    if os.path.isdir(model):
        cfg_path = os.path.join(model, "config.json")
        if not os.path.isfile(cfg_path):
            raise ModelNotFoundError(f"{model} is a directory without config.json")
        return _shape_from_hf_config(cfg_path, name=model)
    if os.path.isfile(model):
        if is_gguf(model):  # the format is decided by content, never by file name
            return _shape_from_gguf(model)
        raise ModelLoadError(f"{model} is neither an HF checkpoint directory nor a GGUF file")
    raise ModelNotFoundError(unknown_model_message(model))


def unknown_model_message(model: str, cached: list[str] | tuple[str, ...] = ()) -> str:
    """One line for a MODEL that is no path, preset or cached name: the nearest names, then every one."""
    known = sorted(PRESETS) + sorted(set(cached) - set(PRESETS))
    near = difflib.get_close_matches(model.lower(), known, n=1, cutoff=0.6)
    hint = f"did you mean {near[0]}? " if near else ""
    where = "not a path, a preset or a cached model" if cached else "not a path, and not a preset"
    listing = f"presets: {', '.join(sorted(PRESETS))}"
    if cached:
        listing += f"; cached (`hearth models list`): {', '.join(sorted(cached))}"
    return f"no model {model!r}: {where}; {hint}{listing}"


def _shape_from_hf_config(path: str, name: str) -> ModelShape:
    try:
        with open(path) as f:
            cfg = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"cannot read {path}: {e}") from e
    cfg = cfg.get("text_config", cfg) if "model_type" not in cfg else cfg
    arch = cfg.get("model_type", "?")
    if arch not in SUPPORTED_ARCHS:
        raise UnsupportedModelError(
            f"the planner does not model architecture {arch!r}; supported: {', '.join(SUPPORTED_ARCHS)}")
    try:
        heads = int(cfg["num_attention_heads"])
        return ModelShape(
            name=name,
            arch=arch,
            hidden=int(cfg["hidden_size"]),
            layers=int(cfg["num_hidden_layers"]),
            heads=heads,
            kv_heads=int(cfg.get("num_key_value_heads") or heads),
            intermediate=int(cfg["intermediate_size"]),
            vocab=int(cfg["vocab_size"]),
            tied=bool(cfg.get("tie_word_embeddings", False)),
            max_context=int(cfg.get("max_position_embeddings") or 0),
            head_dim=int(cfg.get("head_dim") or 0),
            qkv_bias=arch == "qwen2" or bool(cfg.get("attention_bias", False)),
            o_bias=arch != "qwen2" and bool(cfg.get("attention_bias", False)),
            mlp_bias=bool(cfg.get("mlp_bias", False)),
        )
    except KeyError as e:
        raise ModelLoadError(f"{path} lacks {e.args[0]!r}") from e


def _shape_from_gguf(path: str) -> ModelShape:
    # gguf's GGUFReader decodes every vocabulary and merge string (~10 s for a 49k vocab on a
    # busy 2-core box); the metadata reader of .checkpoint skips arrays and takes ~0.1 s.
    meta = read_gguf_metadata(path)
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise UnsupportedModelError(
            f"the planner does not model GGUF architecture {arch!r}; supported: {', '.join(SUPPORTED_ARCHS)}")

    def get(key: str, default: int | None = None) -> int:
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            raise ModelLoadError(f"GGUF {path} lacks metadata {arch}.{key!r}")
        return int(value)

    vocab = meta.get("tokenizer.ggml.tokens.length") or get("vocab_size")
    heads, hidden = get("attention.head_count"), get("embedding_length")
    tensors = _gguf_tensor_names(path)
    return ModelShape(
        name=os.path.basename(path),
        arch=arch,
        hidden=hidden,
        layers=get("block_count"),
        heads=heads,
        kv_heads=get("attention.head_count_kv", heads),
        intermediate=get("feed_forward_length"),
        vocab=int(vocab),
        tied="output.weight" not in tensors,  # llama.cpp reuses token_embd when it is absent
        max_context=get("context_length", 0),
        head_dim=get("attention.key_length", hidden // heads),
        qkv_bias="blk.0.attn_q.bias" in tensors,
        o_bias="blk.0.attn_output.bias" in tensors,
        mlp_bias="blk.0.ffn_up.bias" in tensors,
    )


def _gguf_tensor_names(path: str) -> set[str]:
    """Names in a GGUF file's tensor table, walking past the metadata without decoding it."""
    sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # scalar types
    file_size = os.path.getsize(path)
    with open(path, "rb") as f:
        def unpack(fmt: str) -> int:
            data = f.read(struct.calcsize(fmt))
            if len(data) != struct.calcsize(fmt):
                raise ModelLoadError(f"truncated GGUF file {path}")
            return struct.unpack(fmt, data)[0]

        def string_len() -> int:
            n = unpack("<Q")
            if n > file_size:
                raise ModelLoadError(f"corrupt GGUF file {path}: string length {n}")
            return n

        def skip(vtype: int) -> None:
            if vtype in sizes:
                f.seek(sizes[vtype], os.SEEK_CUR)
            elif vtype == 8:  # string
                f.seek(string_len(), os.SEEK_CUR)
            elif vtype == 9:  # array: element type, count, elements
                etype, count = unpack("<I"), unpack("<Q")
                if etype in sizes:
                    f.seek(sizes[etype] * count, os.SEEK_CUR)
                else:
                    for _ in range(count):
                        skip(etype)
            else:
                raise ModelLoadError(f"corrupt GGUF file {path}: metadata type {vtype}")

        f.seek(8)  # magic + version
        n_tensors, n_kv = unpack("<Q"), unpack("<Q")
        for _ in range(n_kv):
            f.seek(string_len(), os.SEEK_CUR)  # the key
            skip(unpack("<I"))
        names = set()
        for _ in range(n_tensors):  # name, n_dims, dims (u64 each), type (u32), offset (u64)
            names.add(f.read(string_len()).decode("utf-8", "replace"))
            f.seek(8 * unpack("<I") + 12, os.SEEK_CUR)
    return names


@dataclass(frozen=True)
class ParamCounts:
    """Parameters by role: quant formats treat them differently."""

    embedding: int
    lm_head: int
    """0 when tied to the embedding."""
    linear: int
    """Weights of the q/k/v/o and gate/up/down projections (what GPTQ/bnb/k-quants quantize)."""
    linear_in_features: int
    """Sum of in_features over all projections (GPTQ keeps one int32 g_idx per input column)."""
    linear_out_features: int
    """Sum of out_features over all projections (bnb int8 keeps one fp32 scale per row)."""
    small: int
    """Norm weights and biases, kept in high precision by every format."""

    @property
    def total(self) -> int:
        return self.embedding + self.lm_head + self.linear + self.small


def count_params(s: ModelShape) -> ParamCounts:
    """Parameter count of a LLaMA-family decoder: embeddings, GQA attention, gated MLP, RMSNorms."""
    q_out, kv_out = s.heads * s.head_dim, s.kv_heads * s.head_dim
    # (in, out) of each projection in one layer: q, k, v, o, gate, up, down
    projs = [(s.hidden, q_out), (s.hidden, kv_out), (s.hidden, kv_out), (q_out, s.hidden),
             (s.hidden, s.intermediate), (s.hidden, s.intermediate), (s.intermediate, s.hidden)]
    per_layer_small = (2 * s.hidden + (q_out + 2 * kv_out) * s.qkv_bias + s.hidden * s.o_bias
                       + (2 * s.intermediate + s.hidden) * s.mlp_bias)
    return ParamCounts(
        embedding=s.vocab * s.hidden,
        lm_head=0 if s.tied else s.vocab * s.hidden,
        linear=s.layers * sum(i * o for i, o in projs),
        linear_in_features=s.layers * sum(i for i, _ in projs),
        linear_out_features=s.layers * sum(o for _, o in projs),
        small=s.layers * per_layer_small + s.hidden,  # + the final norm
    )


# ---- quants, devices, backends --------------------------------------------------------------

# Ordered from most to least precise: advice walks down this list.
QUANTS = ("fp32", "bf16", "fp16", "q8_0", "int8", "int4", "q4_k_m")
LLAMACPP_QUANTS = ("q8_0", "q4_k_m")
FLOAT_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}

# name -> (bytes, is_gpu); GPU sizes are the nominal 24/40/80 GiB the driver reports.
DEVICES: dict[str, tuple[int | None, bool]] = {
    "rtx3090": (24 * GiB, True),
    "a100-40g": (40 * GiB, True),
    "a100-80g": (80 * GiB, True),
    "cpu": (None, False),  # this machine's total RAM
}

# Runtime overhead outside weights/KV/activations.
CUDA_CONTEXT = {"transformers": int(0.75 * GiB), "llama.cpp": int(0.5 * GiB)}  # driver + kernels
# RSS of a process that has run a forward, before any model: python + torch + transformers and
# the integrations they import in hearth's environment (0.94 GiB measured by bench/planner.py;
# 0.70 GiB with torch + transformers alone), or the llama.cpp library.
CPU_PROCESS = {"transformers": int(0.95 * GiB), "llama.cpp": int(0.1 * GiB)}
TORCH_ALLOCATOR_SLACK = 0.05  # the CUDA caching allocator rounds and fragments blocks

DEFAULT_PREFILL_CHUNK = 512  # tokens per prefill step (llama.cpp's n_ubatch default)


def weight_bytes(p: ParamCounts, quant: str) -> int:
    """Bytes of all weights stored in `quant`, with each format's high-precision exceptions."""
    if quant in FLOAT_BYTES:
        return p.total * FLOAT_BYTES[quant]
    hi = 2 * (p.embedding + p.lm_head + p.small)  # fp16 embeddings/lm_head/norms for torch quants
    if quant == "int8":
        # bitsandbytes LLM.int8: int8 weights + one fp32 absmax scale per output row;
        # the embedding and lm_head stay fp16 (bnb skips lm_head, never touches nn.Embedding).
        return p.linear + 4 * p.linear_out_features + hi
    if quant == "int4":
        # GPTQ 4-bit, group 128: packed nibbles, an fp16 scale and a 4-bit zero per group of 128
        # input columns, int32 g_idx per input column; embedding and lm_head stay fp16.
        return int(p.linear * (0.5 + 2.5 / 128)) + 4 * p.linear_in_features + hi
    if quant == "q8_0":
        # blocks of 32 int8 + one f16 scale = 34 bytes / 32 weights, token_embd and output too;
        # norms (and biases) are f32 in GGUF.
        return math.ceil((p.linear + p.embedding + p.lm_head) * 34 / 32) + 4 * p.small
    if quant == "q4_k_m":
        # Linear layers average ~4.85 bits (Q4_K, with Q6_K for half of attn_v/ffn_down);
        # output.weight is Q6_K (6.5625 bits), or token_embd when tied, since it then is the
        # output; an untied token_embd is Q4_K (4.5 bits). Norms f32.
        embd_bits = 6.5625 if p.lm_head == 0 else 4.5
        bits = p.linear * 4.85 + p.embedding * embd_bits + p.lm_head * 6.5625
        return math.ceil(bits / 8) + 4 * p.small
    raise InvalidRequestError(f"unknown quant {quant!r}; choose one of {', '.join(QUANTS)}", param="quant")


def backend_for(quant: str) -> str:
    return "llama.cpp" if quant in LLAMACPP_QUANTS else "transformers"


def kv_dtype_bytes(quant: str, gpu: bool) -> int:
    """KV element size: f16 in llama.cpp; the compute dtype in transformers."""
    if quant in LLAMACPP_QUANTS:
        return 2
    if quant in FLOAT_BYTES:
        return FLOAT_BYTES[quant]
    return 2 if gpu else 4  # int8/int4 compute in fp16 on GPU, fp32 on CPU


def kv_dtype_name(quant: str, gpu: bool) -> str:
    if quant in LLAMACPP_QUANTS:
        return "f16"
    return quant if quant in FLOAT_BYTES else ("fp16" if gpu else "fp32")


def kv_cache_bytes(s: ModelShape, context: int, concurrency: int, dtype_bytes: int) -> int:
    return 2 * s.layers * s.kv_heads * s.head_dim * context * concurrency * dtype_bytes


def activation_bytes(s: ModelShape, quant: str, gpu: bool, context: int, concurrency: int,
                     chunk: int) -> int:
    """Peak transient memory of one engine step: `chunk` tokens over `concurrency` sequences.

    Layers run one at a time, so the peak is the larger of one layer's temporaries and the
    logits at the end. Per token, the gated MLP holds act(gate), up and their product
    (3 intermediate-sized rows) next to ~5 hidden-sized rows (residual, norm, ...).
    Logits are kept for every token of the chunk (prompt logprobs need them), in fp32.
    """
    layer_rows = 3 * s.intermediate + 5 * s.hidden  # per token, in compute-dtype elements
    if quant in LLAMACPP_QUANTS:
        # ggml's compute buffer is f32; without flash attention it holds the KQ scores of one
        # layer (heads x chunk x context). Its output buffer has one logits row per sequence.
        layer = 4 * (chunk * layer_rows + s.heads * chunk * context)
        logits = 4 * chunk * (s.vocab + 2 * s.hidden)
        return max(layer, logits) + 4 * concurrency * s.vocab
    b = kv_dtype_bytes(quant, gpu)  # the compute dtype
    # With a mask (always, for batched sequences) HF attention gathers each sequence's keys and
    # values for the whole context and expands them from kv_heads to heads (repeat_kv), so a step
    # that decodes every sequence holds all of them; plus a bool mask of chunk x context.
    attn = concurrency * 2 * context * (s.kv_heads + s.heads) * s.head_dim * b + chunk * context
    layer = chunk * layer_rows * b + attn
    # half-precision logits are upcast to an fp32 copy for sampling; the last hidden states stay
    logits = chunk * (s.vocab * (4 + (b if b != 4 else 0)) + 2 * s.hidden * b)
    return max(layer, logits)


# ---- the plan -------------------------------------------------------------------------------


@dataclass
class Plan:
    """Every component in bytes, whether it fits, and what to change when it does not."""

    model: str
    device: str
    quant: str
    backend: str
    context: int
    concurrency: int
    prefill_chunk: int
    params: int
    kv_dtype: str
    """Element type of the KV cache: fp32, fp16, bf16 (transformers) or f16 (llama.cpp)."""
    weights_bytes: int
    kv_cache_bytes: int
    activation_bytes: int
    overhead_bytes: int
    total_bytes: int
    capacity_bytes: int
    fits: bool
    headroom_bytes: int
    """capacity - total; negative when it does not fit."""
    max_concurrency: int
    """Most sequences that fit at this context and quant (0: not even one)."""
    max_context: int
    """Longest context that fits at this concurrency and quant (0: none), at most model_max_context."""
    model_max_context: int
    """The context the model was trained for (0: unknown)."""
    advice: list[str] = field(default_factory=list)
    """Settings that would fit; empty when it fits."""
    notes: list[str] = field(default_factory=list)


def _capacity(device: str, memory_gb: float | None) -> tuple[int, bool]:
    if device not in DEVICES:
        raise InvalidRequestError(
            f"unknown device {device!r}; choose one of {', '.join(DEVICES)}", param="device")
    size, gpu = DEVICES[device]
    if memory_gb is not None:
        if not memory_gb > 0:
            raise InvalidRequestError(f"memory_gb must be positive, got {memory_gb}", param="memory_gb")
        return int(memory_gb * GiB), gpu
    if size is None:
        import psutil

        size = psutil.virtual_memory().total
    return size, gpu


def _total(s: ModelShape, quant: str, gpu: bool, context: int, concurrency: int,
           chunk: int) -> tuple[int, int, int, int]:
    """(weights, kv, activations, overhead) in bytes."""
    backend = backend_for(quant)
    w = weight_bytes(count_params(s), quant)
    kv = kv_cache_bytes(s, context, concurrency, kv_dtype_bytes(quant, gpu))
    act = activation_bytes(s, quant, gpu, context, concurrency, min(chunk, context))
    if gpu:
        slack = TORCH_ALLOCATOR_SLACK if backend == "transformers" else 0.0
        overhead = CUDA_CONTEXT[backend] + int(slack * (w + kv + act))
    else:
        overhead = CPU_PROCESS[backend]
    return w, kv, act, overhead


def _max_int(pred, lo: int, hi: int) -> int:
    """Largest n in [lo, hi] with pred(n) true, assuming pred is monotone decreasing; lo-1 if none."""
    if not pred(lo):
        return lo - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if pred(mid) else (lo, mid - 1)
    return lo


def plan(model: str | ModelShape, device: str, context: int, concurrency: int, quant: str,
         memory_gb: float | None = None, prefill_chunk: int = DEFAULT_PREFILL_CHUNK) -> Plan:
    """Estimate the memory of serving `model` and whether it fits `device`.

    memory_gb (GiB) overrides the device's memory: a GPU shared with a display, or a CPU box
    whose RAM is partly taken by other work.
    """
    s = model if isinstance(model, ModelShape) else load_shape(model)
    for name, value in (("context", context), ("concurrency", concurrency),
                        ("prefill_chunk", prefill_chunk)):
        if not isinstance(value, int) or value < 1:
            raise InvalidRequestError(f"{name} must be a positive integer, got {value!r}", param=name)
    if quant not in QUANTS:
        raise InvalidRequestError(f"unknown quant {quant!r}; choose one of {', '.join(QUANTS)}", param="quant")
    capacity, gpu = _capacity(device, memory_gb)
    w, kv, act, overhead = _total(s, quant, gpu, context, concurrency, prefill_chunk)
    total = w + kv + act + overhead
    fits = total <= capacity

    def fits_with(q: str = quant, ctx: int = context, conc: int = concurrency) -> bool:
        return sum(_total(s, q, gpu, ctx, conc, prefill_chunk)) <= capacity

    # Totals grow with concurrency and context, so binary search finds the limits; the upper
    # bounds only cap the search (the KV of one token is at least a few hundred bytes).
    per_token_kv = max(1, kv_cache_bytes(s, 1, 1, kv_dtype_bytes(quant, gpu)))
    max_conc = _max_int(lambda c: fits_with(conc=c), 1, max(1, capacity // (per_token_kv * context)) + 1)
    ctx_cap = max(1, capacity // (per_token_kv * concurrency)) + 1
    if s.max_context:
        ctx_cap = min(ctx_cap, max(s.max_context, context))  # never advise beyond what it was trained on
    max_ctx = _max_int(lambda n: fits_with(ctx=n), 1, ctx_cap)

    p = Plan(model=s.name, device=device, quant=quant, backend=backend_for(quant), context=context,
             concurrency=concurrency, prefill_chunk=min(prefill_chunk, context),
             params=count_params(s).total, kv_dtype=kv_dtype_name(quant, gpu),
             weights_bytes=w, kv_cache_bytes=kv, activation_bytes=act, overhead_bytes=overhead,
             total_bytes=total, capacity_bytes=capacity, fits=fits, headroom_bytes=capacity - total,
             max_concurrency=max(0, max_conc), max_context=max(0, max_ctx),
             model_max_context=s.max_context)

    if s.max_context and context > s.max_context:
        p.notes.append(f"context {context} is beyond the model's trained {s.max_context} tokens")
    if fits and p.headroom_bytes < 0.05 * capacity:
        p.notes.append("fits with under 5% headroom: fragmentation or a long prompt may still OOM")
    if not fits:
        p.advice.extend(_advice(s, p, fits_with))
    return p


def _advice(s: ModelShape, p: Plan, fits_with: Callable[..., bool]) -> list[str]:
    """Settings that fit: fewer sequences, a shorter context, a smaller quant."""
    out: list[str] = []
    if p.max_concurrency >= 1:
        out.append(f"use --concurrency {p.max_concurrency}: the most sequences that fit at context {p.context}")
    if p.max_context >= 1:
        ctx = p.max_context // 256 * 256 or p.max_context  # a round number is easier to configure
        out.append(f"use --context {ctx}: the longest context that fits {p.concurrency} sequence(s)")
    # The most precise lower quant that fits as asked; failing that, one that fits fewer sequences.
    # Quants of the same backend come first: switching backends means another checkpoint format.
    lower = [q for q in QUANTS[QUANTS.index(p.quant) + 1:]
             if weight_bytes(count_params(s), q) < p.weights_bytes]  # bf16 -> fp16 saves nothing
    lower.sort(key=lambda q: backend_for(q) != p.backend)  # stable: keeps precision order
    for q in lower:
        how = " (llama.cpp backend, GGUF file)" if q in LLAMACPP_QUANTS and p.backend != "llama.cpp" else ""
        if fits_with(q=q):
            out.insert(0, f"use --quant {q}{how}: fits at context {p.context} x {p.concurrency}")
            break
        conc = _max_int(lambda c: fits_with(q=q, conc=c), 1, p.concurrency)
        if conc >= 1:
            out.append(f"use --quant {q}{how} --concurrency {conc}: fits at context {p.context}")
            break
    if not out:
        fixed = p.weights_bytes + p.overhead_bytes
        out.append(f"in {p.quant}, weights and runtime overhead alone need {fixed / GiB:.1f} GiB of "
                   f"{p.capacity_bytes / GiB:.1f} GiB, and no lower quant fits one sequence: use a "
                   f"device with more memory, or split the model over several GPUs")
    return out


def format_plan(p: Plan) -> str:
    """A readable table of the plan."""
    gib = lambda n: f"{n / GiB:9.2f} GiB"  # noqa: E731
    lines = [
        f"{p.model} on {p.device}: quant {p.quant}, context {p.context} x {p.concurrency} sequence(s)",
        f"backend {p.backend}, {p.params / 1e9:.3f} B parameters, KV in {p.kv_dtype}, "
        f"prefill chunk {p.prefill_chunk} tokens",
        "",
        f"  {'weights':<20}{gib(p.weights_bytes)}",
        f"  {'KV cache':<20}{gib(p.kv_cache_bytes)}",
        f"  {'activations':<20}{gib(p.activation_bytes)}   (peak of one step, logits included)",
        f"  {'runtime overhead':<20}{gib(p.overhead_bytes)}",
        f"  {'-' * 33}",
        f"  {'total':<20}{gib(p.total_bytes)}",
        f"  {'device memory':<20}{gib(p.capacity_bytes)}",
        f"  {'headroom':<20}{gib(p.headroom_bytes)}   {'FITS' if p.fits else 'DOES NOT FIT'}",
        "",
        f"max concurrency at context {p.context}: {p.max_concurrency}",
        f"max context at concurrency {p.concurrency}: {p.max_context}"
        + (" (the model's limit)" if p.max_context and p.max_context == p.model_max_context else ""),
    ]
    lines += [f"note: {n}" for n in p.notes]
    lines += [f"advice: {a}" for a in p.advice]
    return "\n".join(lines)
