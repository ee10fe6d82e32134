"""Failures users can fix themselves, out of disk or out of memory, a diverged loss or a bad
row reached while streaming, explained with what to try.

Each writer reports a full disk its own way: Python as `OSError(ENOSPC)`, safetensors as
"os error 28", `torch.save` only as a failed stream write; all of them are recognised.
"""

from __future__ import annotations

import errno
import math
import os
import re
import shutil
from pathlib import Path

from .. import memory
from ..errors import StreamedRowError
from .resume import complete_checkpoints

_DISK_FULL = re.compile(r"No space left on device|os error 28|Disk quota exceeded|iostream error|"
                        r"PytorchStreamWriter failed writing", re.IGNORECASE)
_OOM = re.compile(r"out of memory|can't allocate memory|DefaultCPUAllocator", re.IGNORECASE)


def _chain(err: BaseException):
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def disk_full(err: BaseException) -> bool:
    return any(isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT) or _DISK_FULL.search(str(e))
               for e in _chain(err))


def out_of_memory(err: BaseException) -> bool:
    return any(isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError" or _OOM.search(str(e))
               for e in _chain(err))


class Diverged(Exception):
    """A loss or gradient norm stopped being a finite number: the weights are no longer usable."""


def divergence_guard(args):
    """A callback that stops the run at the first logged NaN/inf loss or gradient norm.

    transformers would train on: the logged `loss` hides NaN steps (`logging_nan_inf_filter`), and the
    NaN weights would be saved as a completed run. With fp16 a non-finite gradient norm is the
    loss scaler probing (the step is skipped), so there only the losses count.
    """
    from transformers import TrainerCallback

    watched = ("loss", "eval_loss") + (() if args.fp16 else ("grad_norm",))

    class DivergenceGuard(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            bad = [f"{key} = {logs[key]}" for key in watched
                   if isinstance((logs or {}).get(key), float) and not math.isfinite(logs[key])]
            if bad:
                raise Diverged(f"training diverged at step {state.global_step}: {', '.join(bad)}")

    return DivergenceGuard()


def _kept(run_dir: Path) -> str:
    found = complete_checkpoints(run_dir)
    if not found:
        return "No checkpoint had been completed yet."
    return (f"The last complete checkpoint, {found[0]}, is intact: continue from it with the same command plus "
            "`--resume auto`.")


def explain(err: BaseException, run_dir: Path, resolved, args) -> str | None:
    """What happened and what to try, for a disk or memory failure, a diverged loss or a streamed bad row; None for
    anything else."""
    if disk_full(err):
        try:
            free = f"{shutil.disk_usage(run_dir).free / 2**20:.0f} MiB free"
        except OSError:
            free = "free space unknown"
        return (f"the disk holding {run_dir} is full ({free}). Free space there, or save less: "
                "`train.save_total_limit: 1` keeps only the newest checkpoint, a larger `train.save_steps:` saves "
                f"less often. {_kept(run_dir)}")
    if out_of_memory(err):
        return f"{_memory_advice(resolved, args)}\n{_kept(run_dir)}"
    if isinstance(err, StreamedRowError):  # the message names the row
        found = complete_checkpoints(run_dir)
        if not found:
            return "Fix the row, or leave it out, and run again with `--overwrite` (no checkpoint had been completed)."
        return (f"Fix the row, or leave it out, and continue from the last complete checkpoint, {found[0]}, with the "
                "same command plus `--resume auto --resume-force` (the edited file's hash differs from the recorded one).")
    if isinstance(err, Diverged):
        return ("Lower `train.learning_rate` (or raise `train.warmup_steps`); check for rows cut to nothing by "
                "`data.max_length` (`llmtune plan` counts rows over it; preference methods need room for the "
                "completion after the prompt); prefer bfloat16 or float32 to float16. No model was saved from the "
                f"diverged weights. {_kept(run_dir)}")
    return None


def _memory_advice(resolved, args) -> str:
    """The plan's estimate for this recipe and, in order, the changes that lower it (as `llmtune plan` lists them)."""
    import torch


    config = resolved.config
    budget, where = 0, "CPU memory"  # no budget: every change is listed
    if torch.cuda.is_available():
        budget = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
        where = f"GPU memory ({memory.gib(budget)} per GPU)"
    seq_len = config["data"]["max_length"] or 2048
    try:
        shape = memory.model_shape(config, resolved.method.head)
        settings = memory.Settings(
            batch=args.per_device_train_batch_size * (2 if resolved.method.paired else 1),
            seq_len=seq_len, checkpointing=bool(args.gradient_checkpointing),
            optim=getattr(args.optim, "value", str(args.optim)), quant=config.get("quantization"),
            adapter=config.get("adapter"), processes=int(os.environ.get("WORLD_SIZE", "1")))
        total, changes = memory.estimate(shape, settings).total, memory.suggestions(shape, settings, budget)
    except Exception as failure:  # diagnostics must not hide the out-of-memory error itself
        return f"ran out of {where}; `llmtune plan RECIPE` estimates the memory a recipe needs ({failure})"
    listed = "".join(f"\n  - {change}: {memory.gib(after)}" for change, after in changes)
    return (f"ran out of {where}. `llmtune plan` estimates {memory.gib(total)} per GPU for this recipe at "
            f"`data.max_length: {seq_len}` (lower it if your rows are shorter). Each change lowers it (the "
            f"estimate after it and those above it):{listed}")
