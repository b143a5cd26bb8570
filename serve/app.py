"""The OpenAI-compatible FastAPI app: routes, auth, drain, metrics. No Ray here.

    app = build_app(config, router)          # router: model name -> client (router.py)
    uvicorn.run(app, host="127.0.0.1", port=8000)

`hearth serve --no-ray` runs exactly this in one process; under Ray Serve (ray_app.py) the same
app is the ingress deployment and its clients are deployment handles.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import time
from typing import Any, AsyncIterator

from fastapi import Depends, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse
from hearth.runtime.errors import HearthError

from . import agents_routes
from . import chat as chat_route
from . import completions as completions_route
from . import errors
from .common import Run, new_id, start_all
from .config import ServeConfig
from .errors import APIError, unauthorized, unavailable
from .metrics import CONTENT_TYPE, Metrics
from .protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    embedding_inputs,
)
from .router import Router

log = logging.getLogger("hearth.serve")

_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
_ROUTES = {"/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models", "/health", "/metrics",
           "/v1/agents/runs"}


def api_keys_from_env(flags: list[str] | None = None) -> list[str]:
    """Keys from --api-key flags plus HEARTH_API_KEYS (comma separated)."""
    keys = list(flags or [])
    keys += [k.strip() for k in os.environ.get("HEARTH_API_KEYS", "").split(",") if k.strip()]
    return keys


class _Edge:
    """ASGI middleware: counts in-flight requests, refuses new ones while draining, records statuses.
    Pure ASGI rather than BaseHTTPMiddleware so streams and disconnects pass through untouched."""

    def __init__(self, app, state: Any, metrics: Metrics):
        self.app, self.state, self.metrics = app, state, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        route = path if path in _ROUTES else "other"
        for prefix in ("/v1/models", "/v1/rag"):
            if path.startswith(prefix + "/"):
                route = prefix
        if self.state.draining and path != "/health":
            err = unavailable("The server is shutting down.")
            self.metrics.requests.labels(route, "503").inc()
            return await err.response()(scope, receive, send)
        status = {"code": 500}

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        counted = not path.startswith("/demo")  # an open demo page holds a heartbeat stream: never drained
        if counted:
            self.state.in_flight += 1
            self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            if counted:
                self.state.in_flight -= 1
                self.metrics.in_flight.dec()
            self.metrics.requests.labels(route, str(status["code"])).inc()


def build_app(config: ServeConfig, router: Router | None = None) -> FastAPI:
    """The app; with router None it answers 503 until `app.state.router` is set (models loading)."""
    app = FastAPI(title="hearth", version="0.1.0",
                  description="OpenAI-compatible API of hearth: chat, completions, embeddings, "
                              "RAG indexes and agent runs.")
    app.state.router = router
    app.state.agents = None
    app.state.draining = False
    app.state.in_flight = 0
    app.state.load_error = None
    metrics = app.state.metrics = Metrics()
    errors.install(app)
    if config.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=config.cors_origins, allow_methods=["*"],
                           allow_headers=["*"])
    keys = [k.encode() for k in config.api_keys]

    async def require_key(request: Request) -> None:
        if not keys:
            return
        auth = request.headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise unauthorized("Missing API key: send it as 'Authorization: Bearer KEY'.")
        given = token.strip().encode()
        ok = False
        for k in keys:  # compare with every key, so timing says nothing about which matched
            ok |= hmac.compare_digest(given, k)
        if not ok:
            raise unauthorized()

    def current_router() -> Router:
        if app.state.draining:
            raise unavailable("The server is shutting down.")
        r = app.state.router
        if r is None:
            if app.state.load_error:
                raise unavailable(f"The models failed to load: {app.state.load_error}")
            raise unavailable("The models are still loading.")
        return r

    def current_agents():
        """The agents (RAG + runs): set by the Ray ingress, or made here over the local router on first use."""
        if not config.agents.enabled:
            raise errors.APIError(404, "Agents and RAG are turned off on this server (agents.enabled: false).",
                                  "invalid_request_error", None, "not_found")
        if app.state.agents is None:
            from .agents_service import AgentService
            app.state.agents = AgentService(config, current_router())
        return app.state.agents

    def deadline(t0: float) -> float:
        return t0 + config.request_timeout_s

    auth = [Depends(require_key)]

    @app.get("/health")
    async def health():
        if app.state.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        r = app.state.router
        if r is None:
            status = "failed" if app.state.load_error else "loading"
            return JSONResponse({"status": status, "error": app.state.load_error}, status_code=503)
        if not await r.healthy():
            return JSONResponse({"status": "unhealthy", "error": "a model engine stopped"}, status_code=503)
        return {"status": "ok", "models": r.names()}

    @app.get("/metrics", dependencies=auth)
    async def metrics_route():
        r = app.state.router
        if r is not None:
            for name, client in r.chat.items():
                try:
                    metrics.set_engine(name, await client.stats())
                except Exception as e:  # a dead engine must not break the scrape
                    log.warning("stats of %s failed: %s", name, e)
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models", dependencies=auth)
    async def list_models():
        r = current_router()
        return {"object": "list", "data": [_model_card(r, n) for n in r.names()]}

    @app.get("/v1/models/{model_id:path}", dependencies=auth)
    async def get_model(model_id: str):
        r = current_router()
        if model_id in r.chat or model_id in r.embeddings:
            return _model_card(r, model_id)
        try:
            _, info = r.chat_model(model_id)
        except APIError:
            raise errors.model_not_found(model_id, r.names()) from None
        return _model_card(r, info.name)

    def resolve(body, route: str):
        """The model's client and info, with unknown fields logged."""
        client, info = current_router().chat_model(body.model)
        _log_unknown(body, route)
        return client, info

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        t0 = time.monotonic()
        client, info = resolve(body, "chat.completions")
        if body.reasoning is not None:
            return await agents_routes.reasoning_chat(current_agents(), body, _include_usage(body))
        cites = None
        if body.rag is not None:
            body, cites = await agents_routes.rag_chat_messages(current_agents(), body)
        try:
            plan = chat_route.plan_chat(body, info)
        except HearthError as e:
            raise errors.from_exception(e) from None
        runs = [Run(client, plan.request, model=body.model, metrics=metrics, t0=t0, deadline=deadline(t0),
                    want_bytes=bool(body.logprobs))]
        await _start_all(runs, request)
        if body.stream:
            chunks = chat_route.stream(runs[0], plan, body.model, _include_usage(body))
            if cites is not None:
                chunks = _prepend(agents_routes.citations_chunk(plan.request.request_id, body.model, cites), chunks)
            return _sse(chunks, runs)
        resp = await _until_done(request, chat_route.complete(runs[0], plan, body.model), runs)
        if cites is not None:
            resp["citations"] = cites
        return resp

    @app.post("/v1/completions", dependencies=auth)
    async def completions(body: CompletionRequest, request: Request):
        t0 = time.monotonic()
        client, info = resolve(body, "completions")
        try:
            reqs = completions_route.plan_completions(body, info)
        except HearthError as e:
            raise errors.from_exception(e, "prompt") from None
        runs = [Run(client, q, model=body.model, metrics=metrics, t0=t0, deadline=deadline(t0),
                    want_bytes=body.logprobs is not None, echo_bytes=bool(body.echo), prompt_param="prompt")
                for q in reqs]
        await _start_all(runs, request)
        rid = new_id("cmpl")
        if body.stream:
            return _sse(completions_route.stream(runs, body, body.model, rid, _include_usage(body)), runs)
        return await _until_done(request, completions_route.complete(runs, body, body.model, rid), runs)

    @app.post("/v1/embeddings", dependencies=auth)
    async def embeddings(body: EmbeddingRequest):
        r = current_router()
        client, info = r.embedding_model(body.model)
        _log_unknown(body, "embeddings")
        inputs = embedding_inputs(body.input)
        try:
            res = await asyncio.wait_for(client.embed(inputs, dimensions=body.dimensions),
                                         timeout=config.request_timeout_s)
        except asyncio.TimeoutError:
            raise errors.timeout(config.request_timeout_s) from None
        except HearthError as e:
            raise errors.from_exception(e, "input") from None
        if body.encoding_format == "base64":
            from .embeddings import encode_base64
            data = [{"object": "embedding", "index": i, "embedding": encode_base64(v)}
                    for i, v in enumerate(res.vectors)]
        else:
            data = [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(res.vectors)]
        return {"object": "list", "data": data, "model": body.model,
                "usage": {"prompt_tokens": res.prompt_tokens, "total_tokens": res.prompt_tokens}}

    agents_routes.install(app, auth, current_agents)
    app.add_middleware(_Edge, state=app.state, metrics=metrics)
    return app


