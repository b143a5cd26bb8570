"""Talking to an OpenAI-compatible server (hearth's own, vLLM, llama.cpp's, OpenAI): what the judge and
self-instruct share. Retries with exponential backoff on connection errors, 408/409/429 and 5xx come from
the `openai` client itself (it honours Retry-After); a request that still fails raises TeacherError."""

from __future__ import annotations

import os
from urllib.parse import urlsplit

from hearth.runtime.errors import HearthError


class TeacherError(HearthError, RuntimeError):
    """An OpenAI-compatible server did not answer (after retries) or answered with an error."""


def base_url(url: str) -> str:
    """The client's base URL: `http://host:8000` and `http://host:8000/v1` both mean the /v1 API."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise TeacherError(f"not an http(s) URL: {url!r}")
    return url.rstrip("/") + "/v1" if parts.path in ("", "/") else url.rstrip("/")


def async_client(url: str, api_key: str | None, timeout_s: float, max_retries: int):
    """An AsyncOpenAI client; the key falls back to $OPENAI_API_KEY (local servers often need none)."""
    try:
        import openai
    except ImportError:
        raise TeacherError("this command needs the `openai` package: pip install openai") from None
    key = api_key or os.environ.get("OPENAI_API_KEY") or "no-key"
    return openai.AsyncOpenAI(base_url=base_url(url), api_key=key, timeout=timeout_s, max_retries=max_retries)


async def chat(client, model: str, messages: list[dict], *, max_tokens: int, temperature: float,
               top_p: float = 1.0, seed: int | None = None) -> str:
    """One chat completion's text; TeacherError (naming server and model) when it fails for good."""
    import openai

    kw = {"seed": seed} if seed is not None else {}
    try:
        resp = await client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens,
                                                    temperature=temperature, top_p=top_p, **kw)
    except openai.APIError as e:
        raise TeacherError(f"{client.base_url} (model {model}): {type(e).__name__}: {e}") from e
    if not resp.choices:
        raise TeacherError(f"{client.base_url} (model {model}): a reply with no choices")
    return resp.choices[0].message.content or ""
