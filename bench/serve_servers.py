"""The server processes `hearth bench serve` measures: `hearth serve` (no-ray or Ray) and llama.cpp's
llama-server, each started on 127.0.0.1 and a free port, scraped for CPU and metrics, and stopped.
Split out of bench/serve.py, which drives the phases."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING


if TYPE_CHECKING:
    from serve import Settings


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _proc_label(cmdline: str, is_root: bool, mode: str) -> str:
    """Which part of the server a process is, from its command line (Ray sets ray::<actor> titles)."""
    if is_root:
        return "driver" if mode == "ray" else "server"
    for key, label in (("ingress", "ingress"), ("ServeReplica", "replica"), ("ProxyActor", "proxy"),
                       ("ServeController", "controller"), ("raylet", "raylet"), ("gcs_server", "gcs"),
                       ("IDLE", "idle workers")):
        if key in cmdline:
            return label
    return "other"


class ServerProcess:
    """`hearth serve` in a subprocess (its own process group), on a free loopback port."""

    def __init__(self, mode: str, s: Settings, workdir: Path):
        self.mode, self.s, self.workdir = mode, s, workdir
        self.key = "sk-bench-" + secrets.token_hex(12)
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / f"server-{mode}.log"
        self.proc: subprocess.Popen | None = None
        self._known: dict[int, object] = {}  # pid -> psutil.Process ever seen in the tree
        self.processes: dict[str, set[str]] = {}  # label -> command lines seen

    def command(self) -> list[str]:
        cfg = self.workdir / f"models-{self.mode}.yaml"
        cfg.write_text(self.s.models_yaml())
        cmd = [sys.executable, "-m", "hearth.clients.cli", "serve", "--config", str(cfg), "--host", "127.0.0.1",
               "--port", str(self.port), "--api-key", self.key]
        if self.mode == "no-ray":
            cmd.append("--no-ray")
        return cmd

    def environment(self) -> dict[str, str]:
        return {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}

    def start(self) -> float:
        """Start and wait for GET /health == 200; returns the seconds that took."""
        import httpx

        cmd = self.command()
        env = self.environment()
        t = time.perf_counter()
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                         env=env, cwd=self.workdir)
        end = time.monotonic() + self.s.startup_timeout_s[self.mode]
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the {self.mode} server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    self.tree_cpu()  # remember the processes started so far
                    return time.perf_counter() - t
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise RuntimeError(f"the {self.mode} server was not healthy within "
                           f"{self.s.startup_timeout_s[self.mode]:.0f} s:\n{self.log_tail()}")

    def log_tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def tree_cpu(self) -> dict[str, float]:
        """CPU seconds (user + system) of every process of the server, summed per label."""
        import psutil

        try:
            root = psutil.Process(self.proc.pid)
            procs = [root] + root.children(recursive=True)
        except psutil.Error:
            return {}
        out: dict[str, float] = {}
        for p in procs:
            try:
                with p.oneshot():
                    t = p.cpu_times()
                    cmd = " ".join(p.cmdline()) or p.name()
            except psutil.Error:
                continue
            self._known.setdefault(p.pid, p)
            label = _proc_label(cmd, p.pid == self.proc.pid, self.mode)
            self.processes.setdefault(label, set()).add(cmd[:100])
            out[label] = out.get(label, 0.0) + t.user + t.system
        return out

    def scrape(self) -> dict[str, float]:
        """The server's own TTFT/ITL histogram sums and counts (GET /metrics)."""
        import httpx

        want = ("hearth_time_to_first_token_seconds_sum", "hearth_time_to_first_token_seconds_count",
                "hearth_inter_token_latency_seconds_sum", "hearth_inter_token_latency_seconds_count")
        try:
            text = httpx.get(self.url + "/metrics", headers={"Authorization": f"Bearer {self.key}"},
                             timeout=10).text
        except httpx.HTTPError:
            return {}
        out = {}
        for line in text.splitlines():
            name = line.split("{", 1)[0].split(" ", 1)[0]
            if name in want:
                out[name] = out.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
        return out

    def stop(self) -> dict:
        """SIGTERM and wait; the process group (and any process of its tree left) gets SIGKILL after
        stop_timeout_s."""
        import psutil

        if self.proc is None:
            return {"rc": None}
        self.tree_cpu()
        t = time.perf_counter()
        killed = False
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout=self.s.stop_timeout_s)
        except subprocess.TimeoutExpired:
            killed = True
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            rc = self.proc.wait()
        left = []
        for pid, p in self._known.items():  # only processes this server started
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    left.append(pid)
                    p.kill()
            except psutil.Error:
                pass
        return {"rc": rc, "stop_s": time.perf_counter() - t, "killed": killed, "leftover_killed": left}


class LlamaServerProcess(ServerProcess):
    """llama.cpp's llama-server with the flags of Settings.llama_server_args."""

    def command(self) -> list[str]:
        return [self.s.llama_server, *self.s.llama_server_args(), "--host", "127.0.0.1", "--port", str(self.port),
                "--api-key", self.key]

    def environment(self) -> dict[str, str]:
        """How hearth's llama.cpp threads wait (libgomp's spin count), unless the user chose: the same for both."""
        from hearth.runtime.backends.llamacpp_threads import apply_openmp_defaults

        env = dict(os.environ)
        apply_openmp_defaults(env)
        return env

    def scrape(self) -> dict[str, float]:
        return {}  # its /metrics has other names (and needs --metrics): no server-side latency column
