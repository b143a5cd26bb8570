"""POST /v1/embeddings: text or token arrays in, one vector per input out (float lists or base64).

The route checks the caps, then the embedding model (embeddings.py, or its Ray handle) validates,
tokenizes and embeds off the event loop within the request timeout.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from hearth.runtime.errors import HearthError

from . import limits
from .deps import AUTH, current_router, log_unknown
from .embeddings import encode_base64
from .errors import from_exception, timeout
from .protocol import EmbeddingRequest, embedding_inputs

router = APIRouter(dependencies=AUTH)


@router.post("/v1/embeddings")
async def embeddings(body: EmbeddingRequest, request: Request):
    config = request.app.state.config
    client, _ = current_router(request.app).embedding_model(body.model)
    log_unknown(body, "embeddings")
    limits.check_embeddings(body, config)
    try:
        res = await asyncio.wait_for(client.embed(embedding_inputs(body.input), dimensions=body.dimensions),
                                     timeout=config.request_timeout_s)
    except asyncio.TimeoutError:
        raise timeout(config.request_timeout_s) from None
    except HearthError as e:
        raise from_exception(e, "input") from None
    b64 = body.encoding_format == "base64"
    data = [{"object": "embedding", "index": i, "embedding": encode_base64(v) if b64 else v}
            for i, v in enumerate(res.vectors)]
    return {"object": "list", "data": data, "model": body.model,
            "usage": {"prompt_tokens": res.prompt_tokens, "total_tokens": res.prompt_tokens}}
