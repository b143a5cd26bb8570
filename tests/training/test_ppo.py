"""The ppo stage (PPO with a value head, GAE, the clipped objective and a KL penalty to the reference): the
algorithm's pieces against hand-computed examples, the mean reward rising on a tiny task while the KL stays
bounded, resume continuing the step count with the same samples, the labelled metrics and plot, and bad
configs named.

    python -m pytest tests/training/test_ppo.py -q
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from hearth.runtime.checkpoint import content_hash, read_manifest
from hearth.training import ppo
from hearth.training.common import TrainingConfigError, load_config

RECIPES = Path(ppo.__file__).parent / "recipes"
REWARD = f"{__name__}:letter_e"


def letter_e(completions: list[str], **_) -> list[float]:
    """The test reward: how many letters "e" the answer holds (a tiny model can learn to write more)."""
    return [float(c.count("e")) for c in completions]


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


# ----------------------------------------------------------------------------- the algorithm, by hand


def test_token_rewards_put_the_kl_on_every_token_and_the_score_on_the_last():
    import torch

    logp = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -1.0, -1.0]])
    ref = torch.tensor([[-1.5, -1.0, -9.0], [-2.0, -1.0, -1.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])  # row 0's answer is two tokens long
    rewards, kl = ppo.token_rewards(torch.tensor([2.0, 3.0]), logp, ref, mask, beta=0.5)
    assert kl.tolist() == [[0.5, -1.0, 0.0], [1.0, 0.0, 0.0]]
    assert rewards.tolist() == [[-0.25, 0.5 + 2.0, 0.0], [-0.5, 0.0, 3.0]]


def test_gae_matches_a_hand_computed_example():
    import torch

    rewards = torch.tensor([[0.5, 1.0, 7.0], [0.0, 0.0, 1.0]])
    values = torch.tensor([[0.2, 0.4, 5.0], [0.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    adv, ret = ppo.gae(rewards, values, mask, gamma=0.9, lam=0.8)
    # row 0: the value past the last token counts as 0, its reward and value at the masked step are ignored
    #   A_1 = 1.0 + 0.9*0 - 0.4 = 0.6;  A_0 = (0.5 + 0.9*0.4 - 0.2) + 0.9*0.8*0.6 = 0.66 + 0.432 = 1.092
    # row 1: A_2 = 1, A_1 = 0.72, A_0 = 0.72^2 = 0.5184 (all values 0)
    assert adv.flatten().tolist() == pytest.approx([1.092, 0.6, 0.0, 0.5184, 0.72, 1.0])
    assert ret.flatten().tolist() == pytest.approx([1.292, 1.0, 0.0, 0.5184, 0.72, 1.0])
    adv1, _ = ppo.gae(rewards, values, mask, gamma=1.0, lam=1.0)  # lambda 1: Monte Carlo return minus V
    assert adv1[1].tolist() == pytest.approx([1.0, 1.0, 1.0])


def test_whitened_advantages_have_mean_0_and_variance_1_over_answer_tokens():
    import torch

    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, 4.0, 5.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    w = ppo.whiten(x, mask)
    kept = w[mask.bool()]
    assert float(kept.mean()) == pytest.approx(0.0, abs=1e-6) and float((kept ** 2).mean()) == pytest.approx(1.0)
    assert float(w[0, 2]) == 0.0


def test_the_clipped_objective_matches_a_hand_computed_example():
    import torch

    old = torch.zeros(1, 3)
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.1]])).requires_grad_()  # ratios 1.5, 0.5, 1.1
    adv = torch.tensor([[1.0, 1.0, -1.0]])
    values = torch.tensor([[1.0, 0.0, 0.5]])
    old_values = torch.tensor([[0.5, 0.5, 0.5]])
    returns = torch.tensor([[2.0, 0.0, 0.0]])
    mask = torch.ones(1, 3)
    pg, vf, clipped = ppo.clipped_losses(logp, old, adv, values, old_values, returns, mask, epsilon=0.2,
                                         value_clip=0.2)
    # policy: max(-A r, -A clip(r)) per token: max(-1.5, -1.2) = -1.2; max(-0.5, -0.8) = -0.5; max(1.1, 1.1) = 1.1
    assert float(pg.detach()) == pytest.approx((-1.2 - 0.5 + 1.1) / 3)
    # value: V_clip = 0.7, 0.3, 0.5 -> 0.5*max((V-R)^2, (V_clip-R)^2) = 0.845, 0.045, 0.125
    assert float(vf) == pytest.approx((0.845 + 0.045 + 0.125) / 3)
    assert float(clipped) == pytest.approx(2 / 3)  # ratios 1.5 and 0.5 are outside [0.8, 1.2]
    pg.backward()
    assert float(logp.grad[0, 0]) == 0.0  # a ratio clipped on the side the advantage favours gets no gradient
    assert float(logp.grad[0, 1]) == pytest.approx(-0.5 / 3)  # d(-A r / 3)/d log p = -A r / 3


def test_the_adaptive_kl_coefficient_moves_towards_the_target_by_at_most_20_percent_of_n_over_horizon():
    assert ppo.adapt_beta(0.1, kl=12.0, target=6.0, n_answers=8, horizon=80) == pytest.approx(0.1 * 1.02)
    assert ppo.adapt_beta(0.1, kl=3.0, target=6.0, n_answers=8, horizon=80) == pytest.approx(0.1 * 0.98)
    assert ppo.adapt_beta(0.1, kl=6.6, target=6.0, n_answers=8, horizon=80) == pytest.approx(0.1 * 1.01)


def test_the_answer_mask_ends_at_the_first_eos():
    import torch

    mask = ppo.answer_mask(torch.tensor([[5, 6, 2, 2, 2], [2, 7, 8, 9, 2], [5, 6, 7, 8, 9]]), eos_id=2)
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]]


# ----------------------------------------------------------------------------- a tiny task


TINY_TASK = dict(method="full", max_steps=30, learning_rate=1e-2, ppo_epochs=1, max_completion_length=16,
                 prompts_per_step=2, samples_per_prompt=4, minibatch_size=4, save_every=100)


@pytest.fixture(scope="module")
def trained(tiny_llama, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ppo") / "out"
    ppo.run(ppo.Config(output_dir=str(out), model=str(tiny_llama), reward_function=REWARD, beta=0.05, **TINY_TASK))
    return out


def test_mean_reward_rises_and_the_kl_penalty_bounds_the_drift(trained, tiny_llama, tmp_path):
    recs = [r for r in _records(trained) if "reward" in r]
    assert [r["step"] for r in recs] == list(range(1, 31))
    rewards = [r["reward"] for r in recs]
    assert _mean(rewards[-8:]) > _mean(rewards[:8]) + 3.0  # answers of 16 tokens: about one "e" at the start
    assert recs[0]["kl"] == pytest.approx(0.0, abs=1e-4)  # the first batch is sampled from the reference itself
    for key in ("policy_loss", "value_loss", "clip_fraction", "entropy", "beta", "step_seconds"):
        assert all(key in r for r in recs), key
    m = read_manifest(trained)
    assert (m.stage, m.method) == ("rlhf", "ppo") and m.parameters["reward_function"] == REWARD
    assert m.metrics["reward_last"] > m.metrics["reward_first"] and m.metrics["tokens_per_s"] > 0
    assert (trained / "loss.png").is_file()

    # the same run with a 20x stronger KL coefficient stays several times closer to the reference
    held = tmp_path / "held"
    ppo.run(ppo.Config(output_dir=str(held), model=str(tiny_llama), reward_function=REWARD, beta=1.0, **TINY_TASK))
    kl_free = _mean([r["kl"] for r in recs[-8:]])
    kl_held = _mean([r["kl"] for r in _records(held)[-8:]])
    assert kl_free > 1.0 and kl_held < 0.5 * kl_free


def test_the_plot_has_a_labelled_panel_per_metric():
    from hearth.training.common import plot_panels

    assert [label for label, _ in plot_panels(ppo.PLOTTED)] == ["loss", "reward", "kl", "clip_fraction", "entropy"]


def test_the_policy_loads_in_the_runtime_and_names_its_parent(trained, tiny_llama):
    import numpy as np

    from hearth.runtime.backends.base import SeqWork
    from hearth.runtime.backends.transformers import TransformersBackend

    m = read_manifest(trained)
    assert Path(m.parent.path) == tiny_llama.resolve() and m.parent.content_hash == content_hash(tiny_llama)
    be = TransformersBackend(trained, device="cpu", kv_cache_gb=0.01)
    ids = be.tokenizer.encode(be.tokenizer.apply_chat_template([{"role": "user", "content": "Why is the sky blue?"}]),
                              add_special_tokens=False)
    be.kv.allocate(0, len(ids))
    logits = be.forward([SeqWork(seq_id=0, token_ids=ids, start_pos=0)])[0]
    assert np.isfinite(logits).all()


def test_resume_continues_the_step_count_with_the_same_samples(tiny_llama, tmp_path, capsys):
    out = tmp_path / "resume"
    cfg = ppo.Config(output_dir=str(out), model=str(tiny_llama), reward_function=REWARD, method="lora", max_steps=4,
                     learning_rate=1e-2, max_completion_length=8, prompts_per_step=2, samples_per_prompt=2,
                     minibatch_size=2, ppo_epochs=2, save_every=2, keep_checkpoints=3, kl_target=1.0, kl_horizon=8)
    ppo.run(cfg)
    first = [(r["step"], r["reward"], r["kl"], r["beta"]) for r in _records(out)]
    shutil.rmtree(out / "checkpoints" / "step-4")  # as if killed after step 2's checkpoint
    ppo.run(cfg, resume=True)
    assert "resuming from" in capsys.readouterr().err
    again = [(r["step"], r["reward"], r["kl"], r["beta"]) for r in _records(out)]
    assert [s for s, *_ in again] == [1, 2, 3, 4]  # steps 3 and 4 followed step 2; nothing restarted from 1
    # the same samples and rewards, the policy, optimizer and adaptive beta restored from step 2
    assert [r for _, r, _, _ in again] == pytest.approx([r for _, r, _, _ in first], abs=1e-6)
    assert [k for _, _, k, _ in again] == pytest.approx([k for _, _, k, _ in first], rel=1e-3, abs=1e-4)
    assert [b for *_, b in again] == pytest.approx([b for *_, b in first])
    assert first[2][3] != cfg.beta  # beta had adapted before the checkpoint it was restored from
    assert (out / "adapter" / "adapter_config.json").is_file()


@pytest.mark.parametrize("fields, words", [
    ({}, "exactly one of reward_model"),
    ({"reward_function": "no_colon"}, "module:function"),
    ({"reward_function": REWARD, "lam": 1.5}, "lam"),
    ({"reward_function": REWARD, "epsilon": 0}, "epsilon"),
    ({"reward_function": REWARD, "kl_target": 0}, "kl_target"),
    ({"reward_function": REWARD, "minibatch_size": 2, "gradient_accumulation_steps": 4}, "minibatch_size"),
])
def test_bad_configs_name_the_field(fields, words):
    with pytest.raises(TrainingConfigError, match=words):
        ppo.Config(output_dir="x", **fields)


def test_a_missing_reward_model_is_named_before_any_work(tiny_llama, tmp_path):
    with pytest.raises(TrainingConfigError, match="hearth train rm"):
        ppo.run(ppo.Config(output_dir=str(tmp_path / "o"), model=str(tiny_llama), reward_model=str(tmp_path / "no")))
    assert not (tmp_path / "o").exists()


def test_the_recipe_loads_and_the_cli_lists_ppo_and_rloo_fields(capsys):
    from hearth.clients.cli import main

    cfg = load_config(ppo.Config, RECIPES / "ppo.yaml")
    assert cfg.reward_model == "runs/rm" and cfg.method == "lora" and cfg.ppo_epochs > 1
    assert cfg.prompts_per_step * cfg.samples_per_prompt == 8  # rloo.yaml's sample budget
    for stage, field in (("ppo", "ppo_epochs = 4"), ("rloo", "num_generations = 4")):
        with pytest.raises(SystemExit):
            main(["train", stage, "--help"])
        assert field in capsys.readouterr().out
