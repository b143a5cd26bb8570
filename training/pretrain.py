"""Pretrain stage: a causal LM from scratch (an architecture given in the recipe, e.g. a tiny LLaMA) or continued
from a checkpoint, on plain-text corpora packed into fixed-length blocks and mixed by sampling weights.

    hearth train pretrain --config training/recipes/pretrain_tiny.yaml
    hearth train pretrain --config training/recipes/pretrain_continue.yaml --resume max_steps=40

Packing: each source is an endless token stream, its documents in a seeded order per epoch, each followed by
EOS; block i is tokens [i*L, (i+1)*L) of it, so nothing is padded or cut away (a document's tail opens the next
block, an epoch's tail runs into the next epoch). Mixing (GPT-3 style): each block is sampled from a source
by its weight, kept within about one block of the weighted share at every step, and the effective epochs per
source (tokens drawn from it / tokens in it) are printed before training starts. Which block
trains at which step depends only on the seed and the step, so `--resume` from a checkpoint (weights, AdamW,
scheduler, RNG and grad-scaler state) ends at the same loss as an uninterrupted run.

Output: the model in HF layout with hearth.json (stage "pretrain", method "pretrain-scratch" without a parent,
or "pretrain-continue" naming the checkpoint it started from), metrics.jsonl, loss.png, and checkpoints/.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from hearth.training.common import (MetricsLog, RunDir, TrainingConfigError, bundled, config_to_dict, find_file,
                                    peak_memory_mb, pick_precision, plot_metrics, progress, publish, say,
                                    StepClock, stage_manifest, warmup_count)
from hearth.training.data import load_texts, split_eval
from hearth.training.mixture import PackedSource, effective_epochs, format_mixture, mixture_schedule  # noqa: F401

TRAINER_STATE = "trainer_state.pt"


@dataclass
class Source:
    """One corpus of the mixture."""

    path: str
    """A .txt (documents separated by blank lines) or .jsonl (a "text" field) corpus."""
    weight: float = 1.0
    """Share of the training blocks drawn from this source, relative to the other weights."""
    name: str | None = None
    """Label in tables and metrics; the file name without suffix by default."""

    def __post_init__(self) -> None:
        if not (self.weight > 0 and math.isfinite(self.weight)):
            raise ValueError(f"weight must be a positive number; got {self.weight}")
        self.name = self.name or Path(self.path).stem
        self.path = bundled(self.path)


@dataclass
class Config:
    """The pretrain recipe (training/recipes/pretrain_tiny.yaml and pretrain_continue.yaml mirror it)."""

    output_dir: str
    """Where the model, checkpoints/, metrics.jsonl and loss.png go."""
    sources: list[Source]
    """The corpora to mix, each with a path and a sampling weight."""
    model: str | None = None
    """Continue pretraining this checkpoint (a dir or a registered model name); leave empty to start from scratch."""
    tokenizer: str | None = None
    """From scratch: a tokenizer dir (e.g. the output of `hearth train tokenizer`) or a model whose tokenizer to use."""
    model_config: dict[str, Any] = field(default_factory=dict)
    """From scratch: the architecture as transformers config fields, `model_type` included
    (e.g. {model_type: llama, hidden_size: 64, num_hidden_layers: 2, ...}); vocab_size comes from the tokenizer."""
    block_size: int = 256
    """Tokens per training block (sequence length)."""
    batch_size: int = 8
    """Blocks per micro-batch."""
    gradient_accumulation_steps: int = 1
    max_steps: int = 100
    """Optimizer steps; each trains batch_size * gradient_accumulation_steps * block_size tokens."""
    learning_rate: float = 3e-4
    min_lr_ratio: float = 0.1
    """The cosine schedule ends at learning_rate * min_lr_ratio."""
    warmup_steps: float = 10
    """Linear warmup: below 1 a fraction of max_steps, else a number of steps."""
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this (0 turns clipping off)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, about a third more compute."""
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """Autocast precision; "auto" picks bf16 or fp16 on a GPU and fp32 on a CPU. Weights stay fp32."""
    device: str = "auto"
    """"auto" (CUDA when present), "cpu" or "cuda"."""
    eval_fraction: float = 0.1
    """Share of each source's documents held out (picked by the seed) for the eval loss."""
    eval_every: int = 50
    eval_max_blocks: int = 16
    """At most this many held-out blocks per source per evaluation."""
    save_every: int = 50
    """Write a checkpoint every this many steps and at the last one (0: only the final model)."""
    keep_checkpoints: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.sources:
            raise ValueError("sources: give at least one corpus")
        if self.model and (self.model_config or self.tokenizer):
            raise ValueError("model: continuing from a checkpoint uses its own architecture and tokenizer; "
                             "leave model_config and tokenizer empty (or drop model to start from scratch)")
        if not self.model:
            if not self.model_config:
                raise ValueError("model_config: starting from scratch needs an architecture "
                                 "(or set model to continue from a checkpoint)")
            if "model_type" not in self.model_config:
                raise ValueError("model_config: needs model_type (e.g. llama)")
            if not self.tokenizer:
                raise ValueError("tokenizer: starting from scratch needs a tokenizer dir")
        for name in ("block_size", "batch_size", "gradient_accumulation_steps", "max_steps", "eval_every",
                     "eval_max_blocks", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}")
        for name in ("warmup_steps", "save_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0; got {getattr(self, name)}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0; got {self.learning_rate}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1]; got {self.min_lr_ratio}")
        if not 0 <= self.eval_fraction < 1:
            raise ValueError(f"eval_fraction must be in [0, 1); got {self.eval_fraction}")
        if self.max_grad_norm < 0:
            raise ValueError(f"max_grad_norm must be >= 0; got {self.max_grad_norm}")
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names):
            raise ValueError(f"sources: names must differ (give each a name); got {names}")


