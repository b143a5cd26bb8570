"""`hearth edge` without a model: the history store (atomic writes, corrupt files, named conversations),
dropping old turns to fit the context, and the command loop over a scripted fake engine."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading

import pytest

from hearth.clients import edge_history
from hearth.clients.edge import EdgeChat, EdgeConfig, fit_context, open_history
from hearth.clients.edge_history import Conversation, HistoryError, HistoryStore
from hearth.runtime import ContextLengthExceeded, GenerationOutput, InvalidRequestError, Usage


def conversation(turns: int, system: str | None = "Be brief.") -> Conversation:
    msgs = []
    for i in range(turns):
        msgs += [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]
    return Conversation(system, msgs)


# ---- the store ---------------------------------------------------------------------------------
def test_round_trip_and_no_temp_files_left(tmp_path):
    store = HistoryStore(tmp_path / "edge" / "history.json")
    conv = conversation(2)
    conv.messages.append({"role": "user", "content": "ünïcode 你好 🙂"})
    store.write(conv)
    again, note = store.load()
    assert note is None
    assert (again.system, again.messages) == (conv.system, conv.messages)
    assert json.loads(store.path.read_text(encoding="utf-8"))["version"] == edge_history.FORMAT_VERSION
    assert [p.name for p in store.folder.iterdir()] == ["history.json"]


def test_missing_file_is_a_fresh_conversation(tmp_path):
    conv, note = HistoryStore(tmp_path / "nothing" / "history.json").load()
    assert conv.messages == [] and conv.system is None and note is None


def test_a_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    from hearth.runtime import fileio

    store = HistoryStore(tmp_path / "history.json")
    store.write(conversation(1))
    before = store.path.read_bytes()

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(fileio.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        store.write(conversation(2))
    assert store.path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["history.json"]  # the temp file is gone too
    assert store.path.stat().st_mode & 0o777 == edge_history.PRIVATE


@pytest.mark.parametrize("content, reason", [
    (b"{not json", "not valid JSON"),
    (b"\xff\xfe garbage", "not valid JSON"),
    (b"[1, 2]", "not a JSON object"),
    (b'{"messages": "hello"}', "'messages' is not a list"),
    (b'{"messages": [{"role": "wizard", "content": "x"}]}', "messages[0]"),
    (b'{"version": 99, "messages": []}', "format version 99"),
])
def test_corrupt_file_is_moved_aside_with_a_clear_message(tmp_path, content, reason):
    store = HistoryStore(tmp_path / "history.json")
    store.path.write_bytes(content)
    conv, note = store.load()
    assert conv.messages == [] and conv.system is None
    assert reason in note and str(store.path) in note and "fresh conversation" in note
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("history.json.corrupt-")]
    assert len(aside) == 1 and aside[0].read_bytes() == content  # nothing the user wrote is lost
    assert not store.path.exists()
    store.write(conversation(1))  # and the fresh history writes normally
    assert store.load()[0].messages == conversation(1).messages


def test_named_conversations(tmp_path):
    store = HistoryStore(tmp_path / "history.json")
    assert store.names() == []
    store.save_named("tea", conversation(1))
    store.save_named("notes-2.v1", conversation(3, system=None))
    store.write(conversation(2))  # the running history is not a named conversation
    assert sorted(store.names()) == ["notes-2.v1", "tea"]
    assert store.load_named("tea").messages == conversation(1).messages
    assert store.load_named("notes-2.v1").system is None
    with pytest.raises(HistoryError, match=r"no saved conversation 'coffee' \(saved: "):
        store.load_named("coffee")
    for bad in ("", "../escape", ".hidden", "a/b", "x" * 65, "history"):
        with pytest.raises(HistoryError):
            store.save_named(bad, conversation(1))
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(HistoryError, match="'broken'.*unusable.*not valid JSON"):
        store.load_named("broken")


def test_new_keeps_the_previous_conversation_loadable(tmp_path):
    config = EdgeConfig(history=tmp_path / "history.json", new=True)
    store = HistoryStore(config.history)
    store.write(conversation(2))
    err = io.StringIO()
    store, conv = open_history(config, err)
    assert conv.messages == []
    kept = store.names()
    assert len(kept) == 1 and kept[0].startswith("history-") and f"/load {kept[0]}" in err.getvalue()
    assert store.load_named(kept[0]).messages == conversation(2).messages
    store.write(Conversation())  # an empty history is not worth archiving
    assert open_history(config, io.StringIO())[0].names() == kept


# ---- fitting the context -----------------------------------------------------------------------
def words(messages: list[dict]) -> int:
    return sum(len(m["content"].split()) + 1 for m in messages)


def test_fit_context_drops_the_oldest_turns_first():
    conv = conversation(3)  # system 3 + 3 turns of 3 + 3 "tokens"
    conv.messages.append({"role": "user", "content": "new question"})  # 24 in all
    n, dropped = fit_context(conv, words, budget=17)
    assert (n, dropped) == (12, 4)
    assert conv.system == "Be brief."
    assert [m["content"] for m in conv.messages] == ["question 2", "answer 2", "new question"]


def test_fit_context_keeps_the_last_message_even_if_too_long():
    conv = conversation(2)
    conv.messages.append({"role": "user", "content": "word " * 50})
    n, dropped = fit_context(conv, words, budget=10)
    assert dropped == 4 and n > 10 and len(conv.messages) == 1


# ---- the command loop over a fake engine -------------------------------------------------------
class FakeTokenizer:
    """One token per word and one per message; a user message "bad template" fails rendering."""

    special_tokens: dict = {}

    def __init__(self, engine: "FakeEngine"):
        self.engine = engine

    def apply_chat_template(self, messages, tools=None, add_generation_prompt=True) -> str:
        self.engine.on_render(messages)
        if messages and messages[-1]["content"] == "bad template":
            raise InvalidRequestError("chat template: roles must alternate", param="messages")
        return " ".join(f"<{m['role']}> {m['content']}" for m in messages)

    def encode(self, text: str, add_special_tokens=True, parse_special=True) -> list[int]:
        return list(range(len(text.split())))

    def wrap_special(self, ids):
        return ids


class FakeEngine:
    """The slice of Engine the chat uses: one token per word, canned answers, abort."""

    def __init__(self, reply: str = "Paris is the capital.", max_model_len: int = 64):
        self.reply, self.max_model_len = reply, max_model_len
        self.requests, self.aborted = [], []
        self.tokenizer = FakeTokenizer(self)
        self.rendered: list[list[dict]] = []

    def on_render(self, messages) -> None:
        self.rendered.append([dict(m) for m in messages])

    def stream_sync(self, request):
        if len(request.prompt_token_ids) >= self.max_model_len:
            raise ContextLengthExceeded(len(request.prompt_token_ids), self.max_model_len)
        self.requests.append(request)
        toks = self.reply.split(" ")
        for i, t in enumerate(toks):
            last = i == len(toks) - 1
            yield GenerationOutput(request.request_id, 0, t + ("" if last else " "), [i],
                                   finish_reason="stop" if last else None,
                                   usage=Usage(5, len(toks)) if last else None)

    def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)


def run_chat(tmp_path, lines: list[str], engine=None, monkeypatch=None, **config):
    store = HistoryStore(tmp_path / "history.json")
    conv, _ = store.load()
    out, err = io.StringIO(), io.StringIO()
    chat = EdgeChat(engine or FakeEngine(), store, conv, EdgeConfig(history=store.path, **config), out, err)
    feed = iter(lines)

    def fake_input(prompt: str) -> str:
        out.write(prompt)
        item = next(feed)
        if isinstance(item, BaseException):
            raise item
        return item

    monkeypatch.setattr("builtins.input", fake_input)
    rc = chat.run()
    return rc, chat, out.getvalue(), err.getvalue()


def test_a_question_streams_and_is_saved(tmp_path, monkeypatch):
    rc, chat, out, err = run_chat(tmp_path, ["What is the capital of France?", "/quit"], monkeypatch=monkeypatch)
    assert rc == 0
    assert "assistant> Paris is the capital.\n" in out
    assert "[4 tokens, " in err and " tok/s, first token " in err
    saved = json.loads((tmp_path / "history.json").read_text())
    assert saved["messages"] == [{"role": "user", "content": "What is the capital of France?"},
                                 {"role": "assistant", "content": "Paris is the capital."}]


def test_commands_round_trip(tmp_path, monkeypatch):
    lines = ["/system You are terse.", "/system", "hello there", "/save first", "/reset", "/history",
             "/load", "/load first", "/history", "/save ../x", "/load nope", "/frobnicate", "/help",
             "//slash question", "/system -", "/system", EOFError()]
    rc, chat, out, err = run_chat(tmp_path, lines, monkeypatch=monkeypatch)
    assert rc == 0
    for expected in ("[system prompt set]", "[system prompt: You are terse.]", "[saved 2 messages as 'first'",
                     "[conversation cleared]", "[the conversation is empty]", "[saved conversations: first]",
                     "[loaded 'first': 2 messages]", "user: hello there", "assistant: Paris is the capital.",
                     "[not saved: bad conversation name '../x'", "[not loaded: no saved conversation 'nope'",
                     "[unknown command /frobnicate; /help lists them]", "/save NAME", "[system prompt removed]",
                     "[no system prompt]"):
        assert expected in err, expected
    assert chat.conv.messages[-2] == {"role": "user", "content": "/slash question"}
    saved = json.loads((tmp_path / "history.json").read_text())
    assert saved["system"] is None and len(saved["messages"]) == 4


def test_context_overflow_drops_turns_and_never_crashes(tmp_path, monkeypatch):
    engine = FakeEngine(max_model_len=40)
    long = "word " * 60
    lines = [f"question number {i} is here" for i in range(6)] + [long, "/quit"]
    rc, chat, out, err = run_chat(tmp_path, lines, engine=engine, monkeypatch=monkeypatch, max_tokens=10)
    assert rc == 0
    assert "[context full: dropped the 2 oldest messages to fit 40 tokens]" in err
    assert "[that message takes 61 tokens and the context holds 40;" in err
    assert all(len(r.prompt_token_ids) <= 30 for r in engine.requests)  # 40 minus 10 tokens of answer room
    # the long message was refused without touching the conversation
    assert [m["content"] for m in chat.conv.messages[-2:]] == ["question number 5 is here", "Paris is the capital."]


def test_errors_and_interrupts_at_the_prompt(tmp_path, monkeypatch):
    lines = ["bad template", KeyboardInterrupt(), "still here", KeyboardInterrupt(), KeyboardInterrupt()]
    rc, chat, out, err = run_chat(tmp_path, lines, monkeypatch=monkeypatch)
    assert rc == 0
    assert "[error: chat template: roles must alternate]" in err
    assert err.count("[Ctrl-C again, /quit or Ctrl-D to exit]") == 2  # a message in between resets the count
    assert [m["content"] for m in chat.conv.messages] == ["still here", "Paris is the capital."]


class InterruptedEngine(FakeEngine):
    """Ctrl-C arrives after `after` tokens: the chat's SIGINT handler must abort the request."""

    def __init__(self, after: int):
        super().__init__(reply="one two three four five six")
        self.after = after

    def stream_sync(self, request):
        for i, out in enumerate(super().stream_sync(request)):
            if i == self.after:
                signal.getsignal(signal.SIGINT)(signal.SIGINT, None)  # as the terminal's Ctrl-C would
                assert self.aborted == [request.request_id]
                yield GenerationOutput(request.request_id, 0, "", [], finish_reason="abort", usage=Usage(5, i))
                return
            yield out


