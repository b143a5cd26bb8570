"""Reproducibility on the bundled default model (SmolLM2-135M-Instruct), on CPU: what it costs and
whether it holds (issue 16).

    hearth bench reproducibility --json bench/reproducibility.json   # both backends (~15 min)
    hearth bench reproducibility --backends llamacpp --quick          # smoke run

Per backend, each in one process, every variant loaded side by side and alternated (A B A B ...):

1. decode cost of `batch_invariant`: single-stream decode tok/s (first token to last, 128 greedy
   tokens, ignore_eos) and the process CPU time per token, per variant (VARIANTS); cold TTFT of a
   ~1000-token prompt (prefill cost);
2. temperature 0: 12 distinct chat prompts run alone, then all 12 at once: how many differ, off vs on;
3. the same seeded request (temperature 1) twice in a row on one engine with the prefix cache on (the
   default server's setting): how many of the pairs differ in tokens or logprobs;
4. scoring (prompt logprobs, max_tokens 0, lm-eval's loglikelihood) of 12 texts alone, then all 12
   at once, beside 4 generating streams: the largest logprob difference;
5. TTFT of a request whose ~1000-token system prompt an earlier request sent, prefix cache on vs off.

Prints one table per backend and writes every number to --json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ is a folder of scripts, not a package
import engine as engine_bench  # noqa: E402  (the engine benchmark's prompts and prefix measurement)

from hearth.clients.cmd_bench import output_problem, write_json  # noqa: E402

BACKENDS = ("llamacpp", "transformers")
VARIANTS = {"off": {"batch_invariant": False}, "on": {"batch_invariant": True},
            "on-f16": {"batch_invariant": True, "kv_type": "f16"}, "off-q8": {"batch_invariant": False, "kv_type": "q8_0"}}
"""Engine settings compared. off: f16 KV, any kernel; on (the llama.cpp default): q8_0 KV, so ggml's
per-row attention kernel always, and released KV kept in place while others run; on-f16: f16 KV with
lone tokens padded and ubatches under 64 rows; off-q8: q8_0 KV alone. "off" is the baseline (and the
only row where the backend has no switch)."""
QUESTIONS = ["What is the capital of France?", "Name three kinds of tea.", "Write one sentence about the sea.",
             "What is 2 + 2?", "Say hello in Chinese.", "Give me a word that rhymes with cat.",
             "What colour is the sky?", "Tell me a fun fact about cats.", "How do I boil an egg?",
             "Why is the sea salty?", "Describe a cup of tea.", "Count from one to five in French."]


def _say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _chat(engine, question: str, system: str | None = None) -> list[int]:
    from hearth.runtime import encode_chat

    msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
    return encode_chat(engine.tokenizer, msgs)


def _gather(engine, requests) -> list:
    """Run GenerationRequests at once through the async API; one list of outputs per request."""
    async def one(req):
        return [out async for out in engine.generate(req)]

    async def all_of():
        return await asyncio.gather(*(one(r) for r in requests))

    return asyncio.run(all_of())


def _request(ids, **params):
    from hearth.runtime import GenerationRequest, SamplingParams

    return GenerationRequest(prompt_token_ids=list(ids), params=SamplingParams(**params))


def _tokens(outs) -> list[int]:
    return [t for o in outs for t in o.token_ids]


def _logprobs(outs) -> list[float]:
    return [lp.logprob for o in outs for lp in (o.logprobs or [])]


# ---------------------------------------------------------------------------------------- sections
def decode_cost(engines: dict, tokens: int, reps: int, long_prompts: list[list[int]], prompt: list[int]) -> dict:
    """Single-stream decode and long-prompt TTFT per variant, alternated; medians and spread."""
    runs: dict[str, dict[str, list[float]]] = {k: {"tok_s": [], "cpu_ms_per_tok": [], "ttft_long_ms": []}
                                                 for k in engines}
    for rep in range(reps + 1):  # the first round warms every path up and is not counted
        for name, eng in engines.items():
            times: list[float] = []
            cpu0 = time.process_time()
            for out in eng.stream_sync(_request(prompt, max_tokens=tokens, temperature=0.0, ignore_eos=True)):
                times.extend([time.perf_counter()] * len(out.token_ids))
            cpu = time.process_time() - cpu0
            t0 = time.perf_counter()
            for _ in eng.stream_sync(_request(long_prompts[rep], max_tokens=1, temperature=0.0)):
                break
            ttft = time.perf_counter() - t0
            if rep:
                runs[name]["tok_s"].append((len(times) - 1) / (times[-1] - times[0]))
                runs[name]["cpu_ms_per_tok"].append(cpu / len(times) * 1e3)
                runs[name]["ttft_long_ms"].append(ttft * 1e3)
    out = {name: {k: {"median": statistics.median(v), "min": min(v), "max": max(v), "all": v}
                  for k, v in r.items()} for name, r in runs.items()}
    for name in engines:
        if name != "off":
            out[f"{name}_vs_off"] = {k: out[name][k]["median"] / out["off"][k]["median"] for k in runs["off"]}
    return out


def concurrent_vs_alone(engine, prompts: list[list[int]], tokens: int) -> dict:
    def req(ids):
        return _request(ids, max_tokens=tokens, temperature=0.0)

    alone = [_tokens(_gather(engine, [req(p)])[0]) for p in prompts]
    together = [_tokens(o) for o in _gather(engine, [req(p) for p in prompts])]
    return {"requests": len(prompts), "differ": sum(a != b for a, b in zip(alone, together))}


def seeded_repeats(engine, prompts: list[list[int]], tokens: int) -> dict:
    differ, cached = 0, []
    for k, ids in enumerate(prompts):
        runs = []
        for _ in range(2):
            outs = _gather(engine, [_request(ids, max_tokens=tokens, temperature=1.0, seed=1000 + k,
                                             logprobs=True)])[0]
            runs.append((_tokens(outs), _logprobs(outs)))
            cached.append(outs[-1].usage.cached_tokens)
        differ += runs[0] != runs[1]
    return {"pairs": len(prompts), "differ": differ, "cached_tokens": cached}


def scoring(engine, texts: list[list[int]], busy: list[list[int]]) -> dict:
    def score(ids):
        return _request(ids, max_tokens=0, prompt_logprobs=0)

    def lps(outs):
        return [lp.logprob for o in outs if o.prompt_logprobs for lp in o.prompt_logprobs if lp is not None]

    alone = [lps(_gather(engine, [score(t)])[0]) for t in texts]
    mixed = _gather(engine, [_request(b, max_tokens=24, temperature=0.0) for b in busy] + [score(t) for t in texts])
    together = [lps(o) for o in mixed[len(busy):]]
    diffs = [max((abs(a - b) for a, b in zip(x, y)), default=0.0) for x, y in zip(alone, together)]
    return {"requests": len(texts), "differ": sum(d > 0 for d in diffs), "max_abs_diff": max(diffs),
            "lengths_equal": all(len(x) == len(y) for x, y in zip(alone, together))}


def prefix_ttft(engine_on, make_off) -> dict:
    s = engine_bench.Settings(prefix_tokens=1000, prefix_reps=3)
    return engine_bench._prefix(engine_on, make_off, s)


# ---------------------------------------------------------------------------------------- backends
def make(backend: str, threads: int, **kw):
    from hearth.runtime import Engine
    from hearth.runtime.registry import DEFAULT_MODEL, resolve_model

    prefix_cache = kw.pop("prefix_cache", True)
    if backend == "llamacpp":
        path = str(resolve_model(DEFAULT_MODEL, prefer="gguf"))
        return Engine.from_model(path, backend="llamacpp", n_threads=threads, n_ctx=4096, n_seq_max=40,
                                 prefix_cache=prefix_cache, engine_kwargs={"prefix_cache": prefix_cache}, **kw)
    path = str(resolve_model(DEFAULT_MODEL, prefer="hf"))
    return Engine.from_model(path, backend="transformers", dtype="float32", device="cpu", num_threads=threads,
                             kv_cache_gb=0.5, prefix_cache=prefix_cache,
                             engine_kwargs={"prefix_cache": prefix_cache}, **kw)


def bench_backend(backend: str, args) -> dict:
    import inspect

    from hearth.runtime.backends import llamacpp, transformers

    cls = llamacpp.LlamaCppBackend if backend == "llamacpp" else transformers.TransformersBackend
    has_switch = "batch_invariant" in inspect.signature(cls.__init__).parameters
    res: dict = {"batch_invariant_offered": has_switch}
    if args.prefix_only:
        eng = make(backend, args.threads)
        try:
            res["prefix"] = prefix_ttft(eng, lambda: make(backend, args.threads, prefix_cache=False))
        finally:
            eng.shutdown()
        return res
    names = [v for v in args.variants.split(",") if has_switch or v == "off"]
    _say(f"{backend}: loading variants {', '.join(names)}")
    engines = {name: make(backend, args.threads, **(VARIANTS[name] if has_switch else {})) for name in names}
    try:
        tok = engines["off"].tokenizer
        prompt = tok.encode(engine_bench.story_prompt(0), add_special_tokens=True)
        # a new prompt each round, different from its first token: the prefix cache never helps
        long_prompts = [tok.encode(engine_bench.system_prompt(tok, 1000, variant=40 + r), add_special_tokens=True)
                        for r in range(args.reps + 1)]
        if has_switch:  # without a switch there is nothing to compare
            _say(f"{backend}: decode cost, {args.reps} alternating repetitions")
            res["decode"] = decode_cost(engines, args.tokens, args.reps, long_prompts, prompt)
        chats = [_chat(engines["off"], q) for q in QUESTIONS]
        for name, eng in engines.items():
            _say(f"{backend}: 12 concurrent vs alone at temperature 0, variant {name}")
            res[f"concurrent_{name}"] = concurrent_vs_alone(eng, chats, 32)
            _say(f"{backend}: scoring alone vs concurrent, variant {name}")
            texts = [tok.encode(engine_bench.story_prompt(20 + k) + " " + q, add_special_tokens=True)
                     for k, q in enumerate(QUESTIONS)]
            res[f"scoring_{name}"] = scoring(eng, texts, chats[:4])
        system = engine_bench.system_prompt(tok, 300, variant=3)
        repeats = [_chat(engines["off"], q, system if k % 2 else None) for k, q in enumerate(QUESTIONS[:6])]
        for name, eng in engines.items():
            _say(f"{backend}: seeded repeats with the prefix cache on, variant {name}")
            res[f"repeat_{name}"] = seeded_repeats(eng, repeats, 32)
        _say(f"{backend}: prefix-cache TTFT (the backend's defaults)")
        for e in engines.values():
            e.shutdown()
        engines = {"default": make(backend, args.threads)}
        res["prefix"] = prefix_ttft(engines["default"], lambda: make(backend, args.threads, prefix_cache=False))
    finally:
        for e in engines.values():
            e.shutdown()
    return res


def report(results: dict) -> str:
    lines = []
    for backend, r in results["backends"].items():
        d = r.get("decode", {})
        lines.append(f"\n{backend} (batch_invariant offered: {r.get('batch_invariant_offered')})")
        lines.append("| variant | decode tok/s (min-max) | CPU ms/token | TTFT ~1000-token prompt ms "
                     "| 12 concurrent vs alone, differ | scoring concurrent vs alone, max abs diff "
                     "| seeded repeat pairs differ |")
        lines.append("|---|---|---|---|---|---|---|")
        for name in VARIANTS:
            if f"concurrent_{name}" not in r:
                continue
            x = d.get(name)
            c, s, p = r.get(f"concurrent_{name}", {}), r.get(f"scoring_{name}", {}), r.get(f"repeat_{name}", {})
            cost = (f"{x['tok_s']['median']:.1f} ({x['tok_s']['min']:.1f}-{x['tok_s']['max']:.1f}) "
                    f"| {x['cpu_ms_per_tok']['median']:.1f} | {x['ttft_long_ms']['median']:.0f}") if x else "– | – | –"
            lines.append(f"| {name} | {cost} "
                         f"| {c.get('differ')} of {c.get('requests')} | {s.get('max_abs_diff', float('nan')):.2g} "
                         f"({s.get('differ')} of {s.get('requests')} differ) | {p.get('differ')} of {p.get('pairs')} |")
        for name in VARIANTS:
            if f"{name}_vs_off" in d:
                lines.append(f"{name} / off: " + ", ".join(f"{k} {v:.3f}" for k, v in d[f"{name}_vs_off"].items()))
        if "prefix" in r:
            p = r["prefix"]
            lines.append(f"prefix cache: {p['prefix_tokens']}-token shared system prompt, cold {p['cold_ttft_ms']:.0f} ms, "
                         f"cached {p['cached_ttft_ms']:.0f} ms, cached / cold {p['ratio']:.3f}")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", metavar="PATH", default=None, help="write every number to this JSON file")
    p.add_argument("--threads", type=int, default=2, help="CPU threads for every engine (default 2)")
    p.add_argument("--backends", default=",".join(BACKENDS), help="comma-separated subset of llamacpp,transformers")
    p.add_argument("--reps", type=int, default=5, help="alternating repetitions of the decode measurement")
    p.add_argument("--tokens", type=int, default=128, help="tokens per single-stream decode run")
    p.add_argument("--quick", action="store_true", help="2 repetitions of 32 tokens")
    p.add_argument("--prefix-only", action="store_true", help="only section 5, on the backend's defaults")
    p.add_argument("--variants", default="off,on", help=f"comma-separated subset of {','.join(VARIANTS)} "
                   "(the first must be off; llama.cpp only beyond off)")


def run(args: argparse.Namespace) -> int:
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    if not backends or any(b not in BACKENDS for b in backends):
        print(f"bench reproducibility: --backends takes a comma-separated subset of {','.join(BACKENDS)}",
              file=sys.stderr)
        return 2
    if args.threads < 1 or args.reps < 1 or args.tokens < 1:
        print("bench reproducibility: --threads, --reps and --tokens must be >= 1", file=sys.stderr)
        return 2
    problem = output_problem(args.json)
    if problem:
        print(f"bench reproducibility: {problem}", file=sys.stderr)
        return 2
    if args.quick:
        args.reps, args.tokens = 2, 32
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    results = {"meta": {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "threads": args.threads,
                        "reps": args.reps, "tokens": args.tokens, "loadavg_start": list(os.getloadavg())},
               "backends": {}}
    start = time.perf_counter()
    for b in backends:
        results["backends"][b] = bench_backend(b, args)
    results["meta"]["wall_s"] = time.perf_counter() - start
    results["meta"]["loadavg_end"] = list(os.getloadavg())
    print(report(results))
    if args.json:
        write_json(args.json, results)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
