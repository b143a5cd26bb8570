"""SFT on a mixture of sources: per-source weights and epochs give the configured proportions, and plain
pretraining text mixed in (OPT-IML) trains with the loss on every token while chat examples keep the loss on
assistant tokens only, in the batches the training loop really feeds the model.

    python -m pytest tests/training/test_sft_mixture.py -q
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from hearth.runtime.checkpoint import read_manifest
from hearth.training import sft
from hearth.training.common import TrainingConfigError, load_config
from hearth.training.mixture import mixture_counts

ROOT = Path(__file__).resolve().parents[2]
TEXT = ["The river runs past the mill and under the old bridge.", "Bread rises best in a warm kitchen.",
        "Snow fell on the hills all night.", "The library opens at nine every morning."]


@pytest.fixture
def files(tmp_path) -> dict[str, Path]:
    a = tmp_path / "a.jsonl"  # 10 chats
    a.write_text("".join(json.dumps({"instruction": f"Say the number {i}.", "output": f"{i}"}) + "\n"
                         for i in range(10)))
    b = tmp_path / "b.jsonl"  # 30 chats, OpenAI form with a system turn
    b.write_text("".join(json.dumps({"messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Spell {w}."},
        {"role": "assistant", "content": " ".join(w)}]}) + "\n" for w in
        [f"word{i}" for i in range(30)]))
    text = tmp_path / "text.txt"
    text.write_text("\n\n".join(TEXT) + "\n")
    return {"a": a, "b": b, "text": text}


@pytest.fixture(scope="module")
def tok(tiny_llama):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(tiny_llama)


def _cfg(files: dict[str, Path], model: Path, tmp_path: Path, **kw) -> sft.Config:
    base = dict(model=str(model), output_dir=str(tmp_path / "out"), method="full", batch_size=4,
                gradient_accumulation_steps=1, max_length=48, learning_rate=1e-3, save_every=1000, seed=3,
                sources=[{"path": str(files["a"]), "epochs": 2}, {"path": str(files["b"])},
                         {"path": str(files["text"]), "kind": "text", "weight": 0.2, "block_size": 16}])
    base.update(kw)
    path = tmp_path / "recipe.yaml"
    import yaml
    path.write_text(yaml.safe_dump(base))
    return load_config(sft.Config, path)


def test_counts_from_epochs_and_weights():
    # epochs fix a source's count; weights beside them are fractions of the whole (OPT-IML: text 5%)
    assert mixture_counts([100, 40, 1000], [None, None, 0.05], [1, 2, None]) == \
        pytest.approx([100, 80, 180 / 0.95 * 0.05])
    # weights alone are relative shares of one pass over everything
    assert mixture_counts([10, 30], [1.0, 3.0], [None, None]) == pytest.approx([10, 30])
    assert mixture_counts([10, 30], [1.0, 1.0], [None, None]) == pytest.approx([20, 20])
    with pytest.raises(ValueError, match="sum below 1"):
        mixture_counts([10, 10], [None, 1.0], [1, None])


def test_a_mixture_yields_the_configured_proportions(files, tiny_llama, tok, tmp_path):
    cfg = _cfg(files, tiny_llama, tmp_path)
    mix = sft.mixture_rows(cfg, tok)
    # a: 10 x 2 epochs, b: 30 x 1 (the run's epochs), text: 20% of the whole -> 20 + 30 = 80% of 62.5
    assert mix.steps == 16 and len(mix) == 64  # every micro-batch full
    counts = dict(zip(["a", "b", "text"], mix.counts))
    scale = 64 / 62.5
    assert abs(counts["a"] - 20 * scale) <= 1 and abs(counts["b"] - 30 * scale) <= 1
    assert abs(counts["text"] - 12.5 * scale) <= 1
    # two epochs of a: each of its examples twice in its first 20 draws
    a_rows = [mix[k] for k, (s, i) in enumerate(mix.schedule) if s == 0 and i < 20]
    assert sorted(Counter(tuple(ids) for ids, _ in a_rows).values()) == [2] * 10
    # the proportions hold all along the run, not only at its end
    for prefix in (16, 32, 48):
        assert abs(sum(s == 2 for s, _ in mix.schedule[:prefix]) - prefix * 0.2) <= 1.5
    assert mix.table["a"]["kind"] == "chat" and mix.table["text"]["kind"] == "text"
    assert mix.table["a"]["epochs"] == pytest.approx(counts["a"] / 10, rel=0.01)

    # max_steps fixes the length; the shares stay
    long = sft.mixture_rows(_cfg(files, tiny_llama, tmp_path, max_steps=50), tok)
    c = Counter(s for s, _ in long.schedule)
    assert len(long) == 200 and abs(c[2] - 40) <= 1 and abs(c[0] - 200 * 20 / 62.5) <= 1


def test_text_trains_on_every_token_and_chats_on_assistant_tokens_in_the_loop(files, tiny_llama, tok, tmp_path,
                                                                               monkeypatch):
    fed = []
    real = sft._token_loss

    def spy(model, batch):
        fed.append({k: v.cpu().clone() for k, v in batch.items()})
        return real(model, batch)

    monkeypatch.setattr(sft, "_token_loss", spy)
    out = sft.run(_cfg(files, tiny_llama, tmp_path, max_steps=6))
    rows = [(ids[m.bool()].tolist(), lab[m.bool()].tolist())
            for b in fed for ids, lab, m in zip(b["input_ids"], b["labels"], b["attention_mask"])]
    assert len(rows) == 24
    eos = tok.eos_token_id
    text_ids = {t for d in TEXT for t in tok(d, add_special_tokens=False)["input_ids"]} | {eos}
    texts = [r for r in rows if r[1][0] != -100]  # LM examples: even the first token is labelled
    chats = [r for r in rows if r[1][0] == -100]
    assert abs(len(texts) - 24 * 0.2) <= 1.5 and texts and chats
    for ids, labels in texts:
        assert labels == ids and len(ids) == 16 and set(ids) <= text_ids  # a packed block, loss on all of it
    for ids, labels in chats:
        taught = tok.decode([t for t in labels if t != -100])
        answer = tok.decode(ids).split("<|im_start|>assistant\n")[-1].rstrip("\n")
        assert taught == answer and taught.endswith("<|im_end|>")  # the answer and its end, nothing else
        assert "Say the number" not in taught and "Spell" not in taught and "Be brief" not in taught
    manifest = read_manifest(out)
    assert set(manifest.metrics["mixture"]) == {"a", "b", "text"}
    assert sum(r["items"] for r in manifest.metrics["mixture"].values()) == 24
    assert set(manifest.data_hashes) == {"a.jsonl", "b.jsonl", "text.txt"}


def test_the_old_data_form_still_works_and_the_forms_do_not_mix(files, tiny_llama, tmp_path):
    cfg = load_config(sft.Config, ROOT / "training" / "recipes" / "sft_lora.yaml")
    assert cfg.sources is None and cfg.data == [str(ROOT / "training" / "data" / "instructions.jsonl")]
    assert sft.Config().data == cfg.data  # the default when neither is given
    with pytest.raises(TrainingConfigError, match="not both"):
        _cfg(files, tiny_llama, tmp_path, data=[str(files["a"])])
    with pytest.raises(TrainingConfigError, match="weight or epochs"):
        _cfg(files, tiny_llama, tmp_path, sources=[{"path": str(files["a"]), "weight": 1, "epochs": 1}])
    with pytest.raises(TrainingConfigError, match="chat source"):
        _cfg(files, tiny_llama, tmp_path, sources=[{"path": str(files["text"]), "kind": "text"}])


def test_the_bundled_mixture_recipe_finds_its_data_from_another_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(sft.Config, "training/recipes/sft_mixture.yaml")
    assert {s.kind for s in cfg.sources} == {"chat", "text"}
    assert all(Path(s.path).is_file() and Path(s.path).is_absolute() for s in cfg.sources)
