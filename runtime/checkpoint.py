"""Checkpoint artifacts: the `hearth.json` manifest, content hashes, and the safety gate before a load.

Every checkpoint directory describes itself with `hearth.json`:

    from hearth.runtime.checkpoint import Manifest, Parent, write_manifest, read_manifest
    write_manifest(out_dir, Manifest(stage="sft", method="lora-merge",
                                     parent=Parent(str(base_dir), content_hash(base_dir))))

Before any loader touches weights it calls `inspect_checkpoint(path)`, which tells the format by
reading file content (GGUF magic, safetensors header), refuses pickle-only checkpoints unless
`allow_pickle=True`, and refuses configs that ask for remote code unless `trust_remote_code=True`.
Nothing here imports torch or transformers.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
import struct
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .errors import ModelLoadError, ModelNotFoundError, UnsafeCheckpointError
from .fileio import atomic_write_text

MANIFEST_NAME = "hearth.json"
FORMAT_VERSION = 1
STAGES = ("base", "pretrain", "sft", "rm", "rlhf", "quantized")

# Files whose bytes define the model (hashed); tokenizer and docs are not part of the identity.
WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".bin", ".pt", ".pth", ".ckpt")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
CONFIG_FILES = ("config.json",)

GGUF_MAGIC = b"GGUF"
_CHUNK = 4 << 20  # 4 MiB reads keep memory flat on multi-GB files
_MAX_SAFETENSORS_HEADER = 100 << 20  # the format's own upper bound on header size
_SAFETENSORS_DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E4M3": 8, "F8_E5M2": 8, "F8_E8M0": 8, "U16": 16, "I16": 16,
    "F16": 16, "BF16": 16, "U32": 32, "I32": 32, "F32": 32, "U64": 64, "I64": 64, "F64": 64,
    "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "C64": 64,
}
# Packages whose versions go into every manifest (looked up in metadata, never imported).
_TOOLS = ("hearth-llm", "torch", "transformers", "safetensors", "tokenizers", "accelerate", "peft",
          "trl", "gguf", "llama-cpp-python", "bitsandbytes", "gptqmodel")


# ----------------------------------------------------------------------------- manifest


@dataclass
class Parent:
    """The checkpoint this one was derived from, pinned by content."""

    path: str
    content_hash: str


def collect_tool_versions() -> dict[str, str]:
    """Versions of python and the installed ML tools, read from package metadata (no imports)."""
    versions = {"python": platform.python_version()}
    for name in _TOOLS:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class Manifest:
    """What `hearth.json` holds: where a checkpoint came from and how it was made."""

    stage: str
    """One of STAGES: base, pretrain, sft, rm, rlhf, quantized."""
    method: str = ""
    """How it was made, e.g. "gguf-dequantize", "sft-lora", "gptq-int4"."""
    parent: Parent | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    """The method's settings (learning rate, bits, group size ...)."""
    data_hashes: dict[str, str] = field(default_factory=dict)
    """Dataset name -> content hash of the data it was trained or calibrated on."""
    tool_versions: dict[str, str] = field(default_factory=collect_tool_versions)
    metrics: dict[str, Any] = field(default_factory=dict)
    created: str = field(default_factory=_now)
    """ISO-8601 UTC time of creation."""
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ValueError(f"Manifest.stage must be one of {', '.join(STAGES)}; got {self.stage!r}")
        if isinstance(self.parent, dict):
            self.parent = Parent(**self.parent)
        if self.parent is not None and not (self.parent.path and self.parent.content_hash):
            raise ValueError("Manifest.parent needs both path and content_hash")
        if not isinstance(self.format_version, int) or self.format_version < 1:
            raise ValueError(f"Manifest.format_version must be a positive int, got {self.format_version!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Manifest":
        if not isinstance(data, dict):
            raise ValueError("a manifest must be a JSON object")
        version = data.get("format_version", FORMAT_VERSION)
        if isinstance(version, int) and version > FORMAT_VERSION:
            raise ValueError(f"manifest format_version {version} is newer than this hearth "
                             f"understands ({FORMAT_VERSION}); upgrade hearth")
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


def _manifest_file(path: str | os.PathLike) -> Path:
    p = Path(path)
    # A file inside a checkpoint dir (e.g. model.gguf) shares that dir's manifest.
    return (p.parent if p.is_file() else p) / MANIFEST_NAME


def read_manifest(path: str | os.PathLike) -> Manifest | None:
    """The manifest of a checkpoint dir (or of the dir holding a checkpoint file); None if it has none."""
    mf = _manifest_file(path)
    try:
        text = mf.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    try:
        return Manifest.from_dict(json.loads(text))
    except (ValueError, TypeError) as e:
        raise ModelLoadError(f"invalid manifest {mf}: {e}") from e


def write_manifest(path: str | os.PathLike, manifest: Manifest) -> Path:
    """Write `hearth.json` into the checkpoint dir atomically; returns the file written."""
    directory = Path(path)
    if not directory.is_dir():
        raise ModelNotFoundError(f"checkpoint directory does not exist: {directory}")
    # Serialize first, so a non-JSON value fails before any file is touched.
    text = json.dumps(manifest.to_dict(), indent=2, ensure_ascii=False) + "\n"
    target = directory / MANIFEST_NAME
    atomic_write_text(target, text)
    return target


def update_metrics(path: str | os.PathLike, **metrics: Any) -> Manifest:
    """Merge metrics (eval scores, perplexity ...) into an existing manifest; returns the new manifest."""
    manifest = read_manifest(path)
    if manifest is None:
        raise ModelNotFoundError(f"no {MANIFEST_NAME} in {path}; write a manifest before adding metrics")
    manifest.metrics.update(metrics)
    write_manifest(_manifest_file(path).parent, manifest)
    return manifest


# ----------------------------------------------------------------------------- content hash


def _hash_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def hashed_files(directory: Path) -> list[Path]:
    """The files of a checkpoint dir that define its identity: weights and config, sorted by name."""
    return sorted(
        p for p in directory.iterdir()
        if p.is_file() and not p.name.startswith(".")
        and (p.suffix in WEIGHT_SUFFIXES or p.name in CONFIG_FILES))


def content_hash(path: str | os.PathLike) -> str:
    """sha256 hex of a checkpoint: a single file hashes its bytes (equal to `sha256sum`); a directory
    hashes the list of (name, sha256) of its weight and config files in sorted order."""
    p = Path(path)
    if not p.exists():
        raise ModelNotFoundError(f"no checkpoint at {p}")
    if p.is_file():
        return _hash_file(p)
    files = hashed_files(p)
    if not any(f.suffix in WEIGHT_SUFFIXES for f in files):
        raise ModelLoadError(f"no weight files to hash in {p}")
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.name}\0{_hash_file(f)}\n".encode())
    return h.hexdigest()