@pytest.mark.parametrize("after, kept", [(2, "one two "), (0, None)])
def test_ctrl_c_during_an_answer_aborts_it_and_the_chat_goes_on(tmp_path, monkeypatch, after, kept):
    engine = InterruptedEngine(after)
    rc, chat, out, err = run_chat(tmp_path, ["count please", "/history", "/quit"], engine=engine,
                                  monkeypatch=monkeypatch)
    assert rc == 0 and engine.aborted
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored after the answer
    assert f"[stopped: {after} tokens" in err
    if kept is None:  # stopped before a word: the question is dropped too
        assert chat.conv.messages == [] and "[the conversation is empty]" in err
    else:  # the partial answer stays in the conversation
        assert chat.conv.messages[-1] == {"role": "assistant", "content": kept}


class SlowWarmUpEngine(FakeEngine):
    """A warm-up prefill that runs until the question is asked (then, with ctrl_c, until Ctrl-C aborts it)."""

    def __init__(self, ctrl_c: bool):
        super().__init__()
        self.ctrl_c = ctrl_c
        self.asked, self.released, self.log = threading.Event(), threading.Event(), []

    def on_render(self, messages):
        if messages and messages[-1]["content"] == "the question":
            self.asked.set()
        super().on_render(messages)

    def stream_sync(self, request):
        if not request.request_id.startswith("warm-up"):
            self.log.append("answer")
            yield from super().stream_sync(request)
            return
        assert self.asked.wait(10)
        if self.ctrl_c:
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)  # the user's Ctrl-C
            assert self.released.wait(10)
        self.log.append("warm-up")
        yield GenerationOutput(request.request_id, 0, "", [1], finish_reason="length", usage=Usage(3, 1))

    def abort(self, request_id):
        super().abort(request_id)
        if request_id.startswith("warm-up"):
            self.released.set()


