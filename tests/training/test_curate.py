"""`hearth data curate`: each rule drops exactly the records it should (exact and near duplicates, wrong
language, too short or long in characters and tokens, high perplexity under a reference model), the kept
records come out unchanged in their own format, and the report's counts match what was dropped.

    python -m pytest tests/training/test_curate.py -q             # tiny data and models, seconds
    python -m pytest tests/training/test_curate.py -q -m slow     # perplexity under the bundled model
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hearth.training import curate
from hearth.training.common import TrainingConfigError, load_config

ROOT = Path(__file__).resolve().parents[2]

LONG = ("The river town kept its old stone bridge, and every spring the fishermen repaired the nets on its "
        "low wall while children counted the boats that came back before dark; the baker sold warm rolls to "
        "anyone who stopped to watch, and the church bell rang twice when the last boat was tied up.")
# two words changed, as a scraped copy or a light edit would: Jaccard of the 5-shingles about 0.9
LONG_EDITED = LONG.replace("warm rolls", "warm buns").replace("twice", "two times")
FLUENT = [
    ("Give one tip for brewing green tea.", "Use water around 80 degrees and steep it for two minutes."),
    ("Name a planet with rings.", "Saturn has the most famous rings of any planet."),
    ("What do bees make?", "Bees make honey from the nectar of flowers."),
    ("Describe the town by the river.", LONG),
    ("用一句话介绍熊猫。", "大熊猫生活在中国的山林里，主要吃竹子。"),
    ("Explain what an API is in one sentence.", "An API is a set of rules that lets one program use another; "
                                                 "在中文里叫应用程序接口。"),
    ("What is 12 times 12?", "144"),
]


def _alpaca(q: str, a: str, **extra) -> dict:
    return {"instruction": q, "input": "", "output": a, **extra}


@pytest.fixture
def inputs(tmp_path) -> dict:
    """Two chat files, a preference file and a text corpus, with the records each rule must drop."""
    chat = [_alpaca(q, a, id=i) for i, (q, a) in enumerate(FLUENT)]
    chat += [
        # lines 8 to 13: an exact duplicate (case and spaces aside), a near one, Russian, too short, too long,
        # Japanese
        _alpaca("give one tip for  brewing GREEN tea.", "Use water around 80 degrees and steep it for two minutes.",
                id="exact"),
        _alpaca("Describe the town by the river.", LONG_EDITED, id="near"),
        _alpaca("Расскажи о погоде.", "Сегодня солнечно и тепло, идёт лёгкий ветер.", id="ru"),
        _alpaca("Hi", "Yo", id="short"),
        _alpaca("Write a long list.", "apple, " * 200, id="long"),
        _alpaca("天気はどうですか。", "今日はとても良い天気ですね。", id="ja"),
    ]
    first = tmp_path / "chat.jsonl"
    first.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in chat), encoding="utf-8")
    # a JSON array of OpenAI messages: one record repeats a record of the first file
    second = tmp_path / "more.json"
    second.write_text(json.dumps([
        {"messages": [{"role": "user", "content": "Name a planet with rings."},
                      {"role": "assistant", "content": "Saturn has the most famous rings of any planet."}]},
        {"messages": [{"role": "user", "content": "How long is a marathon?"},
                      {"role": "assistant", "content": "A marathon is 42.195 kilometres long."}]},
    ], ensure_ascii=False, indent=1), encoding="utf-8")
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text("".join(json.dumps(r) + "\n" for r in [
        {"prompt": "How should I store coffee beans?", "chosen": "In an airtight jar away from light.",
         "rejected": "In the fridge, open."},
        {"prompt": "How should I store coffee beans?", "chosen": "In an airtight jar away from light.",
         "rejected": "In the fridge, open."},
    ]), encoding="utf-8")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("The sea was calm that morning.\nGulls followed the ferry.\n\n"
                      "Der Hund läuft schnell über die Wiese.\n\nЭто текст на русском языке, его нужно убрать.\n",
                      encoding="utf-8")
    return {"chat": first, "more": second, "prefs": prefs, "corpus": corpus}


# what each rule must drop: (file name, line) -> rule
EXPECTED = {
    ("chat.jsonl", 8): "exact_duplicate",
    ("more.json", 2): "exact_duplicate",
    ("prefs.jsonl", 2): "exact_duplicate",
    ("chat.jsonl", 11): "too_short",
    ("chat.jsonl", 12): "too_long",
    ("chat.jsonl", 10): "language",
    ("chat.jsonl", 13): "language",
    ("corpus.txt", 3): "language",
    ("chat.jsonl", 9): "near_duplicate",
}
ALL_OFF = dict(exact_dedup=False, near_dedup=False, languages=[], min_chars=0, max_chars=None)


def _run(inputs: dict, tmp_path: Path, **kw) -> curate.Result:
    cfg = dict(data=[str(p) for p in inputs.values()], output_dir=str(tmp_path / "out"), min_chars=10,
               max_chars=1000)
    cfg.update(kw)
    return curate.run(curate.Config(**cfg))


def _dropped(tmp_path: Path) -> dict[tuple[str, int], str]:
    """(file, line) -> rule of every dropped record, as report.json's examples name them (run with examples=50)."""
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    drops = {}
    for rule, r in report["rules"].items():
        for e in r["examples"]:
            name, line = e["where"].rsplit(":", 1)
            drops[(name, int(line))] = rule
    return drops


