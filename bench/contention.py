"""Single-stream decode on a quiet CPU and beside a busy core, per llama.cpp threading setting (issue 16).

    hearth bench contention --json bench/contention.json                  # ~8 min on 2 cores
    hearth bench contention --variants hearth,libgomp-t2,t1 --rounds 5
    hearth bench contention --lib noomp=DIR     # adds `noomp-t2`: a llama-cpp-python installed in DIR
                                                # (pip install --target DIR, CMAKE_ARGS=-DGGML_OPENMP=OFF)
    nice -n -20 hearth bench contention --quiet-realtime ...   # on a machine shared with other work

Each measurement runs in a fresh process, because the OpenMP runtime reads its settings
(OMP_WAIT_POLICY, GOMP_SPINCOUNT) once, when llama.cpp loads. The process loads the default model
through the engine, warms up, then alternates phases: quiet, and busy, where one `while True: pass`
process pinned to the first CPU runs beside it (the engine's threads are not pinned). A phase
generates up to --tokens tokens greedily (ignore_eos), stopping early after --phase-seconds, and
counts tok/s from the submit to the last token (the ~35-token prompt's prefill is ~2% of that).
Variants run in a rotated order each round, so a noisy neighbour hits all of them alike; medians and
the min-max spread are reported.

Per variant: quiet tok/s, busy tok/s, busy/quiet, and quiet against `libgomp-t2` (libgomp's own
spin-then-sleep barrier with 2 threads, what hearth did before issue 16). The issue's target: busy
>= 0.4x quiet while quiet loses <= 5%.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from hearth.clients.cmd_bench import output_problem, write_json

_LIBGOMP_SPIN = "300000"  # libgomp's spin count when OMP_WAIT_POLICY is not set (GCC's env.c)


@dataclass(frozen=True)
class Variant:
    threads: int | None
    """n_threads for the backend; None: hearth's default."""
    env: dict = field(default_factory=dict)
    lib: str | None = None
    """Name of a --lib NAME=DIR: run with that llama-cpp-python instead of the installed one."""
    about: str = ""


# name -> variant; setting GOMP_SPINCOUNT (or OMP_WAIT_POLICY) pins libgomp's behaviour whatever hearth's default
VARIANTS = {
    "hearth": Variant(None, {}, None, "hearth's defaults (threads and OpenMP wait policy)"),
    "libgomp-t2": Variant(2, {"GOMP_SPINCOUNT": _LIBGOMP_SPIN}, None,
                          "2 threads, libgomp's default barrier (spin ~3e5 rounds, then sleep): before issue 16"),
    "passive-t2": Variant(2, {"OMP_WAIT_POLICY": "PASSIVE"}, None, "2 threads, OMP_WAIT_POLICY=PASSIVE"),
    "spin10k-t2": Variant(2, {"GOMP_SPINCOUNT": "10000"}, None, "2 threads, GOMP_SPINCOUNT=10000"),
    "spin3k-t2": Variant(2, {"GOMP_SPINCOUNT": "3000"}, None, "2 threads, GOMP_SPINCOUNT=3000"),
    "spin1k-t2": Variant(2, {"GOMP_SPINCOUNT": "1000"}, None, "2 threads, GOMP_SPINCOUNT=1000"),
    "spin300-t2": Variant(2, {"GOMP_SPINCOUNT": "300"}, None, "2 threads, GOMP_SPINCOUNT=300"),
    "spin100-t2": Variant(2, {"GOMP_SPINCOUNT": "100"}, None, "2 threads, GOMP_SPINCOUNT=100"),
    "t1": Variant(1, {"GOMP_SPINCOUNT": _LIBGOMP_SPIN}, None, "1 thread (no barrier)"),
    "noomp-t2": Variant(2, {}, "noomp", "2 threads, ggml's own threadpool (a build with GGML_OPENMP=OFF)"),
}
DEFAULT_VARIANTS = ("hearth", "libgomp-t2", "passive-t2", "spin10k-t2", "spin300-t2", "t1")
BASELINE = "libgomp-t2"
TARGET_RATIO, TARGET_QUIET_LOSS = 0.4, 0.05


