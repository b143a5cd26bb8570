"""Agents on the bundled evaluation sets: word-problem accuracy per reasoning strategy, tool selection.

    hearth bench agents --json bench/agents.json   # default model in-process; ~20-30 min on 2 cores (estimate)
    hearth bench agents --limit 3 --strategies plain,tools       # a quick look
    hearth bench agents --model-path ./my-model.gguf --json out.json
    hearth bench agents --url http://127.0.0.1:8000/v1 --model smollm2-135m-instruct --api-key K
    python bench/agents.py --limit 2

Without --url, hearth's own server runs in this process (uvicorn on 127.0.0.1, an ephemeral port, a random
API key) on the default model, or on --model-path (a GGUF file or an HF checkpoint directory); on
llama.cpp it runs batch-invariant, so an answer does not depend on which other items share its batch.

Word problems (agents/data/arith_word_problems.jsonl, 30 en + 20 zh) are answered by each strategy
through `run_strategy`: plain (answer directly), cot (zero-shot chain of thought), self_consistency
(n sampled paths at temperature 0.7 with a fixed seed, majority vote) and tools (the tool loop with the
calculator). The number is taken from the answer with `extract_answer(text, "number")` and compared with
the gold answer (relative tolerance 1e-6). Tool selection (agents/data/tool_selection.jsonl, 18 en +
12 zh): one chat call per prompt, the bare prompt as the only message, offering calculator,
solve_equation, current_datetime and rag_search (over an empty index: no tool runs here; no plugins,
no opt-in python sandbox) with tool_choice "auto"; right when the first tool call names the expected
tool ("none": no call). Greedy decoding except for self-consistency. Accuracy is reported overall and
per language; the JSON holds every item's prediction, the answer text it came from and its tool calls.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import secrets
import shlex
import sys
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from hearth.clients.cmd_bench import output_problem, write_json

STRATEGIES = ("plain", "cot", "self_consistency", "tools")  # names run_strategy knows
# not a strategy of run_strategy: the tool loop with its first call forced to a tool (tool_choice "required",
# grammar-constrained), which shows what the calculator adds once the model is made to use it
FORCED = "tools_forced"
ALL_STRATEGIES = STRATEGIES + (FORCED,)
LANGS = ("en", "zh")
_T0 = time.perf_counter()


@dataclass
class Settings:
    """Sizes and sampling of one run."""

    strategies: tuple[str, ...] = STRATEGIES
    n: int = 5
    """Sampled paths of self-consistency."""
    limit: int | None = None
    """At most this many items of each set (the first ones of each language, alternating), None: all."""
    max_tokens: int = 256
    """Per model call of a word-problem strategy."""
    select_max_tokens: int = 96
    """Per tool-selection call: only the first tool call matters."""
    sc_temperature: float = 0.7
    seed: int = 1234
    concurrency: int = 4
    """Items in flight at once (the server batches them)."""
    item_timeout_s: float = 600.0
    """Wall-clock budget of one item, queueing behind the other items in flight included."""
    tool_selection: bool = True

    def __post_init__(self) -> None:
        bad = [s for s in self.strategies if s not in ALL_STRATEGIES]
        if bad:
            raise ValueError(f"unknown strategies {bad}; choose from {', '.join(ALL_STRATEGIES)}")
        if self.n < 1 or self.max_tokens < 8 or self.select_max_tokens < 8:
            raise ValueError("--n must be >= 1 and the max-token limits >= 8")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"--limit must be at least 1, got {self.limit}")
        if self.concurrency < 1:
            raise ValueError(f"--concurrency must be at least 1, got {self.concurrency}")


def _say(msg: str) -> None:
    print(f"[bench agents {time.perf_counter() - _T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def limited(items: Sequence, limit: int | None) -> list:
    """The first `limit` items, taken alternately from each language so a short run sees both."""
    if limit is None or limit >= len(items):
        return list(items)
    by_lang = {lang: [x for x in items if x.lang == lang] for lang in LANGS}
    out: list = []
    i = 0
    while len(out) < limit:
        for lang in LANGS:
            if i < len(by_lang[lang]) and len(out) < limit:
                out.append(by_lang[lang][i])
        i += 1
    return out


# ----------------------------------------------------------------------------- one item


async def solve(model, problem, strategy: str, s: Settings, calculator) -> dict[str, Any]:
    """One word problem with one strategy: its prediction, whether it is right, and what it cost."""
    from hearth.agents.evalsets import numbers_match
    from hearth.agents.reasoning import extract_answer
    from hearth.agents.strategies import StrategyOptions, default_budget, run_strategy
    from hearth.agents.types import Budget

    row: dict[str, Any] = {"id": problem.id, "lang": problem.lang, "strategy": strategy, "gold": problem.answer}
    sampled = strategy == "self_consistency"
    options = StrategyOptions(temperature=s.sc_temperature if sampled else 0.0, max_tokens=s.max_tokens,
                              seed=s.seed if sampled else None, n=s.n, answer_type="number")
    # the strategy's own number of model calls; more time, since items queue behind each other
    budget = Budget(max_steps=default_budget("tools" if strategy == FORCED else strategy, options).max_steps,
                    time_s=s.item_timeout_s)
    t = time.perf_counter()
    try:
        if strategy == FORCED:
            from hearth.agents.loop import run_tool_agent
            result = await run_tool_agent(model, [{"role": "user", "content": problem.question}], calculator,
                                          budget=budget, tool_choice="required",
                                          sampling={"temperature": 0.0, "max_tokens": s.max_tokens})
        else:
            result = await run_strategy(strategy, model, problem.question,
                                        tools=calculator if strategy == "tools" else None, budget=budget,
                                        options=options)
    except Exception as e:  # an item that breaks is recorded as wrong; the others still run
        row.update(prediction=None, correct=False, answer=None, stopped="error", error=f"{type(e).__name__}: {e}",
                   seconds=round(time.perf_counter() - t, 3), usage={}, tool_calls=[])
        return row
    pred = extract_answer(result.answer, "number") if result.answer else None
    results = {st.data.get("id"): st.content for st in result.steps if st.kind == "tool_result"}
    calls = [{"name": st.data.get("name"), "arguments": st.data.get("arguments"),
              "result": results.get(st.data.get("id"))} for st in result.steps if st.kind == "tool_call"]
    # the tool loop ends a run with stopped="error" (not an exception) when the endpoint fails
    error = result.extra.get("error") if result.stopped == "error" else None
    row.update(prediction=pred, correct=numbers_match(pred, problem.answer), answer=result.answer,
               stopped=result.stopped, error=error, seconds=round(time.perf_counter() - t, 3),
               usage=dict(result.usage), tool_calls=calls)
    for key in ("votes", "agreement", "model_calls", "raw_answer"):
        if key in result.extra:
            row[key] = result.extra[key]
    if "paths" in result.extra:  # self-consistency: each sampled path's extracted answer
        row["path_answers"] = [p.get("answer") for p in result.extra["paths"]]
    return row


async def select_tool(model, prompt, schemas: list[dict], s: Settings) -> dict[str, Any]:
    """One tool-selection prompt: the name of the model's first tool call ("none" when it makes none)."""
    row: dict[str, Any] = {"id": prompt.id, "lang": prompt.lang, "expected": prompt.expected_tool}
    t = time.perf_counter()
    try:
        replies = await model.chat([{"role": "user", "content": prompt.prompt}], tools=schemas, tool_choice="auto",
                                   temperature=0.0, max_tokens=s.select_max_tokens)
    except Exception as e:  # recorded as wrong, like a failed word problem
        row.update(predicted=None, correct=False, error=f"{type(e).__name__}: {e}", arguments=None, calls=[],
                   content=None, finish_reason=None, usage={}, seconds=round(time.perf_counter() - t, 3))
        return row
    reply = replies[0]
    first = reply.tool_calls[0] if reply.tool_calls else None
    predicted = first.name if first else "none"
    row.update(predicted=predicted, correct=predicted == prompt.expected_tool, error=None,
               arguments=first.arguments if first else None, calls=[c.name for c in reply.tool_calls],
               content=reply.content, finish_reason=reply.finish_reason, usage=dict(reply.usage),
               seconds=round(time.perf_counter() - t, 3))
    return row


