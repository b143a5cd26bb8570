"""Named indexes under one root folder, sharing one lazily created embedder.

    store = IndexStore(hearth_home() / "rag", SentenceTransformerEmbedder)
    notes = store.get("notes", create=True)
    store.names()                # ["notes"]
    store.drop("notes")

    embedder = embedder_from_spec("hashing-256")   # or None (the bundled MiniLM) or a model folder path
"""

from __future__ import annotations

import re
import shutil
import threading
import uuid
from pathlib import Path
from typing import Any, Callable

from ..embed import Embedder
from ..types import AgentInputError
from . import storage
from .errors import IndexNotFound
from .index import RagIndex

_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def check_index_name(name: Any) -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name) or name.startswith("."):
        raise AgentInputError(f"index name must be 1-64 of A-Z a-z 0-9 _ . - and not start with a dot; "
                              f"got {name!r}", "index")
    return name


def embedder_from_spec(spec: str | None) -> Embedder:
    """An embedder from a CLI-style spec: None or "default" → the bundled all-MiniLM-L6-v2;
    "hashing" or "hashing-N" → HashingEmbedder(N) (no model; weak, for tests); else a model folder path."""
    from ..embed import HashingEmbedder, SentenceTransformerEmbedder

    if spec is None or spec == "default":
        return SentenceTransformerEmbedder()
    if m := re.fullmatch(r"hashing(?:-(\d+))?", spec):
        return HashingEmbedder(int(m.group(1) or 256))
    return SentenceTransformerEmbedder(spec)


def embedder_spec_of(meta: dict[str, Any]) -> str | None:
    """The spec that rebuilds the embedder an index was made with (from its meta.json)."""
    emb = meta.get("embedder", {})
    if re.fullmatch(r"hashing-\d+", emb.get("name", "")):
        return emb["name"]
    from hearth.runtime.embedding_model import DEFAULT_EMBEDDING_MODEL

    if emb.get("name") == DEFAULT_EMBEDDING_MODEL:
        return None
    return emb.get("path")


class IndexStore:
    """Indexes named [A-Za-z0-9_.-]{1,64} as folders of `root`. Handles are cached (one per name) and
    share the embedder, which `embedder_factory` makes on first need."""

    def __init__(self, root: str | Path, embedder_factory: Callable[[], Embedder], **open_kwargs: Any):
        self.root = Path(root).expanduser().absolute()
        self._factory = embedder_factory
        self._embedder: Embedder | None = None
        self._open_kwargs = open_kwargs
        self._indexes: dict[str, RagIndex] = {}
        self._lock = threading.Lock()

    @property
    def embedder(self) -> Embedder:
        with self._lock:
            if self._embedder is None:
                self._embedder = self._factory()
            return self._embedder

    def path(self, name: str) -> Path:
        return self.root / check_index_name(name)

    def get(self, name: str, create: bool = False) -> RagIndex:
        directory = self.path(name)
        with self._lock:
            idx = self._indexes.get(name)
        if idx is not None and storage.read_current(directory) is not None:
            return idx
        if not create and storage.read_current(directory) is None:
            raise IndexNotFound(f"no RAG index named {name!r} under {self.root}")
        embedder = self.embedder
        if create:
            self.root.mkdir(parents=True, exist_ok=True)
        idx = RagIndex.open(directory, embedder, create=create, **self._open_kwargs)
        with self._lock:
            return self._indexes.setdefault(name, idx)

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir()
                      if p.is_dir() and _NAME_RE.match(p.name) and not p.name.startswith(".")
                      and (p / storage.CURRENT).is_file())

    def drop(self, name: str) -> None:
        """Delete the whole index (waits for a writer to finish). Unknown names raise IndexNotFound."""
        directory = self.path(name)
        if storage.read_current(directory) is None:
            raise IndexNotFound(f"no RAG index named {name!r} under {self.root}")
        with storage.write_lock(directory, float(self._open_kwargs.get("lock_timeout_s", 60.0))):
            # unpublish first, so a crash mid-delete leaves no half index that looks live
            (directory / storage.CURRENT).unlink()
            storage.fsync_dir(directory)
            trash = self.root / f".dropped-{name}-{uuid.uuid4().hex[:8]}"
            directory.rename(trash)
        shutil.rmtree(trash)
        with self._lock:
            self._indexes.pop(name, None)
