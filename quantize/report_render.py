"""Markdown and PNG renderings of quality reports (hearth.quantize.report).

    from hearth.quantize.report import markdown_table, plot_reports
    print(markdown_table(reports))                 # one row per artifact, for bench/RESULTS.md
    plot_reports(reports, "bench/quantize.png")    # ppl increase, KL, top-1, size ratio side by side

Plots use matplotlib's object API on an Agg canvas (no pyplot state, no display needed).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from .common import atomic_output

if TYPE_CHECKING:
    from .report import Report


def _num(x: float | None, spec: str = ".3f") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "—"
    return format(x, spec)


def _pct(x: float | None, spec: str = ".1f") -> str:
    return "—" if x is None or not math.isfinite(x) else f"{100 * x:{spec}}%"


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def report_markdown(r: "Report") -> str:
    """One artifact's report page (report.md)."""
    inc = "—" if not math.isfinite(r.ppl_increase_pct) else f"{r.ppl_increase_pct:+.2f}%"
    exact_n = round(r.greedy_exact * r.n_prompts) if math.isfinite(r.greedy_exact) else 0
    lines = [
        f"# Quality report: {r.label}",
        "",
        f"- artifact: `{r.artifact}` ({r.artifact_format}{', ' + r.method if r.method else ''}; "
        f"run by hearth's {r.backend} backend)",
        f"- parent: `{r.parent}` ({r.parent_format}; run by hearth's {r.parent_backend} backend)",
        f"- measured {r.created} in {r.seconds:.0f} s{' (quick mode)' if r.quick else ''}",
        "",
        "| metric | artifact | parent |",
        "|---|---:|---:|",
        f"| size on disk | {_mb(r.size_bytes)} | {_mb(r.parent_size_bytes)} |",
        f"| size ratio | {_num(r.size_ratio)} | 1 |",
        f"| perplexity, English ({r.n_tokens_en} tokens) | {_num(r.ppl_en)} | {_num(r.ppl_parent_en)} |",
        f"| perplexity, Chinese ({r.n_tokens_zh} tokens) | {_num(r.ppl_zh)} | {_num(r.ppl_parent_zh)} |",
        f"| perplexity, both | {_num(r.ppl)} | {_num(r.ppl_parent)} |",
        f"| perplexity increase | {inc} | |",
        f"| mean KL(parent ‖ artifact), nats/token | {_num(r.kl_mean, '.5f')} | |",
        f"| KL English / Chinese | {_num(r.kl_en, '.5f')} / {_num(r.kl_zh, '.5f')} | |",
        f"| KL median / p99 / max | {_num(r.kl_p50, '.5f')} / {_num(r.kl_p99, '.5f')} / {_num(r.kl_max, '.4f')} | |",
        f"| top-1 token agreement | {_pct(r.top1_agreement)} | |",
        f"| greedy answers identical | {exact_n}/{r.n_prompts} ({_pct(r.greedy_exact, '.0f')}) | |",
        f"| greedy token-prefix agreement | {_pct(r.greedy_prefix)} | |",
        f"| decode tok/s (single stream, hearth Engine) | {_num(r.decode_tok_s, '.1f')} | "
        f"{_num(r.parent_decode_tok_s, '.1f')} |",
        "",
        f"Perplexity and KL: the built-in held-out texts tokenized once with the parent's tokenizer, "
        f"scored in {r.window}-token windows with stride {r.stride}; KL in float64 over the same token ids. "
        f"Greedy answers: {r.n_prompts} built-in chat prompts, {r.max_new_tokens} new tokens each, "
        f"compared up to the first end-of-turn token. Decode tok/s: one request at a time on this "
        f"machine, prefill excluded.",
    ]
    if r.notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in r.notes]
    lines += ["", f"Data hash: `{r.data_hash[:16]}`", ""]
    return "\n".join(lines)


