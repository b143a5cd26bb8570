"""Targets and the printed report of bench/engine.py (kept apart so each file stays readable)."""

from __future__ import annotations

import statistics

MB = 1e6

# name -> (backend, section, ratio key, what is compared, goal, ">=" or "<=")
TARGETS = {
    "llamacpp_single_vs_raw": ("llamacpp", "single", "ratio",
                               "llama.cpp engine single-stream decode / raw llama-cpp-python", 0.95, ">="),
    "llamacpp_8_vs_1": ("llamacpp", "concurrency", "ratio_8_vs_1",
                        "llama.cpp engine 8-concurrent decode aggregate / its single stream", 1.8, ">="),
    "transformers_single_vs_hf": ("transformers", "single", "ratio",
                                  "transformers engine single-stream decode / HF generate", 1.0, ">="),
    "transformers_8_vs_hf_batch": ("transformers", "concurrency", "ratio_8_vs_hf_batch",
                                   "transformers engine 8-concurrent aggregate / HF padded batch", 1.0, ">="),
    "llamacpp_prefix_cached_vs_cold": ("llamacpp", "prefix", "ratio",
                                       "llama.cpp prefix-cached TTFT / cold TTFT", 0.3, "<="),
    "transformers_prefix_cached_vs_cold": ("transformers", "prefix", "ratio",
                                           "transformers prefix-cached TTFT / cold TTFT", 0.3, "<="),
}


def targets(results: dict) -> dict:
    out = {}
    for name, (backend, section, key, what, goal, op) in TARGETS.items():
        v = results["backends"].get(backend, {}).get(section, {}).get(key)
        if v is not None:
            ok = v >= goal if op == ">=" else v <= goal
            out[name] = {"what": what, "value": v, "target": goal, "op": op, "pass": ok}
    return out


def _mark(results: dict, name: str) -> str:
    t = results["targets"].get(name)
    if t is None:
        return ""
    return f"{t['op']}{t['target']:g} {'pass' if t['pass'] else 'MISS'}"


def _table(title: str, header: list[str], rows: list[list]) -> str:
    cells = [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(header)]
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths))
    out = [title, line, "-" * len(line)]
    out += ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in cells]
    return "\n".join(out)


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if v != v:
            return "nan"
        return f"{v:.0f}" if abs(v) >= 1000 else f"{v:.1f}" if abs(v) >= 10 else f"{v:.2f}" if abs(v) >= 1 \
            else f"{v:.3f}"
    return str(v)


