"""Checkpoints that survive a kill, carry what they depend on, and are found again by `--resume`.

Transformers writes `checkpoint-N/` in place, so a run killed half-way through a save leaves
a folder that looks resumable and is not. Here every checkpoint (and the final model) is
written under `.partial/` and renamed into place once every process has finished writing it;
`--resume auto` only ever sees complete ones. Each checkpoint also holds `llmtune.json`: the
recipe and data fingerprint it was trained with, compared before resuming.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from .. import __version__
from ..compat import stage_checkpoints
from ..errors import UserError
from ..files import write_atomic

STAGING = ".partial"  # where checkpoints and the final model are written before the rename
STAMP = "llmtune.json"  # in each checkpoint: the fingerprint of what it was trained on
PREFIX = "checkpoint-"


def fingerprint(resolved, data, args) -> dict[str, str]:
    """What a checkpoint depends on; a change to any of these makes resuming it continue a different run.

    Training length, logging, saving and evaluation settings are left out: changing them is
    what resuming is for.
    """
    config = resolved.config
    model = config["model"]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    out = {
        "method": resolved.method.name,
        "model.name": model["name"] + (f"@{model['revision']}" if model.get("revision") else ""),
        "model.dtype": model["dtype"],
        "adapter": _compact(config.get("adapter")),
        "quantization": _compact(config.get("quantization")),
        "data.max_length": _compact(config["data"]["max_length"]),
        # As used, not as written: null packs or not depending on the machine's attention (defaults.py).
        "data.packing": _compact(getattr(args, "packing", config["data"]["packing"])),
        "seed": _compact(config["seed"]),
        "batch shape": f"{args.per_device_train_batch_size} per device x {args.gradient_accumulation_steps} "
                       f"accumulation steps x {world} processes",
    }
    for i, source in enumerate(data.sources, 1):
        content = f"sha256 {source.sha256[:12]}" if source.sha256 else f"revision {source.revision}"
        used = "streamed" if source.used is None else f"{source.used} rows used"  # the wording old stamps hold
        out[f"data source {i}"] = f"{os.path.basename(source.path)} ({source.format}, {used}, " \
                                  f"{content})"
    return out


def refuse_nothing_left(checkpoint: Path | None, max_steps: int, force: bool) -> None:
    """Resuming a checkpoint already at (or past) `train.max_steps` would "complete" having trained nothing."""
    if checkpoint is None or force or max_steps <= 0:
        return
    done = json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))["global_step"]
    if done >= max_steps:
        raise UserError(f"{checkpoint}: cannot resume: it is at step {done} and `train.max_steps` is {max_steps}, "
                        f"so nothing would be trained; raise `train.max_steps` above {done} (give the first run's "
                        "`--set` options again, if it had any), or pass --resume-force to finish at once")


def _compact(value) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def differences(old: dict, new: dict) -> list[str]:
    return [f"{key}: {old.get(key, '(none)')} -> {new.get(key, '(none)')}"
            for key in dict.fromkeys([*old, *new]) if old.get(key) != new.get(key)]


def step_of(checkpoint: Path) -> int:
    return int(checkpoint.name[len(PREFIX):])


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """The run's resumable checkpoints, newest first (a half-written one is still under `.partial/`)."""
    if not run_dir.is_dir():
        return []
    found = [p for p in run_dir.iterdir() if p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit()
             and (p / "trainer_state.json").is_file()]
    return sorted(found, key=step_of, reverse=True)


def checkpoint_to_resume(run_dir: Path, resume: str | None, current: dict, force: bool = False) -> Path | None:
    """The checkpoint `--resume auto|PATH` names, checked against the current recipe and data.

    None means a new run: no `--resume`, or `auto` with no complete checkpoint yet (so one
    command line serves both the first start and every restart of a pre-emptible job).
    """
    if resume is None:
        return None
    if resume == "auto":
        found = complete_checkpoints(run_dir)
        if not found:
            return None
        checkpoint = found[0]
    else:
        checkpoint = Path(resume)
        if not (checkpoint / "trainer_state.json").is_file():  # a run directory: its newest checkpoint
            found = complete_checkpoints(checkpoint)
            if not found:
                raise UserError(f"--resume {resume}: not a complete checkpoint, nor a run directory holding one; "
                                "give a `checkpoint-N` folder, or `--resume auto` for the newest in the output "
                                "directory")
            checkpoint = found[0]
        if checkpoint.resolve().parent == run_dir.resolve():
            newer = [p.name for p in complete_checkpoints(run_dir) if step_of(p) > step_of(checkpoint)]
            if newer:
                raise UserError(f"--resume {resume}: {run_dir} also holds the newer {', '.join(newer)}, which a "
                                "later `--resume auto` would take; delete them to go back to this checkpoint, or "
                                "pass --output-dir DIR to continue from it in a new directory")
    if force:
        return checkpoint
    stamp = checkpoint / STAMP
    if not stamp.is_file():
        raise UserError(f"{checkpoint}: no {STAMP}, so this checkpoint was not written by llmtune and cannot be "
                        "checked against the recipe; pass --resume-force to resume from it anyway")
    changed = differences(json.loads(stamp.read_text(encoding="utf-8"))["fingerprint"], current)
    if changed:
        listed = "".join(f"\n  {line}" for line in changed)
        raise UserError(f"{checkpoint}: cannot resume: the recipe or data changed since this checkpoint was "
                        f"written (checkpoint -> now):{listed}\nResuming would continue a different run. Undo "
                        "the change, start a new run with --output-dir DIR, or pass --resume-force to resume "
                        "anyway")
    return checkpoint


