"""FAISS indexes over unit vectors (inner product = cosine): which kind, building, searching, MMR.

    kind = choose_kind(n)                          # "flat" below FLAT_MAX, "hnsw" below HNSW_MAX, else "ivf"
    index = build_index(vectors, kind)             # (N, D) float32
    scores, ids = search(index, query_vec, k)      # (k,), (k,); ids -1 where fewer than k exist
    order = mmr(query_vec, candidate_vecs, k, lam=0.5)

Flat search is exact and fast enough for tens of thousands of chunks; HNSW keeps queries fast up to
hundreds of thousands; IVF trains k-means cells and scales further with less memory than HNSW.
Search parameters (efSearch, nprobe) travel with each call, so concurrent queries share one index safely.
"""

from __future__ import annotations

import math

import faiss
import numpy as np

from ..types import AgentInputError

KINDS = ("auto", "flat", "ivf", "hnsw")
FLAT_MAX = 20_000      # up to this many vectors: exact search
HNSW_MAX = 500_000     # up to this many: HNSW; above: IVF
HNSW_M, HNSW_EF_CONSTRUCTION, HNSW_EF_SEARCH = 32, 80, 96
IVF_MIN_PER_CELL = 39  # faiss wants about 39 training points per k-means centroid


def check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise AgentInputError(f"index kind must be one of {', '.join(KINDS)}; got {kind!r}", "kind")
    return kind


def choose_kind(n: int, kind: str = "auto") -> str:
    """The index kind for n vectors under a policy ("auto" picks by size)."""
    check_kind(kind)
    if kind == "auto":
        kind = "flat" if n <= FLAT_MAX else "hnsw" if n <= HNSW_MAX else "ivf"
    if kind == "ivf" and n < IVF_MIN_PER_CELL:
        return "flat"  # too few vectors to train even one cell well
    return kind


def kind_of(index: faiss.Index) -> str:
    if isinstance(index, faiss.IndexHNSW):
        return "hnsw"
    if isinstance(index, faiss.IndexIVF):
        return "ivf"
    return "flat"


def ivf_cells(n: int) -> int:
    return max(1, min(int(4 * math.sqrt(n)), n // IVF_MIN_PER_CELL, 65536))


def build_index(vectors: np.ndarray, kind: str) -> faiss.Index:
    """A new index of `kind` ("flat" | "hnsw" | "ivf", already chosen) holding `vectors` as ids 0..N-1."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n, d = vectors.shape
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, HNSW_M, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        index.hnsw.efSearch = HNSW_EF_SEARCH
    elif kind == "ivf" and n >= IVF_MIN_PER_CELL:
        nlist = ivf_cells(n)
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(0)  # deterministic training sample
        sample = vectors if n <= 256 * nlist else vectors[rng.choice(n, 256 * nlist, replace=False)]
        index.train(sample)
        index.nprobe = ivf_nprobe(index)
    else:
        index = faiss.IndexFlatIP(d)
    if n:
        index.add(vectors)
    prepare(index)
    return index


def ivf_nprobe(index: faiss.Index) -> int:
    return max(8, min(index.nlist, index.nlist // 8))


def prepare(index: faiss.Index) -> faiss.Index:
    """Make a loaded index ready: IVF needs its id -> list map to give vectors back (MMR, rebuilds)."""
    if isinstance(index, faiss.IndexIVF):
        index.make_direct_map()
    return index


def search(index: faiss.Index, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k inner products of one (D,) query: scores (k,), ids (k,) with -1 where none."""
    q = np.ascontiguousarray(query.reshape(1, -1), dtype=np.float32)
    k = max(1, min(k, index.ntotal)) if index.ntotal else 1
    if index.ntotal == 0:
        return np.zeros(0, dtype=np.float32), np.zeros(0, dtype=np.int64)
    if isinstance(index, faiss.IndexHNSW):
        params = faiss.SearchParametersHNSW(efSearch=max(HNSW_EF_SEARCH, 2 * k))
        scores, ids = index.search(q, k, params=params)
    elif isinstance(index, faiss.IndexIVF):
        scores, ids = index.search(q, k, params=faiss.SearchParametersIVF(nprobe=ivf_nprobe(index)))
    else:
        scores, ids = index.search(q, k)
    keep = ids[0] >= 0
    return scores[0][keep], ids[0][keep]


def vectors_of(index: faiss.Index, ids: np.ndarray | list[int]) -> np.ndarray:
    """The stored vectors of some ids, (len(ids), D)."""
    ids = np.asarray(ids, dtype=np.int64)
    if len(ids) == 0:
        return np.zeros((0, index.d), dtype=np.float32)
    return np.stack([index.reconstruct(int(i)) for i in ids]).astype(np.float32)


def all_vectors(index: faiss.Index) -> np.ndarray:
    if index.ntotal == 0:
        return np.zeros((0, index.d), dtype=np.float32)
    if isinstance(index, faiss.IndexIVF):
        return vectors_of(index, np.arange(index.ntotal))
    return index.reconstruct_n(0, index.ntotal)


def copy_index(index: faiss.Index) -> faiss.Index:
    return prepare(faiss.deserialize_index(faiss.serialize_index(index)))


def mmr(query: np.ndarray, candidates: np.ndarray, k: int, lam: float = 0.5) -> list[int]:
    """Maximal marginal relevance: pick k rows of `candidates` (M, D), each maximising
    lam * sim(query, c) - (1 - lam) * max sim(c, already picked). Returns row positions in pick order."""
    m = len(candidates)
    if m == 0:
        return []
    rel = candidates @ query.astype(np.float32)           # (M,)
    sim = candidates @ candidates.T                       # (M, M)
    picked: list[int] = [int(np.argmax(rel))]
    redundancy = sim[picked[0]].copy()                    # max similarity to anything picked so far
    while len(picked) < min(k, m):
        score = lam * rel - (1 - lam) * redundancy
        score[picked] = -np.inf
        nxt = int(np.argmax(score))
        picked.append(nxt)
        redundancy = np.maximum(redundancy, sim[nxt])
    return picked
