"""The `hearth` command line.

    hearth models prepare | list
    hearth generate --prompt "Hello" [--model PATH] [--backend llamacpp|transformers]
    hearth chat [--model PATH]
    hearth edge [MODEL.gguf] [--new]          # offline terminal chat, history kept (no torch, no server)
    hearth plan MODEL --device rtx3090 --context 4096 --concurrency 8 --quant int4
    hearth bench engine --json out.json
    hearth train sft --config training/recipes/sft_lora.yaml [--resume]
    hearth eval mc --model CKPT --data tests.jsonl
    hearth data self-instruct --seeds seeds.jsonl --teacher URL --model M --n N
    hearth rag ingest docs/ --index notes && hearth rag query "question" --index notes
    hearth agent run "What is 17*23?" --strategy react --tools calculator --url http://127.0.0.1:8000/v1
    hearth demo [--url http://127.0.0.1:8000/v1] [--api-key K] [--port 7860]   # Gradio chat UI
    hearth --version
    hearth --verbose COMMAND ...   # the libraries' warnings and INFO logs too (hidden by default)

Each command group lives in its own module with `add_parser(subparsers)`; this file only dispatches.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# command name -> module (relative to hearth.clients) that defines add_parser(subparsers)
COMMANDS = {
    "models": "cmd_models",
    "generate": "cmd_generate",
    "chat": "cmd_generate",
    "edge": "cmd_edge",
    "plan": "cmd_plan",
    "bench": "cmd_bench",
    "serve": "cmd_serve",
    "train": "cmd_train",
    "eval": "cmd_eval",
    "data": "cmd_data",
    "rag": "cmd_rag",
    "agent": "cmd_agent",
    "demo": "cmd_demo",
}
# commands that set up their own logging and environment (a server's log, a training run's)
OWN_OUTPUT = ("train", "serve")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser of every command, or of `only` (one command is enough to run it, and keeps start-up lean)."""
    parser = argparse.ArgumentParser(prog="hearth", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"hearth {version()}")
    parser.add_argument("--verbose", action="store_true",
                        help="also print the libraries' warnings and INFO logs (hidden by default); "
                             "may stand anywhere on the line")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    modules = [COMMANDS[only]] if only in COMMANDS else list(dict.fromkeys(COMMANDS.values()))
    for module in modules:  # each module once, in order
        try:
            mod = importlib.import_module(f"hearth.clients.{module}")
        except ModuleNotFoundError as e:
            if e.name == f"hearth.clients.{module}":
                continue  # not written yet
            raise
        mod.add_parser(sub)
    return parser


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as package_version
    try:
        return package_version("hearth-llm")
    except PackageNotFoundError:  # a source tree that was never installed
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    from hearth.runtime.checkpoint import PickleRefusedError
    from hearth.runtime.errors import HearthError
    from hearth.runtime.quiet import pop_verbose, setup_output

    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    verbose = pop_verbose(argv)[1]
    if command not in OWN_OUTPUT:
        setup_output(verbose)  # offline and quiet, before any command loads torch or transformers
    parser = build_parser(command if command in COMMANDS else None)
    # `key=value` overrides may follow the options (`hearth train sft --config r.yaml max_steps=5`)
    args, extra = parser.parse_known_args(argv)
    extra = pop_verbose(extra)[0]  # --verbose after a command that has no flag of its own
    args.verbose = verbose  # wherever it stood, also for a command that reads args.verbose itself
    if extra:
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = list(args.overrides or []) + extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return int(args.func(args) or 0)
    except HearthError as e:
        if isinstance(e, PickleRefusedError):  # name this command's flag, or say it has none
            e = e.naming("--allow-pickle" if hasattr(args, "allow_pickle") else None)
        print(f"hearth: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
