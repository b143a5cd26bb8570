"""The OpenAI-compatible FastAPI app: one module per route, the edge in front. No Ray here.

    app = build_app(config, router)          # router: model name -> client (router.py)
    uvicorn.run(app, host="127.0.0.1", port=8000)

`hearth serve --no-ray` runs exactly this in one process; under Ray Serve (ray_app.py) the same
app is the ingress deployment and its clients are deployment handles.

    edge.py              body cap, Unicode check, in-flight count, drain        (every request)
    models_routes.py     /health, /metrics, /v1/models, /docs, /redoc, /openapi.json
    chat.py              POST /v1/chat/completions
    completions.py       POST /v1/completions
    responses.py         POST /v1/responses, GET/DELETE /v1/responses/{id}
    tokenize_routes.py   POST /tokenize, /detokenize
    embeddings_routes.py POST /v1/embeddings
    agents_routes.py     /v1/rag/..., POST /v1/agents/runs

The edge also serves /chat/completions, /completions, /embeddings, /models and /responses without the
/v1 prefix (as llama-server and vLLM do).
"""

from __future__ import annotations

import os

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from . import (agents_routes, chat, completions, embeddings_routes, errors, models_routes, responses,
               tokenize_routes)
from .config import ServeConfig
from .deps import AUTH, current_agents
from .edge import Drain, Edge
from .metrics import Metrics
from .rewards import RewardModels
from .router import Router


def api_keys_from_env(flags: list[str] | None = None) -> list[str]:
    """Keys from --api-key flags plus HEARTH_API_KEYS (comma separated)."""
    keys = list(flags or [])
    keys += [k.strip() for k in os.environ.get("HEARTH_API_KEYS", "").split(",") if k.strip()]
    return keys


def build_app(config: ServeConfig, router: Router | None = None) -> FastAPI:
    """The app; with router None it answers 503 until `app.state.router` is set (models loading)."""
    # the docs are routes of models_routes.py, behind the API key like the rest
    app = FastAPI(title="hearth", version="0.1.0", docs_url=None, redoc_url=None, openapi_url=None,
                  description="OpenAI-compatible API of hearth: chat, completions, embeddings, "
                              "RAG indexes and agent runs.")
    state = app.state
    state.config = config
    state.api_keys = [k.encode() for k in config.api_keys]
    state.router = router
    state.agents = None
    state.draining = False
    state.in_flight = 0
    state.drain = Drain()
    state.load_error = None
    state.metrics = Metrics()
    errors.install(app)
    if config.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=config.cors_origins, allow_methods=["*"],
                           allow_headers=["*"])
    state.rewards = RewardModels(config.reward_models, config.base_dir)
    state.responses = responses.ResponseStore(config.responses_store_max, config.responses_store_max_bytes)
    for r in (models_routes.public, models_routes.router, chat.router, completions.router,
              embeddings_routes.router, responses.router, tokenize_routes.router):
        app.include_router(r)
    agents_routes.install(app, AUTH, lambda: current_agents(app))
    app.add_middleware(Edge, state=state, metrics=state.metrics, config=config)
    return app
