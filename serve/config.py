"""What `hearth serve` serves: typed config, read from models.yaml.

    hearth serve --config models.yaml

    models:
      - name: smollm2-135m-instruct        # what clients send as `model`
        path: smollm2-135m-instruct        # registered name or a path (GGUF file or HF directory)
        backend: auto                      # auto | llamacpp | transformers
        dtype: auto                        # transformers: auto | float32 | bfloat16 | float16
        quantization: null                 # transformers: int8 | nf4 (bitsandbytes)
        context_length: 4096
        replicas: 1                        # or autoscaling: {min_replicas: 1, max_replicas: 4}
        num_gpus: 0                        # per replica; fractions let two small models share a GPU
        max_num_seqs: 32                   # sequences decoded together
        max_queued_requests: 256           # beyond this, 429 with Retry-After
        default_sampling: {temperature: 0.7, max_tokens: 512}
        chat_template: null                # inline Jinja or a path to a .jinja file
        tool_parser: null                  # hermes | llama3 | mistral | json (default: from the template)
        stream_interval_ms: null           # batch streamed tokens (null: 40 where a Ray hop carries them, else 0)
    embeddings:
      - name: all-minilm-l6-v2             # path: null = the bundled model
    max_body_bytes: 8388608                # 413 beyond (RAG uploads: agents.max_request_bytes as base64)
    max_messages: 2048                     # caps checked before any tokenization (400 beyond)
    max_prompt_chars: 2000000              # chat contents + tools, completions prompts, embeddings inputs
    max_embedding_inputs: 2048
    any_model_name: false                  # true: any `model` name means the only chat model (else 404)
    responses_store_max: 1000              # /v1/responses kept for previous_response_id (LRU, in memory)
    responses_store_max_bytes: 67108864
    drain_timeout_s: 30                    # SIGTERM: in-flight requests get this long, then a 503
    agents:
      rag_dir: null                        # named RAG indexes ($HEARTH_HOME/rag)
      rag_allowed_roots: []                # server folders documents may be ingested from by path
      sandbox: false                       # the Python sandbox tool
      max_steps: 16                        # caps on what one agent run may ask
      max_time_s: 300

With no file, the default chat model (GGUF on llama.cpp) and the bundled embeddings are served.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml
from hearth.runtime.errors import InvalidRequestError
from hearth.runtime.registry import DEFAULT_MODEL

from .embeddings import DEFAULT_EMBEDDING_MODEL

BACKENDS = ("auto", "llamacpp", "transformers")
TOOL_PARSERS = ("hermes", "llama3", "mistral", "json")
SAMPLING_DEFAULT_KEYS = {"temperature", "top_p", "top_k", "min_p", "max_tokens", "presence_penalty",
                         "frequency_penalty", "repetition_penalty", "stop", "seed"}


class ConfigError(InvalidRequestError):
    """models.yaml is wrong; the message names the file and the field."""


@dataclass
class Autoscaling:
    """Ray Serve autoscaling of one deployment's replicas."""

    min_replicas: int = 1
    max_replicas: int = 1
    target_ongoing_requests: float = 16.0
    """Ongoing requests per replica Ray Serve aims for before it adds one."""

    def __post_init__(self) -> None:
        _check(self.min_replicas >= 0, "autoscaling.min_replicas must be >= 0")
        _check(self.max_replicas >= max(1, self.min_replicas),
               "autoscaling.max_replicas must be >= max(1, min_replicas)")
        _check(self.target_ongoing_requests > 0, "autoscaling.target_ongoing_requests must be > 0")


