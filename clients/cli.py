"""The `hearth` command line.

    hearth models prepare | list
    hearth generate --prompt "Hello" [--model PATH] [--backend llamacpp|transformers]
    hearth chat [--model PATH]
    hearth plan MODEL --device rtx3090 --context 4096 --concurrency 8 --quant int4
    hearth bench engine --json out.json
    hearth train sft --config training/recipes/sft_lora.yaml [--resume]
    hearth eval mc --model CKPT --data tests.jsonl
    hearth data self-instruct --seeds seeds.jsonl --teacher URL --model M --n N

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
    "plan": "cmd_plan",
    "bench": "cmd_bench",
    "serve": "cmd_serve",
    "train": "cmd_train",
    "eval": "cmd_eval",
    "data": "cmd_data",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hearth", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    seen: set[str] = set()
    for name, module in COMMANDS.items():
        if module in seen:
            continue
        seen.add(module)
        try:
            mod = importlib.import_module(f"hearth.clients.{module}")
        except ModuleNotFoundError as e:
            if e.name == f"hearth.clients.{module}":
                continue  # not written yet
            raise
        mod.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from hearth.runtime.errors import HearthError

    parser = build_parser()
    # `key=value` overrides may follow the options (`hearth train sft --config r.yaml max_steps=5`)
    args, extra = parser.parse_known_args(argv)
    if extra:
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = list(args.overrides or []) + extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return int(args.func(args) or 0)
    except HearthError as e:
        print(f"hearth: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
