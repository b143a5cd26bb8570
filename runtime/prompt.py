"""Prompts to token ids, once, before a request reaches the engine.

    ids = encode_prompt(tokenizer, PromptRequest(messages=[{"role": "user", "content": "Hi"}]))
    engine.generate(GenerationRequest(ids, params))

Special tokens are data unless the chat template put them there: every string a caller sends
(message content, tool results, tool descriptions, arguments) is rendered wrapped in two marker
characters, so after rendering we know which spans of the prompt came from the caller. A control
token's text (`<|im_end|>`) inside such a span is tokenized as plain text; only the template's own
control tokens become special ids. Plain-text prompts (`/v1/completions`) parse control tokens, as
vLLM and llama.cpp's server do, unless `parse_special=False`.

Tokenization is linear in the prompt's length: the text is split at control tokens by one regex
pass and each piece is tokenized with special parsing off (llama.cpp's own special-token
partitioning is quadratic in the number of special tokens in the text).
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterable

from .errors import InvalidRequestError
from .types import SamplingParams, check_token_ids

# Unicode noncharacters: never produced by tokenizers, reserved for a program's internal use.
_OPEN, _CLOSE = "\ufdd0", "\ufdd1"
# Keys whose values templates compare against (`message['role'] == 'user'`): never wrapped.
_CONTROL_KEYS = frozenset({"role", "type"})


@dataclass
class PromptRequest:
    """A request before tokenization: exactly one of prompt_token_ids, prompt (text) or messages."""

    prompt_token_ids: list[int] | None = None
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = None
    params: SamplingParams = field(default_factory=SamplingParams)
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    add_generation_prompt: bool = True
    parse_special: bool = True
    """For text prompts: whether control-token text in the prompt becomes control tokens."""

    def __post_init__(self) -> None:
        given = [x is not None for x in (self.prompt_token_ids, self.prompt, self.messages)]
        if sum(given) != 1:
            raise InvalidRequestError("give exactly one of prompt_token_ids, prompt or messages", param="prompt")
        if self.prompt_token_ids is not None:
            check_token_ids(self.prompt_token_ids)
        if self.prompt is not None and self.prompt == "":
            raise InvalidRequestError("the prompt is empty", param="prompt")
        if self.messages is not None:
            if not self.messages:
                raise InvalidRequestError("messages is empty", param="messages")
            for i, m in enumerate(self.messages):
                if not isinstance(m, dict) or "role" not in m:
                    raise InvalidRequestError(f"messages[{i}] must be an object with a role", param=f"messages[{i}]")


def encode_prompt(tok: Any, req: PromptRequest) -> list[int]:
    """The prompt token ids `req` stands for (chat template applied for messages)."""
    if req.prompt_token_ids is not None:
        return list(req.prompt_token_ids)
    if req.prompt is not None:
        _check_text(req.prompt, "prompt")
        return encode_text(tok, req.prompt, parse_special=req.parse_special, add_special_tokens=True)
    return encode_chat(tok, req.messages or [], req.tools, add_generation_prompt=req.add_generation_prompt)


def to_generation_request(tok: Any, req: PromptRequest):
    """The engine request for `req` (the prompt tokenized here)."""
    from .types import GenerationRequest

    ids = encode_prompt(tok, req)
    if not ids:
        raise InvalidRequestError("the prompt is empty after tokenization", param="prompt")
    return GenerationRequest(ids, req.params, req.request_id)


def encode_chat(tok: Any, messages: list[dict], tools: list[dict] | None = None,
                add_generation_prompt: bool = True) -> list[int]:
    """Render the chat template and tokenize it; caller strings stay text, template tokens special."""
    _check_strings(messages, "messages")
    if tools:
        _check_strings(tools, "tools")
    plain = tok.apply_chat_template(messages, tools=tools, add_generation_prompt=add_generation_prompt)
    texts = list(_strings(messages)) + list(_strings(tools or []))
    if not any(_OPEN in t or _CLOSE in t for t in texts):
        marked = tok.apply_chat_template(_wrap(messages), tools=_wrap(tools) if tools else None,
                                         add_generation_prompt=add_generation_prompt)
        spans = _data_spans(marked, plain)
        if spans is not None:
            return encode_text(tok, plain, parse_special=True, add_special_tokens=False, data_spans=spans)
    # The template rewrote caller strings so that their spans cannot be traced (or a caller sent the
    # marker characters): safe only when no caller string holds control-token text.
    specials = special_tokens(tok)
    if specials:
        pattern = _special_regex(tok)
        for t in texts:
            m = pattern.search(t)
            if m:
                raise InvalidRequestError(
                    f"a message contains the model's control token {m.group(0)!r}, and this model's chat "
                    "template transforms message text in a way that cannot keep it as plain text; "
                    "remove it from the message", param="messages")
    return encode_text(tok, plain, parse_special=True, add_special_tokens=False)


def encode_text(tok: Any, text: str, *, parse_special: bool, add_special_tokens: bool,
                data_spans: list[tuple[int, int]] | None = None) -> list[int]:
    """Tokenize `text` in time linear in its length.

    With parse_special, control-token text becomes its token unless it overlaps one of data_spans
    ([start, end) character ranges that are caller data). add_special_tokens adds the BOS (and
    whatever else the tokenizer puts around a text) once, around the whole."""
    pieces: list[tuple[str, int | None]] = []  # (text, None) or ("", special id)
    if parse_special and special_tokens(tok):
        ids_of = special_tokens(tok)
        pos = 0
        spans = iter(data_spans or [])
        span = next(spans, None)
        for m in _special_regex(tok).finditer(text):
            a, b = m.span()
            while span is not None and span[1] <= a:
                span = next(spans, None)
            if span is not None and span[0] < b:  # inside caller data: stays text
                continue
            if pos < a:
                pieces.append((text[pos:a], None))
            pieces.append(("", ids_of[m.group(0)]))
            pos = b
        if pos < len(text):
            pieces.append((text[pos:], None))
    else:
        pieces.append((text, None))
    ids: list[int] = []
    short: dict[str, list[int]] = {}  # a prompt of many control tokens repeats the short texts between them
    for piece, special in pieces:
        if special is not None:
            ids.append(special)
        elif len(piece) <= 64:
            got = short.get(piece)
            if got is None:
                got = short[piece] = tok.encode(piece, add_special_tokens=False, parse_special=False)
            ids.extend(got)
        else:
            ids.extend(tok.encode(piece, add_special_tokens=False, parse_special=False))
    if add_special_tokens:
        ids = tok.wrap_special(ids)
    return ids


def special_tokens(tok: Any) -> dict[str, int]:
    """Control-token text -> id (BOS, EOS, <|im_start|> ...), as the tokenizer reports them."""
    return tok.special_tokens


def _special_regex(tok: Any) -> re.Pattern:
    cached = getattr(tok, "_hearth_special_regex", None)
    if cached is None:
        names = sorted(special_tokens(tok), key=len, reverse=True)  # longest match first
        cached = re.compile("|".join(re.escape(n) for n in names)) if names else re.compile(r"(?!x)x")
        try:
            tok._hearth_special_regex = cached
        except AttributeError:
            pass
    return cached


def _data_spans(marked: str, plain: str) -> list[tuple[int, int]] | None:
    """The [start, end) ranges of `plain` that were wrapped in markers in `marked`, or None when the
    markers do not pair up or the marked render is not the plain one plus markers."""
    spans: list[tuple[int, int]] = []
    out_len = 0
    start: int | None = None
    pos = 0
    for m in re.finditer(f"[{_OPEN}{_CLOSE}]", marked):
        out_len += m.start() - pos
        pos = m.end()
        if m.group(0) == _OPEN:
            if start is not None:
                return None
            start = out_len
        else:
            if start is None:
                return None
            if out_len > start:
                spans.append((start, out_len))
            start = None
    if start is not None:
        return None
    if marked.replace(_OPEN, "").replace(_CLOSE, "") != plain:
        return None
    return spans


def _wrap(value: Any, key: str | None = None) -> Any:
    if isinstance(value, str):
        return value if key in _CONTROL_KEYS or not value else _OPEN + value + _CLOSE
    if isinstance(value, dict):
        return {k: _wrap(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [_wrap(v, key) for v in value]
    return value


def _strings(value: Any) -> Iterable[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def _check_strings(value: Any, param: str) -> None:
    for s in _strings(value):
        _check_text(s, param)


def _check_text(text: str, param: str) -> None:
    """Text must be encodable as UTF-8: a lone surrogate (\\ud800) is a client error, not a crash."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidRequestError(f"{param} contains a lone surrogate (U+{ord(text[e.start]):04X}) at character "
                                  f"{e.start}, which is not valid Unicode text", param=param) from None
