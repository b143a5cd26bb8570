"""`hearth models`: the local model cache.

    hearth models prepare [--force]   # build the default model's HF checkpoint from its GGUF
    hearth models list [--json]       # name, format, size, stage, parent of every cached model, then the
                                      # checkpoints under ./runs and ./out (training and quantize outputs)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from hearth.runtime import registry


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    models = subparsers.add_parser("models", help="prepare and list cached models")
    sub = models.add_subparsers(dest="models_command", metavar="ACTION")
    sub.required = True

    prepare = sub.add_parser("prepare", help=f"prepare the default model ({registry.DEFAULT_MODEL})")
    prepare.add_argument("--force", action="store_true", help="rebuild even if it is already prepared")
    prepare.set_defaults(func=cmd_prepare)

    lister = sub.add_parser("list", help="list cached models and the checkpoints under ./runs and ./out")
    lister.add_argument("--json", action="store_true", help="print JSON instead of a table")
    lister.set_defaults(func=cmd_list)


def cmd_prepare(args: argparse.Namespace) -> int:
    entry = registry.prepare_default_model(force=args.force)
    for e in registry.list_models():
        if e.name == entry.name:
            print(f"{e.name}\t{e.format}\t{e.path}")
    return 0


def _human_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TB"


def _short(path: str) -> str:
    """A parent path as a person reads it: from the current folder when inside it, else with ~ for home."""
    p = Path(path)
    for base, prefix in ((Path.cwd(), ""), (Path.home(), "~/")):
        try:
            return prefix + p.relative_to(base).as_posix()
        except ValueError:
            continue
    return path


def cmd_list(args: argparse.Namespace) -> int:
    cached, local = registry.list_models(), registry.list_local_checkpoints()
    entries = cached + local
    if args.json:
        rows = [{"name": e.name, "variant": e.variant, "format": e.format, "path": str(e.path),
                 "size_bytes": e.size_bytes, "stage": e.stage, "parent": e.parent,
                 "lineage": e.lineage, "error": e.error, "source": "cache" if i < len(cached) else "local"}
                for i, e in enumerate(entries)]
        json.dump(rows, sys.stdout, indent=2)
        print()
        return 0
    if not entries:
        print(f"no models in {registry.models_dir()} and no checkpoints under "
              f"{' or '.join('./' + r for r in registry.LOCAL_ROOTS)}; run `hearth models prepare`", file=sys.stderr)
        return 0
    header = ("NAME", "FORMAT", "SIZE", "STAGE", "PARENT")
    rows = [(e.name, e.format, _human_size(e.size_bytes), e.stage or "-",
             _short(e.parent) if e.parent else (f"error: {e.error}" if e.error else "-")) for e in entries]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
    for r in [header, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4])
    return 0
