"""Training data: the record formats every stage reads, chat rendering with an assistant-only loss
mask, padding, and a resumable shuffled order.

    from hearth.training.data import load_chats, load_preferences, load_texts, render_chats, ChatCollator
    chats = load_chats("training/data/instructions.jsonl")          # list[Chat], every format normalized
    rows = render_chats(tokenizer, chats, max_length=512)           # list[(input_ids, labels)]
    batch = ChatCollator(tokenizer.pad_token_id)([rows[i] for i in epoch_order(len(rows), seed, 0)[:8]])

Chat records (JSONL, one object a line, or a JSON array of objects), each normalized to messages
[{"role": "system"|"user"|"assistant", "content": str}, ...] ending with an assistant turn:
  - Alpaca / BELLE: {"instruction", "input"?, "output", "system"?}; other keys (BELLE's `category` ...)
    are kept as metadata.
  - OpenAI: {"messages": [{"role", "content"}, ...]}.
  - ShareGPT: {"conversations": [{"from": "human"|"gpt"|"system", "value"}, ...]}.
Preference records for rm/dpo: {"prompt" (string or messages) | "messages", "chosen", "rejected"}, the
answers as strings or assistant messages. Text corpora for pretraining: .txt (documents separated by
blank lines) or .jsonl/.json records with a "text" field.

Every bad record raises TrainingDataError naming the file, the line and the field. Nothing here imports
torch at module level.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from hearth.runtime.chat_template import DEFAULT_CHATML_TEMPLATE, render_chat_template

from .common import TrainingDataError, say

__all__ = ["Chat", "PreferencePair", "load_chats", "load_chat_files", "load_preferences", "load_texts",
           "read_jsonl_objects", "render_chat", "render_chats", "ChatCollator", "epoch_order", "split_eval",
           "IGNORE_INDEX"]

IGNORE_INDEX = -100  # label of a token the loss skips (torch's cross_entropy default)
ROLES = ("system", "user", "assistant")
# ShareGPT speaker names -> chat roles ("user"/"assistant" appear in many ShareGPT exports too)
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system"}


@dataclass
class Chat:
    """One training conversation, ending with an assistant turn."""

    messages: list[dict[str, str]]
    source: str = ""
    """Where it came from, "file:line"."""
    metadata: dict[str, Any] = field(default_factory=dict)
    """Extra fields of the record (BELLE's `category`, ids ...)."""


@dataclass
class PreferencePair:
    """A prompt (the conversation so far, ending with a user turn) and two answers, the better one first."""

    prompt: list[dict[str, str]]
    chosen: str
    rejected: str
    source: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------- reading records


def _records(path: Path) -> Iterator[tuple[int, Any]]:
    """(line, value) for each record: a JSON array's elements (line where each starts) or JSONL lines."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TrainingDataError(path, None, None, "no such file") from None
    except UnicodeDecodeError as e:
        raise TrainingDataError(path, None, None, f"not UTF-8 text ({e})") from None
    stripped = text.lstrip()
    if stripped.startswith("["):
        yield from _array_records(path, text)
        return
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield n, json.loads(line)
        except json.JSONDecodeError as e:
            raise TrainingDataError(path, n, None, f"not JSON ({e.msg} at column {e.colno})") from None


def _array_records(path: Path, text: str) -> Iterator[tuple[int, Any]]:
    # decode element by element so each record keeps the line it starts on
    dec = json.JSONDecoder()
    pos = text.index("[") + 1

    def skip(p: int) -> int:
        while p < len(text) and text[p] in " \t\r\n":
            p += 1
        return p

    def line_of(p: int) -> int:
        return text.count("\n", 0, p) + 1

    pos = skip(pos)
    if pos < len(text) and text[pos] == "]":
        return
    while True:
        try:
            value, end = dec.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise TrainingDataError(path, e.lineno, None, f"not JSON ({e.msg} at column {e.colno})") from None
        yield line_of(pos), value
        pos = skip(end)
        if pos < len(text) and text[pos] == ",":
            pos = skip(pos + 1)
            continue
        if pos < len(text) and text[pos] == "]":
            if text[pos + 1:].strip():
                raise TrainingDataError(path, line_of(pos + 1), None, "text after the closing ']'")
            return
        raise TrainingDataError(path, line_of(pos), None, "not JSON (expected ',' or ']' between records)")


def read_jsonl_objects(path: str | os.PathLike) -> list[tuple[int, dict[str, Any]]]:
    """(line, record) for each non-blank line of a JSONL file of JSON objects, for readers of other record
    kinds (exam questions, seed tasks, prompts) that check the fields themselves. Unlike the loaders above it
    takes no JSON array; a missing file, non-UTF-8 text, bad JSON or a non-object raise TrainingDataError."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise TrainingDataError(path, None, None, "no such file") from None
    except UnicodeDecodeError as e:
        raise TrainingDataError(path, None, None, f"not UTF-8 text ({e})") from None
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise TrainingDataError(path, n, None, f"not valid JSON ({e.msg})") from None
        if not isinstance(rec, dict):
            raise TrainingDataError(path, n, None, f"each line must be a JSON object; got {type(rec).__name__}")
        out.append((n, rec))
    return out


def _text(value: Any, path: Path, line: int, fld: str, allow_empty: bool = False) -> str:
    """A string field; OpenAI-style content parts [{"type": "text", "text": ...}] are joined."""
    if isinstance(value, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in value):
        value = "".join(str(p.get("text", "")) for p in value)
    if not isinstance(value, str):
        raise TrainingDataError(path, line, fld, f"must be a string; got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise TrainingDataError(path, line, fld, "is empty")
    return value


def _check_turns(messages: list[dict[str, str]], path: Path, line: int, key: str, end_with: str) -> None:
    """System only first, then a user turn first; the conversation ends with `end_with`."""
    for i, m in enumerate(messages):
        if m["role"] == "system" and i != 0:
            raise TrainingDataError(path, line, f"{key}[{i}].role", "a system turn may only come first")
    body = [m for m in messages if m["role"] != "system"]
    if not body:
        raise TrainingDataError(path, line, key, "has no user or assistant turn")
    if body[0]["role"] != "user":
        first = len(messages) - len(body)
        raise TrainingDataError(path, line, f"{key}[{first}].role", "the first turn after the system turn "
                                f"must be the user's; got {body[0]['role']!r}")
    if messages[-1]["role"] != end_with:
        raise TrainingDataError(path, line, f"{key}[{len(messages) - 1}].role",
                                f"the conversation must end with an {end_with} turn; got {messages[-1]['role']!r}")


def _messages(value: Any, path: Path, line: int, key: str, roles: dict[str, str] | None = None,
              role_key: str = "role", content_key: str = "content") -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise TrainingDataError(path, line, key, "must be a non-empty list of turns")
    out = []
    for i, m in enumerate(value):
        where = f"{key}[{i}]"
        if not isinstance(m, dict):
            raise TrainingDataError(path, line, where, f"must be an object; got {type(m).__name__}")
        if role_key not in m:
            raise TrainingDataError(path, line, f"{where}.{role_key}", "is missing")
        raw = m[role_key]
        role = (roles or {r: r for r in ROLES}).get(raw) if isinstance(raw, str) else None
        if role is None:
            allowed = ", ".join(map(repr, roles or ROLES))
            raise TrainingDataError(path, line, f"{where}.{role_key}", f"must be one of {allowed}; got {raw!r}")
        if content_key not in m:
            raise TrainingDataError(path, line, f"{where}.{content_key}", "is missing")
        out.append({"role": role, "content": _text(m[content_key], path, line, f"{where}.{content_key}")})
    return out


def _chat_record(rec: Any, path: Path, line: int) -> Chat:
    if not isinstance(rec, dict):
        raise TrainingDataError(path, line, None, f"a record must be a JSON object; got {type(rec).__name__}")
    source = f"{path}:{line}"
    if "messages" in rec:
        msgs = _messages(rec["messages"], path, line, "messages")
        _check_turns(msgs, path, line, "messages", "assistant")
        return Chat(msgs, source, {k: v for k, v in rec.items() if k != "messages"})
    if "conversations" in rec:
        msgs = _messages(rec["conversations"], path, line, "conversations", SHAREGPT_ROLES, "from", "value")
        _check_turns(msgs, path, line, "conversations", "assistant")
        return Chat(msgs, source, {k: v for k, v in rec.items() if k != "conversations"})
    if "instruction" in rec or "output" in rec:
        for key in ("instruction", "output"):
            if key not in rec:
                raise TrainingDataError(path, line, key, "is missing")
        instruction = _text(rec["instruction"], path, line, "instruction")
        extra = _text(rec.get("input") or "", path, line, "input", allow_empty=True)
        output = _text(rec["output"], path, line, "output")
        msgs = []
        if rec.get("system"):
            msgs.append({"role": "system", "content": _text(rec["system"], path, line, "system")})
        user = f"{instruction.strip()}\n\n{extra.strip()}" if extra.strip() else instruction.strip()
        msgs += [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
        meta = {k: v for k, v in rec.items() if k not in ("instruction", "input", "output", "system")}
        return Chat(msgs, source, meta)
    raise TrainingDataError(path, line, None, "unknown record format: expected `messages` (OpenAI), "
                            "`conversations` (ShareGPT) or `instruction`/`output` (Alpaca/BELLE); "
                            f"got keys {sorted(rec)}")


def load_chats(path: str | os.PathLike) -> list[Chat]:
    """The conversations of one file, any chat format (records may mix formats)."""
    p = Path(path)
    chats = [_chat_record(rec, p, line) for line, rec in _records(p)]
    if not chats:
        raise TrainingDataError(p, None, None, "holds no records")
    return chats


def load_chat_files(paths: Iterable[str | os.PathLike]) -> list[Chat]:
    return [c for p in paths for c in load_chats(p)]


def _answer(value: Any, path: Path, line: int, key: str) -> str:
    if isinstance(value, list) and len(value) == 1:  # TRL's conversational form: [assistant message]
        value = value[0]
        key = f"{key}[0]"
    if isinstance(value, dict):
        if value.get("role") != "assistant":
            raise TrainingDataError(path, line, f"{key}.role", f"must be 'assistant'; got {value.get('role')!r}")
        if "content" not in value:
            raise TrainingDataError(path, line, f"{key}.content", "is missing")
        return _text(value["content"], path, line, f"{key}.content")
    return _text(value, path, line, key)


MAX_RANKED_RESPONSES = 16  # K of one ranking: it expands into K(K-1)/2 pairs


def _ranking(rec: dict, prompt: list[dict[str, str]], key: str, p: Path, line: int) -> list[PreferencePair]:
    """The pairs of one ranking of K responses, as InstructGPT expands them: every two responses of
    different rank, the better one chosen. `responses` is best first, unless `ranks` (1 = best, ties
    allowed) gives each one's place."""
    responses = rec["responses"]
    if not isinstance(responses, list) or not 2 <= len(responses) <= MAX_RANKED_RESPONSES:
        raise TrainingDataError(p, line, "responses", f"must be a list of 2 to {MAX_RANKED_RESPONSES} answers")
    texts = [_answer(r, p, line, f"responses[{i}]") for i, r in enumerate(responses)]
    ranks = rec.get("ranks", list(range(1, len(texts) + 1)))
    if (not isinstance(ranks, list) or len(ranks) != len(texts)
            or not all(isinstance(r, int) and not isinstance(r, bool) and r >= 1 for r in ranks)):
        raise TrainingDataError(p, line, "ranks", f"must be {len(texts)} integers >= 1 (1 = best), one per response")
    if len(set(texts)) != len(texts):
        raise TrainingDataError(p, line, "responses", "holds the same text twice")
    meta = {k: v for k, v in rec.items() if k not in (key, "responses", "ranks")}
    meta["ranking_size"] = len(texts)
    pairs = [PreferencePair(prompt, texts[i], texts[j], f"{p}:{line}", dict(meta))
             for i in range(len(texts)) for j in range(len(texts)) if ranks[i] < ranks[j]]
    if not pairs:
        raise TrainingDataError(p, line, "ranks", "ranks every response the same: no pair to learn from")
    return pairs


def load_preferences(path: str | os.PathLike) -> list[PreferencePair]:
    """Preference pairs: {"prompt" (string or messages) | "messages", "chosen", "rejected"}, or a ranking of
    K responses {"prompt", "responses": [best, ..., worst]} (or with "ranks": [1 = best, ...]), expanded
    into its pairs (they share one `source`, so that a split keeps a ranking on one side)."""
    p = Path(path)
    pairs = []
    for line, rec in _records(p):
        if not isinstance(rec, dict):
            raise TrainingDataError(p, line, None, f"a record must be a JSON object; got {type(rec).__name__}")
        key = "prompt" if "prompt" in rec else "messages" if "messages" in rec else None
        if key is None:
            raise TrainingDataError(p, line, "prompt", "is missing (give `prompt` or `messages`)")
        if isinstance(rec[key], str):
            prompt = [{"role": "user", "content": _text(rec[key], p, line, key)}]
        else:
            prompt = _messages(rec[key], p, line, key)
            _check_turns(prompt, p, line, key, "user")
        if "responses" in rec:
            if "chosen" in rec or "rejected" in rec:
                raise TrainingDataError(p, line, "responses", "give either a ranking or chosen/rejected, not both")
            pairs.extend(_ranking(rec, prompt, key, p, line))
            continue
        for k in ("chosen", "rejected"):
            if k not in rec:
                raise TrainingDataError(p, line, k, "is missing (or give a ranking: `responses`)")
        chosen, rejected = _answer(rec["chosen"], p, line, "chosen"), _answer(rec["rejected"], p, line, "rejected")
        if chosen == rejected:
            raise TrainingDataError(p, line, "rejected", "is the same text as `chosen`")
        meta = {k: v for k, v in rec.items() if k not in (key, "chosen", "rejected")}
        pairs.append(PreferencePair(prompt, chosen, rejected, f"{p}:{line}", meta))
    if not pairs:
        raise TrainingDataError(p, None, None, "holds no records")
    return pairs


def load_texts(path: str | os.PathLike) -> list[str]:
    """Documents of a corpus: .jsonl/.json records with a "text" field, else plain text whose
    documents are separated by blank lines."""
    p = Path(path)
    docs: list[str] = []
    if p.suffix in (".jsonl", ".json"):
        for line, rec in _records(p):
            if not isinstance(rec, dict):
                raise TrainingDataError(p, line, None, f"a record must be a JSON object; got {type(rec).__name__}")
            if "text" not in rec:
                raise TrainingDataError(p, line, "text", "is missing")
            docs.append(_text(rec["text"], p, line, "text"))
    else:
        try:
            text = p.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise TrainingDataError(p, None, None, "no such file") from None
        except UnicodeDecodeError as e:
            raise TrainingDataError(p, None, None, f"not UTF-8 text ({e})") from None
        block: list[str] = []
        for line in text.splitlines() + [""]:
            if line.strip():
                block.append(line)
            elif block:
                docs.append("\n".join(block))
                block = []
    if not docs:
        raise TrainingDataError(p, None, None, "holds no documents")
    return docs


# ----------------------------------------------------------------------------- rendering


def _template_kwargs(tokenizer: Any) -> dict[str, Any]:
    return {"bos_token": tokenizer.bos_token or "", "eos_token": tokenizer.eos_token or ""}


def _assistant_spans(template: str, messages: list[dict[str, str]], kw: dict[str, Any]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character span of each assistant turn (its content through
    its end-of-turn marker, without trailing whitespace). Each span is the difference between the
    conversation rendered up to that turn and the same rendered up to its generation prompt, so it
    holds for any template that renders earlier turns the same way when later ones are added."""
    full = render_chat_template(template, messages, add_generation_prompt=False, **kw)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render_chat_template(template, messages[:i], add_generation_prompt=True, **kw)
        upto = render_chat_template(template, messages[:i + 1], add_generation_prompt=False, **kw)
        if not (full.startswith(upto) and upto.startswith(before)):
            # a template that rewrites history (drops old reasoning ...): find the content itself
            start = full.find(m["content"], spans[-1][1] if spans else 0)
            if start < 0:
                raise ValueError(f"the chat template does not render assistant turn {i} verbatim; "
                                 "cannot tell which tokens to train on")
            end = start + len(m["content"])
            # take the end-of-turn marker too: up to the next newline after the content
            nl = full.find("\n", end)
            spans.append((start, len(full[:nl if nl >= 0 else len(full)].rstrip())))
            continue
        turn = upto[len(before):]
        spans.append((len(before), len(before) + len(turn.rstrip())))
    return full, spans


def render_chat(tokenizer: Any, messages: list[dict[str, str]], max_length: int
                ) -> tuple[list[int], list[int]] | None:
    """Token ids of a conversation rendered with the tokenizer's chat template, and labels equal to the
    ids on assistant tokens (content and end-of-turn token) and IGNORE_INDEX elsewhere. Kept to
    `max_length` tokens from the start; None when that would leave no assistant token to learn."""
    template = getattr(tokenizer, "chat_template", None) or DEFAULT_CHATML_TEMPLATE
    text, spans = _assistant_spans(template, messages, _template_kwargs(tokenizer))
    special = set(getattr(tokenizer, "all_special_ids", []) or []) | {
        int(i) for i, t in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items() if t.special}
    ids: list[int] = []
    labels: list[int] = []
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        starts = [s for s, _ in enc["offset_mapping"]]
        for tok, s in zip(ids, starts):
            labels.append(tok if any(a <= s < b for a, b in spans) else IGNORE_INDEX)
    else:  # no offsets: tokenize the pieces between span boundaries one by one
        cuts = sorted({0, len(text), *[x for sp in spans for x in sp]})
        for a, b in zip(cuts, cuts[1:]):
            piece = tokenizer.encode(text[a:b], add_special_tokens=False)
            inside = any(sa <= a < sb for sa, sb in spans)
            ids += piece
            labels += piece if inside else [IGNORE_INDEX] * len(piece)
    # a template that ends turns without a special token would never teach the model to stop
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is not None:
        for j in range(len(ids) - 1, -1, -1):
            if labels[j] != IGNORE_INDEX and (j + 1 == len(ids) or labels[j + 1] == IGNORE_INDEX) \
                    and ids[j] not in special:
                ids.insert(j + 1, eos)
                labels.insert(j + 1, eos)
    ids, labels = ids[:max_length], labels[:max_length]
    if all(label == IGNORE_INDEX for label in labels):
        return None
    return ids, labels


def render_chats(tokenizer: Any, chats: Sequence[Chat], max_length: int) -> list[tuple[list[int], list[int]]]:
    """render_chat over a data set; examples cut down to no assistant token are dropped with one
    warning that counts them."""
    from hearth.runtime.errors import HearthError

    rows, dropped = [], []
    for c in chats:
        try:
            row = render_chat(tokenizer, c.messages, max_length)
        except (HearthError, ValueError) as e:  # the template rejects this conversation (roles, system turn ...)
            path, _, line = c.source.rpartition(":")
            raise TrainingDataError(path or c.source, int(line) if line.isdigit() else None, "messages",
                                    f"the chat template cannot render it: {e}") from None
        if row is None:
            dropped.append(c.source)
        else:
            rows.append(row)
    if dropped:
        say(f"warning: dropped {len(dropped)} of {len(chats)} examples whose assistant turns start after "
            f"max_length={max_length} tokens (first: {dropped[0]})")
    return rows


# ----------------------------------------------------------------------------- batching and order


class ChatCollator:
    """Right-pads (input_ids, labels) rows into a batch: input_ids, labels (IGNORE_INDEX on padding)
    and attention_mask, as torch tensors. Rows may also be dicts with those keys (HF Trainer)."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, rows: Sequence[Any]) -> dict[str, Any]:
        import torch

        pairs = [(r["input_ids"], r["labels"]) if isinstance(r, dict) else r for r in rows]
        width = max(len(ids) for ids, _ in pairs)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        ids = torch.full((len(pairs), width), self.pad_token_id, dtype=torch.long)  # (B, T)
        labels = torch.full((len(pairs), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(pairs), width), dtype=torch.long)
        for i, (x, y) in enumerate(pairs):
            ids[i, :len(x)] = torch.tensor(list(x), dtype=torch.long)
            labels[i, :len(y)] = torch.tensor(list(y), dtype=torch.long)
            mask[i, :len(x)] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """A shuffled order of range(n) that depends only on (seed, epoch), so a resumed run can skip
    exactly the examples the killed run consumed."""
    order = list(range(n))
    random.Random(f"hearth-data:{seed}:{epoch}").shuffle(order)
    return order


def split_eval(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train indices, eval indices): a seeded `fraction` of n held out (at least one when fraction > 0
    and n > 1), the rest kept in their original order."""
    if fraction <= 0 or n < 2:
        return list(range(n)), []
    k = min(n - 1, max(1, round(n * fraction)))
    held = set(random.Random(f"hearth-eval:{seed}").sample(range(n), k))
    return [i for i in range(n) if i not in held], sorted(held)
