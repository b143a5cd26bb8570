"""Supervised fine-tuning (instruction tuning): full, LoRA or QLoRA, loss on assistant tokens only.

    hearth train sft --config training/recipes/sft_lora.yaml
    hearth train sft --config training/recipes/sft_lora.yaml --resume            # after a crash
    hearth train sft --config training/recipes/sft_qlora.yaml max_steps=20 output_dir=runs/q
    deepspeed --num_gpus 2 -m hearth.clients.cli train sft --config training/recipes/sft_full.yaml \
        deepspeed=training/deepspeed/zero2.json                                    # multi-GPU, ZeRO

Data: Alpaca/BELLE, OpenAI `messages` or ShareGPT `conversations` JSONL (hearth.training.data), rendered
with the model's chat template, as `data: [files]`, or as a mixture of `sources`, each with a share (`weight`)
or a number of passes (`epochs`), chat sets beside plain-text corpora (`kind: text`) trained with the loss on
every token, OPT-IML's way of keeping the pretrained skills (training/recipes/sft_mixture.yaml).
On one device a plain loop trains (AdamW, warmup + cosine, gradient
accumulation, autocast in bf16/fp16 where the GPU has it); with `deepspeed` set, transformers' Trainer
runs the same data under DeepSpeed ZeRO (CUDA only).

Output in `output_dir`: full → the fine-tuned checkpoint; lora/qlora → the adapter in `<out>/adapter`
(adapter_model.safetensors + adapter_config.json) and, with `merge: true`, the merged full weights as the
checkpoint (a QLoRA adapter is merged into the NF4-rounded base it was trained against). Beside it:
hearth.json (stage sft, method sft-full|sft-lora|sft-qlora, parent pinned by hash, data hashes),
metrics.jsonl, loss.png and checkpoints/step-N for --resume.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from hearth.runtime.chat_template import DEFAULT_CHATML_TEMPLATE
from hearth.runtime.registry import DEFAULT_MODEL, resolve_model

from .common import (MetricsLog, RunDir, TrainingConfigError, bundled, config_to_dict, gptqmodel_only_if_needed,
                     peak_memory_mb, pick_precision, plot_metrics, progress, publish, reset_peak_rss, say,
                     StepClock, stage_manifest, training_peak_mb, warmup_count)
from .data import ChatCollator, epoch_order, load_chat_files, load_chats, load_texts, render_chats, split_eval
from .mixture import (ExampleSource, PackedSource, effective_epochs, format_mixture, mixture_counts,
                      mixture_schedule)

# every linear projection of a LLaMA-family decoder block (attention and MLP)
LLAMA_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TRAINABLE_FILE = "trainable.safetensors"
OPTIMIZER_FILE = "optimizer.pt"


DEFAULT_DATA = "training/data/instructions.jsonl"


@dataclass
class Source:
    """One data set of an SFT mixture."""

    path: str
    """The file: chat records (kind chat) or a corpus (kind text: .txt documents separated by blank lines,
    or .jsonl with a "text" field)."""
    kind: Literal["chat", "text"] = "chat"
    """chat: Alpaca/BELLE, messages or ShareGPT records, loss on the assistant tokens only. text: plain text
    packed into language-model examples with the loss on every token (OPT-IML mixes pretraining text into
    instruction tuning so the model keeps what it learned in pretraining)."""
    weight: float | None = None
    """Share of the examples drawn from this source. Beside sources with `epochs` it is a fraction of the
    whole mixture (0.05: one example in twenty); when every source has a weight they are relative shares
    (as pretrain's weights) of `epochs` passes over all the examples."""
    epochs: float | None = None
    """Passes over this source per run (0.5: half of it, 3: each example three times). A source with
    neither weight nor epochs is taken `epochs` times (the run's field)."""
    name: str | None = None
    """Label in the mixture table and the metrics; the file name without suffix by default."""
    block_size: int | None = None
    """Text sources: tokens per language-model example, packed as pretraining packs (default max_length)."""

    def __post_init__(self) -> None:
        if self.weight is not None and self.epochs is not None:
            raise ValueError(f"sources: {self.path}: give weight or epochs, not both")
        for key in ("weight", "epochs"):
            value = getattr(self, key)
            if value is not None and not (value > 0 and math.isfinite(value)):
                raise ValueError(f"sources: {self.path}: {key} must be a positive number; got {value}")
        if self.block_size is not None and self.block_size < 2:
            raise ValueError(f"sources: {self.path}: block_size must be >= 2; got {self.block_size}")
        self.name = self.name or Path(self.path).stem
        self.path = bundled(self.path)


@dataclass
class Config:
    """One SFT run; `training/recipes/sft_*.yaml` mirror it."""

    model: str = DEFAULT_MODEL
    """A registered model name or a checkpoint directory (HF safetensors layout)."""
    data: list[str] | None = None
    """Chat data files (JSONL or JSON arrays; Alpaca/BELLE, OpenAI messages, ShareGPT), all taken `epochs`
    times; default the bundled training/data/instructions.jsonl unless `sources` is given."""
    sources: list[Source] | None = None
    """A mixture instead of `data`: each source a path with a kind (chat, or text trained on every token)
    and a weight or a number of epochs; see training/recipes/sft_mixture.yaml."""
    output_dir: str = "runs/sft"
    method: Literal["full", "lora", "qlora", "dora", "ia3", "prefix", "ptuning_v2", "prompt", "ptuning"] = "lora"
    """full: every weight; lora / qlora (on an NF4 base) / dora (LoRA with weight decomposition): low-rank
    adapters; ia3: learned scalings of keys, values and the MLP; prefix (= ptuning_v2, ChatGLM's P-tuning
    v2): trained key/value prefixes in every layer; prompt: trained virtual input tokens; ptuning: virtual
    tokens from a small prompt encoder (P-tuning v1). The first five merge into the weights; prefix,
    prompt and ptuning stay adapters (they add tokens, not weight changes)."""
    num_virtual_tokens: int = 20
    """prefix / ptuning_v2 / prompt / ptuning: how many virtual tokens are trained."""
    ia3_target_modules: list[str] = field(default_factory=lambda: ["k_proj", "v_proj", "down_proj"])
    """ia3: the modules whose outputs (inputs, for down_proj) get a learned scaling."""
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_target_modules: list[str] = field(default_factory=lambda: list(LLAMA_PROJECTIONS))
    """Module names LoRA adapts; the default is every linear projection of a LLaMA-family block."""
    learning_rate: float = 2e-4
    epochs: int = 1
    max_steps: int | None = None
    """Optimizer steps; overrides `epochs` when set."""
    batch_size: int = 4
    gradient_accumulation_steps: int = 1
    """Micro-batches per optimizer step (effective batch = batch_size * gradient_accumulation_steps)."""
    max_length: int = 512
    """Tokens per example; longer conversations are cut at the end."""
    warmup_steps: float = 0.03
    """Linear warmup: below 1 a fraction of the total steps, else a number of steps."""
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    gradient_checkpointing: bool = False
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """auto: bf16 on GPUs that have it, fp16 on older GPUs, fp32 on CPU."""
    device: str = "auto"
    save_every: int = 50
    """Write a resumable checkpoint every this many steps; the last step is always checkpointed."""
    keep_checkpoints: int = 2
    eval_fraction: float = 0.0
    """Fraction of the examples held out for eval_loss (0: no eval split)."""
    eval_every: int | None = None
    """Steps between evaluations (default: save_every); one more at the end."""
    merge: bool = True
    """After LoRA/QLoRA also publish the merged full weights as the checkpoint."""
    deepspeed: str | None = None
    """A DeepSpeed ZeRO config JSON (training/deepspeed/zero2.json, zero3.json): train through
    transformers' Trainer under DeepSpeed. Needs CUDA."""

    def __post_init__(self) -> None:
        if self.data is not None and self.sources is not None:
            raise ValueError("give data (files taken `epochs` times) or sources (a mixture), not both")
        if self.sources is not None:
            if not self.sources:
                raise ValueError("sources: give at least one source")
            names = [s.name for s in self.sources]
            if len(set(names)) != len(names):
                raise ValueError(f"sources: names must differ (give each a name); got {names}")
            if all(s.kind == "text" for s in self.sources):
                raise ValueError("sources: give at least one chat source (use `hearth train pretrain` for text alone)")
        else:
            if self.data is None:
                self.data = [DEFAULT_DATA]
            if not self.data:
                raise ValueError("data: give at least one data file")
            self.data = [bundled(p) for p in self.data]
        for name in ("lora_r", "lora_alpha", "epochs", "batch_size", "gradient_accumulation_steps", "max_length",
                     "save_every",
                     "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1 (or null to train for `epochs`); got {self.max_steps}")
        if self.eval_every is not None and self.eval_every < 1:
            raise ValueError(f"eval_every must be >= 1; got {self.eval_every}")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout must be in [0, 1); got {self.lora_dropout}")
        if not 0 <= self.eval_fraction < 1:
            raise ValueError(f"eval_fraction must be in [0, 1); got {self.eval_fraction}")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0; got {self.learning_rate}")
        if self.warmup_steps < 0 or self.weight_decay < 0 or self.max_grad_norm < 0:
            raise ValueError("warmup_steps, weight_decay and max_grad_norm must be >= 0")
        if self.method in ("lora", "qlora", "dora") and not self.lora_target_modules:
            raise ValueError("lora_target_modules: LoRA needs at least one module name")
        if self.method == "ia3" and not self.ia3_target_modules:
            raise ValueError("ia3_target_modules: IA3 needs at least one module name")
        if not 1 <= self.num_virtual_tokens <= 512:
            raise ValueError(f"num_virtual_tokens must be in [1, 512]; got {self.num_virtual_tokens}")


# methods whose trained parameters fold into the base weights (merge_and_unload); the others add tokens
MERGEABLE = ("lora", "qlora", "dora", "ia3")


# ----------------------------------------------------------------------------- helpers


def _dtype(precision: str):
    import torch
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]


