"""The HTTP side of the Gradio demo (clients/demo.py): no gradio here, so it is tested on its own.

    info = await probe("http://127.0.0.1:8000/v1", "sk-key")     # chat models, RAG and agents routes
    async for event in answer(url, key, ChatSettings(model=info.models[0]), conv, "What is 17*23?"):
        history = render(history, event)                           # Gradio chat messages, steps collapsible
    summary, report = await ingest(url, key, "notes", ["a.md", "b.pdf"])

Everything goes over HTTP: the OpenAI routes through the `openai` client, hearth's own routes
(/v1/rag, /v1/agents/runs) through httpx with the same bearer key. Every failure the user can cause
(server down, wrong key, model still loading) becomes a `DemoError` whose text is shown as is.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator

import httpx

STRATEGIES = ("direct", "tools", "cot", "self_consistency")
"""The demo's answer modes: a plain streamed chat, the tool-calling agent, and two reasoning strategies."""
FORMATS = {".txt": "txt", ".text": "txt", ".md": "md", ".markdown": "md", ".html": "html", ".htm": "html",
           ".pdf": "pdf"}
_CONNECT_S, _READ_S = 5.0, 600.0


class DemoError(Exception):
    """A failure explained for the user (the text is shown in the chat as is); `status` is the HTTP status."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


@dataclass
class ServerInfo:
    """What one probe of the server found."""

    models: list[str]
    rag: bool = False          # /v1/rag/indexes answers: uploads and RAG answers work
    agents: bool = False       # /v1/agents/runs exists: tools and reasoning strategies work
    indexes: list[str] = field(default_factory=list)

    def note(self, url: str) -> str:
        """One line for the status bar."""
        parts = [f"Connected to `{url}`: {len(self.models)} chat model(s)."]
        if not self.rag:
            parts.append("No `/v1/rag` here: document upload and RAG answers are off.")
        if not self.agents:
            parts.append("No `/v1/agents` here: tools and reasoning strategies are off.")
        return " ".join(parts)


@dataclass
class ChatSettings:
    """The controls of one question."""

    model: str
    system: str = ""
    temperature: float = 0.7
    top_p: float = 1.0
    max_tokens: int = 512
    strategy: str = "direct"           # one of STRATEGIES
    n: int = 5                         # self_consistency: sampled paths
    rag_index: str | None = None       # answer from this RAG index (with citations)
    top_k: int = 4
    tools: list[str] | None = None     # the tools strategy: these tools; None: every tool the server has

    def __post_init__(self):
        if not self.model:
            raise DemoError("Pick a model first (none is selected; is the server up? press Refresh).")
        if self.strategy not in STRATEGIES:
            raise DemoError(f"unknown strategy {self.strategy!r}; one of {', '.join(STRATEGIES)}")


@dataclass
class Event:
    """One thing that happened while answering: kind is text (a delta), citations, reasoning, step or answer."""

    kind: str
    data: Any


# ---- errors ------------------------------------------------------------------------------------

def _server_message(body: Any) -> tuple[str, str | None]:
    """The message and code of an OpenAI-shaped error body ({"error": {...}}), or of FastAPI's {"detail"}."""
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict):
            return str(err.get("message") or err), err.get("code")
        if isinstance(err, str):
            return err, None
        if "detail" in body:
            return str(body["detail"]), None
    return (str(body)[:300] if body else ""), None


def status_message(status: int, body: Any, url: str) -> str:
    """The user's explanation of an HTTP error status."""
    msg, code = _server_message(body)
    if status == 401 or code == "invalid_api_key":
        return (f"The server at {url} refused the API key (401{': ' + msg if msg else ''}). "
                "Check the key in the Settings panel (or `--api-key`).")
    if status == 403:
        return f"The server at {url} refused access (403): {msg}"
    if status == 404 and code in ("model_not_found", None) and "model" in msg.lower():
        return f"{msg} Press Refresh to reload the model list."
    if status == 503:
        return f"The server is not ready (503): {msg or 'try again in a moment'}"
    return f"The server answered {status}: {msg or 'no details'}"


