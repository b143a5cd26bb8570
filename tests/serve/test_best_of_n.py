"""The chat extension `best_of_n` (issue 19, the LaMDA pattern): n answers are sampled, a reward model
trained by `hearth train rm` scores each, and the served answer is the one it scores highest. A tiny
random LLaMA answers and a tiny reward model (its own random score head) judges.

    python -m pytest tests/serve/test_best_of_n.py -q
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from hearth.runtime.reward import RewardScorer
from hearth.serve.config import ConfigError, ModelConfig, RewardModelConfig, ServeConfig

from tests.serve.conftest import API_KEY, start_server

MSGS = [{"role": "user", "content": "Name a colour."}]


@pytest.fixture(scope="module")
def reward_dir(tiny_llama, tmp_path_factory) -> Path:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(3)
    out = tmp_path_factory.mktemp("rm")
    model = AutoModelForSequenceClassification.from_pretrained(tiny_llama, num_labels=1)
    model.config.pad_token_id = model.config.eos_token_id
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(tiny_llama).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def server(tiny_llama, reward_dir):
    cfg = ServeConfig(models=[ModelConfig(name="tiny", path=str(tiny_llama), backend="transformers",
                                          context_length=256)],
                      embeddings=[], agents=None, port=0, api_keys=[API_KEY], request_timeout_s=120,
                      reward_models=[RewardModelConfig(name="judge", path=str(reward_dir), max_n=6)])
    with start_server(cfg) as s:
        yield s


def _post(server, **body) -> httpx.Response:
    with server.http() as h:
        return h.post("/v1/chat/completions", json={"model": "tiny", "messages": MSGS, "max_tokens": 8, **body})


def test_the_served_answer_is_the_reward_models_argmax(server, reward_dir):
    r = _post(server, temperature=1.0, seed=7, best_of_n={"n": 4, "reward_model": "judge"})
    assert r.status_code == 200, r.text
    out = r.json()
    best = out["best_of_n"]
    assert best["reward_model"] == "judge" and best["n"] == 4 and len(best["scores"]) == 4
    assert len(set(best["scores"])) > 1  # four different samples, four different scores
    assert best["chosen"] == max(range(4), key=best["scores"].__getitem__)
    assert len(out["choices"]) == 1 and out["choices"][0]["index"] == 0
    # the answer returned is the one that got the top score: the reward model, loaded here, agrees
    answer = out["choices"][0]["message"]["content"]
    again = RewardScorer.load(reward_dir, device="cpu").score_chats([MSGS + [{"role": "assistant", "content": answer}]])
    assert again[0] == pytest.approx(max(best["scores"]), abs=1e-4)
    # every sample's tokens are paid for
    assert out["usage"]["completion_tokens"] > max(1, len(answer.split()))


@pytest.mark.parametrize("body, param", [
    ({"best_of_n": {"n": 4}, "stream": True}, "best_of_n"),
    ({"best_of_n": {"n": 4}, "n": 2}, "n"),
    ({"best_of_n": {"n": 4, "reward_model": "nope"}}, "best_of_n.reward_model"),
    ({"best_of_n": {"n": 7}}, "best_of_n.n"),
    ({"best_of_n": {"n": 2}, "logprobs": True}, "logprobs"),
    ({"best_of_n": {"n": 2}, "reasoning": {"strategy": "plain"}}, "best_of_n"),
])
def test_what_best_of_n_cannot_do_is_a_400_naming_it(server, body, param):
    r = _post(server, **body)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_a_reward_model_entry_is_checked_when_the_config_loads():
    with pytest.raises(ConfigError, match="max_n"):
        ServeConfig(reward_models=[{"name": "j", "path": "x", "max_n": 1}])
    with pytest.raises(ConfigError, match="unique"):
        ServeConfig(reward_models=[{"name": "j", "path": "x"}, {"name": "j", "path": "y"}])
