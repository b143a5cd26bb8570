"""GET /health, /metrics, /v1/models[/{id}], and the API docs (/docs, /redoc, /openapi.json).

/health is public (load balancers poll it); the rest need the API key when keys are set, the docs
included, since they list every route and field the server takes.
"""

from __future__ import annotations

import logging

from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import JSONResponse, Response

from .deps import AUTH, current_router
from .errors import APIError, model_not_found
from .metrics import CONTENT_TYPE
from .router import Router

log = logging.getLogger("hearth.serve")

public = APIRouter()
router = APIRouter(dependencies=AUTH)


@public.get("/health")
async def health(request: Request):
    state = request.app.state
    if state.draining:
        return JSONResponse({"status": "draining"}, status_code=503)
    r = state.router
    if r is None:
        status = "failed" if state.load_error else "loading"
        # the reason (paths, file names) is for the server's log and console, not for any client
        error = "the models failed to load; see the server log" if state.load_error else None
        return JSONResponse({"status": status, "error": error}, status_code=503)
    if not await r.healthy():
        return JSONResponse({"status": "unhealthy", "error": "a model engine stopped"}, status_code=503)
    return {"status": "ok", "models": r.names()}


@router.get("/metrics")
async def metrics(request: Request):
    m, r = request.app.state.metrics, request.app.state.router
    if r is not None:
        for name, client in r.chat.items():
            try:
                m.set_engine(name, await client.stats())
            except Exception as e:  # a dead engine must not break the scrape
                log.warning("stats of %s failed: %s", name, e)
    return Response(m.render(), media_type=CONTENT_TYPE)


@router.get("/v1/models")
async def list_models(request: Request):
    r = current_router(request.app)
    return {"object": "list", "data": [_model_card(r, n) for n in r.names()]}


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, request: Request):
    r = current_router(request.app)
    if model_id in r.chat or model_id in r.embeddings:
        return _model_card(r, model_id)
    try:
        _, info = r.chat_model(model_id)
    except APIError:
        raise model_not_found(model_id, r.names()) from None
    return _model_card(r, info.name)


@router.get("/openapi.json", include_in_schema=False)
async def openapi(request: Request):
    return JSONResponse(request.app.openapi())


@router.get("/docs", include_in_schema=False)
async def swagger_ui(request: Request):
    return get_swagger_ui_html(openapi_url="/openapi.json", title=f"{request.app.title} - API")


@router.get("/redoc", include_in_schema=False)
async def redoc(request: Request):
    return get_redoc_html(openapi_url="/openapi.json", title=f"{request.app.title} - API")


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
