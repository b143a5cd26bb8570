"""Quiet by default: the known-noisy lines of the ML libraries hearth's commands import are hidden, and
`--verbose` brings everything back.

    from hearth.clients.quiet import quiet_libraries
    quiet_libraries(verbose=args.verbose)        # first thing in a command, before torch/transformers load

What is hidden (each line says nothing a user can act on): DeepSpeed's "Setting accelerator to CPU" line
(printed on stdout whenever transformers finds DeepSpeed installed), torch's pytree Enum notices, the
"No CUDA runtime" and bitsandbytes kernel-download notices, Python FutureWarning/DeprecationWarning
(messages for the libraries' developers), transformers' and datasets' info logging and their per-file
progress bars (loading weights, writing shards, tokenizing a dataset). hearth's own progress and errors
are untouched, and real errors of the libraries still show. Environment variables the user set win.
"""

from __future__ import annotations

import logging
import os
import warnings

# logger name -> message starts that are noise on that logger
NOISY_LOG_LINES = {
    "DeepSpeed": ("Setting accelerator to", "Setting ds_accelerator to"),
    "torch.utils._pytree": ("%s is an Enum subclass",),
    "torch.utils.cpp_extension": ("No CUDA runtime is found",),
    "bitsandbytes.backends.cpu.ops": ("Failed to load CPU gemm_4bit_forward",),
}
# environment defaults the libraries read when they are imported
QUIET_ENV = {
    "TRANSFORMERS_VERBOSITY": "error",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # transformers' "Loading weights" / "Writing model shards" bars
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
}


class _DropLines(logging.Filter):
    def __init__(self, starts: tuple[str, ...]):
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.starts)


def quiet_libraries(verbose: bool = False) -> None:
    """Hide the known-noisy library output for this process (no-op with verbose). Call it before the
    libraries are imported: the filters sit on loggers the libraries create later, the environment
    defaults are read at their import."""
    if verbose:
        return
    for name, starts in NOISY_LOG_LINES.items():
        logger = logging.getLogger(name)  # the same object the library configures when it is imported
        if not any(isinstance(f, _DropLines) for f in logger.filters):
            logger.addFilter(_DropLines(starts))
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
