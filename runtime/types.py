"""The small dataclasses at the engine's seams: what a caller sends and what it gets back."""

from __future__ import annotations

import json
import math
import uuid
from dataclasses import dataclass, field
from typing import Any

from .errors import InvalidRequestError

GUIDED_KINDS = ("json_schema", "json_object", "regex", "lark")


@dataclass
class GuidedDecoding:
    """Constrain generated text to a grammar (runtime.guided enforces it with llguidance).

    json_schema: `spec` is the schema (a dict); json_object: any JSON object, `spec` is None;
    regex: the whole output matches `spec` (Rust regex syntax, with \\d and \\w ASCII-only as in a
    JSON Schema "pattern"); lark: `spec` is a grammar in llguidance's Lark dialect, which may embed
    JSON schemas as `%json{...}`. JSON comes out compact or spaced as json.dumps writes it, whitespace
    bounded (runtime.guided.JSON_STYLE) unless the schema's "x-guidance" options say otherwise; in
    Lark, only a `%json` made by runtime.guided.lark_json is bounded (a bare one allows free whitespace)."""

    kind: str
    spec: Any = None

    def __post_init__(self) -> None:
        if self.kind not in GUIDED_KINDS:
            raise InvalidRequestError(f"guided decoding kind must be one of {', '.join(GUIDED_KINDS)}; "
                                      f"got {self.kind!r}", param="response_format")
        if self.kind == "json_schema":
            if not isinstance(self.spec, dict):
                raise InvalidRequestError("a json_schema needs the schema as an object", param="response_format")
            try:
                json.dumps(self.spec)
            except (TypeError, ValueError) as e:
                raise InvalidRequestError(f"the JSON schema is not plain JSON: {e}", param="response_format") from e
        elif self.kind == "json_object":
            if self.spec is not None:
                raise InvalidRequestError("json_object takes no spec", param="response_format")
        elif not isinstance(self.spec, str) or not self.spec:
            raise InvalidRequestError(f"a {self.kind} needs its pattern as a non-empty string",
                                      param="response_format")


