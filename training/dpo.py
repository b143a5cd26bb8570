"""Direct preference optimisation (TRL's DPOTrainer): raise the policy's likelihood of the chosen answer over
the rejected one, relative to a frozen reference (the starting policy), with strength β. LoRA optional.

    hearth train dpo --config training/recipes/dpo.yaml
    hearth train dpo --config training/recipes/dpo.yaml --resume max_steps=40

Input: a policy checkpoint (an sft output, or the default model) and preference JSONL (prompt, chosen,
rejected). Output: a causal LM in HF layout (stage "rlhf", method "dpo"; a LoRA adapter is merged in and
also kept under adapter/) that hearth's runtime serves. metrics.jsonl logs the implicit-reward margin
(`rewards/margins`, chosen minus rejected) and accuracy (`rewards/accuracies`) each step.

TRL's Trainer writes checkpoint-N folders in place; a callback (trl_support) moves each finished one into
<out>/checkpoints/step-N through common.RunDir (atomic), and `--resume` continues from the newest of those.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from hearth.training.common import (TrainingConfigError, bundled, config_to_dict, gptqmodel_only_if_needed,
                                    peak_memory_mb, pick_precision, plot_metrics, say, stage_manifest)
from hearth.training.trl_support import (attach, check_config, checkpoint_bridge, load_pairs, load_tokenizer,
                                         lora_config, merged_policy, prepare_run, publish_model, resolve_device,
                                         say_speed, split_pairs, trainer_args)

BUNDLED_PREFERENCES = Path(__file__).parent / "data" / "preferences.jsonl"


@dataclass
class Config:
    """The dpo recipe (training/recipes/dpo.yaml mirrors it)."""

    output_dir: str
    """Where the trained policy, checkpoints/, metrics.jsonl and loss.png go."""
    model: str = "smollm2-135m-instruct"
    """The starting policy (a checkpoint dir or a registered model name); also the frozen reference."""
    data: str = "training/data/preferences.jsonl"
    """Preference JSONL: prompt (text or chat messages), chosen, rejected."""
    eval_fraction: float = 0.0
    """Share of the pairs held out (picked by `seed`); the margin and accuracy on them are reported at the end."""
    final_eval_train_pairs: int = 16
    """Training pairs (a seeded sample) on which the closing evaluation reports the final policy's margin and
    accuracy; the held-out pairs are always all scored. Each pair costs about a training step's forward."""
    beta: float = 0.1
    """Strength of the pull towards the reference: larger β keeps the policy closer to it."""
    loss_type: Literal["sigmoid", "ipo", "hinge", "robust"] = "sigmoid"
    """sigmoid is the DPO paper's loss; the others are TRL's variants of it."""
    max_steps: int = 40
    batch_size: int = 4
    """Pairs per optimizer step (per device, before gradient accumulation)."""
    gradient_accumulation_steps: int = 1
    learning_rate: float = 5e-5
    warmup_steps: float = 0
    """Linear warmup: below 1 a fraction of max_steps, else a number of steps."""
    weight_decay: float = 0.0
    max_length: int = 512
    """Prompt + answer tokens kept per sequence (longer ones are cut at the end)."""
    method: Literal["full", "lora"] = "lora"
    """lora: train LoRA adapters (merged into the output, also kept under adapter/); full: every weight."""
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    gradient_checkpointing: bool = False
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    device: str = "auto"
    """"auto" (CUDA when present), "cpu" or "cuda"."""
    seed: int = 0
    save_every: int = 10
    """Write a resumable checkpoint every this many steps; the last step is always checkpointed."""
    keep_checkpoints: int = 2
    logging_steps: int = 1

    def __post_init__(self) -> None:
        self.data = bundled(self.data)
        if not 0.0 <= self.eval_fraction < 1.0:
            raise TrainingConfigError(f"eval_fraction must be in [0, 1); got {self.eval_fraction}")
        if self.beta <= 0:
            raise TrainingConfigError(f"beta must be > 0; got {self.beta}")
        if self.final_eval_train_pairs < 0:
            raise TrainingConfigError(f"final_eval_train_pairs must be >= 0; got {self.final_eval_train_pairs}")
        check_config(self, ("max_steps", "batch_size", "gradient_accumulation_steps", "max_length", "lora_r",
                            "save_every", "logging_steps"))


