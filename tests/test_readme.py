"""The README as a newcomer follows it (issue 21): `make run`'s server, then the serving snippets (curl,
the openai client, the RAG / reasoning / agent-run calls over HTTP) and the agent and RAG commands, each
typed as the README writes it, from a folder outside the checkout, with a fresh $HEARTH_HOME. Only the
port (8000 in the README) is changed to a free one. The training chain is walked by
tests/training/test_chain.py.

    python -m pytest tests/test_readme.py -q
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import default_gguf

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(default_gguf() is None, reason="the bundled default model is not installed")]

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
VENV_BIN = Path(sys.executable).parent  # the interpreter running the tests is the one `make` installed


def readme_block(marker: str) -> str:
    """The one fenced code block of the README that contains `marker`."""
    blocks = re.findall(r"^```[a-z]*\n(.*?)^```", README, flags=re.S | re.M)
    found = [b for b in blocks if marker in b]
    assert len(found) == 1, f"{len(found)} README blocks contain {marker!r}"
    return found[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Newcomer:
    """A shell in a folder outside the checkout, `hearth` on PATH as the README says, and a server."""

    def __init__(self, home: Path, port: int):
        self.cwd = home / "work"
        self.cwd.mkdir(parents=True)
        self.port = port
        self.env = {**os.environ, "HEARTH_HOME": str(home / "hearth-home"), "OMP_WAIT_POLICY": "PASSIVE",
                    "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
        self.env.pop("HEARTH_URL", None)

    def typed(self, text: str) -> str:
        return text.replace("127.0.0.1:8000", f"127.0.0.1:{self.port}")

    def sh(self, command: str, timeout_s: float = 300) -> subprocess.CompletedProcess:
        p = subprocess.run(["bash", "-c", self.typed(command)], cwd=self.cwd, env=self.env, text=True,
                           capture_output=True, timeout=timeout_s)
        out = p.stdout + p.stderr
        assert p.returncode == 0, f"`{command}` exited {p.returncode}:\n{out[-3000:]}"
        assert "Traceback" not in out, f"`{command}` printed a traceback:\n{out[-3000:]}"
        return p

    def python(self, code: str, timeout_s: float = 400) -> subprocess.CompletedProcess:
        script = self.cwd / "snippet.py"
        script.write_text(self.typed(code))
        return self.sh(f"{shlex.quote(sys.executable)} snippet.py", timeout_s)


@pytest.fixture(scope="module")
def newcomer(tmp_path_factory):
    me = Newcomer(tmp_path_factory.mktemp("newcomer"), _free_port())
    # the quick start: `make run` (from the checkout, as the README says); its install step is a no-op once
    # `make` has installed, as it has when `make test` runs this; otherwise the command it runs
    up_to_date = subprocess.run(["make", "-C", str(ROOT), "-q", "install"], capture_output=True).returncode == 0
    cmd = (["make", "--no-print-directory", "-C", str(ROOT), "run", f"PORT={me.port}"] if up_to_date else
           [str(VENV_BIN / "hearth"), "serve", "--host", "127.0.0.1", "--port", str(me.port)])
    log = open(me.cwd.parent / "server.log", "w")
    proc = subprocess.Popen(cmd, cwd=me.cwd, env=me.env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{me.port}"

    def log_text() -> str:
        return (me.cwd.parent / "server.log").read_text()

    try:
        end = time.monotonic() + 300
        while True:
            assert proc.poll() is None, "make run exited:\n" + log_text()[-4000:]
            assert time.monotonic() < end, "not up in time:\n" + log_text()[-4000:]
            try:  # healthy, and every deployment up (the embeddings may come up after the chat model)
                if httpx.get(url + "/health", timeout=2).status_code == 200 and "serving on" in log_text():
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        me.server_log = me.cwd.parent / "server.log"
        yield me
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the terminal signals the whole foreground job
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def test_make_run_is_quiet_and_says_where_it_serves(newcomer):
    log = newcomer.server_log.read_text()
    assert f"serving on http://127.0.0.1:{newcomer.port}/v1" in log
    # what a plain start used to print: Ray's and Serve's INFO lines, Ray's token notice, the controller's
    # advice for HAProxy on other nodes, torch's Enum notices from the replicas, library deprecations
    # (Serve's warnings about a slow start stay: they say something about this machine)
    noise = [ln for ln in log.splitlines() if re.search(
        r"\bINFO\b|Token authentication is enabled|HAProxy on other nodes|Enum subclass|DeprecationWarning"
        r"|FutureWarning|UserWarning", ln)]
    assert not noise, "\n".join(noise[:20])


def test_the_curl_snippet(newcomer):
    p = newcomer.sh(readme_block("curl -s http://127.0.0.1:8000/v1/chat/completions"), 120)
    r = json.loads(p.stdout)
    assert r["choices"][0]["message"]["content"] and r["usage"]["completion_tokens"] <= 32


def test_the_openai_snippets_and_the_http_agent_calls(newcomer):
    # one Python session, as a reader runs the page: the client, then RAG, reasoning and an agent run
    # (a bare `r.model_extra["citations"]` line fails the script when the key is missing)
    code = (readme_block("client = OpenAI(") + readme_block('httpx.post("http://127.0.0.1:8000/v1/agents/runs"')
            + '\nimport json\nprint("\\n@@" + json.dumps({"run": run, "reasoning": r.model_extra["reasoning"]}))\n')
    p = newcomer.python(code)
    streamed, summary = p.stdout.rsplit("@@", 1)
    assert streamed.strip(), "the streamed answer printed nothing"
    out = json.loads(summary)
    assert out["reasoning"]["votes"] and 0 < out["reasoning"]["agreement"] <= 1
    run = out["run"]
    assert run["object"] == "agent.run" and run["steps"], run  # a budget that stops a run keeps its trace
    assert run["stopped"] in ("answer", "max_steps", "time_budget"), run


def test_the_rag_and_agent_commands(newcomer):
    docs = newcomer.cwd / "docs"
    docs.mkdir()
    (docs / "keeper.txt").write_text("The Varnholm lighthouse keeper is Ingrid Solberg.\n")
    (docs / "old.md").write_text("Old notes about tea.\n")
    outputs = {}
    for line in readme_block("hearth rag ingest docs/").splitlines():
        command = line.split("  #")[0].strip()
        if not command or command.startswith("hearth bench"):  # the agents bench is timed in bench/RESULTS.md
            continue
        command = command.replace(" [--mmr]", "").replace('"..."', '"What is 2 + 3?"')
        outputs[command] = newcomer.sh(command).stdout
    local = next(v for k, v in outputs.items() if k.startswith("hearth rag query") and "--url" not in k)
    remote = next(v for k, v in outputs.items() if k.startswith("hearth rag query") and "--url" in k)
    # the index holds the README's HTTP upload (keeper.txt) and docs/keeper.txt: either answers first
    assert "keeper.txt#" in local.splitlines()[0] and "keeper.txt#" in remote.splitlines()[0]
    tools = next(v for k, v in outputs.items() if "--tools calculator" in k)
    assert tools.strip() and "stopped at time_budget" not in tools
    assert "keeper.txt" in next(v for k, v in outputs.items() if "--rag-index notes" in k)