# ----------------------------------------------------------------------------- packing and mixing
# (PackedSource, mixture_schedule and the epochs table live in training/mixture.py, shared with SFT)


def eval_blocks(docs: list[list[int]], eos_id: int, block_size: int, limit: int) -> list[list[int]]:
    """Held-out documents packed the same way (once through, in order); the last block may be shorter."""
    stream = [t for d in docs for t in list(d) + [eos_id]]
    blocks = [stream[i:i + block_size] for i in range(0, len(stream), block_size)]
    return [b for b in blocks if len(b) > 1][:limit]


# ----------------------------------------------------------------------------- model, optimizer, state


def _checkpoint_dir(name_or_path: str, field_name: str) -> Path:
    from hearth.runtime.errors import HearthError
    from hearth.runtime.registry import resolve_model

    try:
        path = resolve_model(name_or_path, prefer="hf")
    except HearthError as e:
        raise TrainingConfigError(f"{field_name}: {e}") from None
    if not path.is_dir():
        raise TrainingConfigError(f"{field_name}: {path} is not a checkpoint dir")
    return path


def _scratch_model(cfg: Config, tok: Any) -> Any:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = dict(cfg.model_config)
    model_type = fields.pop("model_type")
    vocab = len(tok)
    if fields.get("vocab_size", vocab) < vocab:
        raise TrainingConfigError(f"model_config.vocab_size: {fields['vocab_size']} is smaller than the "
                                  f"tokenizer's {vocab} tokens")
    fields.setdefault("vocab_size", vocab)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(tok, key)
        if value is not None:
            fields.setdefault(key, value)
    try:
        config = AutoConfig.for_model(model_type, **fields)
    except (ValueError, KeyError) as e:
        raise TrainingConfigError(f"model_config.model_type: {e}") from None
    if getattr(config, "max_position_embeddings", cfg.block_size) < cfg.block_size:
        raise TrainingConfigError(f"block_size: {cfg.block_size} exceeds model_config.max_position_embeddings "
                                  f"{config.max_position_embeddings}")
    torch.manual_seed(cfg.seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def _lr_lambda(cfg: Config):
    warm = warmup_count(cfg.warmup_steps, cfg.max_steps)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / (warm + 1)
        progress = min(1.0, (step - warm) / max(1, cfg.max_steps - warm))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


def _data_signature(cfg: Config) -> dict[str, Any]:
    """What fixes the block order and the model: a resumed run must agree on all of it."""
    return {"seed": cfg.seed, "block_size": cfg.block_size, "batch_size": cfg.batch_size,
            "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
            "sources": [[s.name, str(s.path), s.weight] for s in cfg.sources], "model": cfg.model,
            "tokenizer": cfg.tokenizer, "model_config": cfg.model_config, "eval_fraction": cfg.eval_fraction}


def _rng_state() -> dict[str, Any]:
    import torch
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    import torch
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------- the stage


def run(config: Config, resume: bool = False) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = config
    run_dir = RunDir(cfg.output_dir, keep=cfg.keep_checkpoints)
    latest = run_dir.latest()
    if latest is not None and not resume:
        raise TrainingConfigError(f"output_dir: {run_dir.out} holds checkpoints of an earlier run; pass --resume "
                                  "to continue it, or choose another output_dir")
    if resume and latest is None:
        say("no checkpoint to resume from; starting at step 0")
    if latest is not None:
        saved = latest.state.get("signature", {})
        for key, value in _data_signature(cfg).items():
            if saved.get(key) != _jsonish(value):
                raise TrainingConfigError(f"{key}: {value!r} differs from the checkpoint's {saved.get(key)!r}; "
                                          "a resumed run must keep the data and model settings")

    # tokenizer and model
    parent = _checkpoint_dir(cfg.model, "model") if cfg.model else None
    tok_dir = parent or _checkpoint_dir(cfg.tokenizer, "tokenizer")
    tok = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
    if tok.eos_token_id is None:
        raise TrainingConfigError(f"tokenizer: {tok_dir} has no eos_token to separate documents")
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    precision = pick_precision(device, cfg.precision)
    if latest is not None:
        model = AutoModelForCausalLM.from_pretrained(latest.path, dtype=torch.float32, local_files_only=True)
    elif parent is not None:
        model = AutoModelForCausalLM.from_pretrained(parent, dtype=torch.float32, local_files_only=True)
    else:
        model = _scratch_model(cfg, tok)
    rows = model.get_input_embeddings().weight.shape[0]
    if rows < len(tok):
        raise TrainingConfigError(f"model: {rows} embedding rows but the tokenizer has {len(tok)} tokens; "
                                  "extend the model with `hearth train tokenizer` (mode: extend) first")
    if getattr(model.config, "max_position_embeddings", cfg.block_size) < cfg.block_size:
        raise TrainingConfigError(f"block_size: {cfg.block_size} exceeds the model's max_position_embeddings "
                                  f"{model.config.max_position_embeddings}")
    if cfg.gradient_checkpointing:
        enable = getattr(model, "activation_checkpointing_enable", None)  # the name from transformers 5.x on
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    model.to(device)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())

    # data: held-out documents per source, the rest packed; the whole block schedule from the seed
    files = [find_file(s.path, f"sources[{i}].path") for i, s in enumerate(cfg.sources)]
    sources, held_out = [], {}
    for src, f in zip(cfg.sources, files):
        docs = load_texts(f)
        ids = tok(docs, add_special_tokens=False)["input_ids"]
        train_idx, eval_idx = split_eval(len(ids), cfg.eval_fraction, cfg.seed)
        sources.append(PackedSource(src.name, [ids[i] for i in train_idx], tok.eos_token_id, cfg.block_size, cfg.seed))
        if eval_idx:
            held_out[src.name] = eval_blocks([ids[i] for i in eval_idx], tok.eos_token_id, cfg.block_size,
                                             cfg.eval_max_blocks)
    per_step = cfg.batch_size * cfg.gradient_accumulation_steps
    weights = [s.weight for s in cfg.sources]
    schedule = mixture_schedule(weights, cfg.max_steps * per_step, cfg.seed)
    epochs = effective_epochs(sources, schedule)
    print(format_mixture(weights, epochs), flush=True)
    if not held_out and cfg.eval_fraction > 0:
        say("no source has two documents or more: no eval loss")

    def batch(step: int, micro: int) -> Any:
        first = (step * cfg.gradient_accumulation_steps + micro) * cfg.batch_size
        picks = schedule[first:first + cfg.batch_size]
        return torch.tensor([sources[s].block(i) for s, i in picks], dtype=torch.long, device=device)  # (B, L)

    # optimizer: no weight decay on norms and biases (1-D tensors)
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                            fused=device.startswith("cuda"))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg))
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" and device.startswith("cuda") else None
    start = 0
    if latest is not None:
        state = torch.load(latest.path / TRAINER_STATE, map_location=device, weights_only=True)
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        _set_rng_state(state["rng"])
        start = latest.step
        say(f"resuming from {latest.path} (step {start})")
    else:
        torch.manual_seed(cfg.seed)
    log = MetricsLog(run_dir.metrics, resume_step=start if latest is not None else None)

    def autocast():
        return torch.autocast(device_type=device.split(":")[0], dtype=amp_dtype, enabled=amp_dtype is not None)

    @torch.no_grad()
    def evaluate() -> dict[str, float]:
        model.eval()
        out, total, count = {}, 0.0, 0
        for name, blocks in held_out.items():
            s_loss, s_count = 0.0, 0
            for b in blocks:
                ids = torch.tensor([b], dtype=torch.long, device=device)
                with autocast():
                    loss = model(input_ids=ids, labels=ids).loss.float().item()
                s_loss += loss * (len(b) - 1)
                s_count += len(b) - 1
            out[f"eval_loss/{name}"] = s_loss / s_count
            total, count = total + s_loss, count + s_count
        model.train()
        if count:
            out["eval_loss"] = total / count
        return out

    def save(step: int) -> None:
        def fill(tmp: Path) -> None:
            model.save_pretrained(tmp, safe_serialization=True)
            tok.save_pretrained(tmp)
            torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                        "scaler": scaler.state_dict() if scaler else None, "rng": _rng_state()}, tmp / TRAINER_STATE)
        run_dir.save_checkpoint(step, fill, {"signature": _jsonish(_data_signature(cfg)), "max_steps": cfg.max_steps})

    say(f"{'continuing ' + str(parent) if parent else 'from scratch'}: {n_params / 1e6:.2f}M parameters, "
        f"{device} {precision}, {per_step * cfg.block_size} tokens per step, steps {start}..{cfg.max_steps}")
    last: dict[str, float] = {}
    train_tokens, train_seconds = 0, 0.0
    bar = progress(cfg.max_steps, f"pretrain-{'continue' if parent else 'scratch'}", unit="step", initial=start)
    for step in range(start, cfg.max_steps):
        clock = StepClock()
        t0 = time.perf_counter()
        step_loss = 0.0
        for micro in range(cfg.gradient_accumulation_steps):
            ids = batch(step, micro)
            with autocast():
                loss = model(input_ids=ids, labels=ids).loss
            scaled = loss / cfg.gradient_accumulation_steps
            (scaler.scale(scaled) if scaler else scaled).backward()
            step_loss += loss.detach().float().item() / cfg.gradient_accumulation_steps
        if scaler:
            scaler.unscale_(opt)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf"))
        lr = sched.get_last_lr()[0]
        if scaler:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        train_seconds += time.perf_counter() - t0
        train_tokens += per_step * cfg.block_size
        done = step + 1
        record = {"step": done, "loss": step_loss, "lr": lr, "grad_norm": float(grad_norm),
                  "tokens": done * per_step * cfg.block_size, **clock.read()}
        if done % cfg.eval_every == 0 or done == cfg.max_steps:
            record.update(evaluate())
        log.log(**record)
        last = record
        bar.set_postfix(loss=f"{step_loss:.3f}", lr=f"{lr:.2e}")
        bar.update(1)
        if cfg.save_every and (done % cfg.save_every == 0 or done == cfg.max_steps):  # the last too, for --resume
            save(done)
    bar.close()

    tokens_per_s = train_tokens / train_seconds if train_seconds else 0.0
    memory = {k: round(v, 1) for k, v in peak_memory_mb().items()}
    plot_metrics(run_dir.metrics, run_dir.plot, title=f"pretrain ({'continue' if parent else 'scratch'})")
    metrics = {"steps": cfg.max_steps, "final_loss": last.get("loss"), "eval_loss": last.get("eval_loss"),
               "tokens_trained": cfg.max_steps * per_step * cfg.block_size, "tokens_per_s": round(tokens_per_s, 1),
               "parameters": n_params, "precision": precision, "device": device,
               "effective_epochs": {k: v["epochs"] for k, v in epochs.items()}, **memory}
    params_out = dict(config_to_dict(cfg), tokenizer_dir=str(tok_dir))
    manifest = stage_manifest("pretrain", "pretrain-continue" if parent else "pretrain-scratch", parent,
                              params_out, data_files=files, metrics=metrics)

    def fill_final(tmp: Path) -> None:
        model.config.use_cache = True
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)

    publish(run_dir.out, fill_final, manifest)
    say(f"final loss {last.get('loss', float('nan')):.4f}"
        + (f", eval loss {last['eval_loss']:.4f}" if "eval_loss" in last else "")
        + f"; {tokens_per_s:,.0f} training tokens/s; peak memory "
        + ", ".join(f"{k} {v:,.0f}" for k, v in memory.items()))
    return run_dir.out


def _jsonish(value: Any) -> Any:
    """How a value reads back from the checkpoint's JSON state (tuples become lists)."""
    import json
    return json.loads(json.dumps(value, default=str))
