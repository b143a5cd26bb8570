"""The on-disk layout of one index and the moves that keep it crash-safe.

    <dir>/CURRENT          "v000007\\n": the live version, replaced atomically (temp file + fsync + os.replace)
    <dir>/LOCK             fcntl.flock'ed by the one writer; holds its pid
    <dir>/v000007/         an immutable version: index.faiss, chunks.jsonl, meta.json
    <dir>/.tmp-v000008-*/  a version being written; renamed into place only when complete

A SIGKILL at any moment leaves CURRENT naming a complete version. Stale temp folders and versions newer
than CURRENT (written but never published) are removed by the next writer; all but the newest
KEEP_VERSIONS versions are pruned after each commit (a reader that lost a race simply reloads).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import faiss

from .errors import IndexBusy, IndexNotFound, RagError
from .vectors import prepare

FORMAT = 1
KEEP_VERSIONS = 2
CURRENT, LOCK = "CURRENT", "LOCK"
INDEX_FILE, CHUNKS_FILE, META_FILE = "index.faiss", "chunks.jsonl", "meta.json"
_VERSION_RE = re.compile(r"^v(\d{6,})$")

# flock conflicts between two open files even in one process; this lock spares a thread from polling for
# a lock another thread of the same handle holds
_process_locks: dict[Path, threading.Lock] = {}
_process_locks_guard = threading.Lock()


def version_name(version: int) -> str:
    return f"v{version:06d}"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durable(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def read_current(directory: Path) -> str | None:
    """The live version's folder name, or None when the index has none (never created, or dropped)."""
    try:
        name = (directory / CURRENT).read_text().strip()
    except FileNotFoundError:
        return None
    if not _VERSION_RE.match(name):
        raise RagError(f"{directory / CURRENT} is damaged (holds {name[:40]!r}, not a version name)")
    return name


def read_meta(directory: Path) -> dict[str, Any]:
    """The live version's meta.json, without loading the vectors (for listings)."""
    for _ in range(3):
        name = read_current(directory)
        if name is None:
            raise IndexNotFound(f"no RAG index at {directory}")
        try:
            return json.loads((directory / name / META_FILE).read_text())
        except FileNotFoundError:
            continue  # pruned between reading CURRENT and the file: read CURRENT again
    raise RagError(f"the index at {directory} keeps changing under the reader; try again")


def load_version(directory: Path, name: str) -> tuple[dict[str, Any], list[dict[str, Any]], faiss.Index]:
    """meta, chunks (in id order) and the FAISS index of one version folder. FileNotFoundError propagates
    (the caller retries: the version may have been pruned); anything else damaged is a RagError."""
    folder = directory / name
    try:
        meta = json.loads((folder / META_FILE).read_text())
        with open(folder / CHUNKS_FILE, encoding="utf-8") as f:
            chunks = [json.loads(line) for line in f if line.strip()]
        index = prepare(faiss.read_index(str(folder / INDEX_FILE)))
    except FileNotFoundError:
        raise
    except (ValueError, RuntimeError, OSError) as e:
        raise RagError(f"the index version {folder} is damaged: {e}") from None
    if meta.get("format") != FORMAT:
        raise RagError(f"{folder} has index format {meta.get('format')!r}; this hearth reads format {FORMAT}")
    if index.ntotal != len(chunks) or meta.get("chunks", len(chunks)) != len(chunks):
        raise RagError(f"the index version {folder} is damaged: {index.ntotal} vectors for {len(chunks)} chunks")
    return meta, chunks, index


def write_version(directory: Path, meta: dict[str, Any], chunks: list[dict[str, Any]],
                  index: faiss.Index) -> str:
    """Write a complete version folder (temp folder, fsync, rename) and return its name. Not yet live."""
    name = version_name(meta["version"])
    tmp = directory / f".tmp-{name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    faiss.write_index(index, str(tmp / INDEX_FILE))
    with open(tmp / INDEX_FILE, "rb+") as f:
        os.fsync(f.fileno())
    body = "".join(json.dumps(c, ensure_ascii=False) + "\n" for c in chunks)
    write_durable(tmp / CHUNKS_FILE, body.encode("utf-8"))
    write_durable(tmp / META_FILE, json.dumps(meta, ensure_ascii=False, indent=1).encode("utf-8"))
    fsync_dir(tmp)
    final = directory / name
    if final.exists():  # left by a writer that died between this rename and publishing: never live
        shutil.rmtree(final)
    os.rename(tmp, final)
    fsync_dir(directory)
    return name


def publish(directory: Path, name: str) -> None:
    """Make version `name` the live one, atomically."""
    tmp = directory / f".{CURRENT}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    write_durable(tmp, (name + "\n").encode())
    os.replace(tmp, directory / CURRENT)
    fsync_dir(directory)


def clean(directory: Path, keep: int = KEEP_VERSIONS) -> None:
    """Remove temp folders, unpublished versions and all but the newest `keep` versions. Writer only."""
    live = read_current(directory)
    live_v = int(live[1:]) if live else -1
    versions = []
    for entry in directory.iterdir():
        if entry.name.startswith((".tmp-", f".{CURRENT}.")):
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        elif (m := _VERSION_RE.match(entry.name)) and entry.is_dir():
            v = int(m.group(1))
            if v > live_v:
                shutil.rmtree(entry)
            else:
                versions.append(v)
    for v in sorted(versions)[:-keep] if keep else []:
        shutil.rmtree(directory / version_name(v), ignore_errors=True)


@contextmanager
def write_lock(directory: Path, timeout_s: float) -> Iterator[None]:
    """Exclusive writer lock on the index: a thread lock within this process, flock across processes.
    Waits up to timeout_s, then IndexBusy naming the holder."""
    with _process_locks_guard:
        tlock = _process_locks.setdefault(directory.resolve(), threading.Lock())
    if not tlock.acquire(timeout=max(0.0, timeout_s)):
        raise IndexBusy(f"the index at {directory} is being written by another thread of this process")
    try:
        fd = os.open(directory / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            deadline = time.monotonic() + timeout_s
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                        raise IndexBusy(f"the index at {directory} is being written by process {holder}; "
                                        f"waited {timeout_s:g} s") from None
                    time.sleep(0.05)  # flock has no timed wait; poll
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
            try:
                yield
            finally:
                os.ftruncate(fd, 0)
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
    finally:
        tlock.release()


def try_clean(directory: Path) -> None:
    """Clean stale leftovers when no writer is active (on open); skip silently when one is."""
    with _process_locks_guard:
        tlock = _process_locks.setdefault(directory.resolve(), threading.Lock())
    if not tlock.acquire(blocking=False):
        return
    try:
        fd = os.open(directory / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return  # a writer is at work; its temp folder is not stale
            try:
                clean(directory)
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
    finally:
        tlock.release()
