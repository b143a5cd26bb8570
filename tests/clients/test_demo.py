"""The Gradio demo's HTTP side (clients/demo_client.py) against fake servers: probing, streamed answers with
citations, reasoning votes and tool steps, uploads, and clear messages for a wrong key or a server that is down."""

from __future__ import annotations

import base64
import json
import socket
import subprocess
import sys

import httpx
import pytest

from hearth.clients.demo_client import (
    ChatSettings,
    DemoError,
    Event,
    answer,
    ingest,
    probe,
    render,
    thinking,
)

URL = "http://hearth.test/v1"


def sse(*objs) -> bytes:
    return b"".join(b"data: " + (o if isinstance(o, bytes) else json.dumps(o).encode()) + b"\n\n" for o in objs)


def chunk(content=None, finish=None, choices=True, **extra) -> dict:
    c = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 0, "model": "m", **extra,
         "choices": []}
    if choices:
        c["choices"] = [{"index": 0, "delta": {"content": content} if content is not None else {},
                         "finish_reason": finish}]
    return c


class FakeServer:
    """Answers hearth's routes from a table {(method, path): (status, body | bytes)}; records requests."""

    def __init__(self, routes: dict, key: str | None = "sk-good"):
        self.routes, self.key, self.seen = routes, key, []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content) if request.content else None
        self.seen.append((request.method, request.url.path, body))
        if self.key and request.headers.get("authorization") != f"Bearer {self.key}":
            return httpx.Response(401, json={"error": {"message": "Incorrect API key provided.",
                                                       "type": "invalid_request_error", "param": None,
                                                       "code": "invalid_api_key"}})
        status, out = self.routes.get((request.method, request.url.path), (404, {"detail": "Not Found"}))
        if isinstance(out, bytes):
            return httpx.Response(status, content=out, headers={"content-type": "text/event-stream"})
        return httpx.Response(status, json=out)

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self)

    def body(self, path: str) -> dict:
        return next(b for m, p, b in self.seen if p == path)


MODELS = {"object": "list", "data": [
    {"id": "smollm2", "object": "model", "backend": "llamacpp"},
    {"id": "all-minilm-l6-v2", "object": "model", "type": "embedding", "dimensions": 384},
]}


async def collect(server: FakeServer, settings: ChatSettings, conv=(), question="q", key="sk-good"):
    events = [e async for e in answer(URL, key, settings, list(conv), question, transport=server.transport())]
    history = [{"role": "user", "content": question}]
    if settings.strategy != "direct":
        history.append(thinking(settings.strategy, settings.n))
    for e in events:
        history = render(history, e)
    return events, history


def titles(history) -> list[str]:
    return [(m.get("metadata") or {}).get("title", "") for m in history if (m.get("metadata") or {}).get("title")]


# ---- probing ------------------------------------------------------------------------------------

async def test_probe_finds_chat_models_and_hearth_routes():
    server = FakeServer({("GET", "/v1/models"): (200, MODELS),
                         ("GET", "/v1/rag/indexes"): (200, {"object": "list", "data": [{"id": "notes"}]}),
                         ("POST", "/v1/agents/runs"): (400, {"error": {"message": "give exactly one of"}})})
    info = await probe(URL, "sk-good", transport=server.transport())
    assert info.models == ["smollm2"]  # the embedding model is not a chat model
    assert info.rag and info.agents and info.indexes == ["notes"]
    assert "off" not in info.note(URL)


async def test_probe_of_a_plain_openai_server_turns_the_extras_off():
    server = FakeServer({("GET", "/v1/models"): (200, {"data": [{"id": "gpt-x", "object": "model"}]})}, key=None)
    info = await probe(URL, None, transport=server.transport())
    assert info.models == ["gpt-x"] and not info.rag and not info.agents
    note = info.note(URL)
    assert "/v1/rag" in note and "/v1/agents" in note
    assert all("authorization" not in str(s) for s in server.seen)