def run(config: Config, resume: bool = False) -> Path:
    """Train the policy with DPO; returns the output checkpoint dir."""
    with gptqmodel_only_if_needed(config.model):
        return _run(config, resume)


def _run(config: Config, resume: bool) -> Path:
    import torch
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    from datasets import Dataset
    from hearth.runtime.registry import resolve_model

    cfg = config
    base = resolve_model(cfg.model, prefer="hf")
    pairs = load_pairs(cfg.data)
    train_pairs, held_pairs = split_pairs(pairs, cfg.eval_fraction, cfg.seed)
    say(f"{len(pairs)} preference pairs from {cfg.data}: {len(train_pairs)} train, {len(held_pairs)} held out")

    device = resolve_device(cfg.device)
    precision = pick_precision(device, cfg.precision)
    run_dir, start, log = prepare_run(cfg.output_dir, cfg.keep_checkpoints, resume)

    tok = load_tokenizer(base)
    # fp32 master weights; bf16/fp16 come in through autocast where the device has them
    model = AutoModelForCausalLM.from_pretrained(base, local_files_only=True, dtype=torch.float32)
    peft_config, ref_model = None, None
    if cfg.method == "lora":
        # the reference is the same base with the adapter switched off: no second copy in memory
        peft_config = lora_config(cfg, "CAUSAL_LM")
    else:
        ref_model = AutoModelForCausalLM.from_pretrained(base, local_files_only=True, dtype=torch.float32)

    args = DPOConfig(
        **trainer_args(cfg, run_dir, device, precision), beta=cfg.beta, loss_type=[cfg.loss_type],
        per_device_train_batch_size=cfg.batch_size, per_device_eval_batch_size=cfg.batch_size,
        max_length=cfg.max_length)
    bridge = checkpoint_bridge(run_dir, log, {"seed": cfg.seed}, label=f"dpo-{cfg.method}",
                               show={"loss": "loss", "rewards/margins": "margin", "rewards/accuracies": "acc"})
    trainer = DPOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=Dataset.from_list(train_pairs),
                         processing_class=tok, peft_config=peft_config)
    attach(trainer, bridge)

    t0 = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=str(start.path) if start else None)
    seconds = time.perf_counter() - t0
    tokens = bridge.tokens

    # margin and accuracy of the final policy against the reference, on the training and held-out pairs
    metrics: dict[str, Any] = {"steps": result.global_step, "train_pairs": len(train_pairs),
                               "heldout_pairs": len(held_pairs)}
    n_train = min(cfg.final_eval_train_pairs, len(train_pairs))
    train_sample = random.Random(f"dpo-final-eval:{cfg.seed}").sample(train_pairs, n_train)
    metrics["train_eval_pairs"] = n_train
    for name, subset in (("train", train_sample), ("heldout", held_pairs)):
        if subset:
            what = "training" if name == "train" else "held-out"
            bridge.evaluating(f"evaluating the final policy on the {len(subset)} {what} pairs")
            ev = trainer.evaluate(eval_dataset=Dataset.from_list(subset))
            metrics[f"{name}_margin"] = ev["eval_rewards/margins"]
            metrics[f"{name}_accuracy"] = ev["eval_rewards/accuracies"]
            metrics[f"{name}_dpo_loss"] = ev["eval_loss"]
    say("final policy vs reference: " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()
                                                   if isinstance(v, float)))
    losses = [r["loss"] for r in log.read() if "loss" in r]
    metrics["final_loss"] = losses[-1] if losses else result.training_loss
    log.log(step=result.global_step, **{k: v for k, v in metrics.items() if k.startswith(("train_", "heldout_"))})
    plot_metrics(run_dir.metrics, run_dir.plot, keys=("loss", "rewards/margins"), title="DPO")

    policy, adapter_dir = merged_policy(trainer.model, cfg.method == "lora", run_dir)  # plain causal LM (+ adapter/)

    mem = peak_memory_mb()
    metrics.update(tokens_per_s=tokens / max(seconds, 1e-9), **mem)
    params = {k: v for k, v in config_to_dict(cfg).items() if k != "output_dir"}
    params["precision"] = precision
    manifest = stage_manifest("rlhf", "dpo", base, params, data_files=[cfg.data], metrics=metrics)

    publish_model(run_dir, policy, tok, manifest, adapter_dir)
    say_speed(tokens, seconds, mem)
    say(f"policy written to {run_dir.out}")
    return run_dir.out
