"""What the routes depend on: the API key check, the model router, the agents, the served config.

    router = APIRouter(dependencies=AUTH)          # every route of it needs the key when keys are set
    client, info = chat_model(request.app, body, "chat.completions")

`build_app` puts the config, the keys and the router on `app.state`; these read them from there.
"""

from __future__ import annotations

import hmac
import logging
from typing import Any

from fastapi import Depends, FastAPI, Request

from .errors import APIError, unauthorized, unavailable
from .router import Router

log = logging.getLogger("hearth.serve")


async def require_key(request: Request) -> None:
    """401 unless the request carries one of the configured keys (none configured: open)."""
    keys: list[bytes] = request.app.state.api_keys
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


AUTH = [Depends(require_key)]


def current_router(app: FastAPI) -> Router:
    """The model router, or 503 while draining, loading or after a failed load."""
    if app.state.draining:
        raise unavailable("The server is shutting down.")
    r = app.state.router
    if r is None:
        if app.state.load_error:
            raise unavailable("The models failed to load; see the server log.")
        raise unavailable("The models are still loading.")
    return r


def current_agents(app: FastAPI) -> Any:
    """The agents (RAG + runs): set by the Ray ingress, or made here over the local router on first use."""
    config = app.state.config
    if not config.agents.enabled:
        raise APIError(404, "Agents and RAG are turned off on this server (agents.enabled: false).",
                       "invalid_request_error", None, "not_found")
    if app.state.agents is None:
        from .agents_service import AgentService
        app.state.agents = AgentService(config, current_router(app))
    return app.state.agents


def chat_model(app: FastAPI, body: Any, route: str) -> tuple[Any, Any]:
    """The chat model's client and info for `body.model`, with unknown request fields logged."""
    r = current_router(app)
    try:
        client, info = r.chat_model(body.model)
    except APIError:
        if not (app.state.config.any_model_name and len(r.chat) == 1) or body.model in r.embeddings:
            raise
        client, info = r.chat_model(next(iter(r.chat)))
    log_unknown(body, route)
    return client, info


def log_unknown(body: Any, route: str) -> None:
    extra = body.unknown_fields()
    if extra:
        log.info("%s: ignoring unknown fields %s", route, extra)