@pytest.mark.parametrize("ctrl_c", [False, True])
def test_an_answer_waits_for_the_warm_up_and_ctrl_c_stops_both(tmp_path, monkeypatch, ctrl_c):
    engine = SlowWarmUpEngine(ctrl_c)
    rc, chat, out, err = run_chat(tmp_path, ["/system Be brief.", "the question", "/quit"], engine=engine,
                                  monkeypatch=monkeypatch)
    assert rc == 0
    if ctrl_c:
        assert engine.log == ["warm-up"] and "[stopped: 0 tokens]" in err
        assert chat.conv.messages == []
    else:  # the prompt starts with the warm-up's KV only if the warm-up came first
        assert engine.log == ["warm-up", "answer"] and "[4 tokens, " in err


def test_a_failing_disk_is_reported_and_the_chat_goes_on(tmp_path, monkeypatch):
    def full(self, conv):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(HistoryStore, "write", full)
    rc, chat, out, err = run_chat(tmp_path, ["first", "second", "/quit"], monkeypatch=monkeypatch)
    assert rc == 0 and len(chat.conv.messages) == 4
    assert err.count("[could not write the history to ") == 2 and "No space left on device" in err


def test_config_is_checked():
    with pytest.raises(InvalidRequestError, match="ctx"):
        EdgeConfig(ctx=16)
    with pytest.raises(InvalidRequestError, match="top_p"):
        EdgeConfig(top_p=0)


