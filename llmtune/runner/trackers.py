"""Where `train.report_to`'s trackers write: into the run directory, offline, unless the environment says otherwise.

transformers' tracker callbacks read their settings from environment variables when the trainer is built; this
module fills in the ones the user left unset, so that a tracker named in a recipe writes next to the run's
metrics.jsonl and sends nothing over the network until its own variable says where to.
"""

from __future__ import annotations

import os
from pathlib import Path


def environment(report_to: list[str], run_dir: Path) -> dict[str, str]:
    """The variables for the trackers in `report_to` (TrainingArguments' resolved list), pointed into `run_dir`."""
    defaults = {
        # TensorBoard: event files in RUN/tensorboard (transformers' own default is RUN/runs/DATE_HOST)
        "tensorboard": {"TENSORBOARD_LOGGING_DIR": run_dir / "tensorboard"},
        # W&B: RUN/wandb/offline-run-*, uploaded later with `wandb sync`; WANDB_MODE=online syncs live. Its
        # banner lines would scroll the progress bar away; RUN/wandb/debug.log has them.
        "wandb": {"WANDB_DIR": run_dir, "WANDB_MODE": "offline", "WANDB_SILENT": "true"},
        # MLflow: a file store under RUN/mlflow (`mlflow ui --backend-store-uri RUN/mlflow`); MLflow 3 keeps it in
        # maintenance and refuses it unless allowed; it needs no database (`mlflow-skinny` has none)
        "mlflow": {"MLFLOW_TRACKING_URI": (run_dir / "mlflow").resolve().as_uri(), "MLFLOW_ALLOW_FILE_STORE": "true"},
        # trackio: its local database in RUN/trackio (`trackio show`, with TRACKIO_DIR=RUN/trackio); no Space
        # unless `train.trackio_space_id` names one
        "trackio": {"TRACKIO_DIR": run_dir / "trackio"},
    }
    chosen = {}
    for name in report_to:
        for key, value in defaults.get(name, {}).items():
            if key not in os.environ:  # the user's own setting wins, e.g. a tracking server
                chosen[key] = str(value)
    return chosen


def point(report_to: list[str], run_dir: Path) -> dict[str, str]:
    """Set `environment` for this run's trainer; what was set, for `unpoint`."""
    chosen = environment(report_to, run_dir)
    os.environ.update(chosen)
    return chosen


def unpoint(chosen: dict[str, str]) -> None:
    """Take the run's settings away again, so that a later run in this process does not write into this one."""
    for key in chosen:
        os.environ.pop(key, None)
