"""Generation metrics (issue 19): BLEU, ROUGE, exact match and F1 on strings whose values are worked out by
hand, Chinese scored by character, and `hearth eval gen` against a canned OpenAI server, two targets side
by side.

    python -m pytest tests/training/test_eval_gen.py -q
"""

from __future__ import annotations

import json
import math

import pytest

from hearth.training.common import TrainingDataError
from hearth.training.eval_gen import (GenConfig, bleu, exact_match, f1_score, gen, normalize_answer, read_gen_set,
                                      rouge)
from tests.training.test_self_instruct import closed_port_url, fake_openai


def test_bleu_by_hand():
    assert bleu(["the cat sat on the mat"], [["the cat sat on the mat"]]) == pytest.approx(100.0)
    # every n-gram precision is 1 (5 of 5, 4 of 4, 3 of 3, 2 of 2); the brevity penalty is exp(1 - 6/5)
    assert bleu(["a b c d e"], [["a b c d e f"]]) == pytest.approx(100 * math.exp(1 - 6 / 5))
    # Chinese by character: 7 of the reference's 9 characters, all n-grams right: exp(1 - 9/7)
    assert bleu(["我爱北京天安门"], [["我爱北京天安门广场"]]) == pytest.approx(100 * math.exp(1 - 9 / 7))
    # two references: the closer length (6) sets the penalty, each n-gram may match either reference
    assert bleu(["a b c d e f"], [["a b c d e f", "x y z"]]) == pytest.approx(100.0)


def test_rouge_by_hand():
    r = rouge(["the cat is on the mat"], [["the cat sat on the mat"]])
    assert r["rouge1"] == pytest.approx(100 * 5 / 6)  # 5 of 6 words in common either way
    assert r["rouge2"] == pytest.approx(100 * 3 / 5)  # the cat, on the, the mat
    assert r["rougeL"] == pytest.approx(100 * 5 / 6)
    zh = rouge(["我爱北京"], [["我爱上海"]])  # characters, which rouge-score's own tokenizer would drop
    assert (zh["rouge1"], zh["rouge2"]) == (pytest.approx(50.0), pytest.approx(100 / 3))
    best = rouge(["a b"], [["c d", "a b"]])  # the best reference counts
    assert best["rouge1"] == pytest.approx(100.0)


@pytest.mark.parametrize("pred,refs,em,f1", [
    ("The Cat!", ["cat"], 1.0, 1.0),  # case, punctuation and articles do not count
    ("the cat sat", ["a cat sat down"], 0.0, 0.8),  # P = 2/2, R = 2/3
    ("Paris", ["London", "paris."], 1.0, 1.0),  # the best reference
    ("北京天安门", ["北京"], 0.0, 2 * 0.4 * 1 / 1.4),  # characters: P = 2/5, R = 2/2
    ("北京。", ["北京"], 1.0, 1.0),  # Chinese punctuation is punctuation
    ("", ["x"], 0.0, 0.0),
])
def test_exact_match_and_f1_squad_style(pred, refs, em, f1):
    assert exact_match(pred, refs) == em
    assert f1_score(pred, refs) == pytest.approx(f1)


def test_normalize_answer():
    assert normalize_answer("  An Apple, the PIE!  ") == "apple pie"


def test_gen_set_errors_name_line_and_field(tmp_path):
    f = tmp_path / "pairs.jsonl"
    f.write_text(json.dumps({"prompt": "p", "reference": "r"}) + "\n" + json.dumps({"prompt": "p"}) + "\n",
                 encoding="utf-8")
    with pytest.raises(TrainingDataError, match=r"pairs.jsonl:2: field 'reference'"):
        read_gen_set(f)


PAIRS = [{"id": "1", "prompt": "Capital of France?", "reference": "Paris"},
         {"id": "2", "prompt": "Say the sentence.", "reference": "the cat sat on the mat"},
         {"id": "3", "prompt": "中国的首都？", "reference": ["北京", "北京市"]}]
REPLIES = {"Capital of France?": "Paris.", "Say the sentence.": "the cat is on the mat", "中国的首都？": "北京"}


def test_gen_against_a_server_and_two_targets_side_by_side(tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in PAIRS), encoding="utf-8")
    with fake_openai(lambda body: REPLIES[body["messages"][-1]["content"]]) as (url, fake):
        res = gen(GenConfig(data=str(data), url=url, model_name="m", max_tokens=32, concurrency=2))
        assert res.n == 3 and res.errors == 0
        assert res.exact_match == pytest.approx(200 / 3)  # Paris, 北京
        assert res.f1 == pytest.approx(100 * (1 + 3 / 4 + 1) / 3)  # articles dropped: cat is on mat / cat sat on mat
        assert all(r["max_tokens"] == 32 and r["temperature"] == 0 for r in fake.requests)

        from hearth.clients.cli import main

        out, md = tmp_path / "gen.json", tmp_path / "gen.md"
        assert main(["eval", "gen", "--data", str(data), "--url", url, "--url", url, "--model-name", "m",
                     "--model-name", "other", "--output", str(out), "--markdown", str(md)]) == 0
    table = md.read_text(encoding="utf-8")
    host = url.split("//")[1]
    assert f"| | m@{host} | other@{host} |" in table
    assert f"| exact match % | {res.exact_match:.2f} | {res.exact_match:.2f} |" in table
    saved = json.loads(out.read_text(encoding="utf-8"))["targets"]
    assert [s["records"][0]["answer"] for s in saved] == ["Paris.", "Paris."]


def test_gen_with_no_server_fails_clearly(tmp_path, capsys):
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps(PAIRS[0]) + "\n", encoding="utf-8")
    from hearth.clients.cli import main

    with pytest.warns(RuntimeWarning):
        assert main(["eval", "gen", "--data", str(data), "--url", closed_port_url(), "--model-name", "m",
                     "--max-retries", "0"]) == 2
    assert "no prompt was answered" in capsys.readouterr().err


def test_gen_against_a_checkpoint_serves_it_in_process(tiny_llama, tmp_path):
    """`--model PATH`: the checkpoint is served by hearth on 127.0.0.1 for the run, then stopped."""
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in PAIRS[:2]), encoding="utf-8")
    from hearth.clients.cli import main

    out = tmp_path / "gen.json"
    assert main(["eval", "gen", "--data", str(data), "--model", str(tiny_llama), "--max-tokens", "4",
                 "--output", str(out)]) == 0
    saved = json.loads(out.read_text(encoding="utf-8"))
    assert saved["target"] == tiny_llama.name and saved["n"] == 2 and saved["errors"] == 0
    assert all(r["answer"] is not None for r in saved["records"]) and 0 <= saved["bleu"] <= 100
