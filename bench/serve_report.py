"""Comparisons, targets and the printed report of bench/serve.py; `markdown_table` and `llama_table`
are what bench/RESULTS.md shows.

    python bench/serve_report.py bench/serve.json          # print the Markdown table of a saved run
"""

from __future__ import annotations

import json
import statistics
import sys

LLAMA = "llama-server"  # the server phase of llama.cpp's own server, beside hearth's modes

# name -> (what is compared, key of the comparison row, goal, ">=" or "<="), checked at concurrency 1
TARGETS = {
    "single_stream_ratio": ("single-stream HTTP tok/s / in-process engine tok/s", "ratio", 0.9, ">="),
    "added_ttft_p50_ms": ("single-stream p50 TTFT added by HTTP (ms)", "added_ttft_p50_ms", 30.0, "<="),
}
# issue 16: concurrency -> least hearth tok/s / llama-server tok/s
VS_LLAMA_TARGETS = {1: 1.0, 8: 1.0, 32: 0.9}
# issue 16: tok/s at SCALING_LEVEL streams / tok/s at 1 stream, over HTTP
SCALING_LEVEL, SCALING_TARGET = 8, 1.8


def compare(results: dict) -> dict:
    """Per mode and level: ratios to the median engine phase, and to the engine phase just before."""
    phases = results["phases"]
    eng = [p for p in phases if p["kind"] == "engine"]
    by_level: dict[int, list[dict]] = {}
    for p in eng:
        for r in p["levels"]:
            by_level.setdefault(r["concurrency"], []).append(r)
    engine = {}
    for c, rows in by_level.items():
        tok = [r["tok_s"] for r in rows]
        ttft = [r["ttft_p50_ms"] for r in rows]
        engine[c] = {"tok_s": statistics.median(tok), "tok_s_min": min(tok), "tok_s_max": max(tok),
                     "ttft_p50_ms": statistics.median(ttft), "ttft_p50_min_ms": min(ttft),
                     "ttft_p50_max_ms": max(ttft),
                     "itl_p50_ms": statistics.median(r["itl_p50_ms"] for r in rows),
                     "itl_p95_ms": statistics.median(r["itl_p95_ms"] for r in rows),
                     "ttft_p95_ms": statistics.median(r["ttft_p95_ms"] for r in rows),
                     "itl_mean_ms": statistics.median(r["itl_mean_ms"] for r in rows),
                     "ttft_mean_ms": statistics.median(r["ttft_mean_ms"] for r in rows),
                     "errors": sum(r["errors"] for r in rows), "runs": len(rows),
                     "foreign_cpu_share_max": max(r["foreign_cpu_share"] for r in rows),
                     "process_cpu_ms_per_token": statistics.median(r["process_cpu_ms_per_token"] for r in rows)}
    modes: dict[str, dict] = {}
    last_engine = None
    for p in phases:
        if p["kind"] == "engine":
            last_engine = {r["concurrency"]: r for r in p["levels"]}
            continue
        for r in p["levels"]:
            c = r["concurrency"]
            e = engine.get(c)
            if e is None:
                continue
            prev = (last_engine or {}).get(c)
            modes.setdefault(p["mode"], {}).setdefault(c, []).append({
                "tok_s": r["tok_s"], "ratio": _ratio(r["tok_s"], e["tok_s"]),
                "ratio_min": _ratio(r["tok_s"], e["tok_s_max"]), "ratio_max": _ratio(r["tok_s"], e["tok_s_min"]),
                "ratio_prev_engine": _ratio(r["tok_s"], prev["tok_s"]) if prev else None,
                "added_ttft_p50_ms": r["ttft_p50_ms"] - e["ttft_p50_ms"],
                "added_ttft_p50_range_ms": [r["ttft_p50_ms"] - e["ttft_p50_max_ms"],
                                            r["ttft_p50_ms"] - e["ttft_p50_min_ms"]],
                "added_ttft_p50_prev_engine_ms": r["ttft_p50_ms"] - prev["ttft_p50_ms"] if prev else None,
                "added_itl_p50_ms": r["itl_p50_ms"] - e["itl_p50_ms"],
                "ttft_p50_ms": r["ttft_p50_ms"], "errors": r["errors"]})
    # one row per mode and level: the median over rounds
    out_modes = {}
    for mode, levels in modes.items():
        out_modes[mode] = {}
        for c, runs in levels.items():
            row = dict(runs[0]) if len(runs) == 1 else {
                k: statistics.median(x[k] for x in runs) for k in ("tok_s", "ratio", "added_ttft_p50_ms",
                                                                    "added_itl_p50_ms", "ttft_p50_ms")}
            if len(runs) > 1:  # the ranges span every round and every engine phase
                row["ratio_min"] = min(x["ratio_min"] for x in runs)
                row["ratio_max"] = max(x["ratio_max"] for x in runs)
                row["added_ttft_p50_range_ms"] = [min(x["added_ttft_p50_range_ms"][0] for x in runs),
                                                  max(x["added_ttft_p50_range_ms"][1] for x in runs)]
            row["runs"] = runs
            out_modes[mode][c] = row
    return {"engine": engine, "modes": out_modes, "vs_llama": _vs_llama(out_modes), "scaling": _scaling(out_modes)}


