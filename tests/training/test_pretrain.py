"""The pretrain stage: packing, mixing, training from scratch and continued, resume after SIGKILL.

    python -m pytest tests/training/test_pretrain.py -q            # tiny models, seconds each
    python -m pytest tests/training/test_pretrain.py -q -m slow    # a few steps on the default model
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml

from hearth.runtime.checkpoint import content_hash, read_manifest
from hearth.training.common import MetricsLog, RunDir, TrainingConfigError, load_config
from hearth.training.data import load_texts
from hearth.training.pretrain import (Config, PackedSource, effective_epochs, mixture_schedule, run,
                                      _scratch_model)

DATA = Path(__file__).resolve().parents[2] / "training" / "data"
RECIPES = Path(__file__).resolve().parents[2] / "training" / "recipes"
TINY_ARCH = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256}


@pytest.fixture(scope="module")
def tok(tiny_llama):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(tiny_llama)


def _sources(weights=(0.5, 0.5)) -> list[dict]:
    return [{"path": str(DATA / "corpus_en.txt"), "weight": weights[0], "name": "en"},
            {"path": str(DATA / "corpus_zh.txt"), "weight": weights[1], "name": "zh"}]


def _scratch(tmp_path: Path, tiny_llama: Path, **kw) -> dict:
    cfg = dict(output_dir=str(tmp_path / "out"), tokenizer=str(tiny_llama), model_config=dict(TINY_ARCH),
               sources=_sources(), block_size=32, batch_size=4, max_steps=30, learning_rate=3e-3,
               warmup_steps=3, eval_every=10, save_every=0, seed=1)
    cfg.update(kw)
    return cfg


def _config(tmp_path: Path, data: dict) -> Config:
    path = tmp_path / f"recipe-{len(list(tmp_path.glob('recipe-*')))}.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True))
    return load_config(Config, path)


# ----------------------------------------------------------------------------- packing and mixing


def test_packing_fills_every_block_with_eos_between_documents_and_no_padding(tok):
    docs = [tok.encode(d, add_special_tokens=False) for d in load_texts(DATA / "corpus_en.txt")]
    src = PackedSource("en", docs, tok.eos_token_id, block_size=48, seed=3)
    assert src.tokens == sum(len(d) + 1 for d in docs)
    n = -(-2 * src.tokens // 48)  # a little past two epochs
    blocks = [src.block(i) for i in range(n)]
    assert all(len(b) == 48 for b in blocks)  # no short block, so nothing to pad
    assert tok.pad_token_id not in {t for b in blocks for t in b}
    stream = [t for b in blocks for t in b]
    # the blocks are the stream cut at every 48 tokens: each epoch is every document once, each ended by EOS
    for epoch in range(2):
        part = stream[epoch * src.tokens:(epoch + 1) * src.tokens]
        assert part[-1] == tok.eos_token_id
        pieces, cur = [], []
        for t in part:
            if t == tok.eos_token_id:
                pieces.append(cur)
                cur = []
            else:
                cur.append(t)
        assert sorted(pieces) == sorted(docs)  # no document cut short or dropped at a block edge
    first_order = stream[:src.tokens]
    assert first_order != stream[src.tokens:2 * src.tokens]  # each epoch reshuffles its documents
    assert src.block(n - 1) == PackedSource("en", docs, tok.eos_token_id, 48, seed=3).block(n - 1)  # random access


def test_the_mixture_draws_each_source_by_its_weight_and_counts_epochs(tok):
    en = PackedSource("en", [tok.encode(d, add_special_tokens=False) for d in load_texts(DATA / "corpus_en.txt")],
                      tok.eos_token_id, 32, seed=0)
    zh = PackedSource("zh", [tok.encode(d, add_special_tokens=False) for d in load_texts(DATA / "corpus_zh.txt")],
                      tok.eos_token_id, 32, seed=0)
    schedule = mixture_schedule([3.0, 1.0], 640, seed=5)
    for prefix in range(1, 641):  # the shares hold all along, not only at the end
        assert abs(sum(s == 0 for s, _ in schedule[:prefix]) - 0.75 * prefix) <= 1.5
    counts = Counter(s for s, _ in schedule)
    assert counts[0] + counts[1] == 640 and abs(counts[0] - 480) <= 1
    assert schedule[:200] == mixture_schedule([3.0, 1.0], 200, seed=5)  # a longer run starts the same
    assert schedule != mixture_schedule([3.0, 1.0], 640, seed=6)  # the order is drawn from the seed
    assert [i for s, i in schedule if s == 1] == list(range(counts[1]))  # each source read in order
    three = Counter(s for s, _ in mixture_schedule([0.2, 0.3, 0.5], 1000, seed=0))
    assert all(abs(three[k] - 1000 * w) <= 2 for k, w in enumerate((0.2, 0.3, 0.5)))

    table = effective_epochs([en, zh], schedule)
    assert table["en"]["drawn"] == counts[0] * 32 and table["zh"]["drawn"] == counts[1] * 32
    assert table["en"]["epochs"] == pytest.approx(0.75 * 640 * 32 / en.tokens, rel=0.01)
    assert table["zh"]["epochs"] == pytest.approx(0.25 * 640 * 32 / zh.tokens, rel=0.01)
    # over whole epochs the drawn tokens are exactly the corpus, that many times over
    k = zh.tokens // math.gcd(zh.tokens, 32)  # blocks that end exactly on an epoch boundary
    drawn = Counter(t for i in range(k) for t in zh.block(i))
    epochs = k * 32 // zh.tokens
    assert drawn == Counter({t: c * epochs for t, c in Counter(t for d in zh.docs for t in d).items()})


# ----------------------------------------------------------------------------- training


def test_pretraining_from_scratch_lowers_the_loss(tmp_path, tiny_llama, tok):
    from safetensors.torch import load_file

    cfg = _config(tmp_path, _scratch(tmp_path, tiny_llama))
    out = run(cfg)
    records = MetricsLog(out / "metrics.jsonl", resume_step=10**9).read()
    losses = [r["loss"] for r in records]
    evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    assert len(losses) == 30 and len(evals) == 3
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5
    assert evals[-1] < evals[0]
    assert (out / "loss.png").stat().st_size > 1000

    init = _scratch_model(cfg, tok).state_dict()
    trained = load_file(out / "model.safetensors")
    changed = [k for k in trained if not torch.equal(trained[k], init[k])]
    assert len(changed) == len(trained)

    manifest = read_manifest(out)
    assert (manifest.stage, manifest.method, manifest.parent) == ("pretrain", "pretrain-scratch", None)
    assert set(manifest.data_hashes) == {"corpus_en.txt", "corpus_zh.txt"}
    assert manifest.metrics["tokens_per_s"] > 0 and manifest.metrics["peak_rss_mb"] > 0
    assert manifest.metrics["final_loss"] == losses[-1]
    assert set(manifest.metrics["effective_epochs"]) == {"en", "zh"}
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.vocab_size == len(AutoTokenizer.from_pretrained(out)) == len(tok)


def test_continued_pretraining_names_its_parent_and_changes_it(tmp_path, tiny_llama):
    from safetensors.torch import load_file

    cfg = _config(tmp_path, dict(output_dir=str(tmp_path / "cont"), model=str(tiny_llama), sources=_sources(),
                                 block_size=32, batch_size=4, max_steps=12, learning_rate=2e-3, warmup_steps=0,
                                 eval_every=6, save_every=0, gradient_checkpointing=True))
    out = run(cfg)
    manifest = read_manifest(out)
    assert (manifest.stage, manifest.method) == ("pretrain", "pretrain-continue")
    assert manifest.parent.path == str(tiny_llama.resolve())
    assert manifest.parent.content_hash == content_hash(tiny_llama)
    evals = [r["eval_loss"] for r in MetricsLog(out / "metrics.jsonl", resume_step=10**9).read() if "eval_loss" in r]
    assert evals[-1] < evals[0]
    before, after = load_file(tiny_llama / "model.safetensors"), load_file(out / "model.safetensors")
    assert all(not torch.equal(before[k], after[k]) for k in before if k.endswith("proj.weight"))


def test_resume_after_sigkill_ends_at_the_uninterrupted_loss(tmp_path, tiny_llama):
    """A CLI run is SIGKILLed once a checkpoint exists; `--resume` ends where an uninterrupted run ends."""
    # constant LR after warmup: the killed run (endless max_steps) and the 40-step runs share one schedule
    base = _scratch(tmp_path, tiny_llama, block_size=64, batch_size=8, learning_rate=2e-3, min_lr_ratio=1.0,
                    warmup_steps=15, save_every=5, eval_every=20, keep_checkpoints=1)
    killed_recipe = tmp_path / "killed.yaml"
    killed_recipe.write_text(yaml.safe_dump(dict(base, output_dir=str(tmp_path / "run"), max_steps=100_000)))
    resume_recipe = tmp_path / "resume.yaml"
    resume_recipe.write_text(yaml.safe_dump(dict(base, output_dir=str(tmp_path / "run"), max_steps=40)))
    hearth = Path(sys.executable).parent / "hearth"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")

    proc = subprocess.Popen([str(hearth), "train", "pretrain", "--config", str(killed_recipe)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    run_dir = RunDir(tmp_path / "run")
    deadline = time.monotonic() + 120
    while run_dir.latest() is None and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=30)
    killed_at = run_dir.latest()
    assert killed_at is not None, err.decode()[-2000:]
    assert 5 <= killed_at.step < 40 and not (tmp_path / "run" / "hearth.json").exists()

    res = subprocess.run([str(hearth), "train", "pretrain", "--config", str(resume_recipe), "--resume"], env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"resuming from {killed_at.path}" in res.stderr

    reference = run(load_config(Config, resume_recipe, overrides={"output_dir": str(tmp_path / "ref")}))
    resumed = MetricsLog(tmp_path / "run" / "metrics.jsonl", resume_step=10**9).read()
    straight = MetricsLog(reference / "metrics.jsonl", resume_step=10**9).read()
    assert [r["step"] for r in resumed] == [r["step"] for r in straight] == list(range(1, 41))
    for a, b in zip(resumed, straight):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-5), a["step"]
    assert read_manifest(tmp_path / "run").metrics["eval_loss"] == pytest.approx(
        read_manifest(reference).metrics["eval_loss"], rel=1e-4)


def test_resume_refuses_changed_data_settings_and_a_fresh_run_refuses_old_checkpoints(tmp_path, tiny_llama):
    data = _scratch(tmp_path, tiny_llama, max_steps=4, save_every=2)
    run(_config(tmp_path, data))  # leaves checkpoints/step-2
    with pytest.raises(TrainingConfigError, match="--resume"):
        run(_config(tmp_path, data))
    with pytest.raises(TrainingConfigError, match="seed"):
        run(_config(tmp_path, dict(data, seed=2)), resume=True)
    with pytest.raises(TrainingConfigError, match="block_size"):
        run(_config(tmp_path, dict(data, block_size=16)), resume=True)


@pytest.mark.parametrize("change, words", [
    ({"model_config": {}}, ["model_config", "scratch"]),
    ({"model_config": {"hidden_size": 8}}, ["model_type"]),
    ({"tokenizer": None}, ["tokenizer"]),
    ({"sources": []}, ["sources"]),
    ({"sources": [{"path": "x.txt", "weight": -1}]}, ["sources[0]", "weight"]),
    ({"sources": [{"path": "x.txt", "wieght": 1}]}, ["wieght"]),
    ({"block_size": 0}, ["block_size"]),
    ({"min_lr_ratio": 2}, ["min_lr_ratio"]),
    ({"precision": "int8"}, ["precision"]),
    ({"model": "some/checkpoint"}, ["model", "model_config"]),
])
def test_a_bad_recipe_names_the_field(tmp_path, tiny_llama, change, words):
    with pytest.raises(TrainingConfigError) as e:
        _config(tmp_path, dict(_scratch(tmp_path, tiny_llama), **change))
    for w in words:
        assert w in str(e.value)


@pytest.mark.parametrize("change, match", [
    ({"sources": [{"path": "nowhere.txt"}]}, r"sources\[0\]\.path: no file at nowhere.txt"),
    ({"block_size": 512}, "block_size: 512 exceeds"),
    ({"model_config": dict(TINY_ARCH, model_type="no-such-arch")}, "model_config.model_type"),
])
def test_problems_found_at_start_name_the_field(tmp_path, tiny_llama, change, match):
    with pytest.raises(TrainingConfigError, match=match):
        run(_config(tmp_path, dict(_scratch(tmp_path, tiny_llama), **change)))


def test_the_bundled_recipes_load():
    assert load_config(Config, RECIPES / "pretrain_tiny.yaml").model_config["model_type"] == "llama"
    assert load_config(Config, RECIPES / "pretrain_continue.yaml").model == "smollm2-135m-instruct"


@pytest.mark.slow
def test_a_few_steps_of_continued_pretraining_on_the_default_model(tmp_path):
    cfg = load_config(Config, RECIPES / "pretrain_continue.yaml",
                      overrides={"output_dir": str(tmp_path / "cont"), "max_steps": 3, "block_size": 128,
                                 "batch_size": 2, "gradient_accumulation_steps": 1, "eval_every": 3,
                                 "eval_max_blocks": 2, "save_every": 0})
    out = run(cfg)
    manifest = read_manifest(out)
    m = manifest.metrics
    print(f"default model, 3 steps of 2x128 tokens: {m['tokens_per_s']:.0f} tokens/s, "
          f"peak RSS {m['peak_rss_mb']:.0f} MB, loss {m['final_loss']:.3f}, eval loss {m['eval_loss']:.3f}")
    assert manifest.method == "pretrain-continue" and manifest.parent is not None
    assert math.isfinite(m["final_loss"]) and m["final_loss"] < 6  # a trained model, not a random one
    assert m["tokens_per_s"] > 0
