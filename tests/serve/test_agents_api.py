"""The agents' HTTP API on a real server (no Ray, 127.0.0.1, ephemeral port) with the default model:
RAG indexes, the chat `rag` and `reasoning` extensions, and POST /v1/agents/runs.

    python -m pytest tests/serve/test_agents_api.py -q
"""

from __future__ import annotations

import base64
import json
import time

import httpx
import numpy as np
import pytest

from tests.conftest import default_gguf
from tests.serve.conftest import API_KEY, default_config, start_server

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(default_gguf() is None, reason="the bundled default model is not installed")]

MODEL = "smollm2-135m-instruct"
FACT = "The lighthouse keeper of Varnholm island is named Ingrid Solberg, and she has kept the light since 1987."
FILLER = [
    "Bananas are rich in potassium and grow in tropical climates around the world.",
    "The Rhine flows through Switzerland, Germany and the Netherlands before reaching the North Sea.",
    "Python lists are dynamic arrays; appending is amortised constant time.",
]


@pytest.fixture(scope="module")
def agents_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("agents")
    allowed = root / "allowed"
    allowed.mkdir()
    (allowed / "notes.md").write_text("# Notes\n\nThe secret harbour code is 7413.\n")
    cfg = default_config()
    cfg.agents.rag_dir = str(root / "rag")
    cfg.agents.rag_allowed_roots = [str(allowed)]
    cfg.agents.max_steps = 6
    with start_server(cfg) as s:
        s.root = root
        yield s


def _docs():
    docs = [{"source": "varnholm.txt", "text": FACT}]
    docs += [{"source": f"filler-{i}.txt", "text": t} for i, t in enumerate(FILLER)]
    html = "<html><head><style>p{}</style><script>var x=1;</script></head><body><p>Otters hold hands while " \
           "sleeping.</p></body></html>"
    docs.append({"source": "otters.html", "content_base64": base64.b64encode(html.encode()).decode(),
                 "format": "html"})
    return docs


def test_rag_ingest_query_list_delete(agents_server):
    http = agents_server.http()
    r = http.post("/v1/rag/indexes/facts/documents", json={"documents": _docs()})
    assert r.status_code == 200, r.text
    body = r.json()
    assert sorted(body["added"]) == sorted(["varnholm.txt", "otters.html"] + [f"filler-{i}.txt" for i in range(3)])
    # the same documents again change nothing
    again = http.post("/v1/rag/indexes/facts/documents", json={"documents": _docs()}).json()
    assert again["added"] == [] and len(again["unchanged"]) == 5 and again["version"] == body["version"]

    hits = http.post("/v1/rag/indexes/facts/query", json={"query": "Who keeps the Varnholm lighthouse?",
                                                          "top_k": 3}).json()["data"]
    assert hits[0]["source"] == "varnholm.txt" and hits[0]["index"] == 1
    assert FACT[hits[0]["start"]:hits[0]["end"]] == hits[0]["text"]
    otter = http.post("/v1/rag/indexes/facts/query", json={"query": "otters sleeping", "top_k": 1}).json()["data"]
    assert otter[0]["source"] == "otters.html" and "var x" not in otter[0]["text"] and "<p>" not in otter[0]["text"]

    listed = http.get("/v1/rag/indexes/facts/documents").json()["data"]
    assert {d["source"] for d in listed} >= {"varnholm.txt", "otters.html"}
    assert any(i["id"] == "facts" for i in http.get("/v1/rag/indexes").json()["data"])

    d = http.delete("/v1/rag/indexes/facts/documents", params={"source": "otters.html"})
    assert d.status_code == 200 and d.json()["chunks_removed"] >= 1
    after = http.post("/v1/rag/indexes/facts/query", json={"query": "otters sleeping", "top_k": 5}).json()["data"]
    assert all(h["source"] != "otters.html" for h in after)


def test_rag_paths_only_inside_allowed_roots(agents_server):
    http = agents_server.http()
    allowed = agents_server.root / "allowed"
    ok = http.post("/v1/rag/indexes/paths/documents", json={"paths": [str(allowed / "notes.md")]})
    assert ok.status_code == 200, ok.text
    hits = http.post("/v1/rag/indexes/paths/query", json={"query": "harbour code"}).json()["data"]
    assert "7413" in hits[0]["text"]
    for bad in (str(allowed / ".." / "rag"), "/etc/passwd"):
        r = http.post("/v1/rag/indexes/paths/documents", json={"paths": [bad]})
        if r.status_code == 200:  # skipped with a reason is acceptable; silently indexed is not
            assert r.json()["added"] == [] and r.json()["skipped"], r.text
        else:
            assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error", r.text


