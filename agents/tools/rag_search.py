"""The `rag_search` tool over any retrieval index: the model searches the user's documents.

    index = RagIndex.load("~/.hearth/rag/docs")        # or anything with .query(text, top_k) -> hits
    registry.register(rag_search_tool(index))
    # the model calls rag_search(query="refund policy") and reads:
    # [1] handbook.pdf#p3 (score 0.82)
    # Refunds are issued within 14 days ...

The index is duck-typed: `query(text: str, top_k: int)` returning hits with `.rank`, `.score`,
`.source` and `.text` (hearth.agents.rag.RagIndex is one), so this module imports no index code.
Passages and source names are neutralised as in the chat `rag` path (agents/quoting.py): a document
cannot forge a turn marker or close the tool response through the agent path either.
"""

from __future__ import annotations

from typing import Any

from ..quoting import neutralise
from .registry import Tool, ToolError

__all__ = ["rag_search_tool", "format_hits"]

MAX_TOP_K = 20


def format_hits(hits: list[Any], max_chars_per_hit: int = 1500) -> str:
    """Hits as numbered passages the model can cite."""
    if not hits:
        return "no matching passages found"
    blocks = []
    for i, h in enumerate(hits):
        rank = getattr(h, "rank", i + 1)
        text = str(getattr(h, "text", "")).strip()
        if len(text) > max_chars_per_hit:
            text = text[:max_chars_per_hit] + " ..."
        source = neutralise(str(getattr(h, "source", "?"))).replace("\n", " ")
        blocks.append(f"[{rank}] {source} (score {float(getattr(h, 'score', 0.0)):.2f})\n{neutralise(text)}")
    return "\n\n".join(blocks)


def rag_search_tool(index: Any, *, name: str = "rag_search", default_top_k: int = 4,
                    description: str | None = None, timeout_s: float = 30.0) -> Tool:
    """A Tool searching `index` (anything with .query(text, top_k) -> hits)."""
    if not callable(getattr(index, "query", None)):
        raise TypeError(f"rag_search_tool needs an index with a query(text, top_k) method, "
                        f"got {type(index).__name__}")
    if not 1 <= default_top_k <= MAX_TOP_K:
        raise ValueError(f"default_top_k must be in 1..{MAX_TOP_K}, got {default_top_k}")

    def rag_search(query: str, top_k: int = default_top_k) -> str:
        """Search the user's documents and return the most relevant passages with their sources.
        Use it for questions about the user's files, notes or knowledge base.

        Args:
            query: what to look for, in a few words or a question
            top_k: how many passages to return
        """
        if not query.strip():
            raise ToolError("give a non-empty query")
        return format_hits(list(index.query(query, max(1, min(int(top_k), MAX_TOP_K)))))

    t = Tool.from_function(rag_search, name=name, description=description, timeout_s=timeout_s)
    t.parameters["properties"]["top_k"].update({"minimum": 1, "maximum": MAX_TOP_K})
    return t
