"""POST /v1/chat/completions: messages and tools in, a message or a stream of chunks out.

Read top-down: the route parses (pydantic) and checks the caps, `plan_chat` turns the request into
plain runtime objects (messages prepared for the model's tool-call family, SamplingParams with any
grammar), one engine request runs with `n` choices, and `complete` / `stream` write OpenAI's
response or SSE chunks. Tool calls are parsed from the text by the family's parser. The `rag` and
`reasoning` extensions are answered through the agents (agents_routes.py).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from fastapi import APIRouter, Request
from hearth.agents.reasoning.common import message_text
from hearth.runtime.errors import HearthError
from hearth.runtime.prompt import PromptRequest
from hearth.runtime.types import GuidedDecoding

from . import agents_routes, guided_fields, limits, tool_parsers
from .common import (DONE, Run, chat_logprobs, check_stream_options, include_usage, new_id, prepend, route_run,
                     sampling_params, sse, sse_response, start_runs, until_done, usage_dict)
from .deps import AUTH, chat_model, current_agents
from .errors import from_exception, invalid
from .model_service import ModelInfo
from .protocol import ChatCompletionRequest
from .tool_parsers import ContentDelta

log = logging.getLogger("hearth.serve")

router = APIRouter(dependencies=AUTH)


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request):
    t0 = time.monotonic()
    client, info = chat_model(request.app, body, "chat.completions")
    limits.check_chat(body, request.app.state.config, info.max_model_len)
    check_stream_options(body)
    if body.reasoning is not None and body.best_of_n is not None:
        raise invalid("reasoning and best_of_n are two ways to answer: give one", "best_of_n")
    if body.reasoning is not None:
        return await agents_routes.reasoning_chat(current_agents(request.app), body, include_usage(body))
    cites = None
    if body.rag is not None:
        body, cites = await agents_routes.rag_chat_messages(current_agents(request.app), body)
    best = None
    if body.best_of_n is not None:
        best = _check_best_of_n(body, request.app.state.rewards)
        body = body.model_copy(update={"n": best.n})
    try:
        plan = plan_chat(body, info)
    except HearthError as e:
        raise from_exception(e) from None
    runs = [route_run(request, client, plan.request, model=body.model, t0=t0, want_bytes=bool(body.logprobs))]
    await start_runs(runs, request)
    if body.stream:
        chunks = stream(runs[0], plan, body.model, include_usage(body))
        if cites is not None:
            chunks = prepend(agents_routes.citations_chunk(plan.request.request_id, body.model, cites), chunks)
        return sse_response(chunks, runs)
    resp = await until_done(request, complete(runs[0], plan, body.model), runs)
    if best is not None:
        resp = await _pick_best(resp, body, best, request.app.state.rewards)
    if cites is not None:
        resp["citations"] = cites
    return resp


def _check_best_of_n(body: ChatCompletionRequest, rewards) -> Any:
    """The `best_of_n` extension's 400s, before anything is generated."""
    if body.stream:
        raise invalid("best_of_n does not stream: every answer is scored before one is returned", "best_of_n")
    if (body.n or 1) != 1:
        raise invalid("best_of_n returns one answer; leave n unset", "n")
    if body.tools and body.tool_choice != "none":
        raise invalid("best_of_n scores text answers; it cannot be combined with tools", "best_of_n")
    if body.logprobs:
        raise invalid("best_of_n cannot be combined with logprobs", "logprobs")
    return rewards.check(body.best_of_n)


async def _pick_best(resp: dict, body: ChatCompletionRequest, best, rewards) -> dict:
    """Score each sampled answer after the conversation; keep the highest as the one choice."""
    prompt = [_message_dict(m) for m in body.messages]
    answers = [c["message"]["content"] or "" for c in resp["choices"]]
    scores = await rewards.score(best.name, [prompt + [{"role": "assistant", "content": a}] for a in answers])
    k = max(range(len(scores)), key=scores.__getitem__)
    resp["choices"] = [{**resp["choices"][k], "index": 0}]
    resp["best_of_n"] = {"reward_model": best.name, "n": best.n, "scores": scores, "chosen": k}
    return resp


@dataclass
class ChatPlan:
    """What the engine is asked and how its text is read back."""

    request: PromptRequest
    parser: Any = None
    """The tool-call family module when tools are active, else None."""
    tools: list[dict] | None = None
    stream_parsers: dict[int, Any] = field(default_factory=dict)


