"""The rloo stage (TRL's RLOO: reward minus a KL penalty to the reference policy; `hearth train ppo` until
issue 19 made that stage real PPO): mean reward rises on a programmatic reward, the KL is logged, the policy
loads in hearth's runtime, a reward-model checkpoint drives it too and is pinned in the manifest, bad prompts
and bad configs name what is wrong.

    python -m pytest tests/training/test_rloo.py -q
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from hearth.runtime.checkpoint import content_hash, read_manifest
from hearth.training import rloo, rm
from hearth.training.common import TrainingConfigError, TrainingDataError, load_config

from tests.training.test_ppo import REWARD, _mean, _records  # the same tiny task: letters "e" in the answer

RECIPES = Path(rloo.__file__).parent / "recipes"


@pytest.fixture(scope="module")
def trained(tiny_llama, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("rloo") / "out"
    rloo.run(rloo.Config(output_dir=str(out), model=str(tiny_llama), reward_function=REWARD, method="full",
                       max_steps=40, learning_rate=1e-2, max_completion_length=16, num_generations=4,
                       prompts_per_step=2, beta=0.05, save_every=20))
    return out


def test_mean_reward_rises_and_the_kl_is_logged(trained):
    recs = [r for r in _records(trained) if "reward" in r]
    assert [r["step"] for r in recs] == list(range(1, 41))
    rewards = [r["reward"] for r in recs]
    assert _mean(rewards[-10:]) > _mean(rewards[:10]) + 3.0  # answers of 16 tokens: 1-2 "e" at the start
    assert recs[0]["kl"] == pytest.approx(0.0, abs=1e-4)  # the first batch is sampled from the reference itself
    assert _mean([r["kl"] for r in recs[-10:]]) > 0.01  # the policy moved away, and the penalty saw it
    m = read_manifest(trained).metrics
    assert m["reward_last"] > m["reward_first"] and m["tokens_per_s"] > 0


def test_the_policy_loads_in_the_runtime_and_names_its_parent(trained, tiny_llama):
    import numpy as np

    from hearth.runtime.backends.base import SeqWork
    from hearth.runtime.backends.transformers import TransformersBackend

    m = read_manifest(trained)
    assert (m.stage, m.method) == ("rlhf", "rloo")
    assert Path(m.parent.path) == tiny_llama.resolve() and m.parent.content_hash == content_hash(tiny_llama)
    assert m.parameters["reward_function"] == REWARD and m.parameters["beta"] == 0.05
    be = TransformersBackend(trained, device="cpu", kv_cache_gb=0.01)
    ids = be.tokenizer.encode(be.tokenizer.apply_chat_template([{"role": "user", "content": "Why is the sky blue?"}]),
                              add_special_tokens=False)
    be.kv.allocate(0, len(ids))
    logits = be.forward([SeqWork(seq_id=0, token_ids=ids, start_pos=0)])[0]
    assert np.isfinite(logits).all()


def test_a_reward_model_checkpoint_drives_it_and_is_pinned(tiny_llama, tmp_path):
    rm_dir = rm.run(rm.Config(output_dir=str(tmp_path / "rm"), model=str(tiny_llama), method="full", max_steps=4,
                              batch_size=4, learning_rate=1e-3, save_every=4, eval_fraction=0.0))
    out = tmp_path / "rloo"
    rloo.run(rloo.Config(output_dir=str(out), model=str(tiny_llama), reward_model=str(rm_dir), method="lora",
                       max_steps=4, learning_rate=1e-3, max_completion_length=8, save_every=4))
    m = read_manifest(out)
    assert m.parameters["reward_model"] == {"path": str(rm_dir), "content_hash": content_hash(rm_dir)}
    assert (out / "adapter" / "adapter_config.json").is_file() and (out / "model.safetensors").is_file()
    recs = [r for r in _records(out) if "reward" in r]
    assert len(recs) == 4 and all("kl" in r for r in recs)
    # the logged reward is the reward model's score of what the policy wrote
    assert any(r["reward"] != recs[0]["reward"] for r in recs)


def test_resume_replays_the_same_samples_and_rewards(tiny_llama, tmp_path):
    out = tmp_path / "resume"
    cfg = rloo.Config(output_dir=str(out), model=str(tiny_llama), reward_function=REWARD, method="full", max_steps=8,
                     learning_rate=1e-2, max_completion_length=12, save_every=4, keep_checkpoints=3)
    rloo.run(cfg)
    first = [(r["step"], r["reward"], r["kl"]) for r in _records(out) if "reward" in r]
    shutil.rmtree(out / "checkpoints" / "step-8")  # as if killed after step 4's checkpoint
    rloo.run(cfg, resume=True)
    again = [(r["step"], r["reward"], r["kl"]) for r in _records(out) if "reward" in r]
    assert [s for s, *_ in again] == list(range(1, 9))
    assert [r for _, r, _ in again] == pytest.approx([r for _, r, _ in first], abs=1e-6)  # same samples
    assert [k for *_, k in again] == pytest.approx([k for *_, k in first], rel=1e-4, abs=1e-5)


def test_bad_prompts_name_the_file_line_and_field(tiny_llama, tmp_path):
    data = tmp_path / "prompts.jsonl"
    data.write_text('{"prompt": "hi"}\n\n{"messages": [{"role": "user", "content": "a"}, '
                    '{"role": "assistant", "content": "b"}]}\n', encoding="utf-8")
    with pytest.raises(TrainingDataError) as e:
        rloo.run(rloo.Config(output_dir=str(tmp_path / "o"), model=str(tiny_llama), reward_function=REWARD,
                           prompts=str(data)))
    assert str(data) in str(e.value) and ":3" in str(e.value) and "messages" in str(e.value)


@pytest.mark.parametrize("fields, words", [
    ({}, "exactly one of reward_model"),
    ({"reward_model": "runs/rm", "reward_function": REWARD}, "exactly one of reward_model"),
    ({"reward_function": "no_colon"}, "module:function"),
    ({"reward_function": REWARD, "num_generations": 1}, "num_generations"),
])
def test_bad_configs_name_the_field(fields, words):
    with pytest.raises(TrainingConfigError, match=words):
        rloo.Config(output_dir="x", **fields)


def test_an_unimportable_reward_function_is_named(tiny_llama, tmp_path):
    with pytest.raises(TrainingConfigError, match="no_such_module"):
        rloo.run(rloo.Config(output_dir=str(tmp_path / "o"), model=str(tiny_llama),
                           reward_function="no_such_module:f"))


def test_the_recipe_loads():
    cfg = load_config(rloo.Config, RECIPES / "rloo.yaml")
    assert cfg.reward_model == "runs/rm" and cfg.beta > 0 and cfg.method == "lora"
