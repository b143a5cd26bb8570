"""Several targets side by side: one Markdown table per kind of result (mc, gen, judge), a column per target.

    hearth eval mc --model runs/sft --model model.Q4_K_M.gguf --url http://127.0.0.1:8000 --data ceval-sample
    hearth eval compare results/*.json           # results saved with --output, by any of the commands

A saved result is the JSON `--output` writes (one target) or {"targets": [...]} (several).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .common import TrainingDataError

MAX_RESULT_BYTES = 256 << 20


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def _num(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def result_rows(summary: dict[str, Any]) -> list[tuple[str, str]]:
    """(row, cell) pairs of one result summary, in the order the table shows them."""
    kind = summary.get("kind")
    if kind == "mc":
        rows = [("accuracy % (all questions)", _pct(summary["accuracy"])),
                ("macro accuracy % (mean of subjects)", _pct(summary["macro_accuracy"])),
                ("questions", str(summary["total"])), ("shots", str(summary["shots"])),
                ("scoring", summary.get("scoring", ""))]
        rows += [(f"category: {c}", _pct(v["accuracy"])) for c, v in summary.get("categories", {}).items()]
        rows += [(f"subject: {s}", _pct(v["accuracy"])) for s, v in summary["subjects"].items()]
        return rows
    if kind == "gen":
        return [("BLEU", _num(summary["bleu"])), ("ROUGE-1", _num(summary["rouge1"])),
                ("ROUGE-2", _num(summary["rouge2"])), ("ROUGE-L", _num(summary["rougeL"])),
                ("exact match %", _num(summary["exact_match"])), ("F1 %", _num(summary["f1"])),
                ("answered", str(summary["n"]))]
    if kind == "judge":
        rows = [("pairwise score (0.5 = reference)", _num(summary.get("score"))),
                ("rating (1-10)", _num(summary.get("rating"))), ("judged", str(summary["n"]))]
        for c, v in summary.get("categories", {}).items():
            rows.append((f"{c}: pairwise", _num(v["score"]) if summary.get("mode") != "score" else "-"))
            rows.append((f"{c}: rating", _num(v.get("rating"))))
        return rows
    raise ValueError(f"not a hearth eval result (kind {kind!r})")


def compare_markdown(summaries: list[dict[str, Any]]) -> str:
    """A Markdown table per kind and exam/data: rows are the metrics, columns the targets."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for s in summaries:
        groups.setdefault((s.get("kind", "?"), s.get("exam") or s.get("data") or ""), []).append(s)
    out = []
    for (kind, what), group in groups.items():
        cols = [s.get("target") or f"target {i + 1}" for i, s in enumerate(group)]
        cells = [dict(result_rows(s)) for s in group]
        order = list(dict.fromkeys(r for s in group for r, _ in result_rows(s)))
        out += [f"**{kind}**" + (f" ({what})" if what else ""), "",
                "| | " + " | ".join(c.replace("|", "\\|") for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
        out += ["| " + row + " | " + " | ".join(c.get(row, "") for c in cells) + " |" for row in order]
        out.append("")
    return "\n".join(out)


def load_summaries(paths: list[str]) -> list[dict[str, Any]]:
    """The result summaries in saved JSON files (one result, or {"targets": [...]})."""
    out = []
    for p in map(Path, paths):
        try:
            if p.stat().st_size > MAX_RESULT_BYTES:
                raise TrainingDataError(p, None, None, f"over {MAX_RESULT_BYTES >> 20} MiB")
            data = json.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise TrainingDataError(p, None, None, "no such file") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise TrainingDataError(p, None, None, f"not a JSON result ({e})") from None
        items = data.get("targets") if isinstance(data, dict) and "targets" in data else [data]
        for item in items:
            if not isinstance(item, dict) or item.get("kind") not in ("mc", "gen", "judge"):
                raise TrainingDataError(p, None, "kind", "not a result written by hearth eval --output")
            out.append(item)
    return out
