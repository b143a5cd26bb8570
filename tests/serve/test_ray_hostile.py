"""Hostile input against every serving layout, as a user runs `hearth serve`: each error class gets
the same OpenAI envelope (status, type, code) from `--no-ray`, the default Ray layout (the app in the
model's replica) and the separate ingress, and no message carries a traceback, path, pid or address;
the Ray server listens on loopback only; a stream outlasts the header timeout.

One server per layout for the whole module (each Ray start is tens of seconds).
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import psutil
import pytest

from tests.conftest import default_gguf
from tests.serve.test_serve_cli import KEY, MODEL, _start, _stop, _wait_healthy

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(default_gguf() is None, reason="the bundled default model is not installed")]

EMBED = "all-minilm-l6-v2"
HEADER_TIMEOUT_S = 2
# one sequence decoding and one waiting fill the engine: the next request gets 429
CONFIG = f"""
models:
  - name: {MODEL}
    context_length: 512
    max_num_seqs: 1
    max_queued_requests: 1
    backend_options: {{n_threads: 2}}
embeddings:
  - name: {EMBED}
agents:
  enabled: false
"""
LAYOUTS = {"no-ray": (["--no-ray"], {}), "ray": ([], {}), "ray-separate": ([], {"HEARTH_RAY_SEPARATE_INGRESS": "1"})}

# what a client must never read
LEAK = re.compile(r"Traceback|File \"|\.py\b|(?<![\w.:/-])(?:/(?!v1/)[\w.@+~-]+){2,}|\b(?:\d{1,3}\.){3}\d{1,3}\b"
                  r"|\bpid\b|\bip\b|\bactor|RayTaskError|ray::|\(\w+ pid=")
LONG = "tell me a story about the sea " * 120  # ~840 tokens: over the 512-token context

AUTH = {"Authorization": f"Bearer {KEY}"}
# name: (method, path, json body, headers) -> the envelope `--no-ray` gives (status, type, code)
CASES = {
    "embeddings input []": (("POST", "/v1/embeddings", {"model": EMBED, "input": []}, AUTH),
                            (400, "invalid_request_error", None)),
    "embeddings dimensions": (("POST", "/v1/embeddings", {"model": EMBED, "input": "a", "dimensions": 9999}, AUTH),
                              (400, "invalid_request_error", None)),
    "chat over context": (("POST", "/v1/chat/completions", {"model": MODEL, "max_tokens": 4,
                                                            "messages": [{"role": "user", "content": LONG}]}, AUTH),
                          (400, "invalid_request_error", "context_length_exceeded")),
    "completions over context": (("POST", "/v1/completions", {"model": MODEL, "prompt": LONG, "max_tokens": 4}, AUTH),
                                 (400, "invalid_request_error", "context_length_exceeded")),
    "chat bad grammar": (("POST", "/v1/chat/completions", {
        "model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
        AUTH), (400, "invalid_request_error", None)),
    "unknown model": (("POST", "/v1/chat/completions", {"model": "nope", "messages": [{"role": "user", "content": "hi"}]},
                       AUTH), (404, "invalid_request_error", "model_not_found")),
    "no key": (("GET", "/v1/models", None, {}), (401, "invalid_request_error", "invalid_api_key")),
    "bad json": (("POST", "/v1/chat/completions", None, {**AUTH, "content-type": "application/json"}),
                 (400, "invalid_request_error", None)),
}


@pytest.fixture(scope="module", params=list(LAYOUTS))
def server(request, tmp_path_factory):
    extra, env = LAYOUTS[request.param]
    tmp = tmp_path_factory.mktemp(request.param)
    proc, url = _start(tmp, CONFIG, *extra, env={"HEARTH_HTTP_HEADER_TIMEOUT_S": str(HEADER_TIMEOUT_S), **env})
    try:
        _wait_healthy(proc, url, tmp)
        yield request.param, proc, url
    finally:
        _stop(proc)
    log = (tmp / "server.log").read_text()
    assert "an error message with a traceback was replaced" not in log  # mapped by type, not rescued


def _call(url: str, method: str, path: str, body, headers) -> httpx.Response:
    kw = {"json": body} if body is not None else {"content": b"{not json"} if method == "POST" else {}
    return httpx.request(method, url + path, headers=headers, timeout=60, **kw)


def _envelope(r: httpx.Response) -> tuple[int, str, str | None]:
    assert not LEAK.search(r.text), r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"], r.text
    return r.status_code, err["type"], err["code"]


def test_every_error_class_has_the_same_envelope_in_every_layout(server):
    layout, _, url = server
    got = {name: _envelope(_call(url, *req)) for name, (req, _) in CASES.items()}
    assert got == {name: want for name, (_, want) in CASES.items()}, layout
    assert _queue_full(url) == (429, "rate_limit_error", "queue_full"), layout


def _queue_full(url: str) -> tuple[int, str, str | None]:
    """One request decoding and one waiting fill the engine; under the separate ingress one more
    waits at the ingress (Ray's queue for the model). The next one is refused."""
    def post(max_tokens: int) -> httpx.Response:
        return httpx.post(url + "/v1/completions", headers=AUTH, timeout=120, json={
            "model": MODEL, "prompt": "Once upon a time", "max_tokens": max_tokens, "ignore_eos": True})

    with ThreadPoolExecutor(3) as pool:
        waiting = [pool.submit(post, 500)]  # most of the 512-token context: several seconds even on a quiet CPU
        time.sleep(0.5)  # decoding (a 4-token prompt); 500 tokens take 2.5 s or more at 200 tok/s
        waiting += [pool.submit(post, 2) for _ in range(2)]
        time.sleep(0.5)  # waiting in the engine's queue, and at Ray's
        r = post(2)
        done = [f.result() for f in waiting]
    assert done[0].status_code == 200, done[0].text
    assert r.headers.get("retry-after") == "1", r.text
    return _envelope(r)


def test_ray_server_listens_on_loopback_only(server):
    layout, proc, url = server
    if layout == "no-ray":
        pytest.skip("one uvicorn socket on --host")
    tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    listening = set()
    for p in tree:
        try:
            listening |= {(p.name(), c.laddr.ip, c.laddr.port) for c in p.net_connections("inet")
                          if c.status == psutil.CONN_LISTEN}
        except psutil.Error:
            continue
    assert len(listening) > 5, listening  # GCS, raylet, agents, workers, HAProxy ...
    exposed = {s for s in listening if s[1] not in ("127.0.0.1", "::1", "::ffff:127.0.0.1")}
    assert not exposed, exposed
    port = int(url.rsplit(":", 1)[1])
    assert any(s[2] == port for s in listening)


def test_slow_headers_are_cut_and_a_long_stream_is_not(server):
    layout, _, url = server
    port = int(url.rsplit(":", 1)[1])

    def slowloris(result: dict) -> None:
        s = socket.create_connection(("127.0.0.1", port), timeout=30)
        t0 = time.monotonic()
        try:
            for b in b"GET /health HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 100:
                s.sendall(bytes([b]))
                time.sleep(0.5)  # a header byte every half second: slower than the header timeout
        except OSError:
            pass
        try:
            result["answer"] = s.recv(4096)
        except OSError:
            result["answer"] = b""
        result["closed_after"] = time.monotonic() - t0
        s.close()

    result: dict = {}
    t = threading.Thread(target=slowloris, args=(result,))
    t.start()
    # meanwhile a stream that lasts longer than the header timeout runs to its end
    t0 = time.monotonic()
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Tell a long story."}], "max_tokens": 400,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", url + "/v1/chat/completions", headers=AUTH, json=body, timeout=120) as r:
        lines = [ln for ln in r.iter_lines() if ln]
    took = time.monotonic() - t0
    t.join(60)
    assert lines[-1] == "data: [DONE]", lines[-3:]
    assert json.loads(lines[-2][len("data: "):])["usage"]["completion_tokens"] == 400
    assert took > HEADER_TIMEOUT_S, took
    assert result["closed_after"] < HEADER_TIMEOUT_S + 3, (layout, result)
    status = result["answer"].split(b"\r\n")[0]
    assert status.startswith(b"HTTP/1.1 408 "), result
    if layout == "no-ray":  # HAProxy 2.8 answers with its own HTML page
        assert json.loads(result["answer"].split(b"\r\n\r\n", 1)[1])["error"]["code"] == "timeout"