def test_each_rule_drops_exactly_its_records_and_the_report_counts_them(inputs, tmp_path):
    res = _run(inputs, tmp_path, examples=50)
    drops = _dropped(tmp_path)
    assert drops == EXPECTED
    report = json.loads(res.report_json.read_text())
    expected_counts = {rule: list(EXPECTED.values()).count(rule) for rule in curate.RULES}
    assert {k: v["dropped"] for k, v in report["rules"].items()} == expected_counts == res.dropped
    assert report["total"] == 13 + 2 + 2 + 3 == res.total and report["kept"] == res.total - len(EXPECTED)
    assert sum(f["kept"] for f in report["files"]) == res.kept
    md = res.report_md.read_text()
    assert f"Kept **{res.kept}** of {res.total}" in md and "| near_duplicate | 1 |" in md
    assert "| exact_duplicate | 3 |" in md and "chat.jsonl:9" in md
    assert res.report_png is not None and res.report_png.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("rule, on", [
    ("exact_duplicate", dict(exact_dedup=True)),
    ("too_short", dict(min_chars=10)),
    ("too_long", dict(max_chars=1000)),
    ("language", dict(languages=["zh", "en"])),
    ("near_duplicate", dict(near_dedup=True)),
])
def test_each_rule_alone_drops_only_its_own_records(inputs, tmp_path, rule, on):
    _run(inputs, tmp_path, examples=50, **dict(ALL_OFF, **on))
    want = {k for k, v in EXPECTED.items() if v == rule}
    if rule == "near_duplicate":  # alone, it also catches the exact copies (similarity 1)
        want |= {k for k, v in EXPECTED.items() if v == "exact_duplicate"}
    assert set(_dropped(tmp_path)) == want


def test_kept_records_come_out_unchanged_in_their_own_format(inputs, tmp_path):
    res = _run(inputs, tmp_path)
    out = tmp_path / "out"
    assert [p.name for p in res.outputs] == ["chat.jsonl", "more.json", "prefs.jsonl", "corpus.txt"]
    src = [json.loads(x) for x in inputs["chat"].read_text().splitlines()]
    kept = [json.loads(x) for x in (out / "chat.jsonl").read_text().splitlines()]
    assert kept == [r for i, r in enumerate(src, 1) if ("chat.jsonl", i) not in EXPECTED]  # metadata (id) kept
    arr = json.loads((out / "more.json").read_text())  # still a JSON array
    assert arr == json.loads(inputs["more"].read_text())[1:]
    assert len((out / "prefs.jsonl").read_text().splitlines()) == 1
    docs = (out / "corpus.txt").read_text().split("\n\n")
    assert [d for d in docs if d.strip()] == ["The sea was calm that morning.\nGulls followed the ferry.",
                                              "Der Hund läuft schnell über die Wiese."]
    # the output reads back as training reads it
    from hearth.training.data import load_chats, load_texts
    assert len(load_chats(out / "chat.jsonl")) == len(kept) and len(load_texts(out / "corpus.txt")) == 2


def test_rankings_of_k_answers_count_as_one_record_each(tmp_path):
    lines = (ROOT / "training" / "data" / "rankings.jsonl").read_text().splitlines()
    data = tmp_path / "rankings.jsonl"
    data.write_text("\n".join(lines + [lines[2]]) + "\n")  # one ranking twice
    res = curate.run(curate.Config(data=[str(data)], output_dir=str(tmp_path / "out"),
                                   **dict(ALL_OFF, exact_dedup=True), examples=5))
    assert (res.total, res.kept, res.dropped["exact_duplicate"]) == (len(lines) + 1, len(lines), 1)
    assert res.outputs[0].read_text().splitlines() == [json.dumps(json.loads(x), ensure_ascii=False) for x in lines]
    report = json.loads(res.report_json.read_text())
    assert report["files"][0]["kind"] == "preference"
    assert report["rules"]["exact_duplicate"]["examples"][0]["where"] == f"rankings.jsonl:{len(lines) + 1}"


