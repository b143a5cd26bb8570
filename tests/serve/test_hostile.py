"""Hostile input on a real server (no Ray, 127.0.0.1, ephemeral port): every refusal is OpenAI's
envelope with the right status, before any heavy work, and the server stays healthy after.

One server for the module, with small caps from its config so the tests send little; the same
checks run with the defaults (8 MiB body, 2048 messages, 2M characters).

    python -m pytest tests/serve/test_hostile.py -q
"""

from __future__ import annotations

import json
import select
import socket
import time

import httpx
import pytest

from tests.conftest import default_gguf
from tests.serve.conftest import API_KEY, default_config, start_server

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(default_gguf() is None, reason="the bundled default model is not installed")]

MODEL = "smollm2-135m-instruct"
EMBED = "all-minilm-l6-v2"
CTX = 512  # small, so the clamp test's prefill is quick
BODY_CAP = 256 * 1024
MAX_MESSAGES = 32
MAX_CHARS = 50_000


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    cfg = default_config(context_length=CTX)
    cfg.max_body_bytes = BODY_CAP
    cfg.max_messages = MAX_MESSAGES
    cfg.max_prompt_chars = MAX_CHARS
    cfg.max_embedding_inputs = 8
    cfg.agents.rag_dir = str(tmp_path_factory.mktemp("rag"))
    cfg.agents.max_request_bytes = 2**20  # the RAG routes' body cap: 1 MiB as base64 + 1 MiB
    cfg.agents.max_document_bytes = 1000
    with start_server(cfg) as s:
        yield s


@pytest.fixture(scope="module")
def http(srv):
    with srv.http() as h:
        yield h


def _error(r: httpx.Response, status: int, code: str | None = None, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"], err
    assert err["type"] == ("invalid_request_error" if status < 500 else "service_unavailable"), err
    if code is not None:
        assert err["code"] == code, err
    if param is not None:
        assert err["param"] == param, err
    return err


def _healthy(srv) -> None:
    assert httpx.get(srv.url + "/health", timeout=30).json()["status"] == "ok"


def _raw(srv, head: bytes, body_chunks=(), timeout_s: float = 10.0) -> tuple[bytes, int]:
    """Send a request over a plain socket, a chunk at a time, until the server answers; returns the
    start of the answer and how many body bytes had been sent by then."""
    host, port = srv.url.removeprefix("http://").rsplit(":", 1)
    sent = 0
    with socket.create_connection((host, int(port)), timeout=timeout_s) as s:
        s.sendall(head)
        for chunk in body_chunks:
            if select.select([s], [], [], 0)[0]:
                break
            try:
                s.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(chunk)
        end = time.monotonic() + timeout_s
        data = b""
        while b"\r\n\r\n" not in data and time.monotonic() < end:
            if select.select([s], [], [], 0.5)[0]:
                more = s.recv(65536)
                if not more:
                    break
                data += more
        return data, sent


def _head(srv, path: str, extra: str) -> bytes:
    host = srv.url.removeprefix("http://")
    return (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {API_KEY}\r\n"
            f"Content-Type: application/json\r\n{extra}\r\n").encode()


# ---- body size -----------------------------------------------------------------------------------

def test_content_length_over_cap_is_refused_before_the_body(srv, http):
    # 100 MB announced, none of it sent: the answer comes at once, not after a read of the body
    t0 = time.monotonic()
    answer, _ = _raw(srv, _head(srv, "/v1/chat/completions", "Content-Length: 100000000\r\n"))
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert time.monotonic() - t0 < 5
    r = http.post("/v1/chat/completions", content=b" " * (BODY_CAP + 1))
    _error(r, 413, "request_too_large")
    assert str(BODY_CAP) in r.json()["error"]["message"]
    _healthy(srv)


def test_chunked_body_is_cut_once_past_the_cap(srv):
    chunk = b" " * 65536
    frame = b"%x\r\n" % len(chunk) + chunk + b"\r\n"
    answer, sent = _raw(srv, _head(srv, "/v1/completions", "Transfer-Encoding: chunked\r\n"),
                        (frame for _ in range(2000)))  # 128 MiB offered
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b'"request_too_large"' in answer or b"413" in answer
    # the server stopped reading right after the cap: what was sent is the cap plus socket buffers
    assert sent < 64 * 2**20, sent
    _healthy(srv)


def test_rag_uploads_get_their_own_cap(srv, http):
    # over max_body_bytes but under the upload cap: past the edge, refused by the document limit
    doc = {"source": "a.txt", "text": "x" * (BODY_CAP + 10)}
    err = _error(http.post("/v1/rag/indexes/big/documents", json={"documents": [doc]}), 413, "document_too_large")
    assert "max_document_bytes" in err["message"]
    doc = {"source": "b.txt", "text": "y" * (3 * 2**20)}
    err = _error(http.post("/v1/rag/indexes/big/documents", json={"documents": [doc]}), 413, "request_too_large")
    assert "agents.max_request_bytes" in err["message"]


# ---- Unicode -------------------------------------------------------------------------------------

LONE = "\ud800"
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "weather " + LONE,
                                            "parameters": {"type": "object", "properties": {}}}}


