"""Rewrite the key/value metadata of a GGUF file without touching its tensors.

    write_metadata("model.gguf", {"hearth.quality": json.dumps(report)})
    read_hearth_metadata("model.gguf")   # {"hearth.manifest": {...}, "hearth.quality": {...}}

A GGUF file is: header (magic, version, n_tensors, n_kv) | key/value pairs | tensor infos | padding |
tensor data. Tensor infos hold offsets relative to the start of the data section, so a new KV section
only moves the data section as a whole: the tensor infos and every tensor byte are copied verbatim.
The new file is written beside the old one and renamed over it, so a crash leaves the old file whole.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from gguf import GGUF_DEFAULT_ALIGNMENT, GGUF_MAGIC, GGUFValueType, Keys

from hearth.runtime.checkpoint import is_gguf, read_gguf_metadata
from hearth.runtime.errors import ModelLoadError, ModelNotFoundError

from .common import QuantizeError, staged

MetaValue = str | int | float | bool
HEARTH_PREFIX = "hearth."
_SCALAR_FMT = {GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H",
               GGUFValueType.INT16: "<h", GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i",
               GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?", GGUFValueType.UINT64: "<Q",
               GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d"}
_INT_RANGES = {GGUFValueType.UINT8: (0, 2**8), GGUFValueType.INT8: (-2**7, 2**7),
               GGUFValueType.UINT16: (0, 2**16), GGUFValueType.INT16: (-2**15, 2**15),
               GGUFValueType.UINT32: (0, 2**32), GGUFValueType.INT32: (-2**31, 2**31),
               GGUFValueType.UINT64: (0, 2**64), GGUFValueType.INT64: (-2**63, 2**63)}
_COPY_CHUNK = 16 << 20


@dataclass
class _Layout:
    """Where the parts of a GGUF file are: raw bytes of each KV pair, tensor-info span, data start."""

    version: int
    n_tensors: int
    kv: dict[str, tuple[GGUFValueType, bytes]]
    """key -> (value type, the pair's full raw bytes: key, type and value)."""
    ti_start: int
    ti_end: int
    data_start: int
    alignment: int


class _Reader:
    def __init__(self, f: BinaryIO, path: Path):
        self.f, self.path = f, path

    def read(self, n: int) -> bytes:
        data = self.f.read(n)
        if len(data) != n:
            raise ModelLoadError(f"truncated GGUF file {self.path}")
        return data

    def unpack(self, fmt: str) -> int | float | bool:
        return struct.unpack(fmt, self.read(struct.calcsize(fmt)))[0]

    def skip_string(self) -> None:
        self.f.seek(int(self.unpack("<Q")), os.SEEK_CUR)

    def skip_value(self, vtype: int) -> None:
        if vtype == GGUFValueType.STRING:
            self.skip_string()
        elif vtype == GGUFValueType.ARRAY:
            etype, count = int(self.unpack("<I")), int(self.unpack("<Q"))
            if etype in _SCALAR_FMT:
                self.f.seek(struct.calcsize(_SCALAR_FMT[GGUFValueType(etype)]) * count, os.SEEK_CUR)
            else:
                for _ in range(count):
                    self.skip_value(etype)
        elif vtype in _SCALAR_FMT:
            self.f.seek(struct.calcsize(_SCALAR_FMT[GGUFValueType(vtype)]), os.SEEK_CUR)
        else:
            raise ModelLoadError(f"corrupt GGUF file {self.path}: unknown metadata type {vtype}")


def _layout(path: Path) -> _Layout:
    with open(path, "rb") as f:
        r = _Reader(f, path)
        if int(r.unpack("<I")) != GGUF_MAGIC:
            raise ModelLoadError(f"{path} is not a GGUF file (no GGUF magic)")
        version = int(r.unpack("<I"))
        if version not in (2, 3):
            raise ModelLoadError(f"unsupported GGUF version {version} in {path}")
        n_tensors, n_kv = int(r.unpack("<Q")), int(r.unpack("<Q"))
        kv: dict[str, tuple[GGUFValueType, bytes]] = {}
        for _ in range(n_kv):
            start = f.tell()
            key = r.read(int(r.unpack("<Q"))).decode("utf-8")
            vtype = int(r.unpack("<I"))
            r.skip_value(vtype)
            end = f.tell()
            f.seek(start)
            kv[key] = (GGUFValueType(vtype), r.read(end - start))
        ti_start = f.tell()
        for _ in range(n_tensors):
            r.skip_string()
            n_dims = int(r.unpack("<I"))
            f.seek(8 * n_dims + 4 + 8, os.SEEK_CUR)  # dims (u64 each), ggml type (u32), offset (u64)
        ti_end = f.tell()
    alignment = GGUF_DEFAULT_ALIGNMENT
    if Keys.General.ALIGNMENT in kv:
        alignment = int(struct.unpack("<I", kv[Keys.General.ALIGNMENT][1][-4:])[0])
    data_start = -(-ti_end // alignment) * alignment
    if data_start > path.stat().st_size:
        raise ModelLoadError(f"truncated GGUF file {path}: no tensor data")
    return _Layout(version, n_tensors, kv, ti_start, ti_end, data_start, alignment)


def _value_type(key: str, value: MetaValue, existing: GGUFValueType | None) -> GGUFValueType:
    """The GGUF type to store `value` as: the existing key's type where it fits (llama.cpp checks types
    strictly, e.g. general.file_type must stay uint32), else string/bool/int32-or-int64/float32."""
    if isinstance(value, bool):
        want = GGUFValueType.BOOL
    elif isinstance(value, int):
        if existing in _INT_RANGES:
            lo, hi = _INT_RANGES[existing]
            if not lo <= value < hi:
                raise QuantizeError(f"metadata {key}={value} does not fit its existing type {existing.name}")
            return existing
        want = GGUFValueType.INT32 if -2**31 <= value < 2**31 else GGUFValueType.INT64
    elif isinstance(value, float):
        return existing if existing in (GGUFValueType.FLOAT32, GGUFValueType.FLOAT64) else GGUFValueType.FLOAT32
    elif isinstance(value, str):
        want = GGUFValueType.STRING
    else:
        raise QuantizeError(f"metadata {key} must be a str, int, float or bool, not {type(value).__name__}")
    if existing is not None and existing != want and existing == GGUFValueType.ARRAY:
        raise QuantizeError(f"metadata {key} holds an array in the file; replacing it with a scalar is refused")
    return want


def _encode(key: str, value: MetaValue, vtype: GGUFValueType) -> bytes:
    kb = key.encode("utf-8")
    out = struct.pack("<Q", len(kb)) + kb + struct.pack("<I", vtype)
    if vtype == GGUFValueType.STRING:
        vb = str(value).encode("utf-8")
        return out + struct.pack("<Q", len(vb)) + vb
    return out + struct.pack(_SCALAR_FMT[vtype], value)


def write_metadata(path: str | os.PathLike, updates: dict[str, MetaValue]) -> None:
    """Add or replace string/int/float/bool KV pairs of a GGUF file in place (atomically: a temp file
    beside it, then a rename). Tensor infos and tensor data are copied byte for byte."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ModelNotFoundError(f"no GGUF file at {p}")
    if not is_gguf(p):
        raise QuantizeError(f"{p} is not a GGUF file")
    if Keys.General.ALIGNMENT in updates or Keys.General.ARCHITECTURE in updates:
        raise QuantizeError(f"{', '.join(sorted(updates))}: general.alignment and general.architecture "
                            f"describe the tensors and cannot be rewritten")
    lay = _layout(p)
    kv = dict(lay.kv)
    for key, value in updates.items():
        existing = kv[key][0] if key in kv else None
        vtype = _value_type(key, value, existing)
        kv[key] = (vtype, _encode(key, value, vtype))  # a replaced key keeps its position

    with staged(p, mode=p.stat().st_mode & 0o777) as tmp, open(tmp, "wb") as out, open(p, "rb") as src:
        out.write(struct.pack("<IIQQ", GGUF_MAGIC, lay.version, lay.n_tensors, len(kv)))
        for _vtype, raw in kv.values():
            out.write(raw)
        src.seek(lay.ti_start)
        out.write(src.read(lay.ti_end - lay.ti_start))
        out.write(b"\0" * (-out.tell() % lay.alignment))
        src.seek(lay.data_start)
        shutil.copyfileobj(src, out, _COPY_CHUNK)
        out.flush()
        os.fsync(out.fileno())


def _decode(value: object) -> object:
    if isinstance(value, str) and value[:1] in ("{", "["):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value  # a string that merely starts with a bracket stays a string
    return value


def read_hearth_metadata(path: str | os.PathLike) -> dict[str, object]:
    """All `hearth.*` keys of a GGUF file (full key names, e.g. "hearth.manifest"); values holding a
    JSON object or array are decoded."""
    return {key: _decode(value) for key, value in read_gguf_metadata(path).items()
            if key.startswith(HEARTH_PREFIX)}
