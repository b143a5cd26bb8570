"""The OpenAI wire format of the requests hearth accepts (pydantic), and their checks.

Responses are built as plain dicts in app.py (they are written once per token, and pydantic
would only slow that down); the request models here are also what /openapi.json publishes.
Unknown request fields are accepted and logged, as the issue asks, never rejected.
"""

from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

_EXTRA = ConfigDict(extra="allow")


class _Open(BaseModel):
    """A request body: unknown fields are kept (and logged by the app), not rejected."""

    model_config = _EXTRA

    def unknown_fields(self) -> list[str]:
        return sorted((self.model_extra or {}).keys())


class StreamOptions(BaseModel):
    model_config = _EXTRA
    include_usage: bool | None = False


class FunctionDef(BaseModel):
    model_config = _EXTRA
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(BaseModel):
    model_config = _EXTRA
    type: Literal["function"] = "function"
    function: FunctionDef


class NamedFunction(BaseModel):
    model_config = _EXTRA
    name: str


class NamedToolChoice(BaseModel):
    model_config = _EXTRA
    type: Literal["function"] = "function"
    function: NamedFunction


class JsonSchemaSpec(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)
    name: str = Field(default="response", max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = _EXTRA
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None


class ToolCallFunction(BaseModel):
    model_config = _EXTRA
    name: str
    arguments: str = ""


class ToolCallIn(BaseModel):
    model_config = _EXTRA
    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatMessage(BaseModel):
    """One message of the conversation; content may be text or a list of text parts."""

    model_config = _EXTRA
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[dict[str, Any]], None] = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None


class _SamplingFields(_Open):
    model: str = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=0)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    n: int | None = Field(default=1, ge=1, le=128)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: Union[str, list[str], None] = None
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    seed: int | None = None
    user: str | None = None
    # extensions that vLLM and llama.cpp's server also accept
    top_k: int | None = Field(default=None, ge=0)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(default=None, gt=0.0, le=10.0)
    ignore_eos: bool | None = False
    # structured output as vLLM and llama.cpp's server take it; at most one per request (guided_fields.py)
    structured_outputs: dict[str, Any] | None = None
    guided_json: Union[dict[str, Any], str, None] = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    grammar: str | None = None
    json_schema: Union[dict[str, Any], str, None] = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        if isinstance(v, str):
            v = [v]
        if v is not None:
            if len(v) > 16:
                raise ValueError("at most 16 stop strings are allowed")
            if any(not s for s in v):
                raise ValueError("stop strings must be non-empty")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v):
        if v is None:
            return v
        for k, b in v.items():
            if not k.lstrip("-").isdigit():
                raise ValueError(f"logit_bias keys must be token ids, got {k!r}")
            if int(k) < 0:
                raise ValueError(f"logit_bias has a negative token id {k}")
            if not -100.0 <= b <= 100.0:
                raise ValueError(f"logit_bias for token {k} must be in [-100, 100], got {b}")
        return v


STRATEGIES = ("plain", "cot", "few_shot_cot", "self_consistency", "react", "plan_execute", "tot", "tools")
_INDEX_NAME = r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,63}$"


class RagSpec(BaseModel):
    """hearth's chat extension `"rag": {"index": NAME, "top_k": K}`: answer from a RAG index, with citations."""

    model_config = _EXTRA
    index: str = Field(pattern=_INDEX_NAME)
    top_k: int = Field(default=4, ge=1, le=50)
    mmr: bool = False


class ReasoningSpec(BaseModel):
    """hearth's chat extension `"reasoning": {"strategy": "self_consistency", "n": 5}`."""

    model_config = _EXTRA
    strategy: Literal[STRATEGIES]
    n: int = Field(default=5, ge=1, le=32)
    answer_type: Literal["auto", "number", "choice", "text"] = "auto"
    max_steps: int | None = Field(default=None, ge=1)
    time_budget_s: float | None = Field(default=None, gt=0)


class BestOfNSpec(BaseModel):
    """hearth's chat extension `"best_of_n": {"n": 4, "reward_model": NAME}`: sample n answers, return the
    one the reward model scores highest, with every score."""

    model_config = _EXTRA
    n: int = Field(ge=2, le=64)
    reward_model: str | None = Field(default=None, min_length=1, max_length=256)


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: list[Tool] | None = None
    tool_choice: Union[Literal["none", "auto", "required"], NamedToolChoice, None] = None
    parallel_tool_calls: bool | None = True
    response_format: ResponseFormat | None = None
    # hearth extensions (clients of other servers never send them)
    rag: RagSpec | None = None
    reasoning: ReasoningSpec | None = None
    best_of_n: BestOfNSpec | None = None


