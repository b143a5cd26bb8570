"""The small shared types of the agents package: steps of a trace, budgets, results, errors.

    budget = Budget(max_steps=8, time_s=60)
    trace = Trace(budget)
    trace.add("thought", "I should use the calculator")
    result = trace.finish("42")                 # AgentResult(answer="42", steps=[...], stopped="answer")

Every strategy (tool loop, ReAct, plan-and-execute, Tree-of-Thought, CoT, self-consistency) records what
it does as Steps in a Trace, so the HTTP layer can stream them and tests can check them exactly.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from hearth.runtime.errors import HearthError, InvalidRequestError

STEP_KINDS = ("thought", "tool_call", "tool_result", "action", "observation", "plan", "sample", "vote",
              "score", "retrieval", "answer", "error")


class AgentError(HearthError):
    """An agent run failed for a reason other than bad input (the model endpoint broke, say)."""


class AgentInputError(InvalidRequestError):
    """A field of an agent request is wrong; `param` names it."""


@dataclass
class Step:
    """One thing an agent did. `kind` is one of STEP_KINDS; `data` holds the structured part
    (tool name and arguments, votes, scores ...); `t` is seconds since the run started."""

    index: int
    kind: str
    content: str = ""
    data: dict[str, Any] = field(default_factory=dict)
    t: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class AgentResult:
    """What a run produced. `stopped` says why it ended: "answer", "max_steps", "time_budget", "error"."""

    answer: str | None
    steps: list[Step]
    stopped: str
    usage: dict[str, int] = field(default_factory=lambda: {"prompt_tokens": 0, "completion_tokens": 0,
                                                            "total_tokens": 0})
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"answer": self.answer, "stopped": self.stopped, "usage": dict(self.usage),
                "steps": [s.to_dict() for s in self.steps], **({"extra": self.extra} if self.extra else {})}


@dataclass
class Budget:
    """Limits of one run: model calls (steps) and wall-clock seconds."""

    max_steps: int = 8
    time_s: float = 120.0

    def __post_init__(self):
        if not isinstance(self.max_steps, int) or isinstance(self.max_steps, bool) or self.max_steps < 1:
            raise AgentInputError(f"max_steps must be an integer >= 1, got {self.max_steps!r}", "max_steps")
        if not isinstance(self.time_s, (int, float)) or isinstance(self.time_s, bool) or self.time_s <= 0:
            raise AgentInputError(f"time budget must be a number of seconds > 0, got {self.time_s!r}",
                                  "time_budget_s")


class Trace:
    """Collects steps, counts model calls against a Budget, adds usage, and tells listeners of each step
    (the HTTP layer streams them). `on_step` callbacks must not raise."""

    def __init__(self, budget: Budget | None = None, on_step: Callable[[Step], None] | None = None):
        self.budget = budget or Budget()
        self.steps: list[Step] = []
        self.model_calls = 0
        self.usage = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
        self._t0 = time.monotonic()
        self._listeners: list[Callable[[Step], None]] = [on_step] if on_step else []

    def listen(self, fn: Callable[[Step], None]) -> None:
        self._listeners.append(fn)

    def elapsed(self) -> float:
        return time.monotonic() - self._t0

    def time_left(self) -> float:
        return self.budget.time_s - self.elapsed()

    def add(self, kind: str, content: str = "", **data: Any) -> Step:
        if kind not in STEP_KINDS:
            raise ValueError(f"unknown step kind {kind!r}; one of {', '.join(STEP_KINDS)}")
        step = Step(len(self.steps), kind, content, data, round(self.elapsed(), 4))
        self.steps.append(step)
        for fn in self._listeners:
            fn(step)
        return step

    def out_of_budget(self) -> str | None:
        """"max_steps" or "time_budget" when the next model call must not happen, else None."""
        if self.model_calls >= self.budget.max_steps:
            return "max_steps"
        if self.time_left() <= 0:
            return "time_budget"
        return None

    def count_call(self, usage: dict[str, int] | None = None) -> None:
        self.model_calls += 1
        for k in self.usage:
            self.usage[k] += int((usage or {}).get(k, 0))

    def finish(self, answer: str | None, stopped: str = "answer", **extra: Any) -> AgentResult:
        if answer is not None and stopped == "answer":
            self.add("answer", answer)
        return AgentResult(answer, list(self.steps), stopped, dict(self.usage), extra)
