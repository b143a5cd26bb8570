"""SFT on the default model: full fine-tuning vs LoRA vs QLoRA, training tokens/s and peak memory.

    hearth bench train --json bench/train.json                # 4 steps per method, ~8 min on 2 cores
    python bench/train.py --steps 2 --methods lora,qlora
    hearth bench train --ppo-vs-rloo --png bench/ppo_vs_rloo.png   # instead: bench/rlhf.py (PPO vs RLOO)

Each method runs as its own `hearth train sft` process (so peak RSS is its own) from
training/recipes/sft_lora.yaml with the same overrides: batch 4, no accumulation, max_length 256, no
eval, no checkpoints, no merge, fp32 on CPU. The numbers are what the stage itself records in its
output's hearth.json (tokens/s over the optimizer steps, excluding model loading; peak RSS of the
process, model loading included). On Linux the stage also resets the peak mark once the model is loaded,
so "training's own" memory (peak while training minus RSS after load: gradients, optimizer state,
activations) is separated from loading. Ratios are against full fine-tuning in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from hearth.clients.cmd_bench import load_benchmark, output_problem, write_json

REPO = Path(__file__).resolve().parents[1]
METHODS = ("full", "lora", "qlora")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per method (default 4; with "
                   "--ppo-vs-rloo 30)")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of full,lora,qlora")
    p.add_argument("--json", metavar="PATH", default=None, help="write every number to this JSON file")
    p.add_argument("--ppo-vs-rloo", action="store_true",
                   help="instead: PPO vs RLOO reward curves on a tiny task (bench/rlhf.py, with the options below)")
    load_benchmark("rlhf.py").add_arguments(p, own=False)


def _one(method: str, steps: int, out: Path) -> dict:
    cmd = [sys.executable, "-m", "hearth.clients.cli", "train", "sft", "--config",
           str(REPO / "training" / "recipes" / "sft_lora.yaml"), f"method={method}", f"output_dir={out}",
           f"max_steps={steps}", "batch_size=4", "grad_accum=1", "max_length=256", "eval_fraction=0",
           "save_every=100000", "merge=false", "gradient_checkpointing=false"]
    t0 = time.monotonic()
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                       env=dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1"))
    wall = time.monotonic() - t0
    if p.returncode != 0:
        raise SystemExit(f"{method} failed ({p.returncode}):\n{p.stderr[-2000:]}")
    metrics = json.loads((out / "hearth.json").read_text())["metrics"]
    return {"method": method, "wall_s": round(wall, 1), "tokens_per_s": metrics.get("train_tokens_per_s"),
            "peak_rss_mb": metrics.get("peak_rss_mb"), "rss_after_load_mb": metrics.get("rss_after_load_mb"),
            "train_peak_rss_mb": metrics.get("train_peak_rss_mb"), "trainable_params": metrics.get("trainable_params"),
            "final_loss": metrics.get("final_loss")}


def run(args: argparse.Namespace) -> int:
    if args.ppo_vs_rloo:
        args.steps = args.steps or 30
        return load_benchmark("rlhf.py").run(args)
    args.steps = args.steps or 4
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = sorted(set(methods) - set(METHODS))
    if bad:
        print(f"bench train: unknown method(s) {bad}; choose from {', '.join(METHODS)}", file=sys.stderr)
        return 2
    problem = output_problem(args.json)
    if problem:
        print(f"bench train: {problem}", file=sys.stderr)
        return 2
    rows = []
    with tempfile.TemporaryDirectory(prefix="hearth-bench-train-") as tmp:
        for m in methods:
            print(f"[bench train] {m}: {args.steps} steps ...", file=sys.stderr, flush=True)
            rows.append(_one(m, args.steps, Path(tmp) / m))
    base = next((r for r in rows if r["method"] == "full"), None)
    print(f"SFT on SmolLM2-135M-Instruct, {args.steps} steps of batch 4 x 256 tokens max, fp32, CPU\n")
    print("| method | trainable params | training tok/s | × full | RSS after load MB | peak RSS while training MB "
          "| training's own MB (peak − loaded) | × full | process peak MB | final loss |")
    print("|---|---|---|---|---|---|---|---|---|---|")

    def own(r):  # what the training loop adds on top of the loaded model: grads, optimizer state, activations
        if r.get("train_peak_rss_mb") is None or r.get("rss_after_load_mb") is None:
            return None
        return r["train_peak_rss_mb"] - r["rss_after_load_mb"]

    for r in rows:
        tr = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}" if base else "–"
        mine, theirs = own(r), own(base) if base else None
        mr = f"{mine / theirs:.2f}" if mine is not None and theirs else "–"
        fmt = (lambda v: "–" if v is None else f"{v:.0f}")
        print(f"| {r['method']} | {r.get('trainable_params') or 0:,} | {r['tokens_per_s']:.1f} | {tr} | "
              f"{fmt(r.get('rss_after_load_mb'))} | {fmt(r.get('train_peak_rss_mb'))} | {fmt(mine)} | {mr} | "
              f"{r['peak_rss_mb']:.0f} | {r['final_loss']:.3f} |")
    cmd = f"hearth bench train --steps {args.steps} --methods {','.join(methods)}"
    print(f"\nCommand: {cmd}")
    if args.json:
        write_json(args.json, {"command": cmd, "rows": rows})
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
