"""RLHF: policy optimisation against a reward model with a KL penalty to the reference policy.

    hearth train ppo --config training/recipes/ppo.yaml
    hearth train ppo --config training/recipes/ppo.yaml --resume max_steps=60

Which algorithm: TRL 1.16 no longer ships PPOTrainer (neither in trl nor trl.experimental). Its maintained
trainer for exactly this setup is RLOOTrainer (REINFORCE Leave-One-Out, Ahmadian et al. 2024, "Back to
Basics", written as the simpler, critic-free replacement for PPO in RLHF): for each prompt it samples
`num_generations` answers, scores them with the reward model, subtracts β·KL(policy ‖ reference) from each
sequence's reward (the same KL-in-the-reward penalty PPO-RLHF uses), and takes as baseline the mean reward of
the prompt's other answers, so no value network is needed; updates are PPO-clipped (`epsilon`). GRPO puts
the KL in the loss instead and normalises rewards per group; RLOO keeps the classic RLHF objective, so it is
the one used here. With LoRA the reference is the base with the adapter switched off.

The reward is either a reward-model checkpoint from `hearth train rm` (`reward_model: runs/rm`) or a Python
callable named as "module:function" (`reward_function: mypkg.rewards:brevity`), called with keyword
arguments `completions` (list[str], the generated answers) and `prompts` (list of chat-message lists) and
returning one float per completion. Prompts come from a JSONL whose records carry "prompt" (text or chat
messages) or "messages"; a preference file works as is (its answers are ignored).

Output: a causal LM in HF layout (stage "rlhf", method "rloo"; a LoRA adapter merged in and kept under
adapter/) that hearth's runtime serves; the reward model is named in the manifest's parameters, pinned by
content hash. metrics.jsonl logs the mean reward (`reward`) and the KL to the reference (`kl`) each step.
"""

from __future__ import annotations

import importlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

from hearth.training.common import (TrainingConfigError, TrainingDataError, bundled, config_to_dict,
                                    gptqmodel_only_if_needed, peak_memory_mb, pick_precision, plot_metrics, say,
                                    stage_manifest)
from hearth.training.trl_support import (attach, check_config, checkpoint_bridge, load_tokenizer, lora_config,
                                         merged_policy, prepare_run, publish_model, resolve_device, say_speed,
                                         trainer_args)


@dataclass
class Config:
    """The ppo recipe (training/recipes/ppo.yaml mirrors it)."""

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
        if (self.reward_model is None) == (self.reward_function is None):
            raise TrainingConfigError("give exactly one of reward_model (an rm checkpoint) and reward_function "
                                      "(module:function)")
        if self.reward_function is not None and (self.reward_function.count(":") != 1
                                                 or not all(self.reward_function.split(":"))):
            raise TrainingConfigError(f"reward_function must look like 'module:function'; got {self.reward_function!r}")
        if self.beta < 0:
            raise TrainingConfigError(f"beta must be >= 0; got {self.beta}")
        if self.num_generations < 2:
            raise TrainingConfigError(f"num_generations must be >= 2 (the leave-one-out baseline needs a sibling); "
                                      f"got {self.num_generations}")
        if self.temperature <= 0:
            raise TrainingConfigError(f"temperature must be > 0; got {self.temperature}")
        check_config(self, ("prompts_per_step", "max_completion_length", "max_steps", "gradient_accumulation_steps",
                            "lora_r", "save_every", "logging_steps"))


# ----------------------------------------------------------------------------- prompts and rewards


