"""What the TRL-based stages (rm, dpo, ppo) share, so it behaves the same in all three: the callback that
bridges TRL's checkpoint-N folders and log records to common.RunDir / MetricsLog, run-folder preparation for
`--resume`, the config checks they have in common, and small loaders (tokenizer, LoRA config, preference
pairs, the TrainingArguments every stage sets alike). Each stage's `run` still reads top to bottom.

TRL's Trainer writes checkpoint-N folders in place under <out>/.trainer; the bridge moves each finished one
into <out>/checkpoints/step-N through RunDir (atomic), and `prepare_run(..., resume=True)` picks the newest.
Nothing here imports torch, transformers or TRL at module level.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Sequence

from hearth.training.common import (Checkpoint, MetricsLog, RunDir, StepClock, TrainingConfigError, progress,
                                    publish, say)

HF_SCRATCH = ".trainer"  # where TRL writes its checkpoint-N before we move it into checkpoints/step-N


# ----------------------------------------------------------------------------- config


def check_config(cfg: Any, at_least_one: Sequence[str]) -> None:
    """The checks every TRL stage's Config shares: the named int fields >= 1, learning_rate > 0,
    keep_checkpoints >= 1 and a known device (`cfg` has learning_rate, keep_checkpoints and device)."""
    for name in at_least_one:
        if getattr(cfg, name) < 1:
            raise TrainingConfigError(f"{name} must be >= 1; got {getattr(cfg, name)}")
    if cfg.learning_rate <= 0:
        raise TrainingConfigError(f"learning_rate must be > 0; got {cfg.learning_rate}")
    if cfg.keep_checkpoints < 1:
        raise TrainingConfigError(f"keep_checkpoints must be >= 1 (resume needs one); got {cfg.keep_checkpoints}")
    if cfg.warmup_steps < 0:
        raise TrainingConfigError(f"warmup_steps must be >= 0 (below 1: a fraction of max_steps); "
                                  f"got {cfg.warmup_steps}")
    if cfg.device not in ("auto", "cpu", "cuda") and not cfg.device.startswith("cuda:"):
        raise TrainingConfigError(f"device must be auto, cpu or cuda[:N]; got {cfg.device!r}")


def resolve_device(device: str) -> str:
    """"auto" -> "cuda" when present, else "cpu"; any other value as given."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def trainer_args(cfg: Any, run: RunDir, device: str, precision: str) -> dict[str, Any]:
    """TrainingArguments fields every stage sets the same way (the stage adds its own, e.g. batch size):
    TRL writes into HF_SCRATCH, saves every `save_every` steps and at the last one, with no pruning of its own
    (RunDir prunes), no eval, no progress output of its own (checkpoint_bridge shows it)."""
    return dict(
        output_dir=str(run.out / HF_SCRATCH), max_steps=cfg.max_steps,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps, learning_rate=cfg.learning_rate,
        warmup_steps=cfg.warmup_steps, weight_decay=cfg.weight_decay,
        activation_checkpointing=cfg.gradient_checkpointing, bf16=precision == "bf16", fp16=precision == "fp16",
        use_cpu=device == "cpu", seed=cfg.seed, data_seed=cfg.seed, logging_steps=cfg.logging_steps,
        save_strategy="steps", save_steps=cfg.save_every, save_total_limit=None, eval_strategy="no",
        report_to="none", disable_tqdm=True, dataloader_num_workers=0)  # the bridge shows hearth's progress


# ----------------------------------------------------------------------------- data and models


def load_pairs(path: str | Path) -> list[dict[str, Any]]:
    """Preference records in TRL's conversational preference format: {"prompt": [messages], "chosen":
    [assistant message], "rejected": [assistant message]}; bad records raise TrainingDataError (file, line,
    field)."""
    from hearth.training.data import load_preferences

    return [{"prompt": [dict(m) for m in p.prompt],
             "chosen": [{"role": "assistant", "content": p.chosen}],
             "rejected": [{"role": "assistant", "content": p.rejected}], GROUP: p.source}
            for p in load_preferences(path)]


GROUP = "_group"  # the record a pair came from: the pairs of one ranking share it


def split_pairs(pairs: list[dict[str, Any]], eval_fraction: float, seed: int) -> tuple[list, list]:
    """(train, held-out): a seeded `eval_fraction` of the source records held out (data.split_eval), so
    the pairs of one ranking stay on one side; the pairs come back without their group key."""
    from hearth.training.data import split_eval

    groups = list(dict.fromkeys(p.get(GROUP, i) for i, p in enumerate(pairs)))
    train_idx, held_idx = split_eval(len(groups), eval_fraction, seed)
    held = {groups[i] for i in held_idx}

    def strip(p: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in p.items() if k != GROUP}

    return ([strip(p) for i, p in enumerate(pairs) if p.get(GROUP, i) not in held],
            [strip(p) for i, p in enumerate(pairs) if p.get(GROUP, i) in held])