def _bnb_config(compute_dtype):
    from transformers import BitsAndBytesConfig
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype)


def _load_model(cfg: Config, base: Path, device: str, precision: str):
    """The model to train: full weights in fp32 (autocast does the low-precision math), a frozen base in
    the compute dtype under LoRA adapters, or an NF4 base under LoRA adapters (QLoRA)."""
    import torch
    from transformers import AutoModelForCausalLM

    compute = _dtype(precision)
    kw: dict[str, Any] = {"local_files_only": True, "use_safetensors": True}
    if cfg.method == "qlora":
        try:
            import bitsandbytes  # noqa: F401  (fail here with a clear message, not deep in transformers)
        except ImportError:
            raise TrainingConfigError("method: qlora needs bitsandbytes (pip install bitsandbytes)") from None
        model = AutoModelForCausalLM.from_pretrained(base, quantization_config=_bnb_config(compute), dtype=compute,
                                                     device_map={"": device}, **kw)
    else:
        dtype = torch.float32 if cfg.method == "full" else compute
        model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype, **kw).to(device)
    model.config.use_cache = False  # no KV cache while training; it conflicts with checkpointing
    if cfg.method == "full":
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return model
    from peft import get_peft_model, prepare_model_for_kbit_training

    if cfg.method == "qlora":
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=cfg.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False})
    elif cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    try:
        return get_peft_model(model, _peft_config(cfg))
    except ValueError as e:  # peft: none of the target modules exist in this model
        field_name = "ia3_target_modules" if cfg.method == "ia3" else "lora_target_modules"
        raise TrainingConfigError(f"{field_name} {getattr(cfg, field_name)}: {e}") from None