def _say(msg: str) -> None:
    print(f"[contention {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- the measuring process

def start_busy(n: int) -> list[subprocess.Popen]:
    """n busy-loop processes, each pinned to one of our CPUs (the first ones)."""
    cpus = sorted(os.sched_getaffinity(0))
    procs = []
    for cpu in cpus[:n]:
        # an ordinary process (even under `chrt`) that spins until stopped, or until this process is
        # gone (a killed worker leaves no busy loop behind)
        code = (f"import os\nos.sched_setaffinity(0, {{{cpu}}})\n"
                "os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))\nparent = os.getppid()\n"
                "while os.getppid() == parent:\n    for _ in range(100000): pass")
        procs.append(subprocess.Popen([sys.executable, "-c", code]))
    return procs


def stop_busy(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.kill()
    for p in procs:
        p.wait()


def set_realtime(on: bool) -> None:
    """Every thread of this process (the engine's and OpenMP's too) to SCHED_FIFO 1, or back to normal."""
    policy, prio = (os.SCHED_FIFO, 1) if on else (os.SCHED_OTHER, 0)
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setscheduler(int(tid), policy, os.sched_param(prio))
        except ProcessLookupError:  # a thread that just ended
            pass


def decode_phase(engine, ids: list[int], tokens: int, max_s: float) -> dict:
    """Greedy decode of up to `tokens` tokens (fewer once max_s has passed): tok/s, submit to last token."""
    from hearth.runtime import GenerationRequest, SamplingParams

    req = GenerationRequest(prompt_token_ids=list(ids), params=SamplingParams(
        max_tokens=tokens, temperature=0.0, ignore_eos=True))
    t0 = time.perf_counter()
    times: list[float] = []
    for out in engine.stream_sync(req):  # leaving the loop early aborts the request
        now = time.perf_counter()
        times.extend([now] * len(out.token_ids))
        if len(times) >= 3 and now - t0 > max_s:
            break
    n = len(times)
    # from the submit, not the first token: a reader starved of CPU gets tokens in bursts, and the
    # gap before the first one would make the rest look fast (the short prompt's prefill is ~2% of it)
    tok_s = n / (times[-1] - t0) if n else float("nan")
    return {"tokens": n, "tok_s": tok_s, "ttft_s": times[0] - t0 if times else float("nan")}


def worker(args: argparse.Namespace) -> int:
    """One variant in this process: print a JSON line with every phase's numbers."""
    from hearth.runtime import Engine

    engine = Engine.from_model(args.model, backend="llamacpp", n_threads=args.threads or None, n_ctx=2048)
    try:
        tok = engine.tokenizer
        prompt = ("Tell a long, detailed story about a lighthouse keeper, told slowly and with many "
                  "small details about the weather and the sea. Story number {}:")
        decode_phase(engine, tok.encode(prompt.format(0)), 8, args.phase_seconds)  # warm-up
        phases = []
        for k in range(args.reps):
            for busy in (False, True):
                procs = start_busy(args.busy) if busy else []
                try:
                    if procs:
                        time.sleep(0.3)  # let the busy loops reach their CPUs
                    elif args.quiet_realtime:
                        set_realtime(True)
                    res = decode_phase(engine, tok.encode(prompt.format(len(phases) + 1)),
                                       args.tokens, args.phase_seconds)
                finally:
                    if args.quiet_realtime:
                        set_realtime(False)
                    stop_busy(procs)
                phases.append({"busy": busy, **res})
        backend = engine.backend
        info = {"n_threads": backend.n_threads, "phases": phases,
                "openmp": "OPENMP = 1" in _system_info(),
                "env": {k: os.environ.get(k) for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")},
                "llama_cpp": _llama_cpp_path()}
    finally:
        engine.shutdown()
    print(json.dumps(info), flush=True)
    return 0


def _system_info() -> str:
    import llama_cpp

    return llama_cpp.llama_print_system_info().decode(errors="replace")


def _llama_cpp_path() -> str:
    import llama_cpp

    return str(Path(llama_cpp.__file__).parent)


# ----------------------------------------------------------------------------- the driver

def run_variant(name: str, v: Variant, args: argparse.Namespace, libs: dict[str, str]) -> dict:
    env = dict(os.environ)
    for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT"):  # each variant says what it wants
        env.pop(k, None)
    env.update(v.env)
    if v.lib:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [libs[v.lib], env.get("PYTHONPATH")]))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--tokens", str(args.tokens),
           "--reps", str(args.reps), "--phase-seconds", str(args.phase_seconds), "--busy", str(args.busy)]
    if args.quiet_realtime:
        cmd.append("--quiet-realtime")
    if v.threads:
        cmd += ["--threads", str(v.threads)]
    if args.model:
        cmd += ["--model", args.model]
    timeout = 120 + args.reps * 2 * (args.phase_seconds + 5)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise RuntimeError(f"variant {name} exited with {proc.returncode}: " + " | ".join(tail))
    return json.loads(lines[-1])


