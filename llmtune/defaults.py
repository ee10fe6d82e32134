"""Fast defaults picked for this machine where the recipe leaves them open.

`model.attn_implementation: null` means flash attention when this process has a CUDA GPU, the
package is installed, transformers can use it for the model and the weights are 16-bit
(flash_attention_3 on Hopper with FA3 installed, else flash_attention_2); otherwise transformers'
own default (sdpa for most models). An unset `train.use_liger_kernel` means Liger's Triton kernels
when there is a CUDA GPU, `liger-kernel` is installed and has kernels for the model type. An unset
`train.dataset_num_proc` means tokenizing in worker processes when the data is large enough to pay
for starting them. A value the recipe sets always wins. Training, `plan` and model loading all ask
here, so what plan shows is what a run uses; the run's manifest records what was used.
"""

from __future__ import annotations

import copy
import functools
import os
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version

from .builtin import builtin_config, model_path
from .compat import supports_flash_attention
from .errors import UserError
from .files import adapter_run
from .recipe.fields import field_names
from .verbs import METHODS

HOPPER = 9  # CUDA compute capability (major) that flash_attention_3 is built for

# TRL tokenizes in one process unless `dataset_num_proc` says otherwise. Workers cost start-up on each of
# TRL's passes (tokenize, labels, truncate: ~0.3-2 s each, more on a busy machine), so they are used only
# where each gets at least PARALLEL_ROWS rows. `python benchmarks/data_prep.py --num-proc 2` (short
# `messages` rows, SFT, first run; 2 cores, quiet) took 1 process vs 2: 5k rows 1.40 vs 1.36 s, 10k
# 2.76 vs 3.04 s, 20k 5.56 vs 3.44 s (1.62x), 50k 1.50x, 100k 28.9 vs 16.2 s (1.79x); with other work
# on the cores (load ~5): 10k 0.50x, 20k 1.05x, 100k 1.75x. Break-even is 10-20k rows for two workers.
PARALLEL_ROWS = 10_000
MAX_TOKENIZE_PROCESSES = 8  # beyond this, start-up and merging the shards eat most of the gain


@dataclass(frozen=True)
class Pick:
    value: object  # what is passed on; None = the library's default
    why: str  # for `plan`: "set in the recipe", "no CUDA GPU", "flash-attn 2.8.3 installed, CUDA, bfloat16", ...


def _gpu() -> tuple[int, int] | None:
    """Compute capability of this process's CUDA GPU, or None without one."""
    import torch

    return torch.cuda.get_device_capability() if torch.cuda.is_available() else None


def _installed(distribution: str) -> str:
    try:
        return version(distribution)
    except PackageNotFoundError:
        return "?"


def attention(model: dict) -> Pick:
    """The attention kernel for the recipe's `model:` section."""
    if model.get("attn_implementation"):
        return Pick(model["attn_implementation"], "set in the recipe")
    gpu = _gpu()
    if gpu is None:
        return Pick(None, "no CUDA GPU")
    from transformers import utils

    if gpu[0] == HOPPER and utils.is_flash_attn_3_available():
        kind, package = "flash_attention_3", "flash-attn-3"
    elif utils.is_flash_attn_2_available():
        kind, package = "flash_attention_2", "flash-attn"
    else:
        return Pick(None, "flash-attn is not installed")
    if model["trust_remote_code"]:
        return Pick(None, "the model runs its own code (trust_remote_code)")
    config = auto_config(model)
    if not supports_flash_attention(config):
        return Pick(None, f"transformers has no flash attention for {config.model_type}")
    dtype = model["dtype"] if model["dtype"] != "auto" else str(getattr(config, "dtype", None)).removeprefix("torch.")
    if dtype not in ("bfloat16", "float16"):
        return Pick(None, f"the weights are {dtype}; flash attention needs `model.dtype: bfloat16` or float16")
    return Pick(kind, f"{package} {_installed(package)} installed, CUDA, {dtype}")


def _liger_model_types() -> set[str]:
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    return set(MODEL_TYPE_TO_APPLY_LIGER_FN)


def liger(config: dict, method: str) -> Pick:
    """`train.use_liger_kernel` for the recipe: its own value, or the pick for this machine."""
    train = config.get("train") or {}
    if "use_liger_kernel" in train:
        return Pick(train["use_liger_kernel"], "set in the recipe")
    if not METHODS[method].liger:  # which trainers Liger is verified with: verbs.py
        return Pick(None, f"not picked for {method}, only for {', '.join(m.name for m in METHODS.values() if m.liger)}")
    if _gpu() is None:
        return Pick(None, "no CUDA GPU")
    from transformers import utils

    if not utils.is_liger_kernel_available():
        return Pick(None, "liger-kernel is not installed")
    if config["model"]["trust_remote_code"]:
        return Pick(None, "the model runs its own code (trust_remote_code)")
    model_type = auto_config(config["model"]).model_type
    if model_type not in _liger_model_types():
        return Pick(None, f"Liger has no kernels for {model_type}")
    return Pick(True, f"liger-kernel {_installed('liger-kernel')} installed, CUDA, {model_type} supported")