def _peft_config(cfg: Config):
    """peft's config for the method (everything but full)."""
    import peft

    if cfg.method in ("lora", "qlora", "dora"):
        return peft.LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                               target_modules=list(cfg.lora_target_modules), bias="none", task_type="CAUSAL_LM",
                               use_dora=cfg.method == "dora")
    if cfg.method == "ia3":
        mlp = [m for m in cfg.ia3_target_modules if m in ("down_proj", "fc2", "w2", "dense_4h_to_h")]
        return peft.IA3Config(target_modules=list(cfg.ia3_target_modules), feedforward_modules=mlp,
                              task_type="CAUSAL_LM")
    if cfg.method in ("prefix", "ptuning_v2"):
        return peft.PrefixTuningConfig(num_virtual_tokens=cfg.num_virtual_tokens, task_type="CAUSAL_LM")
    if cfg.method == "prompt":
        return peft.PromptTuningConfig(num_virtual_tokens=cfg.num_virtual_tokens, task_type="CAUSAL_LM")
    return peft.PromptEncoderConfig(num_virtual_tokens=cfg.num_virtual_tokens, task_type="CAUSAL_LM")  # ptuning


def _lr_at(step: int, total: int, cfg: Config) -> float:
    """Linear warmup, then cosine decay to a tenth of the peak."""
    warm = warmup_count(cfg.warmup_steps, total)
    if step < warm:
        return cfg.learning_rate * (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return cfg.learning_rate * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def _token_loss(model, batch: dict[str, Any]):
    """Sum of next-token cross-entropy over labelled tokens, and their count."""
    import torch.nn.functional as F

    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, T, V)
    logits = logits[:, -batch["input_ids"].size(1):]  # prompt / ptuning put their virtual tokens first
    labels = batch["labels"][:, 1:]  # (B, T-1): token t+1 is predicted at position t
    loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.size(-1)), labels.reshape(-1),
                           ignore_index=-100, reduction="sum")
    return loss, int((labels != -100).sum())