@dataclass
class ModelConfig:
    """One chat/completions model: one Ray Serve deployment, one engine per replica."""

    name: str = DEFAULT_MODEL
    """The `model` clients send, and the name /v1/models lists."""
    path: str | None = None
    """Registered model name or a path; None means `name` is a registered model."""
    backend: str = "auto"
    dtype: str = "auto"
    quantization: str | None = None
    context_length: int | None = None
    """KV window per sequence; None: the model's trained length, capped at 4096 on CPU backends."""
    replicas: int = 1
    autoscaling: Autoscaling | None = None
    num_gpus: float = 0.0
    num_cpus: float = 1.0
    max_num_seqs: int = 32
    max_queued_requests: int = 256
    default_sampling: dict[str, Any] = field(default_factory=dict)
    chat_template: str | None = None
    tool_parser: str | None = None
    aliases: list[str] = field(default_factory=list)
    """Other names clients may send for this model (e.g. gpt-4o-mini for drop-in use)."""
    backend_options: dict[str, Any] = field(default_factory=dict)
    """Passed to the backend as is, e.g. {n_threads: 2, batch_invariant: true} for llama.cpp."""
    stream_interval_ms: float | None = None
    """Tokens produced within this window after a streamed chunk go out together in the next one (the
    first chunk is never held). None: 0 without Ray and where the app runs in the model's replica
    behind HAProxy; RAY_STREAM_INTERVAL_MS (40) where a Ray hop carries every message (the separate
    ingress, or Ray's Python proxy), because there each message costs CPU the engine needs."""

    def __post_init__(self) -> None:
        _check(isinstance(self.name, str) and self.name.strip() != "", "name must be a non-empty string")
        _check(self.backend in BACKENDS, f"backend must be one of {', '.join(BACKENDS)}; got {self.backend!r}")
        _check(self.quantization in (None, "int8", "nf4"),
               f"quantization must be int8, nf4 or null; got {self.quantization!r}")
        _check(self.context_length is None or (isinstance(self.context_length, int) and self.context_length >= 16),
               "context_length must be an integer >= 16")
        _check(isinstance(self.replicas, int) and self.replicas >= 1, "replicas must be an integer >= 1")
        if isinstance(self.autoscaling, dict):
            self.autoscaling = _build(Autoscaling, self.autoscaling, "autoscaling")
        _check(0 <= float(self.num_gpus) <= 64, "num_gpus must be in [0, 64] (fractions allowed)")
        _check(float(self.num_cpus) > 0, "num_cpus must be > 0")
        _check(isinstance(self.max_num_seqs, int) and 1 <= self.max_num_seqs <= 1024,
               "max_num_seqs must be an integer in [1, 1024]")
        _check(isinstance(self.max_queued_requests, int) and self.max_queued_requests >= 1,
               "max_queued_requests must be an integer >= 1")
        unknown = set(self.default_sampling) - SAMPLING_DEFAULT_KEYS
        _check(not unknown, f"default_sampling has unknown keys {sorted(unknown)}; "
                            f"allowed: {sorted(SAMPLING_DEFAULT_KEYS)}")
        _check(self.tool_parser in (None, *TOOL_PARSERS),
               f"tool_parser must be one of {', '.join(TOOL_PARSERS)} or null; got {self.tool_parser!r}")
        _check(isinstance(self.aliases, list) and all(isinstance(a, str) and a for a in self.aliases),
               "aliases must be a list of names")
        _check(isinstance(self.backend_options, dict), "backend_options must be a mapping")
        _check(self.stream_interval_ms is None or (isinstance(self.stream_interval_ms, (int, float))
                                                   and 0 <= self.stream_interval_ms <= 1000),
               "stream_interval_ms must be a number of milliseconds in [0, 1000]")

    @property
    def source(self) -> str:
        return self.path or self.name

    def load_chat_template(self, base_dir: Path | None = None) -> str | None:
        """The override template text: a file path (relative to models.yaml) or inline Jinja."""
        t = self.chat_template
        if not t:
            return None
        if "{%" in t or "{{" in t:
            return t
        p = Path(t) if Path(t).is_absolute() or base_dir is None else base_dir / t
        if not p.is_file():
            raise ConfigError(f"models[{self.name}].chat_template: no file {p} (and not inline Jinja)",
                              param="chat_template")
        return p.read_text(encoding="utf-8")


@dataclass
class EmbeddingConfig:
    """One embedding model: one Ray Serve deployment."""

    name: str = DEFAULT_EMBEDDING_MODEL
    path: str | None = None
    """A local sentence-transformers directory; None: the bundled all-MiniLM-L6-v2."""
    device: str = "cpu"
    replicas: int = 1
    num_gpus: float = 0.0
    num_cpus: float = 0.5
    max_batch_size: int = 64

    def __post_init__(self) -> None:
        _check(isinstance(self.name, str) and self.name.strip() != "", "embeddings: name must be a non-empty string")
        _check(isinstance(self.replicas, int) and self.replicas >= 1, "embeddings: replicas must be >= 1")
        _check(0 <= float(self.num_gpus) <= 64, "embeddings: num_gpus must be in [0, 64]")
        _check(isinstance(self.max_batch_size, int) and self.max_batch_size >= 1,
               "embeddings: max_batch_size must be >= 1")


