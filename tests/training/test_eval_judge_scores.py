"""The judge's 1-10 scores (issue 19): messy replies parsed, a reply without a score asked again once and
then left unrated, per-category means by hand, both modes at once, and the Markdown per-case report.

    python -m pytest tests/training/test_eval_judge_scores.py -q
"""

from __future__ import annotations

import json

import pytest

from hearth.training.eval_judge import JudgeConfig, MalformedScoreWarning, judge, parse_score
from tests.training.test_self_instruct import fake_openai


@pytest.mark.parametrize("reply,score", [
    ("Accurate and clear.\nScore: 8", 8.0),
    ("**Rating:** 7/10", 7.0),
    ("Overall score - [[6]]", 6.0),
    ("评分：9分", 9.0),
    ("得分: 10", 10.0),
    ("I would give it 7.5 out of 10.", 7.5),
    ("It makes 3 mistakes in 2 steps.\nScore: 4", 4.0),  # other numbers are not scores
    ("Score: 2\nOn second thought the units are right.\nScore: 6", 6.0),  # the last stated
    ("<think>Score: 1</think>\nScore: 9", 9.0),
    ("Score: 85", None),  # out of range
    ("Score: 0", None),
    ("The answer is fine.", None),
    ("", None),
])
def test_parse_score(reply, score):
    assert parse_score(reply) == score


SET = [
    {"id": "q1", "question": "Question one?", "std_answer": "ref-1", "class": "math"},
    {"id": "q2", "question": "Question two?", "std_answer": "ref-2", "class": "math"},
    {"id": "q3", "question": "Question three?", "std_answer": "ref-3", "class": "code"},
    {"id": "q4", "question": "Question four?", "std_answer": "ref-4", "class": "code"},
]


def _judge_reply(body: dict) -> str:
    msgs = body["messages"]
    prompt = msgs[1]["content"] if body["model"] == "judge" else msgs[-1]["content"]
    if body["model"] == "cand":
        return "cand-" + prompt.split()[1].rstrip("?")
    if "[Assistant's answer]" not in prompt:  # pairwise: always the first position
        return "The first one.\nVerdict: A"
    asked_again = len(msgs) > 2
    return {"one": "Correct and complete.\n**Score:** 9/10",
            "two": "Partly right.\nRating: [[4]]",
            "three": "Hmm." if not asked_again else "Score: 6",  # a score only when reminded
            "four": "I cannot rate this."}[prompt.split("[Question]\nQuestion ")[1].split("?")[0]]


def test_scores_per_category_retry_and_report(tmp_path):
    data = tmp_path / "set.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in SET), encoding="utf-8")
    report = tmp_path / "judge.md"
    with fake_openai(_judge_reply) as (url, fake):
        with pytest.warns(MalformedScoreWarning, match="question q4"):
            res = judge(JudgeConfig(model_url=url, model="cand", judge_url=url, judge_model="judge", data=str(data),
                                    mode="both", report=str(report), label="cand-run"))
    by_id = {r.id: r for r in res.records}
    assert [by_id[q].rating for q in ("q1", "q2", "q3", "q4")] == [9.0, 4.0, 6.0, None]
    assert [len(by_id[q].rating_replies) for q in ("q1", "q2", "q3", "q4")] == [1, 1, 2, 2]  # retries bounded
    rating_calls = [r for r in fake.requests if r["model"] == "judge" and "[Assistant's answer]" in r["messages"][1]["content"]]
    assert len(rating_calls) == 6 and all(r["temperature"] == 0 for r in rating_calls)
    assert res.categories["math"].rating == pytest.approx(6.5) and res.categories["math"].rated == 2
    assert res.categories["code"].rating == pytest.approx(6.0) and res.categories["code"].rated == 1
    assert res.rating == pytest.approx((9 + 4 + 6) / 3) and res.unrated == 1
    assert res.score == pytest.approx(0.5)  # pairwise alongside: position bias cancels out
    md = report.read_text(encoding="utf-8")
    assert md.startswith("# Judge report: cand-run")
    assert "| math | 2 | 0.50 | 0/2/0 | 0/2 | 6.50 |" in md
    assert "| code | 2 | 0.50 | 0/2/0 | 0/2 | 6.00 |" in md
    case = md.split("### q1 (math)")[1].split("### q2")[0]
    assert "> Question one?" in case and "> ref-1" in case and "> cand-one" in case
    assert "**Rating**: 9.00 / 10" in case and "> Correct and complete." in case and "Score:" not in case
    assert "candidate as A: A, as B: A" in case
    assert "**Rating**: none given / 10" in md.split("### q4 (code)")[1]


def test_score_mode_alone_and_cli_json(tmp_path, capsys):
    data = tmp_path / "set.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in SET[:2]), encoding="utf-8")
    from hearth.clients.cli import main

    with fake_openai(_judge_reply) as (url, fake):
        assert main(["eval", "judge", "--url", url, "--model-name", "cand", "--judge-url", url, "--judge-model",
                     "judge", "--data", str(data), "--mode", "score", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["mode"] == "score" and out["score"] is None and out["rating"] == pytest.approx(6.5)
    assert not any("[Answer A]" in r["messages"][-1]["content"] for r in fake.requests)  # no pairwise calls
