"""Values each key's type allows but a run cannot use, caught before a model loads.

`values` needs only the recipe and the machine (installed packages, folders); `recipe.check.resolve`
calls it, so `validate --no-data` has it too. What needs the model's config (runner/preflight.py) is
checked by `validate` and every training verb through `runner.preflight.check`.
"""

from __future__ import annotations

import errno
import importlib.util
import math
import os
from pathlib import Path

from ..files import someone_elses
from .schema import ADAPTERS

# `train.report_to` names and the modules transformers imports for them.
TRACKERS = {"wandb": ("wandb",), "tensorboard": ("tensorboard", "tensorboardX"), "mlflow": ("mlflow",),
            "comet_ml": ("comet_ml",), "clearml": ("clearml",), "neptune": ("neptune",), "dvclive": ("dvclive",),
            "aim": ("aim",), "swanlab": ("swanlab",), "trackio": ("trackio",), "codecarbon": ("codecarbon",),
            "azure_ml": ("azureml",), "flyte": ("flytekit",), "dagshub": ("dagshub",)}
# The trackers pyproject.toml has an extra for, named like the tracker (docs/tools.md, "Trackers").
EXTRAS = ("tensorboard", "wandb", "mlflow", "trackio")
# Folders the kernel serves, not a disk: nothing written there is kept.
VIRTUAL = ("/proc", "/sys", "/dev")
NAME_MAX, PATH_MAX = 255, 4096


def values(check, config: dict) -> None:
    train = config.get("train") or {}
    _train_values(check, train)
    seed = config.get("seed")
    if isinstance(seed, int) and not 0 <= seed < 2**32:
        check.error(("seed",), f"`seed` must be in [0, 2**32) (numpy's range); got {seed}")
    adapter = config.get("adapter") or {}
    if isinstance(adapter.get("r"), int) and adapter["r"] < 1:
        check.error(("adapter", "r"), f"`adapter.r` (the LoRA rank) must be >= 1; got {adapter['r']}")
    dropout = adapter.get("lora_dropout")
    if isinstance(dropout, (int, float)) and not 0 <= dropout < 1:
        check.error(("adapter", "dropout"), f"`adapter.dropout` must be in [0, 1); got {dropout}")
    if in_cache(config) and train.get("gradient_checkpointing") is True:
        check.error(("train", "gradient_checkpointing"), f"`adapter.type: {adapter['type']}` trains vectors that "
                    "enter every layer as its attention cache, which gradient checkpointing drops (each batch would "
                    "then fail: the attention mask is longer than the keys); set `train.gradient_checkpointing: "
                    f"false` (the default with `type: {adapter['type']}`), or use `type: prompt` or `p_tuning`")
    attention = (config.get("model") or {}).get("attn_implementation")
    if attention == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        check.error(("model", "attn_implementation"), "`flash_attention_2` needs the flash-attn package and a "
                    "CUDA GPU; install it (`pip install flash-attn`) or set `model.attn_implementation: sdpa`")
    _output_dir(check, config)


def in_cache(config: dict) -> bool:
    """Whether the recipe's adapter enters the model as the attention cache (prefix tuning): gradient
    checkpointing, which drops that cache, is then off by default and refused when asked for."""
    adapter = config.get("adapter") or {}
    kind = ADAPTERS.get(adapter.get("type", "lora")) if isinstance(adapter, dict) else None
    return bool(kind and kind.in_cache)


def _train_values(check, train: dict) -> None:
    lr = train.get("learning_rate")
    if isinstance(lr, (int, float)) and not (math.isfinite(lr) and lr > 0):
        check.error(("train", "learning_rate"), f"`train.learning_rate` must be a finite number > 0; got {lr}")
    for key in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        if isinstance(train.get(key), int) and train[key] < 1:
            check.error(("train", key), f"`train.{key}` must be >= 1; got {train[key]}")
    epochs, steps = train.get("num_train_epochs"), train.get("max_steps")
    if isinstance(epochs, (int, float)) and not (math.isfinite(epochs) and epochs > 0) and \
            not (isinstance(steps, int) and steps > 0):
        check.error(("train", "num_train_epochs"), f"`train.num_train_epochs` must be > 0 (or set `train.max_steps:`"
                    f" > 0); got {epochs}: the run would train nothing")
    if isinstance(steps, int) and (steps < -1 or steps == 0):
        check.error(("train", "max_steps"), f"`train.max_steps` must be > 0 (or -1: train `num_train_epochs`); "
                    f"got {steps}")
    trackers = train.get("report_to")
    for name in [trackers] if isinstance(trackers, str) else trackers or []:
        modules = TRACKERS.get(name)
        if modules and not any(importlib.util.find_spec(m) for m in modules):
            install = f"'llmtune-recipes[{name}]'" if name in EXTRAS else modules[0]
            check.error(("train", "report_to"), f"`train.report_to: {name}` needs the {modules[0]} package, which "
                        f"is not installed; `pip install {install}`, or remove it from `report_to`")


def _output_dir(check, config: dict) -> None:
    raw = config.get("output_dir")
    if not isinstance(raw, str):
        return
    path = Path(os.path.expanduser(raw))
    config["output_dir"] = str(path)  # `~/runs/x` is a folder in the home directory, not `./~`
    problem = output_dir_problem(path)
    if problem:
        check.error(("output_dir",), f"`output_dir` {problem}")


def output_dir_problem(path: Path) -> str | None:
    """Why llmtune cannot make `path` its run directory, or None (what can be known before writing)."""
    absolute = Path(os.path.abspath(path))
    if any(absolute == Path(v) or Path(v) in absolute.parents for v in VIRTUAL):
        return f"'{path}' is under {absolute.parts[0]}{absolute.parts[1]}, which is not a disk; choose a folder " \
               "on a disk"
    if len(str(absolute)) >= PATH_MAX or any(len(part.encode()) > NAME_MAX for part in absolute.parts):
        return f"'{str(path)[:60]}...' is too long (at most {NAME_MAX} bytes a name, {PATH_MAX} in all)"
    if path.exists() and not path.is_dir():
        return f"'{path}' is a file, not a folder; choose another `output_dir`"
    existing = next(p for p in [absolute, *absolute.parents] if p.exists())
    if not existing.is_dir():
        return f"'{existing}' (in '{path}') is a file, not a folder; choose another `output_dir`"
    if not os.access(existing, os.W_OK | os.X_OK) or _read_only(existing):
        return f"'{path}' cannot be written: '{existing}' is read-only; choose a writable folder"
    return someone_elses(path)


def _read_only(folder: Path) -> bool:
    """A read-only mount (os.access says writable to root even there)."""
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except OSError as err:
        return err.errno == errno.EROFS