def _evaluate(model, rows, collate, cfg: Config, device: str, autocast) -> float:
    import torch

    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(rows), cfg.batch_size):
            batch = {k: v.to(device) for k, v in collate(rows[i:i + cfg.batch_size]).items()}
            with autocast():
                loss, n = _token_loss(model, batch)
            total += float(loss)
            count += n
    model.train(was_training)
    return total / max(1, count)


def _trainable(model) -> dict[str, Any]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _save_checkpoint(run: RunDir, step: int, model, opt, scaler, state: dict[str, Any]) -> Path:
    import torch
    from safetensors.torch import save_file

    def fill(tmp: Path) -> None:
        save_file({n: p.detach().contiguous().cpu() for n, p in _trainable(model).items()}, tmp / TRAINABLE_FILE)
        extra = {"optimizer": opt.state_dict()}
        if scaler is not None:
            extra["scaler"] = scaler.state_dict()
        torch.save(extra, tmp / OPTIMIZER_FILE)

    return run.save_checkpoint(step, fill, state)


def _load_checkpoint(path: Path, model, opt, scaler) -> None:
    import torch
    from safetensors.torch import load_file

    saved = load_file(path / TRAINABLE_FILE)
    params = _trainable(model)
    if set(saved) != set(params):
        missing, extra = sorted(set(params) - set(saved))[:3], sorted(set(saved) - set(params))[:3]
        raise TrainingConfigError(f"checkpoint {path} does not fit this config (method or lora_target_modules "
                                  f"changed?): missing {missing}, unexpected {extra}")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(saved[n].to(p.device, p.dtype))
    extra = torch.load(path / OPTIMIZER_FILE, map_location="cpu", weights_only=True)
    opt.load_state_dict(extra["optimizer"])
    if scaler is not None and "scaler" in extra:
        scaler.load_state_dict(extra["scaler"])


# ----------------------------------------------------------------------------- publishing