@dataclass
class RewardModelConfig:
    """A reward model (a `hearth train rm` checkpoint) for the chat extension `"best_of_n"`: n answers
    are sampled and the one it scores highest is returned (the LaMDA pattern). Loaded on first use, in
    the process that serves chat."""

    name: str
    """What requests name in `best_of_n.reward_model`."""
    path: str
    """The checkpoint folder (relative to models.yaml's folder, or absolute)."""
    max_length: int = 2048
    """Tokens of a scored conversation; a longer one keeps its end (the answer)."""
    max_n: int = 8
    """The most answers one request may ask to be sampled and scored."""

    def __post_init__(self) -> None:
        _check(isinstance(self.name, str) and self.name.strip() != "", "reward_models: name must be a non-empty string")
        _check(isinstance(self.path, str) and self.path.strip() != "", "reward_models: path must be a non-empty string")
        _check(isinstance(self.max_length, int) and self.max_length >= 16, "reward_models: max_length must be >= 16")
        _check(isinstance(self.max_n, int) and 2 <= self.max_n <= 64, "reward_models: max_n must be in [2, 64]")


@dataclass
class AgentsConfig:
    """Retrieval indexes and agent runs (`/v1/rag/...`, `/v1/agents/runs`, the chat `rag` and `reasoning`
    extensions)."""

    enabled: bool = True
    model: str | None = None
    """The chat model agents use when a request names none; None: the first configured model."""
    rag_dir: str | None = None
    """Where named RAG indexes live; None: $HEARTH_HOME/rag."""
    rag_embedding_model: str | None = None
    """A local sentence-transformers directory for retrieval; None: the bundled all-MiniLM-L6-v2."""
    rag_allowed_roots: list[str] = field(default_factory=list)
    """Server folders a documents request may name by path; empty: only uploaded text/content."""
    max_document_bytes: int = 2**20
    """The largest document one ingest accepts, uploaded or read from a path, and its extracted text
    (413 beyond): 1 MiB of text embeds in well under a minute on a CPU."""
    max_request_bytes: int = 8 * 2**20
    """The most document bytes one ingest request may carry (413 beyond)."""
    sandbox: bool = False
    """Offer the Python sandbox tool: a separate process with CPU, memory and time limits, confined by
    the kernel (Landlock + seccomp: no writes outside its temp folder, no network, no new processes).
    Refused at load on a machine that cannot confine it."""
    max_steps: int = 16
    """The most model calls one agent run may ask for."""
    max_time_s: float = 300.0
    plan_memory: bool = True
    """Keep successful plans (under rag_dir/_plans) and show similar ones to later runs."""

    def __post_init__(self) -> None:
        _check(isinstance(self.rag_allowed_roots, list), "agents.rag_allowed_roots must be a list of folders")
        _check(isinstance(self.max_document_bytes, int) and self.max_document_bytes >= 1,
               "agents.max_document_bytes must be an integer >= 1")
        _check(isinstance(self.max_request_bytes, int) and self.max_request_bytes >= 1,
               "agents.max_request_bytes must be an integer >= 1")
        _check(isinstance(self.max_steps, int) and 1 <= self.max_steps <= 256, "agents.max_steps must be in [1, 256]")
        _check(isinstance(self.max_time_s, (int, float)) and self.max_time_s > 0, "agents.max_time_s must be > 0")
        if self.sandbox:
            from hearth.agents.tools import sandbox_unavailable_reason

            reason = sandbox_unavailable_reason()
            _check(reason is None, f"agents.sandbox: {reason}")


