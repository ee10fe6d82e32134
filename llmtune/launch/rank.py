"""What a launched process does differently: its rank, its device, its report, its failure.

A process runs under a launcher when torchrun (which `accelerate launch` uses) has set
LOCAL_RANK, whether llmtune started the launch or the user ran `accelerate launch -m llmtune`.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from ..compat import dataset_fingerprint, fsdp_on_cpu, quiet_shm_build
from ..ranks import launched, local_rank, rank

# Where llmtune's launcher wrote the accelerate (and DeepSpeed) config; rank 0 copies it into the run.
LAUNCH_DIR_ENV = "LLMTUNE_LAUNCH_DIR"


def deepspeed_stage() -> int | None:
    """The ZeRO stage accelerate's launcher set up, or None without DeepSpeed."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
        return None
    path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if path and os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return int(json.load(f).get("zero_optimization", {}).get("stage", 0))
    return int(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "0"))


def sharded() -> bool:
    """True when FSDP or ZeRO-3 split the weights, so nothing may place the model at load time."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" or deepspeed_stage() == 3


def device_map() -> dict | None:
    """Where a quantized model is loaded (bitsandbytes quantizes while placing weights).

    One whole copy on this process's own device; never `auto` (one model split over GPUs),
    and nothing when FSDP or ZeRO-3 are to shard it.
    """
    import torch

    if launched() and sharded():
        return None
    return {"": f"cuda:{local_rank()}" if torch.cuda.is_available() else "cpu"}


def training_args() -> dict:
    """TrainingArguments a launched process needs on a machine without GPUs (none otherwise).

    transformers and accelerate take a launch without GPUs for a single process unless told:
    DDP and FSDP need `use_cpu` (gloo, MULTI_CPU; FSDP via compat.fsdp_on_cpu), DeepSpeed sets
    up its own CPU communication but accelerate counts the processes only with a backend named.
    """
    import torch

    if not launched() or torch.cuda.is_available():
        return {}
    if deepspeed_stage() is not None:
        quiet_shm_build()
        return {"ddp_backend": "gloo"}
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        fsdp_on_cpu()
    return {"use_cpu": True}


def report_callback(run_dir, data):
    """A TrainerCallback for launched runs: rank 0 keeps the launch config in the run directory, and at
    the end every rank's view of the run goes into manifest.json under `ranks` (host, device, how it
    was distributed, steps, losses it logged, the order of its data), so a run shows its ranks agreed."""
    import hashlib

    from transformers import TrainerCallback

    class RankReport(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            source = os.environ.get(LAUNCH_DIR_ENV)
            if state.is_world_process_zero and source and Path(source).is_dir():
                target = run_dir.path / "launch"
                target.mkdir(exist_ok=True)
                for item in Path(source).iterdir():
                    (target / item.name).write_bytes(item.read_bytes())

        def on_train_end(self, args, state, control, model=None, **kwargs):
            from accelerate import PartialState
            from accelerate.utils import gather_object

            losses = [entry["loss"] for entry in state.log_history if "loss" in entry]
            mine = {"rank": rank(), "host": socket.gethostname(), "device": str(args.device),
                    "distributed_type": str(PartialState().distributed_type).split(".")[-1],
                    "model": type(model).__name__, "steps": state.global_step,
                    "losses_sha256": hashlib.sha256(json.dumps(losses).encode()).hexdigest()[:16],
                    "last_loss": losses[-1] if losses else None,
                    "data_fingerprint": dataset_fingerprint(data.train)}
            everyone = gather_object([mine])
            if state.is_world_process_zero:
                run_dir.manifest["ranks"] = sorted(everyone, key=lambda r: r["rank"])

    return RankReport()


def record_failure(problems: list[str], code: int, details: str = "") -> bool:
    """Under torchrun, hand this rank's error to the launcher instead of printing it, so the launch
    shows the first failing rank's error once rather than one copy per rank. False when not launched.

    The file is the one torch's elastic agent reads (`TORCHELASTIC_ERROR_FILE`, ErrorHandler's format);
    llmtune's launcher prints it, and a plain `accelerate launch` shows it in its failure summary.
    """
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return False
    payload = {"message": {"message": "\n".join(problems),
                           "extraInfo": {"py_callstack": details, "timestamp": str(int(time.time())),
                                         "llmtune_exit_code": code, "host": socket.gethostname()}}}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(payload), encoding="utf-8")
    return True


def prints_summary() -> bool:
    """The end-of-run summary comes from rank 0, or from llmtune's launcher when it started the launch."""
    return rank() == 0 and not os.environ.get(LAUNCH_DIR_ENV)
