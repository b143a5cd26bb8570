"""`hearth data`: build and curate training data.

    hearth data curate --config training/recipes/curate.yaml [key=value ...]
    hearth data self-instruct --seeds training/data/seed_tasks.jsonl --teacher http://127.0.0.1:8000 \
        --model smollm2-135m-instruct --n 100 -o self_instruct.jsonl

Self-Instruct (hearth.training.self_instruct): new Alpaca tasks from seed tasks through any
OpenAI-compatible teacher, kept only if diverse (ROUGE-L < 0.7 against every existing instruction).
Running it again with the same -o resumes: the tasks already there count toward --n.

Curation (hearth.training.curate): exact and near-duplicate (MinHash LSH) removal, language and length
filters, and perplexity filtering with a reference model, over chat, preference and text files; the kept
records in their own format plus report.md/.json/.png of what was dropped and why. `curate --help` lists
every recipe field.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import textwrap


class _DataParser(argparse.ArgumentParser):
    """An action whose options come from a recipe (`config_module` set) lists the recipe's fields in --help."""

    config_module = ""

    def format_help(self) -> str:
        text = super().format_help().rstrip()
        if not self.config_module:
            return text + "\n"
        from hearth.training.common import field_docs

        module = importlib.import_module(self.config_module)
        lines = [text, "", f"recipe fields ({module.__name__}.Config; any of them also as key=value):"]
        for name, default, doc in field_docs(module.Config):
            lines.append(f"  {name} = {default}")
            if doc:
                lines += textwrap.wrap(doc, width=96, initial_indent="      ", subsequent_indent="      ")
        return "\n".join(lines) + "\n"


def add_parser(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="build and curate training data (self-instruct, curate)", description=__doc__,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = data.add_subparsers(dest="data_command", metavar="ACTION", parser_class=_DataParser)
    actions.required = True

    cu = actions.add_parser("curate", help="deduplicate and filter data files, with a report of what was dropped",
                            description="hearth data curate [--config RECIPE.yaml] [key=value ...]: the kept records "
                                        "and report.md/.json/.png go to output_dir")
    cu.config_module = "hearth.training.curate"
    cu.add_argument("--config", default=None, metavar="RECIPE.yaml",
                    help="the recipe (e.g. training/recipes/curate.yaml); without it key=value gives every field")
    cu.add_argument("--verbose", action="store_true", help="also show the libraries' notices and warnings")
    cu.add_argument("overrides", nargs="*", metavar="key=value", help="override recipe fields (values read as YAML)")
    cu.set_defaults(func=run_curate)

    si = actions.add_parser("self-instruct", help="generate instruction data from seed tasks with a teacher model")
    si.add_argument("--seeds", default=None, help="seed tasks JSONL (default: the bundled English+Chinese seeds; "
                                                  "training/data/... finds the bundled files from any folder)")
    si.add_argument("--teacher", required=True, help="OpenAI-compatible server URL (http://host:port or .../v1)")
    si.add_argument("--model", required=True, help="the teacher's model name")
    si.add_argument("--n", type=int, required=True, help="tasks wanted in the output in total")
    si.add_argument("-o", "--output", default="self_instruct.jsonl", help="Alpaca JSONL to write or extend")
    si.add_argument("--api-key", default=None, help="teacher key (default $OPENAI_API_KEY)")
    si.add_argument("--max-requests", type=int, default=None, help="request budget (default 10 + 2n)")
    si.add_argument("--batch-size", type=int, default=4, help="requests sent together (default 4)")
    si.add_argument("--tasks-per-request", type=int, default=4)
    si.add_argument("--rouge-threshold", type=float, default=0.7)
    si.add_argument("--temperature", type=float, default=1.0)
    si.add_argument("--max-tokens", type=int, default=1024)
    si.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    si.add_argument("--max-retries", type=int, default=3)
    si.add_argument("--seed", type=int, default=0)
    si.add_argument("--verbose", action="store_true", help="also show the libraries' notices and warnings")
    si.set_defaults(func=run_self_instruct)


def run_self_instruct(args: argparse.Namespace) -> int:
    from hearth.runtime.quiet import quiet_libraries

    quiet_libraries(verbose=args.verbose)
    from hearth.training.self_instruct import SelfInstructConfig, self_instruct

    res = self_instruct(SelfInstructConfig(
        teacher=args.teacher, model=args.model, n=args.n, seeds=args.seeds, output=args.output,
        api_key=args.api_key, max_requests=args.max_requests, batch_size=args.batch_size,
        tasks_per_request=args.tasks_per_request, rouge_threshold=args.rouge_threshold,
        temperature=args.temperature, max_tokens=args.max_tokens, timeout_s=args.timeout,
        max_retries=args.max_retries, seed=args.seed))
    rejected = ", ".join(f"{k} {v}" for k, v in sorted(res.rejected.items())) or "none"
    print(f"{res.output}: {res.total} tasks ({res.existing} before, {res.written} new) after {res.requests} "
          f"requests ({res.failed_requests} failed); parsed {res.parsed}, rejected: {rejected}", file=sys.stderr)
    if res.total < args.n:
        print(f"stopped short of {args.n}: the request budget ran out", file=sys.stderr)
    print(res.output)
    return 0


def run_curate(args: argparse.Namespace) -> int:
    from hearth.runtime.quiet import quiet_libraries

    quiet_libraries(verbose=args.verbose)
    from hearth.training.common import config_from_dict, load_config, parse_overrides
    from hearth.training.curate import Config, run

    overrides = parse_overrides(args.overrides)
    cfg = load_config(Config, args.config, overrides) if args.config else \
        config_from_dict(Config, overrides, "command line")
    res = run(cfg)
    dropped = ", ".join(f"{k} {v}" for k, v in res.dropped.items() if v) or "none"
    print(f"kept {res.kept} of {res.total} records; dropped: {dropped}; report: {res.report_md}", file=sys.stderr)
    for path in res.outputs:
        print(path)
    return 0
