"""Quiet by default: a progress bar and a summary on the terminal; library chatter goes to train.log."""

from __future__ import annotations

import logging
import os
import sys
import warnings

from .ranks import is_main_process

# TRL's modules that warn about the rows they prepare (e.g. "The tokenized prompt is not a prefix ...").
TRL_DATA_LOGGERS = ("trl.trainer.sft_trainer", "trl.trainer.dpo_trainer", "trl.data_utils")


class _Once(logging.Filter):
    """Passes each distinct message once per process."""

    def __init__(self):
        super().__init__()
        self.seen = set()

    def filter(self, record):
        message = record.getMessage()
        if message in self.seen:
            return False
        self.seen.add(message)
        return True


class _ToLog(logging.Filter):
    """Takes a library's records below ERROR off its own terminal handler and into train.log (once it is open)."""

    def filter(self, record):
        if record.levelno >= logging.ERROR:
            return True
        logging.getLogger(LIBRARIES).handle(record)
        return False


# Where library records that have no place on the terminal go: train.log once the run opens it, else nowhere
# (its null handler keeps Python's last-resort handler from printing them on stderr).
LIBRARIES = "llmtune.libraries"
# Loggers without handlers of their own, whose warnings would otherwise reach stderr through that last resort
# (kernels' "Skipping publisher trust check ..." as bitsandbytes loads).
TO_LOG = (LIBRARIES, "kernels")


def quiet_loggers() -> None:
    """Lower the libraries' loggers before any of them is imported (bitsandbytes warns as it loads)."""
    for name in ("trl", "peft", "accelerate", "bitsandbytes"):
        logging.getLogger(name).setLevel(logging.ERROR)
    for name in TO_LOG:
        logger = logging.getLogger(name)
        if not any(isinstance(h, logging.NullHandler) for h in logger.handlers):
            logger.addHandler(logging.NullHandler())
    # DeepSpeed prints to stdout through its own handler ("Setting accelerator to CPU ..." on every import on a
    # machine without GPUs); its logger keeps this filter when DeepSpeed sets it up on import
    deepspeed = logging.getLogger("DeepSpeed")
    if not any(isinstance(f, _ToLog) for f in deepspeed.filters):
        deepspeed.addFilter(_ToLog())
    # "Token indices sequence length is longer than ... indexing errors" on a row longer than the model takes:
    # llmtune counts the rows `data.max_length` cuts and says so itself, in the row's words
    logging.getLogger("transformers.tokenization_utils_base").setLevel(logging.ERROR)


def quiet() -> None:
    """Keep the terminal to a progress bar and a summary; details go to train.log."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", module=r"(torch|transformers|trl|peft|accelerate|bitsandbytes)(\.|$)")
    logging.captureWarnings(True)
    quiet_loggers()
    for handler in logging.getLogger("huggingface_hub").handlers:  # its own stderr handler: errors only there;
        handler.setLevel(logging.ERROR)  # its warnings (download retries) go on up to train.log
    for name in TRL_DATA_LOGGERS:  # what TRL says about the data is worth reading: terminal and train.log, once
        logger = logging.getLogger(name)
        logger.setLevel(logging.WARNING)
        if not any(isinstance(f, _Once) for f in logger.filters):
            logger.addFilter(_Once())
            if is_main_process():
                terminal = logging.StreamHandler(sys.stderr)
                terminal.setFormatter(logging.Formatter("warning: %(message)s"))
                logger.addHandler(terminal)
    logging.getLogger("llmtune").setLevel(logging.INFO)  # llmtune's own notes (e.g. a cache hit) reach train.log