def explain(exc: BaseException, url: str) -> str:
    """A clear one-paragraph message for any failure of a call to `url`, never a traceback."""
    import openai

    if isinstance(exc, DemoError):
        return str(exc)
    if isinstance(exc, (openai.APITimeoutError, httpx.TimeoutException)):
        return f"The server at {url} did not answer in time."
    if isinstance(exc, (openai.APIConnectionError, httpx.TransportError)):
        cause = exc if isinstance(exc, httpx.TransportError) else (exc.__cause__ or exc.__context__)
        if cause is None or isinstance(cause, (httpx.ConnectError, httpx.ConnectTimeout, OSError)):
            return (f"Cannot reach the server at {url}: is it running? Start one with `hearth serve`, "
                    "or point the demo elsewhere with `hearth demo --url URL`.")
        return f"The connection to the server at {url} broke ({type(cause).__name__}): {cause}"
    if isinstance(exc, openai.APIStatusError):
        try:
            body = exc.response.json()
        except Exception:
            body = exc.body if isinstance(exc.body, dict) else {"error": {"message": exc.message}}
        return status_message(exc.status_code, body, url)
    if isinstance(exc, openai.APIError):  # an error event inside a stream
        body = exc.body if isinstance(exc.body, dict) else {}
        return f"The server reported an error: {body.get('message') or exc.message}"
    return f"Unexpected error ({type(exc).__name__}): {exc}"


async def _raise_for_status(r: httpx.Response, url: str) -> None:
    if r.status_code < 400:
        return
    await r.aread()
    try:
        body = r.json()
    except ValueError:
        body = r.text
    raise DemoError(status_message(r.status_code, body, url), r.status_code)


# ---- clients -----------------------------------------------------------------------------------

