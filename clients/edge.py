"""`hearth edge`: an offline terminal chat that runs a GGUF model in this process (llama.cpp).

    hearth edge                                   # the bundled model; resumes $HEARTH_HOME/edge/history.json
    hearth edge model.Q4_K_M.gguf --new --system "You are terse." --ctx 4096 --threads 4

No server, no Ray, no network, and neither torch nor transformers is imported: the runtime's engine
over its llama.cpp backend, the model's own chat template, and a JSON history file that is
rewritten atomically after every turn, so the conversation survives a restart or a crash.
Commands: /help /system /reset /save /load /history /quit; Ctrl-C stops an answer.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, TextIO

from hearth.runtime import (ContextLengthExceeded, Engine, GenerationRequest, HearthError, InvalidRequestError,
                            PromptRequest, SamplingParams, encode_chat, to_generation_request)
from hearth.runtime.registry import hearth_home

from .edge_history import Conversation, HistoryError, HistoryStore

log = logging.getLogger("hearth.edge")

PROMPT = "you> "
ANSWER = "assistant> "
MIN_REPLY_ROOM = 32  # fewest tokens worth generating when a long message leaves little room
HELP = """\
/help             this list
/system [TEXT]    show the system prompt, or set it (/system - removes it)
/reset            forget the conversation (the system prompt stays)
/save NAME        save the conversation under NAME
/load [NAME]      continue a saved conversation (without NAME: list them)
/history          show the conversation so far
/quit             exit (Ctrl-D too). Ctrl-C stops an answer; twice at the prompt exits.
Start a message with // to send a line that begins with /."""


def default_history_path() -> Path:
    return hearth_home() / "edge" / "history.json"


@dataclass
class EdgeConfig:
    """Everything `hearth edge` takes from its command line."""

    model: str | None = None
    """A registered model name or a path to a GGUF file; None: the bundled default model."""
    history: Path | None = None
    """The running conversation's file; None: $HEARTH_HOME/edge/history.json."""
    new: bool = False
    """Start a fresh conversation; a non-empty previous one is kept as a named conversation."""
    system: str | None = None
    """Set the system prompt (kept in the history like /system)."""
    max_tokens: int = 512
    temperature: float = 0.7
    top_p: float = 0.95
    seed: int | None = None
    threads: int | None = None
    """CPU threads for llama.cpp; None: every core this process may use."""
    ctx: int = 2048
    """Context window in tokens (KV cells); older turns are dropped to fit."""

    def __post_init__(self) -> None:
        if not 256 <= self.ctx <= 1 << 20:
            raise InvalidRequestError(f"--ctx must be in [256, 1048576] tokens, got {self.ctx}", param="ctx")
        if self.threads is not None and self.threads < 1:
            raise InvalidRequestError(f"--threads must be at least 1, got {self.threads}", param="threads")
        self.sampling()  # SamplingParams names the bad field

    def sampling(self, max_tokens: int | None = None) -> SamplingParams:
        return SamplingParams(max_tokens=max_tokens or self.max_tokens, temperature=self.temperature,
                              top_p=self.top_p, seed=self.seed)


def fit_context(conv: Conversation, encode: Callable[[list[dict]], int], budget: int) -> tuple[int, int]:
    """Drop the oldest turns of `conv` (in place) until its prompt takes at most `budget` tokens.

    The system prompt and the last message are never dropped, and the kept turns still start with
    a user message. Returns (prompt tokens, messages dropped); the prompt may still exceed the
    budget when the last message alone does."""
    dropped = 0
    while True:
        n = encode(conv.chat_messages())
        if n <= budget or len(conv.messages) <= 1:
            return n, dropped
        del conv.messages[0]
        dropped += 1
        while len(conv.messages) > 1 and conv.messages[0]["role"] != "user":
            del conv.messages[0]
            dropped += 1


@contextlib.contextmanager
def _threads_ignore_ctrl_c() -> Iterator[None]:
    """Threads started inside (the engine's, llama.cpp's workers, the warm-up) block SIGINT, so the
    kernel hands Ctrl-C to the main thread. Taken by another thread, it would leave the main thread
    asleep in readline's select() until the next key."""
    if not hasattr(signal, "pthread_sigmask") or threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


