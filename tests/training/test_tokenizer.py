"""The tokenizer stage: a fresh byte-level BPE, and extending a model's vocabulary with Chinese tokens.

    python -m pytest tests/training/test_tokenizer.py -q            # tiny models, seconds
    python -m pytest tests/training/test_tokenizer.py -q -m slow    # the default model
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from hearth.runtime import Engine, GenerationRequest, SamplingParams
from hearth.runtime.backends.transformers import TransformersBackend
from hearth.runtime.checkpoint import content_hash, read_manifest
from hearth.training.common import TrainingConfigError, load_config
from hearth.training.tokenizer import Config, run

from tests.conftest import build_tiny_model

DATA = Path(__file__).resolve().parents[2] / "training" / "data"
RECIPES = Path(__file__).resolve().parents[2] / "training" / "recipes"
# Chinese and English text that is not in the bundled corpora: gains must carry over to unseen text.
HELD_OUT_ZH = ("我们今天下午一起去图书馆看书，然后在街角的小店喝一杯热茶。\n\n"
               "春天的时候，院子里的树慢慢发芽，孩子们在外面学骑自行车。\n\n"
               "妈妈说做饭最重要的是耐心，火候到了，味道自然就出来了。")
HELD_OUT_EN = "The quick brown fox jumps over the lazy dog.\n\nTea is best brewed with water just off the boil."


def _texts(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "zh.txt").write_text(HELD_OUT_ZH, encoding="utf-8")
    (tmp_path / "en.txt").write_text(HELD_OUT_EN, encoding="utf-8")
    return {"zh": str(tmp_path / "zh.txt"), "en": str(tmp_path / "en.txt")}


def _greedy(path: Path, prompt: str, n: int = 8) -> list[int]:
    engine = Engine(TransformersBackend(path, dtype="float32", device="cpu", kv_cache_gb=0.02))
    try:
        ids = engine.tokenizer.encode(prompt)
        params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
        return engine.generate_sync(GenerationRequest(prompt_token_ids=ids, params=params))[0].token_ids
    finally:
        engine.shutdown()


@pytest.mark.parametrize("tied", [False, True])
def test_extension_shortens_chinese_keeps_old_ids_and_the_model_still_generates(tmp_path, tied):
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    parent = build_tiny_model(tmp_path / "parent", tie_word_embeddings=tied)
    out = run(Config(output_dir=str(tmp_path / "ext"), mode="extend", model=str(parent),
                     data=[str(DATA / "corpus_zh.txt")], new_tokens=400, compare=_texts(tmp_path)))

    old, new = AutoTokenizer.from_pretrained(parent), AutoTokenizer.from_pretrained(out)
    old_vocab, new_vocab = old.get_vocab(), new.get_vocab()
    assert all(new_vocab[t] == i for t, i in old_vocab.items())  # the old model reads its own tokens
    added = sorted(set(new_vocab) - set(old_vocab), key=new_vocab.get)
    assert len(added) > 100 and new_vocab[added[0]] == len(old_vocab)
    for text in (HELD_OUT_EN, "user assistant <|im_start|> 123"):  # text without new pieces: same ids
        assert new.encode(text, add_special_tokens=False) == old.encode(text, add_special_tokens=False)
    for text in (HELD_OUT_ZH, "混合 mixed 文本 🙂 and emoji"):
        assert new.decode(new.encode(text, add_special_tokens=False)) == text

    table = read_manifest(out).metrics["chars_per_token"]
    assert table["zh"]["chars_per_token_after"] > 1.5 * table["zh"]["chars_per_token_before"]
    assert table["en"]["tokens_after"] == table["en"]["tokens_before"]
    zh_ids = new.encode(HELD_OUT_ZH, add_special_tokens=False)
    assert len(zh_ids) < len(old.encode(HELD_OUT_ZH, add_special_tokens=False)) and max(zh_ids) >= len(old_vocab)

    # embeddings: one row per token, old rows untouched, new rows the mean of the old ones (input and output)
    before, after = load_file(parent / "model.safetensors"), load_file(out / "model.safetensors")
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == len(new) and config["tie_word_embeddings"] == tied
    names = ["model.embed_tokens.weight"] + ([] if tied else ["lm_head.weight"])
    for name in names:
        n_old = before[name].shape[0]
        assert after[name].shape[0] == len(new)
        assert torch.equal(after[name][:n_old], before[name])
        assert torch.allclose(after[name][n_old:], before[name].mean(0).expand(len(new) - n_old, -1), atol=1e-6)
    assert ("lm_head.weight" in after) == (not tied)

    manifest = read_manifest(out)
    assert (manifest.stage, manifest.method) == ("base", "tokenizer-extend")
    assert manifest.parent.path == str(parent.resolve()) and manifest.parent.content_hash == content_hash(parent)
    assert manifest.metrics["added_tokens"] == len(added)

    # the extended model loads in hearth's runtime and generates; on old tokens it behaves as before
    assert len(_greedy(out, "你好，世界")) == 8
    assert _greedy(out, "The quick brown fox") == _greedy(parent, "The quick brown fox")


def test_a_trained_tokenizer_round_trips_any_text_and_renders_chat(tmp_path):
    from transformers import AutoTokenizer

    out = run(Config(output_dir=str(tmp_path / "tok"), mode="train", vocab_size=800,
                     data=[str(DATA / "corpus_en.txt"), str(DATA / "corpus_zh.txt")], compare=_texts(tmp_path)))
    tok = AutoTokenizer.from_pretrained(out)
    assert 600 < len(tok) <= 800
    assert [tok.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")] == [0, 1, 2]
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    for text in ("你好，世界！今天天气很好。", "龘 is rare; so is 𠀀", "Emoji 🙂🔥🚀 and ZWJ 👩‍💻",
                 "  leading spaces\tand tabs\n\nnew lines 1234567", "mixed 中英 text, ümlauts café"):
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text
    assert len(tok.encode("我们", add_special_tokens=False)) == 1  # a frequent word became one token
    chat = tok.apply_chat_template([{"role": "user", "content": "你好"}], tokenize=False, add_generation_prompt=True)
    assert chat.endswith("<|im_start|>assistant\n") and "<|im_start|>user\n你好<|im_end|>" in chat
    ids = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert tok.convert_tokens_to_ids("<|im_start|>") in ids

    manifest = read_manifest(out)
    assert (manifest.stage, manifest.method, manifest.parent) == ("base", "tokenizer-train", None)
    assert set(manifest.data_hashes) == {"corpus_en.txt", "corpus_zh.txt"}
    # unseen Chinese text still beats raw UTF-8 bytes (3 per character) by far: characters were learned
    assert manifest.metrics["chars_per_token"]["zh"]["chars_per_token_after"] > 0.6


@pytest.mark.parametrize("text, words", [
    ("output_dir: o\nmode: extend\n", ["model", "extend"]),
    ("output_dir: o\nmode: train\neos_token: </s>\n", ["eos_token", "special_tokens"]),
    ("output_dir: o\nmode: merge\n", ["mode", "'extend'"]),
    ("output_dir: o\nvocab_size: 100\n", ["vocab_size"]),
    ("output_dir: o\nnew_tokens: lots\n", ["new_tokens", "integer"]),
    ("output_dir: o\ndata: []\n", ["data"]),
])
def test_a_bad_recipe_names_the_field(tmp_path, text, words):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text)
    with pytest.raises(TrainingConfigError) as e:
        load_config(Config, recipe)
    for w in words:
        assert w in str(e.value)


def test_a_missing_corpus_or_model_is_named(tmp_path):
    with pytest.raises(TrainingConfigError, match=r"data\[0\]: no file at nowhere.txt"):
        run(Config(output_dir=str(tmp_path / "o"), data=["nowhere.txt"]))
    with pytest.raises(TrainingConfigError, match="model: "):
        run(Config(output_dir=str(tmp_path / "o"), mode="extend", model=str(tmp_path / "no-model"),
                   data=[str(DATA / "corpus_zh.txt")]))


def test_the_bundled_recipes_load():
    for name in ("tokenizer_extend.yaml", "tokenizer_train.yaml"):
        cfg = load_config(Config, RECIPES / name)
        assert cfg.mode in ("extend", "train")


@pytest.mark.slow
def test_extend_the_default_model_on_the_chinese_corpus(tmp_path):
    """Prints chars/token before and after for the default model (SmolLM2-135M) on both corpora."""
    cfg = load_config(Config, RECIPES / "tokenizer_extend.yaml", overrides={"output_dir": str(tmp_path / "ext")})
    out = run(cfg)
    table = read_manifest(out).metrics["chars_per_token"]
    print(json.dumps(table, indent=1))
    assert table["zh"]["chars_per_token_after"] > 1.5 * table["zh"]["chars_per_token_before"]
    assert table["en"]["chars_per_token_after"] >= table["en"]["chars_per_token_before"]
    assert len(_greedy(out, "今天天气很好，我们", n=6)) == 6