@pytest.mark.parametrize("path,body", [
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi " + LONE}]}),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "tools": [WEATHER]}),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "\udc00 low first"}]}),
    ("/v1/completions", {"model": MODEL, "prompt": ["ok", "bad " + LONE]}),
    ("/v1/embeddings", {"model": EMBED, "input": ["fine", "bad " + LONE]}),
    ("/v1/rag/indexes/u/documents", {"documents": [{"source": "s.txt", "text": "bad " + LONE}]}),
    ("/v1/rag/indexes/u/query", {"query": LONE}),
    ("/v1/agents/runs", {"input": "bad " + LONE, "strategy": "plain"}),
])
def test_lone_surrogate_is_400_on_every_route(srv, http, path, body):
    raw = json.dumps(body).encode()  # ensure_ascii: the surrogate travels as the escape \ud800
    assert b"\\ud800" in raw or b"\\udc00" in raw
    err = _error(http.post(path, content=raw, headers={"Content-Type": "application/json"}), 400, "invalid_unicode")
    assert "lone surrogate" in err["message"]
    _healthy(srv)


def test_surrogates_encoded_as_raw_bytes_are_400(srv, http):
    raw = '{"model": "m", "messages": [{"role": "user", "content": "\ud800"}]}'.encode("utf-8", "surrogatepass")
    err = _error(http.post("/v1/chat/completions", content=raw), 400, "invalid_unicode")
    assert "UTF-8" in err["message"]


def test_paired_surrogates_and_escaped_backslashes_still_work(srv, http):
    # an emoji as a surrogate-pair escape, and the six characters \ud800 as text (escaped backslash)
    raw = json.dumps({"model": MODEL, "max_tokens": 2, "temperature": 0,
                      "messages": [{"role": "user", "content": "\U0001F600 and \\ud800 as text"}]}).encode()
    assert b"\\ud83d\\ude00" in raw and b"\\\\ud800" in raw
    r = http.post("/v1/chat/completions", content=raw, headers={"Content-Type": "application/json"})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] > 5


@pytest.mark.parametrize("raw,lone", [
    (rb'"\ud83d\ude00"', False), (rb'"\uD83D\ude00"', False), (rb'"\\ud800"', False), (rb'"\\\\ud800"', False),
    (rb'"a\\\ud83d\ude00"', False), (rb'"\u4e2d\\"', False),
    (rb'"\ud800"', True), (rb'"\\\ud800"', True), (rb'"\\ud83d\udc00"', True), (rb'"\uDC00"', True),
    (rb'"\ud83d\\\ude00"', True), (rb'"\ud800\\\udc00"', True), (rb'"\ud83d\u0041"', True),
])
def test_unicode_scan_reads_escapes_as_json_does(raw, lone):
    from hearth.serve.edge import unicode_problem

    try:  # what the scan must agree with: the parsed text can be encoded, or not
        json.loads(raw).encode("utf-8")
        encodable = True
    except UnicodeEncodeError:
        encodable = False
    assert encodable is not lone
    assert (unicode_problem(raw) is not None) is lone


# ---- caps checked before tokenization ------------------------------------------------------------

def test_message_count_cap(srv, http):
    msgs = [{"role": "user", "content": "hi"}] * (MAX_MESSAGES + 1)
    err = _error(http.post("/v1/chat/completions", json={"model": MODEL, "messages": msgs}), 400,
                 "too_many_messages", "messages")
    assert str(MAX_MESSAGES) in err["message"] and "max_messages" in err["message"]
    _healthy(srv)


