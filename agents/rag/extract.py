"""Files to ingest: which ones (confined to allowed roots) and their text (txt, md, html, pdf).

    files, skipped = collect_files(["docs/", "notes.md"], allowed_roots=["."], max_file_bytes=20 << 20)
    text = extract_text(files[0].path, files[0].data)

Every path is resolved (symlinks followed, `..` collapsed) and must lie inside one of the allowed roots.
A path named by the caller that breaks a rule is an error (AgentInputError, param "paths"); a file found
while walking a folder that breaks one is skipped with the reason (a symlink pointing outside the roots,
an unsupported extension, a file over the size limit). Hidden files and folders (".git") are not walked.
"""

from __future__ import annotations

import io
import os
import re
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

from ..types import AgentInputError
from .errors import ExtractionError

SUPPORTED_EXTENSIONS = (".txt", ".md", ".markdown", ".html", ".htm", ".pdf")


@dataclass
class SourceFile:
    path: Path        # resolved
    source: str       # name in the index: the path relative to its allowed root, with "/"
    size: int
    explicit: bool    # named by the caller (errors raise) rather than found in a folder (errors skip)


def resolve_roots(allowed_roots: list[str | Path]) -> list[Path]:
    if not allowed_roots:
        raise AgentInputError("ingestion needs at least one allowed root folder", "allowed_roots")
    roots = []
    for r in allowed_roots:
        p = Path(r).expanduser().resolve()
        if not p.is_dir():
            raise AgentInputError(f"allowed root {str(r)!r} is not a folder", "allowed_roots")
        roots.append(p)
    return roots


def _root_of(path: Path, roots: list[Path]) -> Path | None:
    for r in roots:
        if path == r or path.is_relative_to(r):
            return r
    return None


def _check_ext(path: Path) -> str | None:
    if path.suffix.lower() not in SUPPORTED_EXTENSIONS:
        return (f"unsupported file type {path.suffix or '(no extension)'!r}; supported: "
                f"{', '.join(SUPPORTED_EXTENSIONS)}")
    return None


def collect_files(paths: list[str | Path], allowed_roots: list[str | Path],
                  max_file_bytes: int) -> tuple[list[SourceFile], list[tuple[str, str]]]:
    """The files to ingest (deduplicated, in a stable order) and the (path, reason) pairs skipped."""
    if not paths:
        raise AgentInputError("no paths to ingest", "paths")
    roots = resolve_roots(allowed_roots)
    files: dict[Path, SourceFile] = {}
    skipped: list[tuple[str, str]] = []

    def add(resolved: Path, shown: str, explicit: bool) -> None:
        root = _root_of(resolved, roots)
        reason = None
        if root is None:
            reason = f"resolves to {resolved}, outside the allowed roots ({', '.join(map(str, roots))})"
        elif (why := _check_ext(resolved)) is not None:
            reason = why
        else:
            size = resolved.stat().st_size
            if size > max_file_bytes:
                reason = f"{size} bytes, more than the limit of {max_file_bytes} bytes per file"
        if reason is not None:
            if explicit:
                raise AgentInputError(f"cannot ingest {shown}: {reason}", "paths")
            skipped.append((shown, reason))
            return
        files.setdefault(resolved, SourceFile(resolved, resolved.relative_to(root).as_posix(), size, explicit))

    for p in paths:
        raw = Path(p).expanduser()
        try:
            resolved = raw.resolve(strict=True)
        except (FileNotFoundError, RuntimeError) as e:  # RuntimeError: a symlink loop
            raise AgentInputError(f"cannot ingest {str(p)!r}: no such file or folder ({e})", "paths") from None
        if _root_of(resolved, roots) is None:
            raise AgentInputError(f"cannot ingest {str(p)!r}: it resolves to {resolved}, outside the allowed "
                                  f"roots ({', '.join(map(str, roots))})", "paths")
        if resolved.is_dir():
            _walk(raw, add, skipped)  # walk the path as given, so skipped entries read as the user wrote it
        elif resolved.is_file():
            add(resolved, str(p), True)
        else:
            raise AgentInputError(f"cannot ingest {str(p)!r}: not a regular file or folder", "paths")
    return sorted(files.values(), key=lambda f: f.source), skipped


