"""The DPO stage: the chosen-minus-rejected margin rises, the policy changes and loads in hearth's runtime, the
manifest names its parent, bad data names file/line/field, and a SIGKILLed run resumes to the same losses.

    python -m pytest tests/training/test_dpo.py -q
    python -m pytest tests/training/test_dpo.py -q -m slow     # a few steps on the default model
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hearth.runtime.checkpoint import content_hash, read_manifest
from hearth.training import dpo
from hearth.training.common import TrainingConfigError, TrainingDataError, load_config

RECIPES = Path(dpo.__file__).parent / "recipes"
ROOT = Path(dpo.__file__).resolve().parent.parent


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _greedy(path: Path, prompt: str, n: int = 6) -> list[int]:
    """Greedy tokens from hearth's own runtime (the engine's backend, one forward per token)."""
    import numpy as np

    from hearth.runtime.backends.base import SeqWork
    from hearth.runtime.backends.transformers import TransformersBackend

    be = TransformersBackend(path, device="cpu", kv_cache_gb=0.01)
    ids = be.tokenizer.encode(be.tokenizer.apply_chat_template([{"role": "user", "content": prompt}]),
                              add_special_tokens=False)
    be.kv.allocate(0, len(ids) + n)
    out, pos, feed = [], 0, ids
    for _ in range(n):
        logits = be.forward([SeqWork(seq_id=0, token_ids=feed, start_pos=pos)])[0]
        pos += len(feed)
        feed = [int(np.argmax(logits))]
        out += feed
    return out


@pytest.fixture(scope="module")
def trained(tiny_llama, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dpo") / "out"
    cfg = dpo.Config(output_dir=str(out), model=str(tiny_llama), method="full", max_steps=20, batch_size=4,
                     learning_rate=1e-3, save_every=10, eval_fraction=0.2)
    dpo.run(cfg)
    return out


def test_dpo_raises_the_chosen_minus_rejected_margin(trained):
    recs = [r for r in _records(trained) if "rewards/margins" in r]
    assert recs[0]["step"] == 1 and recs[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-5)  # policy == reference
    margins = [r["rewards/margins"] for r in recs]
    assert sum(margins[-5:]) / 5 > 1.0 > sum(margins[:5]) / 5
    m = read_manifest(trained).metrics
    assert m["train_margin"] > 1.0 and m["train_accuracy"] > 0.9
    assert "heldout_margin" in m and m["heldout_pairs"] >= 1
    losses = [r["loss"] for r in recs]
    assert sum(losses[-5:]) < sum(losses[:5])


def test_the_policy_changes_loads_in_the_runtime_and_names_its_parent(trained, tiny_llama):
    from safetensors.torch import load_file

    before, after = load_file(str(tiny_llama / "model.safetensors")), load_file(str(trained / "model.safetensors"))
    key = "model.layers.1.mlp.down_proj.weight"
    assert not (before[key] == after[key]).all()
    m = read_manifest(trained)
    assert (m.stage, m.method) == ("rlhf", "dpo")
    assert Path(m.parent.path) == tiny_llama.resolve() and m.parent.content_hash == content_hash(tiny_llama)
    assert "preferences.jsonl" in m.data_hashes and m.parameters["beta"] == 0.1
    assert len(_greedy(trained, "What is the capital of Australia?")) == 6


def test_lora_dpo_merges_the_adapter_and_keeps_it(tiny_llama, tmp_path):
    out = tmp_path / "lora"
    dpo.run(dpo.Config(output_dir=str(out), model=str(tiny_llama), method="lora", max_steps=6, batch_size=4,
                       learning_rate=1e-2, save_every=6))
    assert (out / "adapter" / "adapter_config.json").is_file() and not (out / "adapter_config.json").exists()
    margins = [r["rewards/margins"] for r in _records(out) if "rewards/margins" in r]
    assert margins[-1] > margins[0]
    assert _greedy(out, "hi") != _greedy(tiny_llama, "hi") or read_manifest(out).metrics["train_margin"] > 0.1


def test_bad_preference_data_names_the_file_line_and_field(tiny_llama, tmp_path):
    data = tmp_path / "prefs.jsonl"
    data.write_text('{"prompt": "hi", "chosen": "hello", "rejected": "go away"}\n'
                    '{"prompt": "hi", "chosen": 7, "rejected": "no"}\n', encoding="utf-8")
    with pytest.raises(TrainingDataError) as e:
        dpo.run(dpo.Config(output_dir=str(tmp_path / "o"), model=str(tiny_llama), data=str(data)))
    assert str(data) in str(e.value) and ":2" in str(e.value) and "chosen" in str(e.value)


def test_the_recipe_loads_and_bad_values_name_the_field():
    cfg = load_config(dpo.Config, RECIPES / "dpo.yaml")
    assert cfg.method == "lora" and cfg.beta == 0.1
    with pytest.raises(TrainingConfigError, match="beta"):
        load_config(dpo.Config, RECIPES / "dpo.yaml", overrides={"beta": 0})


def test_a_killed_run_resumes_to_the_same_losses(tiny_llama, tmp_path):
    recipe = tmp_path / "dpo.yaml"
    out = tmp_path / "killed"
    recipe.write_text(f"model: {tiny_llama}\noutput_dir: {out}\nlora: false\nmax_steps: 16\nbatch_size: 4\n"
                      f"learning_rate: 1.0e-3\nsave_every: 3\neval_fraction: 0.0\n")
    cli = [sys.executable, "-c", "from hearth.clients.cli import main; raise SystemExit(main())",
           "train", "dpo", "--config", str(recipe)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.Popen(cli, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not list((out / "checkpoints").glob("step-*")):
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "no checkpoint within 120 s"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    assert not (out / "hearth.json").exists(), "the run finished before it could be killed"
    done_before = max(r["step"] for r in _records(out))
    assert done_before < 16

    resumed = subprocess.run(cli + ["--resume"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in resumed.stderr

    ref = tmp_path / "uninterrupted"
    dpo.run(load_config(dpo.Config, recipe, overrides={"output_dir": str(ref)}))
    got = [r for r in _records(out) if "loss" in r]
    want = [r for r in _records(ref) if "loss" in r]
    assert [r["step"] for r in got] == list(range(1, 17))  # each step once: the killed run's extra lines dropped
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in want], rel=1e-3, abs=1e-4)
    assert read_manifest(out).metrics["final_loss"] == pytest.approx(read_manifest(ref).metrics["final_loss"],
                                                                       rel=1e-3, abs=1e-4)


@pytest.mark.slow
def test_a_few_lora_dpo_steps_on_the_default_model_from_the_recipe(tmp_path):
    from hearth.runtime.registry import resolve_model

    data = tmp_path / "prefs.jsonl"  # 8 of the bundled pairs: the closing evaluation stays short too
    data.write_text("".join(dpo.BUNDLED_PREFERENCES.read_text(encoding="utf-8").splitlines(True)[:8]),
                    encoding="utf-8")
    cfg = load_config(dpo.Config, RECIPES / "dpo.yaml",
                      overrides={"max_steps": 3, "batch_size": 2, "save_every": 3, "eval_fraction": 0.25,
                                 "data": str(data), "output_dir": str(tmp_path / "dpo")})
    out = dpo.run(cfg)
    m = read_manifest(out)
    assert (m.stage, m.method) == ("rlhf", "dpo")
    assert m.parent.content_hash == content_hash(resolve_model("smollm2-135m-instruct", prefer="hf"))
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    losses = [r["loss"] for r in _records(out) if "loss" in r]
    assert len(losses) == 3 and all(x == x for x in losses)  # no NaN
    assert len(_greedy(out, "你好")) == 6