# ----------------------------------------------------------------------------- the core


def accuracy(rows: list[dict]) -> dict[str, Any]:
    """{"correct", "total", "accuracy"} of rows (accuracy None for no rows)."""
    total = len(rows)
    correct = sum(1 for r in rows if r["correct"])
    return {"correct": correct, "total": total, "accuracy": correct / total if total else None}


def summarize_word_problems(rows: list[dict], strategies: Sequence[str]) -> dict[str, Any]:
    out = {}
    for strat in strategies:
        mine = [r for r in rows if r["strategy"] == strat]
        out[strat] = {"all": accuracy(mine), **{lang: accuracy([r for r in mine if r["lang"] == lang])
                                                 for lang in LANGS},
                      "errors": sum(1 for r in mine if r["error"]),
                      "no_answer": sum(1 for r in mine if r["prediction"] is None),
                      "completion_tokens": sum((r.get("usage") or {}).get("completion_tokens", 0) for r in mine)}
    return out


def summarize_tool_selection(rows: list[dict]) -> dict[str, Any]:
    from hearth.agents.evalsets import EXPECTED_TOOLS

    confusion: dict[str, dict[str, int]] = {}
    for r in rows:
        cell = confusion.setdefault(r["expected"], {})
        cell[str(r["predicted"])] = cell.get(str(r["predicted"]), 0) + 1
    return {"all": accuracy(rows), **{lang: accuracy([r for r in rows if r["lang"] == lang]) for lang in LANGS},
            "by_tool": {t: accuracy([r for r in rows if r["expected"] == t]) for t in EXPECTED_TOOLS
                        if any(r["expected"] == t for r in rows)},
            "confusion": confusion, "errors": sum(1 for r in rows if r["error"])}