@dataclass
class SamplingParams:
    """How to pick tokens and when to stop. Field names follow the OpenAI API where one exists."""

    max_tokens: int = 256
    """Most tokens to generate. 0 is allowed only with `prompt_logprobs` (scoring a prompt)."""
    temperature: float = 1.0
    """0 means greedy."""
    top_p: float = 1.0
    """Nucleus sampling mass, in (0, 1]."""
    top_k: int = 0
    """Keep the k most likely tokens; 0 turns it off."""
    min_p: float = 0.0
    """Drop tokens whose probability is below min_p times the top token's, in [0, 1]."""
    repetition_penalty: float = 1.0
    """CTRL-style multiplicative penalty on tokens seen in prompt or output; 1 is off."""
    presence_penalty: float = 0.0
    """OpenAI's additive penalty for tokens present in the output, in [-2, 2]."""
    frequency_penalty: float = 0.0
    """OpenAI's additive penalty scaled by the count in the output, in [-2, 2]."""
    logit_bias: dict[int, float] = field(default_factory=dict)
    """Token id -> bias added to the logit, each in [-100, 100]."""
    seed: int | None = None
    """Seeds this sequence's own generator: same seed, same output."""
    stop: list[str] = field(default_factory=list)
    """Stop strings; the matched string is not part of the output text."""
    stop_token_ids: list[int] = field(default_factory=list)
    """Extra token ids that end generation (EOS always does unless ignore_eos)."""
    ignore_eos: bool = False
    n: int = 1
    """Independent completions of the same prompt."""
    logprobs: bool = False
    """Return the log-probability of each sampled token."""
    top_logprobs: int = 0
    """With logprobs: also the top-k alternatives at each position (0..20)."""
    prompt_logprobs: int | None = None
    """None: off. k >= 0: log-probability of every prompt token, plus the top-k alternatives."""
    guided: GuidedDecoding | None = None
    """Constrain the output to a grammar (JSON schema, JSON object, regex, Lark); a dict is converted."""

    def __post_init__(self) -> None:
        if isinstance(self.guided, dict):
            try:
                self.guided = GuidedDecoding(**self.guided)
            except TypeError as e:  # unknown or missing keys
                raise InvalidRequestError(f"guided must have a kind and a spec: {e}", param="response_format") from e
        elif self.guided is not None and not isinstance(self.guided, GuidedDecoding):
            raise InvalidRequestError(f"guided must be a GuidedDecoding or a dict, got {type(self.guided).__name__}",
                                      param="response_format")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in self.stop]
        self.logit_bias = {int(k): float(v) for k, v in (self.logit_bias or {}).items()}
        _check_int("max_tokens", self.max_tokens, lo=0)
        if self.max_tokens < 1 and self.prompt_logprobs is None:
            raise InvalidRequestError(
                f"max_tokens must be at least 1, got {self.max_tokens}", param="max_tokens")
        _check_float("temperature", self.temperature, 0.0, 2.0)
        _check_float("top_p", self.top_p, 0.0, 1.0)
        if self.top_p <= 0.0:
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p}", param="top_p")
        _check_int("top_k", self.top_k, lo=0)
        _check_float("min_p", self.min_p, 0.0, 1.0)
        _check_float("repetition_penalty", self.repetition_penalty, 0.0, 10.0)
        if self.repetition_penalty <= 0.0:
            raise InvalidRequestError("repetition_penalty must be > 0", param="repetition_penalty")
        _check_float("presence_penalty", self.presence_penalty, -2.0, 2.0)
        _check_float("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        for tok, bias in self.logit_bias.items():
            if tok < 0:
                raise InvalidRequestError(f"logit_bias has a negative token id {tok}", param="logit_bias")
            if not -100.0 <= bias <= 100.0 or math.isnan(bias):
                raise InvalidRequestError(
                    f"logit_bias for token {tok} must be in [-100, 100], got {bias}", param="logit_bias")
        if self.seed is not None:
            _check_int("seed", self.seed, lo=None)
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise InvalidRequestError("stop strings must be non-empty strings", param="stop")
        if len(self.stop) > 16:
            raise InvalidRequestError("at most 16 stop strings are allowed", param="stop")
        for t in self.stop_token_ids:
            _check_int("stop_token_ids", t, lo=0)
        _check_int("n", self.n, lo=1)
        if self.n > 128:
            raise InvalidRequestError(f"n must be at most 128, got {self.n}", param="n")
        _check_int("top_logprobs", self.top_logprobs, lo=0)
        if self.top_logprobs > 20:
            raise InvalidRequestError(f"top_logprobs must be in [0, 20], got {self.top_logprobs}",
                                      param="top_logprobs")
        if self.prompt_logprobs is not None:
            _check_int("prompt_logprobs", self.prompt_logprobs, lo=0)
            if self.prompt_logprobs > 20:
                raise InvalidRequestError("prompt_logprobs must be in [0, 20]", param="prompt_logprobs")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


def _check_int(name: str, value: Any, lo: int | None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequestError(f"{name} must be an integer, got {value!r}", param=name)
    if lo is not None and value < lo:
        raise InvalidRequestError(f"{name} must be >= {lo}, got {value}", param=name)


def _check_float(name: str, value: Any, lo: float, hi: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise InvalidRequestError(f"{name} must be a number, got {value!r}", param=name)
    if not lo <= value <= hi:
        raise InvalidRequestError(f"{name} must be in [{lo}, {hi}], got {value}", param=name)


@dataclass
class GenerationRequest:
    """One request to the engine: prompt token ids only (runtime/prompt.py turns text or chat
    messages into ids, once, before a request reaches the engine)."""

    prompt_token_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)

    def __post_init__(self) -> None:
        check_token_ids(self.prompt_token_ids)


def check_token_ids(ids: Any, param: str = "prompt") -> None:
    """A non-empty list of non-negative ints, or InvalidRequestError naming `param`."""
    if not isinstance(ids, (list, tuple)):
        raise InvalidRequestError("prompt token ids must be a list of integers", param=param)
    if len(ids) == 0:
        raise InvalidRequestError("the prompt is empty", param=param)
    for t in ids:
        if isinstance(t, bool) or not isinstance(t, int) or t < 0:
            raise InvalidRequestError(f"prompt token ids must be non-negative integers, got {t!r}",
                                      param=param)


@dataclass
class TokenLogprob:
    """Log-probability of one token, with the top alternatives at its position."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class GenerationOutput:
    """One streamed step of one choice. The last output of a choice has finish_reason and usage set."""

    request_id: str
    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None
    finish_reason: str | None = None
    """'stop' (EOS, stop token or stop string), 'length', or 'abort'."""
    stop_reason: str | int | None = None
    """The stop string or stop token id that ended the choice, if any."""
    usage: Usage | None = None


@dataclass
class CompletionResult:
    """A whole finished choice, as the blocking helper returns it."""

    request_id: str
    index: int
    text: str
    token_ids: list[int]
    prompt_token_ids: list[int]
    finish_reason: str | None
    stop_reason: str | int | None = None
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None
    usage: Usage | None = None
