"""Reward model: a causal LM with a one-number head, trained on (prompt, chosen, rejected) pairs with the
pairwise ranking loss -log σ(r_chosen − r_rejected) (TRL's RewardTrainer), LoRA optional. The data may
also rank K answers to a prompt (`responses`, best first, or with `ranks`): as in InstructGPT, each
ranking gives its K(K-1)/2 pairs, and the held-out split keeps a ranking's pairs together.

    hearth train rm --config training/recipes/rm.yaml
    hearth train rm --config training/recipes/rm.yaml --resume max_steps=120

The output is an HF AutoModelForSequenceClassification checkpoint (stage "rm") with hearth.json; load it
with `RewardModel.load(path)` and call `.score(texts)` or `.score_chats(conversations)`. Pairwise accuracy
on the training pairs and on a held-out split goes into the manifest's metrics.

TRL's Trainer writes checkpoint-N folders in place; a callback (trl_support) moves each finished one into
<out>/checkpoints/step-N through common.RunDir (atomic), and `--resume` continues from the newest of those.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

from hearth.runtime.reward import RewardScorer
from hearth.training.common import (TrainingConfigError, bundled, config_to_dict, gptqmodel_only_if_needed,
                                    peak_memory_mb, pick_precision, plot_metrics, progress, say, stage_manifest)
from hearth.training.trl_support import (attach, check_config, checkpoint_bridge, load_pairs, load_tokenizer,
                                         lora_config, prepare_run, publish_model, resolve_device, say_speed,
                                         split_pairs, trainer_args)

BUNDLED_PREFERENCES = Path(__file__).parent / "data" / "preferences.jsonl"
BUNDLED_RANKINGS = Path(__file__).parent / "data" / "rankings.jsonl"  # rankings of 4 answers, best first


@dataclass
class Config:
    """The rm recipe (training/recipes/rm.yaml mirrors it)."""

    output_dir: str
    """Where the reward model, checkpoints/, metrics.jsonl and loss.png go."""
    model: str = "smollm2-135m-instruct"
    """A causal LM checkpoint dir or a registered model name; its LM head is replaced by a 1-output score head."""
    data: str = "training/data/preferences.jsonl"
    """Preference JSONL: prompt (text or chat messages) with chosen and rejected, or with `responses` ranked
    best first (optional `ranks`, 1 = best), expanded into every pair of different rank."""
    eval_fraction: float = 0.2
    """Share of the pairs held out (picked by `seed`) to report pairwise accuracy on unseen pairs."""
    max_steps: int = 60
    batch_size: int = 8
    """Pairs per optimizer step (per device, before gradient accumulation)."""
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-4
    warmup_steps: float = 0
    """Linear warmup: below 1 a fraction of max_steps, else a number of steps."""
    weight_decay: float = 0.0
    max_length: int = 512
    """Pairs whose chosen or rejected rendering is longer (tokens) are dropped."""
    method: Literal["full", "lora"] = "lora"
    """lora: LoRA adapters (merged into the output) with the new score head trained in full; full: every weight."""
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    gradient_checkpointing: bool = False
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    device: str = "auto"
    """"auto" (CUDA when present), "cpu" or "cuda"."""
    seed: int = 0
    save_every: int = 20
    """Write a resumable checkpoint every this many steps; the last step is always checkpointed."""
    keep_checkpoints: int = 2
    logging_steps: int = 1

    def __post_init__(self) -> None:
        self.data = bundled(self.data)
        if not 0.0 <= self.eval_fraction < 1.0:
            raise TrainingConfigError(f"eval_fraction must be in [0, 1); got {self.eval_fraction}")
        check_config(self, ("max_steps", "batch_size", "gradient_accumulation_steps", "max_length", "lora_r",
                            "save_every", "logging_steps"))


# ----------------------------------------------------------------------------- scoring


class RewardModel(RewardScorer):
    """A trained reward model: one scalar per conversation (higher is better); runtime.reward.RewardScorer
    loads and scores, this adds the pairwise accuracy the stage reports."""

    def pairwise_accuracy(self, pairs: Sequence[dict[str, Any]], label: str | None = None) -> float:
        """Share of pairs where chosen outscores rejected (pairs in `load_pairs` form); with `label`, a
        progress bar per pair scored."""
        if not pairs:
            return math.nan
        bar = progress(len(pairs), label, unit="pair") if label else None
        wins = 0
        for i in range(0, len(pairs), 8):
            chunk = pairs[i:i + 8]
            chosen = self.score_chats([p["prompt"] + p["chosen"] for p in chunk])
            rejected = self.score_chats([p["prompt"] + p["rejected"] for p in chunk])
            wins += sum(c > r for c, r in zip(chosen, rejected))
            if bar is not None:
                bar.update(len(chunk))
        if bar is not None:
            bar.close()
        return wins / len(pairs)


# ----------------------------------------------------------------------------- run


def run(config: Config, resume: bool = False) -> Path:
    """Train the reward model; returns the output checkpoint dir."""
    with gptqmodel_only_if_needed(config.model):
        return _run(config, resume)


def _run(config: Config, resume: bool) -> Path:
    import torch
    from transformers import AutoModelForSequenceClassification
    from trl import RewardConfig, RewardTrainer

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
    torch.manual_seed(cfg.seed)  # the score head is initialised at random
    model = AutoModelForSequenceClassification.from_pretrained(
        base, num_labels=1, local_files_only=True, dtype=torch.float32)
    model.config.pad_token_id = tok.pad_token_id  # the head reads the last non-pad token of each row

    # the new score head trains in full
    peft_config = lora_config(cfg, "SEQ_CLS", modules_to_save=["score"]) if cfg.method == "lora" else None

    args = RewardConfig(
        **trainer_args(cfg, run_dir, device, precision), per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size, max_length=cfg.max_length, center_rewards_coefficient=None)
    bridge = checkpoint_bridge(run_dir, log, {"seed": cfg.seed}, label=f"rm-{cfg.method}",
                               show={"loss": "loss", "accuracy": "acc", "margin": "margin"})
    trainer = RewardTrainer(
        model=model, args=args, train_dataset=Dataset.from_list(train_pairs), processing_class=tok,
        peft_config=peft_config)
    attach(trainer, bridge)

    t0 = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=str(start.path) if start else None)
    seconds = time.perf_counter() - t0
    tokens = bridge.tokens

    # the final reward model: LoRA merged into the base so `RewardModel.load` needs no peft
    final = trainer.model
    if cfg.method == "lora":
        final = final.merge_and_unload()
    final = final.to(torch.float32).eval()
    scorer = RewardModel(final, tok, str(next(final.parameters()).device))
    acc_train = scorer.pairwise_accuracy(train_pairs, label="rm: scoring the training pairs")
    acc_held = None  # None, not NaN: hearth.json stays JSON
    if held_pairs:
        acc_held = scorer.pairwise_accuracy(held_pairs, label="rm: scoring the held-out pairs")
    say(f"pairwise accuracy: train {acc_train:.3f}" + (f", held-out {acc_held:.3f}" if held_pairs else ""))

    records = log.read()
    losses = [r["loss"] for r in records if "loss" in r]
    mem = peak_memory_mb()
    metrics = {"train_pairwise_accuracy": acc_train, "heldout_pairwise_accuracy": acc_held,
               "final_loss": losses[-1] if losses else result.training_loss, "steps": result.global_step,
               "train_pairs": len(train_pairs), "heldout_pairs": len(held_pairs),
               "tokens_per_s": tokens / max(seconds, 1e-9), **mem}
    log.log(step=result.global_step, **{k: v for k, v in metrics.items() if k.endswith("pairwise_accuracy")})
    plot_metrics(run_dir.metrics, run_dir.plot, keys=("loss",), title="reward model: pairwise ranking loss")

    params = {k: v for k, v in config_to_dict(cfg).items() if k != "output_dir"}
    params["precision"] = precision
    manifest = stage_manifest("rm", "reward-model-lora" if cfg.method == "lora" else "reward-model", base, params,
                              data_files=[cfg.data], metrics=metrics)

    publish_model(run_dir, final, tok, manifest)
    say_speed(tokens, seconds, mem)
    say(f"reward model written to {run_dir.out}")
    return run_dir.out
