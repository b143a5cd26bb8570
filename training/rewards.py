"""What the policy-optimisation stages (ppo, rloo) and the rlhf rounds read alike: the prompts, and the reward
source, either a reward-model checkpoint from `hearth train rm` or a Python callable named "module:function".

    prompts = load_prompts("training/data/preferences.jsonl")   # chat messages ending with a user turn
    reward = import_reward_function("mypkg.rewards:brevity")    # reward(prompts=..., completions=[str]) -> [float]
    rm_dir = reward_model_dir("runs/rm")                        # a checked rm checkpoint folder

A reward callable is called with keyword arguments `completions` (list[str], the generated answers) and
`prompts` (list of chat-message lists) and returns one float per completion. Prompt files are JSONL whose
records carry "prompt" (text or chat messages) or "messages"; a preference file works as is (its answers
are ignored). Nothing here imports torch at module level.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any, Callable

from hearth.training.common import TrainingConfigError, TrainingDataError


def check_reward_source(reward_model: str | None, reward_function: str | None) -> None:
    """A stage's Config check: exactly one of the two, and a function spec that looks like module:function."""
    if (reward_model is None) == (reward_function is None):
        raise TrainingConfigError("give exactly one of reward_model (an rm checkpoint) and reward_function "
                                  "(module:function)")
    if reward_function is not None and (reward_function.count(":") != 1 or not all(reward_function.split(":"))):
        raise TrainingConfigError(f"reward_function must look like 'module:function'; got {reward_function!r}")


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
    """The callable named by "module:function", wrapped into TRL's reward-function calling convention
    (keyword `prompts` and `completions`, the latter as text or as [{"role": "assistant", ...}])."""
    module_name, fn_name = spec.split(":")
    try:
        fn = getattr(importlib.import_module(module_name), fn_name)
    except (ImportError, AttributeError) as e:
        raise TrainingConfigError(f"reward_function: cannot import {spec!r}: {e}") from None
    if not callable(fn):
        raise TrainingConfigError(f"reward_function: {spec!r} is not callable")

    def reward(prompts, completions, **_: Any) -> list[float]:
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        values = fn(completions=texts, prompts=prompts)
        if len(values) != len(texts):
            raise ValueError(f"reward function {spec} returned {len(values)} values for {len(texts)} completions")
        return [float(v) for v in values]

    reward.__name__ = fn_name  # TRL logs rewards/<name>/mean
    return reward


def reward_model_dir(path: str | Path) -> Path:
    """The resolved folder of a reward-model checkpoint, checked to be one (a config with one output)."""
    rm_path = Path(path).expanduser().resolve()
    config = rm_path / "config.json"
    if not config.is_file():
        raise TrainingConfigError(f"reward_model: no checkpoint at {rm_path} (train one with `hearth train rm`)")
    data = json.loads(config.read_text(encoding="utf-8"))
    labels = data.get("num_labels", len(data.get("id2label") or {0: 0, 1: 1}))  # transformers writes id2label
    if labels != 1:
        raise TrainingConfigError(f"reward_model: {rm_path} has {labels} outputs; a reward model has one")
    return rm_path


def reward_info(reward_model: str | None, reward_function: str | None) -> dict[str, Any]:
    """What the manifest records of the reward: the model pinned by content hash, or the function's name."""
    from hearth.runtime.checkpoint import content_hash

    if reward_model is not None:
        rm_path = reward_model_dir(reward_model)
        return {"reward_model": {"path": str(rm_path), "content_hash": content_hash(rm_path)}}
    return {"reward_function": reward_function}
