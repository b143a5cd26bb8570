"""RAG indexes and agent runs behind the HTTP routes of agents_routes.py.

    svc = AgentService(config, router)                 # router: the served chat models
    await svc.rag_add("notes", RagDocumentsRequest(documents=[{"source": "a.md", "text": "..."}]))
    async for event in svc.run(AgentRunRequest(input="What is 17*23?", strategy="react")):
        ...                                            # {"type": "step", ...} then {"type": "result", ...}

Without Ray this object lives in the server process; under Ray Serve it is the `agents` deployment, whose
router holds handles to the model deployments (ray_app.py), and the ingress calls it through a handle.
Blocking work (embedding, FAISS, file extraction) runs in threads so the event loop keeps streaming.
Documents are capped (agents.max_document_bytes each, agents.max_request_bytes per request: 413 beyond),
and an ingest whose call is cancelled (its client went away) stops between embedding batches.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import threading
import time
import uuid
from pathlib import Path
from typing import Any, AsyncIterator

from hearth.agents.embed import SentenceTransformerEmbedder
from hearth.agents.rag import IndexStore, build_rag_messages, citations, extract_text
from hearth.agents.reasoning.common import message_text
from hearth.agents.strategies import StrategyOptions, default_budget, run_strategy
from hearth.agents.tools import default_registry
from hearth.agents.types import AgentInputError, Budget, Trace
from hearth.runtime.registry import hearth_home

from .agent_model import ServedChatModel
from .config import ServeConfig
from .errors import APIError, invalid
from .metrics import Metrics
from .protocol import AgentRunRequest, RagDocumentsRequest, RagQueryRequest, RagSpec
from .router import Router

log = logging.getLogger("hearth.serve")


class AgentService:
    """Named RAG indexes under `agents.rag_dir` and agent runs against the router's chat models."""

    def __init__(self, config: ServeConfig, router: Router):
        self.config, self.cfg, self.router = config, config.agents, router
        self.metrics = Metrics()  # engine-level timings of agent calls; HTTP counts stay with the ingress
        root = Path(self.cfg.rag_dir).expanduser() if self.cfg.rag_dir else hearth_home() / "rag"
        self.store = IndexStore(root, self._make_embedder)
        self._plans_dir = root.parent / (root.name + "-plans")
        self._plan_memory = None
        self._embedder = None

    def _make_embedder(self):
        if self._embedder is None:
            self._embedder = SentenceTransformerEmbedder(self.cfg.rag_embedding_model)
        return self._embedder

    def default_model(self) -> str:
        if self.cfg.model:
            return self.cfg.model
        if not self.router.chat:
            raise invalid("this server has no chat model for agents", "model")
        return next(iter(self.router.chat))  # the first configured model

    # ---- RAG ------------------------------------------------------------------------------------

    async def rag_add(self, name: str, req: RagDocumentsRequest) -> dict:
        """Ingest; cancelling the call (a client that went away) stops the embedding between batches,
        releases the index's lock and leaves the index at its last committed version."""
        total = 0
        items = []
        for i, d in enumerate(req.documents):
            text, size = await asyncio.to_thread(self._document_text, i, d)
            total += size
            if total > self.cfg.max_request_bytes:
                raise APIError(413, f"the documents of this request total more than {self.cfg.max_request_bytes} "
                                    f"bytes (agents.max_request_bytes); send them in several requests",
                               "invalid_request_error", "documents", "request_too_large")
            items.append((d.source, text))
        if req.paths and not self.cfg.rag_allowed_roots:
            raise invalid("this server ingests uploaded documents only: `paths` needs agents.rag_allowed_roots "
                          "in the server's config", "paths")
        if not items and not req.paths:
            raise invalid("give at least one document or path", "documents")
        stop = threading.Event()

        def work():
            index = self.store.get(name, create=req.create)
            reports = []
            if items:
                reports.append(index.add_texts(items, should_stop=stop.is_set))
            if req.paths:
                reports.append(index.ingest(req.paths, allowed_roots=self.cfg.rag_allowed_roots,
                                            max_file_bytes=self.cfg.max_document_bytes,
                                            max_total_bytes=self.cfg.max_request_bytes, progress=False,
                                            should_stop=stop.is_set))
            return index, reports

        try:
            index, reports = await asyncio.to_thread(work)
        except asyncio.CancelledError:
            stop.set()  # the thread stops at its next check and lets go of the lock
            log.info("RAG ingest into %r cancelled", name)
            raise
        out: dict[str, Any] = {"object": "rag.ingest", "index": name, "added": [], "replaced": [],
                               "unchanged": [], "skipped": []}
        for r in reports:
            out["added"] += r.added
            out["replaced"] += r.replaced
            out["unchanged"] += r.unchanged
            out["skipped"] += [{"source": s, "reason": why} for s, why in r.skipped]
        out["version"] = index.version
        out["documents"] = len(index.documents())
        return out

    def _too_large(self, source: str, size: int, param: str, what: str = "") -> APIError:
        return APIError(413, f"document {source!r} is {size} bytes{what}; the limit is "
                             f"{self.cfg.max_document_bytes} bytes per document (agents.max_document_bytes)",
                        "invalid_request_error", param, "document_too_large")

    def _document_text(self, i: int, d) -> tuple[str, int]:
        """A document's text (HTML stripped when format says so, or extracted from its bytes) and its
        size in bytes; 413 over agents.max_document_bytes, before and after extraction."""
        param = f"documents[{i}]"
        if (d.text is None) == (d.content_base64 is None):
            raise invalid("give exactly one of `text` and `content_base64`", param)
        if d.text is not None:
            param += ".text"
            if len(d.text) > self.cfg.max_document_bytes:  # at least that many bytes: no need to encode
                raise self._too_large(d.source, len(d.text.encode("utf-8")), param)
            data = d.text.encode("utf-8")
        else:
            param += ".content_base64"
            if len(d.content_base64) * 3 // 4 > self.cfg.max_document_bytes + 2:
                raise self._too_large(d.source, len(d.content_base64) * 3 // 4, param)
            try:
                data = base64.b64decode(d.content_base64, validate=True)
            except (binascii.Error, ValueError):
                raise invalid(f"document {d.source!r}: content_base64 is not valid base64", param) from None
        if len(data) > self.cfg.max_document_bytes:
            raise self._too_large(d.source, len(data), param)
        if d.text is not None and d.format in (None, "txt", "md"):
            return d.text, len(data)
        fmt = d.format or Path(d.source).suffix.lower().lstrip(".") or "txt"
        try:
            text = extract_text(Path(f"document.{fmt}"), data, d.source)
        except AgentInputError as e:
            raise invalid(str(e), param) from None
        extracted = len(text.encode("utf-8"))
        if extracted > self.cfg.max_document_bytes:  # a small compressed PDF can hold a lot of text
            raise self._too_large(d.source, extracted, param, " of text once extracted")
        return text, max(len(data), extracted)

    async def rag_query(self, name: str, req: RagQueryRequest) -> dict:
        def work():
            index = self.store.get(name)
            return index.query(req.query, top_k=req.top_k, mmr=req.mmr, mmr_lambda=req.mmr_lambda), index.version

        hits, version = await asyncio.to_thread(work)
        return {"object": "list", "index": name, "version": version, "data": citations(hits)}

    async def rag_indexes(self) -> dict:
        def work():
            out = []
            for n in self.store.names():
                index = self.store.get(n)
                docs = index.documents()
                out.append({"object": "rag.index", "id": n, "version": index.version, "documents": len(docs),
                            "chunks": sum(d.chunks for d in docs)})
            return out

        return {"object": "list", "data": await asyncio.to_thread(work)}

    async def rag_documents(self, name: str) -> dict:
        def work():
            index = self.store.get(name)
            return index.version, index.documents()

        version, docs = await asyncio.to_thread(work)
        return {"object": "list", "index": name, "version": version,
                "data": [{"object": "rag.document", "source": d.source, "chunks": d.chunks, "sha256": d.sha256,
                          "bytes": d.size, "added": d.added} for d in docs]}

    async def rag_delete(self, name: str, sources: list[str]) -> dict:
        def work():
            index = self.store.get(name)
            removed = index.delete(sources)
            return removed, index.version

        removed, version = await asyncio.to_thread(work)
        return {"object": "rag.delete", "index": name, "deleted": sources, "chunks_removed": removed,
                "version": version}

    async def rag_drop(self, name: str) -> dict:
        await asyncio.to_thread(self.store.drop, name)
        return {"object": "rag.index.deleted", "id": name, "deleted": True}

    async def rag_context(self, spec: RagSpec, messages: list[dict]) -> tuple[list[dict], list[dict]]:
        """The messages with retrieved context for their last user turn, and the citations."""
        question = next((message_text(m.get("content")) for m in reversed(messages) if m.get("role") == "user"), "")
        if not question.strip():
            raise invalid("`rag` needs a user message to retrieve for", "messages")

        def work():
            return self.store.get(spec.index).query(question, top_k=spec.top_k, mmr=spec.mmr)

        hits = await asyncio.to_thread(work)
        return build_rag_messages(messages, hits), citations(hits)

    # ---- agent runs ---------------------------------------------------------------------------------

    def _plans(self):
        if not self.cfg.plan_memory:
            return None
        if self._plan_memory is None:
            from hearth.agents.reasoning import PlanMemory

            self._plan_memory = PlanMemory(self._plans_dir, self._make_embedder())
        return self._plan_memory

    def _budget(self, strategy: str, options, max_steps: int | None, time_s: float | None) -> Budget:
        """The strategy's own default budget, or what the request asks, never past the server's caps."""
        base = default_budget(strategy, options)
        steps = min(max_steps or base.max_steps, self.cfg.max_steps)
        secs = min(time_s or base.time_s, self.cfg.max_time_s, self.config.request_timeout_s)
        return Budget(max_steps=steps, time_s=secs)

    async def run(self, req: AgentRunRequest) -> AsyncIterator[dict]:
        """Events of one run: {"type": "step", "step": {...}} as they happen, then {"type": "result", ...}."""
        if (req.input is None) == (req.messages is None):
            raise invalid("give exactly one of `input` and `messages`", "input")
        name = req.model or self.default_model()
        try:
            options = StrategyOptions(n=req.n, temperature=req.temperature, seed=req.seed,
                                      answer_type=req.answer_type,
                                      **({} if req.max_tokens is None else {"max_tokens": req.max_tokens}))
        except AgentInputError as e:
            raise invalid(str(e), e.param) from None
        budget = self._budget(req.strategy, options, req.budget.max_steps if req.budget else None,
                              req.budget.time_s if req.budget else None)
        model = ServedChatModel(self.router, name, self.metrics, deadline=time.monotonic() + budget.time_s + 5)
        task: str | list[dict] = req.input if req.input is not None else [
            m.model_dump(exclude_none=True) for m in req.messages]
        index = None
        cites: list[dict] = []
        if req.rag is not None:
            index = await asyncio.to_thread(self.store.get, req.rag.index)
            msgs = [{"role": "user", "content": task}] if isinstance(task, str) else task
            task, cites = await self.rag_context(req.rag, msgs)
        tools = self._tools(req.tools, index, req.strategy)
        queue: asyncio.Queue = asyncio.Queue()
        trace = Trace(budget, on_step=lambda s: queue.put_nowait({"type": "step", "step": s.to_dict()}))
        run_id = "run_" + uuid.uuid4().hex[:24]
        embedder = self._make_embedder() if req.strategy == "few_shot_cot" else None
        plans = self._plans() if req.strategy in ("plan_execute", "react") else None
        task_done = asyncio.ensure_future(run_strategy(req.strategy, model, task, tools=tools, budget=budget,
                                                       trace=trace, options=options, embedder=embedder,
                                                       plan_memory=plans))
        yield {"type": "start", "id": run_id, "model": name, "strategy": req.strategy,
               "tools": tools.names() if tools is not None else [], "citations": cites}
        try:
            while not task_done.done() or not queue.empty():
                getter = asyncio.ensure_future(queue.get())
                await asyncio.wait({getter, task_done}, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    yield getter.result()
                else:
                    getter.cancel()
            result = task_done.result()  # re-raises the strategy's error
        finally:
            if not task_done.done():
                task_done.cancel()
                await asyncio.gather(task_done, return_exceptions=True)
        body = {"type": "result", "id": run_id, "object": "agent.run", "model": name, "strategy": req.strategy,
                **result.to_dict()}
        if cites:
            body["citations"] = cites
        yield body

    def _tools(self, names: list[str] | None, index, strategy: str):
        if strategy not in ("tools", "react", "plan_execute") and not names:
            return None
        registry = default_registry(rag_index=index, sandbox=self.cfg.sandbox)
        if names is None:
            return registry
        unknown = [n for n in names if n not in registry]
        if unknown:
            raise invalid(f"unknown tool(s) {unknown}; this server offers {sorted(registry.names())}", "tools")
        return registry.subset(names)

    async def reason(self, req: AgentRunRequest) -> dict:
        """One run to its result (the chat `reasoning` extension)."""
        result: dict | None = None
        async for ev in self.run(req):
            if ev["type"] == "result":
                result = ev
        if result is None:  # run() always ends with a result or raises
            raise APIError(500, "the agent run ended without a result", "server_error")
        return result