def _vs_llama(modes: dict[str, dict]) -> dict:
    """Per hearth mode and level: hearth tok/s / llama-server tok/s, of the medians over rounds, with the
    range of the ratios of each round's two phases."""
    llama = modes.get(LLAMA)
    if not llama:
        return {}
    out: dict[str, dict] = {}
    for mode, levels in modes.items():
        if mode == LLAMA:
            continue
        for c, row in levels.items():
            lrow = llama.get(c)
            if lrow is None:
                continue
            per_round = [_ratio(h["tok_s"], l["tok_s"]) for h, l in zip(row["runs"], lrow["runs"])]
            errors = sum(x["errors"] for x in row["runs"] + lrow["runs"])  # failed requests make no ratio
            out.setdefault(mode, {})[c] = {"tok_s": row["tok_s"], "llama_tok_s": lrow["tok_s"],
                                           "ratio": _ratio(row["tok_s"], lrow["tok_s"]) if not errors else float("nan"),
                                           "ratio_min": min(per_round), "ratio_max": max(per_round), "errors": errors}
    return out


def _scaling(modes: dict[str, dict]) -> dict:
    """Per mode (llama-server too): tok/s at SCALING_LEVEL streams / tok/s at one stream."""
    return {mode: _ratio(levels[SCALING_LEVEL]["tok_s"], levels[1]["tok_s"])
            for mode, levels in modes.items() if 1 in levels and SCALING_LEVEL in levels}


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def targets(results: dict) -> dict:
    out = {}

    def check(mode: str, name: str, what: str, v: float, goal: float, op: str) -> None:
        ok = v >= goal if op == ">=" else v <= goal
        out[f"{mode}:{name}"] = {"mode": mode, "what": what, "value": v, "target": goal, "op": op, "pass": ok}

    cmp = results.get("comparison", {})
    for mode, levels in cmp.get("modes", {}).items():
        row = levels.get(1)
        if row is None or mode == LLAMA:
            continue
        for name, (what, key, goal, op) in TARGETS.items():
            check(mode, name, what, row[key], goal, op)
    for mode, v in cmp.get("scaling", {}).items():
        if mode != LLAMA:
            check(mode, f"scaling_{SCALING_LEVEL}", f"HTTP tok/s at {SCALING_LEVEL} streams / at 1 stream", v,
                  SCALING_TARGET, ">=")
    for mode, levels in cmp.get("vs_llama", {}).items():
        for c, goal in VS_LLAMA_TARGETS.items():
            if c in levels:
                check(mode, f"vs_llama_server_{c}", f"hearth tok/s / llama-server tok/s at {c} streams",
                      levels[c]["ratio"], goal, ">=")
    return out


def _f(v, digits: int | None = None) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        if v != v:
            return "–"
        if digits is not None:
            return f"{v:.{digits}f}"
        return f"{v:.0f}" if abs(v) >= 100 else f"{v:.1f}" if abs(v) >= 10 else f"{v:.2f}"
    return str(v)