def load_prompts(path: str | Path) -> list[list[dict[str, str]]]:
    """Prompts as chat messages ending with a user turn; a bad record names the file, line and field."""
    from hearth.training.data import read_jsonl_objects

    p = Path(path)
    prompts = []
    for n, rec in read_jsonl_objects(p):
        key = "prompt" if "prompt" in rec else "messages" if "messages" in rec else None
        if key is None:
            raise TrainingDataError(p, n, "prompt", "is missing (give `prompt` or `messages`)")
        value = rec[key]
        if isinstance(value, str):
            if not value.strip():
                raise TrainingDataError(p, n, key, "is empty")
            prompts.append([{"role": "user", "content": value}])
            continue
        if not isinstance(value, list) or not value:
            raise TrainingDataError(p, n, key, "must be a string or a non-empty list of messages")
        for i, m in enumerate(value):
            if not (isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
                    and isinstance(m.get("content"), str)):
                raise TrainingDataError(p, n, f"{key}[{i}]", "must be {role: system|user|assistant, content: str}")
        if value[-1]["role"] != "user":
            raise TrainingDataError(p, n, key, "must end with a user turn (the policy writes the answer)")
        prompts.append([{"role": m["role"], "content": m["content"]} for m in value])
    if not prompts:
        raise TrainingDataError(p, None, None, "holds no prompts")
    return prompts


def import_reward_function(spec: str) -> Callable[..., list[float]]:
    """The callable named by "module:function", wrapped into TRL's reward-function calling convention."""
    module_name, fn_name = spec.split(":")
    try:
        fn = getattr(importlib.import_module(module_name), fn_name)
    except (ImportError, AttributeError) as e:
        raise TrainingConfigError(f"reward_function: cannot import {spec!r}: {e}") from None
    if not callable(fn):
        raise TrainingConfigError(f"reward_function: {spec!r} is not callable")

    def reward(prompts, completions, **_: Any) -> list[float]:
        # conversational completions arrive as [{"role": "assistant", "content": ...}]
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        values = fn(completions=texts, prompts=prompts)
        if len(values) != len(texts):
            raise ValueError(f"reward function {spec} returned {len(values)} values for {len(texts)} completions")
        return [float(v) for v in values]

    reward.__name__ = fn_name  # TRL logs rewards/<name>/mean
    return reward


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
    from hearth.runtime.checkpoint import content_hash
    from hearth.runtime.registry import resolve_model

    cfg = config
    base = resolve_model(cfg.model, prefer="hf")
    prompts = load_prompts(cfg.prompts)
    say(f"{len(prompts)} prompts from {cfg.prompts}")

    device = resolve_device(cfg.device)
    precision = pick_precision(device, cfg.precision)
    run_dir, start, log = prepare_run(cfg.output_dir, cfg.keep_checkpoints, resume)

    reward_info: dict[str, Any]
    if cfg.reward_model is not None:
        rm_path = Path(cfg.reward_model).expanduser().resolve()
        if not (rm_path / "config.json").is_file():
            raise TrainingConfigError(f"reward_model: no checkpoint at {rm_path} (train one with `hearth train rm`)")
        reward_fn = AutoModelForSequenceClassification.from_pretrained(rm_path, local_files_only=True,
                                                                       use_safetensors=True, dtype=torch.float32)
        if reward_fn.config.num_labels != 1:
            raise TrainingConfigError(f"reward_model: {rm_path} has {reward_fn.config.num_labels} outputs; a reward "
                                      "model has one")
        reward_tok = AutoTokenizer.from_pretrained(rm_path, local_files_only=True)
        reward_info = {"reward_model": {"path": str(rm_path), "content_hash": content_hash(rm_path)}}
    else:
        reward_fn, reward_tok = import_reward_function(cfg.reward_function), None
        reward_info = {"reward_function": cfg.reward_function}

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
    bridge = checkpoint_bridge(run_dir, log, {"seed": cfg.seed}, label=f"ppo-rloo-{cfg.method}",
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
    params.update(reward_info, precision=precision)
    data_files = [cfg.prompts]
    manifest = stage_manifest("rlhf", "rloo", base, params, data_files=data_files, metrics=metrics)

    tok.padding_side = saved_padding_side  # the checkpoint keeps the tokenizer as it came
    publish_model(run_dir, policy, tok, manifest, adapter_dir)
    say_speed(tokens, seconds, mem)
    say(f"policy written to {run_dir.out}")
    return run_dir.out
