"""What the chat and completions routes share: sampling params from a request, running an engine
request with a deadline and metrics, merging several streams, SSE framing and responses, abort on
disconnect, logprob formatting."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any, AsyncIterator

from hearth.runtime.errors import HearthError
from hearth.runtime.prompt import PromptRequest
from hearth.runtime.types import SamplingParams

from fastapi import Request
from fastapi.responses import StreamingResponse

from .errors import APIError, from_exception, invalid, timeout
from .metrics import Metrics
from .model_service import Chunk, ModelInfo, Started

DONE = "data: [DONE]\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


def sampling_params(body: Any, info: ModelInfo, *, max_tokens: int | None, n: int, logprobs: bool = False,
                    top_logprobs: int = 0, prompt_logprobs: int | None = None, guided=None,
                    default_max_tokens: int | None = None) -> SamplingParams:
    """SamplingParams from the request's fields over the model's configured defaults."""
    d = info.default_sampling

    def pick(name: str, fallback):
        v = getattr(body, name, None)
        return d.get(name, fallback) if v is None else v

    if max_tokens is None:
        max_tokens = d.get("max_tokens", default_max_tokens or info.max_model_len)
    bias = {int(k): float(v) for k, v in (body.logit_bias or {}).items()}
    bad = [t for t in bias if t >= info.vocab_size]
    if bad:
        raise APIError(400, f"logit_bias token id {bad[0]} is outside the vocabulary (size {info.vocab_size})",
                       param="logit_bias")
    kw = dict(max_tokens=max_tokens, temperature=pick("temperature", 1.0), top_p=pick("top_p", 1.0),
              top_k=pick("top_k", 0), min_p=pick("min_p", 0.0),
              repetition_penalty=pick("repetition_penalty", 1.0),
              presence_penalty=pick("presence_penalty", 0.0), frequency_penalty=pick("frequency_penalty", 0.0),
              logit_bias=bias, seed=pick("seed", None), stop=pick("stop", None) or [],
              ignore_eos=bool(body.ignore_eos), n=n, logprobs=logprobs, top_logprobs=top_logprobs,
              prompt_logprobs=prompt_logprobs)
    if guided is not None:
        kw["guided"] = guided
    return SamplingParams(**kw)


class Run:
    """One engine request as a route sees it: `start()` then `chunks()`; `close()` aborts it."""

    def __init__(self, client: Any, request: PromptRequest, *, model: str, metrics: Metrics,
                 t0: float, deadline: float, want_bytes: bool = False, echo_bytes: bool = False,
                 prompt_param: str = "messages"):
        self.request = request
        self.model, self.metrics, self.t0, self.deadline = model, metrics, t0, deadline
        self.prompt_param = prompt_param
        self._gen = client.generate(request, want_bytes=want_bytes, echo_bytes=echo_bytes)
        self._last: float | None = None
        self.started: Started | None = None

    def _left(self) -> float:
        return self.deadline - time.monotonic()

    async def start(self) -> Started:
        """Wait for the engine to accept the request; raise APIError for any refusal."""
        try:
            item = await asyncio.wait_for(self._gen.__anext__(), timeout=max(self._left(), 0.001))
        except asyncio.TimeoutError:
            raise timeout(self.deadline - self.t0) from None
        except StopAsyncIteration:
            raise APIError(500, "the model returned nothing", "server_error") from None
        except (HearthError, APIError) as e:
            raise from_exception(e, self.prompt_param) from None
        if not isinstance(item, Started):
            raise APIError(500, "the model stream began without its prompt", "server_error")
        self.started = item
        return item

    async def chunks(self) -> AsyncIterator[Chunk]:
        """The engine outputs, each within the deadline; records TTFT, ITL and token counts."""
        m = self.metrics
        while True:
            try:
                item = await asyncio.wait_for(self._gen.__anext__(), timeout=max(self._left(), 0.001))
            except StopAsyncIteration:
                return
            except asyncio.TimeoutError:
                raise timeout(self.deadline - self.t0) from None
            except (HearthError, APIError) as e:
                raise from_exception(e, self.prompt_param) from None
            now = time.monotonic()
            out = item.out
            if out.token_ids:
                if self._last is None:
                    m.ttft.labels(self.model).observe(now - self.t0)
                else:
                    m.itl.labels(self.model).observe((now - self._last) / len(out.token_ids))
                self._last = now
            if out.usage is not None:
                m.prompt_tokens.labels(self.model).inc(out.usage.prompt_tokens if out.index == 0 else 0)
                m.completion_tokens.labels(self.model).inc(out.usage.completion_tokens)
            yield item

    async def close(self) -> None:
        await self._gen.aclose()


async def merge(runs: list[Run]) -> AsyncIterator[tuple[int, Chunk]]:
    """Chunks of several runs as they arrive, tagged with the run's position."""
    if len(runs) == 1:
        async for c in runs[0].chunks():
            yield 0, c
        return
    q: asyncio.Queue = asyncio.Queue()
    _end = object()

    async def pump(i: int, run: Run) -> None:
        try:
            async for c in run.chunks():
                await q.put((i, c))
        except BaseException as e:  # surfaced to the consumer, which stops everything
            await q.put((i, e))
        finally:
            await q.put((i, _end))

    tasks = [asyncio.create_task(pump(i, r)) for i, r in enumerate(runs)]
    live = len(runs)
    try:
        while live:
            i, item = await q.get()
            if item is _end:
                live -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def start_all(runs: list[Run]) -> list[Started]:
    """Start every run; if one is refused, close the others and raise its error."""
    try:
        return list(await asyncio.gather(*(r.start() for r in runs)))
    except BaseException:
        await asyncio.gather(*(r.close() for r in runs), return_exceptions=True)
        raise


