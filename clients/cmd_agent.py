"""`hearth agent run`: one task through an agent strategy, its steps printed as they happen.

    hearth agent run "What is 1234 * 5678?" --strategy tools --tools calculator
    hearth agent run "Tom has 3 apples and buys 5 more ..." --strategy self_consistency --n 5
    hearth agent run "Who keeps the lighthouse?" --rag-index notes --strategy tools
    hearth agent run "..." --url http://127.0.0.1:8000/v1 --model smollm2-135m-instruct --api-key KEY

With --url the agent talks to that OpenAI-compatible server (hearth's own or any other); without it, hearth
starts its server in this process on 127.0.0.1 and an ephemeral port with the model of --model-path
(default: the bundled SmolLM2), and stops it afterwards. Strategies: plain, cot, few_shot_cot,
self_consistency, react, plan_execute, tot, tools.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

STRATEGIES = ("plain", "cot", "few_shot_cot", "self_consistency", "react", "plan_execute", "tot", "tools")


def add_parser(sub: argparse._SubParsersAction) -> None:
    agent = sub.add_parser("agent", help="run an agent strategy on one task", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = agent.add_subparsers(dest="agent_command", metavar="ACTION")
    actions.required = True
    run = actions.add_parser("run", help="run one task")
    run.add_argument("task", help="the question or task")
    run.add_argument("--strategy", choices=STRATEGIES, default="tools")
    run.add_argument("--tools", default=None,
                     help="comma-separated tool names (default: every built-in; 'none' for no tools)")
    run.add_argument("--sandbox", action="store_true", help="also offer the Python sandbox tool")
    run.add_argument("--rag-index", default=None, help="a local RAG index (hearth rag ingest) to search and cite")
    run.add_argument("--rag-root", default=None, help="where the RAG indexes live (default $HEARTH_HOME/rag)")
    run.add_argument("--url", default=None, help="an OpenAI-compatible server (.../v1); default: start one here")
    run.add_argument("--model", default=None,
                     help="with --url: the model name on that server; without: the model to serve here (a "
                          "registered name such as qwen2.5-coder-1.5b-instruct, a GGUF or an HF dir)")
    run.add_argument("--model-path", default=None, help="without --url: the model to serve (same as --model)")
    run.add_argument("--api-key", default=None)
    run.add_argument("--n", type=int, default=5, help="sampled paths for self_consistency")
    run.add_argument("--temperature", type=float, default=None)
    run.add_argument("--max-tokens", type=int, default=None,
                     help="tokens per model call (default 512: a step that is never told to stop can use up "
                          "the whole time budget)")
    run.add_argument("--seed", type=int, default=None)
    run.add_argument("--max-steps", type=int, default=8, help="model calls allowed")
    run.add_argument("--time-budget", type=float, default=300.0, help="seconds allowed")
    run.add_argument("--answer-type", choices=("auto", "number", "choice", "text"), default="auto")
    run.add_argument("--json", action="store_true", help="print the whole run (steps included) as JSON")
    run.add_argument("-q", "--quiet", action="store_true", help="do not print steps")
    run.set_defaults(func=run_agent)


def _print_step(step) -> None:
    text = step.content if len(step.content) < 400 else step.content[:400] + " …"
    data = f" {json.dumps(step.data, ensure_ascii=False)}" if step.data and step.kind != "answer" else ""
    print(f"  [{step.index}] {step.kind}: {text}{data}", file=sys.stderr, flush=True)


async def _run(args: argparse.Namespace, base_url: str, model_name: str) -> int:
    from hearth.agents.model import OpenAIChatModel
    from hearth.agents.strategies import DEFAULT_STEP_MAX_TOKENS, StrategyOptions, run_strategy
    from hearth.agents.tools import default_registry
    from hearth.agents.types import Budget, Trace

    index = None
    task: str | list[dict] = args.task
    cites: list[dict] = []
    if args.rag_index:
        from hearth.agents.embed import SentenceTransformerEmbedder
        from hearth.agents.rag import IndexStore, build_rag_messages, citations
        from hearth.runtime.registry import hearth_home

        store = IndexStore(args.rag_root or hearth_home() / "rag", SentenceTransformerEmbedder)
        index = store.get(args.rag_index)
        hits = index.query(args.task, top_k=4)
        task, cites = build_rag_messages([{"role": "user", "content": args.task}], hits), citations(hits)
    tools = None
    if args.tools != "none" and args.strategy in ("tools", "react", "plan_execute"):
        tools = default_registry(rag_index=index, sandbox=args.sandbox)
        if args.tools:
            tools = tools.subset([t.strip() for t in args.tools.split(",") if t.strip()])
    model = OpenAIChatModel(base_url, model_name, api_key=args.api_key, timeout_s=args.time_budget)
    trace = Trace(Budget(max_steps=args.max_steps, time_s=args.time_budget),
                  on_step=None if (args.quiet or args.json) else _print_step)
    opts = StrategyOptions(n=args.n, temperature=args.temperature, seed=args.seed,
                           max_tokens=DEFAULT_STEP_MAX_TOKENS if args.max_tokens is None else args.max_tokens,
                           answer_type=args.answer_type)
    try:
        result = await run_strategy(args.strategy, model, task, tools=tools, budget=trace.budget, trace=trace,
                                    options=opts)
    finally:
        await model.close()
    if args.json:
        out = result.to_dict()
        if cites:
            out["citations"] = cites
        print(json.dumps(out, ensure_ascii=False, indent=2))
    else:
        print(result.answer if result.answer is not None else f"(no answer: stopped at {result.stopped})")
        for c in cites:
            print(f"[{c['index']}] {c['source']} ({c['start']}-{c['end']})")
        if result.extra.get("votes"):
            print(f"votes {result.extra['votes']}, agreement {result.extra.get('agreement', 0):.2f}", file=sys.stderr)
    return 0 if result.stopped == "answer" else 1


def run_agent(args: argparse.Namespace) -> int:
    if args.sandbox:
        from hearth.agents.tools import sandbox_unavailable_reason

        reason = sandbox_unavailable_reason()
        if reason:  # before any model loads: the sandbox cannot be offered on this machine
            print(f"hearth: error: --sandbox: {reason}", file=sys.stderr)
            return 2
    if args.url:
        if not args.model:
            print("hearth: error: --model is required with --url", file=sys.stderr)
            return 2
        return asyncio.run(_run(args, args.url, args.model))
    from .local_serve import local_server

    if args.model and args.model_path and args.model != args.model_path:
        print("hearth: error: without --url, --model names the model to serve: give it or --model-path, "
              "not both", file=sys.stderr)
        return 2
    with local_server(args.model_path or args.model) as (base_url, name, key):
        args.api_key = key
        return asyncio.run(_run(args, base_url, name))
