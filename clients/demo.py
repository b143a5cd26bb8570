"""The Gradio chat demo: a browser UI for any OpenAI-compatible server, hearth's extras when it has them.

    hearth demo --url http://127.0.0.1:8000/v1 --api-key KEY        # http://127.0.0.1:7860
    hearth serve --no-ray --demo                                     # the API, and the demo at /demo

    demo = build_demo("http://127.0.0.1:8000/v1", api_key)           # gr.Blocks; everything over HTTP
    mount_demo(fastapi_app, "http://127.0.0.1:8000/v1", api_key=None) # under /demo of an existing app

Streamed answers, multi-turn history, a model picker fed by /v1/models (embedding models left out),
system prompt and sampling controls; with hearth's routes also document upload into a RAG index
(answers cite their sources), the tool-calling agent (each tool call a collapsible step) and the
CoT / self-consistency strategies (with the vote). The page probes the server when it loads (and on
Refresh) and hides what the server lacks. The HTTP side lives in demo_client.py.
"""

from __future__ import annotations

import os
import time
from typing import Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from a local demo

import gradio as gr  # noqa: E402

from .demo_client import (  # noqa: E402
    ChatSettings,
    DemoError,
    Event,
    ServerInfo,
    answer,
    explain,
    ingest,
    probe,
    render,
    thinking,
)

DEFAULT_URL = "http://127.0.0.1:8000/v1"
_STRATEGY_CHOICES = [("Direct", "direct"), ("Tools (agent)", "tools"), ("Chain of thought", "cot"),
                     ("Self-consistency", "self_consistency")]


def theme() -> gr.themes.Base:
    """The default look with system fonts: the page loads nothing from outside the server."""
    return gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                             font_mono=["ui-monospace", "SFMono-Regular", "monospace"])


