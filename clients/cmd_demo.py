"""`hearth demo`: the Gradio chat UI for an OpenAI-compatible server (hearth's own or any other).

    hearth demo                                                  # talks to http://127.0.0.1:8000/v1
    hearth demo --url http://10.0.0.5:8000/v1 --api-key KEY --port 7861

Open http://127.0.0.1:7860 in a browser. The key stays in this process (it is not sent to the page);
HEARTH_API_KEY is used when --api-key is not given. Needs gradio (pip install gradio).
"""

from __future__ import annotations

import argparse
import os

from hearth.runtime.errors import HearthError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="a browser chat UI (Gradio) for an OpenAI-compatible server",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000/v1", help="the server's base URL (…/v1)")
    p.add_argument("--api-key", default=None, help="the server's API key (default: $HEARTH_API_KEY)")
    p.add_argument("--host", default="127.0.0.1", help="where the UI listens (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=7860, help="UI port (default 7860; 0 picks a free one)")
    p.set_defaults(func=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    if not args.url.startswith(("http://", "https://")):
        raise HearthError(f"--url must start with http:// or https://, got {args.url!r}")
    if not 0 <= args.port <= 65535:
        raise HearthError(f"--port must be from 0 to 65535, got {args.port}")
    try:
        from .demo import launch_demo
    except ModuleNotFoundError as e:
        if e.name == "gradio":
            raise HearthError("the demo needs gradio: pip install 'gradio>=5'") from None
        raise
    key = args.api_key or os.environ.get("HEARTH_API_KEY") or None
    print(f"hearth: demo for {args.url} on http://{args.host}:{args.port or '<free port>'}", flush=True)
    launch_demo(args.url, key, host=args.host, port=args.port, block=True)
    return 0