def format_report(results: dict) -> str:
    b = results["backends"]
    names = {"llamacpp": "llama.cpp", "transformers": "transformers"}
    parts = []

    rows = []
    for key, mark in (("llamacpp", "llamacpp_single_vs_raw"), ("transformers", "transformers_single_vs_hf")):
        single = b.get(key, {}).get("single")
        if not single:
            continue
        rows.append([names[key], "hearth engine", single["engine"]["ttft_ms"], single["engine"]["decode_tok_s"],
                     single["ratio"], _mark(results, mark)])
        rows.append([names[key], single["baseline_name"], single["baseline"]["ttft_ms"],
                     single["baseline"]["decode_tok_s"], 1.0, ""])
        full = b.get(key, {}).get("single_full_cache")
        if full:  # not a target: how decode fares once the KV holds many finished prefixes
            rows.append([names[key], f"hearth engine, KV holding {full['kv_cached_prefixes']} cached prefixes "
                         f"({full['kv_used_cells']} cells)", full["engine"]["ttft_ms"],
                         full["engine"]["decode_tok_s"], full["ratio"], "(info)"])
            rows.append([names[key], "  raw llama-cpp-python, same prompts", full["baseline"]["ttft_ms"],
                         full["baseline"]["decode_tok_s"], 1.0, ""])
    parts.append(_table(f"1. Single-stream decode ({results['settings']['single_tokens']} tokens, greedy, "
                        f"{results['settings']['threads']} threads)",
                        ["backend", "path", "TTFT ms", "decode tok/s", "ratio", "target"], rows))

    rows = []
    for key in ("llamacpp", "transformers"):
        conc = b.get(key, {}).get("concurrency")
        if not conc:
            continue
        base = conc["levels"][0]["decode_agg_tok_s"]
        for r in conc["levels"]:
            mark = _mark(results, "llamacpp_8_vs_1") if key == "llamacpp" and r["concurrency"] == 8 else ""
            rows.append([names[key], f"engine x{r['concurrency']}", r["agg_tok_s"], r["decode_agg_tok_s"],
                         r["itl_p50_ms"], r["itl_p95_ms"], r["ttft_p50_ms"], r["decode_agg_tok_s"] / base, mark])
        if key == "llamacpp":
            pp = conc["prompt_rate"]
            top = conc["pp_fraction_top_level"]
            rows.append([names[key], f"raw prompt rate ({pp['tokens']} batch)", None, pp["tok_s"], None, None,
                         None, None, f"x{top} decode reaches {conc[f'pp_fraction_at_{top}']:.0%}"])
        else:
            hf, e8 = conc["hf_batch_8"], conc["engine_8_same_prompts"]
            rows.append([names[key], "HF padded batch x8", hf["agg_tok_s"], hf["decode_agg_tok_s"], None, None,
                         hf["ttft_ms"], None, ""])
            rows.append([names[key], "engine x8 (same prompts)", e8["agg_tok_s"], e8["decode_agg_tok_s"],
                         e8["itl_p50_ms"], e8["itl_p95_ms"], e8["ttft_p50_ms"], None,
                         f"{conc['ratio_8_vs_hf_batch']:.2f}x HF {_mark(results, 'transformers_8_vs_hf_batch')}"])
    parts.append(_table(f"2. Concurrency through the async API ({results['settings']['conc_tokens']} tokens "
                        f"per request, distinct prompts; agg = end to end, decode = while all decode)",
                        ["backend", "run", "agg tok/s", "decode tok/s", "ITL p50 ms", "ITL p95 ms", "TTFT p50 ms",
                         "decode vs x1", "target / note"], rows))

    rows = []
    for key in ("llamacpp", "transformers"):
        pre = b.get(key, {}).get("prefix")
        if not pre:
            continue
        rows.append([names[key], pre["prefix_tokens"], pre["cold_ttft_ms"], pre["first_seen_ttft_ms"],
                     pre["cached_ttft_ms"], int(statistics.median(float(x) for x in pre["cached_tokens"])), pre["ratio"],
                     _mark(results, f"{key}_prefix_cached_vs_cold")])
    parts.append(_table("3. TTFT with a shared system prompt (second request), prefix cache off vs on",
                        ["backend", "prefix tok", "cold ms (off)", "first-seen ms (on)", "cached ms (on)",
                         "cached tok", "cached/cold", "target"], rows))

    bw = results.get("bandwidth", {})
    rows = []
    for k, v in bw.items():
        if k.endswith("_gb_s") and k != "gb_s":
            rows.append([k.replace("_gb_s", "").replace("_", " "), f"{v:.1f} GB/s", None, None, None])
    for key, c in results.get("ceilings", {}).items():
        rows.append([f"{names[key]} ceiling", f"{c['weight_bytes'] / MB:.0f} MB/token", c["ceiling_tok_s"],
                     c.get("engine_fraction"), c.get("baseline_fraction")])
    parts.append(_table(f"4. Memory read bandwidth ({bw.get('array_mib', '?')} MiB sum, best of "
                        f"{bw.get('reps', '?')}) and the decode ceiling it implies",
                        ["measurement", "value", "ceiling tok/s", "engine share", "baseline share"], rows))

    lines = ["Targets:"]
    for name, t in results["targets"].items():
        lines.append(f"  [{'pass' if t['pass'] else 'MISS'}] {t['what']}: {t['value']:.3f} "
                     f"(target {t['op']} {t['target']:g})")
    for key, bres in b.items():
        for sec, err in bres.get("errors", {}).items():
            lines.append(f"  [FAILED] {names.get(key, key)} {sec}: {err}")
    parts.append("\n".join(lines))
    return "\n\n".join(parts)


# ----------------------------------------------------------------------------- entry points
