"""Load on loopback, bounded: 64 concurrent streams equal their solo runs; 100 clients that hang up
mid-stream leave no sequence behind and the server keeps serving."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from tests.conftest import default_gguf

from .conftest import default_config, start_server

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(default_gguf() is None, reason="the bundled default model is not installed")]

MODEL = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def load_server():
    # batch-invariant llama.cpp: a sequence's logits do not depend on its batch company, so a
    # greedy stream among 63 others must equal the same request alone
    cfg = default_config(context_length=4096, max_num_seqs=64,
                         backend_options={"batch_invariant": True, "prefix_cache": False})
    cfg.embeddings = []
    with start_server(cfg) as s:
        yield s


def _body(i: int, stream: bool) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": f"Write a sentence about the number {i}."}],
            "max_tokens": 16, "temperature": 0, "stream": stream}


async def _stream_text(client: httpx.AsyncClient, body: dict) -> str:
    import json

    text = ""
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                obj = json.loads(line[6:])
                assert "error" not in obj, obj
                for ch in obj["choices"]:
                    text += ch["delta"].get("content") or ""
    return text


def _client(s) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=s.url, headers={"Authorization": f"Bearer {s.api_key}"}, timeout=300,
                             limits=httpx.Limits(max_connections=200))


def test_64_concurrent_streams_equal_solo(load_server):
    async def main():
        async with _client(load_server) as c:
            solo = []
            for i in range(64):
                r = await c.post("/v1/chat/completions", json=_body(i, False))
                assert r.status_code == 200
                solo.append(r.json()["choices"][0]["message"]["content"])
            together = await asyncio.gather(*(_stream_text(c, _body(i, True)) for i in range(64)))
        return solo, together

    solo, together = asyncio.run(main())
    mismatched = [i for i in range(64) if solo[i] != together[i]]
    assert not mismatched, [(solo[i], together[i]) for i in mismatched[:3]]


def test_100_disconnects_free_every_sequence(load_server):
    engine = load_server.server.services[0].engine

    async def hang_up(c: httpx.AsyncClient, i: int) -> None:
        body = {**_body(i, True), "max_tokens": 400, "ignore_eos": True}
        async with c.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if '"content":"' in line and '"content":""' not in line:
                    break  # leave after the first token

    async def main():
        async with _client(load_server) as c:
            await asyncio.gather(*(hang_up(c, i) for i in range(100)))

    asyncio.run(main())
    end = time.monotonic() + 2.0
    while time.monotonic() < end and (engine.stats().kv_active_sequences or engine.stats().running
                                      or engine.stats().waiting):
        time.sleep(0.02)
    st = engine.stats()
    assert (st.kv_active_sequences, st.running, st.waiting) == (0, 0, 0), st
    with httpx.Client(base_url=load_server.url, headers={"Authorization": f"Bearer {load_server.api_key}"},
                      timeout=60) as h:
        r = h.post("/v1/chat/completions", json=_body(1, False))
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]
        assert "hearth_active_sequences" in h.get("/metrics").text
