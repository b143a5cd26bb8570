"""Structured output on the default model: does constrained JSON end, valid, within max_tokens?

    hearth bench structured --json bench/structured.json      # every variant: ~10 min on a busy 2-core CPU
    hearth bench structured --variants default,compact --seeds 1,2,3 --max-tokens 160
    python bench/structured.py --cases joke,person --methods json_schema

LangChain-style prompts (`with_structured_output`: a Joke with setup and punchline, one with an optional
rating, a Person with a list of hobbies, an Order with a nested customer, an array of items and an enum)
are sent two ways, as LangChain's two methods send them:

    json_schema  response_format {"type": "json_schema", "json_schema": {name, description, schema}}
                 (the schema is not in the prompt, and it is not strict)
    tool         the schema as one function's parameters, tool_choice naming it

at temperature 0 and at temperature 1 with each seed. Every output is scored: valid (finished, parses,
validates against the schema), cut at max_tokens (finish_reason "length"), completion tokens.

Variants (--variants):

    default      hearth's server as it ships (runtime.guided.JSON_STYLE)
    compact      hearth with compact JSON only (no whitespace anywhere), the grammar before issue 16
    newlines     hearth with the line-broken style too (runtime.guided.JSON_STYLES["pretty"]: a newline and an
                 indent of at most 20 in a gap)
    server-ws    hearth with llama-server's whitespace rule in every gap (` ` or 1-2 newlines + 20 indent)
    V+no-hint    hearth variant V without the system message that tells the model the schema (serve
                 adds one for response_format; llama-server adds none)
    llama.cpp    llama-cpp-python on the same GGUF with llama.cpp's own grammar engine and JSON-schema
                 converter, its whitespace and string rules set to llama-server's; the same sampler
                 (temperature only: no top-k, top-p, min-p); for `tool` the grammar is the parameters'
                 schema and the tools go to the chat template, as llama-cpp-python does (the default
                 model's template ignores them, so its two rows are the same requests)

hearth's variants run its OpenAI server in this process (no Ray, llama.cpp backend, --threads), one
request at a time, through the openai client. Rates move by a few runs in 20 between two runs of the
same grammar (seeded sampling is not yet repeatable with the prefix cache on, issue 16): compare
variants over many seeds, or read the `tool` rows, whose grammar no variant changes, as the noise.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import shlex
import statistics
import sys
import time
from contextlib import contextmanager
from typing import Any, Iterator

from hearth.clients.cmd_bench import output_problem, write_json

_T0 = time.perf_counter()

JOKE = {"title": "Joke", "description": "Joke to tell user.", "type": "object",
        "properties": {"setup": {"description": "question to set up a joke", "type": "string"},
                       "punchline": {"description": "answer to resolve the joke", "type": "string"}},
        "required": ["setup", "punchline"]}
JOKE_RATED = {"title": "Joke", "description": "Joke to tell user.", "type": "object",
              "properties": {"setup": {"description": "question to set up a joke", "type": "string"},
                             "punchline": {"description": "answer to resolve the joke", "type": "string"},
                             "rating": {"anyOf": [{"type": "integer"}, {"type": "null"}], "default": None,
                                        "description": "how funny the joke is, from 1 to 10"}},
              "required": ["setup", "punchline"]}
PERSON = {"title": "Person", "description": "A person described in the text.", "type": "object",
          "properties": {"name": {"type": "string", "description": "the person's name"},
                         "age": {"type": "integer", "description": "age in years"},
                         "hobbies": {"type": "array", "items": {"type": "string"},
                                     "description": "the person's hobbies"}},
          "required": ["name", "age", "hobbies"]}
ORDER = {"title": "Order", "description": "An order placed in a shop.", "type": "object",
         "properties": {
             "customer": {"type": "object", "properties": {"name": {"type": "string"}, "city": {"type": "string"}},
                          "required": ["name", "city"]},
             "items": {"type": "array", "description": "what was ordered",
                       "items": {"type": "object", "properties": {"product": {"type": "string"},
                                                                  "quantity": {"type": "integer"},
                                                                  "price": {"type": "number"}},
                                 "required": ["product", "quantity", "price"]}},
             "status": {"enum": ["pending", "shipped", "delivered"]}},
         "required": ["customer", "items", "status"]}

# name -> (user message, schema)
CASES = {
    "joke": ("Tell me a joke about cats.", JOKE),
    "joke_rated": ("Tell me a joke about dogs, and rate it.", JOKE_RATED),
    "person": ("Anna is 31 and lives in Lisbon. She likes surfing and chess. Extract her details.", PERSON),
    "order": ("Tom from Oslo ordered two mugs at 4.50 each and one teapot at 20; it has shipped. "
              "Record the order.", ORDER),
}
METHODS = ("json_schema", "tool")
VARIANTS = ("default", "compact", "newlines", "server-ws", "llama.cpp")
MODIFIERS = ("no-hint",)
"""A hearth variant may end in `+no-hint`: no system message with the schema (llama-server adds none)."""
# llama-server's whitespace between JSON tokens (its json-schema-to-grammar `space` rule)
SERVER_WHITESPACE = r"( |\n{1,2}[ \t]{0,20})?"
SERVER_SPACE_GBNF = 'space ::= | " " | "\\n"{1,2} [ \\t]{0,20}'
SERVER_CHAR_GBNF = r'char ::= [^"\\\x7F\x00-\x1F] | [\\] (["\\bfnrt] | "u" [0-9a-fA-F]{4})'


def _say(msg: str) -> None:
    print(f"[bench structured {time.perf_counter() - _T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def score(content: str | None, finish: str | None, tokens: int, schema: dict, seconds: float) -> dict[str, Any]:
    """One output scored: valid (finished, parses, validates), cut (length), tokens, whitespace used."""
    import jsonschema

    text = content or ""
    valid, error = False, None
    if finish == "length":
        error = "cut at max_tokens"
    else:
        try:
            jsonschema.validate(json.loads(text), schema)
            valid = True
        except (ValueError, jsonschema.ValidationError) as e:
            error = f"{type(e).__name__}: {str(e)[:160]}"
    return {"valid": valid, "length": finish == "length", "finish_reason": finish, "tokens": tokens,
            "newlines": text.count("\n"), "seconds": round(seconds, 2), "error": error, "text": text[:600]}


# ----------------------------------------------------------------------------- hearth


@contextmanager
def hearth_server(model_path: str, threads: int, variant: str) -> Iterator[Any]:
    """hearth's server in this process with the JSON whitespace of `variant`; yields an openai client."""
    import openai

    from hearth.runtime import guided
    from hearth.serve import chat

    style, *modifiers = variant.split("+")
    hint = chat._with_format_hint
    if "no-hint" in modifiers:
        chat._with_format_hint = lambda messages, guided: messages
    from hearth.serve.config import ModelConfig, ServeConfig
    from hearth.serve.local import in_background

    saved = dict(guided.JSON_STYLES), guided.JSON_STYLE
    if style == "compact":
        guided.JSON_STYLE = ("compact",)
    elif style == "newlines":
        guided.JSON_STYLE = ("compact", "spaced", "pretty")
    elif style == "server-ws":
        guided.JSON_STYLES["server-ws"] = {"whitespace_flexible": False, "whitespace_pattern": SERVER_WHITESPACE}
        guided.JSON_STYLE = ("server-ws",)
    key = "sk-bench-" + secrets.token_hex(8)
    config = ServeConfig(models=[ModelConfig(name="model", path=model_path, context_length=2048,
                                             backend_options={"n_threads": threads})],
                         embeddings=[], host="127.0.0.1", port=0, api_keys=[key], request_timeout_s=600,
                         drain_timeout_s=1)
    try:
        with in_background(config, timeout_s=600) as srv:
            client = openai.OpenAI(base_url=srv.url + "/v1", api_key=key, max_retries=0, timeout=600)
            try:
                yield client
            finally:
                client.close()
    finally:
        chat._with_format_hint = hint
        guided.JSON_STYLES.clear()
        guided.JSON_STYLES.update(saved[0])
        guided.JSON_STYLE = saved[1]