# ---- clear messages ----------------------------------------------------------------------------

async def test_wrong_key_is_a_clear_message():
    server = FakeServer({("GET", "/v1/models"): (200, MODELS)})
    with pytest.raises(DemoError, match="refused the API key") as e:
        await probe(URL, "sk-wrong", transport=server.transport())
    assert "Traceback" not in str(e.value)
    with pytest.raises(DemoError, match="refused the API key.*401"):
        await collect(server, ChatSettings(model="smollm2"), key="sk-wrong")
    with pytest.raises(DemoError, match="refused the API key"):
        await collect(server, ChatSettings(model="smollm2", strategy="tools"), key="sk-wrong")


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens here once the socket is closed


@pytest.mark.parametrize("strategy", ["direct", "tools"])
async def test_server_down_is_a_clear_message(strategy, tmp_path):
    url = f"http://127.0.0.1:{closed_port()}/v1"
    with pytest.raises(DemoError, match="Cannot reach the server at .* is it running"):
        await probe(url, None)
    with pytest.raises(DemoError, match="Cannot reach the server"):
        async for _ in answer(url, None, ChatSettings(model="m", strategy=strategy), [], "hi"):
            pass
    with pytest.raises(DemoError, match="Cannot reach the server"):
        (tmp_path / "a.txt").write_text("text")
        await ingest(url, None, "notes", [str(tmp_path / "a.txt")])


