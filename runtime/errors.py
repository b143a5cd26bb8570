"""Typed errors of the runtime. The HTTP edge maps each class to an OpenAI error; never by message text."""

from __future__ import annotations


def rebuilt_exception(cls: type, args: tuple, state: dict) -> BaseException:
    """An exception unpickled from its args and attributes, without its __init__ (whose parameters need
    not be its args): how an error crosses to another process (a Ray replica's to the ingress)."""
    e = cls.__new__(cls)
    e.args = args
    e.__dict__.update(state)
    return e


class HearthError(Exception):
    """Base class of every error hearth raises on purpose."""

    def __reduce__(self):
        return rebuilt_exception, (type(self), self.args, self.__dict__)


class InvalidRequestError(HearthError, ValueError):
    """A request field is wrong. `param` names the field, as OpenAI's error envelope does."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class ContextLengthExceeded(InvalidRequestError):
    """The prompt (plus requested tokens) does not fit the model's context window."""

    def __init__(self, prompt_tokens: int, max_model_len: int, max_tokens: int | None = None):
        self.prompt_tokens = prompt_tokens
        self.max_model_len = max_model_len
        self.max_tokens = max_tokens
        if max_tokens is None:
            msg = (f"This model's maximum context length is {max_model_len} tokens, "
                   f"but the prompt has {prompt_tokens} tokens.")
        else:
            msg = (f"This model's maximum context length is {max_model_len} tokens, but "
                   f"{prompt_tokens + max_tokens} tokens were requested "
                   f"({prompt_tokens} in the prompt, {max_tokens} for the completion).")
        super().__init__(msg, param="messages")


class ModelNotFoundError(HearthError, FileNotFoundError):
    """No model at the given path or name."""


class ModelLoadError(HearthError):
    """A model exists but cannot be loaded (corrupt weights, missing files, bad config)."""


class UnsafeCheckpointError(ModelLoadError):
    """Loading would run untrusted code: pickle weights or trust_remote_code without the flag."""


class UnsupportedModelError(HearthError, NotImplementedError):
    """The architecture is not one the backend implements."""


class EngineDeadError(HearthError, RuntimeError):
    """The engine loop stopped with an error; no request can be served."""


class CapacityError(HearthError):
    """The engine's queue is full; the caller should retry later."""
