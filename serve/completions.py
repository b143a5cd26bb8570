"""POST /v1/completions: the legacy text completion API, including what log-likelihood tools need.

A prompt is a string, a list of strings, a list of token ids, or a list of those; each prompt
runs as its own engine request with `n` choices (choice index = prompt index * n + choice).
`echo` with `logprobs` returns the prompt's token logprobs too (the first token has none), and
`max_tokens: 0` with both scores a text without generating: what lm-eval-harness sends.
Read top-down: the route (parse, caps), `plan_completions`, then `complete` / `stream`.
"""

from __future__ import annotations

import time
from typing import Any, AsyncIterator

from fastapi import APIRouter, Request
from hearth.runtime.errors import HearthError
from hearth.runtime.prompt import PromptRequest

from . import guided_fields, limits
from .common import (DONE, Run, check_stream_options, include_usage, merge, new_id, route_run, sampling_params,
                     sse, sse_response, start_runs, token_text, until_done, usage_dict)
from .deps import AUTH, chat_model
from .errors import from_exception, invalid
from .model_service import ModelInfo, Started
from .protocol import CompletionRequest, completion_prompts

router = APIRouter(dependencies=AUTH)
LEGACY_DEFAULT_MAX_TOKENS = 16
"""max_tokens when a completions request names none (OpenAI's default for this API)."""


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request):
    t0 = time.monotonic()
    client, info = chat_model(request.app, body, "completions")
    limits.check_completions(body, request.app.state.config, info.max_model_len)
    check_stream_options(body)
    try:
        reqs = plan_completions(body, info)
    except HearthError as e:
        raise from_exception(e, "prompt") from None
    runs = [route_run(request, client, q, model=body.model, t0=t0, want_bytes=body.logprobs is not None,
                      echo_bytes=bool(body.echo), prompt_param="prompt") for q in reqs]
    await start_runs(runs, request)
    rid = new_id("cmpl")
    if body.stream:
        return sse_response(stream(runs, body, body.model, rid, include_usage(body)), runs)
    return await until_done(request, complete(runs, body, body.model, rid), runs)


def plan_completions(body: CompletionRequest, info: ModelInfo) -> list[PromptRequest]:
    prompts = completion_prompts(body.prompt)
    if not prompts:
        raise invalid("prompt must not be empty", "prompt")
    if len(prompts) > 64:
        raise invalid(f"at most 64 prompts per request, got {len(prompts)}", "prompt")
    if body.suffix:
        raise invalid("suffix is not supported", "suffix")
    if body.best_of is not None and body.best_of != (body.n or 1):
        raise invalid("best_of other than n is not supported", "best_of")
    echo, k = bool(body.echo), body.logprobs
    max_tokens = body.max_tokens
    if max_tokens == 0 and not (echo and k is not None):
        raise invalid("max_tokens 0 is only allowed with echo and logprobs (prompt scoring)", "max_tokens")
    params = sampling_params(body, info, max_tokens=max_tokens, n=body.n or 1, logprobs=k is not None,
                             top_logprobs=k or 0, prompt_logprobs=k if (echo and k is not None) else None,
                             default_max_tokens=LEGACY_DEFAULT_MAX_TOKENS,
                             guided=guided_fields.request_guided(body)[0])
    rid = new_id("cmpl")
    reqs = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            if p == "":
                raise invalid(f"prompt[{i}] is empty", "prompt")
            reqs.append(PromptRequest(prompt=p, params=params, request_id=f"{rid}-{i}"))
        elif isinstance(p, list) and p and all(isinstance(t, int) for t in p):
            bad = [t for t in p if t < 0 or t >= info.vocab_size]
            if bad:
                raise invalid(f"prompt[{i}] has token id {bad[0]} outside the vocabulary "
                              f"(size {info.vocab_size})", "prompt")
            reqs.append(PromptRequest(prompt_token_ids=list(p), params=params, request_id=f"{rid}-{i}"))
        else:
            raise invalid(f"prompt[{i}] must be a non-empty string or list of token ids", "prompt")
    return reqs


class _Choice:
    """One choice's text and legacy logprobs, with text offsets into the returned text."""

    def __init__(self, index: int, prefix: str, want_lp: bool):
        self.index = index
        self.text = prefix
        self.want_lp = want_lp
        self.tokens: list[str] = []
        self.token_logprobs: list[float | None] = []
        self.top: list[dict | None] = []
        self.offsets: list[int] = []
        self.offset = 0
        self.finish: str | None = None

    def add_logprobs(self, lps, tb: dict[int, bytes]) -> dict | None:
        """Append entries; returns the entries added (for a streamed chunk)."""
        if not self.want_lp or lps is None:
            return None
        added: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for lp in lps:
            tok = token_text(tb.get(lp.token_id, b""))
            entry = (tok, lp.logprob, {token_text(tb.get(t, b"")): v for t, v in lp.top})
            added["tokens"].append(entry[0])
            added["token_logprobs"].append(entry[1])
            added["top_logprobs"].append(entry[2])
            added["text_offset"].append(self.offset)
            self.offset += len(entry[0] or "")
        self.tokens += added["tokens"]
        self.token_logprobs += added["token_logprobs"]
        self.top += added["top_logprobs"]
        self.offsets += added["text_offset"]
        return added

    def logprobs(self) -> dict | None:
        if not self.want_lp:
            return None
        return {"tokens": self.tokens, "token_logprobs": self.token_logprobs, "top_logprobs": self.top,
                "text_offset": self.offsets}


