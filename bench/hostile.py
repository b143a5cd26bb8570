"""Hostile input against `hearth serve`: does a normal client still get its tokens on time?

    hearth bench hostile --json bench/hostile.json                 # no-ray and ray, ~6 min on 2 cores
    hearth bench hostile --layouts no-ray --attacks special_prompt,slowloris

Each layout is a fresh `hearth serve` in a subprocess (bundled default model on llama.cpp, 2 threads,
the MiniLM embedder for RAG, and a second model `bomb`: the same weights with a chat template that
tries to build gigabytes). Two models make Ray run its several-model layout (a separate ingress).
While a normal client streams chat completions (64 tokens each, one after another) and a poller
reads /health every 50 ms, the bench sends:

    special_prompt   /v1/completions with a 1.5 MB prompt of control tokens ("<|im_start|>a" * 115,000)
    many_messages    a chat of 20,000 one-character messages
    huge_body        a 40 MB JSON body
    rag_10mb         a 10 MB RAG document (over the request body cap)
    rag_2mb          a 2 MB RAG document (under the body cap, over the per-document cap)
    template_bomb    a chat to the `bomb` model
    slowloris        60 connections that send their request headers one byte a second

first one after another, then all at once, after a quiet phase with the normal client alone.
Reported: the normal client's TTFT and ITL p99, /health p99, per phase against the quiet one;
each attack's status and time to answer; how long slowloris connections stayed open; the server's
peak RSS (all its processes); every 5xx or transport error seen; replica processes restarted.
Targets (issue 15): no 5xx, no replica restart, /health p99 < 1 s, normal ITL p99 <= 3x quiet.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import statistics
import sys
import tempfile
import threading
import time
from functools import cache
from pathlib import Path

LAYOUTS = ("no-ray", "ray")
ATTACKS = ("special_prompt", "many_messages", "huge_body", "rag_10mb", "rag_2mb", "template_bomb", "slowloris")
MODEL = "smollm2-135m-instruct"
BOMB_TEMPLATE = "{% set x = 'a' * 999999 %}{% for i in range(2000) %}{{ x }}{% endfor %}"
_LEAK = re.compile(r"Traceback|File \"|/usr/|/home/|/root/|site-packages|\bpid\b|\b\d{1,3}(\.\d{1,3}){3}\b")
_T0 = time.perf_counter()


def _say(msg: str) -> None:
    print(f"[bench hostile {time.perf_counter() - _T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


@cache
def _serve_bench():
    from hearth.clients.cmd_bench import load_benchmark

    return load_benchmark("serve.py")


def models_yaml(s) -> str:
    """The serve bench's config plus the embedder and the template-bomb model."""
    base = s.models_yaml().replace("embeddings: []\n", "")
    bomb = (f"  - name: bomb\n"
            f"    path: {MODEL}\n"
            f"    backend: llamacpp\n"
            f"    context_length: 1024\n"
            f"    max_num_seqs: 4\n"
            f"    backend_options: {{n_threads: 1}}\n"
            f"    chat_template: {json.dumps(BOMB_TEMPLATE)}\n")
    head, rest = base.split("host:", 1)
    return head + bomb + "host:" + rest


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