@pytest.mark.parametrize("status, body, expected", [
    (503, {"error": {"message": "The models are still loading.", "code": None}}, "not ready (503): The models"),
    (404, {"error": {"message": "The model 'x' does not exist.", "code": "model_not_found"}}, "Press Refresh"),
    (400, {"error": {"message": "top_p must be in (0, 1]", "param": "top_p"}}, "answered 400: top_p"),
])
async def test_server_errors_are_explained(status, body, expected):
    server = FakeServer({("POST", "/v1/chat/completions"): (status, body)})
    with pytest.raises(DemoError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        await collect(server, ChatSettings(model="x"))


async def test_an_error_inside_the_stream_is_a_clear_message():
    server = FakeServer({("POST", "/v1/chat/completions"): (200, sse(
        chunk("Hel"), {"error": {"message": "The engine stopped.", "type": "server_error"}}))})
    with pytest.raises(DemoError, match="The engine stopped"):
        await collect(server, ChatSettings(model="m"))
    server = FakeServer({("POST", "/v1/agents/runs"): (200, sse(
        {"object": "agent.run.start", "id": "run_1"}, {"error": {"message": "budget exhausted"}}))})
    with pytest.raises(DemoError, match="agent run failed: budget exhausted"):
        await collect(server, ChatSettings(model="m", strategy="tools"))


def test_settings_need_a_model():
    with pytest.raises(DemoError, match="Pick a model"):
        ChatSettings(model="")


# ---- answers ------------------------------------------------------------------------------------

CITES = [{"index": 1, "source": "keeper.md", "start": 0, "end": 40, "score": 0.83,
          "text": "The lighthouse keeper is Ada Finch."}]


async def test_streamed_chat_with_history_system_prompt_and_citations():
    server = FakeServer({("POST", "/v1/chat/completions"): (200, sse(
        chunk(choices=False, citations=CITES), chunk(""), chunk("Ada "), chunk("Finch [1]."),
        chunk(finish="stop"), b"[DONE]"))})
    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello!"}]
    s = ChatSettings(model="smollm2", system="Be brief.", temperature=0.0, top_p=0.9, max_tokens=32,
                     rag_index="notes", top_k=3)
    events, history = await collect(server, s, conv, "Who keeps the lighthouse?")
    assert [e.kind for e in events] == ["citations", "text", "text", "answer"]
    assert events[-1].data == "Ada Finch [1]."
    req = server.body("/v1/chat/completions")
    assert req["messages"] == [{"role": "system", "content": "Be brief."}, *conv,
                               {"role": "user", "content": "Who keeps the lighthouse?"}]
    assert req["stream"] is True and req["rag"] == {"index": "notes", "top_k": 3}
    assert (req["temperature"], req["top_p"], req["max_tokens"]) == (0.0, 0.9, 32)
    assert "reasoning" not in req
    assert titles(history) == ["📚 Sources (1)"]
    assert "keeper.md" in history[1]["content"] and "Ada Finch" in history[1]["content"]
    assert history[-1] == {"role": "assistant", "content": "Ada Finch [1]."}


async def test_text_accumulates_into_one_message_as_it_streams():
    h = [{"role": "user", "content": "q"}]
    states = []
    for piece in ["The ", "answer ", "is 4."]:
        h = render(h, Event("text", piece))
        states.append(h[-1]["content"])
    assert states == ["The ", "The answer ", "The answer is 4."] and len(h) == 2
    # Gradio hands history back with content as a list of text parts
    h = [{"role": "user", "content": [{"type": "text", "text": "q"}]},
         {"role": "assistant", "content": [{"type": "text", "text": "The "}], "metadata": None}]
    assert render(h, Event("text", "end"))[-1]["content"] == "The end"


async def test_self_consistency_shows_its_vote_before_the_answer():
    info = {"strategy": "self_consistency", "stopped": "answer", "votes": {"391": 4, "381": 1}, "agreement": 0.8,
            "steps": [{"index": 0, "kind": "sample", "content": "17*23 = 391", "data": {"path": 0}},
                      {"index": 5, "kind": "vote", "content": "391 (4/5)", "data": {}}]}
    server = FakeServer({("POST", "/v1/chat/completions"): (200, sse(
        chunk(""), chunk("391"), chunk(finish="stop", reasoning=info), b"[DONE]"))})
    events, history = await collect(server, ChatSettings(model="m", strategy="self_consistency", n=5))
    assert server.body("/v1/chat/completions")["reasoning"] == {"strategy": "self_consistency", "n": 5}
    assert [e.kind for e in events] == ["text", "reasoning", "answer"]
    assert titles(history) == ["🗳 Self-consistency vote: 391 (4/5 paths, 80% agreement)"]  # no pending left
    assert history[-2]["metadata"]["status"] == "done" and "| 391 | 4 |" in history[-2]["content"]
    assert history[-1] == {"role": "assistant", "content": "391"}


async def test_cot_shows_its_steps():
    info = {"strategy": "cot", "steps": [{"index": 0, "kind": "thought", "content": "17*20=340, 17*3=51"}]}
    server = FakeServer({("POST", "/v1/chat/completions"): (200, sse(
        chunk("391"), chunk(finish="stop", reasoning=info), b"[DONE]"))})
    _, history = await collect(server, ChatSettings(model="m", strategy="cot"))
    assert titles(history) == ["🧠 Reasoning (cot)"] and "17*20=340" in history[-2]["content"]


async def test_tool_calls_are_collapsible_steps():
    server = FakeServer({("POST", "/v1/agents/runs"): (200, sse(
        {"object": "agent.run.start", "id": "run_1", "model": "m", "strategy": "tools", "tools": ["calculator"],
         "citations": []},
        {"object": "agent.run.step", "id": "run_1", "index": 0, "kind": "tool_call", "content": "",
         "data": {"tool": "calculator", "arguments": {"expression": "17*23"}}},
        {"object": "agent.run.step", "id": "run_1", "index": 1, "kind": "tool_result", "content": "391",
         "data": {"tool": "calculator", "ok": True}},
        {"object": "agent.run.step", "id": "run_1", "index": 2, "kind": "answer", "content": "It is 391."},
        {"object": "agent.run", "id": "run_1", "answer": "It is 391.", "stopped": "answer", "steps": [],
         "usage": {}},
        b"[DONE]"))})
    s = ChatSettings(model="m", strategy="tools", tools=["calculator"], system="sys", temperature=0.0)
    events, history = await collect(server, s, [], "What is 17*23?")
    req = server.body("/v1/agents/runs")
    assert req["strategy"] == "tools" and req["tools"] == ["calculator"] and req["stream"] is True
    assert req["messages"][0] == {"role": "system", "content": "sys"} and "input" not in req
    assert [e.kind for e in events] == ["step", "step", "step", "text", "answer"]
    assert titles(history) == ['🛠 Tool call: calculator({"expression": "17*23"})']
    call = history[1]
    assert call["metadata"]["status"] == "done" and "**Result:** 391" in call["content"]
    assert history[-1] == {"role": "assistant", "content": "It is 391."}


async def test_a_run_without_an_answer_says_why():
    server = FakeServer({("POST", "/v1/agents/runs"): (200, sse(
        {"object": "agent.run.start", "id": "r"},
        {"object": "agent.run", "id": "r", "answer": None, "stopped": "max_steps", "steps": []}, b"[DONE]"))})
    events, _ = await collect(server, ChatSettings(model="m", strategy="tools"))
    assert "max_steps" in events[-1].data


# ---- uploads ------------------------------------------------------------------------------------

async def test_upload_sends_files_base64_with_their_format(tmp_path):
    (tmp_path / "a.md").write_text("# Ada\nThe keeper.")
    (tmp_path / "b.HTML").write_text("<p>hi</p>")
    (tmp_path / "c.docx").write_bytes(b"PK\x03\x04")
    report = {"object": "rag.ingest", "index": "notes", "added": ["a.md", "b.HTML"], "replaced": [],
              "unchanged": [], "skipped": [], "version": 3}
    server = FakeServer({("POST", "/v1/rag/indexes/notes/documents"): (200, report)})
    summary, rep = await ingest(URL, "sk-good", "notes", [str(tmp_path / n) for n in ("a.md", "b.HTML", "c.docx")],
                                transport=server.transport())
    docs = server.body("/v1/rag/indexes/notes/documents")["documents"]
    assert [(d["source"], d["format"]) for d in docs] == [("a.md", "md"), ("b.HTML", "html")]
    assert base64.b64decode(docs[0]["content_base64"]).decode() == "# Ada\nThe keeper."
    assert summary.startswith("Index `notes` (version 3): 2 added, 0 replaced, 0 unchanged, 0 skipped.")
    assert "c.docx" in summary and rep == report


async def test_upload_needs_an_index_and_a_file(tmp_path):
    with pytest.raises(DemoError, match="Name the index"):
        await ingest(URL, None, " ", [])
    (tmp_path / "x.exe").write_bytes(b"MZ")
    with pytest.raises(DemoError, match="No file to upload.*x.exe"):
        await ingest(URL, None, "notes", [str(tmp_path / "x.exe")])


# ---- wiring -------------------------------------------------------------------------------------

def test_the_cli_does_not_import_gradio():
    code = ("import sys; from hearth.clients.cli import build_parser; build_parser(); "
            "import hearth.clients.cmd_serve, hearth.clients.demo_client; "
            "assert 'gradio' not in sys.modules, 'gradio imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_demo_command_rejects_a_bad_url(capsys):
    from hearth.clients.cli import main

    assert main(["demo", "--url", "127.0.0.1:8000"]) == 2
    assert "--url must start with http://" in capsys.readouterr().err


def test_mounted_demo_serves_its_page():
    pytest.importorskip("gradio")
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from hearth.clients.demo import mount_demo

    app = FastAPI()
    demo = mount_demo(app, f"http://127.0.0.1:{closed_port()}/v1", api_key="sk-secret")
    client = TestClient(app)  # no lifespan: the queue starts on the first request
    page = client.get("/demo/")
    assert page.status_code == 200 and "<html" in page.text.lower()
    assert demo.is_running
    config = client.get("/demo/config").text
    assert "sk-secret" not in page.text and "sk-secret" not in config  # the key stays on the server
