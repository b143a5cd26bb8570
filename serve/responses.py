"""POST /v1/responses (OpenAI's Responses API) on the chat route's machinery; GET/DELETE of stored ones.

Read top-down: the route renders `instructions`, the stored conversation of `previous_response_id`
and the `input` items as chat messages (message, function_call and function_call_output items), the
function tools as chat tools, and builds a chat request that meets the chat caps and `plan_chat`.
One engine request runs; `complete` turns the chat completion into a response object (text as a
message item, tool calls as function_call items, usage as input/output tokens) and `stream` writes
the events the openai SDK's `responses.stream` reads, each with its sequence_number.

Responses are kept for `previous_response_id` in this server process's memory (ResponseStore: least
recently used out first, bounded in count and bytes: `responses_store_max`, `..._max_bytes`), unless
the request says `store: false`. Under Ray each ingress replica keeps its own.
"""

from __future__ import annotations

import json
import time
import uuid
from collections import OrderedDict
from typing import Any, AsyncIterator

from fastapi import APIRouter, Request
from hearth.runtime.errors import HearthError
from pydantic import ValidationError

from . import limits
from .chat import ChatPlan, complete as chat_complete, plan_chat
from .common import Run, route_run, sse_response, start_runs, until_done
from .deps import AUTH, chat_model
from .errors import APIError, from_exception, invalid
from .protocol import ChatCompletionRequest, ResponsesRequest
from .tool_parsers import ContentDelta

router = APIRouter(dependencies=AUTH)
TEXT_PARTS = ("input_text", "output_text", "text")
_PARAMS = {"max_tokens": "max_output_tokens", "messages": "input", "response_format": "text.format"}


class ResponseStore:
    """Finished responses and the conversation each ends (as chat messages), LRU, bounded."""

    def __init__(self, max_count: int, max_bytes: int):
        self.max_count, self.max_bytes = max_count, max_bytes
        self._items: OrderedDict[str, tuple[dict, list[dict], int]] = OrderedDict()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._items)

    def put(self, rid: str, response: dict, messages: list[dict]) -> None:
        size = len(json.dumps([response, messages]))  # ASCII JSON: one byte a character
        if self.max_count <= 0 or size > self.max_bytes:
            return
        self._items[rid] = (response, messages, size)
        self.bytes += size
        while len(self._items) > self.max_count or self.bytes > self.max_bytes:
            _, (_, _, s) = self._items.popitem(last=False)
            self.bytes -= s

    def get(self, rid: str) -> tuple[dict, list[dict]] | None:
        item = self._items.get(rid)
        if item is None:
            return None
        self._items.move_to_end(rid)
        return item[0], item[1]

    def delete(self, rid: str) -> bool:
        item = self._items.pop(rid, None)
        if item is not None:
            self.bytes -= item[2]
        return item is not None


@router.post("/v1/responses")
async def create_response(body: ResponsesRequest, request: Request):
    t0 = time.monotonic()
    client, info = chat_model(request.app, body, "responses")
    store: ResponseStore = request.app.state.responses
    history: list[dict] = []
    if body.previous_response_id is not None:
        history = _stored(store, body.previous_response_id, "previous_response_id")[1]
    conversation = history + input_messages(body.input, "input")
    system = [{"role": "system", "content": body.instructions}] if body.instructions else []
    chat = _chat_request(body, system + conversation)
    try:
        limits.check_chat(chat, request.app.state.config, info.max_model_len)
        plan = plan_chat(chat, info)
    except HearthError as e:
        raise from_exception(e, "input") from None
    except APIError as e:  # the chat fields' names, as this API calls them
        e.param = _PARAMS.get(e.param, e.param)
        e.message = e.message.replace("max_tokens", "max_output_tokens")
        raise
    run = route_run(request, client, plan.request, model=body.model, t0=t0)
    await start_runs([run], request)
    shell = _shell(body)

    def save(resp: dict) -> None:
        if body.store is not False:
            store.put(resp["id"], resp, conversation + input_messages(resp["output"], "output"))

    if body.stream:
        return sse_response(stream(run, plan, shell, save), [run])
    resp = _finished(shell, *_output_of(await until_done(request, chat_complete(run, plan, body.model), [run])))
    save(resp)
    return resp


