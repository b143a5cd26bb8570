"""`hearth plan`: will a model fit a device, and which settings make it fit?

    hearth plan llama-3-8b --device rtx3090 --context 8192 --concurrency 4 --quant int4
    hearth plan path/to/checkpoint --device cpu --context 2048 --concurrency 2 --json
    hearth plan --cluster auto --config models.yaml     # where each replica would go on a Ray cluster

Exit status 0 when the plan fits, 1 when it does not (so scripts can branch on it).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from hearth.runtime.planner import DEVICES, PRESETS, QUANTS

    p = subparsers.add_parser(
        "plan", help="estimate memory (weights, KV cache, activations) and whether it fits a device",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", metavar="MODEL", nargs="?",
                   help=f"HF checkpoint dir, GGUF file, a cached model name (`hearth models list`), "
                        f"or a preset: {', '.join(PRESETS)}")
    p.add_argument("--device", choices=list(DEVICES), default="cpu")
    p.add_argument("--context", type=int, default=4096, help="tokens per sequence (default 4096)")
    p.add_argument("--concurrency", type=int, default=1, help="sequences served at once (default 1)")
    p.add_argument("--quant", choices=list(QUANTS), default=None,
                   help="weight format (default: fp16 on a GPU, fp32 on cpu)")
    p.add_argument("--memory-gb", type=float, default=None,
                   help="override the device's memory, in GiB (default: the device's, or total RAM on cpu)")
    p.add_argument("--prefill-chunk", type=int, default=512, help="tokens per prefill step (default 512)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--cluster", metavar="ADDRESS", default=None,
                   help="instead of a model: place the replicas of --config on the Ray cluster at ADDRESS "
                        "(`auto`: the cluster of this node), as `hearth serve --address` would")
    p.add_argument("--config", default=None, help="models.yaml for --cluster (default: the bundled models)")
    p.set_defaults(func=run)


def run_cluster(args: argparse.Namespace) -> int:
    from hearth.serve.config import load_config
    from hearth.serve.ray_app import plan_cluster

    text, fits = plan_cluster(load_config(args.config), args.cluster)
    print(text)
    return 0 if fits else 1


def run(args: argparse.Namespace) -> int:
    from hearth.runtime.errors import ModelNotFoundError
    from hearth.runtime.planner import DEVICES, PRESETS, format_plan, plan, unknown_model_message
    from hearth.runtime.registry import list_models, looks_like_path, resolve_model

    if args.cluster:
        return run_cluster(args)
    if not args.model:
        print("hearth plan: error: give a MODEL (or --cluster ADDRESS)", file=sys.stderr)
        return 2
    model = args.model
    if model.lower() not in PRESETS:
        # a path as given, or a cached model by name (its GGUF: metadata is all the planner needs)
        try:
            model = str(resolve_model(model, prefer="gguf"))
        except ModelNotFoundError:
            if looks_like_path(model):
                raise
            cached = sorted({e.name for e in list_models() if e.error is None})
            raise ModelNotFoundError(unknown_model_message(model, cached)) from None
    quant = args.quant or ("fp16" if DEVICES[args.device][1] else "fp32")
    result = plan(model, args.device, args.context, args.concurrency, quant,
                  memory_gb=args.memory_gb, prefill_chunk=args.prefill_chunk)
    print(json.dumps(dataclasses.asdict(result), indent=2) if args.json else format_plan(result))
    return 0 if result.fits else 1
