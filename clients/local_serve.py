"""hearth's server in this process, for commands that need a model but were given no --url.

    with local_server("runs/sft-merged") as (base_url, model_name, api_key):
        ...   # an OpenAI-compatible endpoint on 127.0.0.1 and an ephemeral port, gone after the block
"""

from __future__ import annotations

import secrets
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def local_server(model_path: str | None = None, context_length: int = 4096,
                 n_threads: int | None = None) -> Iterator[tuple[str, str, str]]:
    """Serve `model_path` (a GGUF file, an HF directory or a registered name; None: the bundled default)
    without Ray, loopback only, with a one-time API key. Yields (base_url, model name, key)."""
    from hearth.runtime.registry import DEFAULT_MODEL
    from hearth.serve.config import AgentsConfig, ModelConfig, ServeConfig
    from hearth.serve.local import in_background

    name = DEFAULT_MODEL if model_path is None else Path(model_path).name.removesuffix(".gguf")
    opts = {"n_threads": n_threads} if n_threads else {}
    model = ModelConfig(name=name, path=model_path, context_length=context_length, backend_options=opts)
    key = "sk-local-" + secrets.token_hex(16)
    cfg = ServeConfig(models=[model], embeddings=[], host="127.0.0.1", port=0, api_keys=[key],
                      agents=AgentsConfig(enabled=False))
    print(f"hearth: starting {name} in this process ...", file=sys.stderr, flush=True)
    with in_background(cfg) as srv:
        yield srv.url + "/v1", name, key