def hearth_one(client: Any, case: str, method: str, temperature: float, seed: int | None,
               max_tokens: int) -> dict[str, Any]:
    message, schema = CASES[case]
    kw: dict[str, Any] = {"model": "model", "messages": [{"role": "user", "content": message}],
                          "temperature": temperature, "max_tokens": max_tokens}
    if seed is not None:
        kw["seed"] = seed
    name = schema["title"]
    params = {k: v for k, v in schema.items() if k not in ("title", "description")}
    if method == "json_schema":
        kw["response_format"] = {"type": "json_schema", "json_schema": {
            "name": name, "description": schema["description"], "schema": params}}
    else:
        kw["tools"] = [{"type": "function", "function": {"name": name, "description": schema["description"],
                                                         "parameters": params}}]
        kw["tool_choice"] = {"type": "function", "function": {"name": name}}
        kw["parallel_tool_calls"] = False
    start = time.perf_counter()
    r = client.chat.completions.create(**kw)
    ch = r.choices[0]
    content = ch.message.content
    finish = ch.finish_reason
    if method == "tool":
        calls = ch.message.tool_calls or []
        content = calls[0].function.arguments if calls else content
        finish = "stop" if finish == "tool_calls" and calls else finish
    return score(content, finish, r.usage.completion_tokens, schema, time.perf_counter() - start)