def build_demo(url: str = DEFAULT_URL, api_key: str | None = None) -> gr.Blocks:
    """The chat UI for the server at `url` (…/v1). `api_key` stays on the server side; a key typed into the
    page's Settings replaces it for that browser session (with api_key None every user brings their own)."""
    url = url.rstrip("/")

    def key_of(typed: str | None) -> str | None:
        return (typed or "").strip() or api_key

    async def on_probe(typed_key: str, current_model: str | None):
        try:
            info = await probe(url, key_of(typed_key))
        except DemoError as e:
            if e.status == 401 and not key_of(typed_key):  # the usual first visit to a server with keys
                msg = f"🔑 The server at `{url}` needs an API key: enter it under Settings below."
            else:
                msg = f"⚠️ {e}"
                gr.Warning(str(e))
            return gr.update(choices=[], value=None), msg, gr.update(), gr.update(visible=False), gr.update()
        return _probe_updates(info, url, current_model)

    async def respond(question: str, history: list, conv: list, typed_key: str, model: str | None, system: str,
                      temperature: float, top_p: float, max_tokens: float, strategy: str, n: float,
                      use_rag: bool, index: str | None, top_k: float, tools: str):
        question = (question or "").strip()
        if not question:
            yield history, conv, "", gr.update()
            return
        history = list(history or []) + [{"role": "user", "content": question}]
        try:
            settings = ChatSettings(
                model=model or "", system=system or "", temperature=float(temperature), top_p=float(top_p),
                max_tokens=int(max_tokens), strategy=strategy or "direct", n=int(n),
                rag_index=(index or "").strip() or None if use_rag else None, top_k=int(top_k),
                tools=[t.strip() for t in tools.split(",") if t.strip()] if (tools or "").strip() else None)
            if use_rag and not settings.rag_index:
                raise DemoError("Name the RAG index to answer from (or untick “Answer from documents”).")
        except DemoError as e:
            yield _failed(history, str(e)), conv, question, "⚠️ not sent"
            return
        if settings.strategy != "direct":
            history.append(thinking(settings.strategy, settings.n))
        yield history, conv, "", f"⏳ {settings.model} is answering …"
        final, t0, chunks = None, time.monotonic(), 0
        try:
            async for event in answer(url, key_of(typed_key), settings, conv, question):
                history = render(history, event)
                chunks += event.kind == "text"
                if event.kind == "answer":
                    final = event.data
                yield history, conv, "", gr.update()
        except Exception as e:  # a message in the chat, never a traceback in the page
            msg = str(e) if isinstance(e, DemoError) else explain(e, url)
            yield _failed(render(history, _answer_done()), msg), conv, question, "⚠️ failed"
            return
        conv = list(conv) + [{"role": "user", "content": question}, {"role": "assistant", "content": final or ""}]
        yield history, conv, "", f"✓ {settings.model} · {time.monotonic() - t0:.1f} s · {chunks} chunk(s)"

    async def on_upload(files: list | None, index: str | None, typed_key: str):
        paths = [f if isinstance(f, str) else getattr(f, "name", str(f)) for f in files or []]
        try:
            summary, _ = await ingest(url, key_of(typed_key), index or "", paths)
        except DemoError as e:
            gr.Warning(str(e))
            return f"⚠️ {e}", gr.update()
        try:
            info = await probe(url, key_of(typed_key))
            choices = gr.update(choices=sorted(set(info.indexes) | {index}), value=index)
        except DemoError:
            choices = gr.update()
        return f"✅ {summary}", choices

    with gr.Blocks(title="hearth chat", analytics_enabled=False) as demo:
        conv = gr.State([])  # the turns sent to the server: plain user/assistant text, no steps or notices
        gr.Markdown("## hearth chat")
        status = gr.Markdown(f"Connecting to `{url}` …", elem_id="status")
        with gr.Row():
            with gr.Column(scale=3):
                chatbot = gr.Chatbot(elem_id="chatbot", label="Chat", height=520, buttons=["copy"])
                with gr.Row():
                    box = gr.Textbox(placeholder="Ask something, then press Enter", show_label=False, scale=6,
                                     elem_id="prompt", autofocus=True)
                    send = gr.Button("Send", variant="primary", scale=1, elem_id="send")
                with gr.Row():
                    stop = gr.Button("Stop", size="sm", elem_id="stop")
                    clear = gr.Button("Clear", size="sm", elem_id="clear")
                    answer_meta = gr.Markdown(elem_id="answer_meta")
            with gr.Column(scale=2):
                with gr.Row():
                    model = gr.Dropdown(label="Model", choices=[], value=None, scale=4, elem_id="model")
                    refresh = gr.Button("Refresh", size="sm", scale=1, elem_id="refresh")
                system = gr.Textbox("You are a helpful assistant.", label="System prompt", lines=2, elem_id="system")
                strategy = gr.Radio(_STRATEGY_CHOICES, value="direct", label="Answer with", elem_id="strategy")
                n_paths = gr.Slider(1, 16, value=5, step=1, label="Self-consistency paths", visible=False,
                                    elem_id="n_paths")
                tools = gr.Textbox(label="Tools (comma separated; empty: every tool of the server)",
                                   placeholder="calculator", visible=False, elem_id="tools")
                with gr.Accordion("Sampling", open=False, elem_id="sampling"):
                    temperature = gr.Slider(0.0, 2.0, value=0.7, step=0.05, label="Temperature", elem_id="temperature")
                    top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="Top-p", elem_id="top_p")
                    max_tokens = gr.Slider(16, 4096, value=512, step=16, label="Max tokens", elem_id="max_tokens")
                with gr.Accordion("Documents (RAG)", open=False, visible=False, elem_id="rag") as rag_box:
                    use_rag = gr.Checkbox(label="Answer from documents (with citations)", value=False, elem_id="use_rag")
                    index = gr.Dropdown(label="Index", choices=["demo"], value="demo", allow_custom_value=True)
                    top_k = gr.Slider(1, 12, value=4, step=1, label="Passages (top k)")
                    files = gr.File(label="Upload txt, md, html or pdf", file_count="multiple",
                                    file_types=[".txt", ".md", ".markdown", ".html", ".htm", ".pdf"], elem_id="files")
                    upload = gr.Button("Add to index", size="sm", elem_id="upload")
                    upload_status = gr.Markdown(elem_id="upload_status")
                with gr.Accordion("Settings", open=False, elem_id="settings"):
                    key = gr.Textbox(label="API key", type="password", elem_id="api_key",
                                     placeholder="(the demo's own key)" if api_key else "if the server wants one")
                    gr.Markdown(f"Server: `{url}`")

        probe_io = dict(inputs=[key, model], outputs=[model, status, strategy, rag_box, index])
        demo.load(on_probe, **probe_io)
        refresh.click(on_probe, **probe_io)
        key.submit(on_probe, **probe_io)
        strategy.change(lambda s: (gr.update(visible=s == "self_consistency"), gr.update(visible=s == "tools")),
                        inputs=[strategy], outputs=[n_paths, tools])
        ask_io = dict(inputs=[box, chatbot, conv, key, model, system, temperature, top_p, max_tokens, strategy,
                              n_paths, use_rag, index, top_k, tools], outputs=[chatbot, conv, box, answer_meta])
        asked = [box.submit(respond, **ask_io), send.click(respond, **ask_io)]
        stop.click(lambda: "⏹ stopped", outputs=[answer_meta], cancels=asked)
        clear.click(lambda: ([], [], ""), outputs=[chatbot, conv, answer_meta], cancels=asked)
        upload.click(on_upload, inputs=[files, index, key], outputs=[upload_status, index])
    demo.queue(default_concurrency_limit=8)
    return demo


