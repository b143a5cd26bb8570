"""Training data: every record format loads, bad records name file + line + field, the loss mask covers
exactly the assistant turns, and the shuffled order is reproducible.

    python -m pytest tests/training/test_data.py -q
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hearth.training.common import TrainingDataError
from hearth.training.data import (IGNORE_INDEX, ChatCollator, load_chats, load_preferences, load_texts,
                                  render_chat, render_chats, epoch_order, split_eval)
from tests.conftest import CHATML, build_tiny_tokenizer

BUNDLED = Path(__file__).resolve().parents[2] / "training" / "data" / "instructions.jsonl"


def _jsonl(tmp_path: Path, records: list, name: str = "d.jsonl") -> Path:
    p = tmp_path / name
    p.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in records),
                 encoding="utf-8")
    return p


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tok"))


# ----------------------------------------------------------------------------- formats


def test_every_chat_format_becomes_messages(tmp_path):
    path = _jsonl(tmp_path, [
        {"instruction": "翻译成英文", "input": "你好", "output": "Hello", "category": "translation", "id": 7},
        {"instruction": "Say hi", "output": "Hi!"},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                      {"role": "assistant", "content": [{"type": "text", "text": "4"}]}]},
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"},
                           {"from": "human", "value": "Bye"}, {"from": "gpt", "value": "Bye!"}]},
    ])
    a, b, c, d = load_chats(path)
    assert a.messages == [{"role": "user", "content": "翻译成英文\n\n你好"}, {"role": "assistant", "content": "Hello"}]
    assert a.metadata == {"category": "translation", "id": 7}  # BELLE's extras are kept
    assert a.source == f"{path}:1"
    assert b.messages == [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "Hi!"}]
    assert c.messages[0] == {"role": "system", "content": "Be brief."} and c.messages[2]["content"] == "4"
    assert [m["role"] for m in d.messages] == ["user", "assistant", "user", "assistant"]
    assert d.source.endswith(":4")


def test_a_json_array_keeps_the_line_of_each_record(tmp_path):
    p = tmp_path / "a.json"
    p.write_text('[\n  {"instruction": "a", "output": "b"},\n\n  {"instruction": "c",\n   "output": ""}\n]\n')
    with pytest.raises(TrainingDataError) as e:
        load_chats(p)
    assert (e.value.line, e.value.field) == (4, "output") and "empty" in str(e.value)
    p.write_text('[{"instruction": "a", "output": "b"},\n {"conversations": [{"from": "human", "value": "x"},'
                 ' {"from": "gpt", "value": "y"}]}]')
    assert [c.source.rsplit(":", 1)[1] for c in load_chats(p)] == ["1", "2"]


@pytest.mark.parametrize("record, field, words", [
    ({"instruction": "Say hi"}, "output", "missing"),
    ({"instruction": "  ", "output": "x"}, "instruction", "empty"),
    ({"instruction": "Say hi", "output": 3}, "output", "must be a string"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "yo"}]}, "messages[1].role", "'bot'"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]},
     "messages[1].content", "empty"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant"}]}, "messages[1].content", "missing"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a"},
                   {"role": "user", "content": "and?"}]}, "messages[2].role", "end with an assistant"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, "messages[0].role", "must be the user's"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "system", "content": "s"},
                   {"role": "assistant", "content": "a"}]}, "messages[1].role", "only come first"),
    ({"messages": []}, "messages", "non-empty list"),
    ({"conversations": [{"from": "human", "value": "hi"}, {"from": "bard", "value": "yo"}]},
     "conversations[1].from", "'bard'"),
    ({"conversations": [{"from": "human", "value": "hi"}]}, "conversations[0].role", "end with an assistant"),
    ({"prompt": "hi", "response": "yo"}, None, "unknown record format"),
])
def test_bad_chat_records_name_file_line_and_field(tmp_path, record, field, words):
    path = _jsonl(tmp_path, [{"instruction": "fine", "output": "fine"}, "", record])
    with pytest.raises(TrainingDataError) as e:
        load_chats(path)
    assert (e.value.path, e.value.line, e.value.field) == (str(path), 3, field)
    assert str(path) in str(e.value) and ":3" in str(e.value) and words in str(e.value)


def test_a_line_that_is_not_json_is_named(tmp_path):
    path = _jsonl(tmp_path, [{"instruction": "a", "output": "b"}, '{"instruction": "a", "output": '])
    with pytest.raises(TrainingDataError, match=r"d\.jsonl:2: not JSON"):
        load_chats(path)
    with pytest.raises(TrainingDataError, match="no such file"):
        load_chats(tmp_path / "missing.jsonl")
    with pytest.raises(TrainingDataError, match="no records"):
        load_chats(_jsonl(tmp_path, [], "empty.jsonl"))


def test_preferences_load_from_strings_and_messages(tmp_path):
    path = _jsonl(tmp_path, [
        {"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Lyon.", "category": "qa"},
        {"messages": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "你好"}],
         "chosen": {"role": "assistant", "content": "你好！"}, "rejected": [{"role": "assistant", "content": "走开"}]},
    ])
    a, b = load_preferences(path)
    assert a.prompt == [{"role": "user", "content": "Capital of France?"}]
    assert (a.chosen, a.rejected, a.metadata) == ("Paris.", "Lyon.", {"category": "qa"})
    assert b.prompt[-1] == {"role": "user", "content": "你好"} and (b.chosen, b.rejected) == ("你好！", "走开")


@pytest.mark.parametrize("record, field", [
    ({"prompt": "q", "chosen": "a"}, "rejected"),
    ({"chosen": "a", "rejected": "b"}, "prompt"),
    ({"prompt": "q", "chosen": {"role": "user", "content": "a"}, "rejected": "b"}, "chosen.role"),
    ({"prompt": "q", "chosen": "a", "rejected": " "}, "rejected"),
    ({"prompt": "q", "chosen": "same", "rejected": "same"}, "rejected"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
      "chosen": "x", "rejected": "y"}, "messages[1].role"),
])
def test_bad_preference_records_name_the_field(tmp_path, record, field):
    path = _jsonl(tmp_path, [record])
    with pytest.raises(TrainingDataError) as e:
        load_preferences(path)
    assert (e.value.line, e.value.field) == (1, field)


def test_bundled_preferences_load():
    prefs = load_preferences(BUNDLED.with_name("preferences.jsonl"))
    assert len(prefs) >= 10 and all(p.chosen != p.rejected for p in prefs)


def test_texts_from_blank_line_blocks_and_jsonl(tmp_path):
    txt = tmp_path / "c.txt"
    txt.write_text("first doc\nstill first\n\n\nsecond doc\n  \nthird 文档\n", encoding="utf-8")
    assert load_texts(txt) == ["first doc\nstill first", "second doc", "third 文档"]
    assert load_texts(_jsonl(tmp_path, [{"text": "one"}, {"text": "two", "source": "x"}])) == ["one", "two"]
    with pytest.raises(TrainingDataError) as e:
        load_texts(_jsonl(tmp_path, [{"text": "one"}, {"body": "two"}], "bad.jsonl"))
    assert (e.value.line, e.value.field) == (2, "text")


# ----------------------------------------------------------------------------- rendering and the loss mask


def _labelled_runs(tok, ids, labels) -> list[str]:
    """The decoded text of each maximal run of labelled tokens."""
    runs, cur = [], []
    for i, label in zip(ids, labels):
        if label != IGNORE_INDEX:
            assert label == i  # a label is the token itself (the model shifts)
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return [tok.decode(r) for r in runs]


CONVERSATION = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "你好，世界！"},
    {"role": "assistant", "content": "你好！今天天气很好。"},
    {"role": "user", "content": "The quick brown fox?"},
    {"role": "assistant", "content": "jumps over the lazy dog."},
]
# a template that injects a default system prompt when none is given (SmolLM2, Qwen2 do this)
DEFAULT_SYSTEM = ("{% for m in messages %}{% if loop.first and m['role'] != 'system' %}"
                  "{{ '<|im_start|>system\nYou are hearth.<|im_end|>\n' }}{% endif %}"
                  "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
                  "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# plain-text turns with no end-of-turn token: the renderer must add the EOS itself so the model learns to stop
PLAIN = ("{% for m in messages %}{% if m['role'] == 'assistant' %}{{ 'Assistant: ' + m['content'] + '\n' }}"
         "{% else %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endif %}{% endfor %}"
         "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")


# marks only the newest question, so earlier turns render differently once later ones exist
MARK_LATEST = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' }}"
               "{% if m['role'] == 'user' and loop.index0 == messages|length - 2 %}{{ '(latest) ' }}{% endif %}"
               "{{ m['content'] + '<|im_end|>\n' }}{% endfor %}"
               "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@pytest.mark.parametrize("template, end", [(CHATML, "<|im_end|>"), (DEFAULT_SYSTEM, "<|im_end|>"), (PLAIN, "<|im_end|>"),
                                           (MARK_LATEST, "<|im_end|>")])
@pytest.mark.parametrize("drop_system", [False, True])
def test_loss_mask_covers_exactly_the_assistant_turns(tok, template, end, drop_system):
    tok.chat_template = template
    try:
        messages = CONVERSATION[1:] if drop_system else CONVERSATION
        ids, labels = render_chat(tok, messages, max_length=1024)
    finally:
        tok.chat_template = CHATML
    assert len(ids) == len(labels)
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    runs = _labelled_runs(tok, ids, labels)
    if template == PLAIN:  # "Assistant:" prompt ends with no space, so the content run starts with " "
        runs = [r.lstrip() for r in runs]
    assert runs == [a + end for a in answers]
    # nothing of the prompts is learned, and the input is the template's rendering
    text = tok.decode(ids)
    for m in messages:
        if m["role"] != "assistant":
            assert m["content"] in text


def test_a_conversation_the_template_rejects_names_its_record(tok, tmp_path):
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                         "{{ raise_exception('System role not supported') }}{% endif %}"
                         "{{ m['role'] + ': ' + m['content'] + '<|im_end|>' }}{% endfor %}")
    try:
        chats = load_chats(_jsonl(tmp_path, [{"instruction": "a", "output": "b"},
                                             {"instruction": "a", "output": "b", "system": "Be nice."}]))
        with pytest.raises(TrainingDataError) as e:
            render_chats(tok, chats, 64)
    finally:
        tok.chat_template = CHATML
    assert (e.value.line, e.value.field) == (2, "messages") and "System role not supported" in str(e.value)


def test_the_input_is_the_chat_template_rendering(tok):
    ids, _ = render_chat(tok, CONVERSATION, max_length=1024)
    assert ids == tok.apply_chat_template(CONVERSATION, tokenize=True, return_dict=False)


def test_truncation_that_cuts_every_answer_drops_the_example_with_a_count(tok, capsys):
    long = [{"role": "user", "content": "The quick brown fox " * 30}, {"role": "assistant", "content": "Yes."}]
    short = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there, friend."}]
    assert render_chat(tok, long, max_length=32) is None
    ids, labels = render_chat(tok, short, max_length=12)
    assert len(ids) == 12 and any(label != IGNORE_INDEX for label in labels)  # cut, but some answer remains
    from hearth.training.data import Chat
    rows = render_chats(tok, [Chat(long, "f.jsonl:1"), Chat(short, "f.jsonl:2"), Chat(long, "f.jsonl:3")], 32)
    assert len(rows) == 1
    err = capsys.readouterr().err
    assert "dropped 2 of 3 examples" in err and "f.jsonl:1" in err


def test_the_bundled_instruction_set_loads_and_renders(tok):
    chats = load_chats(BUNDLED)
    assert 60 <= len(chats) <= 120
    text = json.dumps([c.messages for c in chats], ensure_ascii=False)
    assert any("\u4e00" <= ch <= "\u9fff" for ch in text) and "the" in text  # Chinese and English
    assert sum(len(c.messages) > 3 for c in chats) >= 5  # multi-turn conversations
    assert len(render_chats(tok, chats, 512)) == len(chats)


# ----------------------------------------------------------------------------- batching and order


def test_collator_pads_right_and_masks_padding():
    batch = ChatCollator(pad_token_id=0)([([5, 6, 7], [-100, 6, 7]), {"input_ids": [8], "labels": [8]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert ChatCollator(0, pad_to_multiple_of=8)([([1, 2, 3], [1, 2, 3])])["input_ids"].shape == (1, 8)


def test_epoch_order_depends_only_on_seed_and_epoch():
    a = epoch_order(50, seed=1, epoch=0)
    assert sorted(a) == list(range(50)) and a != list(range(50))
    assert a == epoch_order(50, seed=1, epoch=0)
    assert a != epoch_order(50, seed=1, epoch=1) and a != epoch_order(50, seed=2, epoch=0)
    train, held = split_eval(20, 0.1, seed=3)
    assert len(held) == 2 and sorted(train + held) == list(range(20)) and split_eval(20, 0.1, 3) == (train, held)
    assert split_eval(20, 0.0, 3) == (list(range(20)), [])


def test_a_ranking_of_k_responses_expands_into_its_pairs_best_first(tmp_path):
    path = _jsonl(tmp_path, [
        {"prompt": "Best city?", "responses": ["a", "b", "c", "d"], "topic": "x"},
        {"prompt": "q2", "responses": ["w", "x", "y"], "ranks": [2, 1, 2]},  # x best, w and y tied
    ])
    pairs = load_preferences(path)
    first = [(p.chosen, p.rejected) for p in pairs if p.prompt[0]["content"] == "Best city?"]
    assert first == [("a", "b"), ("a", "c"), ("a", "d"), ("b", "c"), ("b", "d"), ("c", "d")]  # K(K-1)/2
    assert {p.source for p in pairs[:6]} == {f"{path}:1"} and pairs[0].metadata == {"topic": "x", "ranking_size": 4}
    assert [(p.chosen, p.rejected) for p in pairs[6:]] == [("x", "w"), ("x", "y")]  # a tie is no pair


@pytest.mark.parametrize("record, field", [
    ({"prompt": "q", "responses": ["only one"]}, "responses"),
    ({"prompt": "q", "responses": "a b"}, "responses"),
    ({"prompt": "q", "responses": ["a", "a"]}, "responses"),
    ({"prompt": "q", "responses": ["a", "b"], "ranks": [1]}, "ranks"),
    ({"prompt": "q", "responses": ["a", "b"], "ranks": [0, 1]}, "ranks"),
    ({"prompt": "q", "responses": ["a", "b"], "ranks": [1, 1]}, "ranks"),
    ({"prompt": "q", "responses": ["a", {"role": "user", "content": "b"}]}, "responses[1].role"),
    ({"prompt": "q", "responses": ["a", "b"], "chosen": "a", "rejected": "b"}, "responses"),
])
def test_bad_rankings_name_the_field(tmp_path, record, field):
    with pytest.raises(TrainingDataError) as e:
        load_preferences(_jsonl(tmp_path, [record]))
    assert (e.value.line, e.value.field) == (1, field)
