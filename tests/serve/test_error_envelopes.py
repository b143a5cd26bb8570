"""The error envelope as a client reads it, whatever process raised the error: hearth's typed errors
survive the trip from a Ray replica and map by class as in `--no-ray`; Ray's wrapper and Ray's own
errors never put a traceback, path, pid or address in front of a client. (tests/serve/test_ray_hostile.py
checks the same through real servers.)"""

from __future__ import annotations

import pickle
import traceback
from pathlib import Path

import pytest

from hearth.agents.rag.errors import IndexNotFound
from hearth.agents.types import AgentInputError
from hearth.runtime.checkpoint import PickleRefusedError
from hearth.runtime.errors import (
    CapacityError,
    ContextLengthExceeded,
    EngineDeadError,
    InvalidRequestError,
    ModelNotFoundError,
)
from hearth.serve.errors import APIError, from_exception, model_not_found, safe_message

ray = pytest.importorskip("ray")
ray_app = pytest.importorskip("hearth.serve.ray_app")  # registers Ray's wrapper with serve.errors

ERRORS = [
    InvalidRequestError("input must not be empty", param="input"),
    ContextLengthExceeded(900, 512, 16),
    ModelNotFoundError("no model named x"),
    CapacityError("the engine queue is full (1 waiting sequences)"),
    EngineDeadError("the engine stopped"),
    PickleRefusedError([Path("weights.bin")]),
    IndexNotFound("no index named 'notes'"),
    AgentInputError("strategy must be one of cot, react", param="strategy"),
    model_not_found("nope", ["a", "b"]),
]


def _envelope(e: BaseException, param: str = "messages") -> tuple:
    err = from_exception(e, param)
    return err.status, err.body(), err.headers


@pytest.mark.parametrize("error", ERRORS, ids=lambda e: type(e).__name__)
def test_an_error_raised_in_a_replica_maps_as_if_raised_here(error):
    """Pickled across processes (ContextLengthExceeded and APIError did not unpickle: a 500) and
    wrapped in Ray's RayTaskError (whose text is the replica's traceback, pid and address)."""
    crossed = pickle.loads(pickle.dumps(error))
    assert type(crossed) is type(error) and str(crossed) == str(error)
    assert crossed.__dict__ == error.__dict__
    try:
        raise crossed
    except Exception as e:
        tb = traceback.format_exc()
        wrapped = ray.exceptions.RayTaskError("generate", tb, e, pid=4242, ip="10.1.2.3")
    for w in (wrapped, wrapped.as_instanceof_cause()):
        assert "10.1.2.3" in str(w)  # what used to reach the client
        assert _envelope(w, "prompt") == _envelope(error, "prompt")


def test_an_unexpected_replica_error_is_a_generic_500():
    try:
        raise KeyError("/home/user/secret/path")
    except KeyError as e:
        wrapped = ray.exceptions.RayTaskError("generate", traceback.format_exc(), e, pid=4242, ip="10.1.2.3")
    for w in (wrapped, wrapped.as_instanceof_cause(), ray.exceptions.RayTaskError("f", "Traceback ...", None)):
        err = from_exception(w)
        assert (err.status, err.type, err.code) == (500, "server_error", "internal_error")
        assert "10.1.2.3" not in err.message and "secret" not in err.message and "Traceback" not in err.message


def test_ray_errors_at_the_handle_become_hearth_errors():
    lost = ray_app._local(ray.exceptions.ActorDiedError(), "model")
    assert isinstance(lost, EngineDeadError)
    err = from_exception(lost)
    assert err.status == 503 and "pid" not in err.message and "actor" not in err.message.lower()
    from ray.serve.exceptions import BackPressureError

    busy = from_exception(ray_app._local(BackPressureError(num_queued_requests=3, max_queued_requests=3), "model"))
    assert (busy.status, busy.code, busy.headers.get("Retry-After")) == (429, "queue_full", "1")


@pytest.mark.parametrize("message, shown", [
    ("Traceback (most recent call last):\n  File \"/srv/hearth/x.py\", line 3, in f\nValueError: x",
     "The request could not be processed."),
    ("no index at /home/ada/.hearth/rag/notes", "no index at [redacted]"),
    ("replica died (pid=4242, ip=10.1.2.3)", "replica died ([redacted], [redacted])"),
    ("cannot reach 10.0.0.7:8000 or [fe80::1]:8000", "cannot reach [redacted] or [redacted]"),
    # what a client should read stays as it is
    ("Invalid value for 'messages.0.content': field required.", None),
    ("The model 'nope' does not exist. Available: a, b", None),
    ("This model's maximum context length is 512 tokens, but the prompt has 900 tokens.", None),
    ("POST /v1/chat/completions at 12:30:45 with stop ['END'] failed", None),
])
def test_no_message_shows_a_traceback_path_pid_or_address(message, shown):
    assert safe_message(message, 400) == (message if shown is None else shown)
    assert APIError(400, message).body()["error"]["message"] == (message if shown is None else shown)
    assert APIError(400, message).sse().count("redacted") == (shown or "").count("redacted")


def test_a_refused_stream_is_a_429_not_rays_own_503():
    """Ray refuses a call when its queue for the model is full; cancelling that call re-raises the
    refusal, which escaped as Ray's plain-text 503 instead of the app's 429."""
    import asyncio

    from ray.serve.exceptions import BackPressureError

    refusal = BackPressureError(num_queued_requests=1, max_queued_requests=1)

    class Refused:
        def __aiter__(self):
            return self

        async def __anext__(self):
            raise refusal

        def cancel(self):
            raise refusal

    async def first():
        return await ray_app._streamed(Refused, "model").__anext__()

    with pytest.raises(CapacityError) as e:
        asyncio.run(first())
    assert (from_exception(e.value).status, from_exception(e.value).code) == (429, "queue_full")
