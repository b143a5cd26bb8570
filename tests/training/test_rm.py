"""The reward-model stage on a tiny random LLaMA: it learns its training pairs, changes its weights, writes a
checkpoint `RewardModel.load` scores with, and names its parent and data in hearth.json.

    python -m pytest tests/training/test_rm.py -q
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from hearth.runtime.checkpoint import content_hash, read_manifest
from hearth.training import rm
from hearth.training.common import TrainingConfigError, TrainingDataError, load_config

RECIPES = Path(rm.__file__).parent / "recipes"


def _weights(path: Path) -> dict:
    from safetensors.torch import load_file
    return load_file(str(path / "model.safetensors"))


@pytest.fixture(scope="module")
def trained(tiny_llama, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("rm") / "out"
    cfg = rm.Config(output_dir=str(out), model=str(tiny_llama), method="full", max_steps=40, batch_size=8,
                    learning_rate=1e-3, save_every=20, eval_fraction=0.2)
    assert rm.run(cfg) == out.resolve()
    return out


def test_the_reward_model_learns_its_training_pairs(trained):
    m = read_manifest(trained)
    assert m.metrics["train_pairwise_accuracy"] > 0.9
    assert 0.0 <= m.metrics["heldout_pairwise_accuracy"] <= 1.0 and m.metrics["heldout_pairs"] >= 1
    # the saved checkpoint, loaded afresh, ranks the training pairs as well as the trainer said
    pairs = rm.load_pairs(rm.BUNDLED_PREFERENCES)
    train, held = rm.split_pairs(pairs, 0.2, seed=0)
    scorer = rm.RewardModel.load(trained, device="cpu")
    assert scorer.pairwise_accuracy(train) == pytest.approx(m.metrics["train_pairwise_accuracy"])
    assert len(scorer.score(["hello", "你好，世界"])) == 2
    losses = [r["loss"] for r in map(json.loads, (trained / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert len(losses) == 40 and sum(losses[-10:]) / 10 < 0.5 * sum(losses[:10]) / 10
    assert (trained / "loss.png").stat().st_size > 0


def test_a_ranking_stays_on_one_side_of_the_held_out_split():
    pairs = rm.load_pairs(rm.BUNDLED_RANKINGS)
    assert len(pairs) == 16 * 6  # 16 rankings of 4 responses
    train, held = rm.split_pairs(pairs, 0.25, seed=0)
    assert len(held) == 4 * 6 and len(train) + len(held) == len(pairs)
    prompts = {json.dumps(p["prompt"]) for p in held}
    assert len(prompts) == 4 and not prompts & {json.dumps(p["prompt"]) for p in train}
    assert all(set(p) == {"prompt", "chosen", "rejected"} for p in train + held)


def test_a_reward_model_trained_on_rankings_orders_their_responses(tiny_llama, tmp_path):
    out = tmp_path / "rm-rankings"
    cfg = rm.Config(output_dir=str(out), model=str(tiny_llama), data="training/data/rankings.jsonl", method="full",
                    max_steps=40, batch_size=8, learning_rate=1e-3, save_every=40, eval_fraction=0.0)
    rm.run(cfg)
    scorer = rm.RewardModel.load(out, device="cpu")
    concordant = pairs = top = 0
    rankings = [json.loads(line) for line in rm.BUNDLED_RANKINGS.read_text().splitlines()]
    for r in rankings:
        prompt = [{"role": "user", "content": r["prompt"]}]
        s = scorer.score_chats([prompt + [{"role": "assistant", "content": x}] for x in r["responses"]])
        concordant += sum(s[i] > s[j] for i in range(len(s)) for j in range(i + 1, len(s)))
        pairs += len(s) * (len(s) - 1) // 2
        top += max(range(len(s)), key=s.__getitem__) == 0
    # the responses of each ranking come out in its order (pairwise), and its best one on top
    assert concordant / pairs > 0.9 and top >= 0.8 * len(rankings), (concordant, pairs, top)
    assert read_manifest(out).metrics["train_pairs"] == 16 * 6


def test_training_changes_the_weights_and_the_manifest_names_the_parent(trained, tiny_llama):
    before, after = _weights(tiny_llama), _weights(trained)
    key = "model.layers.0.self_attn.q_proj.weight"
    assert not (before[key] == after[key]).all()
    assert "score.weight" in after and "lm_head.weight" not in after
    m = read_manifest(trained)
    assert m.stage == "rm"
    assert Path(m.parent.path) == tiny_llama.resolve() and m.parent.content_hash == content_hash(tiny_llama)
    assert m.data_hashes == {"preferences.jsonl": content_hash(rm.BUNDLED_PREFERENCES)}
    assert m.metrics["tokens_per_s"] > 0 and m.metrics["peak_rss_mb"] > 0
    assert sorted(p.name for p in (trained / "checkpoints").iterdir()) == ["step-20", "step-40"]


def test_a_lora_reward_model_is_saved_merged_and_resumes_exactly(tiny_llama, tmp_path):
    out = tmp_path / "rm-lora"
    cfg = rm.Config(output_dir=str(out), model=str(tiny_llama), method="lora", max_steps=6, batch_size=4,
                    learning_rate=1e-3, save_every=3, keep_checkpoints=3)
    rm.run(cfg)
    first = [(r["step"], r["loss"]) for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
             if "loss" in r]
    # as if killed between step 3's checkpoint and the end: resume from step 3 replays steps 4-6 identically
    shutil.rmtree(out / "checkpoints" / "step-6")
    rm.run(cfg, resume=True)
    again = [(r["step"], r["loss"]) for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
             if "loss" in r]
    assert [s for s, _ in again] == [1, 2, 3, 4, 5, 6]
    assert [x for _, x in again] == pytest.approx([x for _, x in first], rel=1e-5)
    assert not (out / "adapter_config.json").exists()  # merged: loading needs no peft
    assert read_manifest(out).method == "reward-model-lora"
    scores = rm.RewardModel.load(out, device="cpu").score(["a", "b b b"])
    assert all(isinstance(s, float) for s in scores)


def test_bad_preference_data_names_the_file_line_and_field(tiny_llama, tmp_path):
    data = tmp_path / "prefs.jsonl"
    data.write_text('{"prompt": "hi", "chosen": "hello", "rejected": "go away"}\n'
                    '{"prompt": "hi", "chosen": "hello"}\n', encoding="utf-8")
    with pytest.raises(TrainingDataError) as e:
        rm.run(rm.Config(output_dir=str(tmp_path / "o"), model=str(tiny_llama), data=str(data)))
    assert str(data) in str(e.value) and ":2" in str(e.value) and "rejected" in str(e.value)


def test_the_recipe_loads_and_bad_values_name_the_field():
    cfg = load_config(rm.Config, RECIPES / "rm.yaml")
    assert cfg.method == "lora" and cfg.model == "smollm2-135m-instruct"
    with pytest.raises(TrainingConfigError, match="eval_fraction"):
        load_config(rm.Config, RECIPES / "rm.yaml", overrides={"eval_fraction": 1.5})