# ----------------------------------------------------------------------------- llama.cpp


def server_gbnf(schema: dict) -> str:
    """llama.cpp's GBNF for `schema` (llama-cpp-python's converter) with llama-server's whitespace and
    string characters (its C++ converter allows 1-2 newlines and an indent of 20, no control chars)."""
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    lines = []
    for line in json_schema_to_gbnf(json.dumps(schema)).splitlines():
        if line.startswith("space ::="):
            line = SERVER_SPACE_GBNF
        elif line.startswith("char ::="):
            line = SERVER_CHAR_GBNF
        lines.append(line)
    return "\n".join(lines)


def llamacpp_one(llm: Any, case: str, method: str, temperature: float, seed: int | None,
                 max_tokens: int) -> dict[str, Any]:
    from llama_cpp.llama_grammar import LlamaGrammar

    message, schema = CASES[case]
    params = {k: v for k, v in schema.items() if k not in ("title", "description")}
    kw: dict[str, Any] = {}
    if method == "tool":
        kw["tools"] = [{"type": "function", "function": {"name": schema["title"],
                                                         "description": schema["description"],
                                                         "parameters": params}}]
    start = time.perf_counter()
    r = llm.create_chat_completion([{"role": "user", "content": message}],
                                   grammar=LlamaGrammar.from_string(server_gbnf(params), verbose=False),
                                   temperature=temperature, seed=0 if seed is None else seed, max_tokens=max_tokens,
                                   top_k=0, top_p=1.0, min_p=0.0, repeat_penalty=1.0, **kw)
    ch = r["choices"][0]
    return score(ch["message"]["content"], ch["finish_reason"], r["usage"]["completion_tokens"], schema,
                 time.perf_counter() - start)


@contextmanager
def llamacpp_model(model_path: str, threads: int) -> Iterator[Any]:
    from llama_cpp import Llama

    llm = Llama(model_path, n_ctx=2048, n_threads=threads, verbose=False)
    try:
        yield llm
    finally:
        llm.close()


# ----------------------------------------------------------------------------- the run


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    n = len(rows)
    return {"n": n, "valid": sum(r["valid"] for r in rows) / n if n else None,
            "length": sum(r["length"] for r in rows) / n if n else None,
            "tokens_median": statistics.median(r["tokens"] for r in rows) if n else None,
            "tokens_total": sum(r["tokens"] for r in rows)}


def format_report(results: dict[str, Any]) -> str:
    lines = [f"{'variant':<18} {'method':<12} {'runs':>4} {'valid':>6} {'cut':>6} {'tokens (median)':>16} "
             f"{'tokens (all)':>13}   valid per case"]
    for variant, by_method in results["variants"].items():
        for method, block in by_method.items():
            s = block["summary"]
            per_case = " ".join(f"{c}:{v['valid_count']}/{v['n']}" for c, v in block["cases"].items())
            lines.append(f"{variant:<18} {method:<12} {s['n']:>4} {s['valid']:>6.0%} {s['length']:>6.0%} "
                         f"{s['tokens_median']:>16} {s['tokens_total']:>13}   {per_case}")
    lines.append(f"Command: {results['meta']['command']}")
    return "\n".join(lines)


