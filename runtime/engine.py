"""The engine: one loop that schedules, runs one batched forward, samples, detokenizes and stops.

    engine = Engine.from_model("smollm2-135m-instruct")          # GGUF -> llama.cpp backend
    req = to_generation_request(engine.tokenizer, PromptRequest(messages=[...]))   # runtime/prompt.py
    async for out in engine.generate(req): print(out.text, end="")
    engine.generate_sync(req)                                    # blocking helper for scripts

The engine knows nothing about HTTP or chat templates; it takes prompt token ids and returns
`GenerationOutput`s. The loop runs on its own thread so the
model's forward never blocks an event loop; results cross back with call_soon_threadsafe.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator, Callable, Iterator

import numpy as np

from .backends.base import Backend, SeqWork
from .detokenizer import StreamingDetokenizer
from .errors import CapacityError, ContextLengthExceeded, EngineDeadError, HearthError, InvalidRequestError
from .guided import compiler_for
from .sampling import SamplerState, prompt_logprobs, sample
from .scheduler import Scheduler, Sequence
from .types import (CompletionResult, GenerationOutput, GenerationRequest, SamplingParams, TokenLogprob,
                    Usage)

log = logging.getLogger("hearth.engine")

Sink = Callable[[object], None]


@dataclass(eq=False)
class _SeqState:
    params: SamplingParams
    sampler: SamplerState
    detok: StreamingDetokenizer
    sink: Sink
    prompt_lp: list[TokenLogprob | None] | None = None
    prompt_lp_sent: bool = False
    plp_acc: list[TokenLogprob | None] | None = None
    finished: bool = False
    first_token_time: float | None = None


@dataclass
class EngineStats:
    running: int
    waiting: int
    kv_usage: float
    kv_active_sequences: int
    prompt_tokens: int
    generation_tokens: int
    prefix_cache_hit_tokens: int
    steps: int


@dataclass
class _Totals:
    prompt_tokens: int = 0
    generation_tokens: int = 0
    cached_tokens: int = 0
    steps: int = 0


class Engine:
    """Continuous batching over one backend. Thread-safe: generate/abort may be called from any thread."""

    def __init__(self, backend: Backend, *, max_num_seqs: int = 32, max_num_batched_tokens: int = 512,
                 max_queue: int = 1024, prefix_cache: bool = True):
        self.backend = backend
        self.tokenizer = backend.tokenizer
        # a sequence must fit in KV memory on its own, or it could never finish
        self.max_model_len = min(backend.max_model_len, backend.kv.capacity_tokens())
        if self.max_model_len < backend.max_model_len:
            log.warning("KV memory holds %d tokens: context limited to that (model allows %d)",
                        self.max_model_len, backend.max_model_len)
        self.max_queue = max_queue
        self.scheduler = Scheduler(backend.kv, max_num_seqs=max_num_seqs,
                                   max_num_batched_tokens=max_num_batched_tokens, prefix_cache=prefix_cache)
        self._cv = threading.Condition()
        self._incoming: list[Sequence] = []
        self._aborts: set[str] = set()
        self._by_request: dict[str, list[Sequence]] = {}
        self._seq_ids = itertools.count()
        self._totals = _Totals()
        self._dead: BaseException | None = None
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="hearth-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_model(cls, model: str | Path | None = None, backend: str = "auto", *,
                   engine_kwargs: dict | None = None, **backend_kwargs) -> "Engine":
        """Load a model by registered name or path. GGUF files use llama.cpp, HF directories transformers."""
        from .registry import DEFAULT_MODEL, resolve_model

        prefer = "hf" if backend == "transformers" else "gguf"
        path = Path(resolve_model(model or DEFAULT_MODEL, prefer=prefer))
        if backend == "auto":
            from .checkpoint import inspect_checkpoint
            backend = "llamacpp" if inspect_checkpoint(path).format == "gguf" else "transformers"
        if backend == "llamacpp":
            from .backends.llamacpp import LlamaCppBackend
            be = LlamaCppBackend(str(path), **backend_kwargs)
        elif backend == "transformers":
            from .backends.transformers import TransformersBackend
            be = TransformersBackend(path, **backend_kwargs)
        else:
            raise InvalidRequestError(f"backend must be auto, llamacpp or transformers; got {backend!r}",
                                      param="backend")
        return cls(be, **(engine_kwargs or {}))

    # ---- the public contract ----------------------------------------------------------------
    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationOutput]:
        """Stream outputs of every choice of the request; abandoning the iterator aborts it."""
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        rid = request.request_id

        def sink(item: object) -> None:
            try:
                loop.call_soon_threadsafe(q.put_nowait, item)
            except RuntimeError:  # the caller's event loop closed under a running request: nobody reads it
                self._aborts.add(rid)

        remaining = self._submit(request, sink)
        try:
            while remaining:
                item = _checked(await q.get())
                remaining -= item.finish_reason is not None
                yield item
        finally:
            if remaining:
                self.abort(request.request_id)

    def abort(self, request_id: str) -> None:
        """Stop a request; its sequences finish with finish_reason 'abort' and free their KV."""
        with self._cv:
            self._aborts.add(request_id)
            self._cv.notify()

    def stream_sync(self, request: GenerationRequest) -> Iterator[GenerationOutput]:
        """Blocking iterator over a request's outputs, for scripts and the terminal chat."""
        q: queue.Queue = queue.Queue()
        remaining = self._submit(request, q.put)
        try:
            while remaining:
                item = _checked(q.get())
                remaining -= item.finish_reason is not None
                yield item
        finally:
            if remaining:
                self.abort(request.request_id)

    def generate_sync(self, request: GenerationRequest) -> list[CompletionResult]:
        """Run a request to the end and return one result per choice (index order)."""
        results: dict[int, CompletionResult] = {}
        prompt_ids = list(request.prompt_token_ids)
        for out in self.stream_sync(request):
            r = results.setdefault(out.index, CompletionResult(
                request.request_id, out.index, "", [], prompt_ids, None,
                logprobs=[] if request.params.logprobs else None))
            r.text += out.text
            r.token_ids.extend(out.token_ids)
            if out.logprobs and r.logprobs is not None:
                r.logprobs.extend(out.logprobs)
            if out.prompt_logprobs is not None:
                r.prompt_logprobs = out.prompt_logprobs
            if out.finish_reason is not None:
                r.finish_reason, r.stop_reason, r.usage = out.finish_reason, out.stop_reason, out.usage
        return [results[i] for i in sorted(results)]

    def stats(self) -> EngineStats:
        with self._cv:
            return EngineStats(
                running=len(self.scheduler.running), waiting=len(self.scheduler.waiting) + len(self._incoming),
                kv_usage=self.backend.kv.usage(), kv_active_sequences=self.backend.kv.num_active(),
                prompt_tokens=self._totals.prompt_tokens, generation_tokens=self._totals.generation_tokens,
                prefix_cache_hit_tokens=self._totals.cached_tokens, steps=self._totals.steps)

    @property
    def healthy(self) -> bool:
        return self._dead is None and self._thread.is_alive()

    def shutdown(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify()
        self._thread.join(timeout=30)
        self.backend.close()

    def token_bytes(self, ids: list[int]) -> list[bytes]:
        """The raw bytes of each token (a multi-byte character may span tokens): b"".join of them
        decodes to the text `tokenizer.decode(ids)` gives. Special tokens give b"" (decode skips them)."""
        return [self.tokenizer.token_bytes(int(t)) for t in ids]

    def check_prompt(self, request: GenerationRequest) -> None:
        """Refuse a request the engine could never run: ids outside the vocabulary, a prompt that
        leaves no room in the context, a guided grammar that does not compile."""
        ids = request.prompt_token_ids
        tok = self.tokenizer
        bad = next((t for t in ids if t >= tok.vocab_size), None)
        if bad is not None:
            raise InvalidRequestError(f"token id {bad} is outside the vocabulary (size {tok.vocab_size})",
                                      param="prompt")
        p = request.params
        scoring = p.prompt_logprobs is not None and p.max_tokens == 0
        if len(ids) > self.max_model_len or (len(ids) == self.max_model_len and not scoring):
            raise ContextLengthExceeded(len(ids), self.max_model_len)
        if p.guided is not None:
            compiler_for(tok).check(p.guided)

    # ---- request intake (caller's thread) ---------------------------------------------------
    def _submit(self, request: GenerationRequest, sink: Sink) -> int:
        if self._dead is not None:
            raise EngineDeadError(f"the engine stopped: {self._dead!r}")
        self.check_prompt(request)
        ids = list(request.prompt_token_ids)
        p = request.params
        # one grammar matcher per choice, compiled here so a bad grammar fails before anything streams
        guides = compiler_for(self.tokenizer).matchers(p.guided, p.n) if p.guided is not None else [None] * p.n
        with self._cv:
            if request.request_id in self._by_request:
                raise InvalidRequestError(f"request id {request.request_id!r} is already running",
                                          param="request_id")
            if len(self.scheduler.waiting) + len(self._incoming) >= self.max_queue:
                raise CapacityError(f"the engine queue is full ({self.max_queue} waiting sequences)")
            seqs = []
            for i in range(p.n):
                seq = Sequence(next(self._seq_ids), request.request_id, i, ids, p.max_tokens,
                               prompt_logprobs=p.prompt_logprobs is not None,
                               wait_for=seqs[0] if seqs else None)
                seq.state = _SeqState(p, SamplerState(p, ids, index=i, guide=guides[i]),
                                      StreamingDetokenizer(self.tokenizer.decode, p.stop, ids), sink)
                seqs.append(seq)
            self._by_request[request.request_id] = seqs
            self._incoming.extend(seqs)
            self._cv.notify()
        return len(seqs)

    # ---- the loop (engine thread) -----------------------------------------------------------
    def _loop(self) -> None:
        try:
            while True:
                with self._cv:
                    while not (self._incoming or self._aborts or self.scheduler.has_work() or self._stopping):
                        self._cv.wait()
                    if self._stopping:
                        return
                    incoming, self._incoming = self._incoming, []
                    aborts, self._aborts = self._aborts, set()
                    for seq in incoming:
                        self.scheduler.add(seq)
                    for rid in aborts:
                        for seq in self._by_request.get(rid, []):
                            if not seq.state.finished:
                                self._finish(seq, "", [], None, "abort", None)
                if self.scheduler.has_work():
                    self._step()
        except BaseException as e:  # a dead loop must not leave callers waiting forever
            log.exception("engine loop died")
            self._dead = e
            with self._cv:
                for seqs in self._by_request.values():
                    for seq in seqs:
                        if not seq.state.finished:
                            seq.state.sink(EngineDeadError(f"the engine stopped: {e!r}"))

    def _step(self) -> None:
        items = self.scheduler.schedule()
        if not items:
            # nothing fits even alone: fail the head of the queue instead of spinning
            if self.scheduler.waiting and not self.scheduler.running:
                seq = self.scheduler.waiting[0]
                with self._cv:
                    self._finish(seq, "", [], None, None, None,
                                 error=CapacityError("the request does not fit in KV memory"))
            return
        work = []
        for it in items:
            s = it.seq
            start, end = s.num_computed, s.num_computed + it.num_tokens
            all_logits = s.prompt_logprobs and s.state.prompt_lp is None
            work.append(SeqWork(s.seq_id, s.token_slice(start, end), start, all_logits=all_logits,
                                need_logits=end == s.num_tokens or all_logits,
                                alone=s.scoring and start == 0 and end == s.num_tokens))
        logits = self.backend.forward(work)
        self._totals.steps += 1
        rows, seqs = [], []
        for it, w, lg in zip(items, work, logits):
            s = it.seq
            s.num_computed += it.num_tokens
            if w.all_logits:
                self._collect_prompt_logprobs(s, w, lg)
            if s.num_computed == s.num_tokens:
                if s.state.prompt_lp is not None and s.max_tokens == 0:
                    with self._cv:
                        self._finish(s, "", [], None, "length", None)
                    continue
                rows.append(lg[-1] if w.all_logits else lg)
                seqs.append(s)
        if not seqs:
            return
        tokens, lps = sample(np.stack(rows), [s.state.sampler for s in seqs])
        with self._cv:
            for s, tok, lp in zip(seqs, tokens, lps):
                if not s.state.finished:
                    self._append(s, int(tok), lp)

    def _collect_prompt_logprobs(self, s: Sequence, w: SeqWork, lg: np.ndarray) -> None:
        st = s.state
        if st.plp_acc is None or w.start_pos == 0:  # (re)started, e.g. after a preemption
            st.plp_acc = [None]  # the first prompt token has no logprob
        acc = st.plp_acc
        n_prompt = len(s.prompt_ids)
        targets = s.prompt_ids[w.start_pos + 1:min(w.start_pos + len(w.token_ids) + 1, n_prompt)]
        if targets:
            acc.extend(prompt_logprobs(lg[:len(targets)], targets, st.params.prompt_logprobs or 0))
        if w.start_pos + len(w.token_ids) >= n_prompt:
            st.prompt_lp = acc

    def _append(self, s: Sequence, tok: int, lp: TokenLogprob | None) -> None:
        st = s.state
        p = st.params
        s.output_ids.append(tok)
        st.sampler.append(tok)
        self._totals.generation_tokens += 1
        if st.first_token_time is None:
            st.first_token_time = time.monotonic()
        finish, reason, delta = None, None, ""
        if not p.ignore_eos and tok in self.tokenizer.eos_token_ids:
            finish = "stop"
        elif tok in p.stop_token_ids:
            finish, reason = "stop", tok
        else:
            delta = st.detok.add([tok])
            if st.detok.stop_matched is not None:
                finish, reason = "stop", st.detok.stop_matched
        guide = st.sampler.guide
        if guide is not None and (guide.error is not None or tok in self.tokenizer.eos_token_ids):
            if guide.error is not None:  # never seen in practice: end the choice, keep the engine alive
                log.warning("guided decoding of request %s failed at output token %d: %s; finishing it",
                            s.request_id, len(s.output_ids), guide.error)
            if finish is None:  # EOS under ignore_eos: the grammar allows nothing after it
                finish = "stop"
        if finish is None and (len(s.output_ids) >= s.max_tokens or s.num_tokens >= self.max_model_len):
            finish = "length"
        if finish is not None and not isinstance(reason, str):  # a stop string already cut the text
            delta += st.detok.finish()
        if finish is None:
            self._emit(s, delta, [tok], lp, None, None)
        else:
            self._finish(s, delta, [tok], lp, finish, reason)

    def _emit(self, s: Sequence, delta: str, toks: list[int], lp, finish, reason, usage=None) -> None:
        st = s.state
        plp = None
        if st.prompt_lp is not None and not st.prompt_lp_sent:
            plp, st.prompt_lp_sent = st.prompt_lp, True
        st.sink(GenerationOutput(s.request_id, s.index, delta, toks, [lp] if lp is not None else None,
                                 plp, finish, reason, usage))

    def _finish(self, s: Sequence, delta: str, toks: list[int], lp, finish, reason,
                error: HearthError | None = None) -> None:
        """Close one choice (caller holds the lock): free its KV, send its last output or error."""
        st = s.state
        st.finished = True
        self.scheduler.remove(s)
        self._totals.prompt_tokens += len(s.prompt_ids)
        self._totals.cached_tokens += s.num_cached
        if error is not None:
            st.sink(error)
        else:
            usage = Usage(len(s.prompt_ids), len(s.output_ids), s.num_cached)
            self._emit(s, delta, toks, lp, finish, reason, usage)
        seqs = self._by_request.get(s.request_id, [])
        if all(x.state.finished for x in seqs):
            self._by_request.pop(s.request_id, None)


def _checked(item: object) -> GenerationOutput:
    """An item from a request's output queue: outputs pass through, an engine error is raised."""
    if isinstance(item, BaseException):
        raise item
    return item