def test_near_duplicates_need_the_threshold_and_unrelated_texts_never_match():
    texts = [LONG, LONG_EDITED, "A completely different sentence about trains and timetables in winter.",
             LONG.replace("fishermen", "sailors")]
    found = curate.near_duplicates(texts, threshold=0.8, shingle_size=5, num_perm=128)
    assert set(found) == {1, 3} and all(j == 0 for j, _ in found.values())
    assert 0.85 <= found[1][1] < 0.95  # the exact Jaccard of the two shingle sets
    assert curate.near_duplicates(texts, threshold=0.99, shingle_size=5, num_perm=128) == {}
    # rewrites sharing about two thirds of their shingles: LSH offers most as candidates, the exact
    # Jaccard check turns every one down
    swaps = [("river", "harbour"), ("fishermen", "old sailors"), ("children", "the young"), ("baker", "grocer"),
             ("church bell", "town clock"), ("spring", "autumn"), ("boats", "small ships"), ("warm", "fresh"),
             ("stone", "brick"), ("nets", "ropes")]
    for k in range(5):
        edited = LONG
        for a, b in swaps[k:k + 6]:
            edited = edited.replace(a, b)
        g1, g2 = curate._shingles(LONG, 5), curate._shingles(edited, 5)
        assert 0.45 < len(g1 & g2) / len(g1 | g2) < 0.78
        assert curate.near_duplicates([LONG, edited], threshold=0.8, shingle_size=5, num_perm=128) == {}
    assert curate.lsh_bands(0.8, 128) == (21, 6)  # a pair at 0.8 is a candidate with odds 1 - (1 - 0.8**6)**21
    # a record dropped by an earlier rule is not a reference for later ones
    assert set(curate.near_duplicates(texts, 0.8, 5, 128, keep=[False, True, True, True])) == {3}


def test_language_shares_by_script():
    assert curate.language_shares("Hello world") == {"en": 1.0}
    zh = curate.language_shares("我们用Python写代码")
    assert zh["zh"] == pytest.approx(6 / 12) and zh["en"] == pytest.approx(6 / 12)
    assert set(curate.language_shares("今日はとても良い天気ですね")) == {"ja"}  # Han beside kana is Japanese
    assert set(curate.language_shares("Сегодня солнечно")) == {"ru"}
    assert curate.language_shares("12 + 30 = 42 🙂") == {}


def test_token_limits_count_with_the_models_tokenizer(inputs, tmp_path, tiny_llama):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    texts = {k: t for k, t in [(("chat.jsonl", i + 1), "\n".join([q, a])) for i, (q, a) in enumerate(FLUENT)]}
    n = {k: len(tok(t, add_special_tokens=False)["input_ids"]) for k, t in texts.items()}
    lo, hi = sorted(n.values())[1], sorted(n.values())[-2]
    _run({"chat": inputs["chat"]}, tmp_path, **dict(ALL_OFF, min_tokens=lo, max_tokens=hi, tokenizer=str(tiny_llama),
                                                  examples=50))
    drops = {k: v for k, v in _dropped(tmp_path).items() if k in texts}
    assert drops == {k: "too_short" for k in n if n[k] < lo} | {k: "too_long" for k in n if n[k] > hi}
    assert len(drops) >= 2


def test_bad_settings_name_the_field(tmp_path):
    with pytest.raises(TrainingConfigError, match="languages"):
        load_config(curate.Config, ROOT / "training/recipes/curate.yaml", {"languages": ["xx"]})
    with pytest.raises(TrainingConfigError, match="min_chars"):
        load_config(curate.Config, ROOT / "training/recipes/curate.yaml", {"min_chars": 50, "max_chars": 10})
    with pytest.raises(TrainingConfigError, match="data"):
        curate.run(curate.Config(data=[str(tmp_path / "missing.jsonl")], output_dir=str(tmp_path / "o")))


def test_the_bundled_recipe_runs_from_another_folder_through_the_cli(tmp_path, monkeypatch, capsys):
    from hearth.clients.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["data", "curate", "--config", "training/recipes/curate.yaml", "reference_model=null",
                 "max_tokens=null", "output_dir=cur"]) == 0
    out = capsys.readouterr().out.split()
    assert out == ["cur/instructions.jsonl", "cur/preferences.jsonl"]
    report = json.loads((tmp_path / "cur" / "report.json").read_text())
    assert report["total"] == sum(f["records"] for f in report["files"]) > 100
    with pytest.raises(SystemExit):
        main(["data", "curate", "--help"])
    help_text = capsys.readouterr().out
    assert "near_dedup_threshold = 0.8" in help_text and "perplexity_percentile = 95.0" in help_text