def test_rag_errors_are_openai_shaped(agents_server):
    http = agents_server.http()
    r = http.post("/v1/rag/indexes/nope/query", json={"query": "x"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "index_not_found"
    r = http.post("/v1/rag/indexes/.hidden/documents", json={"documents": [{"source": "a", "text": "b"}]})
    assert r.status_code in (400, 404) and "error" in r.json()
    r = http.post("/v1/rag/indexes/facts2/documents", json={"documents": [{"source": "a", "text": "b",
                                                                           "content_base64": "eA=="}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "documents[0]"
    r = http.post("/v1/rag/indexes/facts2/documents", json={"documents": [{"source": "a.pdf",
                                                                           "content_base64": "%%%"}]})
    assert r.status_code == 400 and "base64" in r.json()["error"]["message"]
    r = http.post("/v1/rag/indexes/facts2/query", json={})
    assert r.status_code == 400 and r.json()["error"]["param"] == "query"


def test_chat_with_rag_cites_its_sources(agents_server):
    http = agents_server.http()
    http.post("/v1/rag/indexes/cite/documents", json={"documents": _docs()}).raise_for_status()
    c = agents_server.client()
    msgs = [{"role": "user", "content": "Who is the lighthouse keeper of Varnholm island?"}]
    r = c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=32, temperature=0,
                                  extra_body={"rag": {"index": "cite", "top_k": 2}})
    cites = r.model_extra["citations"]
    assert cites[0]["source"] == "varnholm.txt" and cites[0]["index"] == 1
    assert r.choices[0].message.content
    # streamed: the citations arrive first, the text equals the non-streamed answer
    chunks = list(c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=32, temperature=0, stream=True,
                                            extra_body={"rag": {"index": "cite", "top_k": 2}}))
    assert chunks[0].model_extra["citations"] == cites
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == r.choices[0].message.content
    bad = http.post("/v1/chat/completions", json={"model": MODEL, "messages": msgs, "rag": {"index": "missing"}})
    assert bad.status_code == 404 and bad.json()["error"]["code"] == "index_not_found"


def test_reasoning_extension_self_consistency(agents_server):
    c = agents_server.client()
    r = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "What is 3 + 4?"}],
                                  max_tokens=48, temperature=0.7, seed=1,
                                  extra_body={"reasoning": {"strategy": "self_consistency", "n": 3,
                                                            "answer_type": "number"}})
    info = r.model_extra["reasoning"]
    assert info["strategy"] == "self_consistency"
    assert sum(info["votes"].values()) <= 3 and 0 <= info["agreement"] <= 1
    if info["votes"]:  # the vote's winner is the answer
        assert r.choices[0].message.content == max(info["votes"], key=info["votes"].get)
    assert r.usage.completion_tokens > 0
    bad = agents_server.http().post("/v1/chat/completions", json={
        "model": MODEL, "messages": [{"role": "user", "content": "x"}], "reasoning": {"strategy": "magic"}})
    assert bad.status_code == 400 and bad.json()["error"]["param"].startswith("reasoning")


def _sse_events(text: str) -> list:
    out = []
    for block in text.split("\n\n"):
        for line in block.splitlines():
            if line.startswith("data: "):
                data = line[6:]
                out.append(data if data == "[DONE]" else json.loads(data))
    return out


def test_agent_run_with_calculator(agents_server):
    http = agents_server.http()
    req = {"model": MODEL, "input": "What is 1234 * 5678? Use the calculator.", "strategy": "tools",
           "tools": ["calculator"], "max_tokens": 64, "temperature": 0, "budget": {"max_steps": 3}}
    r = http.post("/v1/agents/runs", json=req)
    assert r.status_code == 200, r.text
    run = r.json()
    assert run["object"] == "agent.run" and run["stopped"] in ("answer", "max_steps")
    assert run["usage"]["completion_tokens"] > 0 and run["steps"]
    calls = [s for s in run["steps"] if s["kind"] == "tool_call"]
    results = [s for s in run["steps"] if s["kind"] == "tool_result"]
    assert len(calls) == len(results)
    assert sum(1 for s in run["steps"] if s["kind"] in ("tool_call", "answer", "thought")) >= 1

    with http.stream("POST", "/v1/agents/runs", json={**req, "stream": True}) as s:
        assert s.status_code == 200 and s.headers["content-type"].startswith("text/event-stream")
        events = _sse_events(s.read().decode())
    assert events[0]["object"] == "agent.run.start" and events[-1] == "[DONE]"
    assert events[-2]["object"] == "agent.run"
    steps = [e for e in events if isinstance(e, dict) and e["object"] == "agent.run.step"]
    assert [st["index"] for st in steps] == list(range(len(steps))) and len(steps) == len(events[-2]["steps"])


