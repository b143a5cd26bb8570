"""`hearth generate` (one prompt, streamed to stdout) and `hearth chat` (a terminal conversation).

    hearth generate --prompt "Write a haiku about tea" --max-tokens 64
    hearth chat --system "You are terse." --backend transformers
    hearth generate --model old-ckpt/ --allow-pickle --prompt "Hi"   # pytorch_model.bin: trusted sources only
"""

from __future__ import annotations

import argparse
import sys
import time


def add_parser(sub: argparse._SubParsersAction) -> None:
    for name in ("generate", "chat"):
        p = sub.add_parser(name, help="generate from one prompt" if name == "generate" else "chat in the terminal")
        p.add_argument("--model", default=None, help="registered name or path (default: the bundled model)")
        p.add_argument("--backend", default="auto", choices=["auto", "llamacpp", "transformers"])
        p.add_argument("--max-tokens", type=int, default=256)
        p.add_argument("--temperature", type=float, default=0.7)
        p.add_argument("--top-p", type=float, default=0.95)
        p.add_argument("--seed", type=int, default=None)
        p.add_argument("--threads", type=int, default=None, help="CPU threads for the model")
        p.add_argument("--system", default=None, help="system prompt")
        p.add_argument("--allow-pickle", action="store_true",
                       help="load pickle weights (pytorch_model.bin); they can run code: only from a trusted source")
        if name == "generate":
            p.add_argument("--prompt", required=True)
            p.add_argument("--raw", action="store_true", help="send the prompt as is, without the chat template")
            p.set_defaults(func=run_generate)
        else:
            p.set_defaults(func=run_chat)


def _engine(args):
    from hearth.runtime import Engine

    kw = {}
    backend = args.backend
    if args.allow_pickle:
        if backend == "auto":  # from_model's own format check would refuse pickle: pick the backend here
            backend = "llamacpp" if _format(args.model) == "gguf" else "transformers"
        if backend == "transformers":
            kw["allow_pickle"] = True
    if args.threads:
        kw["n_threads" if backend != "transformers" else "num_threads"] = args.threads
    return Engine.from_model(args.model, backend=backend, **kw)


def _format(model: str | None) -> str:
    from hearth.runtime.checkpoint import inspect_checkpoint
    from hearth.runtime.registry import DEFAULT_MODEL, resolve_model

    return inspect_checkpoint(resolve_model(model or DEFAULT_MODEL, prefer="gguf"), allow_pickle=True).format


def _params(args):
    from hearth.runtime import SamplingParams

    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          seed=args.seed)


def _stream(engine, request) -> tuple[int, float]:
    t0 = time.monotonic()
    n = 0
    for out in engine.stream_sync(request):
        sys.stdout.write(out.text)
        sys.stdout.flush()
        n += len(out.token_ids)
    return n, time.monotonic() - t0


def run_generate(args) -> int:
    from hearth.runtime import InvalidRequestError, PromptRequest, to_generation_request

    if not args.prompt.strip():
        raise InvalidRequestError("the prompt is empty", param="prompt")
    params = _params(args)  # validate before loading the model
    engine = _engine(args)
    try:
        if args.raw:
            req = PromptRequest(prompt=args.prompt, params=params)
        else:
            msgs = ([{"role": "system", "content": args.system}] if args.system else []) + \
                   [{"role": "user", "content": args.prompt}]
            req = PromptRequest(messages=msgs, params=params)
        n, dt = _stream(engine, to_generation_request(engine.tokenizer, req))
        print(f"\n[{n} tokens, {n / dt:.1f} tok/s]", file=sys.stderr)
    finally:
        engine.shutdown()
    return 0


def run_chat(args) -> int:
    from hearth.runtime import PromptRequest, to_generation_request

    params = _params(args)
    engine = _engine(args)
    history = [{"role": "system", "content": args.system}] if args.system else []
    print("hearth chat — empty line or Ctrl-D to quit, /reset to forget the conversation", file=sys.stderr)
    try:
        while True:
            try:
                line = input("you> ").strip()
            except EOFError:
                break
            if not line:
                break
            if line == "/reset":
                history = history[:1] if args.system else []
                continue
            history.append({"role": "user", "content": line})
            req = to_generation_request(engine.tokenizer, PromptRequest(messages=list(history), params=params))
            sys.stdout.write("assistant> ")
            reply = []
            try:
                for out in engine.stream_sync(req):
                    sys.stdout.write(out.text)
                    sys.stdout.flush()
                    reply.append(out.text)
            except KeyboardInterrupt:  # stop this answer, keep the conversation
                engine.abort(req.request_id)
            print()
            history.append({"role": "assistant", "content": "".join(reply)})
    finally:
        engine.shutdown()
    return 0