def _walk(folder: Path, add, skipped: list[tuple[str, str]]) -> None:
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for d in list(dirnames):
            link = Path(dirpath, d)
            if link.is_symlink():  # os.walk lists linked folders but does not enter them
                dirnames.remove(d)
                skipped.append((str(link), f"symbolic link to a folder ({os.readlink(link)}); not followed"))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            entry = Path(dirpath, name)
            try:
                resolved = entry.resolve(strict=True)
            except (FileNotFoundError, RuntimeError):
                skipped.append((str(entry), "broken symbolic link"))
                continue
            if not resolved.is_file():
                skipped.append((str(entry), "not a regular file"))
                continue
            add(resolved, str(entry), False)


# ---- text extraction ---------------------------------------------------------------------------------

def decode_text(data: bytes, name: str) -> str:
    """UTF-8 (with or without BOM), or UTF-16 with a BOM; anything else is an error naming the byte."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        try:
            return data.decode("utf-16")
        except UnicodeDecodeError as e:
            raise ExtractionError(f"{name}: not valid UTF-16 at byte {e.start}") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ExtractionError(f"{name}: not valid UTF-8 at byte {e.start} ({data[e.start:e.start + 4]!r}); "
                              "convert it to UTF-8") from None


class _HTMLText(HTMLParser):
    """Visible text of an HTML page: scripts, styles and other non-content elements dropped, block
    elements on their own lines."""

    SKIP = {"script", "style", "noscript", "template", "svg", "head", "iframe", "object"}
    BLOCK = {"p", "div", "br", "li", "ul", "ol", "h1", "h2", "h3", "h4", "h5", "h6", "tr", "table", "section",
             "article", "header", "footer", "blockquote", "pre", "hr", "dt", "dd", "title", "main", "nav",
             "aside", "figure", "figcaption", "form"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._skip = 0
        self._title: list[str] = []
        self._in_title = False

    def handle_starttag(self, tag, attrs):
        if tag in self.SKIP:
            self._skip += 1
        elif tag == "title":
            self._in_title = True
        if tag in self.BLOCK:
            self.parts.append("\n")

    def handle_startendtag(self, tag, attrs):
        if tag in self.BLOCK:
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if tag in self.SKIP and self._skip:
            self._skip -= 1
        elif tag == "title":
            self._in_title = False
        if tag in self.BLOCK:
            self.parts.append("\n")

    def handle_data(self, data):
        if self._in_title:
            self._title.append(data)
        elif not self._skip:
            self.parts.append(data)

    def text(self) -> str:
        body = "".join(self.parts)
        lines = [re.sub(r"[ \t\r\f\v\u00a0]+", " ", ln).strip() for ln in body.split("\n")]
        body = re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()
        title = " ".join("".join(self._title).split())
        return f"{title}\n\n{body}" if title and not body.startswith(title) else body


def html_to_text(source: str) -> str:
    p = _HTMLText()
    p.feed(source)
    p.close()
    return p.text()  # entities are already decoded (convert_charrefs)


def pdf_to_text(data: bytes, name: str) -> str:
    from pypdf import PdfReader
    from pypdf.errors import PdfReadError

    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted:
            raise ExtractionError(f"{name}: the PDF is encrypted; decrypt it first")
        pages = [(page.extract_text() or "").strip() for page in reader.pages]
    except ExtractionError:
        raise
    except (PdfReadError, ValueError, KeyError, TypeError, OSError) as e:
        raise ExtractionError(f"{name}: cannot read the PDF ({type(e).__name__}: {e})") from None
    return "\n\n".join(p for p in pages if p)


def extract_text(path: Path, data: bytes, name: str | None = None) -> str:
    """The text of a file's bytes, by its extension (see SUPPORTED_EXTENSIONS)."""
    name = name or str(path)
    ext = path.suffix.lower()
    if ext == ".pdf":
        return pdf_to_text(data, name)
    if ext in (".html", ".htm"):
        return html_to_text(decode_text(data, name))
    if ext in (".txt", ".md", ".markdown"):
        return decode_text(data, name)
    raise AgentInputError(f"cannot ingest {name}: {_check_ext(path)}", "paths")
