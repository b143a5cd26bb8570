"""`hearth rag query --url`: ask a running server's index instead of loading the embedder here; a local
query says on stderr that it loads the embedding model.

    python -m pytest tests/clients/test_rag_query_url.py -q
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from hearth.clients import cmd_rag
from hearth.clients.cli import main

HIT = {"index": 1, "source": "kettle.md", "chunk_id": 0, "start": 0, "end": 52, "score": 0.91,
       "text": "Descale the kettle every four weeks with vinegar."}


@pytest.fixture
def server():
    """A stand-in for `hearth serve` on 127.0.0.1: records each request, answers like the RAG route."""
    seen: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 (the http.server name)
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
            if self.headers.get("Authorization") != "Bearer sk-test":
                status, reply = 401, {"error": {"message": "invalid API key", "type": "authentication_error",
                                                "param": None, "code": "invalid_api_key"}}
            elif self.path != "/v1/rag/indexes/notes/query":
                status, reply = 404, {"error": {"message": "no RAG index named 'other'", "type": "not_found",
                                                "param": None, "code": None}}
            else:
                status, reply = 200, {"object": "list", "index": "notes", "version": 3, "data": [HIT]}
            data = json.dumps(reply).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", seen
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture
def no_local_embedder(monkeypatch, tmp_path):
    monkeypatch.setenv("HEARTH_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("HEARTH_URL", raising=False)
    monkeypatch.delenv("HEARTH_API_KEY", raising=False)

    def refuse(*a, **kw):
        raise AssertionError("a --url query must not load an embedder here")

    monkeypatch.setattr(cmd_rag, "_embedder", refuse)


def test_query_asks_the_running_server(server, no_local_embedder, capsys):
    url, seen = server
    rc = main(["rag", "query", "descale?", "--index", "notes", "-k", "2", "--url", url + "/v1",
               "--api-key", "sk-test", "--json"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert json.loads(out) == {"index": "notes", "version": 3, "hits": [HIT]}
    assert seen == [{"path": "/v1/rag/indexes/notes/query", "auth": "Bearer sk-test",
                     "body": {"query": "descale?", "top_k": 2, "mmr": False, "mmr_lambda": 0.5}}]


def test_hearth_url_and_key_from_the_environment(server, no_local_embedder, monkeypatch, capsys):
    url, _ = server
    monkeypatch.setenv("HEARTH_URL", url)
    monkeypatch.setenv("HEARTH_API_KEY", "sk-test")
    assert main(["rag", "query", "descale?", "--index", "notes"]) == 0
    assert "kettle.md#0" in capsys.readouterr().out


@pytest.mark.parametrize("argv, words", [
    (["--index", "notes", "--api-key", "wrong"], ["401", "invalid API key"]),
    (["--index", "other", "--api-key", "sk-test"], ["404", "no RAG index named 'other'"]),
])
def test_a_server_error_is_one_line(server, no_local_embedder, capsys, argv, words):
    url, _ = server
    assert main(["rag", "query", "q", "--url", url, *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("hearth: error:") and all(w in err for w in words)


def test_no_server_there_is_one_line(no_local_embedder, capsys):
    import socket
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert main(["rag", "query", "q", "--index", "notes", "--url", f"http://127.0.0.1:{port}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot query" in err and "hearth serve" in err


def test_a_local_query_says_it_loads_the_embedder(monkeypatch, tmp_path, capsys):
    import hearth.agents.rag as rag
    from hearth.agents.embed import HashingEmbedder

    monkeypatch.setenv("HEARTH_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("HEARTH_URL", raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "kettle.md").write_text("Descale the kettle every four weeks with vinegar.\n")
    assert main(["rag", "ingest", "kettle.md", "--index", "notes", "--embedding-model", "hashing", "--quiet"]) == 0
    assert "loading the embedding model" not in capsys.readouterr().err  # hashing: no model to load
    loaded = []
    monkeypatch.setattr(rag, "embedder_from_spec", lambda spec: loaded.append(spec) or HashingEmbedder(256))
    assert main(["rag", "query", "descale?", "--index", "notes", "--embedding-model", "default"]) == 0
    out, err = capsys.readouterr()
    assert loaded == ["default"] and "kettle.md#0" in out
    assert err.count("\n") == 1 and "loading the embedding model in this process" in err and "--url" in err
