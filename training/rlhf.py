"""RLHF in rounds, from one recipe: reward model → policy optimisation (ppo or rloo) → reward model again,
N times, as InstructGPT iterated its reward model and policy.

    hearth train rlhf --config training/recipes/rlhf.yaml
    hearth train rlhf --config training/recipes/rlhf.yaml --resume rounds=3

Round K writes <output_dir>/round-K/rm (the rm stage) and round-K/policy (the ppo or rloo stage):
  - the reward model always starts from `model` and trains on `preferences`; from round 2 on, with
    `policy_pairs` > 0, also on pairs from the previous round's policy: for that many prompts it writes two
    answers, the previous round's reward model ranks them, and the pair joins the data (round-K/rm_data.jsonl).
    The new reward model so sees what the current policy writes (the distribution it must now judge), its
    labels coming from the reward model before it; there are no new human labels. With policy_pairs 0 it
    is retrained on the same data with the round's seed (seed + K − 1).
  - the policy starts from the previous round's policy (round 1: `model`), which is also its KL reference
    for that round, and is optimised against the new reward model.
The final policy goes to <output_dir>/final (hard links to round-N/policy's files where the file system
allows), its manifest naming every round's reward model and policy with their content hashes.
metrics.jsonl holds one record per round (the reward model's held-out accuracy, the policy's reward and KL);
loss.png plots them.

`--resume` skips every stage that finished (its hearth.json is written last) and resumes the one a kill
interrupted from its own last checkpoint. `rm:` and `policy:` in the recipe take the rm and ppo/rloo
recipe fields (training/recipes/rm.yaml, ppo.yaml, rloo.yaml); the fields this file sets per round
(output_dir, model, data, reward_model, reward_function, prompts) are not allowed there.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from hearth.training import ppo, rloo, rm
from hearth.training.common import (MetricsLog, TrainingConfigError, bundled, config_from_dict, config_to_dict,
                                    plot_metrics, publish, say, stage_manifest)
from hearth.training.rewards import load_prompts

ALGORITHMS = {"ppo": ppo, "rloo": rloo}
SET_PER_ROUND = {"rm": ("output_dir", "model", "data"),
                 "policy": ("output_dir", "model", "reward_model", "reward_function", "prompts")}


@dataclass
class Config:
    """The rlhf recipe (training/recipes/rlhf.yaml mirrors it)."""

    output_dir: str
    """Where round-K/rm, round-K/policy, final/, metrics.jsonl and loss.png go."""
    model: str = "smollm2-135m-instruct"
    """The starting policy, and the model every round's reward model starts from."""
    rounds: int = 2
    """How many times reward model then policy are trained."""
    algorithm: Literal["ppo", "rloo"] = "ppo"
    """The policy optimiser: ppo (value head, GAE, training/ppo.py) or rloo (critic-free, training/rloo.py)."""
    preferences: str = "training/data/preferences.jsonl"
    """The reward model's preference data (pairs or rankings of K answers)."""
    prompts: str | None = None
    """The policy's prompts; null: the prompts of `preferences`."""
    policy_pairs: int = 8
    """From round 2: prompts whose two answers from the previous policy, ranked by the previous reward model,
    join the reward model's data. 0: retrain on `preferences` alone."""
    rm: dict[str, Any] = field(default_factory=dict)
    """rm recipe fields for every round's reward model (max_steps, method, learning_rate ...)."""
    policy: dict[str, Any] = field(default_factory=dict)
    """ppo or rloo recipe fields for every round's policy (max_steps, beta, learning_rate ...)."""
    seed: int = 0
    """Round K's reward model and policy use seed + K - 1."""

    def __post_init__(self) -> None:
        self.preferences = bundled(self.preferences)
        self.prompts = bundled(self.prompts)
        if self.rounds < 1:
            raise TrainingConfigError(f"rounds must be >= 1; got {self.rounds}")
        if self.policy_pairs < 0:
            raise TrainingConfigError(f"policy_pairs must be >= 0; got {self.policy_pairs}")
        for part in ("rm", "policy"):
            fixed = sorted(set(getattr(self, part)) & set(SET_PER_ROUND[part]) | {"seed"} & set(getattr(self, part)))
            if fixed:
                raise TrainingConfigError(f"{part}: {fixed} are set per round by the rlhf stage (use the top-level "
                                          "model, preferences, prompts and seed)")
        self.rm_config(1, "x", self.preferences)  # unknown keys and bad values fail now, not after round 1
        self.policy_config(1, "x", self.model, "x")

    def rm_config(self, round_: int, out: str | os.PathLike, data: str | os.PathLike) -> rm.Config:
        return config_from_dict(rm.Config, {**self.rm, "output_dir": str(out), "model": self.model,
                                            "data": str(data), "seed": self.seed + round_ - 1}, "rlhf recipe: rm")

    def policy_config(self, round_: int, out: str | os.PathLike, model: str | os.PathLike,
                      reward_model: str | os.PathLike):
        return config_from_dict(ALGORITHMS[self.algorithm].Config,
                                {**self.policy, "output_dir": str(out), "model": str(model),
                                 "reward_model": str(reward_model), "prompts": self.prompts or self.preferences,
                                 "seed": self.seed + round_ - 1}, f"rlhf recipe: policy ({self.algorithm})")


