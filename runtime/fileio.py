"""Files written whole or not at all, shared by every stage that saves something a crash must not corrupt.

    from hearth.runtime.fileio import atomic_write_text, atomic_write_bytes
    atomic_write_text(run_dir / "hearth.json", text)     # readers see the old file or the new, never half

A temp file beside the target (same filesystem), fsync'd, renamed over it, then the folder fsync'd so
the rename itself survives a power cut.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

TMP_MARK = ".tmp-"


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


def atomic_write_bytes(target: str | os.PathLike, data: bytes, mode: int = 0o644) -> Path:
    """Replace `target` with `data` atomically (parents created). Returns the target path."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}{TMP_MARK}")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)  # mkstemp makes it owner-only; these files are meant to be read
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)
    return target


def atomic_write_text(target: str | os.PathLike, text: str, mode: int = 0o644) -> Path:
    """atomic_write_bytes of UTF-8 text."""
    return atomic_write_bytes(target, text.encode("utf-8"), mode)
