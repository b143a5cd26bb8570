"""Text embeddings for retrieval, few-shot demonstration choice and plan memory.

    emb = SentenceTransformerEmbedder()              # the bundled all-MiniLM-L6-v2, CPU
    vecs = emb.embed(["a cat", "a dog"])             # (2, 384) float32, L2-normalised
    emb = SentenceTransformerEmbedder("/models/bge-m3")   # any local sentence-transformers folder

Vectors are L2-normalised, so inner product is cosine similarity (what the FAISS indexes use).
Loading refuses pickle-only weights and remote code; nothing is fetched from a hub.
"""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np
from hearth.runtime.embedding_model import DEFAULT_EMBEDDING_MODEL, bundled_embedding_model_path
from hearth.runtime.errors import ModelLoadError, ModelNotFoundError, UnsafeCheckpointError


class Embedder(Protocol):
    """Turns texts into unit vectors. `name` identifies the model (an index records it and refuses to
    mix vectors of two models); `dimensions` is the vector length."""

    name: str
    dimensions: int

    def embed(self, texts: Sequence[str]) -> np.ndarray: ...  # (N, dimensions) float32


class SentenceTransformerEmbedder:
    """A local sentence-transformers model (default: the bundled all-MiniLM-L6-v2). Thread-safe."""

    def __init__(self, path: str | Path | None = None, device: str = "cpu", batch_size: int = 32):
        if path is None:
            self.path, self.name = bundled_embedding_model_path(), DEFAULT_EMBEDDING_MODEL
        else:
            self.path = Path(path).expanduser()
            self.name = self.path.name
        if not self.path.is_dir():
            raise ModelNotFoundError(f"no embedding model at {self.path} (not a directory)")
        if not any(self.path.rglob("*.safetensors")):
            if any(self.path.rglob("*.bin")) or any(self.path.rglob("*.pt")):
                raise UnsafeCheckpointError(f"{self.path} holds only pickle weights; convert them to safetensors")
            raise ModelLoadError(f"{self.path} holds no *.safetensors weights")
        from sentence_transformers import SentenceTransformer

        try:
            self._model = SentenceTransformer(str(self.path), device=device, trust_remote_code=False,
                                              local_files_only=True)
        except Exception as e:  # a broken folder: say which
            raise ModelLoadError(f"cannot load the embedding model at {self.path}: {e}") from e
        get_dim = getattr(self._model, "get_embedding_dimension", None) or self._model.get_sentence_embedding_dimension
        self.dimensions = int(get_dim())
        self.max_tokens = int(getattr(self._model, "max_seq_length", 256) or 256)
        self.batch_size = batch_size
        self._lock = threading.Lock()

    @property
    def tokenizer(self):
        """The model's tokenizer (chunking counts tokens with it)."""
        return self._model.tokenizer

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        texts = list(texts)
        if not texts:
            return np.zeros((0, self.dimensions), dtype=np.float32)
        with self._lock:
            v = self._model.encode(texts, batch_size=self.batch_size, convert_to_numpy=True,
                                   normalize_embeddings=True, show_progress_bar=False)
        return np.ascontiguousarray(v, dtype=np.float32)


class HashingEmbedder:
    """A deterministic bag-of-words embedder with no model: hashed word and character-trigram counts,
    normalised. Far weaker than a trained model; for tests and for machines without one."""

    def __init__(self, dimensions: int = 256):
        self.name, self.dimensions = f"hashing-{dimensions}", dimensions

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dimensions), dtype=np.float32)
        for i, t in enumerate(texts):
            t = t.lower()
            feats = t.split() + [t[j:j + 3] for j in range(max(0, len(t) - 2))]
            for f in feats:
                h = int.from_bytes(hashlib.blake2b(f.encode(), digest_size=8).digest(), "little")
                out[i, h % self.dimensions] += 1.0
            n = np.linalg.norm(out[i])
            if n > 0:
                out[i] /= n
        return out
