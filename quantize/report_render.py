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


PASS_COLOR, FAIL_COLOR, UNGATED_COLOR, GATE_COLOR = "#3c9d5d", "#d62728", "#d9822b", "#333333"


def gate_text(r: "Report") -> str:
    """"+≤10%: pass", "+≤10%: not checked (quick report)", or "—" without a gate."""
    if r.max_ppl_increase is None:
        return "—"
    return f"+≤{r.max_ppl_increase:g}%: {r.gate_result or 'not checked'}"


def _gate_color(r: "Report") -> str:
    return {"pass": PASS_COLOR, "fail": FAIL_COLOR}.get(r.gate_result, UNGATED_COLOR)


def report_markdown(r: "Report") -> str:
    """One artifact's report page (report.md)."""
    inc = "—" if not math.isfinite(r.ppl_increase_pct) else f"{r.ppl_increase_pct:+.2f}%"
    exact_n = round(r.greedy_exact * r.n_prompts) if math.isfinite(r.greedy_exact) else 0
    lines = [
        f"# Quality report: {r.label}",
        "",
        f"- artifact: `{r.artifact}` ({r.artifact_format}{', ' + r.method if r.method else ''}; "
        f"run by hearth's {r.backend} backend)",
        f"- parent: `{r.parent}` ({r.parent_format}; run by hearth's {r.parent_backend} backend"
        f"{'; ' + r.parent_origin if r.parent_origin else ''})",
        f"- measured {r.created} in {r.seconds:.0f} s{' (quick mode)' if r.quick else ''}",
        f"- quality gate (perplexity increase): {gate_text(r)}",
        "",
        "| metric | artifact | parent |",
        "|---|---:|---:|",
        f"| size on disk | {_mb(r.size_bytes)} | {_mb(r.parent_size_bytes)} |",
        f"| size vs the same weights in f16 / fp32 ({r.n_params:,} parameters) | "
        f"{_num(r.size_vs_f16, '.2f')}× / {_num(r.size_vs_fp32, '.2f')}× | "
        f"{_num(r.parent_size_bytes / (2 * r.n_params) if r.n_params else None, '.2f')}× / "
        f"{_num(r.parent_size_bytes / (4 * r.n_params) if r.n_params else None, '.2f')}× |",
        f"| size vs the parent | {_num(r.size_ratio)} | 1 |",
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
    head = ("| artifact | method | size | × f16 | × fp32 | × parent | ppl | ppl parent | Δppl | gate | mean KL | "
            "top-1 | greedy identical | greedy prefix | decode tok/s |")
    rows = [head, "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|"]
    for r in reports:
        inc = "—" if not math.isfinite(r.ppl_increase_pct) else f"{r.ppl_increase_pct:+.2f}%"
        rows.append(
            f"| {r.label} | {r.method or r.artifact_format} | {_mb(r.size_bytes)} | {_num(r.size_vs_f16, '.2f')} | "
            f"{_num(r.size_vs_fp32, '.2f')} | {_num(r.size_ratio, '.2f')} | "
            f"{_num(r.ppl)} | {_num(r.ppl_parent)} | {inc} | {gate_text(r)} | {_num(r.kl_mean, '.4f')} | "
            f"{_pct(r.top1_agreement)} | {_pct(r.greedy_exact, '.0f')} | {_pct(r.greedy_prefix)} | "
            f"{_num(r.decode_tok_s, '.1f')} |")
    notes = sorted({r.parent_origin for r in reports if r.parent_origin})
    tail = "".join(f"\nThe parent was {o}." for o in notes)
    return "\n".join(rows) + "\n" + (tail[1:] + "\n" if tail else "")


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
    ax1.bar(x + 0.2, [_finite(v) for v in (r.ppl_en, r.ppl_zh, r.ppl)], 0.4, label=f"artifact ({gate_text(r)})"
            if r.max_ppl_increase is not None else "artifact", color=_gate_color(r))
    if r.max_ppl_increase is not None and math.isfinite(r.ppl_parent):  # the most the gate allows, on "both"
        ax1.hlines(r.ppl_parent * (1 + r.max_ppl_increase / 100), 1.55, 2.45, colors=GATE_COLOR, linestyles="--",
                   linewidth=2, label=f"gate: parent +{r.max_ppl_increase:g}%")
    ax1.set_xticks(x, groups)
    ax1.set_ylabel("perplexity")
    ax1.set_title(f"perplexity ({r.ppl_increase_pct:+.2f}%)" if math.isfinite(r.ppl_increase_pct)
                  else "perplexity")
    ax1.legend(fontsize=8, loc="lower center")

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
    fig.suptitle(f"{r.label}: {r.size_bytes / 1e6:.1f} MB ({_num(r.size_vs_f16, '.2f')}x f16, "
                 f"{_num(r.size_ratio, '.2f')}x the parent)")
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
        ("top-1 token agreement", [r.top1_agreement for r in reports], "#4c9fb0", "{:.1%}"),
        ("size on disk / the same weights in f16", [r.size_vs_f16 for r in reports], "#8c6bb1", "{:.2f}"),
    ]
    for i, (ax, (title, vals, color, fmt)) in enumerate(zip(axes, panels)):
        vals = [_finite(v) for v in vals]
        colors = [_gate_color(r) for r in reports] if i == 0 else color  # pass green, fail red, no gate orange
        bars = ax.bar(range(len(vals)), vals, color=colors)
        ax.bar_label(bars, labels=[fmt.format(v) for v in vals], fontsize=8)
        ax.axhline(0, color="black", linewidth=0.6)
        ax.set_xticks(range(len(vals)), labels, rotation=20, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
    gated = [(k, r) for k, r in enumerate(reports) if r.max_ppl_increase is not None]
    for n, (k, r) in enumerate(gated):  # each artifact's own threshold, over its bar
        axes[0].hlines(r.max_ppl_increase, k - 0.45, k + 0.45, colors=GATE_COLOR, linestyles="--", linewidth=2,
                       label="gate (max increase)" if n == 0 else None)
    if gated:
        from matplotlib.patches import Patch
        handles = [Patch(color=PASS_COLOR, label="pass"), Patch(color=FAIL_COLOR, label="fail"),
                   Patch(color=UNGATED_COLOR, label="no gate / not checked")]
        axes[0].legend(handles=[*axes[0].get_legend_handles_labels()[0], *handles], fontsize=7)
    fig.tight_layout()
    out = Path(png_path)
    with atomic_output(out, is_file=True) as tmp:
        fig.savefig(tmp, format="png")
    return out