def _model_card(r: Router, name: str) -> dict:
    if name in r.chat_info:
        i = r.chat_info[name]
        card = {"id": name, "object": "model", "created": i.created, "owned_by": "hearth",
                "max_model_len": i.max_model_len, "backend": i.backend, "aliases": i.aliases}
        if i.lineage:
            card["lineage"] = i.lineage
        return card
    e = r.embedding_info[name]
    return {"id": name, "object": "model", "created": e.created, "owned_by": "hearth", "type": "embedding",
            "dimensions": e.dimensions, "max_input_tokens": e.max_input_tokens}


def _log_unknown(body: Any, route: str) -> None:
    extra = body.unknown_fields()
    if extra:
        log.info("%s: ignoring unknown fields %s", route, extra)


async def _prepend(first: str, rest: AsyncIterator[str]) -> AsyncIterator[str]:
    yield first
    async for s in rest:
        yield s


def _include_usage(body) -> bool:
    return bool(body.stream_options and body.stream_options.include_usage)


async def _start_all(runs: list[Run], request: Request) -> None:
    """Start the runs, aborting them if the client goes away first."""
    await _until_done(request, start_all(runs), runs)


async def _until_done(request: Request, coro, runs: list[Run]):
    """Await coro, but abort the runs (and return nothing) if the client disconnects meanwhile."""
    task = asyncio.ensure_future(coro)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await asyncio.gather(*(r.close() for r in runs), return_exceptions=True)
        raise APIError(499, "The client closed the request.", code="client_closed_request")
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()


async def _disconnected(request: Request) -> None:
    while True:
        msg = await request.receive()
        if msg["type"] == "http.disconnect":
            return


def _sse(chunks: AsyncIterator[str], runs: list[Run]) -> StreamingResponse:
    async def body() -> AsyncIterator[str]:
        try:
            async for s in chunks:
                yield s
        except APIError as e:  # the stream has begun: the error goes out as an SSE event
            yield e.sse()
        except Exception as e:
            yield errors.from_exception(e).sse()
        finally:
            await asyncio.gather(*(r.close() for r in runs), return_exceptions=True)

    return StreamingResponse(body(), media_type="text/event-stream", headers=_SSE_HEADERS)
