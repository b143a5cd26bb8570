"""What every quantize command shares: checking the input, writing the output atomically, lineage.

    with atomic_output(out) as tmp:        # a temp dir (or file) beside `out`; renamed into place at the end
        ...write into tmp...
        write_manifest(tmp, quantized_manifest(src, "gptq-int4", {"bits": 4}))

An interrupted or failed run removes its temp and leaves `out` as it was (absent, or the old artifact).
Nothing here imports torch.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Iterator

from hearth.runtime.checkpoint import (CheckpointInfo, Manifest, Parent, content_hash, inspect_checkpoint,
                                       read_manifest)
from hearth.runtime.errors import HearthError, ModelLoadError, ModelNotFoundError
from hearth.runtime.fileio import atomic_write_text, make_temp, staged  # noqa: F401  (re-exported for the stages)

# Tokenizer and template files copied next to converted weights (whichever the source has).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
                   "generation_config.json")


class QuantizeError(HearthError, ValueError):
    """A quantize command cannot do what was asked (bad option, unsupported input); the message says why."""


class OutputExistsError(QuantizeError):
    """The output path exists and the command was not told to replace it (`--force`)."""


class QualityGateError(HearthError):
    """An artifact's quality report exceeds the threshold the user set (`--max-ppl-increase`)."""


def say(msg: str) -> None:
    print(f"quantize: {msg}", file=sys.stderr, flush=True)


def source_checkpoint(path: str | os.PathLike, *, want: str = "hf-safetensors",
                      allow_pickle: bool = False) -> CheckpointInfo:
    """Inspect an input checkpoint; a missing path, corrupt weights or the wrong format is a clear error.

    `want` is "hf-safetensors", "gguf" or "any"."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ModelNotFoundError(f"no checkpoint at {p}")
    info = inspect_checkpoint(p, allow_pickle=allow_pickle)
    if want != "any" and info.format != want:
        raise QuantizeError(f"{p} is a {info.format} checkpoint; this command needs {want}")
    if info.format == "hf-safetensors" and info.config is None:
        raise ModelLoadError(f"{p} has weights but no config.json")
    return info


def quantized_manifest(parent: str | os.PathLike, method: str, parameters: dict[str, Any] | None = None,
                       data_hashes: dict[str, str] | None = None, stage: str = "quantized") -> Manifest:
    """A manifest whose parent is pinned by content hash (stage "quantized" unless told otherwise)."""
    parent = Path(parent).resolve()
    return Manifest(stage=stage, method=method, parent=Parent(path=str(parent), content_hash=content_hash(parent)),
                    parameters=dict(parameters or {}), data_hashes=dict(data_hashes or {}))


def parent_lineage(path: str | os.PathLike) -> Manifest | None:
    """The input's own manifest, if it has one (its stage and method are kept in the child's parameters)."""
    try:
        return read_manifest(path)
    except ModelLoadError:
        return None


def copy_tokenizer(src: str | os.PathLike, dst: str | os.PathLike) -> list[str]:
    """Copy tokenizer and chat-template files from a checkpoint dir; returns the names copied."""
    src, dst = Path(src), Path(dst)
    copied = []
    for name in TOKENIZER_FILES:
        f = src / name
        if f.is_file():
            shutil.copyfile(f, dst / name)
            copied.append(name)
    return copied


def refuse_existing(out: str | os.PathLike, overwrite: bool) -> Path:
    """The resolved output path; an existing one is an error unless `overwrite` (the CLI's --force)."""
    final = Path(out).expanduser().resolve()
    if not overwrite and (final.exists() or final.is_symlink()):
        raise OutputExistsError(f"{final} already exists; pass --force to replace it")
    return final


@contextlib.contextmanager
def atomic_output(out: str | os.PathLike, *, is_file: bool = False, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temp path beside `out` (a dir, or a file path when is_file); rename it into place on success.

    Any exception or interrupt removes the temp and leaves `out` untouched; an existing `out` is replaced
    only once the new one is complete. With overwrite=False an existing `out` is an error before any
    work starts. Temps that killed runs left beside `out` are removed first (runtime.fileio.staged)."""
    final = refuse_existing(out, overwrite)
    if final.exists() and is_file != final.is_file():
        kind = "a file" if final.is_file() else "a directory"
        raise QuantizeError(f"{final} exists and is {kind}; refusing to replace it")
    with staged(final, is_dir=not is_file) as tmp:
        yield tmp


def size_on_disk(path: str | os.PathLike) -> int:
    """Bytes of the weight files of an artifact (a GGUF file, or a checkpoint dir's weights + config)."""
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    from hearth.runtime.checkpoint import hashed_files
    return sum(f.stat().st_size for f in hashed_files(p))