def merge_adapter(base: Path, adapter_dir: Path, qlora: bool):
    """Base + adapter folded into plain weights, in the base's dtype on CPU. For QLoRA each quantized
    linear is first rounded through NF4 exactly as training saw it, so the merge computes what was trained.
    A prefix / prompt / P-tuning adapter cannot be folded in: TrainingConfigError names its method."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    check_mergeable(adapter_dir)

    kw: dict[str, Any] = {"local_files_only": True, "use_safetensors": True}
    model = AutoModelForCausalLM.from_pretrained(base, dtype="auto", **kw)
    if qlora:
        import bitsandbytes as bnb
        import bitsandbytes.functional as bnbf

        quant = AutoModelForCausalLM.from_pretrained(base, quantization_config=_bnb_config(model.dtype),
                                                     dtype=model.dtype, device_map={"": "cpu"}, **kw)
        rounded = {n: bnbf.dequantize_4bit(m.weight.data, m.weight.quant_state)
                   for n, m in quant.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
        with torch.no_grad():
            for n, m in model.named_modules():
                if n in rounded:
                    m.weight.copy_(rounded[n].to(m.weight.dtype))
        del quant
    return PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()


def check_mergeable(adapter_dir: Path) -> None:
    """TrainingConfigError when the peft adapter in `adapter_dir` adds virtual tokens (prefix tuning,
    P-tuning, prompt tuning) instead of weight changes, so no merged checkpoint can hold it."""
    try:
        kind = str(json.loads((Path(adapter_dir) / "adapter_config.json").read_text()).get("peft_type", ""))
    except (OSError, ValueError):
        return  # peft itself reports a broken adapter
    if kind.upper() in ("PREFIX_TUNING", "PROMPT_TUNING", "P_TUNING"):
        raise TrainingConfigError(f"a {kind} adapter adds virtual tokens and cannot be merged into weights; "
                                  "load it with peft (PeftModel.from_pretrained on its base), or train with "
                                  f"a mergeable method: {', '.join(MERGEABLE)}")


def _publish(cfg: Config, run: RunDir, base: Path, tokenizer, data_files: list[Path], metrics: dict[str, Any],
             save_full=None, save_adapter=None) -> Path:
    """The final model into output_dir: full weights (save_full(dir)) or the adapter (save_adapter(dir))
    plus, with merge, the merged weights; tokenizer and chat template; hearth.json."""

    def fill(tmp: Path) -> None:
        if save_full is not None:
            save_full(tmp)
        else:
            save_adapter(tmp / "adapter")
            if cfg.merge and cfg.method not in MERGEABLE:
                say(f"method {cfg.method} adds virtual tokens and cannot be merged into the weights: the output "
                    "is the adapter (adapter/), loaded on its base through peft")
            elif cfg.merge:
                say("merging the adapter into the base weights")
                merged = merge_adapter(base, tmp / "adapter", cfg.method == "qlora")
                merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)

    params = config_to_dict(cfg)
    params["base"] = str(base)
    manifest = stage_manifest("sft", f"sft-{cfg.method}", base, params, data_files, metrics)
    return publish(run.out, fill, manifest)


def _report(metrics: dict[str, Any]) -> None:
    mem = ", ".join(f"{k} {v:.0f}" for k, v in peak_memory_mb().items())
    say(f"done: {metrics.get('train_tokens_per_s', 0):.1f} training tokens/s; peak memory (MB): {mem}")


# ----------------------------------------------------------------------------- mixtures


class MixtureRows:
    """The training examples of a `sources` mixture in training order: item k is (input_ids, labels) of the
    k-th scheduled draw. Chat rows carry labels on assistant tokens only; text blocks carry labels on every
    token. Items are built when asked for, so a long run never holds its whole schedule's tensors."""

    def __init__(self, sources: list[Any], kinds: list[str], schedule: list[tuple[int, int]], steps: int,
                 eval_rows: list[tuple[list[int], list[int]]]):
        self.sources, self.kinds, self.schedule, self.steps, self.eval_rows = sources, kinds, schedule, steps, eval_rows
        self.counts = [0] * len(sources)
        for s, _ in schedule:
            self.counts[s] += 1
        self.table = {name: dict(row, kind=kind) for (name, row), kind in
                      zip(effective_epochs(sources, schedule).items(), kinds)}
        """Per source: kind, examples drawn (items), tokens in it, tokens drawn, effective epochs."""

    def __len__(self) -> int:
        return len(self.schedule)

    def __getitem__(self, k: int) -> tuple[list[int], list[int]]:
        s, i = self.schedule[k]
        item = self.sources[s].item(i)
        return (item, list(item)) if self.kinds[s] == "text" else item


def mixture_rows(cfg: Config, tokenizer: Any) -> MixtureRows:
    """The `sources` of `cfg` rendered, held out (chat sources, eval_fraction) and scheduled: each source's
    examples per run from its weight or epochs (hearth.training.mixture.mixture_counts), interleaved by
    mixture_schedule over the run's steps, every micro-batch full."""
    built, kinds, sizes, eval_rows = [], [], [], []
    for i, src in enumerate(cfg.sources or []):
        path = Path(src.path)
        if not path.is_file():
            raise TrainingConfigError(f"sources[{i}].path: no file at {src.path}")
        if src.kind == "text":
            if tokenizer.eos_token_id is None:
                raise TrainingConfigError("model: its tokenizer has no eos_token to separate text documents")
            ids = tokenizer(load_texts(path), add_special_tokens=False)["input_ids"]
            built.append(PackedSource(src.name, ids, tokenizer.eos_token_id, src.block_size or cfg.max_length,
                                      cfg.seed))
        else:
            rows = render_chats(tokenizer, load_chats(path), cfg.max_length)
            if not rows:
                raise TrainingConfigError(f"sources[{i}]: no example of {src.path} fits max_length={cfg.max_length}")
            train_idx, eval_idx = split_eval(len(rows), cfg.eval_fraction, cfg.seed)
            eval_rows += [rows[j] for j in eval_idx]
            built.append(ExampleSource(src.name, [rows[j] for j in train_idx], cfg.seed))
        kinds.append(src.kind)
        sizes.append(built[-1].size)
    weighted_only = all(s.weight is not None for s in cfg.sources or [])
    epochs = [s.epochs if s.epochs is not None or s.weight is not None else float(cfg.epochs)
              for s in cfg.sources or []]
    try:
        counts = mixture_counts(sizes, [s.weight for s in cfg.sources or []], epochs)
    except ValueError as e:
        raise TrainingConfigError(str(e)) from None
    if weighted_only:
        counts = [c * cfg.epochs for c in counts]
    per_step = cfg.batch_size * cfg.gradient_accumulation_steps
    steps = cfg.max_steps or max(1, math.ceil(sum(counts) / per_step))
    return MixtureRows(built, kinds, mixture_schedule(counts, steps * per_step, cfg.seed), steps, eval_rows)


