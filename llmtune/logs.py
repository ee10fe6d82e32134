"""Quiet by default: a progress bar and a summary on the terminal; library chatter goes to train.log."""

from __future__ import annotations

import logging
import os
import warnings


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
    for name in ("trl", "peft", "accelerate", "bitsandbytes"):
        logging.getLogger(name).setLevel(logging.ERROR)
    logging.getLogger("llmtune").setLevel(logging.INFO)  # llmtune's own notes (e.g. a cache hit) reach train.log
