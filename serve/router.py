"""Which client serves which `model` name: chat models (with aliases) and embedding models.

A client is anything with the ModelService interface (info, generate, stats, healthy) or the
EmbeddingService one (embed): the in-process objects here, or Ray Serve handles (ray_app.py).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

from .config import ServeConfig
from .errors import model_not_found
from .model_service import ModelInfo

log = logging.getLogger("hearth.serve")


@dataclass
class EmbeddingInfo:
    name: str
    dimensions: int
    max_input_tokens: int
    created: int


@dataclass
class Router:
    """Model name -> client, plus each model's info fetched once at start."""

    chat: dict[str, Any] = field(default_factory=dict)
    chat_info: dict[str, ModelInfo] = field(default_factory=dict)
    embeddings: dict[str, Any] = field(default_factory=dict)
    embedding_info: dict[str, EmbeddingInfo] = field(default_factory=dict)
    _alias: dict[str, str] = field(default_factory=dict)

    async def add_chat(self, client: Any) -> None:
        info = await client.info()
        self.chat[info.name] = client
        self.chat_info[info.name] = info
        for a in (info.name, *info.aliases):
            self._alias[a] = info.name

    async def add_embedding(self, name: str, client: Any) -> None:
        self.embeddings[name] = client
        self.embedding_info[name] = await client.info()

    def names(self) -> list[str]:
        return sorted(self.chat) + sorted(self.embeddings)

    def chat_model(self, name: str) -> tuple[Any, ModelInfo]:
        canon = self._alias.get(name)
        if canon is None:
            if name in self.embeddings:
                raise model_not_found(name, sorted(self.chat)) from None
            raise model_not_found(name, self.names())
        return self.chat[canon], self.chat_info[canon]

    def embedding_model(self, name: str) -> tuple[Any, EmbeddingInfo]:
        if name not in self.embeddings:
            raise model_not_found(name, sorted(self.embeddings))
        return self.embeddings[name], self.embedding_info[name]

    async def healthy(self) -> bool:
        checks = [c.healthy() for c in self.chat.values()]
        results = await asyncio.gather(*checks, return_exceptions=True)
        return all(r is True for r in results)


class LocalEmbedding:
    """EmbeddingService behind the client interface (info is async, like a Ray handle's)."""

    def __init__(self, service: Any):
        self.service = service

    async def info(self) -> EmbeddingInfo:
        s = self.service
        return EmbeddingInfo(s.name, s.dimensions, s.max_input_tokens, getattr(s, "created", 0))

    async def embed(self, inputs, dimensions=None):
        return await self.service.embed(inputs, dimensions=dimensions)


def load_local(config: ServeConfig) -> tuple[Router, list[Any]]:
    """Load every configured model in this process (blocking). Returns the router and the
    objects to shut down at exit."""
    from .embeddings import EmbeddingService
    from .model_service import ModelService

    services: list[Any] = []
    router = Router()
    loop = asyncio.new_event_loop()
    try:
        for m in config.models:
            svc = ModelService(m, chat_template=m.load_chat_template(config.base_dir))
            services.append(svc)
            loop.run_until_complete(router.add_chat(svc))
        for e in config.embeddings:
            es = EmbeddingService(e.name, path=e.path, device=e.device, max_batch_size=e.max_batch_size)
            loop.run_until_complete(router.add_embedding(e.name, LocalEmbedding(es)))
    finally:
        loop.close()
    return router, services