@pytest.mark.parametrize("path,body,param", [
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "a" * (MAX_CHARS + 1)}]},
     "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "tools": [
        {"type": "function", "function": {"name": "f", "description": "d" * MAX_CHARS}}]}, "messages"),
    ("/v1/completions", {"model": MODEL, "prompt": ["a" * (MAX_CHARS // 2)] * 3}, "prompt"),
    ("/v1/embeddings", {"model": EMBED, "input": ["a" * (MAX_CHARS // 2)] * 3}, "input"),
])
def test_prompt_character_cap(srv, http, path, body, param):
    t0 = time.monotonic()
    err = _error(http.post(path, json=body), 400, "prompt_too_long", param)
    assert str(MAX_CHARS) in err["message"] and "max_prompt_chars" in err["message"]
    assert time.monotonic() - t0 < 5
    _healthy(srv)


def test_embedding_input_count_cap(srv, http):
    _error(http.post("/v1/embeddings", json={"model": EMBED, "input": ["a"] * 9}), 400, "too_many_inputs", "input")


def test_rag_chat_with_an_image_part_is_400(srv, http):
    r = http.post("/v1/rag/indexes/facts/documents", json={"documents": [{"source": "f.txt", "text": "Cats purr."}]})
    assert r.status_code == 200, r.text
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
    for content in ([image], [{"type": "text", "text": "What do cats do?"}, image]):
        err = _error(http.post("/v1/chat/completions", json={
            "model": MODEL, "rag": {"index": "facts"}, "messages": [{"role": "user", "content": content}]}), 400)
        assert "image_url" in err["message"] and err["param"].startswith("messages[0].content[")
    _healthy(srv)


# ---- max_tokens and tool messages ----------------------------------------------------------------

@pytest.mark.parametrize("path,field", [("/v1/chat/completions", "max_tokens"),
                                        ("/v1/chat/completions", "max_completion_tokens"),
                                        ("/v1/completions", "max_tokens")])
def test_max_tokens_beyond_the_context_is_400(srv, http, path, field):
    body = {"model": MODEL, field: 10**12}
    body.update({"messages": [{"role": "user", "content": "hi"}]} if "chat" in path else {"prompt": "hi"})
    err = _error(http.post(path, json=body), 400, "context_length_exceeded", field)
    assert str(CTX) in err["message"]


def test_max_tokens_within_the_context_is_clamped_to_what_is_left(srv, http):
    prompt = [504] * (CTX - 6)
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": CTX, "ignore_eos": True,
                                           "temperature": 0})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["choices"][0]["finish_reason"] == "length"
    assert out["usage"]["prompt_tokens"] + out["usage"]["completion_tokens"] <= CTX
    assert out["usage"]["completion_tokens"] >= 1


def test_tool_message_needs_tool_call_id(srv, http):
    msgs = [{"role": "user", "content": "weather?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "w", "arguments": "{}"}}]},
            {"role": "tool", "content": "sunny"}]
    err = _error(http.post("/v1/chat/completions", json={"model": MODEL, "messages": msgs}), 400,
                 param="messages[2].tool_call_id")
    assert "tool_call_id" in err["message"]
    _healthy(srv)


# ---- the docs ------------------------------------------------------------------------------------

def test_docs_need_the_key_when_keys_are_set(srv):
    for path in ("/docs", "/redoc", "/openapi.json"):
        _error(httpx.get(srv.url + path, timeout=30), 401, "invalid_api_key")
        r = httpx.get(srv.url + path, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30)
        assert r.status_code == 200, (path, r.text[:200])
    schema = httpx.get(srv.url + "/openapi.json", headers={"Authorization": f"Bearer {API_KEY}"}).json()
    assert "/v1/chat/completions" in schema["paths"] and "/docs" not in schema["paths"]


def test_docs_are_open_without_keys():
    from fastapi.testclient import TestClient
    from hearth.serve.app import build_app
    from hearth.serve.config import ServeConfig

    with TestClient(build_app(ServeConfig(api_keys=[]))) as c:
        for path in ("/docs", "/redoc", "/openapi.json"):
            assert c.get(path).status_code == 200, path
        assert "/v1/embeddings" in c.get("/openapi.json").json()["paths"]
