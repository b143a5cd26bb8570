"""What every reasoning strategy shares: reading the task, sampling settings, and one budgeted model call.

    history, question = split_task([{"role": "system", "content": "Be brief."},
                                    {"role": "user", "content": "What is 6*7?"}])
    replies = await call_model(model, trace, history + [{"role": "user", "content": question}],
                               sampling=Sampling(temperature=0.7), n=5)

`call_model` checks the Trace's budget before the call (raising BudgetStop with "max_steps" or
"time_budget"), bounds the call by the time left, and counts it (and its token usage) on the trace.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass
from typing import Any, Sequence

from ..model import ChatModel, ChatReply
from ..types import AgentInputError, Trace

class BudgetStop(Exception):
    """The run's budget is spent; `reason` is "max_steps" or "time_budget" (AgentResult.stopped)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Sampling:
    """Sampling settings passed to every model call of a strategy (None: the server's default)."""

    temperature: float | None = None
    max_tokens: int | None = None
    seed: int | None = None

    def kwargs(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "max_tokens": self.max_tokens, "seed": self.seed}


TEXT_PARTS = ("text", "input_text")


def message_text(content: Any, sep: str = "\n") -> str:
    """The text of a message content: a string, or the text parts of an OpenAI content list joined by
    `sep` (other parts are skipped; serve refuses them with a 400 before this runs)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return sep.join(str(p.get("text", "")) for p in content if isinstance(p, dict) and p.get("type") in TEXT_PARTS)
    return str(content)


def split_task(task: str | list[dict[str, Any]]) -> tuple[list[dict[str, Any]], str]:
    """(history, question): the question is the task text or the last user message; history is every
    message before that one (system prompt, earlier turns), which strategies keep in front of their prompts."""
    if isinstance(task, str):
        if not task.strip():
            raise AgentInputError("the task is empty", "task")
        return [], task.strip()
    if not isinstance(task, list) or not task:
        raise AgentInputError("the task must be a non-empty string or a non-empty list of chat messages",
                              "messages")
    for i, m in enumerate(task):
        if not isinstance(m, dict) or "role" not in m:
            raise AgentInputError(f"message {i} is not a chat message with a 'role'", "messages")
    last_user = max((i for i, m in enumerate(task) if m["role"] == "user"), default=None)
    if last_user is None:
        raise AgentInputError("the messages hold no user message to answer", "messages")
    question = message_text(task[last_user].get("content")).strip()
    if not question:
        raise AgentInputError(f"the last user message (message {last_user}) has no text", "messages")
    return [dict(m) for m in task[:last_user]], question


def user(content: str) -> dict[str, Any]:
    return {"role": "user", "content": content}


def assistant(content: str) -> dict[str, Any]:
    return {"role": "assistant", "content": content}


def system(content: str) -> dict[str, Any]:
    return {"role": "system", "content": content}


def with_system(history: list[dict[str, Any]], instructions: str) -> list[dict[str, Any]]:
    """`history` with `instructions` added to its system message (or a new one in front): some chat
    templates accept only one system message, first."""
    if history and history[0].get("role") == "system":
        first = dict(history[0])
        first["content"] = f"{message_text(first.get('content')).rstrip()}\n\n{instructions}"
        return [first, *history[1:]]
    return [system(instructions), *history]


async def call_model(model: ChatModel, trace: Trace, messages: list[dict[str, Any]], *,
                     sampling: Sampling | None = None, n: int = 1, stop: Sequence[str] | None = None,
                     temperature: float | None = None) -> list[ChatReply]:
    """One budgeted chat call. `temperature` overrides the sampling's for this call only."""
    reason = trace.out_of_budget()
    if reason:
        raise BudgetStop(reason)
    kw = (sampling or Sampling()).kwargs()
    if temperature is not None:
        kw["temperature"] = temperature
    try:
        replies = await asyncio.wait_for(model.chat(messages, n=n, stop=list(stop) if stop else None, **kw),
                                         timeout=max(trace.time_left(), 1e-3))
    except asyncio.TimeoutError:
        trace.count_call()
        trace.add("error", f"the time budget ({trace.budget.time_s:g} s) ran out during model call "
                           f"{trace.model_calls}; set max_tokens or a larger time budget")
        raise BudgetStop("time_budget") from None
    usage: dict[str, int] = {}
    for r in replies:
        for k, v in (r.usage or {}).items():
            usage[k] = usage.get(k, 0) + int(v or 0)
    trace.count_call(usage)
    return replies


async def ask(model: ChatModel, trace: Trace, messages: list[dict[str, Any]], *,
              sampling: Sampling | None = None, stop: Sequence[str] | None = None,
              temperature: float | None = None) -> str:
    """The text of a single-choice call ("" when the model sent no content)."""
    replies = await call_model(model, trace, messages, sampling=sampling, stop=stop, temperature=temperature)
    return (replies[0].content or "").strip()


_ITEM = re.compile(r"^\s*(?:[*_#]+\s*)?(?:step\s*)?(\d+)\s*[.):：、]\s*(?:[*_]+\s*)?(.+)$", re.IGNORECASE)
_CN_ITEM = re.compile(r"^\s*第\s*[一二三四五六七八九十\d]+\s*步\s*[.:：、,，]?\s*(.+)$")
_BULLET = re.compile(r"^\s*[-*•]\s+(.+)$")


def numbered_items(text: str) -> list[str]:
    """The items of a numbered list ("1. …", "Step 2: …", "3) …", "第一步：…"), else of a bulleted one;
    [] when the text holds neither. Markdown bold around items is dropped."""
    lines = (text or "").splitlines()
    for pattern, group in ((_ITEM, 2), (_CN_ITEM, 1), (_BULLET, 1)):
        items = [m.group(group).strip().strip("*_").strip() for m in map(pattern.match, lines) if m]
        items = [i for i in items if i]
        if items:
            return items
    return []
