"""The caps a request meets before any heavy work (tokenization, retrieval, a model call).

    check_chat(body, config, info.max_model_len)       # 400 naming the field and the cap

Each check is linear in the request and runs on the event loop before anything is queued. The caps
come from the serve config (`max_messages`, `max_prompt_chars`, `max_embedding_inputs`); the body
size was already bounded at the edge (`max_body_bytes`).

max_tokens: a value above the model's context length can never be served and gets 400, as at OpenAI.
One that fits the context alone but not beside the prompt is clamped: generation stops when the
context is full, with finish_reason "length" (vLLM answers 400 there, which breaks clients that send
a large max_tokens as a safety cap).
"""

from __future__ import annotations

from typing import Any

from hearth.agents.reasoning.common import TEXT_PARTS

from .config import ServeConfig
from .errors import APIError, invalid
from .protocol import ChatCompletionRequest, CompletionRequest, EmbeddingRequest, embedding_inputs

def check_chat(body: ChatCompletionRequest, config: ServeConfig, max_model_len: int) -> None:
    if len(body.messages) > config.max_messages:
        raise APIError(400, f"messages holds {len(body.messages)} messages; this server takes at most "
                            f"{config.max_messages} per request (max_messages).",
                       "invalid_request_error", "messages", "too_many_messages")
    chars = 0
    for i, m in enumerate(body.messages):
        if m.role == "tool" and not m.tool_call_id:
            raise invalid(f"messages[{i}] has role 'tool' but no tool_call_id: a tool message must name the "
                          "tool call it answers.", f"messages[{i}].tool_call_id")
        chars += content_chars(m.content, f"messages[{i}].content") + len(m.name or "")
        for c in m.tool_calls or []:
            chars += len(c.id) + len(c.function.name) + len(c.function.arguments)
    for t in body.tools or []:
        chars += text_size(t.model_dump(exclude_none=True))
    rf = body.response_format
    if rf is not None and rf.json_schema is not None:  # the schema is written into the prompt
        chars += text_size(rf.json_schema.schema_)
    _check_chars(chars, config, "messages")
    if body.max_completion_tokens is not None:
        check_max_tokens(body.max_completion_tokens, max_model_len, "max_completion_tokens")
    if body.max_tokens is not None:
        check_max_tokens(body.max_tokens, max_model_len, "max_tokens")


def check_completions(body: CompletionRequest, config: ServeConfig, max_model_len: int) -> None:
    prompt = body.prompt
    if isinstance(prompt, str):
        chars = len(prompt)
    else:  # strings, one list of token ids, or lists of them: an id counts as one character
        chars = sum(len(p) if isinstance(p, (str, list)) else 1 for p in prompt)
    _check_chars(chars, config, "prompt")
    if body.max_tokens is not None:
        check_max_tokens(body.max_tokens, max_model_len, "max_tokens")


def check_embeddings(body: EmbeddingRequest, config: ServeConfig) -> None:
    items = embedding_inputs(body.input)
    if len(items) > config.max_embedding_inputs:
        raise APIError(400, f"input holds {len(items)} items; this server takes at most "
                            f"{config.max_embedding_inputs} per request (max_embedding_inputs).",
                       "invalid_request_error", "input", "too_many_inputs")
    _check_chars(sum(len(x) if isinstance(x, (str, list)) else 1 for x in items), config, "input")


def check_max_tokens(value: int, max_model_len: int, param: str) -> None:
    if value > max_model_len:
        raise APIError(400, f"{param} is {value}, but this model's context holds {max_model_len} tokens in all "
                            f"(prompt and completion); ask for at most {max_model_len}.",
                       "invalid_request_error", param, "context_length_exceeded")


def content_chars(content: Any, param: str) -> int:
    """Characters of a message content (a string, None, or text parts); 400 for any other part."""
    if content is None:
        return 0
    if isinstance(content, str):
        return len(content)
    n = 0
    for j, p in enumerate(content):
        kind = p.get("type") if isinstance(p, dict) else type(p).__name__
        if kind not in TEXT_PARTS:
            raise invalid(f"{param}[{j}] is a content part of type {kind!r}; this server takes text parts only "
                          "(type 'text').", f"{param}[{j}]")
        text = p.get("text", "")
        if not isinstance(text, str):
            raise invalid(f"{param}[{j}].text must be a string.", f"{param}[{j}].text")
        n += len(text)
    return n


def text_size(value: Any) -> int:
    """Characters of every string (keys included) in a JSON value, plus one per other scalar; iterative,
    so a deeply nested value cannot exhaust the stack."""
    n, stack = 0, [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            n += len(v)
        elif isinstance(v, dict):
            n += sum(len(k) for k in v if isinstance(k, str))
            stack.extend(v.values())
        elif isinstance(v, (list, tuple)):
            stack.extend(v)
        else:
            n += 1
    return n


def _check_chars(chars: int, config: ServeConfig, param: str) -> None:
    if chars > config.max_prompt_chars:
        raise APIError(400, f"{param} holds {chars} characters; this server takes at most "
                            f"{config.max_prompt_chars} per request (max_prompt_chars).",
                       "invalid_request_error", param, "prompt_too_long")


check_chars = _check_chars
"""The max_prompt_chars check, for the routes beyond chat, completions and embeddings."""
