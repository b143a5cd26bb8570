"""Errors of retrieval-augmented generation. Bad caller input is AgentInputError (a 400 with `param`);
everything else about an index is a RagError.

    try:
        index = RagIndex.open("/srv/rag/notes", embedder)
    except IndexNotFound:
        ...
"""

from __future__ import annotations

from hearth.runtime.errors import HearthError


class RagError(HearthError):
    """An index cannot do what was asked: damaged on disk, built with another embedder, busy, ..."""


class IndexNotFound(RagError):
    """No index of that name or at that directory (create=True makes one)."""


class DocumentNotFound(RagError):
    """A source named in a delete is not in the index."""


class EmbedderMismatch(RagError):
    """The index was built with another embedding model (name or dimensions differ)."""


class IndexBusy(RagError):
    """Another writer holds the index's lock longer than the wait allowed."""


class ExtractionError(RagError):
    """A file could not be turned into text (undecodable bytes, a broken or encrypted PDF, ...)."""


class IngestCancelled(RagError):
    """A write stopped before its commit because its caller cancelled it (a client that went away)."""
