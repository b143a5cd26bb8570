"""Plan memory: plans that worked, kept on disk and retrieved as demonstrations for similar tasks.

    memory = PlanMemory("~/.hearth/plan_memory", SentenceTransformerEmbedder())
    memory.add("Total cost of 3 apples at 2 dollars", ["multiply 3 by 2"], "6", strategy="plan_execute")
    memory.search("Total cost of 5 pears at 3 dollars", k=2)     # [(PlanRecord(...), 0.83)]

The directory holds plans.jsonl (one record a line), vectors.npy (one unit vector a row, same order) and
meta.json (which embedder made the vectors; a memory refuses another one). Each file is written to a
temporary name and renamed, vectors first, so a crash leaves at worst one extra vector row, which
loading drops.
"""

from __future__ import annotations

import io
import json
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from hearth.runtime.fileio import atomic_write_bytes

from ..embed import Embedder
from ..types import AgentError, AgentInputError

PLANS_FILE, VECTORS_FILE, META_FILE = "plans.jsonl", "vectors.npy", "meta.json"


@dataclass
class PlanRecord:
    """One remembered run: the task, the steps that solved it, and its answer."""

    task: str
    steps: list[str]
    answer: str
    strategy: str = ""
    created: float = field(default_factory=time.time)


def _key(task: str) -> str:
    return " ".join(task.split()).casefold()


class PlanMemory:
    """A small vector store of PlanRecords (exact inner-product search over unit vectors; a few thousand
    plans at most, so numpy is enough). `threshold` is the least cosine similarity a hit needs."""

    def __init__(self, directory: str | Path, embedder: Embedder, *, threshold: float = 0.5):
        self.directory = Path(directory).expanduser()
        self.embedder, self.threshold = embedder, threshold
        self._lock = threading.Lock()
        self.records: list[PlanRecord] = []
        self._vectors = np.zeros((0, embedder.dimensions), dtype=np.float32)
        self._load()

    def __len__(self) -> int:
        return len(self.records)

    def _load(self) -> None:
        meta_path = self.directory / META_FILE
        if not meta_path.exists():
            return
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise AgentError(f"plan memory {meta_path} is not JSON: {e}") from e
        if meta.get("embedder") != self.embedder.name or meta.get("dimensions") != self.embedder.dimensions:
            raise AgentError(f"plan memory {self.directory} was built with the embedder {meta.get('embedder')!r} "
                             f"({meta.get('dimensions')} dims), not {self.embedder.name!r} "
                             f"({self.embedder.dimensions} dims); use that embedder or another directory")
        plans_path, vectors_path = self.directory / PLANS_FILE, self.directory / VECTORS_FILE
        records = []
        if plans_path.exists():
            for i, line in enumerate(plans_path.read_text(encoding="utf-8").splitlines(), 1):
                if line.strip():
                    try:
                        records.append(PlanRecord(**json.loads(line)))
                    except (json.JSONDecodeError, TypeError) as e:
                        raise AgentError(f"{plans_path} line {i} is not a plan record: {e}") from e
        vectors = (np.load(vectors_path) if vectors_path.exists()
                   else np.zeros((0, self.embedder.dimensions), dtype=np.float32))
        if vectors.ndim != 2 or vectors.shape[1] != self.embedder.dimensions or len(vectors) < len(records):
            raise AgentError(f"plan memory {self.directory}: {vectors_path.name} has shape {vectors.shape} for "
                             f"{len(records)} plans of {self.embedder.dimensions} dims; the files do not match")
        # vectors are renamed into place before plans: extra rows are from an add that did not finish
        self.records, self._vectors = records, np.ascontiguousarray(vectors[:len(records)], dtype=np.float32)

    def _save(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        meta = {"embedder": self.embedder.name, "dimensions": self.embedder.dimensions, "version": 1}
        atomic_write_bytes(self.directory / META_FILE, json.dumps(meta).encode())
        buf = io.BytesIO()
        np.save(buf, self._vectors)
        atomic_write_bytes(self.directory / VECTORS_FILE, buf.getvalue())
        lines = "".join(json.dumps(asdict(r), ensure_ascii=False) + "\n" for r in self.records)
        atomic_write_bytes(self.directory / PLANS_FILE, lines.encode("utf-8"))

    def add(self, task: str, steps: Sequence[str], answer: str, *, strategy: str = "") -> PlanRecord:
        """Remember a plan that worked; the same task text (ignoring case and spacing) replaces its older plan."""
        if not task.strip():
            raise AgentInputError("a remembered plan needs a task", "task")
        record = PlanRecord(task.strip(), [str(s) for s in steps], str(answer), strategy)
        vec = self.embedder.embed([record.task]).astype(np.float32)  # (1, D)
        with self._lock:
            same = [i for i, r in enumerate(self.records) if _key(r.task) == _key(record.task)]
            if same:
                self.records[same[0]] = record
                self._vectors[same[0]] = vec[0]
            else:
                self.records.append(record)
                self._vectors = np.concatenate([self._vectors, vec])
            self._save()
        return record

    def search(self, task: str, k: int = 2, threshold: float | None = None) -> list[tuple[PlanRecord, float]]:
        """Up to k remembered plans whose task is at least `threshold` similar to `task`, best first."""
        if not self.records or k <= 0:
            return []
        threshold = self.threshold if threshold is None else threshold
        q = self.embedder.embed([task])[0]  # (D,)
        sims = self._vectors @ q  # (N,)
        order = sorted(range(len(sims)), key=lambda i: (-float(sims[i]), i))[:k]
        return [(self.records[i], float(sims[i])) for i in order if sims[i] >= threshold]


def format_memories(hits: Sequence[tuple[PlanRecord, float]]) -> str:
    """Remembered plans as a demonstration block for a prompt ("" when there are none)."""
    if not hits:
        return ""
    blocks = []
    for record, _ in hits:
        steps = "\n".join(f"{i}. {s}" for i, s in enumerate(record.steps, 1))
        blocks.append(f"Task: {record.task}\nSteps:\n{steps}\nAnswer: {record.answer}")
    return "Similar tasks solved before (use them as examples):\n\n" + "\n\n".join(blocks)