# ----------------------------------------------------------------------------- the run


def run(config: Config, resume: bool = False) -> Path:
    """Fine-tune `config.model` on `config.data`; returns the output checkpoint directory."""
    with gptqmodel_only_if_needed(config.model):
        return _run(config, resume)


def _run(config: Config, resume: bool) -> Path:
    import torch
    from transformers import AutoTokenizer

    cfg = config
    base = resolve_model(cfg.model, prefer="hf")
    data_files = [Path(s.path) for s in cfg.sources] if cfg.sources is not None else [Path(p) for p in cfg.data]
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.deepspeed and not device.startswith("cuda"):
        raise TrainingConfigError(f"deepspeed: {cfg.deepspeed} needs CUDA GPUs and none is available; "
                                  "remove `deepspeed` to train on this device")
    precision = pick_precision(device, cfg.precision)
    if precision != "fp32" and not device.startswith("cuda"):
        raise TrainingConfigError(f"precision: {precision} training needs a GPU; use fp32 or auto on {device}")

    tokenizer = AutoTokenizer.from_pretrained(base, local_files_only=True)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not tokenizer.chat_template:  # render, and ship, the template the runtime assumes for such models
        say(f"{base} has no chat template; training with ChatML")
        tokenizer.chat_template = DEFAULT_CHATML_TEMPLATE
    mixture = None
    if cfg.sources is not None:
        mixture = mixture_rows(cfg, tokenizer)
        train_rows, eval_rows, total = mixture, mixture.eval_rows, mixture.steps
        print(format_mixture(mixture.counts, mixture.table), flush=True)
    else:
        rows = render_chats(tokenizer, load_chat_files(data_files), cfg.max_length)
        if not rows:
            raise TrainingConfigError(f"data: no example fits max_length={cfg.max_length}")
        train_idx, eval_idx = split_eval(len(rows), cfg.eval_fraction, cfg.seed)
        train_rows, eval_rows = [rows[i] for i in train_idx], [rows[i] for i in eval_idx]
        total = cfg.max_steps or math.ceil(cfg.epochs * math.ceil(len(train_rows) / cfg.batch_size)
                                           / cfg.gradient_accumulation_steps)
    micro_per_epoch = math.ceil(len(train_rows) / cfg.batch_size)
    say(f"{cfg.method} fine-tuning of {cfg.model} on {len(train_rows)} examples ({len(eval_rows)} held out), "
        f"{total} steps, {precision} on {device}")

    run_dir = RunDir(cfg.output_dir, keep=cfg.keep_checkpoints)
    start = run_dir.latest() if resume else None
    if resume and start is None:
        say(f"no checkpoint in {run_dir.checkpoints}; starting from step 0")
    if not resume and run_dir.checkpoints.exists():
        shutil.rmtree(run_dir.checkpoints)  # a fresh run must never resume from an older run's steps
    if cfg.deepspeed:
        return _run_deepspeed(cfg, run_dir, base, tokenizer, train_rows, eval_rows, data_files, total,
                              precision, resume)

    torch.manual_seed(cfg.seed)  # LoRA's A matrices start random: same seed, same run
    model = _load_model(cfg, base, device, precision)
    model.train()
    params = _trainable(model)
    rss_loaded = reset_peak_rss()
    decay = [p for p in params.values() if p.dim() >= 2]
    no_decay = [p for p in params.values() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.learning_rate)
    scaler = torch.amp.GradScaler(device) if precision == "fp16" else None
    dev_type = torch.device(device).type

    def autocast():
        return torch.autocast(dev_type, dtype=_dtype(precision), enabled=precision != "fp32")

    step = 0
    if start is not None:
        _load_checkpoint(start.path, model, opt, scaler)
        step = start.step
        say(f"resuming from {start.path} (step {step} of {total})")
    log = MetricsLog(run_dir.metrics, resume_step=step if start is not None else None)
    collate = ChatCollator(tokenizer.pad_token_id)
    eval_every = cfg.eval_every or cfg.save_every
    orders: dict[int, list[int]] = {}

    def micro_batch(m: int):
        if mixture is not None:  # the mixture is already in training order
            return collate([mixture[k] for k in range(m * cfg.batch_size, (m + 1) * cfg.batch_size)])
        # micro-batch m of the whole run: its epoch's seeded order, sliced; resume recomputes the same
        epoch, b = divmod(m, micro_per_epoch)
        if epoch not in orders:
            orders.clear()
            orders[epoch] = epoch_order(len(train_rows), cfg.seed, epoch)
        idx = orders[epoch][b * cfg.batch_size:(b + 1) * cfg.batch_size]
        return collate([train_rows[i] for i in idx])

    tokens, t0, eval_loss = 0, time.perf_counter(), None
    loss_value = float(start.state.get("loss", "nan")) if start is not None else float("nan")
    bar = progress(total, f"sft-{cfg.method}", unit="step", initial=step)
    while step < total:
        clock = StepClock()
        torch.manual_seed(cfg.seed * 1_000_003 + step)  # dropout masks depend on the step: resume repeats them
        batches = [micro_batch(step * cfg.gradient_accumulation_steps + k)
                   for k in range(cfg.gradient_accumulation_steps)]
        n_labels = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
        lr = _lr_at(step, total, cfg)
        for g in opt.param_groups:
            g["lr"] = lr
        loss_sum = 0.0
        for b in batches:
            b = {k: v.to(device) for k, v in b.items()}
            with autocast():
                loss, _ = _token_loss(model, b)
            loss = loss / max(1, n_labels)  # mean over the step's labelled tokens, not per micro-batch
            (scaler.scale(loss) if scaler else loss).backward()
            loss_sum += loss.detach().item()
            tokens += int(b["attention_mask"].sum())
        if scaler:
            scaler.unscale_(opt)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(list(params.values()), cfg.max_grad_norm or float("inf")))
        if scaler:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        loss_value = loss_sum
        record: dict[str, Any] = {"step": step, "loss": loss_value, "lr": lr, "grad_norm": grad_norm, **clock.read()}
        if eval_rows and (step % eval_every == 0 or step == total):
            eval_loss = _evaluate(model, eval_rows, collate, cfg, device, autocast)
            record["eval_loss"] = eval_loss
        log.log(**record)
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.4f}")
        if step % cfg.save_every == 0 or step == total:  # the last step too: --resume max_steps=N continues it
            _save_checkpoint(run_dir, step, model, opt, scaler, {"loss": loss_value, "total_steps": total})
    bar.close()
    elapsed = time.perf_counter() - t0
    plot_metrics(run_dir.metrics, run_dir.plot, title=f"sft-{cfg.method}")

    metrics: dict[str, Any] = {"final_loss": loss_value, "steps": total,
                               "train_tokens_per_s": tokens / elapsed if elapsed > 0 else 0.0,
                               "examples": len(train_rows), **peak_memory_mb(), **training_peak_mb(rss_loaded),
                               "trainable_params": sum(p.numel() for p in params.values())}
    if eval_loss is not None:
        metrics["eval_loss"] = eval_loss
    if mixture is not None:
        metrics["mixture"] = mixture.table
    if cfg.method == "full":
        def save_full(d: Path) -> None:
            model.save_pretrained(d, safe_serialization=True)
        out = _publish(cfg, run_dir, base, tokenizer, data_files, metrics, save_full=save_full)
    else:
        out = _publish(cfg, run_dir, base, tokenizer, data_files, metrics,
                       save_adapter=lambda d: model.save_pretrained(d, safe_serialization=True))
    _report(metrics)
    return out


