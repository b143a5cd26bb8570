"""Does the model call a tool when it should, and only then? `tool_choice: auto` on a small prompt set.

    python bench/tool_decisions.py --base-url http://127.0.0.1:8000/v1 --json tool_decisions.json
    python bench/tool_decisions.py --base-url http://127.0.0.1:8080/v1 --label llama-server   # llama-server --jinja
    python bench/tool_decisions.py --llama-cpp-python MODEL.gguf                              # its own chat handler

Twelve prompts, two tools (get_weather, get_current_time): six need one call to a named tool with a
named city, six need none (a greeting, a fact, code, arithmetic, thanks, a definition). A decision is
right when the reply's tool_calls are exactly the expected one (name and city) or, for the other six,
empty. Separately it counts the replies whose *text* holds a call in any shape (`<tool_call>` tags, a
```json fence, a bare object): a call the model meant but the server did not return as tool_calls.
Temperature 0, max_tokens 64, one request at a time; ~2 minutes for the 1.5B on a busy 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from typing import Any

TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Get the current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "the city name"}},
                       "required": ["city"]}}},
    {"type": "function", "function": {
        "name": "get_current_time", "description": "Get the current local time in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "the city name"}},
                       "required": ["city"]}}},
]

# (prompt, expected (tool, city) or None)
PROMPTS: list[tuple[str, tuple[str, str] | None]] = [
    ("What's the weather like in Paris right now?", ("get_weather", "paris")),
    ("Is it raining in London at the moment?", ("get_weather", "london")),
    ("How hot is it in Tokyo today?", ("get_weather", "tokyo")),
    ("What time is it in New York right now?", ("get_current_time", "new york")),
    ("Should I bring an umbrella in Berlin today?", ("get_weather", "berlin")),
    ("Tell me the current local time in Sydney.", ("get_current_time", "sydney")),
    ("Hi! How are you?", None),
    ("What is the capital of France?", None),
    ("Write a Python function that reverses a string.", None),
    ("What is 12 times 11?", None),
    ("Thanks, that's all for today!", None),
    ("Explain what a hash map is in one sentence.", None),
]

_CALL_IN_TEXT = re.compile(r'\{\s*"name"\s*:\s*"(get_weather|get_current_time)"')


def right(calls: list[tuple[str, dict]], expected: tuple[str, str] | None) -> bool:
    if expected is None:
        return not calls
    return (len(calls) == 1 and calls[0][0] == expected[0]
            and str(calls[0][1].get("city", "")).lower().strip() == expected[1])


def _args(text: str) -> dict:
    try:
        value = json.loads(text or "{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def ask_server(base_url: str, model: str | None, api_key: str, max_tokens: int) -> list[dict[str, Any]]:
    import openai

    client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=600)
    model = model or client.models.list().data[0].id
    rows = []
    for prompt, expected in PROMPTS:
        t0 = time.perf_counter()
        r = client.chat.completions.create(model=model, temperature=0, max_tokens=max_tokens, tools=TOOLS,
                                           tool_choice="auto", messages=[{"role": "user", "content": prompt}])
        msg = r.choices[0].message
        calls = [(c.function.name, _args(c.function.arguments)) for c in msg.tool_calls or []]
        rows.append(_row(prompt, expected, calls, msg.content or "", r.choices[0].finish_reason,
                         time.perf_counter() - t0))
    return rows


def ask_llama_cpp_python(gguf: str, max_tokens: int, threads: int | None) -> list[dict[str, Any]]:
    """llama-cpp-python's own chat path: the GGUF's template (its Jinja2 formatter), tools passed to it."""
    import llama_cpp

    llm = llama_cpp.Llama(gguf, n_ctx=2048, n_threads=threads, verbose=False)
    rows = []
    for prompt, expected in PROMPTS:
        t0 = time.perf_counter()
        r = llm.create_chat_completion(messages=[{"role": "user", "content": prompt}], tools=TOOLS,
                                       tool_choice="auto", temperature=0, max_tokens=max_tokens)
        msg = r["choices"][0]["message"]
        calls = [(c["function"]["name"], _args(c["function"]["arguments"])) for c in msg.get("tool_calls") or []]
        rows.append(_row(prompt, expected, calls, msg.get("content") or "", r["choices"][0]["finish_reason"],
                         time.perf_counter() - t0))
    return rows


def _row(prompt, expected, calls, content, finish, seconds) -> dict[str, Any]:
    r = {"prompt": prompt, "expected": list(expected) if expected else None,
         "calls": [[n, a] for n, a in calls], "right": right(calls, expected),
         "call_in_text": bool(_CALL_IN_TEXT.search(content)), "content": content[:300],
         "finish_reason": finish, "seconds": round(seconds, 1)}
    got = ", ".join(f"{n}({a.get('city', '')})" for n, a in calls) or "-"
    text = content.replace("\n", " ")[:60]
    print(f"{'ok ' if r['right'] else 'BAD'} {prompt[:44]:44} calls: {got:28} "
          f"{'[call in text] ' if r['call_in_text'] else ''}{text!r} ({finish}, {r['seconds']}s)", flush=True)
    return r


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    need = [r for r in rows if r["expected"]]
    none = [r for r in rows if not r["expected"]]
    return {"right": sum(r["right"] for r in rows), "of": len(rows),
            "right_when_a_tool_is_needed": f"{sum(r['right'] for r in need)}/{len(need)}",
            "right_when_none_is_needed": f"{sum(r['right'] for r in none)}/{len(none)}",
            "calls_left_in_text": sum(r["call_in_text"] for r in rows)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--base-url", help="an OpenAI-compatible server's /v1 URL (hearth serve, llama-server)")
    src.add_argument("--llama-cpp-python", metavar="GGUF", help="run llama-cpp-python's chat handler in process")
    p.add_argument("--model", help="model name to ask for (default: the server's first)")
    p.add_argument("--api-key", default="none")
    p.add_argument("--label", default=None, help="name for this column in the output")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", help="write the rows and the summary here")
    args = p.parse_args(argv)
    if args.base_url:
        rows = ask_server(args.base_url, args.model, args.api_key, args.max_tokens)
    else:
        rows = ask_llama_cpp_python(args.llama_cpp_python, args.max_tokens, args.threads)
    label = args.label or ("llama-cpp-python" if args.llama_cpp_python else args.base_url)
    s = summary(rows)
    print(f"{label}: {s['right']}/{s['of']} right (tool needed {s['right_when_a_tool_is_needed']}, "
          f"none needed {s['right_when_none_is_needed']}); calls left in text: {s['calls_left_in_text']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"label": label, "summary": s, "rows": rows}, f, indent=1, ensure_ascii=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