def token_text(b: bytes) -> str:
    return b.decode("utf-8", errors="replace")


def chat_logprobs(lps, tb: dict[int, bytes]) -> list[dict]:
    """OpenAI chat logprobs `content` entries for a list of TokenLogprob."""
    out = []
    for lp in lps:
        b = tb.get(lp.token_id, b"")
        out.append({"token": token_text(b), "logprob": lp.logprob, "bytes": list(b),
                    "top_logprobs": [{"token": token_text(tb.get(t, b"")), "logprob": v,
                                      "bytes": list(tb.get(t, b""))} for t, v in lp.top]})
    return out


def usage_dict(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


# ---- the HTTP side of a run --------------------------------------------------------------------

def route_run(request: Request, client: Any, req: PromptRequest, *, model: str, t0: float, **kw) -> Run:
    """A Run with the app's metrics and a deadline of request_timeout_s after t0."""
    state = request.app.state
    return Run(client, req, model=model, metrics=state.metrics, t0=t0,
               deadline=t0 + state.config.request_timeout_s, **kw)


def include_usage(body: Any) -> bool:
    return bool(body.stream_options and body.stream_options.include_usage)


def check_stream_options(body: Any) -> None:
    """stream_options only with stream: true (400 otherwise, as at OpenAI)."""
    if body.stream_options is not None and not body.stream:
        raise invalid("The 'stream_options' parameter is only allowed when 'stream' is enabled.", "stream_options")


async def start_runs(runs: list[Run], request: Request) -> None:
    """Start the runs, aborting them if the client goes away first."""
    await until_done(request, start_all(runs), runs)


async def until_done(request: Request, coro, runs: list[Run]):
    """Await coro, but abort the runs (and answer 499) if the client disconnects meanwhile."""
    task = asyncio.ensure_future(coro)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await asyncio.gather(*(r.close() for r in runs), return_exceptions=True)
        raise APIError(499, "The client closed the request.", code="client_closed_request")
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()


async def _disconnected(request: Request) -> None:
    while True:
        msg = await request.receive()
        if msg["type"] == "http.disconnect":
            return


async def prepend(first: str, rest: AsyncIterator[str]) -> AsyncIterator[str]:
    yield first
    async for s in rest:
        yield s


def sse_response(chunks: AsyncIterator[str], runs: list[Run] = ()) -> StreamingResponse:
    """The chunks as an SSE response; an error once streaming has begun goes out as an SSE error event,
    and the runs are closed however the stream ends."""
    async def body() -> AsyncIterator[str]:
        try:
            async for s in chunks:
                yield s
        except Exception as e:  # the stream has begun: the error goes out as an SSE event
            yield from_exception(e).sse()
        finally:
            await asyncio.gather(*(r.close() for r in runs), return_exceptions=True)

    return StreamingResponse(body(), media_type="text/event-stream", headers=SSE_HEADERS)