# ----------------------------------------------------------------------------- background load
class Watch:
    """The normal client, the /health poller and the RSS sampler, running until stop()."""

    def __init__(self, srv, headers: dict):
        self.srv, self.headers = srv, headers
        self.ttft: list[float] = []
        self.itl: list[float] = []
        self.health: list[float] = []
        self.errors: list[str] = []
        self.peak_rss = 0
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=f, daemon=True) for f in (self._client, self._poll, self._rss)]

    def __enter__(self) -> "Watch":
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=180)

    def _client(self) -> None:
        import httpx

        i = 0
        with httpx.Client(base_url=self.srv.url, headers=self.headers, timeout=120) as c:
            while not self._stop.is_set():
                i += 1
                body = {"model": MODEL, "messages": [{"role": "user", "content": f"Tell story number {i}."}],
                        "max_tokens": 64, "ignore_eos": True, "temperature": 0, "stream": True}
                t0 = time.perf_counter()
                last = None
                try:
                    with c.stream("POST", "/v1/chat/completions", json=body) as r:
                        if r.status_code != 200:
                            self.errors.append(f"normal client: HTTP {r.status_code}")
                            continue
                        for line in r.iter_lines():
                            if '"content":"' in line and '"content":""' not in line:
                                now = time.perf_counter()
                                if last is None:
                                    self.ttft.append(now - t0)
                                else:
                                    self.itl.append(now - last)
                                last = now
                            elif line.startswith("data: ") and '"error"' in line:
                                self.errors.append(f"normal client: stream error {line[:200]}")
                except httpx.HTTPError as e:
                    self.errors.append(f"normal client: {type(e).__name__}: {e}")

    def _poll(self) -> None:
        import httpx

        with httpx.Client(base_url=self.srv.url, timeout=30) as c:
            while not self._stop.is_set():
                t0 = time.perf_counter()
                try:
                    r = c.get("/health")
                    if r.status_code >= 500:
                        self.errors.append(f"/health: HTTP {r.status_code}")
                except httpx.HTTPError as e:
                    self.errors.append(f"/health: {type(e).__name__}")
                self.health.append(time.perf_counter() - t0)
                self._stop.wait(0.05)

    def _rss(self) -> None:
        import psutil

        while not self._stop.is_set():
            try:
                root = psutil.Process(self.srv.proc.pid)
                total = 0
                for p in [root] + root.children(recursive=True):
                    try:
                        total += p.memory_info().rss
                    except psutil.Error:
                        pass
                self.peak_rss = max(self.peak_rss, total)
            except psutil.Error:
                pass
            self._stop.wait(0.2)

    def summary(self) -> dict:
        return {"normal_requests": len(self.ttft), "ttft_p50_s": pct(self.ttft, 50), "ttft_p99_s": pct(self.ttft, 99),
                "itl_p50_s": pct(self.itl, 50), "itl_p99_s": pct(self.itl, 99),
                "health_p50_s": pct(self.health, 50), "health_p99_s": pct(self.health, 99),
                "health_polls": len(self.health), "peak_rss_mb": self.peak_rss / 2**20, "errors": list(self.errors)}


# ----------------------------------------------------------------------------- attacks
def _post(srv, headers: dict, path: str, *, json_body=None, content: bytes | None = None) -> dict:
    import httpx

    t0 = time.perf_counter()
    try:
        with httpx.Client(base_url=srv.url, headers=headers, timeout=300) as c:
            if content is not None:
                r = c.post(path, content=content, headers={"Content-Type": "application/json"})
            else:
                r = c.post(path, json=json_body)
        out = {"status": r.status_code, "seconds": time.perf_counter() - t0}
        try:
            err = r.json().get("error") or {}
            out["code"], out["message"] = err.get("code"), (err.get("message") or "")[:300]
        except ValueError:
            out["message"] = r.text[:300]
        out["leak"] = bool(_LEAK.search(r.text))
        return out
    except httpx.HTTPError as e:
        return {"status": None, "seconds": time.perf_counter() - t0, "transport_error": f"{type(e).__name__}: {e}"}


def special_prompt(srv, headers):
    return _post(srv, headers, "/v1/completions",
                 json_body={"model": MODEL, "prompt": "<|im_start|>a" * 115_000, "max_tokens": 4})


def many_messages(srv, headers):
    msgs = [{"role": "user" if i % 2 == 0 else "assistant", "content": "a"} for i in range(20_000)]
    return _post(srv, headers, "/v1/chat/completions", json_body={"model": MODEL, "messages": msgs, "max_tokens": 4})


def huge_body(srv, headers):
    filler = "x" * (40 * 2**20)
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": filler}], "max_tokens": 4})
    return _post(srv, headers, "/v1/chat/completions", content=body.encode())