# ----------------------------------------------------------------------------- the next round's reward data


def ranked_policy_pairs(policy_dir: Path, rm_dir: Path, prompts: list[list[dict[str, str]]], n: int, seed: int,
                        max_new_tokens: int, temperature: float, device: str) -> list[dict[str, Any]]:
    """Preference records from `n` prompts (a seeded pick): two sampled answers of the policy each, the one
    the reward model scores higher as "chosen"; a prompt whose two answers are equal (text or score) gives none."""
    import torch
    from transformers import AutoModelForCausalLM

    from hearth.training.data import epoch_order
    from hearth.training.trl_support import load_tokenizer, resolve_device

    device = resolve_device(device)
    tok = load_tokenizer(policy_dir)
    model = AutoModelForCausalLM.from_pretrained(policy_dir, local_files_only=True, dtype=torch.float32).to(device)
    scorer = rm.RewardModel.load(rm_dir, device=device)
    picked = [prompts[i] for i in epoch_order(len(prompts), seed, 0)[:n]]
    texts = [tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in picked for _ in (0, 1)]
    torch.manual_seed(seed)
    _, _, _, _, answers = ppo.sample(model.eval(), tok, texts, ppo.sampling_config(tok, max_new_tokens, temperature),
                                     device)
    scores = scorer.score_chats([p + [{"role": "assistant", "content": a}]
                                 for p, a in zip((p for p in picked for _ in (0, 1)), answers)])
    out = []
    for i, prompt in enumerate(picked):
        (a, sa), (b, sb) = (answers[2 * i], scores[2 * i]), (answers[2 * i + 1], scores[2 * i + 1])
        if a.strip() and b.strip() and a != b and sa != sb:
            out.append({"prompt": prompt, "chosen": a if sa > sb else b, "rejected": b if sa > sb else a})
    return out


def preference_records(path: str | os.PathLike) -> list[str]:
    """The records of a preference file as JSON lines (a JSON array's elements, or the file's non-blank lines)."""
    text = Path(path).read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        return [json.dumps(r, ensure_ascii=False) for r in json.loads(text)]
    return [line for line in text.splitlines() if line.strip()]


# ----------------------------------------------------------------------------- run


def _done(out: Path) -> bool:
    return (out / "hearth.json").is_file()


def _link_or_copy(src: Path, dst: Path) -> None:
    """`src` (a file or folder) at `dst`, by hard links where the file system allows, else copied."""
    if src.is_dir():
        shutil.copytree(src, dst, copy_function=_link_or_copy_file)
    else:
        _link_or_copy_file(src, dst)


