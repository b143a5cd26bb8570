"""One served model: an engine plus what the HTTP layer asks of it, in plain picklable data.

The same class runs in-process (`hearth serve --no-ray`, tests) and inside a Ray Serve replica
(ray_app.py wraps it in a deployment), so the FastAPI app talks to both through one interface:

    svc = ModelService(ModelConfig(name="smollm2-135m-instruct"))
    info = await svc.info()
    async for item in svc.generate(PromptRequest(messages=[...]), want_bytes=False):
        ...   # first a Started, then one Chunk per engine output

The prompt is rendered and tokenized here, once (runtime/prompt.py), in a small bounded pool of
worker threads, never on the event loop: a huge prompt costs a worker, not the server's
responsiveness. The engine then sees token ids only. A bad request (context too long, bad schema)
raises before the first item, so the app can still answer with a 4xx instead of a broken stream.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import AsyncIterator

from hearth.runtime.engine import Engine, EngineStats
from hearth.runtime.errors import CapacityError
from hearth.runtime.prompt import PromptRequest, encode_prompt, to_generation_request
from hearth.runtime.types import GenerationOutput, GenerationRequest

from .config import ModelConfig

log = logging.getLogger("hearth.serve")

_CPU_DEFAULT_CONTEXT = 4096
# Threads that render and tokenize prompts: tokenizers release the GIL, so a few run in parallel
# with the event loop and the engine thread; more would only compete for the same cores.
_PREP_WORKERS = max(1, min(4, (os.cpu_count() or 2) // 2))


@dataclass
class ModelInfo:
    name: str
    aliases: list[str]
    max_model_len: int
    vocab_size: int
    backend: str
    chat_template: str | None
    tool_parser: str
    """The tool-call family (configured, or detected from the chat template)."""
    tool_special_ids: dict[str, int]
    """The family's markers that are single special tokens, as the grammar must name them."""
    default_sampling: dict
    created: int
    path: str
    lineage: dict = field(default_factory=dict)
    """stage / parent / method from the checkpoint's manifest, shown in /v1/models."""


@dataclass
class Started:
    """The first item of every stream: the prompt as the engine sees it."""

    prompt_token_ids: list[int]
    prompt_token_bytes: list[bytes] | None = None


@dataclass
class Chunk:
    """One engine output, plus the raw bytes of every token its logprobs mention."""

    out: GenerationOutput
    token_bytes: dict[int, bytes] | None = None


class ModelService:
    """Loads the model on construction (blocking); everything else is async and never blocks."""

    def __init__(self, config: ModelConfig, chat_template: str | None = None):
        self.config = config
        self.created = int(time.time())
        kwargs = dict(config.backend_options)
        backend = config.backend
        from hearth.runtime.checkpoint import inspect_checkpoint
        from hearth.runtime.registry import resolve_model

        prefer = "hf" if backend == "transformers" else "gguf"
        self.path = resolve_model(config.source, prefer=prefer)
        fmt = inspect_checkpoint(self.path).format
        if backend == "auto":
            backend = "llamacpp" if fmt == "gguf" else "transformers"
        if backend == "llamacpp":
            kwargs.setdefault("n_ctx", config.context_length or _CPU_DEFAULT_CONTEXT)
            # a slot per decoded sequence, plus room for cached prefixes
            kwargs.setdefault("n_seq_max", min(256, config.max_num_seqs + 8))
            if config.num_gpus > 0:
                kwargs.setdefault("n_gpu_layers", -1)
        else:
            kwargs.setdefault("dtype", config.dtype)
            if config.quantization:
                kwargs.setdefault("quantization", config.quantization)
            if config.context_length:
                kwargs.setdefault("max_model_len", config.context_length)
        engine_kwargs = {"max_num_seqs": config.max_num_seqs, "max_queue": config.max_queued_requests}
        log.info("loading %s from %s (%s backend)", config.name, self.path, backend)
        self.engine = Engine.from_model(self.path, backend=backend, engine_kwargs=engine_kwargs, **kwargs)
        if chat_template:
            self.engine.tokenizer.chat_template = chat_template
        self.backend = backend
        self._lineage = _lineage(self.path)
        self._prep = ThreadPoolExecutor(_PREP_WORKERS, thread_name_prefix=f"hearth-prep-{config.name}")
        self._prep_slots = config.max_queued_requests  # prompts waiting for or in a worker

    async def info(self) -> ModelInfo:
        from hearth.runtime.guided import compiler_for

        from . import tool_parsers

        tok = self.engine.tokenizer
        c = self.config
        family = c.tool_parser or tool_parsers.detect_family(tok.chat_template)
        special = tool_parsers.special_ids(tool_parsers.get_parser(family), compiler_for(tok).lltokenizer)
        return ModelInfo(name=c.name, aliases=list(c.aliases), max_model_len=self.engine.max_model_len,
                         vocab_size=tok.vocab_size, backend=self.backend, chat_template=tok.chat_template,
                         tool_parser=family, tool_special_ids=special, default_sampling=dict(c.default_sampling),
                         created=self.created, path=str(self.path), lineage=self._lineage)

    async def prepare(self, request: PromptRequest) -> GenerationRequest:
        """The engine request: the prompt rendered, tokenized and checked in the worker pool.
        More prompts waiting than the queue allows get a 429 rather than an unbounded backlog."""
        return await self._in_pool(self._prepare_sync, request)

    async def prompt_ids(self, request: PromptRequest) -> list[int]:
        """The prompt token ids `request` stands for (template applied), in the worker pool, without
        generating: /tokenize and the prompt-token count."""
        return await self._in_pool(encode_prompt, self.engine.tokenizer, request)

    async def detokenize(self, ids: list[int]) -> str:
        return await self._in_pool(self.engine.tokenizer.decode, ids)

    async def _in_pool(self, fn, *args):
        if self._prep_slots <= 0:
            raise CapacityError("too many prompts are being prepared; retry shortly")
        self._prep_slots -= 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._prep, fn, *args)
        finally:
            self._prep_slots += 1

    def _prepare_sync(self, request: PromptRequest) -> GenerationRequest:
        req = to_generation_request(self.engine.tokenizer, request)
        self.engine.check_prompt(req)
        return req

    async def generate(self, request: PromptRequest, want_bytes: bool = False, echo_bytes: bool = False,
                       interval_s: float | None = None) -> AsyncIterator[Started | Chunk]:
        """Stream a request: Started, then Chunks. Leaving the iterator early aborts the request.

        With interval_s > 0 (default: the config's stream_interval_ms), outputs that arrive within
        interval_s of the previous chunk are merged into the next one (per choice, in order); the first
        chunk and the end of the stream are never held."""
        if interval_s is None:
            interval_s = (self.config.stream_interval_ms or 0) / 1000
        engine = self.engine
        request = await self.prepare(request)
        ids = request.prompt_token_ids
        prompt_bytes = engine.token_bytes(ids) if echo_bytes else None
        gen = engine.generate(request)
        try:
            first = await gen.__anext__()  # errors raised at submit time surface here, before Started
            yield Started(ids, prompt_bytes)
            yield self._chunk(first, want_bytes)
            if interval_s <= 0:
                async for out in gen:
                    yield self._chunk(out, want_bytes)
                return
            async for outs in _batched(gen, interval_s):
                for out in outs:
                    yield self._chunk(out, want_bytes)
        finally:
            await gen.aclose()

    def _chunk(self, out: GenerationOutput, want_bytes: bool) -> Chunk:
        if not want_bytes:
            return Chunk(out)
        ids: set[int] = set()
        for lps in (out.logprobs or [], out.prompt_logprobs or []):
            for lp in lps:
                if lp is not None:
                    ids.add(lp.token_id)
                    ids.update(t for t, _ in lp.top)
        ordered = sorted(ids)
        return Chunk(out, dict(zip(ordered, self.engine.token_bytes(ordered))))

    async def stats(self) -> EngineStats:
        return self.engine.stats()

    async def healthy(self) -> bool:
        return self.engine.healthy

    async def tokenize(self, text: str) -> list[int]:
        return self.engine.tokenizer.encode(text, add_special_tokens=False, parse_special=False)

    def shutdown(self) -> None:
        self._prep.shutdown(wait=False, cancel_futures=True)
        self.engine.shutdown()