def _level_rows(results: dict) -> dict[tuple[str, int], dict]:
    """(mode, concurrency) -> the server's level row (the median round's when there are several)."""
    out: dict[tuple[str, int], list[dict]] = {}
    for p in results.get("phases", []):
        if p["kind"] == "server":
            for r in p["levels"]:
                out.setdefault((p["mode"], r["concurrency"]), []).append(r)
    return {k: sorted(v, key=lambda r: r["tok_s"])[len(v) // 2] for k, v in out.items()}


def markdown_table(results: dict) -> str:
    """One row per mode x concurrency (the in-process engine first), in Markdown. Ranges in brackets
    span the engine phases; "other procs CPU" is the share of the machine's CPUs that processes
    outside the benchmark used meanwhile (the engine: the largest over its phases)."""
    cmp = results.get("comparison", {})
    engine = cmp.get("engine", {})
    rows = _level_rows(results)
    head = ["mode", "conc", "requests", "tok/s", "× in-process", "TTFT p50 ms", "TTFT p95 ms",
            "added TTFT p50 ms", "ITL p50 ms", "ITL p95 ms", "errors", "client CPU ms/req", "server CPU ms/tok",
            "other procs CPU"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in sorted(engine, key=int):
        e = engine[c]
        spread = f" ({_f(e['tok_s_min'])}–{_f(e['tok_s_max'])})" if e["runs"] > 1 else ""
        tspread = f" ({_f(e['ttft_p50_min_ms'])}–{_f(e['ttft_p50_max_ms'])})" if e["runs"] > 1 else ""
        lines.append("| " + " | ".join([
            f"in-process engine (median of {e['runs']})", str(c), "", _f(e["tok_s"]) + spread, "1.00",
            _f(e["ttft_p50_ms"]) + tspread, _f(e["ttft_p95_ms"]), "0", _f(e["itl_p50_ms"]), _f(e["itl_p95_ms"]),
            str(e["errors"]), "–", "–", _share(e.get("foreign_cpu_share_max"))]) + " |")
    for mode, levels in cmp.get("modes", {}).items():
        for c in sorted(levels, key=int):
            m = levels[c]
            r = rows.get((mode, int(c)), {})
            ratio = _f(m["ratio"], 2)
            if "ratio_min" in m and m["ratio_min"] != m["ratio_max"]:
                ratio += f" ({_f(m['ratio_min'], 2)}–{_f(m['ratio_max'], 2)})"
            added = _f(m["added_ttft_p50_ms"])
            rng = m.get("added_ttft_p50_range_ms")
            if rng and rng[0] != rng[1]:
                added += f" ({_f(rng[0])}–{_f(rng[1])})"
            lines.append("| " + " | ".join([
                f"HTTP, {mode}", str(c), str(r.get("requests", "")), _f(m["tok_s"]), ratio,
                _f(r.get("ttft_p50_ms")), _f(r.get("ttft_p95_ms")), added, _f(r.get("itl_p50_ms")),
                _f(r.get("itl_p95_ms")), str(r.get("errors", "")), _f(r.get("process_cpu_ms_per_request")),
                _f(r.get("server_cpu_ms_per_token")), _share(r.get("foreign_cpu_share"))]) + " |")
    return "\n".join(lines)


def _share(v) -> str:
    return "–" if v is None else f"{v:.0%}"


def cpu_table(results: dict) -> str:
    """Server CPU per generated token, split by process (Ray: proxy, ingress, replica, ...)."""
    rows = _level_rows(results)
    seen = {k for r in rows.values() for k in r.get("server_cpu_s", {})}
    first = ["server", "proxy", "ingress", "replica"]  # the request path first, then Ray's own processes
    labels = [x for x in first if x in seen] + sorted(seen - set(first))
    if not labels:
        return ""
    head = ["mode", "conc"] + [f"{x} ms/tok" for x in labels] + ["server-side TTFT mean ms",
                                                                  "client TTFT mean ms",
                                                                  "server-side ITL mean ms", "client ITL mean ms"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (mode, c), r in sorted(rows.items()):
        cpu = r.get("server_cpu_s", {})
        per = [_f(cpu[x] / r["tokens"] * 1e3) if x in cpu and r["tokens"] else "–" for x in labels]
        ss = r.get("server_side", {})
        lines.append("| " + " | ".join([mode, str(c), *per, _f(ss.get("ttft_mean_ms")), _f(r["ttft_mean_ms"]),
                                        _f(ss.get("itl_mean_ms")), _f(r["itl_mean_ms"])]) + " |")
    return "\n".join(lines)


def llama_table(results: dict) -> str:
    """hearth against llama-server per mode and level: tok/s and its ratio (the range pairs each round's
    two phases), TTFT and ITL p50, server CPU per token; then the 8-vs-1-stream scaling of each server."""
    cmp = results.get("comparison", {})
    vs = cmp.get("vs_llama", {})
    if not vs:
        return ""
    rows = _level_rows(results)
    head = ["hearth mode", "conc", "hearth tok/s", "llama-server tok/s", "hearth ÷ llama-server",
            "TTFT p50 ms (hearth / llama-server)", "ITL p50 ms (hearth / llama-server)",
            "server CPU ms/tok (hearth / llama-server)", "target"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for mode, levels in vs.items():
        for c in sorted(levels, key=int):
            v = levels[c]
            h, l = rows.get((mode, int(c)), {}), rows.get((LLAMA, int(c)), {})
            ratio = _f(v["ratio"], 2)
            if v["ratio_min"] != v["ratio_max"] and not v.get("errors"):
                ratio += f" ({_f(v['ratio_min'], 2)}–{_f(v['ratio_max'], 2)})"
            goal = VS_LLAMA_TARGETS.get(int(c))
            verdict = "–" if goal is None else f"≥ {goal:g}: {'met' if v['ratio'] >= goal else 'MISSED'}"
            if v.get("errors"):
                verdict = f"{v['errors']} failed requests"
            lines.append("| " + " | ".join([
                mode, str(c), _f(v["tok_s"]), _f(v["llama_tok_s"]), ratio,
                *(f"{_f(h.get(k))} / {_f(l.get(k))}" for k in ("ttft_p50_ms", "itl_p50_ms", "server_cpu_ms_per_token")),
                verdict]) + " |")
    scaling = cmp.get("scaling", {})
    if scaling:
        lines.append("")
        lines.append(f"tok/s at {SCALING_LEVEL} streams / at 1 stream: " + ", ".join(
            f"{mode} {_f(v, 2)}×" for mode, v in scaling.items()) + f" (target for hearth ≥ {SCALING_TARGET:g}×)")
    return "\n".join(lines)


def format_report(results: dict) -> str:
    s = results.get("settings", {})
    parts = [f"HTTP streaming vs the in-process engine ({s.get('max_tokens')} tokens per request, temperature 0, "
             f"ignore_eos, {s.get('threads')} llama.cpp threads, context {s.get('context')})",
             markdown_table(results)]
    cpu = cpu_table(results)
    if cpu:
        parts += ["Server CPU per token by process, and the server's own latency metrics "
                  "(measured at the app: the ingress under Ray)", cpu]
    llama = llama_table(results)
    if llama:
        parts += ["hearth against llama.cpp's llama-server (same GGUF, client, prompts and levels)", llama]
    lines = ["Targets:"]
    note = results.get("meta", {}).get("llama_server", {}).get("note")
    if note:
        lines.insert(0, note)
    for t in results.get("targets", {}).values():
        lines.append(f"  [{'pass' if t['pass'] else 'MISS'}] {t['mode']}: {t['what']}: {t['value']:.3f} "
                     f"(target {t['op']} {t['target']:g})")
    for name, err in results.get("errors", {}).items():
        lines.append(f"  [FAILED] {name}: {err}")
    for p in results.get("phases", []):
        for r in p["levels"]:
            for msg in r.get("error_messages", []):
                lines.append(f"  [error] {p['name']} x{r['concurrency']}: {msg}")
    lines.append(f"Command: {results.get('meta', {}).get('command', '')}")
    parts.append("\n".join(lines))
    return "\n\n".join(parts)


def load_results(path: str) -> dict:
    """A run's JSON, its concurrency keys made integers again (JSON object keys are strings)."""
    with open(path) as f:
        res = json.load(f)
    cmp = res.get("comparison", {})
    cmp["engine"] = {int(k): v for k, v in cmp.get("engine", {}).items()}
    for key in ("modes", "vs_llama"):
        cmp[key] = {m: {int(k): v for k, v in lv.items()} for m, lv in cmp.get(key, {}).items()}
    return res


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    print(format_report(load_results(sys.argv[1])))