def _link_or_copy_file(src, dst) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def run(config: Config, resume: bool = False) -> Path:
    """Run the rounds; returns <output_dir>/final, the last round's policy with the whole lineage."""
    from hearth.runtime.checkpoint import content_hash, read_manifest
    from hearth.runtime.fileio import atomic_write_text
    from hearth.runtime.registry import resolve_model

    cfg = config
    out = Path(cfg.output_dir).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    stage = ALGORITHMS[cfg.algorithm]
    start = resolve_model(cfg.model, prefer="hf")
    policy, lineage, log = Path(start), [], MetricsLog(out / "metrics.jsonl")
    for k in range(1, cfg.rounds + 1):
        here = out / f"round-{k}"
        rm_out, policy_out = here / "rm", here / "policy"
        data = Path(cfg.preferences)
        if k > 1 and cfg.policy_pairs > 0:
            data = here / "rm_data.jsonl"
            if not (resume and data.is_file()):
                say(f"round {k}/{cfg.rounds}: {cfg.policy_pairs} answer pairs from round {k - 1}'s policy, "
                    f"ranked by its reward model")
                p_cfg = cfg.policy_config(k, policy_out, policy, lineage[-1]["reward_model"]["path"])
                pairs = ranked_policy_pairs(policy, Path(lineage[-1]["reward_model"]["path"]),
                                            load_prompts(p_cfg.prompts), cfg.policy_pairs, cfg.seed + k - 1,
                                            p_cfg.max_completion_length, p_cfg.temperature, p_cfg.device)
                here.mkdir(parents=True, exist_ok=True)
                lines = preference_records(cfg.preferences) + [json.dumps(p, ensure_ascii=False) for p in pairs]
                atomic_write_text(data, "\n".join(lines) + "\n")
                say(f"round {k}/{cfg.rounds}: {len(pairs)} new pairs join the reward model's data ({data})")
        if resume and _done(rm_out):
            say(f"round {k}/{cfg.rounds}: reward model already trained ({rm_out})")
        else:
            say(f"round {k}/{cfg.rounds}: training the reward model")
            rm.run(cfg.rm_config(k, rm_out, data), resume=resume)
        if resume and _done(policy_out):
            say(f"round {k}/{cfg.rounds}: policy already trained ({policy_out})")
        else:
            say(f"round {k}/{cfg.rounds}: optimising the policy with {cfg.algorithm}")
            stage.run(cfg.policy_config(k, policy_out, policy, rm_out), resume=resume)
        m_rm, m_policy = read_manifest(rm_out).metrics, read_manifest(policy_out).metrics
        lineage.append({"round": k, "reward_model": {"path": str(rm_out), "content_hash": content_hash(rm_out)},
                        "policy": {"path": str(policy_out), "content_hash": content_hash(policy_out),
                                   "method": cfg.algorithm}, "rm_data": str(data)})
        log.log(step=k, rm_heldout_accuracy=m_rm.get("heldout_pairwise_accuracy"),
                rm_train_accuracy=m_rm.get("train_pairwise_accuracy"), reward_first=m_policy.get("reward_first"),
                reward_last=m_policy.get("reward_last"), kl_last=m_policy.get("kl_last"))
        policy = policy_out
    plot_metrics(log.path, out / "loss.png", keys=("reward_last", "kl_last", "rm_heldout_accuracy"),
                 title=f"RLHF rounds ({cfg.algorithm}): the policy's reward and KL, the RM's held-out accuracy")

    params = {k: v for k, v in config_to_dict(cfg).items() if k != "output_dir"}
    params.update(lineage=lineage, start={"path": str(start), "content_hash": content_hash(start)})
    metrics = {f"round_{r['step']}": {k: v for k, v in r.items() if k != "step"} for r in log.read()}
    manifest = stage_manifest("rlhf", f"rlhf-{cfg.algorithm}-rounds", policy, params,
                              data_files=[cfg.preferences] + ([cfg.prompts] if cfg.prompts else []), metrics=metrics)

    def fill(tmp: Path) -> None:
        for f in policy.iterdir():
            if f.name not in ("checkpoints", "metrics.jsonl", "loss.png", "hearth.json") and not f.name.startswith("."):
                _link_or_copy(f, tmp / f.name)

    final = out / "final"
    final.mkdir(exist_ok=True)
    publish(final, fill, manifest)
    say(f"final policy (round {cfg.rounds} of {cfg.rounds}) written to {final}")
    return final
