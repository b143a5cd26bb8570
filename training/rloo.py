"""RLHF with RLOO: policy optimisation against a reward model with a KL penalty to the reference policy,
critic-free (TRL's RLOOTrainer). Its sibling `hearth train ppo` (training/ppo.py) is PPO with a value head.

    hearth train rloo --config training/recipes/rloo.yaml
    hearth train rloo --config training/recipes/rloo.yaml --resume max_steps=60

RLOO is REINFORCE Leave-One-Out (Ahmadian et al. 2024, "Back to Basics", written as the simpler,
critic-free replacement for PPO in RLHF): for each prompt it samples `num_generations` answers, scores
them with the reward model, subtracts β·KL(policy ‖ reference) from each
sequence's reward (the same KL-in-the-reward penalty PPO-RLHF uses), and takes as baseline the mean reward of
the prompt's other answers, so no value network is needed; updates are PPO-clipped (`epsilon`). GRPO puts
the KL in the loss instead and normalises rewards per group; RLOO keeps the classic RLHF objective, so it is
the one used here. With LoRA the reference is the base with the adapter switched off.

The reward is either a reward-model checkpoint from `hearth train rm` (`reward_model: runs/rm`) or a Python
callable named as "module:function" (`reward_function: mypkg.rewards:brevity`); training/rewards.py says
what it is called with and which prompt files work.

Output: a causal LM in HF layout (stage "rlhf", method "rloo"; a LoRA adapter merged in and kept under
adapter/) that hearth's runtime serves; the reward model is named in the manifest's parameters, pinned by
content hash. metrics.jsonl logs the mean reward (`reward`) and the KL to the reference (`kl`) each step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from hearth.training.common import (TrainingConfigError, bundled, config_to_dict,
                                    gptqmodel_only_if_needed, peak_memory_mb, pick_precision, plot_metrics, say,
                                    stage_manifest)
from hearth.training.trl_support import (attach, check_config, checkpoint_bridge, load_tokenizer, lora_config,
                                         merged_policy, prepare_run, publish_model, resolve_device, say_speed,
                                         trainer_args)
from hearth.training.rewards import check_reward_source, import_reward_function, load_prompts, reward_info


@dataclass
class Config:
    """The rloo recipe (training/recipes/rloo.yaml mirrors it)."""

    output_dir: str
    """Where the trained policy, checkpoints/, metrics.jsonl and loss.png go."""
    model: str = "smollm2-135m-instruct"
    """The starting policy (a checkpoint dir or a registered model name); also the KL reference."""
    reward_model: str | None = None
    """A reward-model checkpoint (the rm stage's output). Exactly one of reward_model / reward_function."""
    reward_function: str | None = None
    """A Python reward callable as "module:function" (see the module docstring for its contract)."""
    prompts: str = "training/data/preferences.jsonl"
    """JSONL of prompts: "prompt" (text or messages) or "messages" per record; other fields are ignored."""
    beta: float = 0.05
    """KL coefficient: each answer's reward loses beta * KL(policy || reference). 0 turns the penalty off."""
    num_generations: int = 4
    """Answers sampled per prompt; each answer's baseline is the mean reward of the others (leave-one-out)."""
    prompts_per_step: int = 2
    """Prompts per optimizer step (per device); the batch is prompts_per_step * num_generations answers."""
    max_completion_length: int = 64
    temperature: float = 1.0
    epsilon: float = 0.2
    """PPO clip range of the probability ratio."""
    normalize_advantages: bool = False
    max_steps: int = 40
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-5
    warmup_steps: float = 0
    """Linear warmup: below 1 a fraction of max_steps, else a number of steps."""
    weight_decay: float = 0.0
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
        self.prompts = bundled(self.prompts)
        check_reward_source(self.reward_model, self.reward_function)
        if self.beta < 0:
            raise TrainingConfigError(f"beta must be >= 0; got {self.beta}")
        if self.num_generations < 2:
            raise TrainingConfigError(f"num_generations must be >= 2 (the leave-one-out baseline needs a sibling); "
                                      f"got {self.num_generations}")
        if self.temperature <= 0:
            raise TrainingConfigError(f"temperature must be > 0; got {self.temperature}")
        check_config(self, ("prompts_per_step", "max_completion_length", "max_steps", "gradient_accumulation_steps",
                            "lora_r", "save_every", "logging_steps"))


# ----------------------------------------------------------------------------- run


def run(config: Config, resume: bool = False) -> Path:
    """Optimise the policy against the reward; returns the output checkpoint dir."""
    with gptqmodel_only_if_needed(config.model):
        return _run(config, resume)


def _run(config: Config, resume: bool) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from trl import RLOOConfig, RLOOTrainer

    from datasets import Dataset
    from hearth.runtime.registry import resolve_model

    cfg = config
    base = resolve_model(cfg.model, prefer="hf")
    prompts = load_prompts(cfg.prompts)
    say(f"{len(prompts)} prompts from {cfg.prompts}")

    device = resolve_device(cfg.device)
    precision = pick_precision(device, cfg.precision)
    run_dir, start, log = prepare_run(cfg.output_dir, cfg.keep_checkpoints, resume)

    reward = reward_info(cfg.reward_model, cfg.reward_function)  # checks the rm checkpoint first
    if cfg.reward_model is not None:
        rm_path = Path(reward["reward_model"]["path"])
        reward_fn = AutoModelForSequenceClassification.from_pretrained(rm_path, local_files_only=True,
                                                                       use_safetensors=True, dtype=torch.float32)
        reward_tok = AutoTokenizer.from_pretrained(rm_path, local_files_only=True)
    else:
        reward_fn, reward_tok = import_reward_function(cfg.reward_function), None

    tok = load_tokenizer(base)
    saved_padding_side = tok.padding_side
    tok.padding_side = "left"  # prompts are left-padded so every answer starts at the same column
    model = AutoModelForCausalLM.from_pretrained(base, local_files_only=True, dtype=torch.float32)
    peft_config = lora_config(cfg, "CAUSAL_LM") if cfg.method == "lora" else None

    args = RLOOConfig(
        **trainer_args(cfg, run_dir, device, precision), beta=cfg.beta, num_generations=cfg.num_generations,
        per_device_train_batch_size=cfg.prompts_per_step * cfg.num_generations,
        max_completion_length=cfg.max_completion_length, temperature=cfg.temperature, epsilon=cfg.epsilon,
        normalize_advantages=cfg.normalize_advantages)
    bridge = checkpoint_bridge(run_dir, log, {"seed": cfg.seed}, label=f"rloo-{cfg.method}",
                               show={"reward": "reward", "kl": "kl"})
    trainer = RLOOTrainer(model=model, reward_funcs=reward_fn, args=args,
                          train_dataset=Dataset.from_list([{"prompt": p} for p in prompts]), processing_class=tok,
                          reward_processing_classes=reward_tok, peft_config=peft_config)
    attach(trainer, bridge)

    t0 = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=str(start.path) if start else None)
    seconds = time.perf_counter() - t0
    tokens = bridge.tokens - (bridge.start_tokens or 0)  # RLOO's count is restored on resume

    records = [r for r in log.read() if "reward" in r]
    k = max(1, len(records) // 4)  # first and last quarter of the run, to see the trend past sampling noise
    metrics: dict[str, Any] = {"steps": result.global_step, "prompts": len(prompts)}
    if records:
        metrics["reward_first"] = sum(r["reward"] for r in records[:k]) / k
        metrics["reward_last"] = sum(r["reward"] for r in records[-k:]) / k
        if "kl" in records[-1]:
            metrics["kl_last"] = sum(r.get("kl", 0.0) for r in records[-k:]) / k
        say(f"mean reward {metrics['reward_first']:.3f} (first {k} steps) -> {metrics['reward_last']:.3f} "
            f"(last {k})" + (f", KL to reference {metrics['kl_last']:.4f}" if "kl_last" in metrics else ""))
    plot_metrics(run_dir.metrics, run_dir.plot, keys=("reward", "kl"), title="RLOO: mean reward, KL to the reference")

    policy, adapter_dir = merged_policy(trainer.model, cfg.method == "lora", run_dir)  # plain causal LM (+ adapter/)

    mem = peak_memory_mb()
    metrics.update(tokens_per_s=tokens / max(seconds, 1e-9), **mem)
    params = {k: v for k, v in config_to_dict(cfg).items() if k not in ("output_dir", "reward_model")}
    params.update(reward, precision=precision)
    data_files = [cfg.prompts]
    manifest = stage_manifest("rlhf", "rloo", base, params, data_files=data_files, metrics=metrics)

    tok.padding_side = saved_padding_side  # the checkpoint keeps the tokenizer as it came
    publish_model(run_dir, policy, tok, manifest, adapter_dir)
    say_speed(tokens, seconds, mem)
    say(f"policy written to {run_dir.out}")
    return run_dir.out
