"""Slow clients against both front ends: a client that sends its headers a byte at a time (slowloris)
is answered 408 and closed once the header timeout is up, and a response streamed for longer than
that runs to its end. uvicorn (`--no-ray`) with serve.local's protocol; HAProxy as `hearth serve`
starts it under Ray (ray_app._haproxy_wrapper), in front of a plain uvicorn."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import threading
import time
from contextlib import contextmanager
from unittest import mock

import httpx
import pytest
import uvicorn

from hearth.serve import local
from hearth.serve.config import ServeConfig

TIMEOUT_S = 1.0
STREAM_S = 2.5  # longer than the header timeout


async def _app(scope, receive, send):
    """/stream sends a line every 0.25 s for STREAM_S; anything else answers at once."""
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    if scope["path"] == "/stream":
        end = time.monotonic() + STREAM_S
        while time.monotonic() < end:
            await send({"type": "http.response.body", "body": b"tick\n", "more_body": True})
            await asyncio.sleep(0.25)
    await send({"type": "http.response.body", "body": b"done\n"})


@contextmanager
def _uvicorn(**kw):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(_app, log_level="warning", lifespan="off", **kw))
    t = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    t.start()
    while not server.started:
        time.sleep(0.01)
    try:
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        t.join(10)


def _slowloris(port: int, first: bytes = b"", host: str = "127.0.0.1") -> tuple[float, bytes]:
    """Send `first` at once, then a request's headers a byte every 0.3 s; how long until the server
    closed the connection, and what it said."""
    s = socket.create_connection((host, port), timeout=10)
    answer = b""
    try:
        if first:
            s.sendall(first)
            answer = s.recv(65536)  # the first answer, on a kept-alive connection
        t0 = time.monotonic()
        try:
            for b in b"GET /ok HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 40:
                s.sendall(bytes([b]))
                time.sleep(0.3)
        except OSError:  # closed while sending
            pass
        try:
            while chunk := s.recv(65536):
                answer += chunk
        except OSError:
            pass
        return time.monotonic() - t0, answer
    finally:
        s.close()


def _check_cut(took: float, answer: bytes, envelope: bool = True) -> None:
    assert took < TIMEOUT_S + 1.5, took  # the bytes kept coming for 13 s
    last = answer.rsplit(b"HTTP/1.1 ", 1)[-1]
    assert last.startswith(b"408"), answer
    if envelope:  # HAProxy 2.8 answers this one with its own HTML page
        assert json.loads(last.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "timeout", answer


def _stream(port: int, host: str = "127.0.0.1") -> tuple[float, str]:
    t0 = time.monotonic()
    text = httpx.get(f"http://{host}:{port}/stream", timeout=30).text
    return time.monotonic() - t0, text


def test_uvicorn_cuts_slow_headers_and_not_long_streams():
    with mock.patch.dict(os.environ, {"HEARTH_HTTP_HEADER_TIMEOUT_S": str(TIMEOUT_S)}):
        server = local.LocalServer(ServeConfig(port=0))  # nothing loaded: only its protocol is used
    server.sock.close()
    assert issubclass(server.server.config.http, local._HeaderDeadline)  # what `--no-ray` runs
    with _uvicorn(http=server.server.config.http, timeout_keep_alive=5) as port:
        _check_cut(*_slowloris(port))
        took, answer = _slowloris(port, first=b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n")  # the second request
        assert answer.startswith(b"HTTP/1.1 200") and b"done" in answer
        _check_cut(took, answer)
        took, text = _stream(port)
        assert took >= STREAM_S and text.endswith("done\n")
        assert httpx.get(f"http://127.0.0.1:{port}/ok", timeout=5).text == "done\n"


def test_timeouts_come_from_the_environment(monkeypatch):
    assert local.http_timeouts() == (10, 30)
    monkeypatch.setenv("HEARTH_HTTP_HEADER_TIMEOUT_S", "2.5")
    monkeypatch.setenv("HEARTH_HTTP_IDLE_TIMEOUT_S", "60")
    assert local.http_timeouts() == (2.5, 60)
    monkeypatch.setenv("HEARTH_HTTP_IDLE_TIMEOUT_S", "0")
    with pytest.raises(ValueError, match="HEARTH_HTTP_IDLE_TIMEOUT_S"):
        local.http_timeouts()


def _listening(pid: int) -> set[tuple[str, int]]:
    import psutil

    return {(c.laddr.ip, c.laddr.port) for c in psutil.Process(pid).net_connections("inet")
            if c.status == psutil.CONN_LISTEN}


def test_haproxy_cuts_slow_headers_keeps_long_streams_and_binds_its_extras_to_loopback(tmp_path, monkeypatch):
    ray_app = pytest.importorskip("hearth.serve.ray_app")
    if ray_app._haproxy_binary() is None:
        pytest.skip("ray[serve] ships no HAProxy on this platform")
    from ray.serve._private.haproxy_templates import HAPROXY_CONFIG_TEMPLATE

    # the lines of Ray's template the wrapper edits are still there
    for line in ("listen stats\n  bind *:{{ config.stats_port }}", "frontend prometheus\n    bind :{{ config.metrics_port }}",
                 "frontend http_frontend\n    bind {{ config.frontend_host }}:{{ config.frontend_port }}",
                 "timeout http-keep-alive {{ config.timeout_http_keep_alive_s }}s", "\ndefaults\n"):
        assert line in HAPROXY_CONFIG_TEMPLATE, line

    monkeypatch.setenv("HEARTH_HTTP_HEADER_TIMEOUT_S", str(TIMEOUT_S))
    front = "127.0.0.2"  # the serving host (any loopback address but 127.0.0.1, to see the bind move)
    wrapper = ray_app._haproxy_wrapper(str(tmp_path), ray_app._haproxy_binary(), front)
    port, stats, exporter = (ray_app._free_port() for _ in range(3))
    with _uvicorn() as backend:  # uvicorn's own protocol: only HAProxy's timeout is tested here
        # the parts of Ray's template that the wrapper edits, as Ray renders them
        (tmp_path / "haproxy.cfg").write_text(f"""global
    maxconn 64
defaults
    mode http
    timeout connect 5s
    timeout client 3600s
    timeout http-keep-alive 90s
frontend prometheus
    bind :{exporter}
    mode http
    http-request use-service prometheus-exporter if {{ path /metrics }}
    no log
frontend http_frontend
    bind 127.0.0.1:{port}
    default_backend app
backend app
    server r 127.0.0.1:{backend}
listen stats
  bind *:{stats}
  stats enable
  stats uri /stats
""")
        proc = subprocess.Popen([wrapper, "-db", "-f", str(tmp_path / "haproxy.cfg")], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT)
        try:
            end = time.monotonic() + 10
            while len(_listening(proc.pid)) < 3:
                assert proc.poll() is None and time.monotonic() < end, proc.stdout.read().decode()
                time.sleep(0.05)
            assert _listening(proc.pid) == {(front, port), ("127.0.0.1", stats), ("127.0.0.1", exporter)}
            assert httpx.get(f"http://{front}:{port}/ok", timeout=5).text == "done\n"
            took, text = _stream(port, front)
            assert took >= STREAM_S and text.endswith("done\n")
            _check_cut(*_slowloris(port, host=front), envelope=False)
        finally:
            proc.terminate()
            proc.wait(10)