class NoDocuments:
    """A retrieval index with nothing in it: rag_search needs one to be offered, and tool selection
    only reads the model's first call, so no tool ever runs against it."""

    def query(self, text: str, top_k: int) -> list:
        return []


async def _pool(jobs: list[Callable[[], Any]], concurrency: int, on_done: Callable[[], None]) -> list:
    """Run coroutine factories with at most `concurrency` in flight; results in job order."""
    sem = asyncio.Semaphore(concurrency)

    async def one(job):
        async with sem:
            res = await job()
        on_done()
        return res

    return list(await asyncio.gather(*(one(j) for j in jobs)))


async def evaluate(model, problems: Sequence, prompts: Sequence, s: Settings, *, calculator=None,
                   schemas: list[dict] | None = None, progress: Callable[[str], None] | None = None,
                   on_item: Callable[[], None] | None = None) -> dict[str, Any]:
    """Run every strategy on `problems` and tool selection on `prompts` against a ChatModel.

    calculator: the ToolRegistry the "tools" strategy gets (default: the built-in calculator);
    schemas: the tools offered for selection (default: calculator, solve_equation, current_datetime and
    rag_search, without plugins or the opt-in python sandbox). Returns
    {"word_problems": {"summary", "items", "wall_s"}, "tool_selection": {...}}; `on_item` is called
    as each item finishes (the progress bar)."""
    from hearth.agents.tools import default_registry

    say = progress or (lambda m: None)
    done = on_item or (lambda: None)
    if calculator is None and ("tools" in s.strategies or FORCED in s.strategies):
        calculator = default_registry(plugins=False).subset(["calculator"])
    out: dict[str, Any] = {"word_problems": {"items": [], "wall_s": {}}}
    for strat in s.strategies:
        t = time.perf_counter()
        rows = await _pool([lambda p=p, strat=strat: solve(model, p, strat, s, calculator) for p in problems], s.concurrency, done)
        out["word_problems"]["items"] += rows
        out["word_problems"]["wall_s"][strat] = round(time.perf_counter() - t, 2)
        acc = accuracy(rows)
        say(f"{strat}: {acc['correct']}/{acc['total']} right in {time.perf_counter() - t:.0f} s")
    out["word_problems"]["summary"] = summarize_word_problems(out["word_problems"]["items"], s.strategies)
    if s.tool_selection and prompts:
        if schemas is None:
            schemas = default_registry(rag_index=NoDocuments(), plugins=False).schemas()
        t = time.perf_counter()
        rows = await _pool([lambda p=p: select_tool(model, p, schemas, s) for p in prompts], s.concurrency, done)
        summary = summarize_tool_selection(rows)
        out["tool_selection"] = {"tools_offered": [sc["function"]["name"] for sc in schemas], "items": rows,
                                 "summary": summary, "wall_s": round(time.perf_counter() - t, 2)}
        say(f"tool selection: {summary['all']['correct']}/{summary['all']['total']} right")
    return out