def plan_chat(body: ChatCompletionRequest, info: ModelInfo) -> ChatPlan:
    """Validate the chat-specific fields and build the engine request."""
    tools = [t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None
    if tools:
        try:
            tool_parsers.normalize_tools(tools)  # names the bad field
        except ValueError as e:
            raise invalid(str(e), "tools") from None
    choice = body.tool_choice
    if hasattr(choice, "function"):
        choice_name = choice.function.name
        if not tools or choice_name not in {t["function"]["name"] for t in tools}:
            raise invalid(f"tool_choice names the function {choice_name!r}, which is not in tools",
                          "tool_choice")
        choice = choice_name
    elif choice is None:
        choice = "auto" if tools else "none"
    if choice == "required" and not tools:
        raise invalid("tool_choice 'required' needs a non-empty tools list", "tool_choice")
    active = bool(tools) and choice != "none"

    family = info.tool_parser
    module = tool_parsers.get_parser(family)
    try:
        raw_messages = [_message_dict(m) for m in body.messages]
        messages = module.prepare_messages(raw_messages, tools if active else None, choice)
    except ValueError as e:
        raise invalid(str(e), "messages") from None
    render_tools = tools if active and family != "json" else None

    guided = None
    if active and choice != "auto":
        guided = GuidedDecoding("lark", module.grammar(tools, choice, body.parallel_tool_calls is not False,
                                                       special_ids=info.tool_special_ids))
    else:
        guided, _ = guided_fields.request_guided(body)
        if guided is not None and guided.kind in ("json_schema", "json_object"):
            # as OpenAI does, tell the model what it must write: the mask alone keeps the syntax, and a
            # model that does not know it is writing JSON fills the strings with prose
            messages = _with_format_hint(messages, guided)

    if body.top_logprobs and not body.logprobs:
        raise invalid("top_logprobs requires logprobs: true", "top_logprobs")
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    if max_tokens == 0:
        raise invalid("max_tokens must be at least 1", "max_tokens")
    params = sampling_params(body, info, max_tokens=max_tokens, n=body.n or 1, logprobs=bool(body.logprobs),
                             top_logprobs=body.top_logprobs or 0, guided=guided)
    req = PromptRequest(messages=messages, tools=render_tools, params=params, request_id=new_id("chatcmpl"))
    return ChatPlan(req, module if active else None, tools if active else None)


def _message_dict(m) -> dict:
    # text parts joined as they are (limits.check_chat refused any other part)
    d: dict[str, Any] = {"role": m.role, "content": None if m.content is None else message_text(m.content, "")}
    if m.role == "developer":  # OpenAI's newer name for the system role; templates know "system"
        d["role"] = "system"
    if m.name:
        d["name"] = m.name
    if m.tool_calls:
        d["tool_calls"] = [{"id": c.id, "type": "function",
                            "function": {"name": c.function.name, "arguments": c.function.arguments}}
                           for c in m.tool_calls]
    if m.tool_call_id:
        d["tool_call_id"] = m.tool_call_id
    if d["content"] is None and not m.tool_calls and m.role != "assistant":
        raise ValueError(f"a {m.role} message needs content")
    return d


def _with_format_hint(messages: list[dict], guided: GuidedDecoding) -> list[dict]:
    if guided.kind == "json_schema":
        hint = ("Answer only with one JSON object that matches this JSON schema, with short values:\n"
                + json.dumps(guided.spec, ensure_ascii=False, separators=(",", ":")))
    else:
        hint = "Answer only with one JSON object, with short values."
    out = [dict(m) for m in messages]
    if out and out[0]["role"] == "system":
        out[0]["content"] = f"{out[0]['content'] or ''}\n\n{hint}".strip()
    else:
        out.insert(0, {"role": "system", "content": hint})
    return out


# ---- non-streaming ----------------------------------------------------------------------------

async def complete(run: Run, plan: ChatPlan, model: str) -> dict:
    """Collect every choice and build the chat.completion object."""
    started = run.started
    n = plan.request.params.n
    texts = [""] * n
    lps: list[list] = [[] for _ in range(n)]
    finish: list[str | None] = [None] * n
    completion_tokens = cached = 0
    async for c in run.chunks():
        o = c.out
        texts[o.index] += o.text
        if o.logprobs:
            lps[o.index].extend(chat_logprobs(o.logprobs, c.token_bytes or {}))
        if o.finish_reason is not None:
            finish[o.index] = o.finish_reason
            completion_tokens += o.usage.completion_tokens
            cached = max(cached, o.usage.cached_tokens)
    choices = []
    for i in range(n):
        msg: dict[str, Any] = {"role": "assistant", "content": texts[i], "refusal": None}
        reason = _finish(finish[i])
        if plan.parser is not None:
            parsed = plan.parser.parse(texts[i], plan.tools)
            if parsed.tool_calls:
                msg["content"] = parsed.content or None
                msg["tool_calls"] = [_call_dict(tc) for tc in parsed.tool_calls]
                if reason == "stop":
                    reason = "tool_calls"
        choices.append({"index": i, "message": msg,
                        "logprobs": {"content": lps[i], "refusal": None} if plan.request.params.logprobs else None,
                        "finish_reason": reason})
    return {"id": plan.request.request_id, "object": "chat.completion", "created": int(time.time()),
            "model": model, "system_fingerprint": "hearth", "choices": choices,
            "usage": usage_dict(len(started.prompt_token_ids), completion_tokens, cached)}


def _call_dict(tc) -> dict:
    return {"id": tc.id, "type": "function", "function": {"name": tc.name, "arguments": tc.arguments}}


def _finish(reason: str | None) -> str | None:
    # 'abort' never reaches a client that is still listening; report it as a stop
    return "stop" if reason == "abort" else reason


# ---- streaming --------------------------------------------------------------------------------

async def stream(run: Run, plan: ChatPlan, model: str, include_usage: bool) -> AsyncIterator[str]:
    """SSE chunks: a role delta per choice, content/tool-call deltas, one finish per choice, usage, [DONE]."""
    rid, created = plan.request.request_id, int(time.time())
    n = plan.request.params.n
    want_lp = plan.request.params.logprobs

    def chunk(choices: list[dict]) -> str:
        obj = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
               "system_fingerprint": "hearth", "choices": choices}
        if include_usage:
            obj["usage"] = None
        return sse(obj)

    parsers = {i: plan.parser.StreamParser(plan.tools) for i in range(n)} if plan.parser else {}
    has_calls = [False] * n
    for i in range(n):
        yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                      "finish_reason": None}])
    completion_tokens = cached = 0
    async for c in run.chunks():
        o = c.out
        i = o.index
        deltas: list[dict] = []
        if parsers:
            items = parsers[i].feed(o.text) if o.text else []
            if o.finish_reason is not None:
                items += parsers[i].finish()
            for d in items:
                if isinstance(d, ContentDelta):
                    if d.text:
                        deltas.append({"content": d.text})
                else:
                    has_calls[i] = True
                    call: dict[str, Any] = {"index": d.index}
                    if d.id is not None:
                        call.update(id=d.id, type="function")
                    fn: dict[str, Any] = {"arguments": d.arguments}
                    if d.name is not None:
                        fn["name"] = d.name
                    call["function"] = fn
                    deltas.append({"tool_calls": [call]})
        elif o.text:
            deltas.append({"content": o.text})
        lp = {"content": chat_logprobs(o.logprobs, c.token_bytes or {}), "refusal": None} \
            if want_lp and o.logprobs else None
        reason = None
        if o.finish_reason is not None:
            reason = _finish(o.finish_reason)
            if has_calls[i] and reason == "stop":
                reason = "tool_calls"
            completion_tokens += o.usage.completion_tokens
            cached = max(cached, o.usage.cached_tokens)
        if not deltas and lp is not None:
            deltas.append({})
        for k, d in enumerate(deltas):
            yield chunk([{"index": i, "delta": d, "logprobs": lp if k == 0 else None, "finish_reason": None}])
        if reason is not None:  # as OpenAI: the finish in a chunk of its own, with an empty delta
            yield chunk([{"index": i, "delta": {}, "logprobs": None, "finish_reason": reason}])
    if include_usage:
        yield sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                   "system_fingerprint": "hearth", "choices": [],
                   "usage": usage_dict(len(run.started.prompt_token_ids), completion_tokens, cached)})
    yield DONE

