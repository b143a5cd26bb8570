"""`hearth serve`: the OpenAI-compatible server, on Ray Serve by default.

    hearth serve                                   # default chat model + embeddings on 127.0.0.1:8000
    hearth serve --config models.yaml --api-key sk-local --port 8080
    hearth serve --model qwen2.5-coder-1.5b-instruct   # a model `hearth models pull` fetched (or a path)
    hearth serve --address ray://head:10001        # join an existing Ray cluster (multi-node)
    hearth serve --no-ray                          # one process, no Ray: development and tests
    hearth serve --no-ray --demo                   # and the Gradio chat demo at http://127.0.0.1:8000/demo
"""

from __future__ import annotations

import argparse
import logging
import os
import sys


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve models over the OpenAI API (Ray Serve)")
    p.add_argument("--config", default=None, help="models.yaml (default: the bundled chat model + embeddings)")
    p.add_argument("--model", default=None, metavar="NAME_OR_PATH",
                   help="serve this one chat model instead of the config's: a registered name (see `hearth models "
                        "list`) or a GGUF file / HF folder")
    p.add_argument("--host", default=None, help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="port (default 8000; 0 picks a free one)")
    p.add_argument("--api-key", action="append", default=[], dest="api_keys",
                   help="accepted API key (repeatable; also HEARTH_API_KEYS=k1,k2)")
    p.add_argument("--address", default=None, help="join this Ray cluster instead of starting a local Ray")
    p.add_argument("--no-ray", action="store_true", help="run the app in this process without Ray")
    p.add_argument("--cors-origin", action="append", default=[], dest="cors_origins",
                   help="allow browser calls from this origin (repeatable)")
    p.add_argument("--allow-no-auth", action="store_true",
                   help="allow serving without API keys on a non-loopback address")
    p.add_argument("--demo", action="store_true",
                   help="also serve the Gradio chat demo: at /demo with --no-ray, else on --demo-port")
    p.add_argument("--demo-port", type=int, default=7860, help="the demo's port under Ray (default 7860)")
    p.set_defaults(func=run_serve)


def model_from_flag(source: str):
    """The ModelConfig of `--model`: a registered name serves under that name, a path under its file stem."""
    from pathlib import Path

    from hearth.runtime.registry import looks_like_path
    from hearth.serve.config import ModelConfig

    if looks_like_path(source) or Path(source).expanduser().exists():
        p = Path(source).expanduser()
        return ModelConfig(name=(p.stem if p.suffix == ".gguf" else p.name) or source, path=source)
    return ModelConfig(name=source)


def preflight(cfg) -> str | None:
    """What would make the server fail to start, found before anything loads: a model path that
    does not exist, a model name nothing registers, a port another process holds. None when fine."""
    import socket
    from pathlib import Path

    from hearth.runtime.registry import DEFAULT_MODEL, list_models, looks_like_path

    known = None
    for i, m in enumerate(cfg.models):
        src = m.source
        if looks_like_path(src) or Path(src).expanduser().exists():
            if not Path(src).expanduser().exists():
                return f"models[{i}] ({m.name}): no model at {src} (path does not exist)"
        elif src != DEFAULT_MODEL:
            known = known if known is not None else {e.name for e in list_models() if e.error is None}
            if src not in known:
                from hearth.runtime.catalog import catalog_names

                if src in catalog_names():
                    return f"model {src!r} is not pulled yet; run `hearth models pull {src}` first"
                return (f"models[{i}] ({m.name}): no model named {src!r} is registered; give `path:` a GGUF "
                        f"file or an HF folder, or see `hearth models list`")
    for i, e in enumerate(cfg.embeddings):
        if e.path and not Path(e.path).expanduser().exists():
            return f"embeddings[{i}] ({e.name}): no model at {e.path} (path does not exist)"
    if cfg.port:
        family = socket.AF_INET6 if ":" in cfg.host else socket.AF_INET
        with socket.socket(family) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((cfg.host, cfg.port))
            except OSError as e:
                return f"cannot listen on {cfg.host}:{cfg.port}: {e.strerror or e}"
    return None


def run_serve(args: argparse.Namespace) -> int:
    from hearth.serve.app import api_keys_from_env
    from hearth.serve.config import load_config

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not getattr(args, "verbose", False):
        from hearth.runtime.quiet import quiet_libraries

        quiet_libraries()  # its environment defaults reach Ray's replicas too (they inherit it)
        os.environ["HEARTH_QUIET"] = "1"  # and this tells them to hide the same library lines
    cfg = load_config(args.config)
    if getattr(args, "model", None):
        cfg.models = [model_from_flag(args.model)]
    if args.host is not None:
        cfg.host = args.host
    if args.port is not None:
        cfg.port = args.port
    cfg.api_keys = api_keys_from_env(cfg.api_keys + args.api_keys)
    cfg.cors_origins = cfg.cors_origins + args.cors_origins
    if not cfg.api_keys and cfg.host not in ("127.0.0.1", "localhost", "::1") and not args.allow_no_auth:
        print(f"hearth: error: refusing to serve on {cfg.host} without an API key; pass --api-key KEY "
              "(or HEARTH_API_KEYS), or --allow-no-auth", file=sys.stderr)
        return 2
    problem = preflight(cfg)
    if problem:
        print(f"hearth: error: {problem}", file=sys.stderr)
        return 2
    if not cfg.api_keys:
        logging.getLogger("hearth.serve").warning("no API key set: anyone who can reach %s:%s can use it",
                                                  cfg.host, cfg.port)
    if args.no_ray:
        from hearth.serve.local import LocalServer

        server = LocalServer(cfg)
        if args.demo:  # gradio is imported only here
            from hearth.clients.demo import loopback_url, mount_demo

            # with keys the page asks each user for theirs: it is open to whoever reaches the server
            mount_demo(server.app, loopback_url(cfg.host, server.port), api_key=None)
            print(f"hearth: chat demo on {server.url}/demo", flush=True)
        print(f"hearth: serving on {server.url}/v1 (no Ray); models are loading", flush=True)
        server.start_loading(exit_on_error=True)
        server.serve()
        if server.app.state.load_error:
            print(f"hearth: error: the models failed to load: {server.app.state.load_error}", file=sys.stderr)
            return 1
        return 0
    from hearth.serve.ray_app import run as run_ray

    if args.demo:  # under Ray the demo runs in this driver process, on its own port, beside the API
        from hearth.clients.demo import launch_demo, loopback_url

        launch_demo(loopback_url(cfg.host, cfg.port), None, host=cfg.host, port=args.demo_port, block=False)
        print(f"hearth: chat demo on http://{cfg.host}:{args.demo_port}", flush=True)

    return run_ray(cfg, address=args.address, verbose=bool(getattr(args, "verbose", False)))
