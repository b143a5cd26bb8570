"""The pure-ASGI edge in front of every route: what is refused before any route runs, and the drain.

    app.add_middleware(Edge, state=app.state, metrics=metrics, config=config)

For each HTTP request, in order:
1. while draining, 503 (except /health);
2. the body: a Content-Length over the cap is refused at once (413); a chunked body is counted as it
   arrives and refused as soon as the count passes the cap, so nothing beyond the cap is ever held;
3. a body must be UTF-8 without a lone surrogate escape (`"\\ud800"`): one linear pass over the raw
   bytes, before any parsing, so no route ever meets text that cannot be encoded (400);
4. the route runs on the buffered body, as a task of its own. When a drain's time runs out,
   `Drain.cut()` ends what still runs: a stream gets an SSE error event (503, server_shutting_down)
   then `data: [DONE]`, a request not yet answered gets the same error as JSON, and the route's task
   is cancelled, so its engine requests are aborted as for a client that left.

Pure ASGI rather than BaseHTTPMiddleware, so streams and disconnects pass through untouched.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import re
import time
from typing import Any

from .config import ServeConfig
from .errors import APIError, unavailable
from .metrics import Metrics

ROUTES = {"/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models", "/health", "/metrics",
          "/v1/agents/runs", "/v1/responses", "/tokenize", "/detokenize"}
UNPREFIXED = {"/chat/completions", "/completions", "/embeddings", "/models", "/responses"}
"""Paths also served without /v1, as llama-server and vLLM do (with /models/ID and /responses/ID)."""
DONE = b"data: [DONE]\n\n"
log = logging.getLogger("hearth.serve")

# Once every escaped backslash (a pair) is blanked out and the text lowercased, each backslash left
# starts an escape, and a surrogate escape is lone unless a high one is followed by a low one. Both
# patterns start with the literal \ud, so the regex engine skips ahead between candidates: 8 MiB of
# emoji escapes take 91 ms of CPU, of CJK or ASCII text 7-19 ms.
_HEX2 = rb"[0-9a-f]{2}"
_LONE_HIGH = re.compile(rb"\\ud[89ab]" + _HEX2 + rb"(?!\\ud[c-f]" + _HEX2 + rb")")
_LONE_LOW = re.compile(rb"\\ud[c-f](?<!\\ud[89ab]" + _HEX2 + rb"\\ud[c-f])" + _HEX2)


def canonical_path(path: str) -> str:
    """The /v1 path a route without the prefix stands for; any other path as it is."""
    if path in UNPREFIXED or path.startswith(("/models/", "/responses/")):
        return "/v1" + path
    return path


def route_label(path: str) -> str:
    """The metrics label of a path: a known route, a route family, or "other"."""
    for prefix in ("/v1/models", "/v1/rag", "/v1/responses"):
        if path.startswith(prefix + "/"):
            return prefix
    return path if path in ROUTES else "other"


def unicode_problem(body: bytes) -> str | None:
    """Why `body` cannot be JSON text of valid Unicode, or None. Linear in its length."""
    try:
        body.decode("utf-8")  # strict: also refuses surrogates encoded as raw bytes (ED A0..BF)
    except UnicodeDecodeError as e:
        return f"The request body is not valid UTF-8 (byte {e.start}); send JSON encoded as UTF-8."
    if b"\\u" not in body:
        return None
    blanked = body.replace(b"\\\\", b"__").lower()  # pairs taken left to right, as JSON does; offsets kept
    found = [m for m in (_LONE_HIGH.search(blanked), _LONE_LOW.search(blanked)) if m is not None]
    if not found:
        return None
    start = min(m.start() for m in found)
    return (f"The request body holds a lone surrogate escape '{body[start:start + 6].decode()}' at byte {start}: "
            "a JSON string must be valid Unicode, so a high surrogate \\uD800-\\uDBFF must be followed by a "
            "low surrogate \\uDC00-\\uDFFF, and a low one must follow a high one.")


def shutting_down() -> APIError:
    return APIError(503, "The server is shutting down: this request was still running when its drain time "
                         "ran out. Retry it.", "service_unavailable", None, "server_shutting_down")


class _Exchange:
    """One request/response as the edge sees it, so a drain can end it cleanly."""

    def __init__(self, send):
        self._send = send
        self.status = 500
        self.started = self.sse = self.closed = False
        self.lock = asyncio.Lock()
        self.task: asyncio.Future | None = None
        """The app's handling of the request, cancelled by a cut."""
        self.was_cut = False

    async def send(self, message: dict) -> None:
        async with self.lock:
            if self.closed:  # the drain answered for the app: what it still sends goes nowhere
                return
            if message["type"] == "http.response.start":
                self.started = True
                self.status = message["status"]
                ctype = dict(message.get("headers") or []).get(b"content-type", b"")
                self.sse = ctype.startswith(b"text/event-stream")
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                self.closed = True
            await self._send(message)

    async def cut(self) -> None:
        """End the response now: an SSE error event and [DONE] for a stream, a 503 for an unanswered
        request; then cancel the app's work on it."""
        try:
            async with self.lock:
                if self.closed:
                    return
                self.closed = True
                err = shutting_down()
                if not self.started:
                    resp = err.response()
                    self.status = err.status
                    await self._send({"type": "http.response.start", "status": err.status,
                                      "headers": resp.raw_headers})
                    await self._send({"type": "http.response.body", "body": resp.body})
                elif self.sse:
                    await self._send({"type": "http.response.body", "body": err.sse().encode() + DONE})
                else:  # a plain response half sent cannot be turned into an error
                    await self._send({"type": "http.response.body", "body": b""})
        finally:
            if self.task is not None and not self.task.done():  # as for a client that left
                self.was_cut = True
                self.task.cancel()