@dataclass
class ServeConfig:
    """Everything `hearth serve` needs; command-line flags override the file."""

    models: list[ModelConfig] = field(default_factory=lambda: [ModelConfig()])
    embeddings: list[EmbeddingConfig] = field(default_factory=lambda: [EmbeddingConfig()])
    agents: AgentsConfig = field(default_factory=AgentsConfig)
    reward_models: list[RewardModelConfig] = field(default_factory=list)
    """Reward models for `best_of_n` on chat requests (none by default)."""
    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: list[str] = field(default_factory=list)
    cors_origins: list[str] = field(default_factory=list)
    request_timeout_s: float = 600.0
    """A request still running after this gets 408 (or an SSE error event once streaming)."""
    drain_timeout_s: float = 30.0
    """On SIGTERM, in-flight requests get this long to finish while new ones get 503; what still runs
    then is ended with a 503 error (an SSE error event and [DONE] for a stream)."""
    max_body_bytes: int = 8 * 2**20
    """A request body larger than this gets 413 before any of it is parsed: on its Content-Length, or as
    soon as a chunked body passes it. RAG document uploads get `max_upload_body_bytes` instead."""
    max_messages: int = 2048
    """The most messages one chat request may hold (400 beyond). A long agent transcript of short turns
    stays well under it; OpenAI caps `input` arrays at 2048 too."""
    max_prompt_chars: int = 2_000_000
    """The most characters one request's prompt may hold, checked before tokenization (400 beyond): chat
    message contents, tool calls, tool definitions and the response schema together; all completions
    prompts; all embeddings inputs. A token id given instead of text counts as one. 2M characters is
    about 425k tokens of English, room for a 256k-token context in any language, and tokenizes in
    3.4 s with the default model's tokenizer on a busy 2-core machine (off the event loop)."""
    max_embedding_inputs: int = 2048
    """The most inputs one embeddings request may hold (400 beyond), as at OpenAI."""
    any_model_name: bool = False
    """With one chat model served, take any `model` name for it (as llama-server does); by default an
    unknown name gets 404."""
    responses_store_max: int = 1000
    """Responses kept for `previous_response_id` (/v1/responses), in this server process's memory; the
    least recently used go first. 0 keeps none."""
    responses_store_max_bytes: int = 64 * 2**20
    """The most bytes (as JSON) the kept responses may take together."""
    base_dir: Path | None = None

    def __post_init__(self) -> None:
        self.models = [_build(ModelConfig, m, f"models[{i}]") if isinstance(m, dict) else m
                       for i, m in enumerate(self.models or [])]
        self.embeddings = [_build(EmbeddingConfig, e, f"embeddings[{i}]") if isinstance(e, dict) else e
                           for i, e in enumerate(self.embeddings or [])]
        self.reward_models = [_build(RewardModelConfig, r, f"reward_models[{i}]") if isinstance(r, dict) else r
                              for i, r in enumerate(self.reward_models or [])]
        rm_names = [r.name for r in self.reward_models]
        _check(len(set(rm_names)) == len(rm_names), "reward_models: names must be unique")
        if isinstance(self.agents, dict):
            self.agents = _build(AgentsConfig, self.agents, "agents")
        elif self.agents is None:
            self.agents = AgentsConfig(enabled=False)
        _check(bool(self.models) or bool(self.embeddings), "configure at least one model or embedding model")
        names = [n for m in self.models for n in (m.name, *m.aliases)] + [e.name for e in self.embeddings]
        dup = sorted({n for n in names if names.count(n) > 1})
        _check(not dup, f"model names must be unique; repeated: {dup}")
        _check(isinstance(self.port, int) and 0 <= self.port <= 65535, "port must be in [0, 65535]")
        _check(self.request_timeout_s > 0, "request_timeout_s must be > 0")
        _check(self.drain_timeout_s >= 0, "drain_timeout_s must be >= 0")
        for name in ("max_body_bytes", "max_messages", "max_prompt_chars", "max_embedding_inputs"):
            v = getattr(self, name)
            _check(isinstance(v, int) and not isinstance(v, bool) and v >= 1, f"{name} must be an integer >= 1")
        for name in ("responses_store_max", "responses_store_max_bytes"):
            v = getattr(self, name)
            _check(isinstance(v, int) and not isinstance(v, bool) and v >= 0, f"{name} must be an integer >= 0")
        _check(isinstance(self.any_model_name, bool), "any_model_name must be true or false")

    @property
    def max_upload_body_bytes(self) -> int:
        """The body cap of the RAG routes: room for agents.max_request_bytes of documents as base64 in
        JSON (4/3 of the bytes, plus 1 MiB for the rest), and never below max_body_bytes."""
        return max(self.max_body_bytes, self.agents.max_request_bytes * 4 // 3 + 2**20)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["base_dir"] = str(self.base_dir) if self.base_dir else None
        return d


def load_config(path: str | os.PathLike | None = None) -> ServeConfig:
    """Read models.yaml (None: the defaults). Errors name the file and the field."""
    if path is None:
        return ServeConfig()
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}", param="config")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}", param="config") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: the top level must be a mapping with `models:`", param="config")
    try:
        cfg = _build(ServeConfig, raw, "")
    except ConfigError as e:
        raise ConfigError(f"{p}: {e}", param="config") from None
    cfg.base_dir = p.resolve().parent
    return cfg


def _build(cls, data: Any, where: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{where or cls.__name__} must be a mapping, got {type(data).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{where + ': ' if where else ''}unknown keys {unknown}; allowed: {sorted(known)}")
    try:
        return cls(**data)
    except ConfigError as e:
        raise ConfigError(f"{where + ': ' if where else ''}{e}") from None
    except TypeError as e:
        raise ConfigError(f"{where + ': ' if where else ''}{e}") from None


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)
