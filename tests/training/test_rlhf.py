"""`hearth train rlhf`: reward model → policy optimisation → reward model again for N rounds from one recipe,
each round in its own folder, the later reward models also seeing the previous policy's answers, resumable
at round granularity, and the final policy's manifest naming the whole lineage.

    python -m pytest tests/training/test_rlhf.py -q
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from hearth.runtime.checkpoint import content_hash, read_manifest
from hearth.training import rlhf
from hearth.training.common import TrainingConfigError, load_config

RECIPES = Path(rlhf.__file__).parent / "recipes"
TINY_RM = {"method": "full", "max_steps": 2, "batch_size": 4, "learning_rate": 1e-3, "save_every": 100,
           "eval_fraction": 0.2, "max_length": 128}
TINY_POLICY = {"method": "lora", "max_steps": 2, "learning_rate": 1e-3, "max_completion_length": 8,
               "prompts_per_step": 2, "samples_per_prompt": 2, "minibatch_size": 2, "ppo_epochs": 1, "save_every": 1}


@pytest.fixture(scope="module")
def two_rounds(tiny_llama, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("rlhf") / "out"
    rlhf.run(rlhf.Config(output_dir=str(out), model=str(tiny_llama), rounds=2, algorithm="ppo", policy_pairs=3,
                         rm=TINY_RM, policy=TINY_POLICY))
    return out


def test_two_rounds_leave_their_outputs_in_round_folders(two_rounds, tiny_llama):
    for k in (1, 2):
        for part, stage in (("rm", "rm"), ("policy", "rlhf")):
            assert read_manifest(two_rounds / f"round-{k}" / part).stage == stage
    p1, p2 = read_manifest(two_rounds / "round-1/policy"), read_manifest(two_rounds / "round-2/policy")
    assert Path(p1.parent.path) == tiny_llama.resolve()
    assert Path(p2.parent.path) == (two_rounds / "round-1/policy")  # round 2 continues round 1's policy
    assert p2.parameters["reward_model"]["path"] == str(two_rounds / "round-2/rm")  # against the new reward model
    assert Path(read_manifest(two_rounds / "round-2/rm").parent.path) == tiny_llama.resolve()
    records = [json.loads(line) for line in (two_rounds / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2] and all("reward_last" in r for r in records)
    assert (two_rounds / "loss.png").is_file()


def test_the_second_reward_model_also_learns_from_the_first_policy_ranked_by_the_first_rm(two_rounds):
    base = rlhf.preference_records(rlhf.Config(output_dir="x").preferences)
    lines = (two_rounds / "round-2/rm_data.jsonl").read_text().splitlines()
    assert lines[:len(base)] == base and 0 < len(lines) - len(base) <= 3
    for rec in map(json.loads, lines[len(base):]):
        assert rec["prompt"][-1]["role"] == "user" and rec["chosen"] != rec["rejected"]
    m = read_manifest(two_rounds / "round-2/rm")
    assert m.parameters["data"] == str(two_rounds / "round-2/rm_data.jsonl")
    assert m.parameters["seed"] == 1  # round K's seed is seed + K - 1


def test_the_final_policy_names_the_whole_lineage_and_serves(two_rounds, tiny_llama):
    final = two_rounds / "final"
    m = read_manifest(final)
    assert (m.stage, m.method) == ("rlhf", "rlhf-ppo-rounds")
    assert content_hash(final) == content_hash(two_rounds / "round-2/policy")  # the same weights
    assert Path(m.parent.path) == two_rounds / "round-2/policy"
    lineage = m.parameters["lineage"]
    assert [r["round"] for r in lineage] == [1, 2]
    for r in lineage:
        for part in ("reward_model", "policy"):
            assert r[part]["content_hash"] == content_hash(r[part]["path"])
    assert m.parameters["start"]["content_hash"] == content_hash(tiny_llama)

    from hearth.runtime.backends.transformers import TransformersBackend

    TransformersBackend(final, device="cpu", kv_cache_gb=0.01).close()


def test_resume_skips_finished_rounds_and_reruns_what_a_kill_cut_short(two_rounds, tiny_llama, tmp_path, capsys):
    out = tmp_path / "copy"
    shutil.copytree(two_rounds, out, symlinks=True)
    shutil.rmtree(out / "round-2" / "policy")  # killed before round 2's policy was published
    shutil.rmtree(out / "final")
    kept = {p: content_hash(out / p) for p in ("round-1/rm", "round-1/policy", "round-2/rm")}
    rlhf.run(rlhf.Config(output_dir=str(out), model=str(tiny_llama), rounds=2, policy_pairs=3, rm=TINY_RM,
                         policy=TINY_POLICY), resume=True)
    err = capsys.readouterr().err
    assert "round 1/2: reward model already trained" in err and "round 1/2: policy already trained" in err
    assert "round 2/2: optimising the policy with ppo" in err and "answer pairs" not in err
    assert {p: content_hash(out / p) for p in kept} == kept  # the finished stages were not redone
    m = read_manifest(out / "final")
    assert [r["round"] for r in m.parameters["lineage"]] == [1, 2]
    assert m.parameters["lineage"][1]["policy"]["content_hash"] == content_hash(out / "round-2/policy")


@pytest.mark.parametrize("fields, words", [
    ({"rm": {"max_step": 3}}, "unknown key"),
    ({"policy": {"reward_model": "runs/rm"}}, "set per round"),
    ({"policy": {"num_generations": 2}}, "unknown key"),  # an rloo field while algorithm is ppo
    ({"rounds": 0}, "rounds"),
])
def test_bad_recipes_are_named_before_round_1(fields, words):
    with pytest.raises(TrainingConfigError, match=words):
        rlhf.Config(output_dir="x", **fields)


def test_the_cli_lists_the_rlhf_fields(capsys):
    from hearth.clients.cli import main

    with pytest.raises(SystemExit):
        main(["train", "rlhf", "--help"])
    out = capsys.readouterr().out
    assert "rounds = 2" in out and "policy_pairs = 8" in out


def test_the_recipe_loads_with_either_algorithm():
    cfg = load_config(rlhf.Config, RECIPES / "rlhf.yaml")
    assert cfg.rounds == 2 and cfg.algorithm == "ppo" and Path(cfg.preferences).is_file()
    assert cfg.policy_config(1, "o", "m", "r").beta == cfg.policy["beta"]
    cfg = load_config(rlhf.Config, RECIPES / "rlhf.yaml", {"algorithm": "rloo"})
    assert type(cfg.policy_config(2, "o", "m", "r")).__module__ == "hearth.training.rloo"