class Drain:
    """The requests in flight, so that a drain whose time is up can end them (from any thread)."""

    def __init__(self) -> None:
        self._live: set[_Exchange] = set()
        self._loop: asyncio.AbstractEventLoop | None = None

    def add(self, ex: _Exchange) -> None:
        self._loop = asyncio.get_running_loop()
        self._live.add(ex)

    def discard(self, ex: _Exchange) -> None:
        self._live.discard(ex)

    async def cut(self) -> int:
        """End every request still in flight; returns how many there were."""
        live = list(self._live)
        await asyncio.gather(*(ex.cut() for ex in live), return_exceptions=True)
        return len(live)

    def cut_threadsafe(self, timeout_s: float = 5.0) -> None:
        """`cut()` from another thread (the uvicorn drain thread); waits for it up to timeout_s."""
        loop = self._loop
        if loop is None or loop.is_closed() or not self._live:
            return
        fut = asyncio.run_coroutine_threadsafe(self.cut(), loop)
        try:
            fut.result(timeout=timeout_s)
        except (concurrent.futures.TimeoutError, RuntimeError) as e:  # the loop stopped meanwhile
            log.warning("ending the requests still in flight failed: %r", e)


async def drain(state: Any, timeout_s: float, settle_s: float = 2.0) -> int:
    """Refuse new requests (503), give those in flight timeout_s to finish, then end the rest with an
    error; returns how many had to be ended. For a server whose loop runs this coroutine (Ray)."""
    state.draining = True
    end = time.monotonic() + timeout_s
    while state.in_flight > 0 and time.monotonic() < end:
        await asyncio.sleep(0.05)
    left = state.in_flight
    if left:
        await state.drain.cut()
        end = time.monotonic() + settle_s
        while state.in_flight > 0 and time.monotonic() < end:
            await asyncio.sleep(0.02)
    return left


class Edge:
    """ASGI middleware: body cap and Unicode check, in-flight count, drain refusal and cut, status metrics."""

    def __init__(self, app, state: Any, metrics: Metrics, config: ServeConfig):
        self.app, self.state, self.metrics = app, state, metrics
        self.max_body = config.max_body_bytes
        self.max_upload = config.max_upload_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = canonical_path(scope.get("path", ""))
        if path != scope.get("path"):  # /chat/completions etc.: the /v1 route, its caps and its label
            scope = dict(scope, path=path, raw_path=path.encode())
        route = route_label(path)
        if self.state.draining and path != "/health":
            self.metrics.requests.labels(route, "503").inc()
            return await unavailable("The server is shutting down.").response()(scope, receive, send)
        if path.startswith("/demo"):  # the Gradio demo: its own uploads; an open page holds a heartbeat
            return await self._demo(scope, receive, send, route)
        ex = _Exchange(send)
        self.state.in_flight += 1
        self.metrics.in_flight.inc()
        self.state.drain.add(ex)
        try:
            body = await self._body(scope, receive, ex)
            if body is not None:
                ex.task = asyncio.ensure_future(self.app(scope, _Replay(body, receive), ex.send))
                try:
                    await ex.task
                except asyncio.CancelledError:
                    if not ex.was_cut:  # this task itself was cancelled (the server stops)
                        raise
        finally:
            self.state.drain.discard(ex)
            self.state.in_flight -= 1
            self.metrics.in_flight.dec()
            self.metrics.requests.labels(route, str(ex.status)).inc()

    async def _demo(self, scope, receive, send, route: str):
        status = {"code": 500}

        async def send_status(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.requests.labels(route, str(status["code"])).inc()

    async def _body(self, scope, receive, ex: _Exchange) -> bytes | None:
        """The whole body, or None once an error is sent (too large, not Unicode) or the client left."""
        upload = scope.get("path", "").startswith("/v1/rag/")
        limit = self.max_upload if upload else self.max_body
        too_large = _too_large(limit, "agents.max_request_bytes" if upload else "max_body_bytes")
        for k, v in scope.get("headers") or []:
            if k == b"content-length" and v.isdigit() and int(v) > limit:
                await _refuse(too_large, ex)
                return None
        chunks, size = [], 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                ex.status = 499
                return None
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > limit:  # a chunked body (or one longer than its Content-Length): stop reading here
                await _refuse(too_large, ex)
                return None
            if chunk:
                chunks.append(chunk)
            if not msg.get("more_body", False):
                break
        body = b"".join(chunks)
        problem = unicode_problem(body) if body else None
        if problem:
            await _refuse(APIError(400, problem, "invalid_request_error", None, "invalid_unicode"), ex)
            return None
        return body


class _Replay:
    """The receive channel the app sees: the buffered body once, then the client's own messages."""

    def __init__(self, body: bytes, receive):
        self._body: bytes | None = body
        self._receive = receive

    async def __call__(self) -> dict:
        if self._body is None:
            return await self._receive()
        body, self._body = self._body, None
        return {"type": "http.request", "body": body, "more_body": False}


def _too_large(limit: int, setting: str) -> APIError:
    # Connection: close, so the rest of a large upload is never read
    return APIError(413, f"The request body is larger than this server's limit of {limit} bytes "
                         f"({limit / 2**20:.4g} MiB; {setting} in the serve config).",
                    "invalid_request_error", None, "request_too_large", {"Connection": "close"})


async def _refuse(err: APIError, ex: _Exchange) -> None:
    resp = err.response()
    await ex.send({"type": "http.response.start", "status": err.status, "headers": resp.raw_headers})
    await ex.send({"type": "http.response.body", "body": resp.body})