EARLIER_MODEL = ("adapter_config.json", "adapter_model.*", "model*.safetensors*", "pytorch_model*.bin*",
                 "config.json", "generation_config.json", "loss.png")


def prepare(run_dir: Path, checkpoint: Path | None) -> None:
    """Clear what an earlier run left that does not belong to this one.

    Always a half-written save; for a new run also old checkpoints, metrics and log (only
    reached for an empty directory, `--overwrite`, or `--resume auto` with nothing to
    resume); when resuming, the metrics logged after the checkpoint, which training repeats.
    """
    shutil.rmtree(run_dir / STAGING, ignore_errors=True)
    metrics = run_dir / "metrics.jsonl"
    if checkpoint is None:
        for old in run_dir.glob(f"{PREFIX}*"):
            shutil.rmtree(old, ignore_errors=True)
        metrics.unlink(missing_ok=True)
        (run_dir / "train.log").unlink(missing_ok=True)
        # The earlier run's model: a full run over a LoRA one must not leave an adapter_config.json
        # that makes loaders take the folder for an adapter (and the other way round).
        for pattern in EARLIER_MODEL:
            for old in run_dir.glob(pattern):
                old.unlink(missing_ok=True)
    elif metrics.is_file() and checkpoint.resolve().parent == run_dir.resolve():
        step = json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))["global_step"]
        kept = []
        for line in metrics.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line)
            except ValueError:  # a line cut short by a kill
                pass
        write_atomic(metrics, "".join(line + "\n" for line in kept))
    elif metrics.is_file():  # continuing another run's checkpoint: this directory's own metrics are stale
        metrics.unlink()


def _place(staged: Path, target: Path) -> None:
    """Rename `staged` onto `target`; an older folder `target` (a re-save at the same step) goes only after."""
    if not target.is_dir():
        os.replace(staged, target)
        return
    old = staged.parent / f"{target.name}.old"
    shutil.rmtree(old, ignore_errors=True)
    os.replace(target, old)
    os.replace(staged, target)
    shutil.rmtree(old, ignore_errors=True)


# TRL 1.16's SFT, DPO and KTO trainers count the trained tokens (the `num_tokens` metric) in an attribute
# no checkpoint holds, so after a resume it would restart at 0: llmtune keeps it in llmtune.json. Drop
# once TRL keeps it in TrainerState, as its GRPO trainer does (`num_input_tokens_seen`).
TOKEN_COUNT = "_total_train_tokens"


def make_resumable(trainer, current: dict, checkpoint: Path | None) -> None:
    """Make `trainer` write each checkpoint under `.partial/` and rename it into place when complete;
    when resuming, restore what transformers does not."""
    from transformers.trainer_utils import rotate_checkpoints

    if checkpoint is not None and hasattr(trainer, TOKEN_COUNT) and (checkpoint / STAMP).is_file():
        counted = json.loads((checkpoint / STAMP).read_text(encoding="utf-8")).get("tokens")
        if counted is not None:
            setattr(trainer, TOKEN_COUNT, counted)
    def staged_save(save_into, run_dir: Path):
        staging = run_dir / STAGING
        name = f"{PREFIX}{trainer.state.global_step}"
        try:
            save_into(staging)
            trainer.accelerator.wait_for_everyone()  # every rank has written its shard / RNG state
            if trainer.args.should_save:
                _seal(trainer, staging / name, current)
                _place(staging / name, run_dir / name)
                shutil.rmtree(staging, ignore_errors=True)
        except BaseException:
            shutil.rmtree(staging / name, ignore_errors=True)  # a full disk gets its space back
            raise
        if trainer.args.should_save:
            rotate_checkpoints(str(run_dir), trainer.args.save_total_limit, trainer.state.best_model_checkpoint)
        trainer.accelerator.wait_for_everyone()

    stage_checkpoints(trainer, staged_save)


def _seal(trainer, staged: Path, current: dict) -> None:
    """Finish a checkpoint written under `.partial/`: its paths as they will be, its stamp, no pickle."""
    state = trainer.state
    if state.best_model_checkpoint and Path(state.best_model_checkpoint).parent == staged.parent:
        state.best_model_checkpoint = str(staged.parent.parent / Path(state.best_model_checkpoint).name)
        state.save_to_json(str(staged / "trainer_state.json"))
    # A pickle of the arguments: version-bound, can hold secrets, and resuming does not read it.
    (staged / "training_args.bin").unlink(missing_ok=True)
    stamp = {"llmtune": __version__, "step": state.global_step, "fingerprint": current,
             "tokens": getattr(trainer, TOKEN_COUNT, None)}
    (staged / STAMP).write_text(json.dumps(stamp, indent=2) + "\n", encoding="utf-8")


def save_final(trainer, tokenizer, run_dir: Path) -> None:
    """The trained model and tokenizer, written under `.partial/` and then moved into the run directory."""
    staging = run_dir / STAGING / "final"
    try:
        trainer.save_model(str(staging))
        if trainer.args.should_save:
            tokenizer.save_pretrained(str(staging))
            # A pickle of the arguments: not loadable without llmtune's exact versions, and recipe.yaml says it all.
            (staging / "training_args.bin").unlink(missing_ok=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # a full disk gets its space back
        raise
    trainer.accelerator.wait_for_everyone()
    if trainer.args.should_save:
        for item in sorted(staging.iterdir()):
            _place(item, run_dir / item.name)
        shutil.rmtree(run_dir / STAGING, ignore_errors=True)