# ----------------------------------------------------------------------------- perplexity


# the reference model learns simple English from TRAIN; FLUENT_TEXT is new English of the same words
TRAIN = ["the cat sat in the sun.", "the dog sat on the mat and the cat ran.", "we drink tea and read a book.",
         "the sky is blue and the sun is warm.", "the sea is calm in the morning.",
         "the dog and the cat sleep at home.", "we read the news in the morning.", "the cat ran to the rug and sat.",
         "the dog ran home all day."]
FLUENT_TEXT = ["the cat sat on the mat and the dog sat on the rug.", "the dog ran to the cat and the cat ran home.",
               "the sun is warm and the sky is blue today.", "we drink tea in the morning and read the news.",
               "the cat and the dog sleep in the sun all day.", "the sky is blue and the sea is calm.",
               "we read a book and drink tea at home.", "the dog sat on the rug in the sun."]
GIBBERISH = ["xq zvkj wpfq jjxz qqkv zzpx vjkq xwzq", "9#kQ@@zx!!vP$$qJ^^w&&zK~~xQ%%jV"]


@pytest.fixture(scope="module")
def fluent_model(tmp_path_factory) -> Path:
    """A very small LLaMA after 15 quick steps on simple English: a reference that knows that English and
    nothing else (a random model scores every text alike). Measured: held-out English under 70, gibberish
    over 1000."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.conftest import build_tiny_model

    out = build_tiny_model(tmp_path_factory.mktemp("fluent"), hidden_size=32, intermediate_size=64,
                           num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    enc = tok(TRAIN, padding=True, return_tensors="pt")
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(15):
        model(**enc, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(out, safe_serialization=True)
    return out


def _text_file(tmp_path: Path, docs: list[str]) -> Path:
    p = tmp_path / "texts.jsonl"
    p.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return p


def test_perplexity_drops_the_gibberish_and_keeps_fluent_text(tmp_path, fluent_model, monkeypatch):
    docs = FLUENT_TEXT[:4] + [GIBBERISH[0]] + FLUENT_TEXT[4:] + [GIBBERISH[1]]
    data = _text_file(tmp_path, docs)
    base = dict(data=[str(data)], output_dir=str(tmp_path / "out"), **ALL_OFF, reference_model=str(fluent_model),
                batch_size=3, examples=10)
    res = curate.run(curate.Config(**base, perplexity_percentile=80.0))  # the worst 2 of 10
    kept = [json.loads(x)["text"] for x in res.outputs[0].read_text().splitlines()]
    assert kept == FLUENT_TEXT and res.dropped["perplexity"] == 2
    report = json.loads(res.report_json.read_text())
    assert {e["where"] for e in report["rules"]["perplexity"]["examples"]} == {"texts.jsonl:5", "texts.jsonl:10"}
    scores = {json.loads(x)["h"]: json.loads(x)["ppl"]
              for x in (tmp_path / "out" / curate.SCORES_FILE).read_text().splitlines()[1:]}
    assert len(scores) == 10

    # a run started again reuses the saved scores: no model is loaded; an absolute ceiling works alone
    import transformers
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        classmethod(lambda *a, **k: pytest.fail("the scores were computed again")))
    ceiling = sorted(scores.values())[-3] * 1.01  # just above the worst of the 8 fluent texts
    res = curate.run(curate.Config(**base, perplexity_percentile=None, max_perplexity=ceiling))
    assert res.dropped["perplexity"] == 2 and res.kept == 8


@pytest.mark.slow
def test_the_bundled_model_tells_gibberish_from_fluent_english_and_chinese(tmp_path):
    docs = ["The committee finished the report on Friday and sent it to every member.",
            "Green tea tastes best when the water is not quite boiling.",
            "今天天气很好，我们一起去公园散步吧。",
            "熊猫生活在中国的山林里，主要吃竹子。",
            "qzx vprk jjw ttlo mnbq zzkx wqp fhgt lkj",
            "纛龘靐齉 爨癵 驫鱻 麤 灪 龖 厵 爩"]
    data = _text_file(tmp_path, docs)
    res = curate.run(curate.Config(data=[str(data)], output_dir=str(tmp_path / "out"), **ALL_OFF,
                                   reference_model="smollm2-135m-instruct", max_perplexity=150.0))
    kept = [json.loads(x)["text"] for x in res.outputs[0].read_text().splitlines()]
    assert kept == docs[:4]