def test_agent_run_errors(agents_server):
    http = agents_server.http()
    cases = [({"input": "x", "strategy": "magic"}, "strategy"),
             ({"input": "x", "tools": ["rm_rf"]}, "tools"),
             ({"input": "x", "messages": [{"role": "user", "content": "y"}]}, "input"),
             ({"input": "x", "rag": {"index": "no-such-index"}}, "index"),
             ({"input": "x", "model": "nope"}, "model")]
    for body, param in cases:
        r = http.post("/v1/agents/runs", json=body)
        assert 400 <= r.status_code < 500, (body, r.text)
        err = r.json()["error"]
        assert err["param"] and err["param"].startswith(param), (body, err)
    wrong = httpx.post(agents_server.url + "/v1/agents/runs", json={"input": "x"},
                       headers={"Authorization": f"Bearer {API_KEY}-wrong"})
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"


def test_rag_oversized_documents_are_413_fast(agents_server):
    http = agents_server.http()
    cap = 2**20  # agents.max_document_bytes by default
    cases = [({"source": "huge.txt", "text": "a" * (cap + 1)}, "documents[0].text"),
             ({"source": "huge.pdf", "content_base64": base64.b64encode(b"%PDF" + b"a" * cap).decode()},
              "documents[0].content_base64")]
    for doc, param in cases:
        t0 = time.monotonic()
        r = http.post("/v1/rag/indexes/big/documents", json={"documents": [doc]})
        assert r.status_code == 413, r.text
        err = r.json()["error"]
        assert err["code"] == "document_too_large" and err["param"] == param
        assert doc["source"] in err["message"] and str(cap) in err["message"]
        assert time.monotonic() - t0 < 3.0
    many = [{"source": f"part-{i}.txt", "text": "b" * (cap - 10)} for i in range(9)]  # 9 MiB > 8 MiB a request
    r = http.post("/v1/rag/indexes/big/documents", json={"documents": many})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large", r.text
    assert http.get("/v1/rag/indexes/big/documents").status_code == 404  # nothing was created


def test_rag_ingest_stops_when_the_client_leaves(agents_server, monkeypatch):
    from hearth.agents.embed import SentenceTransformerEmbedder

    calls: list[float] = []

    def slow_embed(self, texts):  # the server runs in this process: every batch it embeds shows here
        calls.append(time.monotonic())
        time.sleep(0.3)  # a steady pace, whatever else this machine is doing
        v = np.random.default_rng(len(calls)).standard_normal((len(texts), self.dimensions)).astype(np.float32)
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    monkeypatch.setattr(SentenceTransformerEmbedder, "embed", slow_embed)
    http = agents_server.http()
    seeded = http.post("/v1/rag/indexes/leave/documents", json={"documents": [{"source": "seed.txt", "text": FACT}]})
    assert seeded.status_code == 200, seeded.text
    long_text = " ".join(f"Sentence {i} is about lighthouses, otters and the North Sea." for i in range(12_000))
    assert len(long_text) < 2**20  # under the cap: only the client's leaving stops it
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(agents_server.url + "/v1/rag/indexes/leave/documents", timeout=1.5,
                   headers={"Authorization": f"Bearer {API_KEY}"},
                   json={"documents": [{"source": "long.txt", "text": long_text}]})
    left = time.monotonic()
    # the lock is let go: a second ingest into the same index gets through within a couple of seconds
    r = http.post("/v1/rag/indexes/leave/documents", json={"documents": [{"source": "after.txt", "text": "x y z"}]},
                  timeout=10)
    assert r.status_code == 200, r.text
    assert time.monotonic() - left < 4.0
    n = len(calls)
    time.sleep(1.0)
    assert len(calls) == n  # and nothing is still embedding the abandoned document
    sources = {d["source"] for d in http.get("/v1/rag/indexes/leave/documents").json()["data"]}
    assert sources == {"seed.txt", "after.txt"}  # the cancelled ingest committed nothing
    assert r.json()["version"] == seeded.json()["version"] + 1
