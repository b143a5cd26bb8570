"""HTTP routes of the agents: RAG indexes, agent runs, and the chat-completions extensions.

    POST   /v1/rag/indexes/{name}/documents    {"documents": [{"source", "text" | "content_base64", "format"}],
                                                "paths": [...]}          -> what was added / replaced / unchanged
    GET    /v1/rag/indexes                     GET /v1/rag/indexes/{name}/documents
    POST   /v1/rag/indexes/{name}/query        {"query", "top_k", "mmr"} -> hits with source, span and score
    DELETE /v1/rag/indexes/{name}/documents?source=a.md&source=b.md     DELETE /v1/rag/indexes/{name}
    POST   /v1/agents/runs                     {"input", "strategy", "tools", "rag", "budget", "stream"}
    POST   /v1/chat/completions                + "rag": {"index", "top_k"}  or  "reasoning": {"strategy", "n"}

A run streams as SSE: one `agent.run.step` object per step, then the `agent.run` result, then [DONE].
An ingest whose client disconnects is cancelled (no background job API: a large ingest is split over
several requests, each under agents.max_request_bytes).
"""

from __future__ import annotations

import re
import time
from typing import Annotated, Any, AsyncIterator, Callable

from fastapi import FastAPI, Query, Request
from fastapi.responses import StreamingResponse

from .common import DONE, SSE_HEADERS, new_id, sse, until_done, usage_dict
from .errors import APIError, from_exception, invalid
from .protocol import AgentRunRequest, ChatCompletionRequest, RagDocumentsRequest, RagQueryRequest

_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,63}$")


def _index(name: str) -> str:
    if not _NAME.match(name):
        raise invalid(f"index names are 1-64 letters, digits, '_', '.' or '-' and do not start with '.' or '-'; "
                      f"got {name!r}", "index")
    return name


def install(app: FastAPI, auth: list, agents: Callable[[], Any]) -> None:
    """Add the routes; `agents()` returns the AgentService (or its Ray handle wrapper) or raises 503."""

    @app.get("/v1/rag/indexes", dependencies=auth)
    async def rag_indexes():
        return await agents().rag_indexes()

    @app.post("/v1/rag/indexes/{name}/documents", dependencies=auth)
    async def rag_add(name: str, body: RagDocumentsRequest, request: Request):
        # a client that leaves cancels the ingest: it stops embedding and lets go of the index's lock
        return await until_done(request, agents().rag_add(_index(name), body), [])

    @app.get("/v1/rag/indexes/{name}/documents", dependencies=auth)
    async def rag_documents(name: str):
        return await agents().rag_documents(_index(name))

    @app.delete("/v1/rag/indexes/{name}/documents", dependencies=auth)
    async def rag_delete(name: str, source: Annotated[list[str] | None, Query()] = None):
        if not source:
            raise invalid("name the documents to delete: ?source=NAME (repeatable)", "source")
        return await agents().rag_delete(_index(name), source)

    @app.delete("/v1/rag/indexes/{name}", dependencies=auth)
    async def rag_drop(name: str):
        return await agents().rag_drop(_index(name))

    @app.post("/v1/rag/indexes/{name}/query", dependencies=auth)
    async def rag_query(name: str, body: RagQueryRequest):
        return await agents().rag_query(_index(name), body)

    @app.post("/v1/agents/runs", dependencies=auth)
    async def agent_runs(body: AgentRunRequest, request: Request):
        events = agents().run(body)
        first = await _first(events)  # bad input is a 4xx before any streaming starts
        if body.stream:
            return StreamingResponse(_run_sse(first, events), media_type="text/event-stream", headers=SSE_HEADERS)
        result = None
        async for ev in events:
            if ev["type"] == "result":
                result = ev
        if result is None:
            raise APIError(500, "the agent run ended without a result", "server_error")
        result.pop("type", None)
        return result


async def _first(events: AsyncIterator[dict]) -> dict:
    try:
        return await events.__anext__()
    except StopAsyncIteration:
        raise APIError(500, "the agent run produced nothing", "server_error") from None


