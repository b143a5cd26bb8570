"""A models.yaml that the Ray cluster cannot hold is one clear error before deploying, not replicas
waiting to be scheduled with no end (issue 22): the packing on fake nodes, and `hearth serve` asking a
CPU-only machine for a GPU.

    python -m pytest tests/serve/test_placement.py -q
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time

import pytest

from hearth.serve.config import ServeConfig
from hearth.serve.placement import check_fits, describe, headroom

from tests.conftest import default_gguf


def _cfg(**model) -> ServeConfig:
    return ServeConfig(models=[{"name": "m", **model}], embeddings=[{"name": "e"}])


def _nodes(*cpus_gpus) -> list[dict]:
    return [{"Alive": True, "Resources": {"CPU": c, "GPU": g}} for c, g in cpus_gpus]


def test_the_issues_two_one_cpu_nodes_cannot_hold_two_replicas_and_the_embedder():
    # two 1-CPU nodes: 2 chat replicas x 1 CPU fill both, the embedder's 0.5 CPU fits nowhere
    msg = check_fits(_cfg(replicas=2), _nodes((1, 0), (1, 0)), {"CPU": 2})
    assert msg and "chat-m: 2 x 1 CPU" in msg and "embed-e: 1 x 0.5 CPU" in msg
    assert "2.5 CPU" in msg and "2 CPU and 0 GPU on 2 node(s)" in msg and "no node can take a replica of embed-e" in msg
    assert "num_cpus: 0.5" in msg
    # the fix the message suggests fits
    assert check_fits(_cfg(replicas=2, num_cpus=0.5), _nodes((1, 0), (1, 0)), {"CPU": 2}) is None


def test_a_replica_must_fit_on_one_node_not_only_in_the_sum():
    # 1.5 CPU per replica: the cluster has 2 CPU in all, but no node has 1.5
    msg = check_fits(_cfg(num_cpus=1.5), _nodes((1, 0), (1, 0)))
    assert msg and "no node can take a replica of chat-m" in msg


def test_gpus_are_counted_and_a_cpu_only_cluster_is_told_how_to_ask_for_none():
    msg = check_fits(_cfg(num_gpus=1), _nodes((8, 0)))
    assert msg and "+ 1 GPU" in msg and "num_gpus: 0 for a CPU-only cluster" in msg
    assert check_fits(_cfg(num_gpus=0.5, replicas=2), _nodes((8, 1))) is None  # two halves share a GPU
    assert check_fits(_cfg(num_gpus=0.6, replicas=2), _nodes((8, 1))) is not None


def test_what_other_work_holds_is_counted_and_dead_nodes_are_not():
    assert "1 CPU and 0 GPU are free now" in check_fits(_cfg(), _nodes((4, 0)), {"CPU": 1})
    nodes = _nodes((4, 0)) + [{"Alive": False, "Resources": {"CPU": 64}}]
    assert "on 1 node(s)" in check_fits(_cfg(num_cpus=8), nodes)


def test_autoscaling_starts_with_min_replicas_and_notes_a_maximum_that_does_not_fit():
    cfg = _cfg(autoscaling={"min_replicas": 1, "max_replicas": 4})
    nodes = _nodes((2, 0))
    assert check_fits(cfg, nodes) is None
    assert "chat-m" in headroom(cfg, nodes)
    assert headroom(_cfg(replicas=2), _nodes((4, 0))) is None
    assert describe(_cfg(replicas=2), _nodes((1, 0), (2, 0))).splitlines()[0] == "chat-m: 2 x 1 CPU -> node(s) 0, 1"


@pytest.mark.slow
@pytest.mark.skipif(default_gguf() is None, reason="the bundled default model is not installed")
@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="this machine has a GPU to give")
def test_hearth_serve_asking_a_cpu_only_machine_for_a_gpu_exits_with_the_reason(tmp_path):
    cfg = tmp_path / "models.yaml"
    cfg.write_text("models:\n  - {name: smollm2-135m-instruct, num_gpus: 1}\nembeddings: []\n")
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "hearth.clients.cli", "serve", "--config", str(cfg), "--port", "0"],
                       capture_output=True, text=True, timeout=180)
    assert p.returncode == 2, p.stdout + p.stderr
    assert "hearth: error: the Ray cluster cannot hold these deployments" in p.stderr
    assert "num_gpus: 0 for a CPU-only cluster" in p.stderr and "Traceback" not in p.stderr
    assert time.monotonic() - t0 < 120


def test_hearth_plan_cluster_prints_the_placement_and_exits_1_when_it_does_not_fit(tmp_path, monkeypatch, capsys):
    import ray

    from hearth.clients.cli import main

    nodes = _nodes((1, 0), (1, 0))
    calls = []
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    monkeypatch.setattr(ray, "nodes", lambda: nodes)
    monkeypatch.setattr(ray, "available_resources", lambda: {"CPU": 2.0})
    monkeypatch.setattr(ray, "shutdown", lambda: calls.append("shutdown"))
    cfg = tmp_path / "models.yaml"
    cfg.write_text("models:\n  - {name: m, replicas: 2}\nembeddings:\n  - {name: e}\n")
    assert main(["plan", "--cluster", "auto", "--config", str(cfg)]) == 1
    out = capsys.readouterr().out
    assert "chat-m: 2 x 1 CPU -> node(s) 0, 1" in out and "does not fit: embed-e" in out
    assert calls[0]["address"] == "auto" and calls[-1] == "shutdown"
    cfg.write_text("models:\n  - {name: m, replicas: 2, num_cpus: 0.5}\nembeddings:\n  - {name: e}\n")
    assert main(["plan", "--cluster", "auto", "--config", str(cfg)]) == 0
