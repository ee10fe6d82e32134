"""No run is ever lost: the lock decides who writes, --overwrite touches only llmtune's own runs, and
recording a failure survives a full or read-only disk."""

import errno
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llmtune.errors import UserError
from llmtune.recipe.check import resolve
from llmtune.runner import lock
from llmtune.runner.rundir import RunDir
from llmtune.runner.session import TrainingFailed
from llmtune.runner.session import train as run

from .conftest import RECIPES, cli, make_recipe

TRAIN = {"learning_rate": 3.0e-3, "max_steps": 4, "per_device_train_batch_size": 8, "gradient_checkpointing": False,
         "logging_steps": 1, "save_steps": 2, "disable_tqdm": True}

# The CLI after patching Trainer.train to do ACTION (a fault) and then fail.
HARNESS = """
import os, subprocess, sys
from transformers import Trainer
def train(self, *args, **kwargs):
    {action}
    raise RuntimeError("boom")
Trainer.train = train
from llmtune.cli import main
sys.argv = ["llmtune", *sys.argv[1:]]
main()
"""


@pytest.fixture
def recipe(tmp_path):
    (tmp_path / "data").mkdir()
    shutil.copy(RECIPES / "data" / "chat.jsonl", tmp_path / "data" / "chat.jsonl")
    return make_recipe(tmp_path, data={"train": [{"path": "data/chat.jsonl"}], "max_length": 128},
                       adapter={"type": "lora", "r": 8, "alpha": 16}, train=TRAIN)


def manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


@pytest.mark.slow
def test_two_runs_started_seconds_apart_into_one_directory_never_replace_each_other(recipe, tmp_path):
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "llmtune", "sft", recipe, "--output-dir", out],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1.5)
    second = subprocess.Popen([sys.executable, "-m", "llmtune", "sft", recipe, "--output-dir", out],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    results = [(p.returncode, err) for p in (first, second) for _, err in [p.communicate(timeout=600)]]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    refused = next(err for code, err in results if code == 2)
    assert "another run is writing into this directory" in refused or "holds a finished run" in refused, refused
    assert manifest(out)["status"] == "completed" and (out / "adapter_model.safetensors").is_file()
    assert not (out / lock.NAME).exists()


def test_a_run_that_finished_while_another_was_reading_its_data_is_not_replaced(recipe, tmp_path):
    """The race the staggered test can only hit by chance: the check passed on an empty directory, then
    another run finished there before this one took the lock."""
    out = tmp_path / "run"
    resolved = resolve(recipe)
    late = RunDir(out, resolved)  # looked while the directory was still empty
    run(resolved, ["llmtune", "sft", str(recipe)], output_dir=str(out))
    before = {p.name: p.stat().st_mtime_ns for p in out.rglob("*")}
    with pytest.raises(UserError, match="holds a finished run"):
        late.start(data=None, argv=[])
    assert {p.name: p.stat().st_mtime_ns for p in out.rglob("*")} == before
    assert not (out / lock.NAME).exists()


@pytest.mark.slow
def test_overwrite_refuses_a_folder_that_is_not_a_run_directory_and_deletes_nothing(recipe, tmp_path):
    out = tmp_path / "mine"
    (out / "checkpoint-best").mkdir(parents=True)
    planted = {"model.safetensors": "weights", "config.json": "{}", "checkpoint-best/notes.txt": "keep"}
    for name, text in planted.items():
        (out / name).write_text(text)
    result = cli("sft", recipe, "--output-dir", out, "--overwrite")
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    refusal = (f"'{out}' is not empty (checkpoint-best, config.json, model.safetensors) and is not an llmtune run "
               "directory (no manifest.json), so llmtune will not write into it, even with --overwrite; choose a new "
               "or empty folder")
    assert [line for line in result.stderr.splitlines() if line.startswith("error: ")] == [
        f"error: output directory {refusal}"]
    checked = cli("validate", recipe, "--set", f"output_dir={out}")  # validate refuses it too, at the `--set`
    assert checked.returncode == 2 and checked.stderr == f"error: --set output_dir={out}: `output_dir` {refusal}\n"
    assert {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()} == set(planted)
    assert all((out / name).read_text() == text for name, text in planted.items())


def test_a_refused_start_removes_the_folder_it_created(recipe, tmp_path):
    out = tmp_path / "a" / "b"
    resolved = resolve(recipe)
    early = RunDir(out, resolved)
    out.mkdir(parents=True)
    (out / "theirs.txt").write_text("x")  # someone else's file appears before the lock is taken
    with pytest.raises(UserError, match="not an llmtune run directory"):
        early.start(data=None, argv=[])
    assert (out / "theirs.txt").read_text() == "x" and not (out / lock.NAME).exists()


def test_failure_recorded_on_a_simulated_full_disk_leaves_no_lock_or_temp_file(recipe, tmp_path, monkeypatch):
    """The writer fails with ENOSPC once training fails: one error, the manifest write said, nothing left."""
    from transformers import Trainer

    out = tmp_path / "run"
    full = {"on": False}
    original = Path.write_text

    def write_text(self, *args, **kwargs):
        if full["on"] and str(self).startswith(str(out)):
            original(self, "{")  # half a file, as a disk filling mid-write leaves it
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, *args, **kwargs)

    def train(self, *args, **kwargs):
        full["on"] = True
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", write_text)
    monkeypatch.setattr(Trainer, "train", train)
    with pytest.raises(TrainingFailed) as failed:
        run(resolve(recipe), ["llmtune"], output_dir=str(out))
    assert f"the disk holding {out} is full" in failed.value.hint
    assert f"could not record status `failed` in {out / 'manifest.json'}: No space left on device" \
        in failed.value.hint
    assert manifest(out)["status"] == "running"  # the last whole manifest, never a half-written one
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []


def mount_tmpfs(path: Path, size: str) -> None:
    """A real small disk (the suite runs as root, as CI's set-up line does: it installs Debian packages)."""
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True,
                          text=True)
    assert done.returncode == 0, f"mounting a tmpfs (as root) failed: {done.stderr}"


FAULTS = {
    # fill every free byte, then fail: the failure handler writes onto a full disk
    "full": "out = sys.argv[sys.argv.index('--output-dir') + 1]; subprocess.run(['dd', 'if=/dev/zero', "
            "'of=' + os.path.join(out, 'filler'), 'bs=1M'], capture_output=True)",
    # the run directory turns read-only under the run (a read-only bind mount over it; open files stay writable)
    "readonly": "out = sys.argv[sys.argv.index('--output-dir') + 1]; subprocess.run(['mount', '--bind', out, out], "
                "check=True); subprocess.run(['mount', '-o', 'remount,bind,ro', out], check=True)",
}


@pytest.mark.slow
@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_failure_recorded_on_a_real_full_or_read_only_tmpfs(fault, recipe, tmp_path):
    disk = tmp_path / "disk"
    mount_tmpfs(disk, "64m")
    out = disk / "run"
    try:
        result = subprocess.run([sys.executable, "-c", HARNESS.format(action=FAULTS[fault]), "sft", recipe,
                                 "--output-dir", out], capture_output=True, text=True, timeout=600)
        assert result.returncode == 1, result.stderr
        assert "--- Logging error ---" not in result.stderr
        errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
        assert errors[:2] == ["error: training failed: RuntimeError: boom",
                              f"error: could not record status `failed` in {out / 'manifest.json'}: "
                              + ("No space left on device" if fault == "full" else "Read-only file system")]
        if fault == "full":
            # The traceback is shown once: in train.log when it still fits there (tmpfs fills by pages, so the
            # log's last page may have room for it), else on the terminal.
            if errors[2:] == [f"error: full traceback: {out / 'train.log'}"]:
                assert "RuntimeError: boom" in (out / "train.log").read_text() and "Traceback" not in result.stderr
            else:
                assert len(errors) == 2 and result.stderr.count("Traceback") == 1, result.stderr
            assert not (out / lock.NAME).exists()
        else:  # train.log was open before: it has the traceback
            assert errors[2:] == [f"error: full traceback: {out / 'train.log'}"] and "Traceback" not in result.stderr
            # nothing can be removed from a read-only directory: the lock left is stale, and the next run clears it
            assert lock.holder(out) is None and (out / lock.NAME).exists()
            subprocess.run(["umount", str(out)], check=True)
            assert lock.holder(out) is None and not (out / lock.NAME).exists()
        assert manifest(out)["status"] == "running"  # the last whole manifest, never half of one
        assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
    finally:
        for mount in (out, disk):
            subprocess.run(["umount", "-l", str(mount)], capture_output=True)