# ----------------------------------------------------------------------------- report


def _cell(a: dict[str, Any]) -> str:
    return "–" if not a["total"] else f"{a['accuracy']:.0%} ({a['correct']}/{a['total']})"


def format_report(res: dict[str, Any]) -> str:
    """Markdown tables of the results."""
    meta = res.get("meta", {})
    lines = [f"Agents on {meta.get('model', '?')} ({meta.get('endpoint', '?')})", ""]
    wp = res.get("word_problems") or {}
    if wp.get("summary"):
        lines += ["Arithmetic word problems (accuracy of the extracted number)", "",
                  "| strategy | all | en | zh | no answer | errors | completion tokens | wall s |",
                  "|---|---|---|---|---|---|---|---|"]
        for strat, row in wp["summary"].items():
            lines.append(f"| {strat} | {_cell(row['all'])} | {_cell(row['en'])} | {_cell(row['zh'])} | "
                         f"{row['no_answer']} | {row['errors']} | {row['completion_tokens']} | "
                         f"{wp['wall_s'].get(strat, 0):.0f} |")
        lines.append("")
    ts = res.get("tool_selection")
    if ts:
        summ = ts["summary"]
        lines += ["Tool selection (first tool call names the expected tool; none = no call)", "",
                  "| expected | accuracy |", "|---|---|"]
        lines += [f"| {tool} | {_cell(a)} |" for tool, a in summ["by_tool"].items()]
        lines += [f"| **all** | {_cell(summ['all'])} |", f"| en | {_cell(summ['en'])} |",
                  f"| zh | {_cell(summ['zh'])} |", ""]
        wrong = Counter(f"{r['expected']} → {r['predicted']}" for r in ts["items"] if not r["correct"])
        if wrong:
            lines += ["Mistakes: " + ", ".join(f"{k} ×{v}" for k, v in wrong.most_common()), ""]
    if meta.get("command"):
        lines.append(f"Command: {meta['command']}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the server


class EndpointError(RuntimeError):
    """The model endpoint could not be started or reached."""


@contextmanager
def local_server(model_path: str | None, threads: int, timeout_s: float = 600.0) -> Iterator[dict[str, str]]:
    """hearth's app on uvicorn in this process, on 127.0.0.1 and a free port; yields url, model, api_key."""
    from hearth.runtime.checkpoint import inspect_checkpoint
    from hearth.runtime.errors import HearthError
    from hearth.runtime.registry import DEFAULT_MODEL, resolve_model
    from hearth.serve.config import ModelConfig, ServeConfig
    from hearth.serve.local import in_background

    source = model_path or DEFAULT_MODEL
    try:
        path = resolve_model(source, prefer="gguf")
        fmt = inspect_checkpoint(path).format
    except HearthError as e:
        raise EndpointError(f"cannot serve {source}: {e}") from e
    options: dict[str, Any] = {}
    context = None  # transformers: the model's own length
    if fmt == "gguf":
        options = {"n_threads": threads, "batch_invariant": True}
        # llama.cpp's KV cells are shared by every sequence in flight (capped at the trained context):
        # room for `concurrency` items of 5 sampled paths without preempting
        context = 8192
    name = DEFAULT_MODEL if model_path is None else (Path(model_path).stem or "model")
    key = "sk-bench-" + secrets.token_hex(8)
    config = ServeConfig(models=[ModelConfig(name=name, path=str(path), context_length=context,
                                             backend_options=options)],
                         embeddings=[], host="127.0.0.1", port=0, api_keys=[key], request_timeout_s=timeout_s,
                         drain_timeout_s=1)
    started = False
    try:
        with in_background(config, timeout_s=timeout_s) as srv:
            started = True
            yield {"url": srv.url + "/v1", "model": name, "api_key": key, "path": str(path)}
    except (HearthError, TimeoutError) as e:
        if started:  # raised by the bench itself, not by starting the server
            raise
        raise EndpointError(f"the server could not serve {source}: {e}") from e


def _first_model(url: str, api_key: str | None) -> str:
    """The first model an OpenAI-compatible endpoint lists (when --model is not given)."""
    import openai

    client = openai.OpenAI(base_url=url, api_key=api_key or "none", max_retries=0, timeout=30)
    try:
        models = [m.id for m in client.models.list()]
    except openai.APIError as e:
        raise EndpointError(f"cannot list the models of {url} ({type(e).__name__}: {e}); pass --model") from e
    finally:
        client.close()
    if not models:
        raise EndpointError(f"{url} lists no models; pass --model")
    return models[0]


# ----------------------------------------------------------------------------- entry points


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", metavar="PATH", default=None, help="write the results (every item) to this JSON file")
    p.add_argument("--url", default=None, help="an OpenAI-compatible base URL (…/v1); default: hearth's own "
                                               "server, started in this process")
    p.add_argument("--model", default=None, help="model name to send with --url (default: the first it lists)")
    p.add_argument("--api-key", default=None, help="API key for --url")
    p.add_argument("--model-path", default=None, help="without --url: serve this model (registered name, GGUF "
                                                      "file or HF checkpoint directory) instead of the default")
    p.add_argument("--threads", type=int, default=2, help="llama.cpp threads of the in-process server (default 2)")
    p.add_argument("--strategies", default=",".join(STRATEGIES),
                   help=f"comma-separated subset of {','.join(ALL_STRATEGIES)} (default {','.join(STRATEGIES)})")
    p.add_argument("--n", type=int, default=5, help="self-consistency paths (default 5)")
    p.add_argument("--limit", type=int, default=None, help="at most this many items per set (quick runs)")
    p.add_argument("--max-tokens", type=int, default=256, help="tokens per model call on word problems (default 256)")
    p.add_argument("--concurrency", type=int, default=4, help="items in flight at once (default 4)")
    p.add_argument("--seed", type=int, default=1234, help="sampling seed of self-consistency (default 1234)")
    p.add_argument("--no-tool-selection", action="store_true", help="skip the tool-selection set")
    p.add_argument("--word-problems", default=None, help="a JSONL file of word problems (default: the bundled set)")
    p.add_argument("--tool-prompts", default=None, help="a JSONL file of tool prompts (default: the bundled set)")


def settings_from(args: argparse.Namespace) -> Settings:
    strategies = tuple(x.strip() for x in args.strategies.split(",") if x.strip())
    return Settings(strategies=strategies, n=args.n, limit=args.limit, max_tokens=args.max_tokens,
                    concurrency=args.concurrency, seed=args.seed, tool_selection=not args.no_tool_selection)


def command_line(args: argparse.Namespace) -> str:
    """The command that repeats this run (the API key left out)."""
    parts = ["hearth", "bench", "agents"]
    defaults = {"threads": 2, "strategies": ",".join(STRATEGIES), "n": 5, "max_tokens": 256, "concurrency": 4,
                "seed": 1234}
    for key in ("url", "model", "model_path", "threads", "strategies", "n", "limit", "max_tokens", "concurrency",
                "seed", "word_problems", "tool_prompts", "json"):
        v = getattr(args, key, None)
        if v is not None and v != defaults.get(key):
            parts += ["--" + key.replace("_", "-"), str(v)]
    if args.no_tool_selection:
        parts.append("--no-tool-selection")
    return " ".join(shlex.quote(x) for x in parts)


def run(args: argparse.Namespace) -> int:
    from hearth.agents.evalsets import EvalSetError, load_tool_prompts, load_word_problems

    try:
        s = settings_from(args)
        problems = limited(load_word_problems(args.word_problems), s.limit)
        prompts = limited(load_tool_prompts(args.tool_prompts), s.limit) if s.tool_selection else []
    except (ValueError, EvalSetError) as e:
        print(f"bench agents: {e}", file=sys.stderr)
        return 2
    if args.url is None and args.model is not None:
        print("bench agents: --model names a model of --url; without --url use --model-path", file=sys.stderr)
        return 2
    problem = output_problem(args.json)
    if problem:
        print(f"bench agents: {problem}", file=sys.stderr)
        return 2
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    meta: dict[str, Any] = {"command": command_line(args), "argv": list(sys.argv), "settings": asdict(s),
                            "items": {"word_problems": len(problems), "tool_prompts": len(prompts)},
                            "python": platform.python_version(), "machine": platform.machine(),
                            "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                            else os.cpu_count(),
                            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    start = time.perf_counter()
    try:
        with _endpoint(args) as ep:
            meta.update(model=ep["model"], endpoint=ep["url"] if args.url else f"hearth in-process, {ep['path']}")
            _say(f"{meta['model']} at {ep['url']}: {len(problems)} word problems × {len(s.strategies)} "
                 f"strategies, {len(prompts)} tool prompts")
            res = asyncio.run(_run_all(ep, problems, prompts, s))
    except EndpointError as e:
        print(f"bench agents: {e}", file=sys.stderr)
        return 1
    meta["wall_s"] = round(time.perf_counter() - start, 1)
    results = {"meta": meta, **res}
    print(format_report(results))
    if args.json:
        write_json(args.json, results, _say)
    errors = [r for r in results["word_problems"]["items"] + (results.get("tool_selection") or {}).get("items", [])
              if r["error"]]
    for r in errors[:5]:
        _say(f"error on {r['id']} ({r.get('strategy', 'tool selection')}): {r['error']}")
    return 1 if errors else 0


@contextmanager
def _endpoint(args: argparse.Namespace) -> Iterator[dict[str, str]]:
    if args.url:
        yield {"url": args.url, "model": args.model or _first_model(args.url, args.api_key),
               "api_key": args.api_key or "none", "path": ""}
        return
    _say(f"starting hearth's server in this process on {args.model_path or 'the default model'}")
    with local_server(args.model_path, args.threads) as ep:
        _say(f"serving {ep['model']} at {ep['url']}")
        yield ep


async def _run_all(ep: dict[str, str], problems: list, prompts: list, s: Settings) -> dict[str, Any]:
    from hearth.agents.model import OpenAIChatModel
    from tqdm import tqdm

    model = OpenAIChatModel(ep["url"], ep["model"], api_key=ep["api_key"], timeout_s=s.item_timeout_s)
    total = len(problems) * len(s.strategies) + len(prompts)
    bar = tqdm(total=total, desc="bench agents", unit="item", file=sys.stderr, dynamic_ncols=True)
    try:
        return await evaluate(model, problems, prompts, s, progress=bar.write, on_item=lambda: bar.update(1))
    finally:
        bar.close()
        await model.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="hearth bench agents", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
