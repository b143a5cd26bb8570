"""OpenAI's error envelope, and the map from hearth's typed errors to HTTP statuses.

Every error leaves the server as {"error": {"message", "type", "param", "code"}}; the mapping
goes by exception class, never by message text. Client input never produces a 5xx. An error that
crossed a process (a Ray replica's, wrapped by Ray) is mapped by the class of the error the replica
raised, as if it had been raised here; and no message a client reads carries a traceback, a file
path, a process id or a network address (`APIError.body`), whatever raised it.
"""

from __future__ import annotations

import json
import logging
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from hearth.agents.rag import DocumentNotFound, ExtractionError, IndexBusy, IndexNotFound, RagError
from hearth.agents.types import AgentError
from hearth.runtime.errors import (
    CapacityError,
    ContextLengthExceeded,
    EngineDeadError,
    HearthError,
    InvalidRequestError,
    ModelLoadError,
    ModelNotFoundError,
    UnsafeCheckpointError,
    rebuilt_exception,
)
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("hearth.serve")

RETRY_AFTER_S = 1

# Exception classes that carry the error raised elsewhere as `.cause` (Ray's RayTaskError: ray_app.py
# registers it, so that this module needs no Ray).
_WRAPPERS: list[type[BaseException]] = []

# What a client must never read. A traceback replaces the whole message; a path, address or process
# id in an otherwise useful message is blanked out.
_TRACEBACK = re.compile(r'Traceback \(most recent call last\)|File "[^"]*", line \d+')
_H = "[0-9a-fA-F]{1,4}"  # a group of an IPv6 address
_LEAKS = re.compile(
    r"(?<![\w.:/-])(?:/(?!v1/)[\w.@+~-]+){2,}/?"  # an absolute path of two parts or more (not a route)
    r"|\b(?:\d{1,3}\.){3}\d{1,3}(?::\d+)?\b"  # an IPv4 address
    rf"|(?<![\w:])(?:{_H}:){{7}}{_H}(?![\w:])"  # an IPv6 address in full, or with ::
    rf"|(?<![\w:])\[?(?:{_H}(?::{_H})*::(?:{_H}(?::{_H})*)?|::{_H}(?::{_H})*)\]?(?::\d+)?(?![\w:])"
    r"|\b(?:pid|ip|node_ip|actor_id|worker_id|node_id)\s*[=:]\s*[\w.:-]+")


def wraps_errors(cls: type[BaseException]) -> None:
    """Register an exception class whose `.cause` is the error that was really raised."""
    if cls not in _WRAPPERS:
        _WRAPPERS.append(cls)


def unwrap(e: BaseException) -> BaseException:
    """The error a replica raised, out of the wrappers (one per process it crossed) around it."""
    for _ in range(8):
        if not isinstance(e, tuple(_WRAPPERS)):
            break
        cause = getattr(e, "cause", None)
        if not isinstance(cause, BaseException) or cause is e:
            break
        e = cause
    return e


def safe_message(message: str, status: int) -> str:
    """`message` without tracebacks, paths, addresses or process ids (logged when changed)."""
    if _TRACEBACK.search(message):
        log.warning("an error message with a traceback was replaced: %s", message)
        return ("The server had an error while processing your request." if status >= 500 else
                "The request could not be processed.")
    clean = _LEAKS.sub("[redacted]", message)
    if clean != message:
        log.info("error message redacted: %s", message)
    return clean


