"""What the libraries under hearth print, and whether they may reach a model hub: set once per command.

    from hearth.runtime.quiet import setup_output
    setup_output(verbose=args.verbose)     # first thing in a CLI's main, before torch/transformers load

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
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' loading/saving bars follow it
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    for category in (DeprecationWarning, PendingDeprecationWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category)
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
