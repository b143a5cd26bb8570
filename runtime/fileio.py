"""Files written whole or not at all, shared by every stage that saves something a crash must not corrupt.

    from hearth.runtime.fileio import atomic_write_text, atomic_write_bytes, staged
    atomic_write_text(run_dir / "hearth.json", text)     # readers see the old file or the new, never half
    with staged(out_dir, is_dir=True) as tmp:            # a temp folder beside out_dir, renamed in when done
        ...write into tmp...

A temp file beside the target (same filesystem), fsync'd, renamed over it, then the folder fsync'd so
the rename itself survives a power cut. Every temp is named `.NAME.tmp-[KIND-]pidP-tT-hH-RANDOM`: the
owner's pid, its start time and a hash of its host name, so the next writer of NAME can remove what a
killed process (kill -9, power cut) left behind without ever touching a live writer's temp.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import socket
import tempfile
import uuid
from pathlib import Path
from typing import Iterator

TMP_MARK = ".tmp-"
OLD = "old"  # the kind of a replaced folder, kept aside between the two renames of `commit_dir`

_OWNER_RE = re.compile(r"^(?:(?P<kind>[a-z0-9]+)-)?pid(?P<pid>\d+)-t(?P<start>\d+)-h(?P<host>[0-9a-f]{8})-")


def fsync_dir(directory: str | os.PathLike) -> None:
    """Flush a folder's entries (a rename) to disk; a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on folders; the rename is still atomic
        pass
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- temp names with an owner


def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux /proc); None where it cannot be read."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode("ascii", "replace")
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2:].split()  # the command name may hold spaces and parentheses
    if len(fields) < 20 or fields[0] in ("Z", "X"):  # a zombie has exited; only its parent has not reaped it
        return -1
    return int(fields[19])


def _host() -> str:
    return hashlib.sha1(socket.gethostname().encode("utf-8", "replace")).hexdigest()[:8]


def owner_mark(kind: str = "") -> str:
    """`[KIND-]pidP-tT-hH-`: what a temp name records about the process writing it (T 0: unknown)."""
    pid = os.getpid()
    start = _start_time(pid)
    return f"{kind + '-' if kind else ''}pid{pid}-t{max(start or 0, 0)}-h{_host()}-"


def temp_prefix(target: str | os.PathLike, kind: str = "") -> str:
    """The name a temp beside `target` starts with: `.NAME.tmp-[KIND-]pidP-tT-hH-`."""
    return f".{Path(target).name}{TMP_MARK}{owner_mark(kind)}"


def owner_alive(temp_name: str, target_name: str) -> bool:
    """Whether the process that named this temp (of `target_name`) may still be writing it. A name
    without an owner mark, or from another host, counts as alive: it is never removed."""
    prefix = f".{target_name}{TMP_MARK}"
    m = _OWNER_RE.match(temp_name[len(prefix):]) if temp_name.startswith(prefix) else None
    if m is None or m["host"] != _host():
        return True
    pid, start = int(m["pid"]), int(m["start"])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        pass
    except OSError:
        return True
    now = _start_time(pid)
    if now == -1:
        return False
    return not (start and now is not None and now != start)  # same pid, other start: the pid was reused


def _kind(temp_name: str, target_name: str) -> str:
    m = _OWNER_RE.match(temp_name[len(f".{target_name}{TMP_MARK}"):])
    return (m["kind"] or "") if m else ""


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def remove_stale_temps(target: str | os.PathLike) -> list[Path]:
    """Remove the temps beside `target` whose owner process is dead; returns what was removed.

    A replaced folder set aside by a writer that died before the new one was in place (`target` is
    missing) is renamed back to `target` instead: it is the only copy."""
    target = Path(target)
    prefix = f".{target.name}{TMP_MARK}"
    try:
        entries = [e.name for e in os.scandir(target.parent) if e.name.startswith(prefix)]
    except OSError:  # no folder yet: nothing to clean
        return []
    removed = []
    for name in sorted(entries):
        if owner_alive(name, target.name):
            continue
        p = target.parent / name
        if _kind(name, target.name) == OLD and not (target.exists() or target.is_symlink()):
            with contextlib.suppress(OSError):
                os.rename(p, target)
                continue
        _remove(p)
        removed.append(p)
    return removed


def make_temp(target: str | os.PathLike, *, is_dir: bool = False, kind: str = "", suffix: str = "") -> Path:
    """An empty temp file (closed) or folder beside `target`, named for this process; stale temps of
    `target` left by dead processes are removed first."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(target)
    if is_dir:
        return Path(tempfile.mkdtemp(dir=target.parent, prefix=temp_prefix(target, kind), suffix=suffix))
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=temp_prefix(target, kind), suffix=suffix)
    os.close(fd)
    return Path(name)


def commit_dir(tmp: Path, final: Path) -> None:
    """Rename a finished folder to `final`. An existing `final` is set aside (a marked temp) first and
    removed after; if this process dies between the two renames, the next writer puts it back."""
    old = None
    if final.exists() or final.is_symlink():
        old = final.with_name(temp_prefix(final, OLD) + uuid.uuid4().hex[:8])
        os.rename(final, old)
    os.rename(tmp, final)
    fsync_dir(final.parent)
    if old is not None:
        _remove(old)


@contextlib.contextmanager
def staged(target: str | os.PathLike, *, is_dir: bool = False, mode: int | None = None) -> Iterator[Path]:
    """Yield a temp file path or folder beside `target`; on success it replaces `target` atomically
    (a file by one rename, a folder by `commit_dir`), on any error or interrupt it is removed and
    `target` is left as it was. Files are made `mode` (default 0o644, folders 0o755)."""
    final = Path(target)
    tmp = make_temp(final, is_dir=is_dir)
    try:
        if is_dir:
            tmp.chmod(0o755)  # mkdtemp makes it owner-only
        yield tmp
        if is_dir:
            for f in tmp.rglob("*"):  # safetensors and mkstemp write owner-only files
                if f.is_file() and not f.is_symlink():
                    f.chmod(0o644 if mode is None else mode)
            commit_dir(tmp, final)
        else:
            if tmp.exists():
                tmp.chmod(0o644 if mode is None else mode)
            os.replace(tmp, final)
            fsync_dir(final.parent)
    except BaseException:
        _remove(tmp)
        raise


# ----------------------------------------------------------------------------- whole small files


def atomic_write_bytes(target: str | os.PathLike, data: bytes, mode: int = 0o644) -> Path:
    """Replace `target` with `data` atomically (parents created). Returns the target path."""
    target = Path(target)
    tmp = make_temp(target)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)  # mkstemp makes it owner-only; these files are meant to be read
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)
    return target


def atomic_write_text(target: str | os.PathLike, text: str, mode: int = 0o644) -> Path:
    """atomic_write_bytes of UTF-8 text."""
    return atomic_write_bytes(target, text.encode("utf-8"), mode)
