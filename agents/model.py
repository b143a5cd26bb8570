"""The model interface every agent talks to: OpenAI chat completions, nothing more.

    model = OpenAIChatModel("http://127.0.0.1:8000/v1", model="smollm2-135m-instruct", api_key="k")
    replies = await model.chat([{"role": "user", "content": "2+2?"}], tools=registry.schemas())
    replies[0].content, replies[0].tool_calls

    scripted = ScriptedChatModel(["first reply", ChatReply(tool_calls=[ToolCall("c1", "calculator",
                                                                                 '{"expression": "2+2"}')])])

Agents import no engine: they run against hearth's server, any OpenAI-compatible server, or (inside
hearth's server) an adapter over the served model that serve/ provides. ScriptedChatModel replays a
script so every loop can be checked exactly in tests.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

from .types import AgentError


@dataclass
class ToolCall:
    """One function call the model asked for; `arguments` is the JSON string, as on the wire."""

    id: str
    name: str
    arguments: str = "{}"

    def to_message(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class ChatReply:
    """One choice of a chat completion."""

    content: str | None = None
    tool_calls: list[ToolCall] = field(default_factory=list)
    finish_reason: str = "stop"
    usage: dict[str, int] = field(default_factory=dict)

    def to_message(self) -> dict[str, Any]:
        """The assistant message to append to the conversation."""
        msg: dict[str, Any] = {"role": "assistant", "content": self.content}
        if self.tool_calls:
            msg["tool_calls"] = [tc.to_message() for tc in self.tool_calls]
        return msg


class ChatModel(Protocol):
    """Anything that answers chat completions. Returns one ChatReply per choice (`n`)."""

    async def chat(self, messages: list[dict[str, Any]], *, tools: list[dict[str, Any]] | None = None,
                   tool_choice: Any = None, temperature: float | None = None, top_p: float | None = None,
                   max_tokens: int | None = None, n: int = 1, seed: int | None = None,
                   stop: Sequence[str] | None = None,
                   response_format: dict[str, Any] | None = None) -> list[ChatReply]: ...


def request_fields(**fields: Any) -> dict[str, Any]:
    """The optional chat-completions fields that were given (None means "server default"), as sent."""
    out = {k: v for k, v in fields.items() if v is not None}
    if "stop" in out:
        out["stop"] = list(out["stop"]) or None
        if out["stop"] is None:
            del out["stop"]
    return out


def _usage_dict(u: Any) -> dict[str, int]:
    if u is None:
        return {}
    get = u.get if isinstance(u, dict) else (lambda k, d=0: getattr(u, k, d))
    return {k: int(get(k, 0) or 0) for k in ("prompt_tokens", "completion_tokens", "total_tokens")}


def replies_from_response(resp: Any) -> list[ChatReply]:
    """ChatReplies from an OpenAI chat.completion (the client's object or its JSON dict)."""
    data = resp if isinstance(resp, dict) else resp.model_dump()
    usage = _usage_dict(data.get("usage"))
    out = []
    for i, choice in enumerate(sorted(data.get("choices") or [], key=lambda c: c.get("index", 0))):
        msg = choice.get("message") or {}
        calls = [ToolCall(tc.get("id") or f"call_{i}_{j}", (tc.get("function") or {}).get("name", ""),
                          (tc.get("function") or {}).get("arguments") or "{}")
                 for j, tc in enumerate(msg.get("tool_calls") or [])]
        # usage belongs to the whole response: count it once, on the first choice
        out.append(ChatReply(msg.get("content"), calls, choice.get("finish_reason") or "stop",
                             usage if i == 0 else {}))
    if not out:
        raise AgentError("the model's response has no choices")
    return out


class OpenAIChatModel:
    """A ChatModel over any OpenAI-compatible endpoint (hearth's own server included), through the
    official `openai` client. Connection and HTTP errors become AgentError naming the endpoint."""

    def __init__(self, base_url: str, model: str, api_key: str | None = None, timeout_s: float = 120.0,
                 max_retries: int = 0, extra_body: dict[str, Any] | None = None):
        from openai import AsyncOpenAI

        self.base_url, self.model = base_url, model
        self.extra_body = extra_body or {}
        self._client = AsyncOpenAI(base_url=base_url, api_key=api_key or "none", timeout=timeout_s,
                                   max_retries=max_retries)

    async def chat(self, messages, *, tools=None, tool_choice=None, temperature=None, top_p=None,
                   max_tokens=None, n=1, seed=None, stop=None, response_format=None) -> list[ChatReply]:
        import openai

        kw: dict[str, Any] = {"model": self.model, "messages": messages, "n": n,
                              **request_fields(tools=tools, tool_choice=tool_choice, temperature=temperature,
                                               top_p=top_p, max_tokens=max_tokens, seed=seed, stop=stop,
                                               response_format=response_format)}
        if self.extra_body:
            kw["extra_body"] = self.extra_body
        try:
            resp = await self._client.chat.completions.create(**kw)
        except openai.APIStatusError as e:
            raise AgentError(f"the model endpoint {self.base_url} answered {e.status_code}: {e.message}") from e
        except openai.APIError as e:
            raise AgentError(f"the model endpoint {self.base_url} failed: {e}") from e
        return replies_from_response(resp)

    async def close(self) -> None:
        await self._client.close()


Script = Sequence["str | ChatReply | Callable[[list[dict], dict], str | ChatReply]"]


class ScriptedChatModel:
    """Replays replies in order, one per call (or per choice when n > 1), and records every call.

    An item is a string (the content), a ChatReply, or a callable(messages, kwargs) returning either.
    Running past the end of the script raises AgentError, so a loop that calls the model more often
    than expected fails loudly.
    """

    def __init__(self, script: Script, delay_s: float = 0.0):
        self.script = list(script)
        self.calls: list[dict[str, Any]] = []
        self.delay_s = delay_s
        self._next = 0

    @property
    def remaining(self) -> int:
        return len(self.script) - self._next

    async def chat(self, messages, *, tools=None, tool_choice=None, temperature=None, top_p=None,
                   max_tokens=None, n=1, seed=None, stop=None, response_format=None) -> list[ChatReply]:
        kwargs = {"tools": tools, "tool_choice": tool_choice, "temperature": temperature, "top_p": top_p,
                  "max_tokens": max_tokens, "n": n, "seed": seed, "stop": stop,
                  "response_format": response_format}
        self.calls.append({"messages": json.loads(json.dumps(messages, default=str)), **kwargs})
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        out = []
        for _ in range(n):
            if self._next >= len(self.script):
                raise AgentError(f"the scripted model has no reply left (call {len(self.calls)}, "
                                 f"script of {len(self.script)})")
            item = self.script[self._next]
            self._next += 1
            if callable(item) and not isinstance(item, ChatReply):
                item = item(messages, kwargs)
            out.append(ChatReply(content=item) if isinstance(item, str) else item)
        return out
