"""`hearth train STAGE --config RECIPE.yaml [--resume] [--verbose] [key=value ...]`: one training stage.

    hearth train sft --config training/recipes/sft_lora.yaml
    hearth train sft --config training/recipes/sft_lora.yaml --resume max_steps=20
    hearth train sft --help                      # every field of the sft recipe, with its default and meaning

Each stage is one self-contained script in training/ (see STAGES) exposing `Config` (a dataclass the
recipe mirrors) and `run(config, resume=False) -> Path` (the output checkpoint, printed on stdout as the
last line). `key=value` pairs after the options override recipe fields (values read as YAML). The bundled
`training/recipes/...` and `training/data/...` paths work from any folder; outputs (runs/...) go where you
are. Library notices are hidden unless --verbose.
"""

from __future__ import annotations

import argparse
import importlib
import textwrap

# stage -> module of hearth.training
STAGES = {
    "tokenizer": "tokenizer",
    "pretrain": "pretrain",
    "sft": "sft",
    "rm": "rm",
    "ppo": "ppo",
    "rloo": "rloo",
    "dpo": "dpo",
    "rlhf": "rlhf",
}


class _StageParser(argparse.ArgumentParser):
    """`hearth train STAGE --help` lists the stage's recipe fields; its module is imported only then."""

    stage = ""

    def format_help(self) -> str:
        from hearth.training.common import field_docs

        module = importlib.import_module(f"hearth.training.{STAGES[self.stage]}")
        lines = [super().format_help().rstrip(), "", f"recipe fields ({module.__name__}.Config; any of them "
                                                     "also as key=value):"]
        for name, default, doc in field_docs(module.Config):
            lines.append(f"  {name} = {default}")
            if doc:
                lines += textwrap.wrap(doc, width=96, initial_indent="      ", subsequent_indent="      ")
        return "\n".join(lines) + "\n"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="run a training stage from its YAML recipe",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    stages = p.add_subparsers(dest="stage", metavar="STAGE", parser_class=_StageParser)
    stages.required = True
    for name in STAGES:
        s = stages.add_parser(name, help=f"the {name} stage (--help lists its recipe fields)",
                              description=f"hearth train {name} --config RECIPE.yaml [--resume] [key=value ...]")
        s.stage = name
        s.add_argument("--config", required=True, metavar="RECIPE.yaml", help="the stage's recipe")
        s.add_argument("--resume", action="store_true", help="continue from the last complete checkpoint")
        s.add_argument("--verbose", action="store_true",
                       help="also show the libraries' notices, warnings and per-file progress bars")
        s.add_argument("overrides", nargs="*", metavar="key=value", help="override recipe fields")
        s.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from hearth.runtime.quiet import quiet_libraries

    quiet_libraries(verbose=args.verbose)  # before torch and transformers are imported
    from hearth.training.common import TrainingConfigError, load_config, parse_overrides

    try:
        module = importlib.import_module(f"hearth.training.{STAGES[args.stage]}")
    except ModuleNotFoundError as e:
        if e.name == f"hearth.training.{STAGES[args.stage]}":
            raise TrainingConfigError(f"the {args.stage} stage is not available in this version") from None
        raise
    cfg = load_config(module.Config, args.config, parse_overrides(args.overrides))
    out = module.run(cfg, resume=args.resume)
    print(out)
    return 0
