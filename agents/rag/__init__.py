"""hearth.agents.rag: retrieval-augmented generation over a persistent, versioned FAISS index.

    from hearth.agents.embed import SentenceTransformerEmbedder
    from hearth.agents.rag import IndexStore, build_rag_messages, citations

    store = IndexStore("~/.cache/hearth/rag", SentenceTransformerEmbedder)
    index = store.get("notes", create=True)
    index.ingest(["docs/"], allowed_roots=["."])
    hits = index.query("how do refunds work?", top_k=4)
    messages = build_rag_messages([{"role": "user", "content": "how do refunds work?"}], hits)

Command line: `hearth rag ingest|query|list|delete` (hearth.clients.cmd_rag).
"""

from pathlib import Path

from .chunking import Chunk, chunk_text, fallback_spans, token_spans_for
from .errors import (DocumentNotFound, EmbedderMismatch, ExtractionError, IndexBusy, IndexNotFound, IngestCancelled,
                     RagError)
from .extract import SUPPORTED_EXTENSIONS, extract_text, html_to_text
from .index import DocInfo, Hit, IngestReport, RagIndex
from .prompt import answer_with_rag, build_rag_messages, citations, context_block, neutralise
from .store import IndexStore, check_index_name, embedder_from_spec, embedder_spec_of
from .vectors import choose_kind

DATA_DIR = Path(__file__).parent / "data"
"""Bundled test documents (injection.md: a prompt-injection attempt inside an ordinary document)."""

__all__ = [
    "Chunk", "DATA_DIR", "DocInfo", "DocumentNotFound", "EmbedderMismatch", "ExtractionError", "Hit",
    "IndexBusy", "IndexNotFound", "IndexStore", "IngestCancelled", "IngestReport", "RagError", "RagIndex", "SUPPORTED_EXTENSIONS",
    "answer_with_rag", "build_rag_messages", "check_index_name", "choose_kind", "chunk_text", "citations",
    "context_block", "embedder_from_spec", "embedder_spec_of", "extract_text", "fallback_spans", "html_to_text",
    "neutralise", "token_spans_for",
]
