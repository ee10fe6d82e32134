"""The method's TRL config class, built as the run builds it: by the run, and by the pre-flight (`validate`), which
lets the class's own cross-field checks refuse a recipe before any model loads."""

from __future__ import annotations

from pathlib import Path

from ..defaults import picks
from ..errors import UserError
from ..launch.rank import training_args as launched_args
from ..recipe.check import Resolved
from ..recipe.preflight import in_cache
from ..verbs import config_class
from . import stopping


def training_args(resolved: Resolved, run_dir: Path, defaults: dict, data=None):
    """The method's TRL config: llmtune's defaults, under what the recipe's `train:` says.

    `data` (the prepared data) sizes the tokenizing workers; without it, TRL tokenizes in one process.
    """
    import torch

    config = resolved.config
    args = {
        "output_dir": str(run_dir),
        "seed": config["seed"],
        "report_to": "none",  # no telemetry or trackers unless the recipe names one
        "disable_tqdm": False,  # transformers ties the bar to its log level, which quiet() lowers
        # Mixed precision only where the hardware has it; TRL would turn bf16 on regardless.
        "bf16": torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
        **launched_args(),  # a launch on a machine without GPUs: CPU processes over gloo
        **picks(resolved, data),  # picked for this machine: tokenizing workers, Liger kernels
        **defaults,
        **({"gradient_checkpointing": False} if in_cache(config) else {}),  # see recipe/preflight.py
        **stopping.settings(config, resolved.method),
        **config["train"],
    }
    try:
        return config_class(resolved.method.config)(**args)
    except (ValueError, TypeError) as err:  # TRL's own cross-field checks
        raise UserError(f"{resolved.locate(('train',))}: {resolved.method.config.split(':')[1]} rejected the "
                        f"`train:` settings: {err}") from None