class CompletionRequest(_SamplingFields):
    response_format: ResponseFormat | None = None
    prompt: Union[str, list[str], list[int], list[list[int]]]
    echo: bool | None = False
    logprobs: int | None = Field(default=None, ge=0, le=5)
    suffix: str | None = None
    best_of: int | None = Field(default=None, ge=1)


class EmbeddingRequest(_Open):
    model: str = Field(min_length=1)
    input: Union[str, list[str], list[int], list[list[int]]]
    encoding_format: Literal["float", "base64"] | None = "float"
    dimensions: int | None = Field(default=None, ge=1)
    user: str | None = None


class RagDocument(BaseModel):
    """One document to index: its text, or its bytes (base64) with a format to extract text from."""

    model_config = _EXTRA
    source: str = Field(min_length=1, max_length=512)
    text: str | None = None
    content_base64: str | None = None
    format: Literal["txt", "md", "html", "pdf"] | None = None


class RagDocumentsRequest(_Open):
    documents: list[RagDocument] = Field(default_factory=list, max_length=10_000)
    paths: list[str] = Field(default_factory=list, max_length=10_000)
    """Server files or folders, only inside the server's `agents.rag_allowed_roots`."""
    create: bool = True


class RagQueryRequest(_Open):
    query: str = Field(min_length=1, max_length=20_000)
    top_k: int = Field(default=4, ge=1, le=50)
    mmr: bool = False
    mmr_lambda: float = Field(default=0.5, ge=0.0, le=1.0)


class RagDeleteRequest(_Open):
    sources: list[str] = Field(min_length=1, max_length=10_000)


class AgentBudget(BaseModel):
    model_config = _EXTRA
    max_steps: int | None = Field(default=None, ge=1)
    time_s: float | None = Field(default=None, gt=0)


class AgentRunRequest(_Open):
    """POST /v1/agents/runs: one task, one strategy, optional tools and RAG index, budgets."""

    model: str | None = None
    input: str | None = Field(default=None, min_length=1, max_length=100_000)
    messages: list[ChatMessage] | None = None
    strategy: Literal[STRATEGIES] = "tools"
    tools: list[str] | None = None
    """Built-in or plugin tool names; None: every tool the server offers (rag_search when `rag` is set)."""
    rag: RagSpec | None = None
    budget: AgentBudget | None = None
    n: int = Field(default=5, ge=1, le=32)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    max_tokens: int | None = Field(default=None, ge=1)
    seed: int | None = None
    answer_type: Literal["auto", "number", "choice", "text"] = "auto"
    stream: bool = False


def completion_prompts(prompt: Any) -> list[str | list[int]]:
    """The prompts of a /v1/completions request: one string, strings, one id list, or id lists."""
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        return []
    if all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    return list(prompt)


def embedding_inputs(inp: Any) -> list[str] | list[list[int]]:
    if isinstance(inp, str):
        return [inp]
    if inp and all(isinstance(t, int) for t in inp):
        return [list(inp)]
    return list(inp)


class TokenizeRequest(_Open):
    """POST /tokenize (vLLM's shape): a text `prompt`, or chat `messages` (with `tools`) rendered by the
    model's template; `model` may be left out while one chat model is served."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    tools: list[Tool] | None = None
    add_generation_prompt: bool = True


class DetokenizeRequest(_Open):
    model: str | None = None
    tokens: list[int]


class ResponsesRequest(_Open):
    """POST /v1/responses: `input` (a string or items), `instructions`, function `tools`, and
    `previous_response_id` to go on from a stored response. Items are checked by the route."""

    model: str = Field(min_length=1)
    input: Union[str, list[dict[str, Any]]]
    instructions: str | None = None
    previous_response_id: str | None = Field(default=None, max_length=128)
    tools: list[dict[str, Any]] | None = None
    tool_choice: Union[Literal["none", "auto", "required"], dict[str, Any], None] = None
    parallel_tool_calls: bool | None = True
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    stream: bool | None = False
    store: bool | None = True
    metadata: dict[str, str] | None = None
    text: dict[str, Any] | None = None
    user: str | None = None
    seed: int | None = None