def _probe_updates(info: ServerInfo, url: str, current_model: str | None) -> tuple:
    choices = list(info.models)
    value = current_model if current_model in choices else (choices[0] if choices else None)
    strategies = [c for c in _STRATEGY_CHOICES if c[1] == "direct" or info.agents]
    note = info.note(url) if choices else f"⚠️ The server at `{url}` lists no chat model."
    indexes = sorted(set(info.indexes) | {"demo"})
    return (gr.update(choices=choices, value=value), note, gr.update(choices=strategies),
            gr.update(visible=info.rag), gr.update(choices=indexes))


def _failed(history: list, message: str) -> list:
    gr.Warning(message)
    return list(history) + [{"role": "assistant", "content": f"⚠️ {message}"}]


def _answer_done() -> Event:
    return Event("answer", None)  # clears a pending placeholder


# ---- serving it ---------------------------------------------------------------------------------

def launch_demo(url: str = DEFAULT_URL, api_key: str | None = None, host: str = "127.0.0.1", port: int = 7860,
                block: bool = True) -> gr.Blocks:
    """`hearth demo`: serve the UI on host:port (port 0: a free one); with block False it runs in a thread."""
    demo = build_demo(url, api_key)
    demo.launch(server_name=host, server_port=port or _free_port(host), prevent_thread_lock=not block,
                theme=theme(), quiet=not block, footer_links=["api", "settings"])
    return demo


def mount_demo(app: Any, base_url: str, api_key: str | None = None, path: str = "/demo") -> gr.Blocks:
    """Mount the UI on a FastAPI app at `path` (`hearth serve --demo`), talking to `base_url` (…/v1).

    Pass api_key None when the server has keys: the page is open to whoever reaches the server, so
    each user types their own key into Settings. The Gradio queue starts with the app's lifespan, or on
    the first request under `path` when the server runs without one (uvicorn lifespan="off")."""
    demo = build_demo(base_url, api_key)
    gr.mount_gradio_app(app, demo, path=path, theme=theme(), footer_links=["api", "settings"])
    for route in app.router.routes:
        if getattr(route, "path", None) == path.rstrip("/") and hasattr(route, "app"):
            route.app = _StartQueue(route.app, demo)
    return demo


class _StartQueue:
    """ASGI wrapper: start the Blocks' queue on the first request if no lifespan started it."""

    def __init__(self, app: Any, blocks: gr.Blocks):
        self.app, self.blocks = app, blocks

    async def __call__(self, scope, receive, send):
        if scope["type"] in ("http", "websocket") and not self.blocks.is_running:
            self.blocks.is_running = True  # set first: requests racing in here start it once
            self.blocks.run_startup_events()
            await self.blocks.run_extra_startup_events()
        await self.app(scope, receive, send)


def _free_port(host: str) -> int:
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def loopback_url(host: str, port: int) -> str:
    """The …/v1 URL a demo in the server's own process uses to reach it (0.0.0.0 binds answer on loopback)."""
    if ":" in host:
        return f"http://[::1]:{port}/v1"
    return f"http://127.0.0.1:{port}/v1"
