"""OpenAI's error envelope, and the map from hearth's typed errors to HTTP statuses.

Every error leaves the server as {"error": {"message", "type", "param", "code"}}; the mapping
goes by exception class, never by message text. Client input never produces a 5xx.
"""

from __future__ import annotations

import json
import logging

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
)
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("hearth.serve")

RETRY_AFTER_S = 1


class APIError(Exception):
    """An error with its HTTP status and OpenAI type/code, raised anywhere in the app."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

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


def from_exception(e: BaseException, prompt_param: str = "messages") -> APIError:
    """The APIError for any exception; unknown ones become a logged 500 with no internals leaked."""
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
