"""Property test of the app's own OpenAPI schema (schemathesis): whatever a client sends, no 5xx,
and every error is OpenAI's envelope. A tiny random model keeps each generation cheap."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import build_tiny_model

KEY = "sk-fuzz"


@pytest.fixture(scope="module")
def fuzz_app(tmp_path_factory):
    import asyncio

    from hearth.serve.app import build_app
    from hearth.serve.config import ModelConfig, ServeConfig
    from hearth.serve.embeddings import EmbeddingService
    from hearth.serve.model_service import ModelService
    from hearth.serve.router import LocalEmbedding, Router

    path = build_tiny_model(tmp_path_factory.mktemp("fuzz-model"))
    model = ModelConfig(name="tiny", path=str(path), backend="transformers", context_length=256, max_num_seqs=8,
                        backend_options={"num_threads": 1})
    cfg = ServeConfig(models=[model], port=0, api_keys=[KEY], request_timeout_s=60)
    svc = ModelService(model)
    router = Router()
    asyncio.run(router.add_chat(svc))
    asyncio.run(router.add_embedding("all-minilm-l6-v2", LocalEmbedding(EmbeddingService())))
    app = build_app(cfg, router)
    yield app
    svc.shutdown()


@pytest.fixture(scope="module")
def api(fuzz_app):
    # the docs need the key like every route when keys are set
    return schemathesis.openapi.from_asgi("/openapi.json", fuzz_app, headers={"Authorization": f"Bearer {KEY}"})


def test_no_5xx_and_openai_errors(api):
    checked = []
    statuses: dict[str, set[int]] = {}
    for result in api.get_all_operations():
        op = result.ok()

        @given(case=op.as_strategy(), real_model=st.booleans())
        @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def check(case, real_model):
            if real_model and isinstance(case.body, dict) and "model" in case.body:
                # half the bodies name a served model, so the fuzzer reaches past the router
                case.body["model"] = "all-minilm-l6-v2" if "embeddings" in case.path else "tiny"
            response = case.call(headers={"Authorization": f"Bearer {KEY}"}, timeout=120)
            statuses.setdefault(f"{case.method} {case.path}", set()).add(response.status_code)
            assert response.status_code < 500, (case.method, case.path, case.body, response.text[:500])
            if response.status_code >= 400:
                err = response.json()["error"]
                assert set(err) == {"message", "type", "param", "code"} and err["message"]

        check()
        checked.append(f"{op.method.upper()} {op.path}")
    assert {"POST /v1/chat/completions", "POST /v1/completions", "POST /v1/embeddings"} <= set(checked)
    # the fuzzer got past validation too: some generated requests were served
    assert 200 in statuses["POST /v1/completions"] | statuses["POST /v1/chat/completions"], repr(statuses)
    print(statuses)
