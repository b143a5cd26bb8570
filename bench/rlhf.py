"""PPO vs RLOO on the same tiny task: reward curves, KL to the reference and time per step.

    hearth bench train --ppo-vs-rloo --json bench/ppo_vs_rloo.json --png bench/ppo_vs_rloo.png
    python bench/rlhf.py --seeds 0,1,2 --steps 30

The task: a tiny random LLaMA (tests/conftest.py's build_tiny_model: 2 layers, hidden 64, a 400-token BPE
vocabulary) learns to write answers holding many letters "e" (the reward is their count), from the bundled
preference prompts, fp32 on CPU, every weight trained. Both stages get the same reward function, steps,
sample budget (2 prompts × 4 answers of up to 16 tokens a step), KL coefficient and learning rate, and one
optimizer update per rollout batch (PPO: ppo_epochs 1, minibatch 8; RLOO: TRL's single iteration); the rest
is each stage's defaults (PPO: GAE γ 1, λ 0.95, whitened advantages, ε 0.2, value head; RLOO: leave-one-out
baseline, ε 0.2). The KL is per answer (summed over its tokens) for both. The runs alternate PPO, RLOO per
seed, in one process.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from hearth.clients.cmd_bench import output_problem, write_json

REPO = Path(__file__).resolve().parents[1]
SHARED = dict(max_completion_length=16, prompts_per_step=2, method="full", save_every=100000)


def letter_e(completions: list[str], **_) -> list[float]:
    """The bench's reward: how many letters "e" the answer holds."""
    return [float(c.count("e")) for c in completions]


def add_arguments(p: argparse.ArgumentParser, own: bool = True) -> None:
    """This bench's options; `own=False` leaves out --steps and --json (bench/train.py has them already)."""
    if own:
        p.add_argument("--steps", type=int, default=30, help="rollout batches (optimizer steps) per run (default 30)")
        p.add_argument("--json", metavar="PATH", default=None, help="write every number to this JSON file")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds, one PPO and one RLOO run each")
    p.add_argument("--learning-rate", type=float, default=1e-2, help="both stages (default 1e-2, tiny-model scale)")
    p.add_argument("--beta", type=float, default=0.05, help="KL coefficient of both stages (default 0.05)")
    p.add_argument("--png", metavar="PATH", default=None, help="draw the mean reward and KL curves here")


def _one(algorithm: str, model: Path, out: Path, args: argparse.Namespace, seed: int) -> dict:
    from hearth.training import ppo, rloo

    spec = f"{letter_e.__module__}:letter_e"
    common = dict(SHARED, output_dir=str(out), model=str(model), reward_function=spec, max_steps=args.steps,
                  learning_rate=args.learning_rate, beta=args.beta, seed=seed)
    t0 = time.monotonic()
    if algorithm == "ppo":
        ppo.run(ppo.Config(**common, samples_per_prompt=4, ppo_epochs=1, minibatch_size=8))
    else:
        rloo.run(rloo.Config(**common, num_generations=4))
    wall = time.monotonic() - t0
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    recs = [r for r in recs if "reward" in r]
    # KL per answer (summed over its tokens, what the penalty uses): ppo logs that; TRL's RLOO logs the mean
    # per token, which times the mean answer length is the same quantity
    kl = [r["kl"] if algorithm == "ppo" else r["kl"] * r["completions/mean_length"] for r in recs]
    return {"algorithm": algorithm, "seed": seed, "wall_s": round(wall, 1), "reward": [r["reward"] for r in recs],
            "kl": kl,
            "step_seconds": [r.get("step_seconds", 0.0) for r in recs]}


