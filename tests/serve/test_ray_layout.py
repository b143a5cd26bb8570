"""Which Ray layout a models.yaml gets, and what `hearth serve` sets up for the Ray it starts (no Ray
is started here; tests/serve/test_serve_cli.py runs both layouts for real)."""

from __future__ import annotations

import os

import pytest

from hearth.serve import ray_app
from hearth.serve.config import ServeConfig


def test_one_model_with_one_replica_is_served_from_its_replica(monkeypatch):
    monkeypatch.delenv("HEARTH_RAY_SEPARATE_INGRESS", raising=False)
    assert ray_app.fused(ServeConfig())  # the default: what `make run` serves
    assert ray_app.fused(ServeConfig(embeddings=[]))
    two = ServeConfig(models=[{"name": "a"}, {"name": "b", "path": "a"}])
    assert not ray_app.fused(two)
    assert not ray_app.fused(ServeConfig(models=[{"name": "a", "replicas": 2}]))
    assert not ray_app.fused(ServeConfig(models=[{"name": "a", "autoscaling": {"max_replicas": 3}}]))
    assert not ray_app.fused(ServeConfig(models=[], embeddings=[{"name": "e"}]))
    monkeypatch.setenv("HEARTH_RAY_SEPARATE_INGRESS", "1")
    assert not ray_app.fused(ServeConfig())


@pytest.mark.skipif(ray_app._haproxy_binary() is None, reason="ray[serve] ships no HAProxy on this platform")
def test_local_ray_env_gives_each_server_its_own_haproxy_files_and_ports(monkeypatch):
    for k in list(os.environ):
        if k.startswith("RAY_SERVE_") or k in ("RAY_enable_metrics_collection", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"):
            monkeypatch.delenv(k)
    a, b = ray_app._local_ray_env(), ray_app._local_ray_env()
    assert a["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    assert a["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0"  # Ray's node address is 127.0.0.1
    assert a["RAY_SERVE_CONTROL_LOOP_INTERVAL_S"] == "0.5"
    # two servers on one machine must not share HAProxy's config, socket or its two extra ports
    for key in ("RAY_SERVE_HAPROXY_CONFIG_FILE_LOC", "RAY_SERVE_HAPROXY_SOCKET_PATH",
                "RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT"):
        assert a[key] != b[key], key
    assert "/tmp/haproxy-serve" not in "".join(a.values())
    for env in (a, b):
        d = os.path.dirname(env["RAY_SERVE_HAPROXY_SOCKET_PATH"])
        assert os.path.isdir(d)
        monkeypatch.setattr(ray_app, "_haproxy_dir", d)
        ray_app._reap_haproxy()
        assert not os.path.exists(d) and ray_app._haproxy_dir is None


def test_a_setting_in_the_environment_wins(monkeypatch):
    monkeypatch.setenv("RAY_SERVE_CONTROL_LOOP_INTERVAL_S", "0.2")
    monkeypatch.setenv("RAY_SERVE_ENABLE_HA_PROXY", "0")
    env = ray_app._local_ray_env()
    assert "RAY_SERVE_CONTROL_LOOP_INTERVAL_S" not in env and "RAY_SERVE_ENABLE_HA_PROXY" not in env
    assert not any(k.startswith("RAY_SERVE_HAPROXY_") for k in env)  # Ray's Python proxy: no HAProxy files
    assert env["RAY_SERVE_METRICS_EXPORT_INTERVAL_MS"] == "1000"


@pytest.mark.skipif(ray_app._haproxy_binary() is None, reason="ray[serve] ships no HAProxy on this platform")
def test_haproxy_answers_in_openai_envelope(tmp_path):
    """HAProxy as `hearth serve` starts it: Ray's plain-text answers of its own (no app deployed yet,
    no replica up) come back as OpenAI-shaped 503s with Retry-After."""
    import subprocess
    import time

    import httpx
    from ray.serve._private.haproxy_templates import HAPROXY_CONFIG_TEMPLATE

    # the two lines of Ray's template the wrapper rewrites are still there
    assert 'http-request return status 404 content-type text/plain lf-string "Path' in HAPROXY_CONFIG_TEMPLATE
    assert "errorfile 503 {{ config.error_file_path }}" in HAPROXY_CONFIG_TEMPLATE

    wrapper = ray_app._haproxy_wrapper(str(tmp_path), ray_app._haproxy_binary())
    node = tmp_path / "node"  # Ray writes the config and its 500 page into a folder of its own
    node.mkdir()
    (node / "500.http").write_text("HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n")
    port, dead = ray_app._free_port(), ray_app._free_port()
    (node / "haproxy.cfg").write_text(f"""global
    maxconn 64
defaults
    mode http
    timeout connect 1s
    timeout client 10s
    timeout server 10s
    errorfile 503 {node}/500.http
frontend f
    bind 127.0.0.1:{port}
    use_backend replicas if {{ path_beg /v1 }}
    default_backend default_backend
backend default_backend
    http-request return status 404 content-type text/plain lf-string "Path '%[path]' not found. Ping http://.../-/routes for available routes."
backend replicas
    server r 127.0.0.1:{dead}
""")
    proc = subprocess.Popen([wrapper, "-db", "-f", str(node / "haproxy.cfg")], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    try:
        end = time.monotonic() + 10
        while True:
            try:
                before = httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)
                break
            except httpx.ConnectError:
                assert proc.poll() is None and time.monotonic() < end, proc.stdout.read().decode()
                time.sleep(0.05)
        down = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=5)
    finally:
        proc.terminate()
        proc.wait(10)
    for r in (before, down):
        assert r.status_code == 503 and r.headers["retry-after"] == "1", r.text
        assert r.json()["error"]["code"] == "service_unavailable", r.text
    assert "starting" in before.json()["error"]["message"]
    assert "-dS" in open(wrapper).read()