async def _batched(gen: AsyncIterator[GenerationOutput], interval_s: float) -> AsyncIterator[list[GenerationOutput]]:
    """Group a stream's outputs: after each batch goes out, wait up to interval_s collecting what the
    engine produces, merged per choice. Ends as soon as the stream does."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump() -> None:
        try:
            async for out in gen:
                queue.put_nowait(out)
        except BaseException as e:  # handed to the consumer, raised there
            queue.put_nowait(e)
            return
        queue.put_nowait(done)

    task = asyncio.create_task(pump())
    try:
        last = loop.time()
        while True:
            item = await queue.get()
            batch: list = [item]
            wait = last + interval_s - loop.time()
            if wait > 0 and item is not done and not isinstance(item, BaseException):
                await asyncio.sleep(wait)
            while not queue.empty():
                batch.append(queue.get_nowait())
            ended = batch[-1] is done or isinstance(batch[-1], BaseException)
            outs = merge_outputs([b for b in batch if isinstance(b, GenerationOutput)])
            if outs:
                yield outs
            last = loop.time()
            if ended:
                if isinstance(batch[-1], BaseException):
                    raise batch[-1]
                return
    finally:
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass


def merge_outputs(outs: list[GenerationOutput]) -> list[GenerationOutput]:
    """The outputs of each choice joined into one (text and tokens in order, the last one's end),
    in the order the choices first appear."""
    merged: list[GenerationOutput] = []
    open_: dict[int, GenerationOutput] = {}
    for out in outs:
        prev = open_.get(out.index)
        if prev is None:
            prev = GenerationOutput(
                request_id=out.request_id, index=out.index, text=out.text, token_ids=list(out.token_ids),
                logprobs=None if out.logprobs is None else list(out.logprobs),
                prompt_logprobs=out.prompt_logprobs, finish_reason=out.finish_reason,
                stop_reason=out.stop_reason, usage=out.usage)
            merged.append(prev)
        else:
            prev.text += out.text
            prev.token_ids.extend(out.token_ids)
            if out.logprobs is not None:
                prev.logprobs = (prev.logprobs or []) + list(out.logprobs)
            if prev.prompt_logprobs is None:
                prev.prompt_logprobs = out.prompt_logprobs
            prev.finish_reason, prev.stop_reason, prev.usage = out.finish_reason, out.stop_reason, out.usage
        if prev.finish_reason is None:
            open_[out.index] = prev
        else:
            open_.pop(out.index, None)
    return merged


def _lineage(path) -> dict:
    from hearth.runtime.checkpoint import read_manifest

    try:
        m = read_manifest(path)
    except Exception as e:  # a model without a readable manifest still serves
        log.warning("%s: manifest not readable: %s", path, e)
        return {}
    if m is None:
        return {}
    out: dict = {"stage": m.stage}
    if m.method:
        out["method"] = m.method
    if m.parent is not None:
        out["parent"] = {"path": m.parent.path, "content_hash": m.parent.content_hash}
    return out
