"""The run directory: resolved recipe, manifest, metrics, loss plot, model card.

Layout (DESIGN.md): the model or adapter and tokenizer, `recipe.yaml`, `manifest.json`,
`README.md`, `metrics.jsonl`, `loss.png`, `checkpoint-N/`, and `train.log` with warnings
and, after a failure, the traceback.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import yaml

from .. import __version__
from ..errors import UserError
from ..files import ARTIFACTS, read_manifest, someone_elses, write_json
from ..ranks import is_main_process
from ..recipe.preflight import output_dir_problem
from ..secret import redact, scrub
from . import card, lock
from . import metrics as judged
from .gate import summary as gate_summary
from .resume import prepare

PACKAGES = ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "bitsandbytes", "deepspeed")


def now() -> str:
    """The time in UTC, to the second, as every record writes it."""
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def package_versions() -> dict:
    versions = {"llmtune": __version__, "python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def git_state(folder: Path) -> dict | None:
    """Commit of the git repository holding the recipe, and whether it had local changes."""
    try:
        commit = subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=5)
        if commit.returncode:
            return None
        dirty = subprocess.run(["git", "-C", str(folder), "status", "--porcelain"], capture_output=True,
                               text=True, timeout=5)
        return {"commit": commit.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return None


def devices() -> dict:
    import torch

    info = {"cpu_count": os.cpu_count(), "platform": platform.platform()}
    if torch.cuda.is_available():
        info["cuda"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


class RunDir:
    """Everything llmtune writes for one run, in one folder."""

    def __init__(self, path: Path, resolved, overwrite: bool = False, resume: str | None = None):
        self.path = Path(path)
        self.resolved = resolved
        self.overwrite, self.resume = overwrite, resume
        # Under a launch only rank 0 writes here, so only it checks (the others would see its first files).
        if is_main_process():
            problem = output_dir_problem(self.path)  # as `validate` checks the recipe's `output_dir`
            if problem:
                raise UserError(f"output directory {problem}")
            lock.refuse_if_held(self.path)
            self.refuse_if_taken()  # early, before the data is read; decided again under the lock in start()
        self.manifest: dict = {}
        self.lock: Path | None = None

    def refuse_if_taken(self) -> None:
        """Refuse a directory holding someone else's files, or a run this one must not replace or continue."""
        entries = [p.name for p in self.path.iterdir() if p.name != lock.NAME] if self.path.is_dir() else []
        if not entries:
            return
        # --overwrite would delete the user's files; a live run's lock was refused before, a stale one is no proof
        foreign = someone_elses(self.path, lock_counts=False)
        if foreign:
            raise UserError(f"output directory {foreign}")
        if self.overwrite:
            return
        status = read_manifest(self.path).get("status")
        finished = status == "completed" or any((self.path / name).exists() for name in ARTIFACTS)
        if finished or not (self.resume and status):  # resuming writes into the unfinished run it continues
            what = "holds a finished run" if finished else f"holds an unfinished run ({status})" if status \
                else "is not empty"
            again = "--resume auto to continue it, " if status and not finished else ""
            raise UserError(f"{self.path}: output directory {what}; pass {again}--output-dir DIR for a new run "
                            "or --overwrite to write into it")

    def start(self, data, argv: list[str], checkpoint: Path | None = None) -> None:
        """Take the directory (lock), decide again under it, clear what an earlier run left, write recipe and
        manifest. Refused or failed, it leaves the lock released and a folder it created removed."""
        if not is_main_process():
            return
        created = [p for p in [self.path, *self.path.parents] if not p.exists()]
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self.lock = lock.acquire(self.path)
        except OSError as err:
            raise UserError(f"{self.path}: cannot create the run directory: {err.strerror}; pass --output-dir "
                            "DIR (a writable folder)") from None
        try:
            # Another run into this directory may have finished since __init__ looked: nothing is replaced
            # unless this run, now holding the lock, may replace it.
            self.refuse_if_taken()
            self._write_start(data, argv, checkpoint)
        except BaseException as err:
            lock.release(self.lock)
            self.lock = None
            if created:  # this run made the folder: a refused or failed start leaves none behind
                shutil.rmtree(created[-1], ignore_errors=True)
            if isinstance(err, OSError):
                raise UserError(f"{self.path}: cannot write the run directory: {err.strerror}; free space there "
                                "or pass --output-dir DIR (a writable folder)") from None
            raise

    def _write_start(self, data, argv: list[str], checkpoint: Path | None) -> None:
        previous = read_manifest(self.path) if checkpoint is not None else {}
        prepare(self.path, checkpoint)
        recipe = redact({**self.resolved.config, "output_dir": str(self.path)}, self.resolved.recipe.secrets)
        text = "# Resolved by llmtune: every default filled in; rerun with `llmtune train recipe.yaml`.\n"
        # scrub: a secret from the environment may also come in through `--set` or a path, not only `${env:...}`
        (self.path / "recipe.yaml").write_text(scrub(text + yaml.safe_dump(recipe, sort_keys=False)),
                                               encoding="utf-8")
        method = self.resolved.method
        self.manifest = {
            "llmtune": __version__,
            "method": method.name,
            "experimental": method.experimental,
            "recipe": str(self.resolved.recipe.path),
            "recipe_git": git_state(self.resolved.recipe.path.parent),
            "command": scrub(" ".join(argv)),
            "packages": package_versions(),
            "devices": devices(),
            "data": json.loads(scrub(json.dumps([vars(s) for s in data.sources]))),
            "data_shape": data.shape,  # conversational or not: `llmtune eval` applies the chat template to match
            "trust_remote_code": self.resolved.config["model"]["trust_remote_code"],
            "started": previous.get("started", now()),
            "status": "running",
        }
        if checkpoint is not None:
            self.manifest["resumed"] = [*previous.get("resumed", []), {"from": str(checkpoint), "at": now()}]
        write_json(self.path / "manifest.json", self.manifest)

    def record(self, **fields) -> None:
        """Add `fields` to the manifest now (e.g. settings known only once the model is loaded)."""
        if not is_main_process():
            return
        self.manifest.update(fields)
        write_json(self.path / "manifest.json", self.manifest)

    def finish(self, status: str, metrics: dict) -> str | None:
        """Record the outcome and release the lock; what could not be recorded (a full or read-only disk) is
        returned, not raised, so it never hides the failure being recorded."""
        if not is_main_process():
            return None
        self.manifest.update(status=status, finished=now(), metrics=metrics)
        try:
            write_json(self.path / "manifest.json", self.manifest)
            if status == "completed":
                card.write(self.path, scrub)
        except OSError as err:
            return f"could not record status `{status}` in {self.path / 'manifest.json'}: {err.strerror}"
        finally:
            lock.release(self.lock)  # on a read-only disk it stays; the next run clears it (its process is gone)
        return None

    def plot(self, method: str, logged: list[dict]) -> None:
        """loss.png: a panel per metric `method` is judged by (the loss among them); the panels drawn go in the
        manifest."""
        if is_main_process():
            panels = judged.plot({"": (method, logged)}, self.path / "loss.png")
            self.record(plot={"file": "loss.png", "panels": panels})

    def log_handler(self) -> logging.Handler:
        """A file handler for `train.log`; warnings go there, not to the terminal (rank 0's only)."""
        if not is_main_process():
            return logging.NullHandler()
        class Scrubbed(logging.Formatter):  # a traceback or warning may quote a token from the environment
            def format(self, record):
                return scrub(super().format(record))

        class Log(logging.FileHandler):
            failed = False

            def handleError(self, record):  # a full disk: no second traceback on the terminal; the caller says so
                self.failed = True

        handler = Log(self.path / "train.log", encoding="utf-8")
        handler.setFormatter(Scrubbed("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        return handler


def metrics_callback(path: Path):
    """A TrainerCallback appending every logged step to metrics.jsonl."""
    from transformers import TrainerCallback

    class MetricsWriter(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and logs:
                with path.open("a", encoding="utf-8") as out:
                    out.write(json.dumps({"step": state.global_step, "epoch": state.epoch, **logs}) + "\n")

    return MetricsWriter()


def read_metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def progress_callback(method: str):
    """Transformers' progress bar, showing the loss, the eval loss and `method`'s metrics instead of printing every
    log dict under it."""
    from transformers.trainer_callback import ProgressCallback

    shown: dict = {}  # what the bar shows, kept between log rows (the eval loss comes in rows of its own)

    class Bar(ProgressCallback):
        def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
            pass  # evaluation is short; a second bar would only scroll the first

        def on_log(self, args, state, control, logs=None, **kwargs):
            if self.training_bar is not None and logs:
                self.training_bar.set_postfix(judged.bar(method, logs, shown), refresh=False)

    return Bar


def close_progress(trainer) -> None:
    """End the progress bar's line, so that an error printed after a failed step starts on a line of its own."""
    from transformers.trainer_callback import ProgressCallback

    for callback in trainer.callback_handler.callbacks if trainer else ():
        if isinstance(callback, ProgressCallback) and callback.training_bar is not None:
            callback.training_bar.close()
            callback.training_bar = None


def summarize(run_dir: Path, metrics: dict, stream=None) -> None:
    manifest = read_manifest(run_dir)
    shown = judged.summary(manifest.get("method", ""), metrics)
    hub = manifest.get("hub")  # where `hub:` uploaded the run
    gate = manifest.get("eval_gate")
    (stream or sys.stdout).write(f"\nrun directory: {run_dir}\n{shown}\n" +
                                 (f"on the Hub: {hub['url']}\n" if hub else "") +
                                 (gate_summary(gate) + "\n" if gate else ""))