def markdown_table(reports: Sequence["Report"]) -> str:
    """One row per artifact: size, perplexity and its increase, KL, agreements, decode speed."""
    head = ("| artifact | method | size | size ratio | ppl | ppl parent | Δppl | mean KL | top-1 | "
            "greedy identical | greedy prefix | decode tok/s |")
    rows = [head, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in reports:
        inc = "—" if not math.isfinite(r.ppl_increase_pct) else f"{r.ppl_increase_pct:+.2f}%"
        rows.append(
            f"| {r.label} | {r.method or r.artifact_format} | {_mb(r.size_bytes)} | {_num(r.size_ratio)} | "
            f"{_num(r.ppl)} | {_num(r.ppl_parent)} | {inc} | {_num(r.kl_mean, '.4f')} | "
            f"{_pct(r.top1_agreement)} | {_pct(r.greedy_exact, '.0f')} | {_pct(r.greedy_prefix)} | "
            f"{_num(r.decode_tok_s, '.1f')} |")
    return "\n".join(rows) + "\n"


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def _finite(x: float | None) -> float:
    return x if x is not None and math.isfinite(x) else 0.0


def plot_report(r: "Report", path: str | os.PathLike) -> None:
    """One artifact: perplexity vs parent, the per-token KL distribution, agreement rates."""
    fig = _figure(13, 4)
    ax1, ax2, ax3 = fig.subplots(1, 3)
    groups = ["English", "Chinese", "both"]
    x = np.arange(3)
    ax1.bar(x - 0.2, [_finite(v) for v in (r.ppl_parent_en, r.ppl_parent_zh, r.ppl_parent)], 0.4,
            label="parent", color="#8c8c8c")
    ax1.bar(x + 0.2, [_finite(v) for v in (r.ppl_en, r.ppl_zh, r.ppl)], 0.4, label="artifact", color="#d9822b")
    ax1.set_xticks(x, groups)
    ax1.set_ylabel("perplexity")
    ax1.set_title(f"perplexity ({r.ppl_increase_pct:+.2f}%)" if math.isfinite(r.ppl_increase_pct)
                  else "perplexity")
    ax1.legend()

    kl = r.kl_tokens
    if kl is not None and len(kl) and np.isfinite(kl).all():
        lo = max(float(kl[kl > 0].min()) if (kl > 0).any() else 1e-12, 1e-12)
        hi = max(float(kl.max()), lo * 10)
        ax2.hist(np.clip(kl, lo, None), bins=np.geomspace(lo, hi, 40), color="#2b7bd9")
        ax2.set_xscale("log")
        ax2.set_xlabel("KL(parent ‖ artifact) per token, nats")
        ax2.set_ylabel("tokens")
    else:  # a report read back from JSON has only the summary numbers
        names = ["median", "mean", "p99", "max"]
        ax2.bar(names, [_finite(v) for v in (r.kl_p50, r.kl_mean, r.kl_p99, r.kl_max)], color="#2b7bd9")
        ax2.set_ylabel("nats per token")
    ax2.set_title(f"KL divergence (mean {_num(r.kl_mean, '.4f')})")

    names = ["top-1", "greedy\nidentical", "greedy\nprefix"]
    vals = [_finite(v) for v in (r.top1_agreement, r.greedy_exact, r.greedy_prefix)]
    bars = ax3.bar(names, vals, color="#3c9d5d")
    ax3.bar_label(bars, labels=[f"{100 * v:.1f}%" for v in vals])
    ax3.set_ylim(0, 1.1)
    ax3.set_title("agreement with the parent")
    fig.suptitle(f"{r.label}: {r.size_bytes / 1e6:.1f} MB ({_num(r.size_ratio, '.2f')}x the parent)")
    fig.tight_layout()
    fig.savefig(path, format="png")


def plot_reports(reports: Sequence["Report"], png_path: str | os.PathLike) -> Path:
    """Several artifacts side by side: perplexity increase %, mean KL, top-1 agreement, size ratio."""
    if not reports:
        raise ValueError("plot_reports needs at least one report")
    fig = _figure(max(8.0, 1.4 * len(reports) + 4), 7.5)
    axes = fig.subplots(2, 2).ravel()
    labels = [r.label for r in reports]
    panels = [
        ("perplexity increase over parent (%)", [r.ppl_increase_pct for r in reports], "#d9822b", "{:+.2f}%"),
        ("mean KL(parent ‖ artifact), nats/token", [r.kl_mean for r in reports], "#2b7bd9", "{:.4f}"),
        ("top-1 token agreement", [r.top1_agreement for r in reports], "#3c9d5d", "{:.1%}"),
        ("size on disk / parent", [r.size_ratio for r in reports], "#8c6bb1", "{:.2f}"),
    ]
    for ax, (title, vals, color, fmt) in zip(axes, panels):
        vals = [_finite(v) for v in vals]
        bars = ax.bar(range(len(vals)), vals, color=color)
        ax.bar_label(bars, labels=[fmt.format(v) for v in vals], fontsize=8)
        ax.axhline(0, color="black", linewidth=0.6)
        ax.set_xticks(range(len(vals)), labels, rotation=20, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    out = Path(png_path)
    with atomic_output(out, is_file=True) as tmp:
        fig.savefig(tmp, format="png")
    return out
