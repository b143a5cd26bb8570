"""Run the app in this process with uvicorn (`hearth serve --no-ray`, and the tests).

    server = LocalServer(config)          # binds now (port 0: an ephemeral port), loads models in
    server.start_loading()                # the background so /health says 503 until they are up
    server.serve()                        # blocks; SIGTERM drains, a second one exits at once

SIGTERM/SIGINT: new requests get 503 while in-flight ones get `drain_timeout_s` to finish; those still
running then are ended with a 503 (a stream gets an SSE error event and `data: [DONE]`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import threading
import time
from contextlib import contextmanager
from typing import Any, Iterator

import uvicorn
from uvicorn.protocols.http.auto import AutoHTTPProtocol

from .app import build_app
from .config import ServeConfig
from .errors import header_timeout
from .router import Router, load_local

log = logging.getLogger("hearth.serve")


def http_timeouts() -> tuple[float, float]:
    """Seconds a client gets to send a request's headers (HEARTH_HTTP_HEADER_TIMEOUT_S, default 10)
    and that a kept-alive connection may stay idle between requests (HEARTH_HTTP_IDLE_TIMEOUT_S,
    default 30): uvicorn here, HAProxy under Ray (ray_app._haproxy_wrapper). Neither times a
    response, so a stream runs as long as it sends."""
    def seconds(name: str, default: float) -> float:
        value = float(os.environ.get(name, default))
        if not value > 0:
            raise ValueError(f"{name} must be a number of seconds above 0, not {value}")
        return value

    return seconds("HEARTH_HTTP_HEADER_TIMEOUT_S", 10), seconds("HEARTH_HTTP_IDLE_TIMEOUT_S", 30)


class _HeaderDeadline(AutoHTTPProtocol):  # type: ignore[misc, valid-type]
    """uvicorn's HTTP protocol, plus a deadline for each request's headers: from the connection's
    start, or from the first byte of a request that follows another. A client too slow gets a 408
    and the connection is closed. uvicorn times only an idle kept-alive connection, and a byte
    resets that: a client sending a header byte every few seconds (slowloris) held its connection
    for ever."""

    header_timeout_s = 10.0

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._awaited_after = None  # the request before the one whose headers are awaited
        self._deadline: asyncio.TimerHandle | None = asyncio.get_running_loop().call_later(
            self.header_timeout_s, self._headers_too_slow)

    def data_received(self, data: bytes) -> None:
        if self._deadline is None and (self.cycle is None or self.cycle.response_complete):
            self._awaited_after = self.cycle  # a new request begins
            self._deadline = asyncio.get_running_loop().call_later(self.header_timeout_s,
                                                                   self._headers_too_slow)
        super().data_received(data)
        if self._deadline is not None and self.cycle is not self._awaited_after:  # its headers are in
            self._deadline.cancel()
            self._deadline = None

    def connection_lost(self, exc) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        super().connection_lost(exc)

    def _headers_too_slow(self) -> None:
        self._deadline = None
        if self.transport.is_closing() or self.cycle is not self._awaited_after:
            return
        body = json.dumps(header_timeout(self.header_timeout_s).body()).encode()
        self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                             b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body))
        self.transport.close()


def _protocol(header_timeout_s: float) -> type:
    return type("HeaderDeadlineProtocol", (_HeaderDeadline,), {"header_timeout_s": header_timeout_s})


class _DrainingServer(uvicorn.Server):
    """uvicorn, but the first signal drains instead of closing connections at once."""

    def __init__(self, config: uvicorn.Config, app_state: Any, drain_timeout_s: float):
        super().__init__(config)
        self._state = app_state
        self._drain_timeout_s = drain_timeout_s
        self._draining_since: float | None = None

    def handle_exit(self, sig: int, frame) -> None:
        if self._draining_since is not None:  # a second signal: stop now
            self.force_exit = True
            self.should_exit = True
            return
        log.info("draining: %d request(s) in flight, up to %.0f s", self._state.in_flight, self._drain_timeout_s)
        self._state.draining = True
        self._draining_since = time.monotonic()
        threading.Thread(target=self._drain, name="hearth-drain", daemon=True).start()

    def _drain(self) -> None:
        end = self._draining_since + self._drain_timeout_s
        while self._state.in_flight > 0 and time.monotonic() < end:
            time.sleep(0.05)
        if self._state.in_flight > 0:  # time is up: each one left gets a 503 (a stream: an SSE error, [DONE])
            log.warning("%d request(s) still running after the drain timeout: ending them", self._state.in_flight)
            self._state.drain.cut_threadsafe()
            end = time.monotonic() + 2
            while self._state.in_flight > 0 and time.monotonic() < end:
                time.sleep(0.02)
        self.should_exit = True


class LocalServer:
    """The FastAPI app on uvicorn in this process, with models loaded in this process."""

    def __init__(self, config: ServeConfig, router: Router | None = None):
        self.config = config
        self.app = build_app(config, router)
        self.services: list[Any] = []
        self.sock = socket.socket(socket.AF_INET6 if ":" in config.host else socket.AF_INET)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((config.host, config.port))
        self.port = self.sock.getsockname()[1]
        header_s, idle_s = http_timeouts()
        ucfg = uvicorn.Config(self.app, log_level="warning", access_log=False, http=_protocol(header_s),
                              timeout_keep_alive=idle_s,
                              timeout_graceful_shutdown=max(1, int(config.drain_timeout_s)), lifespan="off")
        self.server = _DrainingServer(ucfg, self.app.state, config.drain_timeout_s)

    @property
    def url(self) -> str:
        host = self.config.host if ":" not in self.config.host else f"[{self.config.host}]"
        return f"http://{host}:{self.port}"

    def start_loading(self, exit_on_error: bool = False) -> threading.Thread:
        """Load the models on a thread; a failure is kept in app.state.load_error and, with
        exit_on_error (`hearth serve`), stops the server instead of answering 503 forever."""
        def load() -> None:
            try:
                router, self.services = load_local(self.config)
                self.app.state.router = router
                log.info("ready: %s", ", ".join(router.names()))
            except Exception as e:
                log.debug("loading the models failed", exc_info=True)
                self.app.state.load_error = f"{type(e).__name__}: {e}"
                if exit_on_error:
                    self.server.should_exit = True

        t = threading.Thread(target=load, name="hearth-load", daemon=True)
        t.start()
        return t

    def serve(self) -> None:
        """Block until a signal (or should_exit) stops the server; then free the engines."""
        try:
            self.server.run(sockets=[self.sock])
        finally:
            self.close()

    def close(self) -> None:
        for s in self.services:
            try:
                s.shutdown()
            except Exception as e:  # keep shutting the others down
                log.warning("shutdown of %s failed: %s", s, e)
        self.services = []


@contextmanager
def in_background(config: ServeConfig, timeout_s: float = 300) -> Iterator[LocalServer]:
    """The server on a thread of this process until the block ends, its models loaded (errors raised).

        with in_background(ServeConfig(port=0)) as srv:
            openai.OpenAI(base_url=srv.url + "/v1", api_key=...)
    """
    srv = LocalServer(config)
    srv.start_loading()
    t = threading.Thread(target=srv.server.run, kwargs={"sockets": [srv.sock]}, name="hearth-uvicorn", daemon=True)
    t.start()
    try:
        end = time.monotonic() + timeout_s
        while time.monotonic() < end and srv.app.state.router is None and not srv.app.state.load_error:
            time.sleep(0.05)
        while time.monotonic() < end and not srv.server.started:
            time.sleep(0.02)
        if srv.app.state.load_error:
            from hearth.runtime.errors import ModelLoadError
            raise ModelLoadError(srv.app.state.load_error)
        if srv.app.state.router is None or not srv.server.started:
            raise TimeoutError(f"the server did not start within {timeout_s:g} s")
        yield srv
    finally:
        srv.server.should_exit = True
        t.join(timeout=30)
        srv.close()