# ----------------------------------------------------------------------------- multi-GPU (DeepSpeed)


def _run_deepspeed(cfg: Config, run_dir: RunDir, base: Path, tokenizer, train_rows, eval_rows,
                   data_files: list[Path], total: int, precision: str, resume: bool) -> Path:
    """The same data and model under transformers' Trainer with DeepSpeed ZeRO (launch with `deepspeed`
    or `accelerate launch` for several GPUs). Trainer keeps its own checkpoints in <out>/checkpoints/trainer."""
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    try:
        import deepspeed  # noqa: F401
    except ImportError:
        raise TrainingConfigError("deepspeed: the deepspeed package is not installed (pip install deepspeed)") from None
    ds_config = Path(cfg.deepspeed).expanduser()
    if not ds_config.is_file():
        bundled = Path(__file__).resolve().parent / "deepspeed" / ds_config.name
        if not bundled.is_file():
            raise TrainingConfigError(f"deepspeed: no DeepSpeed config at {ds_config}")
        ds_config = bundled
    device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    torch.manual_seed(cfg.seed)
    model = _load_model(cfg, base, device if cfg.method == "qlora" else "cpu", precision)
    trainer_dir = run_dir.checkpoints / "trainer"  # under checkpoints/, which publish leaves alone
    warm = warmup_count(cfg.warmup_steps, total)
    args = TrainingArguments(
        output_dir=str(trainer_dir), per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size, gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        learning_rate=cfg.learning_rate, max_steps=total, warmup_steps=warm, weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm, lr_scheduler_type="cosine", seed=cfg.seed, data_seed=cfg.seed,
        bf16=precision == "bf16", fp16=precision == "fp16",
        gradient_checkpointing=cfg.gradient_checkpointing and cfg.method != "qlora",
        gradient_checkpointing_kwargs={"use_reentrant": False}, deepspeed=str(ds_config),
        logging_steps=1, save_steps=cfg.save_every, save_total_limit=cfg.keep_checkpoints,
        eval_strategy="steps" if eval_rows else "no", eval_steps=cfg.eval_every or cfg.save_every,
        report_to=[], remove_unused_columns=False, disable_tqdm=False)
    saved = sorted((int(p.name.split("-")[1]), p) for p in trainer_dir.glob("checkpoint-*")
                   if p.name.split("-")[1].isdigit())
    if not resume and trainer_dir.exists():
        shutil.rmtree(trainer_dir)  # a fresh run must never resume from an older run's steps
    resume_from = str(saved[-1][1]) if resume and saved else None
    log = MetricsLog(run_dir.metrics, resume_step=saved[-1][0] if resume_from else None)

    class Metrics(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            if state.is_world_process_zero and logs:
                log.log(step=state.global_step, **{k: v for k, v in logs.items() if isinstance(v, (int, float))})

    as_dicts = lambda rs: [{"input_ids": x, "labels": y} for x, y in rs]  # noqa: E731
    trainer = Trainer(model=model, args=args, train_dataset=as_dicts(train_rows),
                      eval_dataset=as_dicts(eval_rows) or None, data_collator=ChatCollator(tokenizer.pad_token_id),
                      callbacks=[Metrics()])
    t0 = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=resume_from)
    elapsed = time.perf_counter() - t0
    final = trainer_dir / "final"
    trainer.save_model(str(final))  # collective under ZeRO-3: every rank takes part in gathering weights
    if not trainer.is_world_process_zero():
        return run_dir.out
    plot_metrics(run_dir.metrics, run_dir.plot, keys=("loss", "eval_loss"), title=f"sft-{cfg.method}")
    # examples seen x mean example length (Trainer does not count tokens itself)
    seen = (total - (saved[-1][0] if resume_from else 0)) * cfg.batch_size * cfg.gradient_accumulation_steps * \
        int(os.environ.get("WORLD_SIZE", 1))
    n_tokens = seen * sum(len(x) for x, _ in train_rows) / len(train_rows)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    metrics = {"final_loss": losses[-1] if losses else result.training_loss, "steps": total, "train_tokens_per_s": n_tokens / elapsed,
               "examples": len(train_rows), "deepspeed": ds_config.name, **peak_memory_mb()}

    def copy_from(src: Path):
        def fill(d: Path) -> None:
            d.mkdir(parents=True, exist_ok=True)
            for f in src.iterdir():
                if f.is_file() and f.suffix in (".safetensors", ".json"):
                    shutil.copy2(f, d / f.name)
        return fill

    if cfg.method == "full":
        out = _publish(cfg, run_dir, base, tokenizer, data_files, metrics, save_full=copy_from(final))
    else:
        out = _publish(cfg, run_dir, base, tokenizer, data_files, metrics, save_adapter=copy_from(final))
    _report(metrics)
    return out
