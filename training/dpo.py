"""Direct preference optimisation (TRL's DPOTrainer): raise the policy's likelihood of the chosen answer over
the rejected one, relative to a frozen reference (the starting policy), with strength β. LoRA optional.

    hearth train dpo --config training/recipes/dpo.yaml
    hearth train dpo --config training/recipes/dpo.yaml --resume max_steps=40

Input: a policy checkpoint (an sft output, or the default model) and preference JSONL (prompt, chosen,
rejected). Output: a causal LM in HF layout (stage "rlhf", method "dpo"; a LoRA adapter is merged in and
also kept under adapter/) that hearth's runtime serves. metrics.jsonl logs the implicit-reward margin
(`rewards/margins`, chosen minus rejected) and accuracy (`rewards/accuracies`) each step.

TRL's Trainer writes checkpoint-N folders in place; a callback moves each finished one into
<out>/checkpoints/step-N through common.RunDir (atomic), and `--resume` continues from the newest of those.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from hearth.training.common import (MetricsLog, RunDir, TrainingConfigError, config_to_dict, peak_memory_mb,
                                    pick_precision, plot_metrics, publish, say, stage_manifest)

BUNDLED_PREFERENCES = Path(__file__).parent / "data" / "preferences.jsonl"
HF_SCRATCH = ".trainer"  # where TRL writes its checkpoint-N before we move it into checkpoints/step-N


@dataclass
class Config:
    """The dpo recipe (training/recipes/dpo.yaml mirrors it)."""

    output_dir: str
    """Where the trained policy, checkpoints/, metrics.jsonl and loss.png go."""
    model: str = "smollm2-135m-instruct"
    """The starting policy (a checkpoint dir or a registered model name); also the frozen reference."""
    data: str = str(BUNDLED_PREFERENCES)
    """Preference JSONL: prompt (text or chat messages), chosen, rejected."""
    eval_fraction: float = 0.0
    """Share of the pairs held out (picked by `seed`); the margin and accuracy on them are reported at the end."""
    beta: float = 0.1
    """Strength of the pull towards the reference: larger β keeps the policy closer to it."""
    loss_type: Literal["sigmoid", "ipo", "hinge", "robust"] = "sigmoid"
    """sigmoid is the DPO paper's loss; the others are TRL's variants of it."""
    max_steps: int = 40
    batch_size: int = 4
    """Pairs per optimizer step (per device, before gradient accumulation)."""
    gradient_accumulation_steps: int = 1
    learning_rate: float = 5e-5
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_length: int = 512
    """Prompt + answer tokens kept per sequence (longer ones are cut at the end)."""
    lora: bool = True
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    gradient_checkpointing: bool = False
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    device: str = "auto"
    """"auto" (CUDA when present), "cpu" or "cuda"."""
    seed: int = 0
    save_steps: int = 10
    keep_checkpoints: int = 2
    logging_steps: int = 1

    def __post_init__(self) -> None:
        if not 0.0 <= self.eval_fraction < 1.0:
            raise TrainingConfigError(f"eval_fraction must be in [0, 1); got {self.eval_fraction}")
        if self.beta <= 0:
            raise TrainingConfigError(f"beta must be > 0; got {self.beta}")
        for name in ("max_steps", "batch_size", "gradient_accumulation_steps", "max_length", "lora_r",
                     "save_steps", "logging_steps"):
            if getattr(self, name) < 1:
                raise TrainingConfigError(f"{name} must be >= 1; got {getattr(self, name)}")
        if self.learning_rate <= 0:
            raise TrainingConfigError(f"learning_rate must be > 0; got {self.learning_rate}")
        if self.keep_checkpoints < 1:
            raise TrainingConfigError(f"keep_checkpoints must be >= 1 (resume needs one); got {self.keep_checkpoints}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise TrainingConfigError(f"device must be auto, cpu or cuda[:N]; got {self.device!r}")


def load_pairs(path: str | Path) -> list[dict[str, Any]]:
    """Preference records in TRL's conversational preference format (prompt messages, then the chosen and
    rejected answers as one assistant message each); bad records raise TrainingDataError (file, line, field)."""
    from hearth.training.data import load_preferences

    return [{"prompt": [dict(m) for m in p.prompt],
             "chosen": [{"role": "assistant", "content": p.chosen}],
             "rejected": [{"role": "assistant", "content": p.rejected}]}
            for p in load_preferences(path)]


def _bridge(run: RunDir, log: MetricsLog, state: dict[str, Any]):
    """A TrainerCallback that logs each record to metrics.jsonl and moves each checkpoint TRL wrote into
    checkpoints/step-N atomically (TRL's own folder is written file by file; a kill could leave half of one)."""
    from transformers import TrainerCallback

    class Bridge(TrainerCallback):
        tokens = 0  # the trainer's running count of training tokens in this process (its "num_tokens")

        quiet = False  # set for the closing evaluations, whose results go into one summary record instead

        def on_log(self, args, st, control, logs=None, **kw):
            if logs and not self.quiet:
                log.log(step=st.global_step, **{k: v for k, v in logs.items() if isinstance(v, (int, float))})
                self.tokens = int(logs.get("num_tokens", self.tokens))

        def on_save(self, args, st, control, **kw):
            src = Path(args.output_dir) / f"checkpoint-{st.global_step}"

            def fill(tmp: Path) -> None:
                for f in src.iterdir():
                    shutil.move(str(f), tmp / f.name)

            run.save_checkpoint(st.global_step, fill, state=dict(state))
            shutil.rmtree(src, ignore_errors=True)

    return Bridge()


def run(config: Config, resume: bool = False) -> Path:
    """Train the policy with DPO; returns the output checkpoint dir."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from datasets import Dataset
    from hearth.runtime.registry import resolve_model
    from hearth.training.data import split_eval

    cfg = config
    base = resolve_model(cfg.model, prefer="hf")
    pairs = load_pairs(cfg.data)
    train_idx, held_idx = split_eval(len(pairs), cfg.eval_fraction, cfg.seed)
    train_pairs, held_pairs = [pairs[i] for i in train_idx], [pairs[i] for i in held_idx]
    say(f"{len(pairs)} preference pairs from {cfg.data}: {len(train_pairs)} train, {len(held_pairs)} held out")

    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    precision = pick_precision(device, cfg.precision)
    run_dir = RunDir(cfg.output_dir, keep=cfg.keep_checkpoints)
    start = run_dir.latest() if resume else None
    if resume and start is None:
        say(f"no complete checkpoint in {run_dir.checkpoints}; starting from the beginning")
    if not resume and run_dir.checkpoints.exists():
        shutil.rmtree(run_dir.checkpoints)  # a fresh run: old checkpoints must not be resumed into it later
    shutil.rmtree(run_dir.out / HF_SCRATCH, ignore_errors=True)
    if start is not None:
        say(f"resuming from {start.path} (step {start.step})")
    log = MetricsLog(run_dir.metrics, resume_step=start.step if start else None)

    tok = AutoTokenizer.from_pretrained(base, local_files_only=True)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    # fp32 master weights; bf16/fp16 come in through autocast where the device has them
    model = AutoModelForCausalLM.from_pretrained(base, local_files_only=True, dtype=torch.float32)
    peft_config, ref_model = None, None
    if cfg.lora:
        from peft import LoraConfig
        # the reference is the same base with the adapter switched off: no second copy in memory
        peft_config = LoraConfig(task_type="CAUSAL_LM", r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                                 lora_dropout=cfg.lora_dropout, target_modules=list(cfg.lora_target_modules))
    else:
        ref_model = AutoModelForCausalLM.from_pretrained(base, local_files_only=True, dtype=torch.float32)

    args = DPOConfig(
        output_dir=str(run_dir.out / HF_SCRATCH), max_steps=cfg.max_steps, beta=cfg.beta, loss_type=[cfg.loss_type],
        per_device_train_batch_size=cfg.batch_size, per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps, learning_rate=cfg.learning_rate,
        warmup_steps=cfg.warmup_steps, weight_decay=cfg.weight_decay, max_length=cfg.max_length,
        activation_checkpointing=cfg.gradient_checkpointing, bf16=precision == "bf16", fp16=precision == "fp16",
        use_cpu=device == "cpu", seed=cfg.seed, data_seed=cfg.seed, logging_steps=cfg.logging_steps,
        save_strategy="steps", save_steps=cfg.save_steps, save_total_limit=None, eval_strategy="no",
        report_to="none", disable_tqdm=False, dataloader_num_workers=0)
    bridge = _bridge(run_dir, log, {"seed": cfg.seed})
    trainer = DPOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=Dataset.from_list(train_pairs),
                         processing_class=tok, peft_config=peft_config, callbacks=[bridge])

    t0 = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=str(start.path) if start else None)
    seconds = time.perf_counter() - t0
    tokens = bridge.tokens

    # margin and accuracy of the final policy against the reference, on the training and held-out pairs
    metrics: dict[str, Any] = {"steps": result.global_step, "train_pairs": len(train_pairs),
                               "heldout_pairs": len(held_pairs)}
    bridge.quiet = True
    for name, subset in (("train", train_pairs), ("heldout", held_pairs)):
        if subset:
            ev = trainer.evaluate(eval_dataset=Dataset.from_list(subset))
            metrics[f"{name}_margin"] = ev["eval_rewards/margins"]
            metrics[f"{name}_accuracy"] = ev["eval_rewards/accuracies"]
            metrics[f"{name}_dpo_loss"] = ev["eval_loss"]
    say("final policy vs reference: " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()
                                                   if isinstance(v, float)))
    losses = [r["loss"] for r in log.read() if "loss" in r]
    metrics["final_loss"] = losses[-1] if losses else result.training_loss
    log.log(step=result.global_step, **{k: v for k, v in metrics.items() if k.startswith(("train_", "heldout_"))})
    plot_metrics(run_dir.metrics, run_dir.plot, keys=("loss",), title="DPO loss")

    policy = trainer.model
    adapter_dir = None
    if cfg.lora:
        adapter_dir = run_dir.out / HF_SCRATCH / "adapter"
        policy.save_pretrained(adapter_dir, safe_serialization=True)
        policy = policy.merge_and_unload()  # a plain causal LM: the runtime needs no peft
    policy = policy.to(torch.float32).eval()

    mem = peak_memory_mb()
    metrics.update(tokens_per_s=tokens / max(seconds, 1e-9), **mem)
    params = {k: v for k, v in config_to_dict(cfg).items() if k != "output_dir"}
    params["precision"] = precision
    manifest = stage_manifest("rlhf", "dpo", base, params, data_files=[cfg.data], metrics=metrics)

    def fill(tmp: Path) -> None:
        policy.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        if adapter_dir is not None:
            shutil.copytree(adapter_dir, tmp / "adapter")

    publish(run_dir.out, fill, manifest)
    shutil.rmtree(run_dir.out / HF_SCRATCH, ignore_errors=True)
    say(f"{tokens / max(seconds, 1e-9):.0f} training tokens/s ({tokens} tokens in {seconds:.1f}s); peak memory "
        + ", ".join(f"{k} {v:.0f}" for k, v in mem.items()))
    say(f"policy written to {run_dir.out}")
    return run_dir.out