@pytest.mark.parametrize("argv, message", [
    (["--ctx", "10"], "--ctx must be in"),
    (["--temperature", "3"], "temperature"),
    (["/no/such/model.gguf"], "/no/such/model.gguf"),
])
def test_bad_arguments_are_one_line_errors(tmp_path, capsys, argv, message):
    from hearth.clients.cli import main

    assert main(["edge", *argv, "--history", str(tmp_path / "h.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hearth: error:") and message in err and "Traceback" not in err


def test_an_unreadable_history_is_a_one_line_error(tmp_path, capsys):
    from hearth.clients.cli import main

    (tmp_path / "history.json").mkdir()  # a folder where the file should be
    assert main(["edge", "--history", str(tmp_path / "history.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hearth: error: cannot use the history file") and "Traceback" not in err


def test_archive_names_are_valid_conversation_names(tmp_path):
    store = HistoryStore(tmp_path / "my chat (old).json")
    store.write(conversation(1))
    name = store.archive()
    assert name.startswith("my-chat-old-") and store.load_named(name).messages == conversation(1).messages


def test_edge_command_is_registered_and_lazy():
    code = ("import sys; from hearth.clients.cli import build_parser; p = build_parser();"
            "a = p.parse_args(['edge', 'm.gguf', '--new', '--ctx', '1024']);"
            "assert (a.model, a.new, a.ctx) == ('m.gguf', True, 1024), a;"
            "bad = [m for m in ('torch', 'transformers', 'ray', 'fastapi', 'gradio', 'sentence_transformers',"
            " 'hearth.clients.edge', 'llama_cpp') if m in sys.modules]; print(bad); sys.exit(bool(bad))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    assert r.returncode == 0, r.stdout + r.stderr
