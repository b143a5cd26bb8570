"""`hearth models`: the local model cache and the catalog of models hearth can fetch.

    hearth models pull qwen2.5-coder-1.5b-instruct   # fetch, verify (sha256 of every piece) and register
    hearth models pull hf:ORG/REPO[:FILE.gguf]        # a GGUF from the Hugging Face Hub (needs the network)
    hearth models remove NAME                         # delete a cached model
    hearth models prepare [--force]   # build the default model's HF checkpoint from its GGUF
    hearth models list [--json]       # name, format, size, stage, parent of every cached model, then the
                                      # checkpoints under ./runs and ./out (training and quantize outputs)
    hearth models list --available    # the catalog: what `pull` can fetch, and what is pulled
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
    lister.add_argument("--available", action="store_true", help="list the catalog: models `pull` can fetch")
    lister.set_defaults(func=cmd_list)

    pull = sub.add_parser("pull", help="fetch a catalog model (or hf:ORG/REPO[:FILE]), verify it and register it")
    pull.add_argument("name", help="a catalog name (see `hearth models list --available`) or hf:ORG/REPO[:FILE.gguf]")
    pull.add_argument("--force", action="store_true", help="fetch again even if it is already pulled")
    pull.add_argument("--name", dest="as_name", default=None, metavar="NAME",
                      help="the cache name of an hf: model (default: the file's name, lowercased)")
    pull.add_argument("--catalog", default=None, metavar="FILE",
                      help="a catalog file of your own, in the format of the bundled one")
    pull.set_defaults(func=cmd_pull)

    remove = sub.add_parser("remove", help="delete a cached model and its downloaded pieces")
    remove.add_argument("name", help="the model's name, as `hearth models list` shows it")
    remove.set_defaults(func=cmd_remove)


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


class _Bars:
    """One tqdm bar per phase of a pull (fetch, assemble), in bytes, on stderr like every other bar."""

    LABELS = {"fetch": "fetch + verify", "assemble": "assemble"}

    def __init__(self, name: str):
        self.name, self.phase, self.bar = name, None, None

    def __call__(self, phase: str, done: int, total: int) -> None:
        from tqdm import tqdm

        if phase != self.phase:
            self.close()
            self.phase = phase
            self.bar = tqdm(total=total, initial=done, desc=f"{self.name}: {self.LABELS.get(phase, phase)}",
                            unit="B", unit_scale=True, unit_divisor=1024, dynamic_ncols=True, file=sys.stderr)
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def cmd_pull(args: argparse.Namespace) -> int:
    from hearth.runtime import catalog

    bars = _Bars(args.name)
    try:
        if args.name.startswith(catalog.HF_PREFIX):
            name, path = catalog.pull_hub(args.name, name=args.as_name, force=args.force, progress=bars)
        else:
            if args.as_name:
                raise catalog.CatalogError("--name is for hf: models; catalog models keep their catalog name")
            entries = catalog.load_catalog(args.catalog)
            if args.name not in entries:
                raise catalog.CatalogError(f"{args.name!r} is not in the catalog; available: "
                                           f"{', '.join(sorted(entries))} (or hf:ORG/REPO[:FILE.gguf])")
            name, path = args.name, catalog.pull(entries[args.name], force=args.force, progress=bars)
    finally:
        bars.close()
    print(f"{name}\tgguf\t{path}")
    print(f"hearth: {name} is ready: hearth serve --model {name}", file=sys.stderr)
    return 0


def cmd_remove(args: argparse.Namespace) -> int:
    from hearth.runtime import catalog

    for path in catalog.remove(args.name):
        print(f"removed {path}")
    return 0


def _list_available(as_json: bool) -> int:
    from hearth.runtime import catalog

    entries = catalog.load_catalog()
    rows = [{"name": e.name, "source": e.source, "size_bytes": e.size, "sha256": e.sha256,
             "pulled": catalog.installed(e.name) is not None or (e.source == "bundled" and any(
                 m.name == e.name and m.error is None for m in registry.list_models())),
             "description": e.description} for e in entries.values()]
    if as_json:
        json.dump(rows, sys.stdout, indent=2)
        print()
        return 0
    table = [("NAME", "SIZE", "SOURCE", "PULLED", "DESCRIPTION")] + [
        (r["name"], _human_size(r["size_bytes"]), r["source"], "yes" if r["pulled"] else "no", r["description"])
        for r in rows]
    widths = [max(len(r[i]) for r in table) for i in range(4)]
    for r in table:
        print("  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4])
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    if args.available:
        return _list_available(args.json)
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
