"""The edge chat's conversations on disk: one JSON file each, always replaced atomically.

    store = HistoryStore(Path("~/.cache/hearth/edge/history.json").expanduser())
    conv, note = store.load()                 # a fresh Conversation (and a note) if missing or corrupt
    conv.messages.append({"role": "user", "content": "Hi"}); store.write(conv)
    store.save_named("tea", conv); store.load_named("tea"); store.names()

A file holds {"version": 1, "system": str | null, "messages": [{"role", "content"} ...], "model",
"updated"}. Every write is atomic (runtime.fileio: temp file + fsync + os.replace), so a crash or
power cut leaves the old file or the new one, never half of one; like a shell history, the files
are readable by their owner only (0600). A file that does not parse is moved
aside (kept for the user) and replaced by a fresh conversation.
Named conversations live beside the history file as `<NAME>.json`.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from hearth.runtime.errors import HearthError
from hearth.runtime.fileio import atomic_write_text

FORMAT_VERSION = 1
PRIVATE = 0o600  # a chat log is personal, like a shell history
ROLES = ("user", "assistant")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class HistoryError(HearthError, ValueError):
    """A conversation file or name that cannot be used; the message says which and why."""


@dataclass
class Conversation:
    """What the chat sends to the model: an optional system prompt and alternating turns."""

    system: str | None = None
    messages: list[dict[str, str]] = field(default_factory=list)
    model: str | None = None
    """The model the conversation was last held with (informational)."""

    def chat_messages(self) -> list[dict[str, str]]:
        """The messages for the chat template, system prompt first."""
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + [dict(m) for m in self.messages]

    def to_json(self) -> dict:
        return {"version": FORMAT_VERSION, "system": self.system, "messages": self.messages,
                "model": self.model, "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z")}

    @classmethod
    def from_json(cls, data: object) -> "Conversation":
        """Check the shape of a parsed file; HistoryError names the first thing wrong."""
        if not isinstance(data, dict):
            raise HistoryError("the top level is not a JSON object")
        if data.get("version", FORMAT_VERSION) != FORMAT_VERSION:
            raise HistoryError(f"format version {data.get('version')!r} (this hearth reads {FORMAT_VERSION})")
        system = data.get("system")
        if system is not None and not isinstance(system, str):
            raise HistoryError("'system' is not a string")
        messages = data.get("messages", [])
        if not isinstance(messages, list):
            raise HistoryError("'messages' is not a list")
        for i, m in enumerate(messages):
            if not (isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)):
                raise HistoryError(f"messages[{i}] is not a {{role: user|assistant, content: text}} object")
        model = data.get("model")
        return cls(system or None, [{"role": m["role"], "content": m["content"]} for m in messages],
                   model if isinstance(model, str) else None)


def _write(path: Path, conv: Conversation) -> None:
    atomic_write_text(path, json.dumps(conv.to_json(), ensure_ascii=False, indent=1) + "\n", mode=PRIVATE)


def read_conversation(path: Path) -> Conversation:
    """Parse one conversation file; HistoryError says what is wrong with it (OSError passes through)."""
    raw = path.read_bytes()
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HistoryError(f"not valid JSON ({e})") from None
    return Conversation.from_json(data)


class HistoryStore:
    """The running conversation's file plus the named conversations in the same folder."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.folder = self.path.parent

    def load(self) -> tuple[Conversation, str | None]:
        """The conversation in the history file, or a fresh one. The note (None if nothing to say)
        tells the user when the file was unusable and where its content was moved."""
        if not self.path.exists():
            return Conversation(), None
        try:
            return read_conversation(self.path), None
        except HistoryError as e:
            aside = self._aside("corrupt")
            os.replace(self.path, aside)
            return Conversation(), (f"history file {self.path} is unusable: {e}; "
                                    f"moved it to {aside} and started a fresh conversation")

    def write(self, conv: Conversation) -> None:
        _write(self.path, conv)

    def archive(self) -> str | None:
        """Move the current history file aside as a named conversation; returns its name (None if
        there was nothing worth keeping)."""
        if not self.path.exists():
            return None
        try:
            if not read_conversation(self.path).messages:
                return None
        except HistoryError:
            pass  # keep unreadable content too: the user may want it back
        stem = re.sub(r"[^A-Za-z0-9._-]+", "-", self.path.stem).strip("-._")[:40] or "history"
        name = f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
        target = self._named_path(name)
        n = 1
        while target.exists():
            n += 1
            target = self._named_path(f"{name}-{n}")
        os.replace(self.path, target)
        return target.stem

    # ---- named conversations ----------------------------------------------------------------
    def save_named(self, name: str, conv: Conversation) -> Path:
        path = self._named_path(name)
        _write(path, conv)
        return path

    def load_named(self, name: str) -> Conversation:
        path = self._named_path(name)
        if not path.is_file():
            known = ", ".join(self.names()) or "none yet"
            raise HistoryError(f"no saved conversation {name!r} (saved: {known})")
        try:
            return read_conversation(path)
        except HistoryError as e:
            raise HistoryError(f"saved conversation {name!r} ({path}) is unusable: {e}") from None

    def names(self) -> list[str]:
        """Saved conversation names, oldest first."""
        if not self.folder.is_dir():
            return []
        files = [p for p in self.folder.glob("*.json")
                 if p != self.path and _NAME.fullmatch(p.stem) and p.is_file()]
        return [p.stem for p in sorted(files, key=lambda p: (p.stat().st_mtime, p.name))]

    def _named_path(self, name: str) -> Path:
        if not _NAME.fullmatch(name or ""):
            raise HistoryError(f"bad conversation name {name!r}: use letters, digits, '.', '_' or '-' "
                               "(up to 64, starting with a letter or digit)")
        path = self.folder / f"{name}.json"
        if path == self.path:
            raise HistoryError(f"{name!r} is the running history file's name; pick another")
        return path

    def _aside(self, tag: str) -> Path:
        return self.path.with_name(f"{self.path.name}.{tag}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