# ----------------------------------------------------------------------------- safety gate


@dataclass
class CheckpointInfo:
    """What `inspect_checkpoint` found, from file content."""

    path: Path
    """The path inspected (a directory or a single file)."""
    format: str
    """"hf-safetensors", "gguf", or "pickle" (only with allow_pickle)."""
    weight_files: list[Path]
    config: dict[str, Any] | None = None
    """config.json of a directory checkpoint, if present."""
    manifest: Manifest | None = None
    num_tensors: int = 0

    @property
    def model_file(self) -> Path:
        """The file a single-file loader (llama.cpp) opens."""
        return self.weight_files[0]


def _read_gguf_header(path: Path) -> int | None:
    """Number of tensors if path is a GGUF file, None if it is not one; ModelLoadError if truncated."""
    with open(path, "rb") as f:
        head = f.read(24)
    if head[:4] != GGUF_MAGIC:
        return None
    if len(head) < 24:
        raise ModelLoadError(f"truncated GGUF file {path}: header is {len(head)} bytes")
    version, n_tensors, _n_kv = struct.unpack("<IQQ", head[4:24])
    if version not in (1, 2, 3):
        raise ModelLoadError(f"unsupported GGUF version {version} in {path}")
    return n_tensors


def is_gguf(path: str | os.PathLike) -> bool:
    """True if the file starts with the GGUF magic and a valid header, whatever its name."""
    return Path(path).is_file() and _read_gguf_header(Path(path)) is not None


# GGUF metadata value types (gguf spec): id -> struct format; 8 is a string, 9 an array.
_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
                 10: "<Q", 11: "<q", 12: "<d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


