"""`hearth edge`: the offline terminal chat on a GGUF model (see hearth.clients.edge).

    hearth edge [MODEL.gguf] [--history PATH] [--new] [--system TEXT] [--ctx 2048] [--threads N]

In the chat: /help, /system [TEXT], /reset, /save NAME, /load [NAME], /history, /quit (or Ctrl-D);
Ctrl-C stops an answer. The model and the runtime load only when the command runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("edge", help="offline terminal chat on a GGUF model (llama.cpp in process, history kept)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", default=None,
                   help="GGUF file or registered model name (default: the bundled model)")
    p.add_argument("--history", type=Path, default=None, metavar="PATH",
                   help="conversation file (default: $HEARTH_HOME/edge/history.json); "
                        "/save and /load use its folder")
    p.add_argument("--new", action="store_true",
                   help="start a fresh conversation (the previous one stays loadable with /load)")
    p.add_argument("--system", default=None, help="set the system prompt")
    p.add_argument("--max-tokens", type=int, default=512, help="longest answer in tokens")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all usable cores)")
    p.add_argument("--ctx", type=int, default=2048, help="context window in tokens; older turns are dropped to fit")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .edge import EdgeConfig, run_edge

    config = EdgeConfig(model=args.model, history=args.history, new=args.new, system=args.system,
                        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                        seed=args.seed, threads=args.threads, ctx=args.ctx)
    return run_edge(config)
