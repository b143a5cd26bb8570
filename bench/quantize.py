"""Quality of every quantized artifact of the default model against its fp32 checkpoint.

    hearth bench quantize --json bench/quantize.json --png bench/quantize.png
    python bench/quantize.py --quick --out /tmp/q              # CI-sized reports, faster
    python bench/quantize.py --only smollm2-q8_0.gguf --json out.json

Runs the recipe quantize/recipes/smollm2.yaml (bnb int8, GPTQ 8 and 4 bit g128, GGUF q8_0 and q4_k_m)
on the fp32 HF checkpoint of SmolLM2-135M-Instruct (itself dequantized from the Q4_1 GGUF the model
ships as), reports each artifact against that parent with the same held-out text and prompts, and
checks the issue's targets: int8 and q8_0 perplexity +<=1%, GPTQ-4 and q4_k_m +<=10% with size
<=0.40x of f16 (f16 size = the parent's parameter count x 2 bytes). Artifacts already built from the same
parent with the same settings are reused (pass --force to rebuild); build times are not measured here.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

from hearth.clients.cmd_bench import output_problem, write_json

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "quantize" / "recipes" / "smollm2.yaml"
# artifact name -> (max perplexity increase %, max size vs f16 or None)
TARGETS = {"bnb-int8": (1.0, None), "gptq-int8": (1.0, None), "gptq-int4": (10.0, 0.40),
           "smollm2-q8_0.gguf": (1.0, None), "smollm2-q4_k_m.gguf": (10.0, 0.40)}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default=str(REPO / "artifacts" / "bench-quantize"),
                   help="where the artifacts are built (default artifacts/bench-quantize)")
    p.add_argument("--only", nargs="+", metavar="NAME", help="only these artifacts of the recipe")
    p.add_argument("--quick", action="store_true", help="CI-sized reports (shorter text, fewer prompts)")
    p.add_argument("--force", action="store_true", help="rebuild artifacts that already exist")
    p.add_argument("--json", metavar="PATH", default=None, help="write every number to this JSON file")
    p.add_argument("--png", metavar="PATH", default=None, help="write the comparison plot here")


def table(reps) -> str:
    rows = ["| artifact | method | size MB | × f16 | ppl (parent) | ppl increase | mean KL | top-1 agree | "
            "greedy exact | decode tok/s | target | |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in reps:
        name = Path(r.artifact).name
        ppl_max, size_max = TARGETS.get(name, (None, None))
        ok = ppl_max is None or (math.isfinite(r.ppl_increase_pct) and r.ppl_increase_pct <= ppl_max)
        ratio = r.size_vs_f16
        if size_max is not None:
            ok = ok and ratio <= size_max
        target = "–" if ppl_max is None else f"+≤{ppl_max:g}%" + (f", ≤{size_max:.2f}× f16" if size_max else "")
        tok_s = f"{r.decode_tok_s:.1f}" if r.decode_tok_s else "–"
        rows.append(f"| {name} | {r.method} | {r.size_bytes / 1e6:.1f} | {ratio:.2f} | {r.ppl:.3f} "
                    f"({r.ppl_parent:.3f}) | {r.ppl_increase_pct:+.2f}% | {r.kl_mean:.4f} | "
                    f"{r.top1_agreement:.3f} | {r.greedy_exact:.2f} | {tok_s} | {target} | "
                    f"{'pass' if ok else 'MISS'} |")
    return "\n".join(rows)


def run(args: argparse.Namespace) -> int:
    from hearth.quantize.common import QualityGateError
    from hearth.quantize.recipe import load_recipe, run_recipe

    for flag, path in (("--json", args.json), ("--png", args.png)):
        problem = output_problem(path, flag)
        if problem:
            print(f"bench quantize: {problem}", file=sys.stderr)
            return 2
    recipe = load_recipe(RECIPE)
    recipe.output_dir = str(Path(args.out).resolve())
    recipe.quick = args.quick
    for a in recipe.artifacts:  # the bench reports every miss in its table instead of stopping
        a.max_ppl_increase = None
    t0 = time.monotonic()
    try:
        result = run_recipe(recipe, force=args.force, only=args.only)
    except QualityGateError as e:  # no gates are set, so this is unexpected
        print(f"bench quantize: {e}", file=sys.stderr)
        return 1
    reps = result.reports
    print(table(reps))
    print(f"\nparent: {reps[0].parent if reps else '?'}; {'quick' if args.quick else 'full'} reports; "
          f"{time.monotonic() - t0:.0f} s in all")
    cmd = "hearth bench quantize" + (" --quick" if args.quick else "") + \
        (f" --only {' '.join(args.only)}" if args.only else "")
    print(f"Command: {cmd}")
    if args.png:
        from hearth.quantize.report import plot_reports
        plot_reports(reps, args.png)
        print(f"wrote {args.png}", file=sys.stderr)
    if args.json:
        data = {"command": cmd, "recipe": str(RECIPE.relative_to(REPO)), "quick": args.quick,
                "reports": [r.to_dict() for r in reps],
                "table": table(reps)}
        write_json(args.json, data)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