class _StopOnInterrupt:
    """While active, Ctrl-C aborts the running request instead of raising KeyboardInterrupt."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.request_ids: list[str] = []
        """What Ctrl-C aborts: the answer, and a warm-up the answer waits for."""
        self.hit = False

    def __call__(self, signum: int, frame: object) -> None:
        self.hit = True
        for request_id in self.request_ids:
            self.engine.abort(request_id)

    @contextlib.contextmanager
    def active(self) -> Iterator["_StopOnInterrupt"]:
        if threading.current_thread() is not threading.main_thread():
            yield self  # signals reach only the main thread; nothing to install
            return
        old = signal.signal(signal.SIGINT, self)
        try:
            yield self
        finally:
            signal.signal(signal.SIGINT, old)


class EdgeChat:
    """The read-eval-print loop over one engine and one history store."""

    def __init__(self, engine: Engine, store: HistoryStore, conv: Conversation, config: EdgeConfig,
                 out: TextIO = sys.stdout, err: TextIO = sys.stderr):
        self.engine, self.store, self.conv, self.config = engine, store, conv, config
        self.out, self.err = out, err
        self._dim = err.isatty() and not os.environ.get("NO_COLOR")
        self._warm: tuple[threading.Thread, str] | None = None  # the running warm-up and its request id

    # ---- output -------------------------------------------------------------------------------
    def note(self, text: str) -> None:
        """A line for the user that is not part of the conversation (stderr, dimmed on a terminal)."""
        self.out.flush()
        self.err.write(f"\x1b[2m{text}\x1b[0m\n" if self._dim else f"{text}\n")
        self.err.flush()

    def persist(self) -> None:
        try:
            self.store.write(self.conv)
        except OSError as e:  # a full disk must not end the chat
            self.note(f"[could not write the history to {self.store.path}: {e}]")

    # ---- the loop -----------------------------------------------------------------------------
    def run(self) -> int:
        interrupts = 0
        while True:
            try:
                line = input(PROMPT)
            except EOFError:
                self.out.write("\n")
                return 0
            except KeyboardInterrupt:
                self.out.write("\n")
                interrupts += 1
                if interrupts >= 2:
                    return 0
                self.note("[Ctrl-C again, /quit or Ctrl-D to exit]")
                continue
            interrupts = 0
            line = line.strip()
            if not line:
                continue
            if line.startswith("/") and not line.startswith("//"):
                if not self.command(line):
                    return 0
                continue
            self.ask(line[1:] if line.startswith("//") else line)

    def command(self, line: str) -> bool:
        """Run one /command; False means quit."""
        name, _, arg = line.partition(" ")
        arg = arg.strip()
        if name in ("/quit", "/exit"):
            return False
        if name == "/help":
            self.note(HELP)
        elif name == "/system":
            if not arg:
                self.note(f"[system prompt: {self.conv.system}]" if self.conv.system else "[no system prompt]")
            else:
                self.conv.system = None if arg == "-" else arg
                self.persist()
                self.warm_up()
                self.note("[system prompt removed]" if arg == "-" else "[system prompt set]")
        elif name == "/reset":
            self.conv.messages.clear()
            self.persist()
            self.note("[conversation cleared]")
        elif name == "/save":
            if not arg:
                self.note("[usage: /save NAME]")
            else:
                try:
                    path = self.store.save_named(arg, self.conv)
                except (HistoryError, OSError) as e:
                    self.note(f"[not saved: {e}]")
                else:
                    self.note(f"[saved {len(self.conv.messages)} messages as {arg!r} ({path})]")
        elif name == "/load":
            if not arg:
                names = self.store.names()
                self.note(f"[saved conversations: {', '.join(names)}]" if names else "[no saved conversations]")
            else:
                try:
                    self.conv = self.store.load_named(arg)
                except (HistoryError, OSError) as e:
                    self.note(f"[not loaded: {e}]")
                else:
                    self.persist()
                    self.warm_up()
                    self.note(f"[loaded {arg!r}: {len(self.conv.messages)} messages]")
        elif name == "/history":
            self.show_history()
        else:
            self.note(f"[unknown command {name}; /help lists them]")
        return True

    def show_history(self) -> None:
        if self.conv.system:
            self.note(f"system: {self.conv.system}")
        for m in self.conv.messages:
            self.note(f"{m['role']}: {m['content']}")
        if not self.conv.messages:
            self.note("[the conversation is empty]")

    # ---- one answer ---------------------------------------------------------------------------
    def _encode(self, messages: list[dict]) -> int:
        try:
            return len(encode_chat(self.engine.tokenizer, messages))
        except ContextLengthExceeded as e:
            return e.prompt_tokens

    def _prompt_budget(self) -> int:
        """Most prompt tokens before older turns are dropped: the rest is room for the answer."""
        limit = self.engine.max_model_len
        return limit - min(self.config.max_tokens, limit // 2)

    def warm_up(self) -> None:
        """Prefill the conversation so far in the background while the user types: the next answer
        reuses that KV (the engine's prefix cache) instead of computing a resumed history anew.
        An answer asked for sooner waits for it rather than racing it (both prefills in one batch
        would share nothing and take twice as long)."""
        if self._warm is not None:
            self.engine.abort(self._warm[1])  # its prefix is out of date
        messages = self.conv.chat_messages() or [{"role": "user", "content": ""}]
        params = SamplingParams(max_tokens=1, temperature=0.0)
        request_id = f"warm-up-{uuid.uuid4().hex}"

        def prefill() -> None:
            try:
                ids = encode_chat(self.engine.tokenizer, messages, add_generation_prompt=False)
                if len(ids) <= self._prompt_budget():  # else the next prompt drops turns: no shared prefix
                    for _ in self.engine.stream_sync(GenerationRequest(prompt_token_ids=ids, params=params,
                                                                       request_id=request_id)):
                        pass
            except HearthError as e:  # only a head start is lost; the answer itself reports real errors
                log.debug("warm-up skipped: %s", e)

        thread = threading.Thread(target=prefill, name="hearth-edge-warm-up", daemon=True)
        with _threads_ignore_ctrl_c():
            thread.start()
        self._warm = (thread, request_id)

    def stop_warm_up(self) -> None:
        """Abort the background prefill and wait for its thread (before the engine shuts down)."""
        if self._warm is not None:
            thread, request_id = self._warm
            self.engine.abort(request_id)
            thread.join()
            self._warm = None

    def ask(self, text: str) -> None:
        """Answer one message, streamed; Ctrl-C from here on stops the answer, not the program."""
        stop = _StopOnInterrupt(self.engine)
        with stop.active():
            self._answer(text, stop)

    def _answer(self, text: str, stop: _StopOnInterrupt) -> None:
        limit = self.engine.max_model_len
        trial = Conversation(self.conv.system, self.conv.messages + [{"role": "user", "content": text}])
        budget = self._prompt_budget()
        try:
            n_prompt, dropped = fit_context(trial, self._encode, budget)
            if n_prompt > max(budget, limit - MIN_REPLY_ROOM):  # too long even alone: change nothing
                self.note(f"[that message takes {n_prompt} tokens and the context holds {limit}; "
                          "shorten it or restart with a larger --ctx]")
                return
            params = self.config.sampling(min(self.config.max_tokens, limit - n_prompt))
            request = to_generation_request(self.engine.tokenizer,
                                            PromptRequest(messages=trial.chat_messages(), params=params))
        except InvalidRequestError as e:  # e.g. the chat template rejects these messages: nothing changes
            self.note(f"[error: {e}]")
            return
        if dropped:
            self.note(f"[context full: dropped the {dropped} oldest messages to fit {limit} tokens]")
        self.conv.messages = trial.messages
        stop.request_ids.append(request.request_id)
        parts: list[str] = []
        t0 = time.monotonic()
        t_first = t_last = None
        self.out.write(ANSWER)
        self.out.flush()
        if self._warm is not None:  # let the warm-up finish: this prompt starts with its KV
            thread, warm_id = self._warm
            stop.request_ids.append(warm_id)
            if stop.hit or dropped:  # stopped, or the prompt no longer starts with what it computes
                self.engine.abort(warm_id)
            thread.join()
            self._warm = None
        started = not stop.hit  # read once: Ctrl-C may land on any line
        n_tokens, finish = 0, None if started else "abort"
        try:
            for output in self.engine.stream_sync(request) if started else ():
                if output.token_ids:
                    t_last = time.monotonic()
                    t_first = t_first or t_last
                n_tokens = output.usage.completion_tokens if output.usage else n_tokens + len(output.token_ids)
                if output.text:
                    parts.append(output.text)
                    self.out.write(output.text)
                    self.out.flush()
                finish = output.finish_reason or finish
                if stop.hit and finish is None:  # Ctrl-C may have come before the engine knew the request
                    self.engine.abort(request.request_id)
        except InvalidRequestError as e:  # e.g. the chat template rejects these messages
            self.out.write("\n")
            self.conv.messages.pop()
            self.note(f"[error: {e}]")
            return
        self.out.write("\n")
        reply = "".join(parts)
        if reply or finish != "abort":
            self.conv.messages.append({"role": "assistant", "content": reply})
        else:  # stopped before a word: as if never asked
            self.conv.messages.pop()
        self.persist()
        self.note(self._stats(n_tokens, finish, t0, t_first, t_last))

    @staticmethod
    def _stats(n: int, finish: str | None, t0: float, t_first: float | None, t_last: float | None) -> str:
        """`[42 tokens, 31.5 tok/s, first token 0.21 s]`; tok/s is the decode rate after the first token."""
        head = {"abort": "stopped: ", "length": "length limit: "}.get(finish or "", "")
        if t_first is None:
            return f"[{head}0 tokens]"
        rate = (n - 1) / (t_last - t_first) if n > 1 and t_last > t_first else 0.0
        return f"[{head}{n} tokens, {rate:.1f} tok/s, first token {t_first - t0:.2f} s]"


def open_history(config: EdgeConfig, err: TextIO) -> tuple[HistoryStore, Conversation]:
    """The store and the conversation to continue (a fresh one with --new, the old one archived)."""
    store = HistoryStore(config.history or default_history_path())
    try:
        if config.new:
            kept = store.archive()
            if kept:
                err.write(f"[previous conversation kept: /load {kept}]\n")
            return store, Conversation()
        conv, problem = store.load()
    except OSError as e:  # e.g. a folder without permission: say so in one line
        raise HistoryError(f"cannot use the history file {store.path}: {e}") from e
    if problem:
        err.write(f"hearth: {problem}\n")
    return store, conv


def run_edge(config: EdgeConfig) -> int:
    """Load the model and the history, then chat until /quit or Ctrl-D."""
    if sys.stdin.isatty():
        with contextlib.suppress(ImportError):  # line editing for input(); absent on some builds
            import readline  # noqa: F401
    store, conv = open_history(config, sys.stderr)
    backend_kw = {"n_ctx": config.ctx, "n_seq_max": 4}  # few sequences: one chat, a few cached prefixes
    if config.threads:
        backend_kw["n_threads"] = config.threads
    with _threads_ignore_ctrl_c():
        engine = Engine.from_model(config.model, backend="llamacpp", **backend_kw)
    chat = None
    try:
        backend = engine.backend
        conv.model = Path(backend.model_path).name
        if config.system is not None:
            conv.system = config.system or None
        chat = EdgeChat(engine, store, conv, config)
        if config.system is not None:
            chat.persist()
        chat.warm_up()
        resumed = f"; resumed {len(conv.messages)} messages" if conv.messages else ""
        chat.note(f"hearth edge: {conv.model} ({backend.n_threads} threads, {engine.max_model_len}-token "
                  f"context){resumed}. /help for commands, Ctrl-D to quit. History: {store.path}")
        return chat.run()
    finally:
        if chat is not None:
            chat.stop_warm_up()  # it may be tokenizing: the model must outlive it
        engine.shutdown()