class _GGUFMetaReader:
    """Sequential reader of a GGUF key/value section; any short read is a truncated file."""

    def __init__(self, f: Any, path: Path):
        self.f, self.path = f, path
        self.size = path.stat().st_size

    def read(self, n: int) -> bytes:
        data = self.f.read(n)
        if len(data) != n:
            raise ModelLoadError(f"truncated GGUF file {self.path}: metadata ends early")
        return data

    def unpack(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.read(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        n = self.unpack("<Q")
        if n > self.size:
            raise ModelLoadError(f"corrupt GGUF file {self.path}: string length {n} exceeds the file")
        return self.read(n).decode("utf-8", errors="replace")

    def value(self, vtype: int) -> Any:
        if vtype == _GGUF_STRING:
            return self.string()
        if vtype in _GGUF_SCALARS:
            return self.unpack(_GGUF_SCALARS[vtype])
        raise ModelLoadError(f"corrupt GGUF file {self.path}: unknown metadata type {vtype}")

    def skip_array(self) -> int:
        etype, count = self.unpack("<I"), self.unpack("<Q")
        if etype in _GGUF_SCALARS:
            self.f.seek(struct.calcsize(_GGUF_SCALARS[etype]) * count, os.SEEK_CUR)
        elif etype == _GGUF_STRING:
            for _ in range(count):
                self.f.seek(self.unpack("<Q"), os.SEEK_CUR)
        elif etype == _GGUF_ARRAY:
            for _ in range(count):
                self.skip_array()
        else:
            raise ModelLoadError(f"corrupt GGUF file {self.path}: unknown array type {etype}")
        return count


def read_gguf_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """Scalar and string metadata of a GGUF file (general.architecture, <arch>.context_length,
    tokenizer.chat_template ...), without llama.cpp or the gguf package. Arrays (the vocabulary,
    merges) are skipped; their length is given under "<key>.length"."""
    p = Path(path)
    if _read_gguf_header(p) is None:
        raise ModelLoadError(f"{p} is not a GGUF file (no GGUF magic)")
    with open(p, "rb") as f:
        head = f.read(24)
        version, _n_tensors, n_kv = struct.unpack("<IQQ", head[4:24])
        if version < 2:
            raise ModelLoadError(f"GGUF version {version} in {p} is too old; convert it again")
        r = _GGUFMetaReader(f, p)
        meta: dict[str, Any] = {}
        for _ in range(n_kv):
            key = r.string()
            vtype = r.unpack("<I")
            if vtype == _GGUF_ARRAY:
                meta[f"{key}.length"] = r.skip_array()
            else:
                meta[key] = r.value(vtype)
    return meta


def _looks_like_safetensors(head: bytes, size: int) -> bool:
    if len(head) < 9:
        return False
    n = struct.unpack("<Q", head[:8])[0]
    return 2 <= n <= min(size - 8, _MAX_SAFETENSORS_HEADER) and head[8:9] == b"{"


def _read_safetensors_header(path: Path) -> int:
    """Validate a safetensors file (header JSON, dtypes, offsets inside the file); returns tensor count."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw_len = f.read(8)
        if len(raw_len) < 8:
            raise ModelLoadError(f"corrupt safetensors file {path}: shorter than its 8-byte header length")
        n = struct.unpack("<Q", raw_len)[0]
        if n > _MAX_SAFETENSORS_HEADER or 8 + n > size:
            raise ModelLoadError(f"corrupt or truncated safetensors file {path}: header of {n} bytes "
                                 f"does not fit in a {size}-byte file")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"corrupt safetensors file {path}: header is not JSON ({e})") from e
    if not isinstance(header, dict):
        raise ModelLoadError(f"corrupt safetensors file {path}: header is not a JSON object")
    data_size = size - 8 - n
    count = 0
    for name, t in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = t["data_offsets"]
            bits = _SAFETENSORS_DTYPE_BITS[t["dtype"]]
            numel = 1
            for d in t["shape"]:
                numel *= int(d)
        except (KeyError, TypeError, ValueError) as e:
            raise ModelLoadError(f"corrupt safetensors file {path}: bad entry for tensor {name!r}") from e
        if not 0 <= begin <= end or (numel * bits + 7) // 8 != end - begin:
            raise ModelLoadError(f"corrupt safetensors file {path}: tensor {name!r} has inconsistent offsets")
        if end > data_size:
            raise ModelLoadError(f"truncated safetensors file {path}: tensor {name!r} ends at byte {end} "
                                 f"but the file holds {data_size} data bytes")
        count += 1
    return count


def _is_pickle(head: bytes) -> bool:
    # torch.save writes a zip archive; older torch and plain pickle start with PROTO (0x80) + version.
    return head[:4] == b"PK\x03\x04" or (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5)


def _load_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"invalid JSON in {path}: {e}") from e
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} must hold a JSON object")
    return data


def check_trust_remote_code(config: dict[str, Any] | None, allow: bool, source: str = "config") -> None:
    """Refuse a config whose `auto_map` asks transformers to import code shipped with the checkpoint."""
    if config and "auto_map" in config and not allow:
        classes = ", ".join(sorted(map(str, config["auto_map"])))
        raise UnsafeCheckpointError(
            f"{source} declares custom code (auto_map: {classes}); loading it would run code from the "
            "checkpoint. Pass --trust-remote-code (trust_remote_code=True) only if you trust its source.")


class PickleRefusedError(UnsafeCheckpointError):
    """Pickle-only weights and no explicit opt-in. The message names the Python opt-in; a command line
    re-raises `naming(its flag)` so the user reads the flag of the command they ran (or that it has none)."""

    def __init__(self, files: list[Path], opt_in: str | None = "allow_pickle=True"):
        self.files = list(files)
        names = ", ".join(str(f) for f in self.files)
        how = (f", or pass {opt_in} if you trust their source" if opt_in else
               " (this command does not load pickle weights)")
        super().__init__(f"pickle weights can run arbitrary code when loaded ({names}); "
                         f"convert them to safetensors{how}")

    def naming(self, opt_in: str | None) -> "PickleRefusedError":
        """The same refusal naming `opt_in` (a command's flag, e.g. "--allow-pickle"; None: there is none)."""
        return PickleRefusedError(self.files, opt_in)


def inspect_checkpoint(path: str | os.PathLike, allow_pickle: bool = False,
                       trust_remote_code: bool = False) -> CheckpointInfo:
    """Tell what a checkpoint is, from content, and refuse what is unsafe to load.

    A directory is "hf-safetensors" when it holds valid safetensors files (sharded ones must all be
    present), else "gguf" when it holds a GGUF file, else "pickle" only with allow_pickle.
    A single file must be a GGUF (or a pickle with allow_pickle)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ModelNotFoundError(f"no model at {p} (path does not exist)")
    if p.is_file():
        return _inspect_file(p, allow_pickle)

    config = _load_json(p / "config.json")
    check_trust_remote_code(config, trust_remote_code, source=str(p / "config.json"))
    check_trust_remote_code(_load_json(p / "tokenizer_config.json"), trust_remote_code,
                            source=str(p / "tokenizer_config.json"))
    manifest = read_manifest(p)

    safetensors: list[Path] = []
    ggufs: list[tuple[Path, int]] = []
    pickles: list[Path] = []
    n_tensors = 0
    for f in sorted(x for x in p.iterdir() if x.is_file() and not x.name.startswith(".")):
        size = f.stat().st_size
        with open(f, "rb") as fh:
            head = fh.read(16)
        if head[:4] == GGUF_MAGIC:
            ggufs.append((f, _read_gguf_header(f) or 0))
        elif f.suffix == ".safetensors" or _looks_like_safetensors(head, size):
            # The name says safetensors or the bytes look like it: the content must then be valid.
            n_tensors += _read_safetensors_header(f)
            safetensors.append(f)
        elif _is_pickle(head) and (f.suffix in PICKLE_SUFFIXES or head[:4] != b"PK\x03\x04"):
            pickles.append(f)

    if safetensors:
        _check_shards(p, safetensors)
        return CheckpointInfo(p, "hf-safetensors", safetensors, config, manifest, n_tensors)
    if ggufs:
        if len(ggufs) > 1:
            names = ", ".join(g.name for g, _ in ggufs)
            raise ModelLoadError(f"{p} holds several GGUF files ({names}); give the path of one")
        return CheckpointInfo(p, "gguf", [ggufs[0][0]], config, manifest, ggufs[0][1])
    if pickles:
        if not allow_pickle:
            raise PickleRefusedError(pickles)
        return CheckpointInfo(p, "pickle", pickles, config, manifest)
    raise ModelLoadError(f"no model weights in {p}: expected *.safetensors (with config.json) or a GGUF file")


def _inspect_file(p: Path, allow_pickle: bool) -> CheckpointInfo:
    n = _read_gguf_header(p)
    if n is not None:
        return CheckpointInfo(p, "gguf", [p], None, read_manifest(p), n)
    with open(p, "rb") as fh:
        head = fh.read(16)
    if _looks_like_safetensors(head, p.stat().st_size) or p.suffix == ".safetensors":
        _read_safetensors_header(p)  # a corrupt file is reported as such before the hint below
        raise ModelLoadError(f"{p} is a lone safetensors file; give its checkpoint directory "
                             f"(with config.json), {p.parent}")
    if _is_pickle(head):
        if not allow_pickle:
            raise PickleRefusedError([p])
        return CheckpointInfo(p, "pickle", [p])
    raise ModelLoadError(f"{p} is not a model file hearth can load (not GGUF, safetensors or pickle)")


def _check_shards(directory: Path, found: list[Path]) -> None:
    """A sharded checkpoint's index must only name shards that are present and valid."""
    for index_file in directory.glob("*.safetensors.index.json"):
        index = _load_json(index_file) or {}
        names = {f.name for f in found}
        missing = sorted(set((index.get("weight_map") or {}).values()) - names)
        if missing:
            raise ModelLoadError(f"checkpoint {directory} is missing shards named in {index_file.name}: "
                                 f"{', '.join(missing)}")