@router.get("/v1/responses/{response_id}")
async def get_response(response_id: str, request: Request):
    return _stored(request.app.state.responses, response_id, "response_id")[0]


@router.delete("/v1/responses/{response_id}")
async def delete_response(response_id: str, request: Request):
    if not request.app.state.responses.delete(response_id):
        raise _not_found(response_id, "response_id")
    return {"id": response_id, "object": "response", "deleted": True}


def _stored(store: ResponseStore, rid: str, param: str) -> tuple[dict, list[dict]]:
    item = store.get(rid)
    if item is None:
        raise _not_found(rid, param)
    return item


def _not_found(rid: str, param: str) -> APIError:
    return APIError(404, f"Response with id '{rid[:128]}' not found.", "invalid_request_error", param, "not_found")


# ---- the request as a chat request -------------------------------------------------------------

def input_messages(items: str | list[dict], param: str) -> list[dict]:
    """Chat messages of `input` (or of a response's `output`): message items, function calls (joined to
    the assistant message before them) and their outputs; reasoning items are left out."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    out: list[dict] = []
    for i, item in enumerate(items):
        p = f"{param}[{i}]"
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "system", "developer", "assistant"):
                raise invalid(f"{p}.role must be user, system, developer or assistant", f"{p}.role")
            out.append({"role": role, "content": _text(item.get("content"), f"{p}.content")})
        elif kind == "function_call":
            call = {"id": _string(item, "call_id", p), "type": "function",
                    "function": {"name": _string(item, "name", p), "arguments": _string(item, "arguments", p)}}
            last = out[-1] if out else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            out.append({"role": "tool", "tool_call_id": _string(item, "call_id", p),
                        "content": _text(item.get("output"), f"{p}.output")})
        elif kind != "reasoning":
            raise invalid(f"{p} is an item of type {str(kind)[:64]!r}; this server takes message, function_call "
                          "and function_call_output items", f"{p}.type")
    return out


def _string(item: dict, key: str, param: str) -> str:
    v = item.get(key)
    if not isinstance(v, str):
        raise invalid(f"{param}.{key} must be a string", f"{param}.{key}")
    return v


def _text(content: Any, param: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise invalid(f"{param} must be a string or a list of text parts", param)
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        key = "refusal" if kind == "refusal" else "text"
        if kind not in TEXT_PARTS + ("refusal",) or not isinstance(part.get(key), str):
            raise invalid(f"{param}[{j}] is not a text part; this server takes text parts only "
                          "(input_text, output_text)", f"{param}[{j}]")
        texts.append(part[key])
    return "".join(texts)


def _chat_request(body: ResponsesRequest, messages: list[dict]) -> ChatCompletionRequest:
    fields: dict[str, Any] = {"model": body.model, "messages": messages, "max_tokens": body.max_output_tokens,
                              "temperature": body.temperature, "top_p": body.top_p, "seed": body.seed,
                              "parallel_tool_calls": body.parallel_tool_calls}
    if body.tools:
        fields["tools"] = [_chat_tool(t, f"tools[{i}]") for i, t in enumerate(body.tools)]
    choice = body.tool_choice
    if isinstance(choice, dict):
        if choice.get("type") != "function" or not isinstance(choice.get("name"), str):
            raise invalid("tool_choice must be none, auto, required or {\"type\": \"function\", \"name\": ...}",
                          "tool_choice")
        choice = {"type": "function", "function": {"name": choice["name"]}}
    if choice is not None:
        fields["tool_choice"] = choice
    fmt = (body.text or {}).get("format")
    if isinstance(fmt, dict) and fmt.get("type") not in (None, "text"):
        rf: dict[str, Any] = {"type": fmt.get("type")}
        if fmt.get("type") == "json_schema":
            rf["json_schema"] = {k: fmt[k] for k in ("name", "description", "schema", "strict") if k in fmt}
        fields["response_format"] = rf
    try:
        return ChatCompletionRequest.model_validate(fields)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(x) for x in err.get("loc", ()))
        param = _PARAMS.get(where.split(".")[0], where)
        raise invalid(f"{param}: {err.get('msg', 'invalid value')}", param) from None


def _chat_tool(tool: dict, param: str) -> dict:
    if tool.get("type") != "function":
        raise invalid(f"{param} is a tool of type {str(tool.get('type'))[:64]!r}; this server runs function "
                      "tools only", f"{param}.type")
    fn = {k: tool[k] for k in ("name", "description", "parameters", "strict") if tool.get(k) is not None}
    return {"type": "function", "function": fn}


# ---- the response object -----------------------------------------------------------------------

def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def _shell(body: ResponsesRequest) -> dict:
    """The response as it starts: in progress, no output yet."""
    return {"id": _id("resp"), "object": "response", "created_at": int(time.time()), "status": "in_progress",
            "error": None, "incomplete_details": None, "instructions": body.instructions,
            "max_output_tokens": body.max_output_tokens, "model": body.model, "output": [],
            "parallel_tool_calls": body.parallel_tool_calls is not False,
            "previous_response_id": body.previous_response_id, "reasoning": None, "store": body.store is not False,
            "temperature": body.temperature, "text": body.text or {"format": {"type": "text"}},
            "tool_choice": body.tool_choice or "auto", "tools": body.tools or [], "top_p": body.top_p,
            "truncation": "disabled", "usage": None, "user": body.user, "metadata": body.metadata or {}}


def _message_item(item_id: str, text: str, status: str = "completed") -> dict:
    content = [_text_part(text)] if status == "completed" else []
    return {"id": item_id, "type": "message", "role": "assistant", "status": status, "content": content}


def _text_part(text: str) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _call_item(item_id: str, call_id: str, name: str, arguments: str, status: str = "completed") -> dict:
    return {"id": item_id, "type": "function_call", "call_id": call_id, "name": name, "arguments": arguments,
            "status": status}


def _usage(input_tokens: int, output_tokens: int, cached: int) -> dict:
    return {"input_tokens": input_tokens, "input_tokens_details": {"cached_tokens": cached},
            "output_tokens": output_tokens, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": input_tokens + output_tokens}


def _output_of(chat: dict) -> tuple[list[dict], dict, str | None]:
    """Output items, usage and finish reason of a chat.completion."""
    choice = chat["choices"][0]
    msg = choice["message"]
    output = []
    if msg.get("content") or not msg.get("tool_calls"):
        output.append(_message_item(_id("msg"), msg.get("content") or ""))
    for tc in msg.get("tool_calls") or []:
        output.append(_call_item(_id("fc"), tc["id"], tc["function"]["name"], tc["function"]["arguments"]))
    u = chat["usage"]
    usage = _usage(u["prompt_tokens"], u["completion_tokens"], u["prompt_tokens_details"]["cached_tokens"])
    return output, usage, choice["finish_reason"]


def _finished(shell: dict, output: list[dict], usage: dict, finish: str | None) -> dict:
    cut = finish == "length"
    return {**shell, "status": "incomplete" if cut else "completed", "output": output, "usage": usage,
            "incomplete_details": {"reason": "max_output_tokens"} if cut else None}


# ---- streaming ---------------------------------------------------------------------------------

class _Events:
    """SSE events of one response, numbered in order."""

    def __init__(self) -> None:
        self.seq = 0

    def __call__(self, kind: str, **fields: Any) -> str:
        obj = {"type": kind, "sequence_number": self.seq, **fields}
        self.seq += 1
        return f"event: {kind}\ndata: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


async def stream(run: Run, plan: ChatPlan, shell: dict, save) -> AsyncIterator[str]:
    """created, in_progress, then per output item: added, its deltas, done; then completed (or
    incomplete when max_output_tokens cut it); an error after the start: error and failed events."""
    ev = _Events()
    yield ev("response.created", response=shell)
    yield ev("response.in_progress", response=shell)
    output: list[dict] = []  # every item opened, in output_index order
    texts: dict[int, list[str]] = {}  # output_index of a message -> its text so far
    msg: int | None = None  # the open message's output_index
    calls: dict[int, int] = {}  # the parser's call index -> output_index
    parser = plan.parser.StreamParser(plan.tools) if plan.parser else None

    def open_message() -> list[str]:
        k = len(output)
        output.append(_message_item(_id("msg"), "", "in_progress"))
        texts[k] = []
        return [ev("response.output_item.added", output_index=k, item=output[k]),
                ev("response.content_part.added", item_id=output[k]["id"], output_index=k, content_index=0,
                   part=_text_part(""))]

    def close(k: int) -> list[str]:
        item = output[k]
        if item["type"] == "message":
            text = "".join(texts[k])
            item.update(status="completed", content=[_text_part(text)])
            out = [ev("response.output_text.done", item_id=item["id"], output_index=k, content_index=0, text=text,
                      logprobs=[]),
                   ev("response.content_part.done", item_id=item["id"], output_index=k, content_index=0,
                      part=item["content"][0])]
        else:
            item["status"] = "completed"
            out = [ev("response.function_call_arguments.done", item_id=item["id"], output_index=k,
                      name=item["name"], arguments=item["arguments"])]
        return out + [ev("response.output_item.done", output_index=k, item=item)]

    try:
        finish, usage = None, _usage(0, 0, 0)
        async for c in run.chunks():
            o = c.out
            if parser is None:
                items: list = [ContentDelta(o.text)] if o.text else []
            else:
                items = parser.feed(o.text) if o.text else []
                if o.finish_reason is not None:
                    items += parser.finish()
            for d in items:
                if isinstance(d, ContentDelta):
                    if not d.text:
                        continue
                    if msg is None:
                        for s in open_message():
                            yield s
                        msg = len(output) - 1
                    texts[msg].append(d.text)
                    yield ev("response.output_text.delta", item_id=output[msg]["id"], output_index=msg,
                             content_index=0, delta=d.text, logprobs=[])
                    continue
                k = calls.get(d.index)
                if k is None:
                    if msg is not None:  # a call closes the text before it
                        for s in close(msg):
                            yield s
                        msg = None
                    k = calls[d.index] = len(output)
                    output.append(_call_item(_id("fc"), d.id or _id("call"), d.name or "", "", "in_progress"))
                    yield ev("response.output_item.added", output_index=k, item=dict(output[k]))
                if d.arguments:
                    output[k]["arguments"] += d.arguments
                    yield ev("response.function_call_arguments.delta", item_id=output[k]["id"], output_index=k,
                             delta=d.arguments)
            if o.finish_reason is not None:
                finish = o.finish_reason
                usage = _usage(len(run.started.prompt_token_ids), o.usage.completion_tokens, o.usage.cached_tokens)
        if not output:  # an empty answer is still one (empty) message
            for s in open_message():
                yield s
        for k in range(len(output)):
            if output[k]["status"] != "completed":
                for s in close(k):
                    yield s
        resp = _finished(shell, output, usage, finish)
        save(resp)
        yield ev("response.incomplete" if resp["status"] == "incomplete" else "response.completed", response=resp)
    except Exception as e:  # the stream has begun: the error goes out as events
        err = from_exception(e).body()["error"]
        yield ev("error", code=err["code"] or err["type"], message=err["message"], param=err["param"])
        yield ev("response.failed", response={**shell, "status": "failed", "output": output,
                                              "error": {"code": err["code"] or "server_error",
                                                        "message": err["message"]}})
