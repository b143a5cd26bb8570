"""`hearth rag` end to end on a temp folder (the model-free hashing embedder keeps it fast).

    nice -n 10 .venv/bin/python -m pytest tests/agents/test_rag_cli.py -q
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from hearth.clients.cli import main


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.setenv("HEARTH_HOME", str(tmp_path / "home"))
    work = tmp_path / "work"
    (work / "docs" / "sub").mkdir(parents=True)
    (work / "docs" / "kettle.md").write_text("# Kettle\n\nDescale the kettle every four weeks with vinegar.\n")
    (work / "docs" / "sub" / "tea.html").write_text(
        "<html><script>var x = 1;</script><body><p>Green tea is brewed at eighty degrees.</p></body></html>")
    (work / "docs" / "photo.jpg").write_bytes(b"\xff\xd8\xff")
    monkeypatch.chdir(work)
    return work


def run(capsys, *argv) -> tuple[int, str, str]:
    rc = main(["rag", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_ingest_query_list_delete(workdir, tmp_path, capsys):
    rc, out, err = run(capsys, "ingest", "docs", "--index", "notes", "--embedding-model", "hashing", "--quiet")
    assert rc == 0, err
    assert "notes v1: 2 added, 0 replaced, 0 unchanged, 1 skipped; 2 documents" in out
    assert "skipped docs/photo.jpg: unsupported file type '.jpg'" in err
    assert (tmp_path / "home" / "rag" / "notes" / "CURRENT").is_file()  # default root: $HEARTH_HOME/rag

    # the index remembers its embedder: no --embedding-model needed from here on
    rc, out, err = run(capsys, "query", "how often to descale the kettle", "--index", "notes", "-k", "2", "--json")
    assert rc == 0, err
    res = json.loads(out)
    assert res["version"] == 1 and res["hits"][0]["source"] == "docs/kettle.md" and res["hits"][0]["index"] == 1
    assert "four weeks" in res["hits"][0]["text"] and len(res["hits"]) == 2
    rc, out, _ = run(capsys, "query", "green tea temperature", "--index", "notes", "--mmr")
    assert rc == 0 and out.startswith("[1] ") and "docs/sub/tea.html#0" in out.splitlines()[0]
    assert "var x" not in out

    rc, out, _ = run(capsys, "ingest", "docs/kettle.md", "--index", "notes", "--quiet")
    assert "notes v1: 0 added, 0 replaced, 1 unchanged" in out
    (workdir / "docs" / "kettle.md").write_text("Descale the kettle every ten days.\n")
    rc, out, _ = run(capsys, "ingest", "docs", "--index", "notes", "--quiet")
    assert "notes v2: 0 added, 1 replaced, 1 unchanged" in out

    rc, out, _ = run(capsys, "list")
    assert rc == 0 and out.split("\t")[:4] == ["notes", "v2", "2 documents", "2 chunks"]
    rc, out, _ = run(capsys, "list", "--index", "notes", "--json")
    assert [d["source"] for d in json.loads(out)["documents"]] == ["docs/kettle.md", "docs/sub/tea.html"]

    rc, out, _ = run(capsys, "delete", "docs/sub/tea.html", "--index", "notes")
    assert rc == 0 and "notes v3: removed 1 documents (1 chunks)" in out
    rc, out, err = run(capsys, "delete", "docs/nope.md", "--index", "notes")
    assert rc == 2 and err.startswith("hearth: error: ") and "docs/nope.md" in err
    rc, out, _ = run(capsys, "delete", "--index", "notes", "--drop")
    assert rc == 0 and "dropped" in out
    rc, out, err = run(capsys, "list")
    assert "no indexes" in err


def test_cli_errors(workdir, tmp_path, capsys):
    outside = tmp_path / "outside.md"
    outside.write_text("secret")
    rc, _, err = run(capsys, "ingest", str(outside), "--index", "notes", "--embedding-model", "hashing")
    assert rc == 2 and "outside the allowed roots" in err and err.startswith("hearth: error: ")
    rc, out, err = run(capsys, "ingest", str(outside), "--index", "notes", "--allow-root", str(tmp_path),
                       "--embedding-model", "hashing", "--quiet")
    assert rc == 0 and "1 added" in out, err
    rc, _, err = run(capsys, "ingest", "docs/photo.jpg", "--index", "notes")
    assert rc == 2 and "supported: .txt, .md" in err
    rc, _, err = run(capsys, "query", "x", "--index", "missing")
    assert rc == 2 and "no RAG index" in err
    rc, _, err = run(capsys, "query", "x", "--index", "../evil")
    assert rc == 2 and "index name" in err
    rc, _, err = run(capsys, "query", "x", "--index", "notes", "--embedding-model", "hashing-64")
    assert rc == 2 and "built with the embedding model 'hashing-256'" in err


def test_cli_entry_point_exit_code(workdir):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, "-m", "hearth.clients.cli", "rag", "query", "x", "--index", "none"],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2 and proc.stderr.startswith("hearth: error: no RAG index named 'none'")