def _quarter(xs: list[float], last: bool) -> float:
    k = max(1, len(xs) // 4)
    part = xs[-k:] if last else xs[:k]
    return sum(part) / len(part)


def _median(xs: list[float]) -> float:
    s = sorted(xs)
    return (s[(len(s) - 1) // 2] + s[len(s) // 2]) / 2


def _plot(runs: list[dict], png: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 6), dpi=110)
    FigureCanvasAgg(fig)
    for i, key in enumerate(("reward", "kl")):
        ax = fig.add_subplot(2, 1, i + 1)
        for algorithm, colour in (("ppo", "tab:blue"), ("rloo", "tab:orange")):
            mine = [r[key] for r in runs if r["algorithm"] == algorithm]
            for curve in mine:
                ax.plot(range(1, len(curve) + 1), curve, color=colour, alpha=0.25, linewidth=0.8)
            mean = [sum(v) / len(v) for v in zip(*mine)]
            ax.plot(range(1, len(mean) + 1), mean, color=colour, linewidth=2,
                    label=f"{algorithm} (mean of {len(mine)})")
        ax.set_ylabel({"reward": "mean reward (letters e)", "kl": "KL to reference (nats/answer)"}[key])
        ax.grid(alpha=0.3)
        ax.legend()
        if i == 0:
            ax.set_title("PPO vs RLOO on the same tiny task (thin: each seed)")
    ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(png, format="png")


def run(args: argparse.Namespace) -> int:
    from hearth.runtime.quiet import quiet_libraries

    quiet_libraries(verbose=False)
    for path, flag in ((args.json, "--json"), (args.png, "--png")):
        problem = output_problem(path, flag)
        if problem:
            print(f"bench rlhf: {problem}", file=sys.stderr)
            return 2
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    sys.path.insert(0, str(REPO))
    from tests.conftest import build_tiny_model

    runs = []
    with tempfile.TemporaryDirectory(prefix="hearth-bench-rlhf-") as tmp:
        model = build_tiny_model(Path(tmp) / "tiny")
        for seed in seeds:
            for algorithm in ("ppo", "rloo"):  # interleaved, so a busier minute hits both alike
                print(f"[bench rlhf] {algorithm} seed {seed}: {args.steps} steps ...", file=sys.stderr, flush=True)
                runs.append(_one(algorithm, model, Path(tmp) / f"{algorithm}-{seed}", args, seed))
    print(f"PPO vs RLOO, tiny LLaMA (hidden 64, 2 layers), reward = letters 'e' in the answer, {args.steps} steps x "
          f"8 answers of <= 16 tokens, lr {args.learning_rate}, beta {args.beta}, full fine-tuning, fp32 CPU\n")
    print("| algorithm | seed | reward, first quarter | reward, last quarter | gain | KL, last quarter "
          "| s/step (median) |")
    print("|---|---|---|---|---|---|---|")
    summary = {}
    for algorithm in ("ppo", "rloo"):
        mine = [r for r in runs if r["algorithm"] == algorithm]
        for r in mine:
            first, last = _quarter(r["reward"], False), _quarter(r["reward"], True)
            print(f"| {algorithm} | {r['seed']} | {first:.2f} | {last:.2f} | {last - first:+.2f} | "
                  f"{_quarter(r['kl'], True):.1f} | {_median(r['step_seconds']):.2f} |")
        gains = [_quarter(r["reward"], True) - _quarter(r["reward"], False) for r in mine]
        summary[algorithm] = {"median_gain": _median(gains), "gains": gains,
                              "median_kl_last": _median([_quarter(r["kl"], True) for r in mine]),
                              "median_step_seconds": _median([s for r in mine for s in r["step_seconds"]])}
    for algorithm, s in summary.items():
        print(f"\n{algorithm}: median reward gain {s['median_gain']:+.2f} (spread {min(s['gains']):+.2f} .. "
              f"{max(s['gains']):+.2f}), median KL in the last quarter {s['median_kl_last']:.1f}, "
              f"median {s['median_step_seconds']:.2f} s/step")
    cmd = (f"hearth bench train --ppo-vs-rloo --steps {args.steps} --seeds {args.seeds} --learning-rate "
           f"{args.learning_rate} --beta {args.beta}")
    print(f"\nCommand: {cmd}")
    if args.png:
        _plot(runs, args.png)
    if args.json:
        write_json(args.json, {"command": cmd, "runs": runs, "summary": summary})
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
