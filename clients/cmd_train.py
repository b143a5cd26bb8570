"""`hearth train STAGE --config RECIPE.yaml [--resume] [key=value ...]`: one training stage from its recipe.

    hearth train sft --config training/recipes/sft_lora.yaml
    hearth train sft --config training/recipes/sft_lora.yaml --resume max_steps=20

Each stage is one self-contained script in training/ (see STAGES) exposing `Config` (a dataclass the
recipe mirrors) and `run(config, resume=False) -> Path` (the output checkpoint). `key=value` pairs after
the options override recipe fields (values read as YAML).
"""

from __future__ import annotations

import argparse
import importlib

# stage -> module of hearth.training
STAGES = {
    "tokenizer": "tokenizer",
    "pretrain": "pretrain",
    "sft": "sft",
    "rm": "rm",
    "ppo": "ppo",
    "dpo": "dpo",
}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="run a training stage from its YAML recipe",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=sorted(STAGES), help="which stage")
    p.add_argument("--config", required=True, metavar="RECIPE.yaml", help="the stage's recipe")
    p.add_argument("--resume", action="store_true", help="continue from the last complete checkpoint")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="override recipe fields")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
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