def _headers(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


def http_client(url: str, key: str | None, transport: httpx.AsyncBaseTransport | None = None) -> httpx.AsyncClient:
    """An httpx client for hearth's own routes under `url` (.../v1)."""
    return httpx.AsyncClient(base_url=url.rstrip("/"), headers=_headers(key), transport=transport,
                             timeout=httpx.Timeout(_READ_S, connect=_CONNECT_S))


def openai_client(url: str, key: str | None, transport: httpx.AsyncBaseTransport | None = None):
    import openai

    http = httpx.AsyncClient(transport=transport, timeout=httpx.Timeout(_READ_S, connect=_CONNECT_S))
    # a server without keys ignores the header; the client itself insists on some key
    return openai.AsyncOpenAI(base_url=url, api_key=key or "no-key", max_retries=0, http_client=http)


async def probe(url: str, key: str | None, transport: httpx.AsyncBaseTransport | None = None) -> ServerInfo:
    """The chat models of the server (embedding models left out) and whether it has hearth's RAG and agents."""
    try:
        async with http_client(url, key, transport) as http:
            r = await http.get("/models")
            await _raise_for_status(r, url)
            data = r.json().get("data") or []
            models = [m["id"] for m in data if isinstance(m, dict) and m.get("id") and m.get("type") != "embedding"]
            info = ServerInfo(models=models)
            try:  # hearth's extras: a server without them (or with them broken) is still a chat server
                r = await http.get("/rag/indexes")
                if r.status_code == 200:
                    info.rag = True
                    info.indexes = [i["id"] for i in r.json().get("data") or [] if isinstance(i, dict) and "id" in i]
                # an empty run is refused with 400 (or 422) by a server that has the route, 404/405 by one without
                r = await http.post("/agents/runs", json={})
                info.agents = r.status_code in (400, 422)
            except (httpx.HTTPError, ValueError):
                pass
            return info
    except DemoError:
        raise
    except Exception as e:
        raise DemoError(explain(e, url), getattr(e, "status_code", None)) from None


def chat_messages(settings: ChatSettings, conv: list[dict], question: str) -> list[dict]:
    """The messages sent: the system prompt, the earlier turns, the new question."""
    msgs = [{"role": "system", "content": settings.system.strip()}] if settings.system.strip() else []
    msgs += [{"role": m["role"], "content": m["content"]} for m in conv]
    msgs.append({"role": "user", "content": question})
    return msgs


async def answer(url: str, key: str | None, settings: ChatSettings, conv: list[dict], question: str,
                 transport: httpx.AsyncBaseTransport | None = None) -> AsyncIterator[Event]:
    """The events of one answer: text deltas as they stream, citations, reasoning, agent steps, the answer.

    Raises DemoError with a message for the user."""
    try:
        if settings.strategy == "tools":
            async for ev in _agent_run(url, key, settings, chat_messages(settings, conv, question), transport):
                yield ev
        else:
            async for ev in _chat(url, key, settings, chat_messages(settings, conv, question), transport):
                yield ev
    except DemoError:
        raise
    except Exception as e:
        raise DemoError(explain(e, url), getattr(e, "status_code", None)) from None


async def _chat(url: str, key: str | None, s: ChatSettings, messages: list[dict],
                transport: httpx.AsyncBaseTransport | None) -> AsyncIterator[Event]:
    extra: dict[str, Any] = {}
    if s.rag_index:
        extra["rag"] = {"index": s.rag_index, "top_k": s.top_k}
    if s.strategy in ("cot", "self_consistency"):
        extra["reasoning"] = {"strategy": s.strategy, "n": s.n}
    text = []
    async with openai_client(url, key, transport) as client:
        stream = await client.chat.completions.create(
            model=s.model, messages=messages, stream=True, temperature=s.temperature, top_p=s.top_p,
            max_tokens=s.max_tokens, extra_body=extra or None)
        async with stream:
            async for chunk in stream:
                more = chunk.model_extra or {}
                if more.get("citations"):  # hearth: the first chunk, with no choices
                    yield Event("citations", more["citations"])
                for choice in chunk.choices:
                    if choice.delta and choice.delta.content:
                        text.append(choice.delta.content)
                        yield Event("text", choice.delta.content)
                if more.get("reasoning"):  # hearth: the last chunk of a reasoning strategy
                    yield Event("reasoning", more["reasoning"])
    yield Event("answer", "".join(text))


async def _agent_run(url: str, key: str | None, s: ChatSettings, messages: list[dict],
                     transport: httpx.AsyncBaseTransport | None) -> AsyncIterator[Event]:
    body: dict[str, Any] = {"model": s.model, "messages": messages, "strategy": "tools", "tools": s.tools,
                            "stream": True, "temperature": s.temperature, "max_tokens": s.max_tokens}
    if s.rag_index:
        body["rag"] = {"index": s.rag_index, "top_k": s.top_k}
    final = None
    async with http_client(url, key, transport) as http:
        async with http.stream("POST", "/agents/runs", json=body) as r:
            await _raise_for_status(r, url)
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                payload = line[5:].strip()
                if payload == "[DONE]":
                    break
                obj = json.loads(payload)
                if "error" in obj:
                    raise DemoError(f"The agent run failed: {_server_message(obj)[0]}")
                kind = obj.get("object")
                if kind == "agent.run.start" and obj.get("citations"):
                    yield Event("citations", obj["citations"])
                elif kind == "agent.run.step":
                    yield Event("step", obj)
                elif kind == "agent.run":
                    final = obj
    if final is None:
        raise DemoError("The agent run ended without an answer.")
    text = final.get("answer") or ""
    if not text:
        text = f"(no answer: the run stopped with `{final.get('stopped')}`)"
    yield Event("text", text)
    yield Event("answer", text)


async def ingest(url: str, key: str | None, index: str, paths: list[str],
                 transport: httpx.AsyncBaseTransport | None = None) -> tuple[str, dict | None]:
    """Upload files into RAG index `index`: (a one-line summary, the server's report or None)."""
    index = (index or "").strip()
    if not index:
        raise DemoError("Name the index to upload into.")
    docs, refused = [], []
    for p in paths or []:
        path = Path(p)
        fmt = FORMATS.get(path.suffix.lower())
        if fmt is None:
            refused.append(path.name)
            continue
        docs.append({"source": path.name, "format": fmt,
                     "content_base64": base64.b64encode(path.read_bytes()).decode("ascii")})
    note = f" Not uploaded (not txt, md, html or pdf): {', '.join(refused)}." if refused else ""
    if not docs:
        raise DemoError("No file to upload." + note)
    try:
        async with http_client(url, key, transport) as http:
            r = await http.post(f"/rag/indexes/{index}/documents", json={"documents": docs})
            await _raise_for_status(r, url)
            rep = r.json()
    except DemoError:
        raise
    except Exception as e:
        raise DemoError(explain(e, url)) from None
    counts = ", ".join(f"{len(rep.get(k) or [])} {k}" for k in ("added", "replaced", "unchanged", "skipped"))
    skipped = "; ".join(f"{s.get('source')}: {s.get('reason')}" for s in rep.get("skipped") or []
                        if isinstance(s, dict))
    summary = f"Index `{index}` (version {rep.get('version')}): {counts}." + (f" Skipped: {skipped}." if skipped
                                                                             else "") + note
    return summary, rep


# ---- rendering into Gradio chat messages --------------------------------------------------------

_STEP_TITLES = {"thought": "💭 Thought", "action": "🛠 Action", "observation": "👁 Observation", "plan": "🗺 Plan",
                "sample": "🎲 Sampled path", "vote": "🗳 Vote", "score": "📏 Score", "retrieval": "📚 Retrieval",
                "error": "⚠️ Error", "tool_result": "🛠 Tool result"}


def _clip(text: Any, n: int = 1200) -> str:
    text = text if isinstance(text, str) else json.dumps(text, ensure_ascii=False)
    return text if len(text) <= n else text[:n] + " …"


def _tool_call_title(step: dict) -> str:
    data = step.get("data") or {}
    name = data.get("tool") or data.get("name") or "tool"
    args = data.get("arguments")
    if args is None:
        return f"🛠 Tool call: {name}"
    args = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
    return f"🛠 Tool call: {name}({_clip(args, 80)})"


def _vote_title(info: dict) -> str:
    votes = info.get("votes") or {}
    if not votes:
        return f"🧠 Reasoning ({info.get('strategy')})"
    total = sum(votes.values())
    winner = max(votes, key=lambda k: votes[k])
    agreement = info.get("agreement")
    share = f", {agreement:.0%} agreement" if isinstance(agreement, (int, float)) else ""
    return f"🗳 Self-consistency vote: {winner} ({votes[winner]}/{total} paths{share})"


def _reasoning_body(info: dict) -> str:
    lines = []
    votes = info.get("votes") or {}
    if votes:
        lines.append("| answer | votes |\n|---|---|")
        lines += [f"| {a} | {c} |" for a, c in sorted(votes.items(), key=lambda kv: -kv[1])]
        lines.append("")
    for step in info.get("steps") or []:
        if step.get("kind") == "answer":
            continue  # shown as the answer itself
        title = _STEP_TITLES.get(step.get("kind"), step.get("kind", "step"))
        lines.append(f"**{title}**\n\n{_clip(step.get('content', ''))}\n")
    return "\n".join(lines) or "(no steps)"


def _citations_body(cites: list[dict]) -> str:
    out = []
    for i, c in enumerate(cites, 1):
        score = c.get("score")
        score = f", score {score:.2f}" if isinstance(score, (int, float)) else ""
        span = f", chars {c.get('start')}–{c.get('end')}" if c.get("start") is not None else ""
        snippet = " ".join(str(c.get("text") or "").split())
        out.append(f"[{c.get('index', i)}] **{c.get('source')}**{span}{score}: {_clip(snippet, 300)}")
    return "\n\n".join(out)


def thinking(strategy: str, n: int) -> dict:
    """The pending placeholder shown while a reasoning strategy or the tool agent works."""
    what = {"cot": "chain of thought", "self_consistency": f"self-consistency over {n} paths",
            "tools": "tool-calling agent"}.get(strategy, strategy)
    return {"role": "assistant", "content": "", "metadata": {"title": f"🧠 Working ({what}) …",
                                                             "status": "pending"}}


def render(history: list[dict], event: Event) -> list[dict]:
    """The chat messages after `event`: text goes into the last plain assistant message, steps, reasoning and
    citations into collapsible ones (messages with metadata.title); the pending placeholder stays last."""
    h = list(history)
    if event.kind == "text":
        h = _done_placeholder(h)
        last = h[-1] if h else None
        if last is not None and last["role"] == "assistant" and not (last.get("metadata") or {}).get("title"):
            h[-1] = {**last, "content": _text(last.get("content")) + event.data}
        else:
            h.append({"role": "assistant", "content": event.data})
    elif event.kind == "citations":
        h = _before_placeholder(h, {"role": "assistant", "content": _citations_body(event.data),
                                    "metadata": {"title": f"📚 Sources ({len(event.data)})", "status": "done"}})
    elif event.kind == "reasoning":
        h = _done_placeholder(h)
        msg = {"role": "assistant", "content": _reasoning_body(event.data),
               "metadata": {"title": _vote_title(event.data), "status": "done"}}
        last = h[-1] if h else None
        if last is not None and last["role"] == "assistant" and not (last.get("metadata") or {}).get("title"):
            h.insert(len(h) - 1, msg)  # the reasoning reads before the answer it led to
        else:
            h.append(msg)
    elif event.kind == "step":
        h = _render_step(h, event.data)
    elif event.kind == "answer":
        h = _done_placeholder(h)
    return h


def _is_placeholder(m: dict) -> bool:
    meta = m.get("metadata") or {}
    return meta.get("status") == "pending" and str(meta.get("title", "")).startswith("🧠 Working")


def _before_placeholder(h: list[dict], msg: dict) -> list[dict]:
    if h and _is_placeholder(h[-1]):
        return h[:-1] + [msg, h[-1]]
    return h + [msg]


def _done_placeholder(h: list[dict]) -> list[dict]:
    """Drop the pending placeholder (thinking()) once real content arrives."""
    return [m for m in h if not _is_placeholder(m)]


def _render_step(h: list[dict], step: dict) -> list[dict]:
    kind = step.get("kind")
    if kind == "answer":
        return h  # the final answer arrives as text
    if kind == "tool_call":
        data = step.get("data") or {}
        args = data.get("arguments")
        body = f"```json\n{_clip(args if args is not None else step.get('content', ''))}\n```"
        return _before_placeholder(h, {"role": "assistant", "content": body,
                                       "metadata": {"title": _tool_call_title(step), "status": "pending"}})
    if kind == "tool_result":
        for i in range(len(h) - 1, -1, -1):  # fold the result into its call
            meta = h[i].get("metadata") or {}
            if meta.get("status") == "pending" and str(meta.get("title", "")).startswith("🛠 Tool call"):
                result = f"\n\n**Result:** {_clip(step.get('content'))}"
                h[i] = {**h[i], "content": _text(h[i].get("content")) + result, "metadata": {**meta, "status": "done"}}
                return h
    title = _STEP_TITLES.get(kind, f"• {kind}")
    return _before_placeholder(h, {"role": "assistant", "content": _clip(step.get("content") or step.get("data") or ""),
                                   "metadata": {"title": title, "status": "done"}})


def _text(content: Any) -> str:
    """The text of a chat message's content: a string, or Gradio's list of {"type": "text", "text"} parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text") or "")
    if isinstance(content, (list, tuple)):
        return "".join(_text(p) for p in content)
    return "" if content is None else str(content)
