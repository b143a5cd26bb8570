"""What the libraries under hearth print, and whether they may reach a model hub: set once per command.

    from hearth.runtime.quiet import setup_output
    setup_output(verbose=args.verbose)     # first thing in a CLI's main, before torch/transformers load
    quiet_libraries(verbose=args.verbose)  # only the library noise (training keeps its own logging)

hearth loads every model from a local path, so the model hub is never needed: HF_HUB_OFFLINE and
TRANSFORMERS_OFFLINE default to 1 (an explicit value in the environment wins). That also keeps
bitsandbytes' import-time probe for a CPU kernel on the hub ("kernels-community/...") off the network.

Quiet (the default): the libraries' own warnings and progress bars are hidden (deprecations, torch's
Enum notices, DeepSpeed's "Setting accelerator to CPU", bitsandbytes' kernel probe, transformers'
"Loading weights" bars); hearth's own messages and errors still print. Verbose: all of it, plus INFO logs.
"""

from __future__ import annotations

import logging
import os
import warnings

# libraries whose warnings are noise to someone running a hearth command (quiet mode shows ERROR and up)
NOISY_LOGGERS = ("bitsandbytes", "kernels", "torch.utils._pytree", "torch.distributed", "torchao",
                 "accelerate", "peft", "gptqmodel", "optimum", "DeepSpeed", "datasets", "huggingface_hub",
                 "sentence_transformers", "faiss", "llama_cpp", "urllib3", "httpx", "numexpr")


class _BelowError(logging.Filter):
    """Drops a logger's records below ERROR; a filter, because some libraries reset their level on import."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR


_FILTER = _BelowError()

# logger name -> message starts that are noise on that logger, whatever its level
NOISY_LOG_LINES = {
    "DeepSpeed": ("Setting accelerator to", "Setting ds_accelerator to"),
    "torch.utils._pytree": ("%s is an Enum subclass",),
    "torch.utils.cpp_extension": ("No CUDA runtime is found",),
    "bitsandbytes.backends.cpu.ops": ("Failed to load CPU gemm_4bit_forward",),
}
# environment defaults the libraries read when they are imported (values the user set win)
QUIET_ENV = {
    "TRANSFORMERS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # transformers' "Loading weights" / "Writing model shards" bars
    "TF_CPP_MIN_LOG_LEVEL": "3",
}


class _DropLines(logging.Filter):
    def __init__(self, starts: tuple[str, ...]):
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.starts)


def quiet_libraries(verbose: bool = False) -> None:
    """Hide the known-noisy library lines and warnings for this process (no-op with verbose), leaving
    logging levels alone. Call it before the libraries are imported: the filters sit on loggers they
    create later, and the environment defaults are read at their import."""
    if verbose:
        return
    for name, starts in NOISY_LOG_LINES.items():
        logger = logging.getLogger(name)  # the same object the library configures when it is imported
        if not any(isinstance(f, _DropLines) for f in logger.filters):
            logger.addFilter(_DropLines(starts))
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    for category in (DeprecationWarning, PendingDeprecationWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category)


def setup_output(verbose: bool = False) -> None:
    """Offline by default; library noise hidden unless `verbose` (then INFO logs are shown too)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if verbose:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "info")
        warnings.simplefilter("default")
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        for name in NOISY_LOGGERS:
            logging.getLogger(name).removeFilter(_FILTER)
        return
    quiet_libraries(verbose=False)
    # a library's UserWarning is advice to its caller (hearth), not to the person at the terminal
    warnings.filterwarnings("ignore", category=UserWarning,
                            module=r"(torch|transformers|bitsandbytes|peft|accelerate|gptqmodel|optimum|torchao"
                                   r"|huggingface_hub|sentence_transformers|datasets|faiss|tokenizers)(\.|$)")
    for name in NOISY_LOGGERS:
        logger = logging.getLogger(name)
        logger.setLevel(logging.ERROR)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)


def pop_verbose(argv: list[str]) -> tuple[list[str], bool]:
    """(argv without `--verbose`, whether it was there): the flag may stand anywhere before a `--`."""
    end = argv.index("--") if "--" in argv else len(argv)
    kept = [a for a in argv[:end] if a != "--verbose"] + argv[end:]
    return kept, len(kept) != len(argv)
