"""The `quantize` command: every conversion from one checkpoint, each measured against its parent.

    quantize gptq CKPT --bits 4 --group-size 128 [--desc-act] [--calib builtin|FILE] -o OUT [--force]
    quantize bnb CKPT --int8|--nf4 [--double-quant] -o OUT [--force]
    quantize merge --base BASE --adapter LORA [--base-4bit] -o OUT [--force]
    quantize gguf CKPT --type q4_k_m|q5_k_m|q8_0|q4_0|f16|bf16|f32 -o OUT.gguf [--force]
    quantize recipe RECIPE.yaml [--force] [--only NAME ...]
    quantize report ARTIFACT [--against PARENT] [--max-ppl-increase PCT] [--quick] [--no-cache]
    quantize --verbose ...   # the libraries' warnings and INFO logs too (hidden by default)

CKPT is an HF checkpoint dir or a registered model name (`smollm2-135m-instruct` is the bundled one).
gptq/bnb/merge/gguf take `--report` (and `--max-ppl-increase`) to measure the new artifact at once.
An existing OUT is refused (exit 2) unless `--force`; then it is replaced only once the new artifact is
complete. Exit status: 0 done, 1 a quality gate failed, 2 bad input or a failed step, 130 interrupted
(nothing half-written is left: outputs are renamed into place only when complete, and temps that a
killed run left beside OUT are removed by the next run).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

EXIT_GATE = 1
EXIT_ERROR = 2


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="quantize", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"quantize (hearth) {_version()}")
    p.add_argument("--verbose", action="store_true",
                   help="also print the libraries' warnings and INFO logs (hidden by default); may stand anywhere")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    def with_report(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--report", action="store_true", help="measure the artifact against its parent when done")
        sp.add_argument("--max-ppl-increase", type=float, metavar="PCT", default=None,
                        help="with --report: fail (exit 1) if perplexity rises more than PCT percent")
        sp.add_argument("--quick", action="store_true", help="with --report: a shorter, CI-sized report")
        sp.add_argument("-o", "--output", required=True, metavar="OUT", help="where to write the artifact")
        sp.add_argument("--force", action="store_true", help="replace OUT if it exists (default: refuse)")

    g = sub.add_parser("gptq", help="GPTQ through gptqmodel (HF GPTQ layout)")
    g.add_argument("ckpt", metavar="CKPT")
    g.add_argument("--bits", type=int, choices=(4, 8), default=4)
    g.add_argument("--group-size", type=int, default=128, help="columns sharing one scale (-1: per channel)")
    g.add_argument("--desc-act", action="store_true", help="quantize columns in order of activation size")
    g.add_argument("--calib", default="builtin", metavar="FILE|builtin",
                   help="calibration data: the built-in English/Chinese set, or a .jsonl/.txt file")
    g.add_argument("--num-samples", type=int, default=128, help="calibration samples (default 128)")
    g.add_argument("--seq-len", type=int, default=512, help="tokens per calibration sample (default 512)")
    g.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda if available)")
    with_report(g)
    g.set_defaults(func=cmd_gptq)

    b = sub.add_parser("bnb", help="a saved bitsandbytes int8 or nf4 checkpoint")
    b.add_argument("ckpt", metavar="CKPT")
    mode = b.add_mutually_exclusive_group(required=True)
    mode.add_argument("--int8", dest="mode", action="store_const", const="int8")
    mode.add_argument("--nf4", dest="mode", action="store_const", const="nf4")
    b.add_argument("--double-quant", action="store_true", help="nf4: quantize the scales too")
    with_report(b)
    b.set_defaults(func=cmd_bnb)

    m = sub.add_parser("merge", help="merge a LoRA adapter into its base (QLoRA: from an nf4 base)")
    m.add_argument("--base", required=True, metavar="BASE")
    m.add_argument("--adapter", required=True, metavar="LORA", help="a peft LoRA adapter dir")
    m.add_argument("--base-4bit", action="store_true",
                   help="the adapter was trained on an nf4 base (QLoRA): merge into its dequantized weights")
    with_report(m)
    m.set_defaults(func=cmd_merge)

    from .gguf import GGUF_TYPES  # the converter's own table: help and error list the same types

    f = sub.add_parser("gguf", help="hearth's HF -> GGUF converter, then llama.cpp's quantizer")
    f.add_argument("ckpt", metavar="CKPT")
    f.add_argument("--type", dest="qtype", default="q4_k_m",
                   help=f"one of {', '.join(GGUF_TYPES)} (default q4_k_m)")
    with_report(f)
    f.set_defaults(func=cmd_gguf)

    r = sub.add_parser("recipe", help="one checkpoint to several artifacts, each with its report")
    r.add_argument("recipe", metavar="RECIPE.yaml")
    r.add_argument("--force", action="store_true",
                   help="rebuild artifacts that already exist (default: keep those built from this source "
                        "with these options, refuse to replace anything else)")
    r.add_argument("--only", nargs="+", metavar="NAME", help="build only these artifacts of the recipe")
    r.add_argument("--quick", action="store_true", help="CI-sized reports (overrides the recipe)")
    r.set_defaults(func=cmd_recipe)

    q = sub.add_parser("report", help="size, perplexity, KL, agreement and speed against the parent")
    q.add_argument("artifact", metavar="ARTIFACT")
    q.add_argument("--against", metavar="PARENT", default=None,
                   help="the reference checkpoint (default: the parent recorded in the artifact)")
    q.add_argument("--max-ppl-increase", type=float, metavar="PCT", default=None,
                   help="exit 1 if perplexity rises more than PCT percent over the parent")
    q.add_argument("--quick", action="store_true", help="a shorter text and fewer prompts")
    q.add_argument("--no-save", action="store_true", help="print only; do not write into the artifact")
    q.add_argument("--no-cache", action="store_true",
                   help="measure the parent again instead of reading its saved scores ($HEARTH_HOME/report-cache, "
                        "keyed by the parent's content hash and the settings)")
    q.set_defaults(func=cmd_report)
    return p


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("hearth-llm")
    except PackageNotFoundError:
        return "unknown"


def _source(name_or_path: str) -> Path:
    from .recipe import resolve_source
    return resolve_source(name_or_path)


def _output(args: argparse.Namespace) -> Path:
    """-o OUT, refused before any work if it exists and --force was not given."""
    from .common import refuse_existing
    return refuse_existing(args.output, overwrite=args.force)


def _finish(args: argparse.Namespace, out: Path) -> int:
    print(out)
    if not args.report:
        if args.max_ppl_increase is not None:
            print("quantize: --max-ppl-increase needs --report; no report was made", file=sys.stderr)
            return EXIT_ERROR
        return 0
    return _report(out, against=None, gate=args.max_ppl_increase, quick=args.quick, save=True)


def _report(artifact: Path, against: str | None, gate: float | None, quick: bool, save: bool,
            cache: bool = True) -> int:
    from . import report as reports
    from .common import QualityGateError

    parent = _source(against) if against else None
    with reports.ParentCache(store=report_cache_dir() if cache else None) as parent_cache:
        rep = reports.evaluate(artifact, against=parent, quick=quick, parent_cache=parent_cache)
    failed = None
    try:
        reports.gate(rep, gate)  # recorded in the report before it is shown and saved
    except QualityGateError as e:
        failed = e
    print(reports.markdown_table([rep]))
    if save:
        for p in reports.save_report(rep, artifact):
            print(f"wrote {p}", file=sys.stderr)
    if failed is not None:
        raise failed  # exit 1 in main
    if rep.gate_result == reports.GATE_PASS:
        print(f"quality gate passed: perplexity {rep.ppl_increase_pct:+.2f}% <= +{gate:g}%", file=sys.stderr)
    return 0


def report_cache_dir() -> Path:
    """Where `quantize report` keeps parent runs between invocations: $HEARTH_HOME/report-cache."""
    from hearth.runtime.registry import hearth_home
    return hearth_home() / "report-cache"


def cmd_gptq(args: argparse.Namespace) -> int:
    from .gptq import quantize_gptq

    dest = _output(args)
    out = quantize_gptq(_source(args.ckpt), dest, bits=args.bits, group_size=args.group_size,
                        desc_act=args.desc_act, calib=args.calib, num_samples=args.num_samples,
                        seq_len=args.seq_len, device=args.device, overwrite=args.force)
    return _finish(args, Path(out))


def cmd_bnb(args: argparse.Namespace) -> int:
    from .bnb import quantize_bnb

    dest = _output(args)
    out = quantize_bnb(_source(args.ckpt), dest, mode=args.mode, double_quant=args.double_quant,
                       overwrite=args.force)
    return _finish(args, Path(out))


def cmd_merge(args: argparse.Namespace) -> int:
    from .merge import merge_lora

    dest = _output(args)
    out = merge_lora(_source(args.base), Path(args.adapter), dest, base_4bit=args.base_4bit,
                     overwrite=args.force)
    return _finish(args, Path(out))


def cmd_gguf(args: argparse.Namespace) -> int:
    from .common import QuantizeError
    from .gguf import GGUF_TYPES, convert

    if args.qtype not in GGUF_TYPES:
        raise QuantizeError(f"--type must be one of {', '.join(GGUF_TYPES)}; got {args.qtype!r}")
    dest = _output(args)
    out = convert(_source(args.ckpt), dest, args.qtype, overwrite=args.force)
    return _finish(args, Path(out))


def cmd_recipe(args: argparse.Namespace) -> int:
    from .recipe import load_recipe, run_recipe

    recipe = load_recipe(args.recipe)
    if args.quick:
        recipe.quick = True
    result = run_recipe(recipe, force=args.force, only=args.only)
    for name, path in result.artifacts.items():
        print(f"{name}\t{path}")
    for f in result.summary_files:
        print(f"wrote {f}", file=sys.stderr)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from hearth.runtime.errors import ModelNotFoundError

    artifact = Path(args.artifact).expanduser()
    if not artifact.exists():
        raise ModelNotFoundError(f"no artifact at {artifact}")
    return _report(artifact, args.against, args.max_ppl_increase, args.quick, save=not args.no_save,
                   cache=not args.no_cache)


def main(argv: list[str] | None = None) -> int:
    from hearth.runtime.checkpoint import PickleRefusedError
    from hearth.runtime.errors import HearthError

    from .common import QualityGateError

    from hearth.runtime.quiet import pop_verbose, setup_output

    argv, verbose = pop_verbose(sys.argv[1:] if argv is None else list(argv))
    setup_output(verbose)  # offline (everything is local) and quiet, before torch and transformers load
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except QualityGateError as e:
        print(f"quantize: {e}", file=sys.stderr)
        return EXIT_GATE
    except PickleRefusedError as e:  # the converters read safetensors only: there is no flag to name
        print(f"quantize: error: {e.naming(None)}", file=sys.stderr)
        return EXIT_ERROR
    except HearthError as e:
        print(f"quantize: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("quantize: interrupted; no partial output was left behind", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