def _rag(srv, headers, size: int, index: str):
    text = ("The quick brown fox jumps over the lazy dog. " * (size // 45 + 1))[:size]
    return _post(srv, headers, f"/v1/rag/indexes/{index}/documents",
                 json_body={"documents": [{"source": "big.txt", "text": text}]})


def rag_10mb(srv, headers):
    return _rag(srv, headers, 10 * 2**20, "hostile-a")


def rag_2mb(srv, headers):
    return _rag(srv, headers, 2 * 2**20, "hostile-b")


def template_bomb(srv, headers):
    return _post(srv, headers, "/v1/chat/completions",
                 json_body={"model": "bomb", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})


def slowloris(srv, headers, n: int = 60, limit_s: float = 90.0):
    """n connections each send a request line, then one header byte a second; seconds until the
    server closed each (limit_s: still open when the bench gave up)."""
    port = int(srv.url.rsplit(":", 1)[1])
    socks = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.setblocking(False)
        s.send(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        socks.append(s)
    t0 = time.perf_counter()
    closed: dict[int, float] = {}
    header = b"X-Slow: " + b"a" * 4096
    i = 0
    while len(closed) < n and time.perf_counter() - t0 < limit_s:
        for k, s in enumerate(socks):
            if k in closed:
                continue
            try:
                data = s.recv(4096)
                if data == b"" or data.startswith(b"HTTP/"):  # closed, or answered (408/400) then closed
                    closed[k] = time.perf_counter() - t0
                    continue
            except BlockingIOError:
                pass
            except OSError:
                closed[k] = time.perf_counter() - t0
                continue
            try:
                s.send(header[i % len(header):i % len(header) + 1])
            except OSError:
                closed[k] = time.perf_counter() - t0
        i += 1
        time.sleep(1.0)
    for s in socks:
        s.close()
    times = sorted(closed.values())
    return {"connections": n, "closed_by_server": len(closed), "still_open_at_s": None if len(closed) == n else limit_s,
            "close_p50_s": pct(times, 50), "close_max_s": times[-1] if times else None}


def _replicas(srv) -> set[int]:
    import psutil

    try:
        root = psutil.Process(srv.proc.pid)
        return {p.pid for p in root.children(recursive=True) if "ServeReplica" in " ".join(p.cmdline())}
    except psutil.Error:
        return set()


# ----------------------------------------------------------------------------- one layout
def run_layout(layout: str, attacks: list[str], quiet_s: float, workdir: Path) -> dict:
    sb = _serve_bench()
    s = sb.Settings(levels=(1,))
    config = models_yaml(s)
    s.models_yaml = lambda: config  # this run's config, read by ServerProcess.start
    srv = sb.ServerProcess(layout, s, workdir)
    srv.log_path = workdir / f"server-{layout}.log"
    headers = {"Authorization": f"Bearer {srv.key}"}
    res: dict = {"layout": layout, "phases": {}, "attacks": {}}
    fns = {name: globals()[name] for name in attacks}
    try:
        _say(f"{layout}: starting `hearth serve` on {srv.url}")
        res["startup_s"] = srv.start()
        replicas0 = _replicas(srv)
        _say(f"{layout}: quiet phase ({quiet_s:.0f} s)")
        with Watch(srv, headers) as w:
            time.sleep(quiet_s)
        res["phases"]["quiet"] = w.summary()
        with Watch(srv, headers) as w:
            for name, fn in fns.items():
                out = fn(srv, headers)
                res["attacks"][name] = out
                _say(f"{layout}: {name}: {out}")
        res["phases"]["one_by_one"] = w.summary()
        _say(f"{layout}: all attacks at once")
        with Watch(srv, headers) as w:
            together: dict = {}
            threads = [threading.Thread(target=lambda n=n, f=f: together.__setitem__(n, f(srv, headers)))
                       for n, f in fns.items()]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        res["phases"]["all_at_once"] = w.summary()
        res["attacks_together"] = together
        res["replicas_restarted"] = len(_replicas(srv) - replicas0) if replicas0 else 0
        res["server_alive"] = srv.proc.poll() is None
    finally:
        res["stop"] = srv.stop()
    return res


def verdict(r: dict) -> dict:
    quiet = r["phases"]["quiet"]
    out = {}
    five = [a for a in list(r["attacks"].values()) + list(r.get("attacks_together", {}).values())
            if (a.get("status") or 0) >= 500 or a.get("transport_error")]
    errors = [e for p in r["phases"].values() for e in p["errors"]]
    out["no_5xx"] = not five and not any("HTTP 5" in e for e in errors)
    out["no_leak"] = not any(a.get("leak") for a in list(r["attacks"].values()) +
                             list(r.get("attacks_together", {}).values()))
    out["no_replica_restart"] = r.get("replicas_restarted", 0) == 0 and r.get("server_alive", False)
    for name in ("one_by_one", "all_at_once"):
        p = r["phases"][name]
        out[f"{name}: health p99 < 1 s"] = (p["health_p99_s"] or 99) < 1.0
        out[f"{name}: ITL p99 <= 3x quiet"] = (p["itl_p99_s"] or 99) <= 3 * (quiet["itl_p99_s"] or 0)
    return out


def format_report(results: dict) -> str:
    lines = []
    for r in results["layouts"]:
        if "error" in r:
            lines.append(f"{r['layout']}: failed: {r['error']}")
            continue
        q = r["phases"]["quiet"]
        lines += [f"### {r['layout']}", "",
                  "| phase | normal requests | TTFT p99 (s) | ITL p99 (ms) | ITL p99 vs quiet | /health p99 (ms) | "
                  "peak RSS (MB) | errors |", "|---|---|---|---|---|---|---|---|"]
        for name, p in r["phases"].items():
            ratio = (p["itl_p99_s"] / q["itl_p99_s"]) if p["itl_p99_s"] and q["itl_p99_s"] else None
            lines.append(f"| {name} | {p['normal_requests']} | {_f(p['ttft_p99_s'], 3)} | "
                         f"{_f(p['itl_p99_s'] and p['itl_p99_s'] * 1000, 1)} | {_f(ratio, 2)}x | "
                         f"{_f(p['health_p99_s'] and p['health_p99_s'] * 1000, 1)} | {p['peak_rss_mb']:.0f} | "
                         f"{len(p['errors'])} |")
        lines += ["", "| attack | alone: status, s | together: status, s |", "|---|---|---|"]
        for name, a in r["attacks"].items():
            b = r.get("attacks_together", {}).get(name, {})
            lines.append(f"| {name} | {_attack(a)} | {_attack(b)} |")
        lines += ["", "targets: " + ", ".join(f"{k}: {'yes' if v else 'NO'}" for k, v in verdict(r).items()), ""]
    return "\n".join(lines)


def _f(x, nd: int) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


def _attack(a: dict) -> str:
    if not a:
        return "-"
    if "connections" in a:
        return (f"{a['closed_by_server']}/{a['connections']} closed by the server, median {_f(a['close_p50_s'], 1)} s, "
                f"last {_f(a['close_max_s'], 1)} s")
    if a.get("transport_error"):
        return f"transport error {a['transport_error'][:60]} after {a['seconds']:.1f} s"
    return f"{a['status']} {a.get('code') or ''}, {a['seconds']:.2f} s"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--layouts", default=",".join(LAYOUTS), help=f"comma-separated, from {', '.join(LAYOUTS)}")
    p.add_argument("--attacks", default=",".join(ATTACKS), help=f"comma-separated, from {', '.join(ATTACKS)}")
    p.add_argument("--quiet-s", type=float, default=20.0, help="seconds of the quiet baseline (default 20)")
    p.add_argument("--json", metavar="PATH", default=None, help="write every number to this JSON file")


def run(args: argparse.Namespace) -> int:
    layouts = [x.strip() for x in args.layouts.split(",") if x.strip()]
    attacks = [x.strip() for x in args.attacks.split(",") if x.strip()]
    bad = [x for x in layouts if x not in LAYOUTS] + [x for x in attacks if x not in ATTACKS]
    if bad or not layouts or not attacks or args.quiet_s <= 0:
        print(f"bench hostile: --layouts takes {', '.join(LAYOUTS)}; --attacks takes {', '.join(ATTACKS)}; "
              f"--quiet-s > 0 (unknown: {', '.join(bad) or '-'})", file=sys.stderr)
        return 2
    from hearth.clients.cmd_bench import output_problem, write_json

    problem = output_problem(args.json)
    if problem:  # before minutes of measuring, not after
        print(f"bench hostile: {problem}", file=sys.stderr)
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    results: dict = {"settings": {"layouts": layouts, "attacks": attacks, "quiet_s": args.quiet_s},
                     "meta": {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "argv": list(sys.argv),
                              "loadavg_start": list(os.getloadavg())}, "layouts": []}
    with tempfile.TemporaryDirectory(prefix="hearth-bench-hostile-") as tmp:
        for layout in layouts:
            try:
                results["layouts"].append(run_layout(layout, attacks, args.quiet_s, Path(tmp)))
            except Exception as e:  # the other layouts still run
                _say(f"FAILED {layout}: {type(e).__name__}: {e}")
                results["layouts"].append({"layout": layout, "error": f"{type(e).__name__}: {e}"})
    for r in results["layouts"]:
        if "error" not in r:
            r["targets"] = verdict(r)
    print(format_report(results))
    if args.json:
        write_json(args.json, results, _say)
    failed = any("error" in r or not all(r["targets"].values()) for r in results["layouts"])
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="hearth bench hostile", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
