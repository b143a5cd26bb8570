"""A persistent, versioned retrieval index: documents → chunks → embeddings → FAISS.

    from hearth.agents.embed import SentenceTransformerEmbedder
    index = RagIndex.open("/srv/rag/notes", SentenceTransformerEmbedder(), create=True)
    report = index.ingest(["docs/"], allowed_roots=["."])      # IngestReport(added=[...], version=1, ...)
    index.add_texts([("faq", "Refunds take five days.")])
    hits = index.query("how long do refunds take?", top_k=4, mmr=True)
    index.delete(["faq"])

Every change is one atomic commit of a new immutable version (see storage.py): concurrent queries see the
old version or the new one, never half of either, and a crash leaves the last good version loadable.
Re-ingesting an unchanged file (same sha256 of its bytes) is a no-op; a changed one replaces its chunks.
Chunk spans [start, end) index the document's text (for HTML and PDF, the extracted text).
A writer given `should_stop` checks it between files and between embedding batches: once it returns
True the write raises IngestCancelled, releases the lock and commits nothing.
"""

from __future__ import annotations

import hashlib
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
from tqdm import tqdm

from ..embed import Embedder
from ..types import AgentInputError
from . import storage
from .chunking import check_chunk_params, chunk_text, token_spans_for
from .errors import DocumentNotFound, EmbedderMismatch, ExtractionError, IndexNotFound, IngestCancelled, RagError
from .extract import collect_files, extract_text
from .vectors import all_vectors, build_index, check_kind, choose_kind, copy_index, kind_of, search, vectors_of
from .vectors import mmr as mmr_select

MAX_TOP_K = 100
EMBED_BATCH = 16  # chunks per embedding call; a cancelled write stops between calls (~1 s apart on a CPU)
MAX_SOURCE_CHARS = 1024


@dataclass
class DocInfo:
    source: str
    chunks: int
    sha256: str
    size: int
    added: float


@dataclass
class Hit:
    rank: int
    score: float
    source: str
    chunk_id: int
    start: int
    end: int
    text: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class IngestReport:
    added: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    version: int = 0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["skipped"] = [{"path": p, "reason": r} for p, r in self.skipped]
        return d


@dataclass
class _Snapshot:
    """One loaded version; never mutated, replaced whole (readers hold on to the one they started with)."""

    name: str
    meta: dict[str, Any]
    chunks: list[dict[str, Any]]
    index: Any  # faiss.Index

    @property
    def version(self) -> int:
        return int(self.meta["version"])


@dataclass
class _NewDoc:
    text: str
    sha256: str
    size: int


def _embedder_meta(embedder: Embedder) -> dict[str, Any]:
    meta = {"name": embedder.name, "dimensions": int(embedder.dimensions)}
    path = getattr(embedder, "path", None)
    if path is not None:
        meta["path"] = str(path)
    return meta