def usable_cores() -> int:
    """Cores this process may run on, shared with the other ranks a launch started on this machine (under
    TRL's main-process-first, ranks whose data is not cached tokenize side by side)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(cores // max(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), 1), 1)


def tokenize_processes(rows: int) -> int | None:
    """Worker processes for tokenizing `rows` rows here; None = one process (TRL's default)."""
    workers = min(usable_cores(), MAX_TOKENIZE_PROCESSES, rows // PARALLEL_ROWS)
    return workers if workers > 1 else None


def _rows(data) -> int:
    """Training rows of the prepared data; 0 when streamed (not counted, and TRL maps it lazily anyway)."""
    return len(data.train) if data is not None and hasattr(data.train, "__len__") else 0


def picks(resolved, data=None) -> dict:
    """TRL config values picked for this machine, for the fields the method's config has (runner/session.py puts the
    recipe's `train:` over them): tokenizing workers for the training rows of `data`, and Liger."""
    fields = field_names(resolved.method.config)
    out = {}
    procs = tokenize_processes(_rows(data)) if "dataset_num_proc" in fields else None
    if procs:
        out["dataset_num_proc"] = procs
    if "use_liger_kernel" in fields and liger(resolved.config, resolved.method.name).value:
        out["use_liger_kernel"] = True
    if "ddp_find_unused_parameters" in fields and not _routes_tokens(resolved.config["model"]):
        # transformers turns DDP's unused-parameter search on for any model without gradient checkpointing
        # (and any PEFT model): an extra pass over the graph each step, and a warning from every rank.
        # Only a mixture of experts leaves parameters unused in a step.
        out["ddp_find_unused_parameters"] = False
    return out


def _routes_tokens(model: dict) -> bool:
    """Whether the model is a mixture of experts (a step may not use every expert)."""
    config = auto_config(model)
    config = getattr(config, "text_config", None) or config
    return any(getattr(config, key, None) for key in ("num_experts", "num_local_experts", "n_routed_experts",
                                                          "moe_num_experts"))


def describe(resolved, args, data, default_attention: str) -> list[str]:
    """`plan`'s lines: what the run will use and why (`args`: the method's TRL config as training builds it)."""
    config = resolved.config
    attn = attention(config["model"])
    lines = [f"attention: {attn.value} ({attn.why})" if attn.value else
             f"attention: {default_attention} (transformers' default: {attn.why})"]
    if hasattr(args, "packing"):
        why = "set in the recipe" if config["data"]["packing"] is not None else \
            "data.packing: null = on with flash attention's varlen kernels only"
        lines.append(f"packing: {'on' if args.packing else 'off'} ({why})")
    kernel = liger(config, resolved.method.name)
    lines.append(f"Liger kernels: {'on' if args.use_liger_kernel else 'off'} ({kernel.why})")
    if hasattr(args, "dataset_num_proc"):
        procs, rows = args.dataset_num_proc, _rows(data)
        if "dataset_num_proc" in (config.get("train") or {}):
            why = "set in the recipe"
        elif procs:
            why = f"{rows:,} rows, {usable_cores()} usable cores"
        else:
            why = f"{rows:,} rows, {usable_cores()} usable core(s); a worker pays from {PARALLEL_ROWS:,} rows"
        lines.append(f"tokenization: {procs or 1} process{'es' if (procs or 1) > 1 else ''} ({why})")
    return lines


def auto_config(model: dict):
    """The transformers config of the recipe's model (of its base, for a run directory holding an adapter).

    Read once per process: the attention pick, the Liger pick, packing and `plan` all ask for it. Each caller
    gets its own copy, so none sees another's changes."""
    stacked = adapter_run(model)
    made = None if stacked else builtin_config(model)  # checking a recipe builds no model (validate)
    if made is not None:
        return made
    source = stacked["base_model_name_or_path"] if stacked else model_path(model)
    return copy.deepcopy(_read_config(source, model.get("revision"), model["trust_remote_code"], model["name"]))


@functools.lru_cache(maxsize=8)
def _read_config(source: str, revision: str | None, trust_remote_code: bool, name: str):
    import transformers

    try:
        return transformers.AutoConfig.from_pretrained(source, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise UserError(f"model.name: cannot read the config of '{name}': {err}") from None