def _prompt_text(started: Started) -> str:
    return b"".join(started.prompt_token_bytes or []).decode("utf-8", errors="replace")


async def complete(runs: list[Run], body: CompletionRequest, model: str, rid: str) -> dict:
    n = body.n or 1
    echo = bool(body.echo)
    want_lp = body.logprobs is not None
    choices: dict[int, _Choice] = {}
    for p, run in enumerate(runs):
        for j in range(n):
            choices[p * n + j] = _Choice(p * n + j, _prompt_text(run.started) if echo else "", want_lp)
    prompt_tokens = sum(len(r.started.prompt_token_ids) for r in runs)
    completion_tokens = 0
    async for p, c in merge(runs):
        o = c.out
        ch = choices[p * n + o.index]
        tb = c.token_bytes or {}
        if o.prompt_logprobs is not None and echo:
            _echo_logprobs(ch, o.prompt_logprobs, runs[p].started, tb)
        ch.add_logprobs(o.logprobs, tb)
        ch.text += o.text
        if o.finish_reason is not None:
            ch.finish = "stop" if o.finish_reason == "abort" else o.finish_reason
            completion_tokens += o.usage.completion_tokens
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "system_fingerprint": "hearth",
            "choices": [{"index": i, "text": ch.text, "logprobs": ch.logprobs(), "finish_reason": ch.finish}
                        for i, ch in sorted(choices.items())],
            "usage": usage_dict(prompt_tokens, completion_tokens)}


def _echo_logprobs(ch: _Choice, plps: list, started: Started, tb: dict[int, bytes]) -> dict | None:
    """The prompt's entries: token text from the prompt itself (the first one has no logprob)."""
    if not ch.want_lp:
        return None
    pbytes = started.prompt_token_bytes or []
    added: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for pos, lp in enumerate(plps):
        tok = token_text(pbytes[pos]) if pos < len(pbytes) else ""
        top = {token_text(tb.get(t, b"")): v for t, v in lp.top} if lp is not None else None
        added["tokens"].append(tok)
        added["token_logprobs"].append(lp.logprob if lp is not None else None)
        added["top_logprobs"].append(top)
        added["text_offset"].append(ch.offset)
        ch.offset += len(tok)
    ch.tokens += added["tokens"]
    ch.token_logprobs += added["token_logprobs"]
    ch.top += added["top_logprobs"]
    ch.offsets += added["text_offset"]
    return added


async def stream(runs: list[Run], body: CompletionRequest, model: str, rid: str,
                 include_usage: bool) -> AsyncIterator[str]:
    n = body.n or 1
    echo = bool(body.echo)
    want_lp = body.logprobs is not None
    created = int(time.time())
    choices = {p * n + j: _Choice(p * n + j, "", want_lp) for p in range(len(runs)) for j in range(n)}

    def chunk(index: int, text: str, lp: Any, finish: str | None) -> str:
        obj = {"id": rid, "object": "text_completion", "created": created, "model": model,
               "system_fingerprint": "hearth",
               "choices": [{"index": index, "text": text, "logprobs": lp, "finish_reason": finish}]}
        if include_usage:
            obj["usage"] = None
        return sse(obj)

    completion_tokens = 0
    echoed: set[int] = set()
    async for p, c in merge(runs):
        o = c.out
        i = p * n + o.index
        ch = choices[i]
        tb = c.token_bytes or {}
        text = ""
        lp: dict | None = None
        if echo and i not in echoed:
            echoed.add(i)
            text = _prompt_text(runs[p].started)
            if o.prompt_logprobs is not None:
                lp = _echo_logprobs(ch, o.prompt_logprobs, runs[p].started, tb)
        more = ch.add_logprobs(o.logprobs, tb)
        if more:
            lp = more if lp is None else {k: lp[k] + more[k] for k in lp}
        text += o.text
        finish = None
        if o.finish_reason is not None:
            finish = "stop" if o.finish_reason == "abort" else o.finish_reason
            completion_tokens += o.usage.completion_tokens
        if text or lp is not None:
            yield chunk(i, text, lp, None)
        if finish is not None:  # as OpenAI: the finish in a chunk of its own, with no text
            yield chunk(i, "", None, finish)
    if include_usage:
        prompt_tokens = sum(len(r.started.prompt_token_ids) for r in runs)
        yield sse({"id": rid, "object": "text_completion", "created": created, "model": model,
                   "choices": [], "usage": usage_dict(prompt_tokens, completion_tokens)})
    yield DONE
