"""The one entry point to every reasoning strategy; the HTTP layer and the bench call only this.

    result = await run_strategy("self_consistency", model, "What is 17 * 23?",
                                options=StrategyOptions(n=5, answer_type="number"))
    result.answer, result.extra["votes"], result.extra["agreement"]
    result = await run_strategy("react", model, messages, tools=default_registry(),
                                budget=Budget(max_steps=6, time_s=60))

Strategies: plain (one call), cot (zero-shot, two stages), few_shot_cot (k similar worked examples),
self_consistency (n paths, majority vote), react (Thought/Action/Observation as text), plan_execute,
tot (Tree-of-Thought BFS), tools (the native tool-calling loop). Without a budget each strategy gets
one sized for its model calls (`default_budget`); with a trace, that trace's budget rules unless
`budget` is given too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .embed import Embedder, HashingEmbedder
from .model import ChatModel
from .reasoning.common import BudgetStop, Sampling, ask, split_task
from .reasoning.cot import DemoPool, few_shot_cot, self_consistency, zero_shot_cot
from .reasoning.extract import ANSWER_TYPES
from .reasoning.memory import PlanMemory
from .reasoning.plan import PLAN_EXECUTE_CALLS, plan_and_execute
from .reasoning.react import react
from .reasoning.tot import tot_model_calls, tree_of_thought
from .types import AgentInputError, AgentResult, Budget, Trace

# A model call that is never told to stop can ramble until the time budget ends the run with no step
# at all: every step gets this many tokens unless the caller says otherwise.
DEFAULT_STEP_MAX_TOKENS = 512

STRATEGIES = ("plain", "cot", "few_shot_cot", "self_consistency", "react", "plan_execute", "tot", "tools")

# demos are embedded once per embedder object: one shared fallback keeps that cache warm
_FALLBACK_EMBEDDER = HashingEmbedder()


def _check_int(name: str, value: Any, lo: int, hi: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise AgentInputError(f"{name} must be an integer from {lo} to {hi}, got {value!r}", name)


@dataclass
class StrategyOptions:
    """Knobs of the strategies; each uses those that concern it."""

    n: int = 5                          # self_consistency: sampled paths
    temperature: float | None = None    # every call (self_consistency: 0.7 when None)
    max_tokens: int | None = DEFAULT_STEP_MAX_TOKENS  # every call; None: up to the model's context
    seed: int | None = None             # every call (self_consistency's fallback calls: seed + i)
    answer_type: str = "auto"           # auto | number | choice | text: how the answer is extracted
    k_shots: int = 3                    # few_shot_cot (and self_consistency with an embedder): demos
    beam: int = 2                       # tot: states kept per depth
    branch: int = 3                     # tot: thoughts proposed per state
    depth: int = 3                      # tot: levels

    def __post_init__(self):
        _check_int("n", self.n, 1, 32)
        if self.temperature is not None and (not isinstance(self.temperature, (int, float))
                                             or isinstance(self.temperature, bool)
                                             or not 0 <= self.temperature <= 2):
            raise AgentInputError(f"temperature must be a number from 0 to 2, got {self.temperature!r}",
                                  "temperature")
        if self.max_tokens is not None:
            _check_int("max_tokens", self.max_tokens, 1, 1_000_000)
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            raise AgentInputError(f"seed must be an integer, got {self.seed!r}", "seed")
        if self.answer_type not in ANSWER_TYPES:
            raise AgentInputError(f"answer_type must be one of {', '.join(ANSWER_TYPES)}; got "
                                  f"{self.answer_type!r}", "answer_type")
        _check_int("k_shots", self.k_shots, 0, 16)
        _check_int("beam", self.beam, 1, 8)
        _check_int("branch", self.branch, 1, 8)
        _check_int("depth", self.depth, 1, 8)

    def sampling(self) -> Sampling:
        return Sampling(self.temperature, self.max_tokens, self.seed)


def default_budget(strategy: str, options: StrategyOptions) -> Budget:
    """A budget that lets `strategy` finish with these options: its model calls and a time limit."""
    o = options
    calls = {"plain": 1, "cot": 2, "few_shot_cot": 1, "self_consistency": o.n, "react": 8,
             "plan_execute": PLAN_EXECUTE_CALLS, "tools": 8,
             "tot": tot_model_calls(o.beam, o.branch, o.depth)}[strategy]
    return Budget(max_steps=calls, time_s=300.0 if strategy in ("plan_execute", "tot") else 120.0)


def _check_strategy(strategy: Any) -> str:
    if strategy not in STRATEGIES:
        raise AgentInputError(f"unknown strategy {strategy!r}; one of {', '.join(STRATEGIES)}", "strategy")
    return strategy


async def _plain(model: ChatModel, task: str | list[dict[str, Any]], trace: Trace,
                 sampling: Sampling) -> AgentResult:
    _, question = split_task(task)
    messages = task if isinstance(task, list) else [{"role": "user", "content": question}]
    try:
        text = await ask(model, trace, messages, sampling=sampling)
    except BudgetStop as stop:
        return trace.finish(None, stop.reason)
    return trace.finish(text or None)


async def run_strategy(strategy: str, model: ChatModel, task: str | list[dict[str, Any]], *,
                       tools: Any = None, budget: Budget | None = None, trace: Trace | None = None,
                       options: StrategyOptions | None = None, embedder: Embedder | None = None,
                       plan_memory: PlanMemory | None = None) -> AgentResult:
    """Run one strategy on `task` (a question, or chat messages whose last user message is the question).

    tools: a ToolRegistry for react, plan_execute and tools (react and tools use the default registry
    when None; plan_execute then runs each step as a plain model call). embedder: picks few-shot demos
    (few_shot_cot falls back to a HashingEmbedder; self_consistency uses demos only when given one).
    plan_memory: remembered plans for react and plan_execute. Bad input raises AgentInputError with
    `param`; a broken model endpoint raises AgentError.
    """
    _check_strategy(strategy)
    options = options or StrategyOptions()
    split_task(task)  # a bad task fails here, before any call
    if trace is None:
        trace = Trace(budget or default_budget(strategy, options))
    elif budget is not None:
        trace.budget = budget
    sampling = options.sampling()
    kind = options.answer_type

    if strategy == "plain":
        result = await _plain(model, task, trace, sampling)
    elif strategy == "cot":
        result = await zero_shot_cot(model, task, trace=trace, answer_type=kind, sampling=sampling)
    elif strategy == "few_shot_cot":
        pool = DemoPool.bundled(embedder or _FALLBACK_EMBEDDER)
        result = await few_shot_cot(model, task, pool=pool, k=options.k_shots, trace=trace, answer_type=kind,
                                    sampling=sampling)
    elif strategy == "self_consistency":
        pool = DemoPool.bundled(embedder) if embedder is not None and options.k_shots > 0 else None
        result = await self_consistency(model, task, n=options.n, trace=trace, answer_type=kind,
                                        sampling=sampling, pool=pool, k=options.k_shots)
    elif strategy == "react":
        result = await react(model, task, tools if tools is not None else _default_tools(), trace=trace,
                             sampling=sampling, memory=plan_memory, answer_type=kind)
    elif strategy == "plan_execute":
        result = await plan_and_execute(model, task, tools=tools, trace=trace, sampling=sampling,
                                        memory=plan_memory, answer_type=kind)
    elif strategy == "tot":
        result = await tree_of_thought(model, task, beam=options.beam, branch=options.branch, depth=options.depth,
                                       trace=trace, answer_type=kind, sampling=sampling)
    else:  # "tools"
        from .loop import run_tool_agent

        messages = task if isinstance(task, list) else [{"role": "user", "content": task}]
        kw = {k: v for k, v in sampling.kwargs().items() if v is not None}
        result = await run_tool_agent(model, messages, tools if tools is not None else _default_tools(),
                                      budget=trace.budget, trace=trace, sampling=kw or None)
    result.extra.setdefault("strategy", strategy)
    result.extra.setdefault("model_calls", trace.model_calls)
    return result


def _default_tools() -> Any:
    from .tools import default_registry

    return default_registry()