class RagIndex:
    """One index directory. Build with RagIndex.open; see the module docstring."""

    def __init__(self, directory: Path, embedder: Embedder | None, snapshot: _Snapshot, kind: str,
                 lock_timeout_s: float):
        self.directory = directory
        self.embedder = embedder
        self.kind_policy = kind
        self.lock_timeout_s = lock_timeout_s
        self._snap = snapshot
        self._reload_lock = threading.Lock()
        chunking = snapshot.meta["chunking"]
        self.chunk_tokens, self.overlap_tokens = int(chunking["chunk_tokens"]), int(chunking["overlap_tokens"])
        self._spans = token_spans_for(embedder) if embedder is not None else None

    # ---- opening -------------------------------------------------------------------------------------
    @classmethod
    def open(cls, directory: str | Path, embedder: Embedder | None, *, create: bool = False, kind: str = "auto",
             chunk_tokens: int = 200, overlap_tokens: int = 40, lock_timeout_s: float = 60.0) -> "RagIndex":
        """Open the index at `directory` (create=True makes an empty one if there is none).

        chunk_tokens/overlap_tokens apply when creating; an existing index keeps the ones it was built
        with. kind="auto" keeps the index's policy (flat/hnsw/ivf by size); another kind is used from the
        next commit on. `embedder` may be None for maintenance only (documents, delete)."""
        directory = Path(directory).expanduser().absolute()
        check_kind(kind)
        if storage.read_current(directory) is None:
            if not create:
                raise IndexNotFound(f"no RAG index at {directory}")
            if embedder is None:
                raise RagError("creating an index needs an embedder")
            check_chunk_params(chunk_tokens, overlap_tokens, getattr(embedder, "max_tokens", None))
            directory.mkdir(parents=True, exist_ok=True)
            with storage.write_lock(directory, lock_timeout_s):
                if storage.read_current(directory) is None:  # nobody created it while we waited
                    storage.clean(directory)
                    meta = {"format": storage.FORMAT, "version": 0, "created": time.time(),
                            "embedder": _embedder_meta(embedder),
                            "chunking": {"chunk_tokens": chunk_tokens, "overlap_tokens": overlap_tokens,
                                         "tokenizer": "model" if getattr(embedder, "tokenizer", None)
                                         else "fallback"},
                            "kind_policy": kind, "index_kind": "flat", "chunks": 0, "docs": {}}
                    name = storage.write_version(directory, meta, [], build_index(
                        np.zeros((0, embedder.dimensions), np.float32), "flat"))
                    storage.publish(directory, name)
        else:
            storage.try_clean(directory)
        snap = cls._load_latest(directory)
        if embedder is not None:
            want = snap.meta["embedder"]
            if want["name"] != embedder.name or int(want["dimensions"]) != int(embedder.dimensions):
                raise EmbedderMismatch(
                    f"the index at {directory} was built with the embedding model {want['name']!r} "
                    f"({want['dimensions']} dimensions), not {embedder.name!r} ({embedder.dimensions}); "
                    "use the same model, or drop the index and ingest again")
        policy = kind if kind != "auto" else snap.meta.get("kind_policy", "auto")
        return cls(directory, embedder, snap, policy, lock_timeout_s)

    @staticmethod
    def _load_latest(directory: Path) -> _Snapshot:
        for _ in range(5):
            name = storage.read_current(directory)
            if name is None:
                raise IndexNotFound(f"no RAG index at {directory} (dropped?)")
            try:
                meta, chunks, index = storage.load_version(directory, name)
            except FileNotFoundError:
                continue  # pruned by a writer after we read CURRENT: read it again
            return _Snapshot(name, meta, chunks, index)
        raise RagError(f"the index at {directory} keeps changing under the reader; try again")

    def _current(self) -> _Snapshot:
        """The newest published version (another process may have committed since the last call)."""
        snap = self._snap
        name = storage.read_current(self.directory)
        if name is None:
            raise IndexNotFound(f"the RAG index at {self.directory} no longer exists (dropped?)")
        if name != snap.name:
            with self._reload_lock:
                if self._snap.name != name:
                    self._snap = self._load_latest(self.directory)
                snap = self._snap
        return snap

    # ---- reading -------------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.directory.name

    @property
    def version(self) -> int:
        return self._current().version

    def info(self) -> dict[str, Any]:
        """Version, sizes, embedder, chunking and index kind (what `hearth rag list` prints)."""
        snap = self._current()
        m = snap.meta
        return {"name": self.name, "version": snap.version, "documents": len(m["docs"]), "chunks": len(snap.chunks),
                "index_kind": kind_of(snap.index), "kind_policy": m.get("kind_policy", "auto"),
                "embedder": dict(m["embedder"]), "chunking": dict(m["chunking"]), "updated": m.get("created")}

    def documents(self) -> list[DocInfo]:
        docs = self._current().meta["docs"]
        return [DocInfo(s, int(d["chunks"]), d["sha256"], int(d["size"]), float(d["added"]))
                for s, d in sorted(docs.items())]

    def query(self, text: str, top_k: int = 4, *, mmr: bool = False, mmr_lambda: float = 0.5) -> list[Hit]:
        """The top_k chunks most similar to `text`, best first, with cosine scores. With mmr=True the
        picks trade relevance (weight mmr_lambda) against similarity to the chunks already picked."""
        if not isinstance(text, str) or not text.strip():
            raise AgentInputError("the query text is empty", "query")
        if not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= MAX_TOP_K:
            raise AgentInputError(f"top_k must be an integer from 1 to {MAX_TOP_K}, got {top_k!r}", "top_k")
        if not isinstance(mmr_lambda, (int, float)) or not 0.0 <= mmr_lambda <= 1.0:
            raise AgentInputError(f"mmr_lambda must be between 0 and 1, got {mmr_lambda!r}", "mmr_lambda")
        embedder = self._need_embedder()
        snap = self._current()
        if not snap.chunks:
            return []
        q = embedder.embed([text])[0]
        if mmr:
            fetch = min(len(snap.chunks), max(4 * top_k, 20))
            scores, ids = search(snap.index, q, fetch)
            picks = mmr_select(q, vectors_of(snap.index, ids), top_k, float(mmr_lambda))
            chosen = [(float(scores[p]), int(ids[p])) for p in picks]
        else:
            scores, ids = search(snap.index, q, top_k)
            chosen = list(zip(map(float, scores), map(int, ids)))
        out = []
        for rank, (score, i) in enumerate(chosen, 1):
            c = snap.chunks[i]
            out.append(Hit(rank, score, c["source"], int(c["chunk_id"]), int(c["start"]), int(c["end"]), c["text"]))
        return out

    # ---- writing -------------------------------------------------------------------------------------
    def add_texts(self, items: list[tuple[str, str]], *, should_stop: Callable[[], bool] | None = None
                  ) -> IngestReport:
        """Add or replace documents given as (source name, text), in one atomic commit."""
        if not isinstance(items, (list, tuple)) or not items:
            raise AgentInputError("add_texts needs a non-empty list of (source, text) pairs", "documents")
        new: dict[str, _NewDoc] = {}
        for i, item in enumerate(items):
            if not (isinstance(item, (tuple, list)) and len(item) == 2 and all(isinstance(x, str) for x in item)):
                raise AgentInputError(f"document {i} must be a (source, text) pair of strings", "documents")
            source, text = item
            _check_source(source)
            if source in new:
                raise AgentInputError(f"the source {source!r} appears twice in one request", "documents")
            data = text.encode("utf-8")
            new[source] = _NewDoc(text, hashlib.sha256(data).hexdigest(), len(data))
        self._need_embedder()
        with storage.write_lock(self.directory, self.lock_timeout_s):
            base = self._locked_base()
            report = IngestReport()
            pending: dict[str, _NewDoc] = {}
            for source, doc in new.items():
                old = base.meta["docs"].get(source)
                if old is not None and old["sha256"] == doc.sha256:
                    report.unchanged.append(source)
                elif not doc.text.strip():
                    report.skipped.append((source, "the text is empty"))
                else:
                    pending[source] = doc
            return self._commit(base, pending, set(), report, progress=False, should_stop=should_stop)

    def ingest(self, paths: list[str | Path], *, allowed_roots: list[str | Path], max_file_bytes: int = 32 << 20,
               max_total_bytes: int = 512 << 20, progress: bool = True,
               should_stop: Callable[[], bool] | None = None) -> IngestReport:
        """Add or replace the files named (folders are walked), confined to allowed_roots. Named files
        that break a rule raise AgentInputError; files found in folders are skipped with a reason."""
        for pname, v in (("max_file_bytes", max_file_bytes), ("max_total_bytes", max_total_bytes)):
            if not isinstance(v, int) or v <= 0:
                raise AgentInputError(f"{pname} must be a positive integer, got {v!r}", pname)
        self._need_embedder()
        files, skipped = collect_files(list(paths), allowed_roots, max_file_bytes)
        total = sum(f.size for f in files)
        if total > max_total_bytes:
            raise AgentInputError(f"the {len(files)} files total {total} bytes, more than the limit of "
                                  f"{max_total_bytes} bytes", "paths")
        with storage.write_lock(self.directory, self.lock_timeout_s):
            base = self._locked_base()
            report = IngestReport(skipped=list(skipped))
            pending: dict[str, _NewDoc] = {}
            for f in tqdm(files, desc=f"reading into {self.name}", unit="file", disable=not progress,
                          file=sys.stderr):
                _check_stop(should_stop)
                data = f.path.read_bytes()
                if len(data) > max_file_bytes:  # grew since it was listed
                    reason = f"{len(data)} bytes, more than the limit of {max_file_bytes} bytes per file"
                    if f.explicit:
                        raise AgentInputError(f"cannot ingest {f.path}: {reason}", "paths")
                    report.skipped.append((str(f.path), reason))
                    continue
                sha = hashlib.sha256(data).hexdigest()
                old = base.meta["docs"].get(f.source)
                if old is not None and old["sha256"] == sha:
                    report.unchanged.append(f.source)
                    continue
                try:
                    text = extract_text(f.path, data, str(f.path))
                except ExtractionError as e:
                    if f.explicit:
                        raise
                    report.skipped.append((str(f.path), str(e)))
                    continue
                if not text.strip():
                    if f.explicit:
                        raise ExtractionError(f"{f.path}: no text in it (a scanned PDF needs OCR first)")
                    report.skipped.append((str(f.path), "no text in it"))
                    continue
                pending[f.source] = _NewDoc(text, sha, len(data))
            return self._commit(base, pending, set(), report, progress=progress, should_stop=should_stop)

    def delete(self, sources: list[str]) -> int:
        """Remove documents by source name in one commit; returns the number of chunks removed.
        An unknown source is an error naming it (and nothing is removed)."""
        if isinstance(sources, str) or not sources:
            raise AgentInputError("delete needs a non-empty list of source names", "sources")
        with storage.write_lock(self.directory, self.lock_timeout_s):
            base = self._locked_base()
            missing = [s for s in sources if s not in base.meta["docs"]]
            if missing:
                known = ", ".join(sorted(base.meta["docs"])[:10]) or "none"
                raise DocumentNotFound(f"not in the index {self.name!r}: {', '.join(map(repr, missing))} "
                                       f"(documents: {known}{' ...' if len(base.meta['docs']) > 10 else ''})")
            before = len(base.chunks)
            self._commit(base, {}, set(sources), IngestReport(), progress=False)
            return before - len(self._snap.chunks)

    # ---- internals -----------------------------------------------------------------------------------
    def _need_embedder(self) -> Embedder:
        if self.embedder is None:
            raise RagError(f"the index {self.name!r} was opened without an embedder; it cannot embed text")
        return self.embedder

    def _locked_base(self) -> _Snapshot:
        """Under the write lock: clean leftovers and load the newest version (another process may have
        committed one)."""
        storage.clean(self.directory)
        snap = self._load_latest(self.directory)
        self._snap = snap
        return snap

    def _chunk_and_embed(self, pending: dict[str, _NewDoc], progress: bool,
                         should_stop: Callable[[], bool] | None = None
                         ) -> tuple[list[dict[str, Any]], np.ndarray, dict[str, int]]:
        chunks: list[dict[str, Any]] = []
        counts: dict[str, int] = {}
        for source, doc in pending.items():
            pieces = chunk_text(doc.text, self._spans, self.chunk_tokens, self.overlap_tokens)
            counts[source] = len(pieces)
            chunks.extend({"source": source, "chunk_id": j, "start": p.start, "end": p.end, "text": p.text}
                          for j, p in enumerate(pieces))
        dims = self.embedder.dimensions
        parts = []
        bar = tqdm(total=len(chunks), desc=f"embedding into {self.name}", unit="chunk",
                   disable=not progress or not chunks, file=sys.stderr)
        with bar:
            for i in range(0, len(chunks), EMBED_BATCH):
                _check_stop(should_stop)
                batch = [c["text"] for c in chunks[i:i + EMBED_BATCH]]
                v = np.asarray(self.embedder.embed(batch), dtype=np.float32)
                if v.shape != (len(batch), dims):
                    raise RagError(f"the embedder {self.embedder.name!r} returned shape {v.shape}, "
                                   f"expected ({len(batch)}, {dims})")
                parts.append(v)
                bar.update(len(batch))
        vecs = np.concatenate(parts) if parts else np.zeros((0, dims), np.float32)
        return chunks, vecs, counts

    def _commit(self, base: _Snapshot, pending: dict[str, _NewDoc], removed: set[str], report: IngestReport,
                progress: bool, should_stop: Callable[[], bool] | None = None) -> IngestReport:
        """Write base − removed − replaced + pending as the next version and make it live. Under the lock."""
        for source in pending:
            (report.replaced if source in base.meta["docs"] else report.added).append(source)
        if not pending and not removed:
            report.version = base.version
            return report
        new_chunks, new_vecs, counts = (self._chunk_and_embed(pending, progress, should_stop) if pending
                                        else ([], None, {}))
        _check_stop(should_stop)
        gone = removed | set(pending)
        keep = np.array([c["source"] not in gone for c in base.chunks], dtype=bool)
        kept_chunks = [c for c, k in zip(base.chunks, keep) if k]
        n_total = len(kept_chunks) + len(new_chunks)
        kind = choose_kind(n_total, self.kind_policy)
        meta = {k: v for k, v in base.meta.items()}
        trained_on = int(meta.get("ivf_trained_on", 0))
        if keep.all() and kind == kind_of(base.index) and not (kind == "ivf" and n_total > 2 * trained_on):
            index = copy_index(base.index)  # additions only: extend a copy, readers keep the original
            if len(new_chunks):
                index.add(new_vecs)
        else:
            old = all_vectors(base.index)[keep] if len(base.chunks) else np.zeros((0, base.index.d), np.float32)
            vecs = np.concatenate([old, new_vecs]) if len(new_chunks) else old
            index = build_index(vecs, kind)
            trained_on = n_total if kind_of(index) == "ivf" else 0
        docs = {s: d for s, d in base.meta["docs"].items() if s not in gone}
        now = time.time()
        for source, doc in pending.items():
            docs[source] = {"sha256": doc.sha256, "size": doc.size, "added": now, "chunks": counts[source]}
        meta.update(version=base.version + 1, created=now, kind_policy=self.kind_policy,
                    index_kind=kind_of(index), chunks=n_total, ivf_trained_on=trained_on, docs=docs)
        chunks = kept_chunks + new_chunks
        name = storage.write_version(self.directory, meta, chunks, index)
        storage.publish(self.directory, name)
        self._snap = _Snapshot(name, meta, chunks, index)
        storage.clean(self.directory)
        report.version = meta["version"]
        return report


def _check_stop(should_stop: Callable[[], bool] | None) -> None:
    if should_stop is not None and should_stop():
        raise IngestCancelled("the ingest was cancelled; the index keeps its last committed version")


def _check_source(source: str) -> None:
    if not source or not source.strip() or len(source) > MAX_SOURCE_CHARS or any(ch in source for ch in "\0\n\r"):
        raise AgentInputError(f"a source name must be 1 to {MAX_SOURCE_CHARS} characters on one line, got "
                              f"{source[:60]!r}", "documents")
