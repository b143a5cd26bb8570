"""`hearth serve` that cannot start says why in one line and exits, instead of a traceback or a
server that answers 503 forever."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest


def _serve(tmp_path: Path, config: str, *extra: str, timeout: float = 120) -> subprocess.CompletedProcess:
    cfg = tmp_path / "models.yaml"
    cfg.write_text(config)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    return subprocess.run([sys.executable, "-m", "hearth.clients.cli", "serve", "--config", str(cfg), *extra],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)


def _one_line_error(r: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in r.stderr + r.stdout, r.stderr[-2000:]
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("hearth: error:")]
    assert len(errors) == 1, r.stderr[-2000:]
    return errors[0]


@pytest.mark.parametrize("layout", [["--no-ray"], []])
def test_a_model_path_that_does_not_exist(tmp_path, layout):
    r = _serve(tmp_path, "models:\n  - name: mine\n    path: ./runs/nope.gguf\nembeddings: []\n", "--port", "0",
               *layout)
    assert r.returncode == 2
    assert "models[0] (mine): no model at ./runs/nope.gguf" in _one_line_error(r)


def test_a_port_in_use(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = _serve(tmp_path, "embeddings: []\n", "--port", str(port), "--no-ray")
    assert r.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}" in _one_line_error(r)


def test_a_model_that_fails_to_load_stops_the_server(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 60)  # a GGUF header and nothing else
    r = _serve(tmp_path, f"models:\n  - name: broken\n    path: {bad}\nembeddings: []\n", "--port", "0",
               "--no-ray")
    assert r.returncode == 1
    assert "the models failed to load" in _one_line_error(r)


def test_a_sandbox_the_kernel_cannot_confine_is_refused_in_the_config(monkeypatch):
    import hearth.agents.tools as tools
    from hearth.serve.config import AgentsConfig, ConfigError

    monkeypatch.setattr(tools, "sandbox_unavailable_reason", lambda: "this kernel has no Landlock")
    with pytest.raises(ConfigError, match="agents.sandbox: this kernel has no Landlock"):
        AgentsConfig(sandbox=True)
    AgentsConfig(sandbox=False)  # off (the default) needs nothing from the kernel