def _median(xs: list[float]) -> float:
    xs = [x for x in xs if x == x]
    return float(statistics.median(xs)) if xs else float("nan")


def summarize(names: list[str], runs: dict[str, list[dict]]) -> dict:
    rows = {}
    for name in names:
        phases = [p for r in runs[name] for p in r["phases"]]
        quiet = [p["tok_s"] for p in phases if not p["busy"]]
        busy = [p["tok_s"] for p in phases if p["busy"]]
        q, b = _median(quiet), _median(busy)
        rows[name] = {"quiet_tok_s": q, "busy_tok_s": b, "busy_over_quiet": b / q if q else float("nan"),
                      "quiet_reps": quiet, "busy_reps": busy}
        if runs[name]:
            last = runs[name][-1]
            rows[name].update(n_threads=last["n_threads"], openmp=last["openmp"], env=last["env"])
    base = rows.get(BASELINE, {}).get("quiet_tok_s")
    for row in rows.values():
        row["quiet_vs_baseline"] = row["quiet_tok_s"] / base if base else None
        row["meets_target"] = (row["busy_over_quiet"] >= TARGET_RATIO and
                               (row["quiet_vs_baseline"] is None or row["quiet_vs_baseline"] >= 1 - TARGET_QUIET_LOSS))
    return rows


def format_table(rows: dict) -> str:
    head = (f"{'variant':<12} {'threads':>7} {'omp':>4} {'quiet tok/s':>16} {'busy tok/s':>16} "
            f"{'busy/quiet':>10} {'quiet vs ' + BASELINE:>18}  target")
    out = [head, "-" * len(head)]
    for name, r in rows.items():
        def spread(xs):
            xs = [x for x in xs if x == x]
            return f"{min(xs):.1f}-{max(xs):.1f}" if xs else "-"
        vs = f"{r['quiet_vs_baseline']:.2f}x" if r["quiet_vs_baseline"] else "-"
        out.append(f"{name:<12} {r.get('n_threads', '?')!s:>7} {('yes' if r.get('openmp') else 'no'):>4} "
                   f"{r['quiet_tok_s']:>5.1f} ({spread(r['quiet_reps']):>9}) "
                   f"{r['busy_tok_s']:>5.1f} ({spread(r['busy_reps']):>9}) {r['busy_over_quiet']:>9.2f}x "
                   f"{vs:>18}  {'meets' if r['meets_target'] else 'misses'}")
    out.append(f"target: busy >= {TARGET_RATIO}x quiet, quiet >= {1 - TARGET_QUIET_LOSS:.2f}x {BASELINE}")
    return "\n".join(out)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", metavar="PATH", default=None, help="write every number to this JSON file")
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                   help=f"comma-separated, from {','.join(VARIANTS)} (default {','.join(DEFAULT_VARIANTS)})")
    p.add_argument("--lib", action="append", default=[], metavar="NAME=DIR",
                   help="a llama-cpp-python installed in DIR for the variants that name NAME (noomp-t2 "
                        "needs noomp=DIR); giving noomp adds noomp-t2 to the default variants")
    p.add_argument("--rounds", type=int, default=3, help="processes per variant, interleaved (default 3)")
    p.add_argument("--reps", type=int, default=2, help="quiet+busy phase pairs per process (default 2)")
    p.add_argument("--tokens", type=int, default=64, help="most tokens per phase (default 64)")
    p.add_argument("--phase-seconds", type=float, default=6.0,
                   help="a phase stops after this many seconds even if short of --tokens (default 6)")
    p.add_argument("--busy", type=int, default=1, help="busy-loop processes in a busy phase, one per CPU (default 1)")
    p.add_argument("--quiet-realtime", action="store_true",
                   help="run the quiet phases at SCHED_FIFO priority 1, so that other processes on a shared "
                        "machine cannot preempt the engine: a stand-in for a quiet machine (needs root); the "
                        "busy phases stay ordinary")
    p.add_argument("--model", default=None, help="a GGUF file (default: the bundled default model)")
    p.add_argument("--threads", type=int, default=None, help=argparse.SUPPRESS)  # the worker's
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)


