"""`hearth rag ingest` + `hearth agent run` as a user runs them: real processes, the default model served
in process on 127.0.0.1 (no --url), a RAG index in a temp folder.

    python -m pytest tests/clients/test_agent_cli.py -q
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import default_gguf

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(default_gguf() is None, reason="the bundled default model is not installed")]


def _hearth(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "hearth.clients.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_agent_run_answers_from_a_rag_index_with_citations(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "keeper.txt").write_text("The Varnholm lighthouse keeper is Ingrid Solberg.\n")
    (docs / "rhine.md").write_text("# Rivers\n\nThe Rhine flows into the North Sea.\n")
    root = str(tmp_path / "rag")
    p = _hearth("rag", "ingest", "docs", "--index", "notes", "--root", root, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    p = _hearth("agent", "run", "Who keeps the Varnholm lighthouse?", "--strategy", "plain", "--rag-index", "notes",
                "--rag-root", root, "--max-tokens", "32", "--temperature", "0", "--json", cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    run = json.loads(p.stdout)
    assert run["stopped"] == "answer" and run["answer"]
    assert run["citations"][0]["source"].endswith("keeper.txt")
    # the model saw the retrieved text: it is in the prompt of its one call
    assert run["extra"]["model_calls"] == 1 and run["usage"]["prompt_tokens"] > 40


def test_agent_run_streams_steps_and_reports_budget_stops(tmp_path):
    p = _hearth("agent", "run", "What is 12 * 12?", "--strategy", "react", "--tools", "calculator", "--max-steps", "2",
                "--max-tokens", "48", "--temperature", "0", cwd=tmp_path)
    assert p.returncode in (0, 1), p.stderr[-2000:]  # 1: the budget ended the run before an answer
    assert "[0] " in p.stderr  # steps are printed as they happen
    assert p.stdout.strip()  # an answer, or why there is none
    bad = _hearth("agent", "run", "x", "--tools", "no_such_tool", "--url", "http://127.0.0.1:9/v1", "--model", "m",
                  cwd=tmp_path)
    assert bad.returncode == 2 and "no_such_tool" in bad.stderr and "Traceback" not in bad.stderr


def test_sandbox_flag_is_refused_in_one_line_where_the_kernel_cannot_confine(monkeypatch, capsys):
    import hearth.agents.tools as tools
    from hearth.clients.cli import main

    monkeypatch.setattr(tools, "sandbox_unavailable_reason", lambda: "this kernel has no Landlock")
    rc = main(["agent", "run", "2+2?", "--strategy", "tools", "--sandbox", "--url", "http://127.0.0.1:9",
               "--model", "m"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.strip() == "hearth: error: --sandbox: this kernel has no Landlock"


def test_without_url_model_names_the_model_to_serve(tmp_path):
    # a model other than the default, named by --model alone: it is the one served and asked
    gguf = tmp_path / "my-model.gguf"
    os.symlink(default_gguf(), gguf)
    p = _hearth("agent", "run", "Say hi.", "--strategy", "plain", "--model", str(gguf), "--max-tokens", "8",
                "--temperature", "0", "--json", cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    assert json.loads(p.stdout)["stopped"] == "answer"
    both = _hearth("agent", "run", "x", "--model", "a", "--model-path", "b", cwd=tmp_path)
    assert both.returncode == 2 and "not both" in both.stderr