def load_tokenizer(path: str | Path):
    """The checkpoint's tokenizer, with EOS as the pad token when it has none (TRL's collators pad)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def lora_config(cfg: Any, task_type: str, **extra: Any):
    """peft's LoraConfig from the stage's lora_r / lora_alpha / lora_dropout / lora_target_modules."""
    from peft import LoraConfig

    return LoraConfig(task_type=task_type, r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=list(cfg.lora_target_modules), **extra)


def merged_policy(model, lora: bool, run: RunDir):
    """(fp32 causal LM in eval mode, adapter dir or None): with LoRA the adapter is saved under the scratch
    folder first (the output keeps it under adapter/), then merged in so the runtime needs no peft."""
    import torch

    adapter_dir = None
    if lora:
        adapter_dir = run.out / HF_SCRATCH / "adapter"
        model.save_pretrained(adapter_dir, safe_serialization=True)
        model = model.merge_and_unload()
    return model.to(torch.float32).eval(), adapter_dir


# ----------------------------------------------------------------------------- TRL <-> RunDir


def prepare_run(output_dir: str, keep_checkpoints: int, resume: bool) -> tuple[RunDir, Checkpoint | None, MetricsLog]:
    """(run folder, checkpoint to resume from or None, metrics log cut back to that step). A fresh run
    deletes old checkpoints; TRL's scratch folder is always cleared."""
    run = RunDir(output_dir, keep=keep_checkpoints)
    start = run.latest() if resume else None
    if resume and start is None:
        say(f"no complete checkpoint in {run.checkpoints}; starting from the beginning")
    if not resume and run.checkpoints.exists():
        shutil.rmtree(run.checkpoints)  # a fresh run: old checkpoints must not be resumed into it later
    shutil.rmtree(run.out / HF_SCRATCH, ignore_errors=True)
    if start is not None:
        say(f"resuming from {start.path} (step {start.step})")
    return run, start, MetricsLog(run.metrics, resume_step=start.step if start else None)


def checkpoint_bridge(run: RunDir, log: MetricsLog, state: dict[str, Any], label: str,
                      show: dict[str, str] | None = None):
    """A TrainerCallback that gives a TRL stage hearth's progress and metrics: one labelled bar (`label`,
    steps done of max_steps, s/step, ETA, the `show` metrics renamed {TRL key: short name}) instead of TRL's
    bars and printed dicts; each record into metrics.jsonl; each checkpoint TRL wrote moved into
    checkpoints/step-N atomically (TRL's own folder is written file by file; a kill could leave half of one).
    Attach it with `attach(trainer, bridge)`.

    `.tokens` is the trainer's last logged "num_tokens"; `.start_tokens` the state's input-token count when
    training began (RLOO restores its count on resume, so ppo subtracts it). `evaluating(text)` labels a
    closing evaluation: its batches get their own bar, and its records go into the stage's summary instead."""
    from transformers import TrainerCallback

    show = dict(show or {"loss": "loss"})

    class Bridge(TrainerCallback):
        tokens = 0
        start_tokens: int | None = None
        quiet = False
        bar = None
        eval_label: str | None = None
        clock: StepClock | None = None
        step_time: dict[str, float] = {}

        def on_train_begin(self, args, st, control, **kw):
            self.start_tokens = st.num_input_tokens_seen
            self.bar = progress(st.max_steps, label, unit="step", initial=st.global_step)

        def on_step_begin(self, args, st, control, **kw):
            self.clock = StepClock()

        def on_step_end(self, args, st, control, **kw):
            self.step_time = self.clock.read() if self.clock is not None else {}
            if self.bar is not None:
                self.bar.update(st.global_step - self.bar.n)

        def on_log(self, args, st, control, logs=None, **kw):
            if logs and not self.quiet:
                timing = self.step_time if "loss" in logs or "reward" in logs else {}  # a training step's record
                log.log(step=st.global_step, **{k: v for k, v in logs.items() if isinstance(v, (int, float))},
                        **timing)
                self.tokens = int(logs.get("num_tokens", self.tokens))
                shown = {short: f"{logs[k]:.4g}" for k, short in show.items()
                         if isinstance(logs.get(k), (int, float))}
                if self.bar is not None and shown:
                    self.bar.set_postfix(shown, refresh=False)

        def on_train_end(self, args, st, control, **kw):
            if self.bar is not None:
                self.bar.close()
                self.bar = None

        def evaluating(self, text: str) -> None:
            """The next evaluate() call is the closing evaluation `text`: its own labelled bar, no metrics lines."""
            self.quiet, self.eval_label = True, text

        def on_prediction_step(self, args, st, control, eval_dataloader=None, **kw):
            if self.bar is None and self.eval_label is not None:
                total = len(eval_dataloader) if eval_dataloader is not None else None
                self.bar = progress(total, f"{label}: {self.eval_label}", unit="batch")
            if self.bar is not None:
                self.bar.update(1)

        def on_evaluate(self, args, st, control, **kw):
            self.on_train_end(args, st, control)

        def on_save(self, args, st, control, **kw):
            src = Path(args.output_dir) / f"checkpoint-{st.global_step}"

            def fill(tmp: Path) -> None:
                for f in src.iterdir():
                    shutil.move(str(f), tmp / f.name)

            run.save_checkpoint(st.global_step, fill, state=dict(state))
            shutil.rmtree(src, ignore_errors=True)

    return Bridge()


def attach(trainer, bridge) -> None:
    """Make `bridge` the trainer's only progress output: TRL's own bars and printed log dicts go."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    if bridge not in trainer.callback_handler.callbacks:
        trainer.add_callback(bridge)


def publish_model(run: RunDir, model, tokenizer, manifest, adapter_dir: Path | None = None) -> None:
    """Write the final model + tokenizer (+ the LoRA adapter under adapter/) and hearth.json into the output
    dir atomically (common.publish), then drop TRL's scratch folder."""
    def fill(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if adapter_dir is not None:
            shutil.copytree(adapter_dir, tmp / "adapter")

    publish(run.out, fill, manifest)
    shutil.rmtree(run.out / HF_SCRATCH, ignore_errors=True)


def say_speed(tokens: int, seconds: float, mem: dict[str, float]) -> None:
    """The closing line every stage prints: training tokens/s and peak memory."""
    say(f"{tokens / max(seconds, 1e-9):.0f} training tokens/s ({tokens} tokens in {seconds:.1f}s); peak memory "
        + ", ".join(f"{k} {v:.0f}" for k, v in mem.items()))