async def _run_sse(first: dict, events: AsyncIterator[dict]) -> AsyncIterator[str]:
    run_id = first.get("id")
    try:
        yield sse({"object": "agent.run.start", **{k: v for k, v in first.items() if k != "type"}})
        async for ev in events:
            kind = ev.pop("type")
            if kind == "step":
                yield sse({"object": "agent.run.step", "id": run_id, **ev["step"]})
            else:
                yield sse(ev)
        yield DONE
    except Exception as e:  # the stream has begun: the error goes out as an SSE event
        yield from_exception(e).sse()
    finally:
        await events.aclose()


# ---- chat-completions extensions ---------------------------------------------------------------

async def rag_chat_messages(agents: Any, body: ChatCompletionRequest) -> tuple[ChatCompletionRequest, list[dict]]:
    """The request with retrieved context in its messages, and the citations to return."""
    msgs = [m.model_dump(exclude_none=True) for m in body.messages]
    new_msgs, cites = await agents.rag_context(body.rag, msgs)
    upd = body.model_copy(update={"messages": [type(body.messages[0]).model_validate(m) for m in new_msgs],
                                  "rag": None})
    return upd, cites


def citations_chunk(rid: str, model: str, cites: list[dict]) -> str:
    """A leading stream chunk with no choices that carries the citations (OpenAI clients ignore it)."""
    return sse({"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
                "system_fingerprint": "hearth", "choices": [], "citations": cites})


async def reasoning_chat(agents: Any, body: ChatCompletionRequest, include_usage: bool):
    """Answer a chat request with a reasoning strategy: a chat.completion (or its stream) whose message is
    the strategy's answer, with the steps, votes and agreement under `reasoning`."""
    spec = body.reasoning
    if body.n not in (None, 1):
        raise invalid("`n` must be 1 with `reasoning` (use reasoning.n for sampled paths)", "n")
    if body.tools:
        raise invalid("`reasoning` takes no `tools`; use POST /v1/agents/runs with strategy 'tools' or 'react'",
                      "tools")
    req = AgentRunRequest(model=body.model, messages=body.messages, strategy=spec.strategy, n=spec.n,
                          temperature=body.temperature, max_tokens=body.max_completion_tokens or body.max_tokens,
                          seed=body.seed, answer_type=spec.answer_type, rag=body.rag, tools=None,
                          budget={"max_steps": spec.max_steps, "time_s": spec.time_budget_s})
    result = await agents.reason(req)
    rid, created = new_id("chatcmpl"), int(time.time())
    u = result.get("usage") or {}
    usage = usage_dict(int(u.get("prompt_tokens", 0)), int(u.get("completion_tokens", 0)))
    info = {"strategy": spec.strategy, "stopped": result.get("stopped"), "steps": result.get("steps", []),
            **(result.get("extra") or {})}
    answer = result.get("answer") or ""
    finish = "stop" if result.get("stopped") == "answer" else "length"
    extra = {"citations": result["citations"]} if result.get("citations") else {}
    if not body.stream:
        return {"id": rid, "object": "chat.completion", "created": created, "model": body.model,
                "system_fingerprint": "hearth",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": answer, "refusal": None},
                             "logprobs": None, "finish_reason": finish}],
                "usage": usage, "reasoning": info, **extra}

    def chunk(choices: list[dict], **more) -> str:
        return sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": body.model,
                    "system_fingerprint": "hearth", "choices": choices, **more})

    async def gen() -> AsyncIterator[str]:
        yield chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                      "finish_reason": None}], **extra)
        yield chunk([{"index": 0, "delta": {"content": answer}, "logprobs": None, "finish_reason": None}])
        yield chunk([{"index": 0, "delta": {}, "logprobs": None, "finish_reason": finish}], reasoning=info)
        if include_usage:
            yield chunk([], usage=usage)
        yield DONE

    return StreamingResponse(gen(), media_type="text/event-stream", headers=SSE_HEADERS)