class APIError(Exception):
    """An error with its HTTP status and OpenAI type/code, raised anywhere in the app."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, headers or {}

    def __reduce__(self):  # crosses Ray's processes whatever __init__ takes
        return rebuilt_exception, (type(self), self.args, self.__dict__)

    def body(self) -> dict:
        return {"error": {"message": safe_message(self.message, self.status), "type": self.type,
                          "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)

    def sse(self) -> str:
        """The error as an SSE event, for a stream that has already begun."""
        return f"event: error\ndata: {json.dumps(self.body())}\n\n"


def invalid(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param, None)


def model_not_found(name: str, available: list[str]) -> APIError:
    return APIError(404, f"The model {name!r} does not exist. Available: {', '.join(available) or 'none'}",
                    "invalid_request_error", "model", "model_not_found")


def unauthorized(message: str = "Incorrect API key provided.") -> APIError:
    return APIError(401, message, "invalid_request_error", None, "invalid_api_key")


def unavailable(message: str) -> APIError:
    return APIError(503, message, "service_unavailable", None, "service_unavailable",
                    {"Retry-After": str(RETRY_AFTER_S)})


def timeout(seconds: float) -> APIError:
    return APIError(408, f"The request took longer than {seconds:g} s and was stopped.",
                    "timeout_error", None, "timeout")


def header_timeout(seconds: float) -> APIError:
    """A client too slow to send its request's headers (the front end's header timeout)."""
    return APIError(408, f"The request's headers did not arrive within {seconds:g} s.", "timeout_error",
                    None, "timeout")


def from_exception(e: BaseException, prompt_param: str = "messages") -> APIError:
    """The APIError for any exception; unknown ones become a logged 500 with no internals leaked."""
    e = unwrap(e)
    if isinstance(e, tuple(_WRAPPERS)):  # a wrapper with no cause to map: its text is a traceback
        log.error("unhandled error from a replica: %s", e)
        return _internal()
    if isinstance(e, APIError):
        return e
    if isinstance(e, ContextLengthExceeded):
        return APIError(400, str(e), "invalid_request_error", prompt_param, "context_length_exceeded")
    if isinstance(e, InvalidRequestError):
        param = e.param
        if param in ("prompt", "messages"):
            param = prompt_param
        return APIError(400, str(e), "invalid_request_error", param, None)
    if isinstance(e, ModelNotFoundError):
        return APIError(404, str(e), "invalid_request_error", "model", "model_not_found")
    if isinstance(e, CapacityError):
        return APIError(429, f"The server is busy: {e}. Retry shortly.", "rate_limit_error", None,
                        "queue_full", {"Retry-After": str(RETRY_AFTER_S)})
    if isinstance(e, UnsafeCheckpointError):  # the model's chat template misbehaved on this request
        return APIError(400, str(e), "invalid_request_error", prompt_param, "unsafe_chat_template")
    if isinstance(e, (EngineDeadError, ModelLoadError)):
        return unavailable(f"The model is unavailable: {e}")
    if isinstance(e, IndexNotFound):
        return APIError(404, str(e), "invalid_request_error", "index", "index_not_found")
    if isinstance(e, DocumentNotFound):
        return APIError(404, str(e), "invalid_request_error", "source", "document_not_found")
    if isinstance(e, IndexBusy):
        return APIError(409, str(e), "invalid_request_error", "index", "index_busy",
                        {"Retry-After": str(RETRY_AFTER_S)})
    if isinstance(e, ExtractionError):  # an uploaded PDF/HTML/text that cannot be read
        return APIError(400, str(e), "invalid_request_error", "documents", None)
    if isinstance(e, RagError):  # a damaged index or one built with another embedding model
        return APIError(409, str(e), "invalid_request_error", "index", "index_unusable")
    if isinstance(e, AgentError):  # the agent machinery failed, not the client's input
        log.warning("agent run failed: %s", e)
        return APIError(500, f"The agent run failed: {e}", "server_error", None, "agent_error")
    if isinstance(e, HearthError):
        return APIError(400, str(e), "invalid_request_error", None, None)
    log.error("unhandled error", exc_info=e)
    return _internal()


def _internal() -> APIError:
    return APIError(500, "The server had an error while processing your request.", "server_error",
                    None, "internal_error")


def install(app: FastAPI) -> None:
    """Route FastAPI's and Starlette's own errors through the envelope too."""

    @app.exception_handler(APIError)
    async def _api(_: Request, e: APIError):
        return e.response()

    @app.exception_handler(HearthError)
    async def _hearth(_: Request, e: HearthError):
        return from_exception(e).response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, e: RequestValidationError):
        errs = e.errors()
        first = errs[0] if errs else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        msg = first.get("msg", "invalid request")
        if first.get("type") == "json_invalid":
            msg, param = "The request body is not valid JSON.", None
        elif first.get("type") == "missing":
            msg = f"Missing required parameter: {param!r}."
        else:
            msg = f"Invalid value for {param!r}: {msg}." if param else f"{msg}."
        return invalid(msg, param).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, e: StarletteHTTPException):
        if e.status_code == 404:
            err = APIError(404, "Unknown route. See /docs for the API.", "invalid_request_error",
                           None, "not_found")
        elif e.status_code == 405:
            err = APIError(405, f"Method not allowed: {e.detail}", "invalid_request_error", None,
                           "method_not_allowed")
        else:
            err = APIError(e.status_code, str(e.detail), "invalid_request_error" if e.status_code < 500
                           else "server_error", None, None)
        return err.response()

    @app.exception_handler(Exception)
    async def _any(_: Request, e: Exception):
        return from_exception(e).response()