def run_variant(variant: str, args: argparse.Namespace, model_path: str) -> dict[str, Any]:
    runs = [(0.0, None)] + [(1.0, s) for s in args.seeds]
    if variant == "llama.cpp":
        ctx, one = llamacpp_model(model_path, args.threads), llamacpp_one
    else:
        ctx, one = hearth_server(model_path, args.threads, variant), hearth_one
    out: dict[str, Any] = {}
    with ctx as handle:
        for method in args.methods:
            rows_all, cases = [], {}
            for case in args.cases:
                rows = []
                for temperature, seed in runs:
                    r = one(handle, case, method, temperature, seed, args.max_tokens)
                    r.update(case=case, temperature=temperature, seed=seed)
                    _say(f"{variant} {method} {case} t={temperature} seed={seed}: "
                         f"{'valid' if r['valid'] else r['error']} ({r['tokens']} tokens)")
                    rows.append(r)
                cases[case] = {"n": len(rows), "valid_count": sum(x["valid"] for x in rows), "runs": rows}
                rows_all += rows
            out[method] = {"summary": summary(rows_all), "cases": cases}
    return out


def _csv(choices: tuple[str, ...] | list[str], what: str, modifiers: tuple[str, ...] = ()):
    def known(item: str) -> bool:
        base, *mods = item.split("+")
        return base in choices and all(m in modifiers for m in mods) and not (mods and base == "llama.cpp")

    def parse(text: str) -> list[str]:
        items = [x.strip() for x in text.split(",") if x.strip()]
        bad = [x for x in items if not known(x)]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"{what}: {', '.join(bad) or 'none given'}; choose from "
                                             f"{', '.join(choices)}")
        return items
    return parse


def _seeds(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds takes comma-separated integers, not {text!r}") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", metavar="PATH", default=None, help="write every output and the summary to this file")
    p.add_argument("--variants", type=_csv(VARIANTS, "unknown variant", MODIFIERS), default=list(VARIANTS),
                   help=f"comma-separated subset of {','.join(VARIANTS)}, a hearth one may end in +no-hint "
                        "(default: all, as they are)")
    p.add_argument("--methods", type=_csv(METHODS, "unknown method"), default=list(METHODS),
                   help=f"comma-separated subset of {','.join(METHODS)} (default: both)")
    p.add_argument("--cases", type=_csv(tuple(CASES), "unknown case"), default=list(CASES),
                   help=f"comma-separated subset of {','.join(CASES)} (default: all)")
    p.add_argument("--seeds", type=_seeds, default=[1, 2],
                   help="seeds of the temperature-1 runs, beside one at temperature 0 (default 1,2)")
    p.add_argument("--max-tokens", type=int, default=160, help="max_tokens of every request (default 160)")
    p.add_argument("--threads", type=int, default=2, help="llama.cpp threads (default 2)")
    p.add_argument("--model-path", default=None, help="a GGUF file (default: the bundled default model)")


def command_line(args: argparse.Namespace) -> str:
    parts = ["hearth", "bench", "structured"]
    for key, default in (("variants", list(VARIANTS)), ("methods", list(METHODS)), ("cases", list(CASES)),
                         ("seeds", [1, 2])):
        v = getattr(args, key)
        if v != default:
            parts += ["--" + key, ",".join(map(str, v))]
    for key, default in (("max_tokens", 160), ("threads", 2), ("model_path", None), ("json", None)):
        v = getattr(args, key)
        if v != default:
            parts += ["--" + key.replace("_", "-"), str(v)]
    return " ".join(shlex.quote(x) for x in parts)


def run(args: argparse.Namespace) -> int:
    from hearth.runtime.errors import HearthError
    from hearth.runtime.registry import DEFAULT_MODEL, resolve_model

    if not 1 <= args.max_tokens <= 4096:
        print("bench structured: --max-tokens must be between 1 and 4096", file=sys.stderr)
        return 2
    problem = output_problem(args.json)
    if problem:
        print(f"bench structured: {problem}", file=sys.stderr)
        return 2
    try:
        model_path = str(resolve_model(args.model_path or DEFAULT_MODEL, prefer="gguf"))
    except HearthError as e:
        print(f"bench structured: cannot find the model: {e}", file=sys.stderr)
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    meta = {"command": command_line(args), "model": model_path, "max_tokens": args.max_tokens,
            "seeds": args.seeds, "threads": args.threads, "python": platform.python_version(),
            "load_average": os.getloadavg(), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    results: dict[str, Any] = {"meta": meta, "variants": {}}
    for variant in args.variants:
        _say(f"variant {variant}")
        results["variants"][variant] = run_variant(variant, args, model_path)
        if args.json:  # partial results survive an interrupted run
            write_json(args.json, results, _say)
    meta["wall_s"] = round(time.perf_counter() - _T0, 1)
    print(format_report(results))
    if args.json:
        write_json(args.json, results, _say)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="hearth bench structured", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
