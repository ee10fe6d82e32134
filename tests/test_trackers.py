"""`train.report_to:` trackers write into the run directory, offline: TensorBoard, W&B, MLflow and trackio trained
and read back for real (each where its package is installed; the dev extra installs the first three), a missing one
refused by `validate` naming its extra, and the user's own tracker settings left as they are."""

import importlib.util
import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from llmtune.cli import app
from llmtune.runner.trackers import environment, point, unpoint

from .conftest import cli, make_recipe

INSTALLED = [name for name in ("tensorboard", "wandb", "mlflow", "trackio") if importlib.util.find_spec(name)]
SECRET = "wandb_planted_7777_secret"


def needs(name):
    return pytest.mark.skipif(name not in INSTALLED, reason=f"the {name} extra is not installed")


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """Three logged steps on builtin:tiny with every installed tracker, as a user runs it (a subprocess: the
    trackers' settings go into the training process's environment)."""
    if not INSTALLED:
        pytest.skip("no tracker package is installed (the dev extra installs tensorboard, wandb, mlflow-skinny, trackio)")
    folder = tmp_path_factory.mktemp("trackers")
    recipe = make_recipe(folder, data={"max_length": 128},
                         train={"max_steps": 3, "logging_steps": 1, "learning_rate": 3e-3, "save_strategy": "no",
                                "per_device_train_batch_size": 4, "report_to": INSTALLED})
    out = folder / "run"
    env = {"WANDB_API_KEY": SECRET}  # offline, the key is never used, and never written down
    result = cli("sft", recipe, "--output-dir", out, cwd=folder, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def logged_losses(run: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(row["step"], row["loss"]) for row in rows if "loss" in row]


@pytest.mark.slow
@needs("tensorboard")
def test_tensorboard_event_files_hold_the_logged_losses(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard")).Reload()
    scalars = [(event.step, event.value) for event in events.Scalars("train/loss")]
    expected = logged_losses(run)
    assert len(expected) == 3
    assert [step for step, _ in scalars] == [step for step, _ in expected]
    assert [value for _, value in scalars] == pytest.approx([loss for _, loss in expected], rel=1e-6)
    assert not (run / "runs").exists()  # transformers' own default folder is not used


@pytest.mark.slow
@needs("mlflow")
def test_mlflow_file_store_in_the_run_holds_the_logged_losses(run, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # as docs/runs.md says to read it

    client = MlflowClient(tracking_uri=(run / "mlflow").resolve().as_uri())
    (found,) = client.search_runs(experiment_ids=["0"])
    history = sorted((m.step, m.value) for m in client.get_metric_history(found.info.run_id, "loss"))
    assert history == [(step, pytest.approx(loss, rel=1e-6)) for step, loss in logged_losses(run)]
    assert found.data.params["learning_rate"] == "0.003"


@pytest.mark.slow
@needs("wandb")
def test_wandb_runs_offline_into_the_run_directory_without_the_key(run):
    (offline,) = (run / "wandb").glob("offline-run-*")  # offline: nothing was sent
    (record,) = offline.glob("run-*.wandb")
    data = record.read_bytes()
    for _, loss in logged_losses(run):  # each logged loss, as the JSON W&B stores history values in
        assert json.dumps(loss).encode() in data
    leaked = [p for p in run.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]
    assert leaked == []


@pytest.mark.slow
@needs("trackio")
def test_trackio_database_in_the_run_holds_the_logged_losses(run):
    import sqlite3

    (database,) = (run / "trackio").glob("*.db")  # trackio's local store: no Space unless one is named
    with sqlite3.connect(database) as db:
        rows = [json.loads(metrics) for (metrics,) in db.execute("SELECT metrics FROM metrics ORDER BY step")]
    losses = [(row["train/global_step"], row["train/loss"]) for row in rows if "train/loss" in row]
    assert losses == logged_losses(run)


def test_the_users_tracker_settings_win(monkeypatch, tmp_path):
    for key in ("WANDB_MODE", "WANDB_DIR", "WANDB_SILENT", "MLFLOW_TRACKING_URI", "TENSORBOARD_LOGGING_DIR",
                "TRACKIO_DIR", "MLFLOW_ALLOW_FILE_STORE"):
        monkeypatch.delenv(key, raising=False)
    assert environment([], tmp_path) == {}
    assert environment(["tensorboard", "trackio"], tmp_path) == {
        "TENSORBOARD_LOGGING_DIR": str(tmp_path / "tensorboard"), "TRACKIO_DIR": str(tmp_path / "trackio")}
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.internal:5000")
    chosen = environment(["wandb", "mlflow"], tmp_path)
    assert chosen == {"WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true", "MLFLOW_ALLOW_FILE_STORE": "true"}
    # set for the run only: a second run in this process does not write into the first one's folder
    unpoint(point(["tensorboard", "wandb"], tmp_path))
    assert "TENSORBOARD_LOGGING_DIR" not in os.environ and "WANDB_DIR" not in os.environ
    assert os.environ["WANDB_MODE"] == "online"


@pytest.mark.parametrize("tracker", ["tensorboard", "wandb", "mlflow", "trackio"])
def test_a_missing_tracker_is_refused_by_validate_naming_its_extra(tracker, tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.split(".")[0].lower() in (tracker, "tensorboardx") else
                        real(name, *a))
    recipe = make_recipe(tmp_path, train={"report_to": tracker})
    result = CliRunner().invoke(app, ["validate", str(recipe)])
    assert result.exit_code == 2, result.output
    line = next(n for n, text in enumerate(recipe.read_text().splitlines(), 1) if "report_to" in text)
    assert f"error: {recipe}:{line}:" in result.stderr
    assert f"`train.report_to: {tracker}` needs the {tracker} package, which is not installed; " \
           f"`pip install 'llmtune-recipes[{tracker}]'`" in result.stderr
    assert "Traceback" not in result.stderr