def check_args(args: argparse.Namespace) -> tuple[list[str], dict[str, str]] | str:
    """(variant names, libs) or what is wrong with the arguments."""
    libs = {}
    for spec in args.lib:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            return f"--lib takes NAME=DIR, got {spec!r}"
        if not (Path(path) / "llama_cpp").is_dir():
            return f"--lib {spec}: {path} holds no llama_cpp package"
        libs[name] = path
    names = [x.strip() for x in args.variants.split(",") if x.strip()]
    if args.variants == ",".join(DEFAULT_VARIANTS):
        names += [n for n, v in VARIANTS.items() if v.lib and v.lib in libs and n not in names]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown or not names:
        return f"--variants takes a comma-separated subset of {','.join(VARIANTS)}; got {args.variants!r}"
    missing = sorted({VARIANTS[n].lib for n in names if VARIANTS[n].lib and VARIANTS[n].lib not in libs})
    if missing:
        return f"the variants asked for need --lib {missing[0]}=DIR"
    cpus = len(os.sched_getaffinity(0))
    for flag, value, low, high in (("--rounds", args.rounds, 1, 100), ("--reps", args.reps, 1, 100),
                                   ("--tokens", args.tokens, 2, 4096), ("--busy", args.busy, 1, cpus),
                                   ("--phase-seconds", args.phase_seconds, 0.5, 600)):
        if not low <= value <= high:
            return f"{flag} must be in [{low}, {high}], got {value}"
    if args.quiet_realtime:
        try:
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
            os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
        except PermissionError:
            return "--quiet-realtime needs the right to use SCHED_FIFO (root or CAP_SYS_NICE)"
    if args.model and not Path(args.model).is_file():
        return f"--model {args.model}: no such file"
    return names, libs


def run(args: argparse.Namespace) -> int:
    if args.worker:
        return worker(args)
    checked = check_args(args)
    if isinstance(checked, str):
        print(f"bench contention: {checked}", file=sys.stderr)
        return 2
    problem = output_problem(args.json)
    if problem:
        print(f"bench contention: {problem}", file=sys.stderr)
        return 2
    names, libs = checked
    runs: dict[str, list[dict]] = {n: [] for n in names}
    errors: dict[str, str] = {}
    loads = []
    start = time.perf_counter()
    for r in range(args.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            if name in errors:
                continue
            _say(f"round {r + 1}/{args.rounds}: {name} (load {os.getloadavg()[0]:.1f})")
            loads.append(os.getloadavg()[0])
            try:
                runs[name].append(run_variant(name, VARIANTS[name], args, libs))
            except (RuntimeError, subprocess.TimeoutExpired) as e:
                errors[name] = str(e)
                _say(f"FAILED {name}: {e}")
    done = [n for n in names if runs[n]]
    rows = summarize(done, runs)
    print(format_table(rows))
    results = {"meta": {"cpus": len(os.sched_getaffinity(0)), "machine": platform.machine(),
                        "python": platform.python_version(), "rounds": args.rounds, "reps": args.reps,
                        "tokens": args.tokens, "phase_seconds": args.phase_seconds, "busy": args.busy,
                        "loadavg_at_starts": loads, "wall_s": time.perf_counter() - start,
                        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
               "variants": {n: {"about": VARIANTS[n].about, "threads": VARIANTS[n].threads, "env": VARIANTS[n].env,
                                "lib": libs.get(VARIANTS[n].lib) if VARIANTS[n].lib else None} for n in names},
               "results": rows, "runs": runs, "errors": errors}
    if args.json:
        write_json(args.json, results, _say)
    return 1 if errors else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="hearth bench contention", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
