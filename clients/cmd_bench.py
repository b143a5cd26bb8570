"""`hearth bench`: the benchmarks in the repository's bench/ folder, run from the CLI.

    hearth bench engine --json out.json [--threads 2] [--quick] [--backends llamacpp,transformers]
    hearth bench contention --json out.json [--variants hearth,libgomp-t2,t1] [--rounds 3] [--lib noomp=DIR]
    hearth bench serve --json out.json [--mode both|no-ray|ray] [--concurrency 1,4,16,32] [--max-tokens 64]
    hearth bench hangups --json out.json [--variants no-ray,ray,ray-splice,ray-python-proxy] [--streams 1,20]
    hearth bench hostile --json out.json [--layouts no-ray,ray] [--attacks special_prompt,slowloris,...]
    hearth bench quantize --json out.json --png out.png [--quick] [--only NAME ...]
    hearth bench train --json out.json [--steps 4] [--methods full,lora,qlora]
    hearth bench edge --json out.json [--runs 3]
    hearth bench agents --json out.json [--url URL --model NAME] [--limit N] [--strategies plain,cot,...]
    hearth bench structured --json out.json [--variants default,compact,server-ws,llama.cpp] [--seeds 1,2]

The benchmarks are not part of the installed package: they are loaded from `bench/<name>.py` in
the source tree beside this package (a git checkout or an editable install). Each one defines
`add_arguments(parser)` and `run(args)`, and `main(argv)` for `python bench/<name>.py`.
Every benchmark writes its results through `write_json` (folders created, the file replaced whole) and
checks its output paths with `output_problem` before it starts measuring.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
import tempfile
from pathlib import Path
from types import ModuleType

# sub-command -> (file in bench/, help)
BENCHMARKS = {
    "engine": ("engine.py", "engine vs raw llama-cpp-python / HF generate: decode, concurrency, prefix cache, "
                            "memory bandwidth"),
    "contention": ("contention.py", "single-stream llama.cpp decode on a quiet CPU and beside a busy core, per "
                                    "threading setting (OpenMP wait policy, thread count, ggml's threadpool)"),
    "reproducibility": ("reproducibility.py", "cost of batch_invariant per backend, temperature-0 and seeded "
                                              "repeat equality with the prefix cache on, scoring alone vs concurrent"),
    "serve": ("serve.py", "the OpenAI HTTP server (no-ray and Ray Serve) vs the in-process engine: tok/s, TTFT, "
                          "inter-token latency per concurrency level"),
    "hangups": ("hangups.py", "clients that leave mid-stream: how soon the server stops decoding for them, "
                              "per proxy layout"),
    "hostile": ("hostile.py", "hostile requests (huge prompts and bodies, template bombs, slowloris) while a normal "
                              "client streams: its latency, /health, RSS and errors against a quiet baseline"),
    "quantize": ("quantize.py", "quality of the default model's int8 / GPTQ / GGUF artifacts against fp32: "
                                "perplexity, KL, agreement, size"),
    "train": ("train.py", "SFT full vs LoRA vs QLoRA on the default model: training tokens/s and peak memory"),
    "edge": ("edge.py", "`hearth edge` through a pseudo-terminal: start-to-first-token and peak RSS vs the targets"),
    "agents": ("agents.py", "word-problem accuracy of plain / CoT / self-consistency / calculator tool, and "
                            "tool-selection accuracy, per language"),
    "structured": ("structured.py", "constrained JSON (response_format json_schema and forced tool calls) on "
                                    "LangChain-style schemas: valid and cut rates, tokens; hearth vs llama.cpp"),
}


def finite(obj):
    """JSON without NaN or infinity (which are not JSON): they become null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def output_problem(path: str | os.PathLike | None, flag: str = "--json") -> str | None:
    """Why a result file could not be written at `path` (None when it can): checked before a run of
    minutes starts, so a typo costs seconds. The missing folders are created now."""
    if not path:
        return None
    target = Path(path).expanduser()
    if target.is_dir():
        return f"{flag} {path} is a folder; give a file name"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        return f"{flag} {path}: cannot create its folder ({e.strerror or e})"
    if not os.access(target.parent, os.W_OK | os.X_OK):
        return f"{flag} {path}: the folder {target.parent} is not writable"
    return None


def write_json(path: str | os.PathLike, data, say=None) -> Path:
    """Write a benchmark's results: the folder is created, the file replaced whole (never half-written),
    NaN written as null. If it still cannot be written, the results go to a temp file instead (named on
    stderr) rather than being lost at the end of a long run."""
    from hearth.runtime.fileio import atomic_write_text

    text = json.dumps(finite(data), indent=2, ensure_ascii=False, default=str) + "\n"
    say = say or (lambda msg: print(msg, file=sys.stderr, flush=True))
    try:
        written = atomic_write_text(Path(path).expanduser(), text)
    except OSError as e:
        fd, rescue = tempfile.mkstemp(prefix="hearth-bench-", suffix=".json")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        say(f"could not write {path} ({e.strerror or e}); the results are in {rescue}")
        return Path(rescue)
    say(f"wrote {written}")
    return written


def bench_dir() -> Path:
    import hearth.clients

    return Path(hearth.clients.__file__).resolve().parents[1] / "bench"


def load_benchmark(file_name: str) -> ModuleType:
    """Import bench/<file_name> from the source tree; FileNotFoundError names where it was looked for."""
    path = bench_dir() / file_name
    if not path.is_file():
        raise FileNotFoundError(
            f"benchmark {path} not found: `hearth bench` runs the bench/ folder of a source checkout "
            f"(git clone + `pip install -e .`); this installation has none")
    name = f"hearth_bench_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the file executes
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    bench = subparsers.add_parser("bench", help="run a benchmark from the repository's bench/ folder",
                                  description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = bench.add_subparsers(dest="bench_command", metavar="BENCHMARK")
    sub.required = True
    for command, (file_name, help_text) in BENCHMARKS.items():
        try:
            module = load_benchmark(file_name)
        except Exception as e:  # the other commands must keep working; say why when this one is asked for
            # '+' as the only prefix character makes every word, `--quick` too, a plain argument
            p = sub.add_parser(command, help=help_text, add_help=False, prefix_chars="+")
            p.add_argument("ignored", nargs="*")
            p.set_defaults(func=_unavailable(command, e))
            continue
        p = sub.add_parser(command, help=help_text, description=module.__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
        p.set_defaults(func=module.run)


def _unavailable(command: str, error: Exception):
    def run(args: argparse.Namespace) -> int:
        print(f"hearth: error: cannot run `hearth bench {command}`: {type(error).__name__}: {error}",
              file=sys.stderr)
        return 2
    return run
