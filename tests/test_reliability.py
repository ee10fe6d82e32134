"""Reliability: signals and resume, atomic checkpoints, the run lock, bad input, secrets, faults.

Runs go through the CLI in a subprocess, as a user's would, with real signals. Where a fault
must hit a precise moment (a SIGKILL half-way through a checkpoint, a full disk), a small
harness patches one Trainer method in the child process before handing over to the CLI.
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llmtune.errors import UserError
from llmtune.recipe.check import resolve
from llmtune.runner import lock
from llmtune.runner.resume import STAGING, checkpoint_to_resume, complete_checkpoints
from llmtune.runner.session import TrainingFailed
from llmtune.runner.session import train as run

from .conftest import RECIPES, make_recipe, write_recipe
from .conftest import cli as plain_cli

BAD = Path(__file__).parent / "data" / "bad"
# Planted in the environment of every run here; none may reach a file llmtune writes.
SECRETS = {"HF_TOKEN": "hf_planted_1111_secret", "HUGGING_FACE_HUB_TOKEN": "hf_planted_2222_secret",
           "WANDB_API_KEY": "wandb_planted_3333_secret", "OPENAI_API_KEY": "sk-planted-4444-secret"}
STEPS = 60

TRAIN = {"learning_rate": 3.0e-3, "max_steps": STEPS, "per_device_train_batch_size": 8, "gradient_checkpointing": False,
         "logging_steps": 1, "save_steps": 10, "disable_tqdm": True, "run_name": "tiny-${env:WANDB_API_KEY}"}


def recipe_in(folder: Path, **train) -> Path:
    """The run these tests interrupt and resume, with its own copy of the data next to it (data/chat.jsonl)."""
    (folder / "data").mkdir(exist_ok=True)
    shutil.copy(RECIPES / "data" / "chat.jsonl", folder / "data" / "chat.jsonl")
    return make_recipe(folder, data={"train": [{"path": "data/chat.jsonl"}], "max_length": 128},
                       adapter={"type": "lora", "r": 8, "alpha": 16}, train={**TRAIN, **train})


# Runs the CLI after patching Trainer.METHOD to do ACTION once training reaches step STEP.
HARNESS = """
import os, signal, sys, time
import torch
from transformers import Trainer
original = Trainer.{method}
def patched(self, *args, **kwargs):
    if self.state.global_step >= {step}:
        {action}
    return original(self, *args, **kwargs)
Trainer.{method} = patched
from llmtune.cli import main
sys.argv = ["llmtune", *sys.argv[1:]]
main()
"""


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    return recipe_in(tmp_path_factory.mktemp("recipe"))


def cli(*args, **kwargs):
    return plain_cli(*args, env=SECRETS, **kwargs)


def start(*args, harness=None, group=False):
    """The CLI in a child process (optionally under the harness), with the secrets planted; `group`: in a
    process group of its own, as a terminal's foreground job is."""
    prefix = [sys.executable, "-c", HARNESS.format(**harness)] if harness else [sys.executable, "-m", "llmtune"]
    return subprocess.Popen([*prefix, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **SECRETS}, start_new_session=group)


def wait_for(condition, proc, timeout=120):
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def logged_steps(out: Path) -> int:
    metrics = out / "metrics.jsonl"
    return len(metrics.read_text().splitlines()) if metrics.exists() else 0


def losses(out: Path) -> dict:
    return {m["step"]: m["loss"] for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
            if "loss" in m}


def adapter(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(out / "adapter_model.safetensors")


def manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def assert_same_run(out: Path, reference: Path, steps: int = STEPS):
    """Same loss at every step and the same final weights as the reference run."""
    import torch

    got, want = losses(out), losses(reference)
    assert sorted(got) == list(range(1, steps + 1)) == sorted(want)
    assert [got[s] for s in sorted(got)] == pytest.approx([want[s] for s in sorted(want)], rel=1e-5, abs=1e-6)
    a, b = adapter(out), adapter(reference)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


def assert_no_secret(*folders: Path):
    for folder in folders:
        for path in folder.rglob("*"):
            if path.is_file():
                data = path.read_bytes()
                for name, value in SECRETS.items():
                    assert value.encode() not in data, f"{name} leaked into {path}"


@pytest.fixture(scope="module")
def baseline(recipe, tmp_path_factory):
    out = tmp_path_factory.mktemp("baseline") / "run"
    proc = start("sft", recipe, "--output-dir", out)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    return out


@pytest.fixture(scope="module")
def interrupted(recipe, tmp_path_factory):
    """A run stopped by Ctrl-C (SIGINT) a few steps in: (run directory, stderr)."""
    out = tmp_path_factory.mktemp("interrupted") / "run"
    proc = start("sft", recipe, "--output-dir", out)
    wait_for(lambda: logged_steps(out) >= 4, proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    return out, err


def run_in_process(recipe, out, sets=(), **kwargs):
    """`run()` as the CLI calls it, with the secrets planted."""
    with pytest.MonkeyPatch.context() as mp:
        for name, value in SECRETS.items():
            mp.setenv(name, value)
        return run(resolve(recipe, sets), ["llmtune", "sft", str(recipe)], output_dir=str(out), **kwargs)


def copy_run(out: Path, dest: Path) -> Path:
    shutil.copytree(out, dest)
    return dest


@pytest.mark.slow
def test_sigint_saves_a_checkpoint_of_the_current_step_and_exits_130(interrupted):
    out, err = interrupted
    step = manifest(out)["metrics"]["step"]
    assert 4 <= step < STEPS
    assert f"checkpoint saved in {out / f'checkpoint-{step}'}" in err and "--resume auto" in err
    assert "Traceback" not in err
    assert [p.name for p in complete_checkpoints(out)] == [f"checkpoint-{step}"]  # save_steps=10 not reached
    assert json.loads((out / f"checkpoint-{step}" / "llmtune.json").read_text())["step"] == step
    assert manifest(out)["status"] == "interrupted"
    assert max(losses(out)) == step and (out / "loss.png").is_file()  # the partial metrics are written
    assert not (out / lock.NAME).exists() and not (out / STAGING).exists()
    assert not (out / "adapter_model.safetensors").exists()  # no final model from an interrupted run


@pytest.mark.slow
def test_resume_auto_continues_to_the_same_losses_and_weights(interrupted, baseline, recipe, tmp_path):
    out = copy_run(interrupted[0], tmp_path / "run")
    step = manifest(out)["metrics"]["step"]
    proc = start("sft", recipe, "--output-dir", out, "--resume", "auto")
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    assert_same_run(out, baseline)
    record = manifest(out)
    assert record["status"] == "completed" and record["resumed"][0]["from"].endswith(f"checkpoint-{step}")
    assert record["started"] == manifest(interrupted[0])["started"]
    assert_no_secret(out, baseline, interrupted[0])
    assert "${env:WANDB_API_KEY}" in (out / "recipe.yaml").read_text()


@pytest.mark.slow
def test_second_signal_exits_at_once_and_leaves_the_partial_save_ignored(recipe, tmp_path):
    out = tmp_path / "run"
    # The save triggered by the first signal hangs, as a slow disk would.
    proc = start("sft", recipe, "--output-dir", out, "--set", "train.save_steps=1000",
                 harness={"method": "_save_rng_state", "step": 1, "action": "time.sleep(120)"})
    wait_for(lambda: logged_steps(out) >= 3, proc)
    proc.send_signal(signal.SIGTERM)
    wait_for(lambda: any((out / STAGING).glob("checkpoint-*")), proc)
    time.sleep(1.5)  # past the window in which repeats count as the same signal
    second = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and time.monotonic() - second < 20, err
    assert "exiting now" in err
    assert complete_checkpoints(out) == []  # the half-written save is not taken for a checkpoint
    (partial,) = (out / STAGING).glob("checkpoint-*")
    assert not (partial / "trainer_state.json").exists()
    assert lock.holder(out) is None and not (out / lock.NAME).exists()  # its process is gone: stale, cleared


@pytest.mark.slow
def test_sigkill_during_a_save_leaves_the_previous_checkpoint_resumable(recipe, baseline, tmp_path):
    out = tmp_path / "run"
    proc = start("sft", recipe, "--output-dir", out,
                 harness={"method": "_save_rng_state", "step": 20, "action": "os.kill(os.getpid(), signal.SIGKILL)"})
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == -signal.SIGKILL, err
    assert [p.name for p in complete_checkpoints(out)] == ["checkpoint-10"]
    half = out / STAGING / "checkpoint-20"
    assert (half / "optimizer.pt").exists() and not (half / "trainer_state.json").exists()
    assert json.loads((out / lock.NAME).read_text())["pid"] == proc.pid  # left behind by the killed run
    assert manifest(out)["status"] == "running"

    run_in_process(recipe, out, resume="auto")  # the stale lock is cleared, the half-written save ignored
    assert manifest(out)["resumed"][0]["from"].endswith("checkpoint-10")
    assert not (out / STAGING).exists() and not (out / lock.NAME).exists()
    assert_same_run(out, baseline)


@pytest.mark.distributed
def test_two_process_ddp_interrupt_and_resume_match_an_uninterrupted_run(recipe, tmp_path):
    launch = ["--set", "train.max_steps=30", "--num-processes", "2"]  # 2 CPU processes over gloo
    whole = tmp_path / "whole"
    proc = start("sft", recipe, "--output-dir", whole, *launch)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err

    out = tmp_path / "run"
    proc = start("sft", recipe, "--output-dir", out, *launch, group=True)
    wait_for(lambda: logged_steps(out) >= 4, proc)
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the launcher and both ranks get it, the launcher passes it on
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    assert err.count("interrupted: stopped at step") == 1 and "Traceback" not in err  # said once, by rank 0
    step = manifest(out)["metrics"]["step"]
    checkpoint = out / f"checkpoint-{step}"
    assert (checkpoint / "rng_state_0.pth").exists() and (checkpoint / "rng_state_1.pth").exists()  # every rank's
    assert "2 processes" in json.loads((checkpoint / "llmtune.json").read_text())["fingerprint"]["batch shape"]

    proc = start("sft", recipe, "--output-dir", out, *launch, "--resume", "auto")
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    assert_same_run(out, whole, steps=30)
    assert_no_secret(out, whole)


def changed_data_recipe(recipe: Path, folder: Path) -> Path:
    (folder / "data").mkdir(parents=True)
    rows = (recipe.parent / "data" / "chat.jsonl").read_text().splitlines()
    rows[0] = rows[0].replace("11 + 5 = 16", "11 + 5 = 17")  # one wrong answer fixed, say
    (folder / "data" / "chat.jsonl").write_text("\n".join(rows) + "\n")
    return write_recipe(folder / "r.yaml", recipe.read_text())


@pytest.mark.slow
def test_resume_refuses_changed_data_and_shapes_and_force_accepts(interrupted, recipe, tmp_path):
    out = copy_run(interrupted[0], tmp_path / "run")
    step = manifest(out)["metrics"]["step"]
    before = sorted(p.name for p in out.rglob("*"))
    changed = changed_data_recipe(recipe, tmp_path / "changed")
    with pytest.raises(UserError) as refused:
        run_in_process(changed, out, ["data.max_length=64", "train.per_device_train_batch_size=4",
                                      "train.learning_rate=1e-3"], resume="auto")
    (err,) = refused.value.problems
    assert err.startswith(f"{out / f'checkpoint-{step}'}: cannot resume"), err
    for change in ("data source 1: chat.jsonl (messages, 240 rows used, sha256 ", "data.max_length: 128 -> 64",
                   "batch shape: 8 per device x 1 accumulation steps x 1 processes -> 4 per device", "--resume-force"):
        assert change in err, err
    assert "learning_rate" not in err  # not a change that breaks resuming
    assert sorted(p.name for p in out.rglob("*")) == before and manifest(out)["status"] == "interrupted"

    run_in_process(changed, out, [f"train.max_steps={step + 3}"], resume="auto", resume_force=True)
    assert manifest(out)["status"] == "completed" and max(losses(out)) == step + 3


@pytest.mark.slow
def test_resume_from_a_path_into_a_new_directory(interrupted, baseline, recipe, tmp_path):
    source, _ = interrupted
    step = manifest(source)["metrics"]["step"]
    checkpoint = source / f"checkpoint-{step}"
    with pytest.raises(UserError, match="nowhere: not a complete checkpoint, nor a run directory holding one"):
        checkpoint_to_resume(tmp_path / "x", str(tmp_path / "nowhere"), {})
    foreign = copy_run(checkpoint, tmp_path / "foreign" / f"checkpoint-{step}")
    (foreign / "llmtune.json").unlink()  # as if written by plain transformers
    with pytest.raises(UserError, match="not written by llmtune.*pass --resume-force"):
        checkpoint_to_resume(tmp_path / "y", str(foreign), {})
    assert checkpoint_to_resume(tmp_path / "y", str(source), {}, force=True) == checkpoint  # a run: its newest

    out = tmp_path / "branch"
    run_in_process(recipe, out, resume=str(checkpoint))
    got, want = losses(out), losses(baseline)
    assert min(got) == step + 1  # this directory's metrics start after the checkpoint
    assert [got[s] for s in sorted(got)] == pytest.approx([want[s] for s in sorted(got)], rel=1e-5, abs=1e-6)


@pytest.mark.slow
def test_one_run_per_directory(interrupted, baseline, recipe, tmp_path):
    out = copy_run(interrupted[0], tmp_path / "run")
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / lock.NAME).write_text(json.dumps({"pid": sleeper.pid, "host": socket.gethostname(),
                                                 "started": "2026-01-01T00:00:00+00:00"}))
        result = cli("sft", recipe, "--output-dir", out, "--resume", "auto")
        assert result.returncode == 2, result.stderr
        assert f"another run is writing into this directory (pid {sleeper.pid} on {socket.gethostname()}" \
            in result.stderr
    finally:
        sleeper.kill()
        sleeper.wait()
    # A lock from another host cannot be checked: refused, with how to clear it.
    (out / lock.NAME).write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": "x"}))
    with pytest.raises(UserError, match=f"delete {out / lock.NAME}"):
        run_in_process(recipe, out, resume="auto")
    (out / lock.NAME).unlink()
    # An unfinished run is continued with --resume, a finished one is not written into without --overwrite.
    with pytest.raises(UserError, match=r"holds an unfinished run \(interrupted\); pass --resume auto to continue"):
        run_in_process(recipe, out)
    with pytest.raises(UserError, match="holds a finished run; pass --output-dir DIR for a new run or --overwrite"):
        run_in_process(recipe, baseline, resume="auto")
    assert manifest(baseline)["status"] == "completed"


def test_lock_is_taken_whole_and_a_stale_one_is_cleared(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / lock.NAME).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "started": "x"}))
    held = lock.acquire(tmp_path)
    assert json.loads(held.read_text())["pid"] == os.getpid()
    assert lock.holder(tmp_path) is None  # this process's own lock does not block it
    lock.release(held)
    assert not held.exists()


def bad_cases():
    return sorted(p.name for p in BAD.glob("*.yaml")) + ["binary-recipe", "binary-data", "missing-recipe"]


@pytest.mark.parametrize("case", bad_cases())
def test_bad_input_exits_2_with_one_located_message_and_writes_nothing(case, tmp_path, monkeypatch):
    """The CLI in this process (the corpus is large, and the errors come before any import worth isolating)."""
    from typer.testing import CliRunner

    from llmtune.cli import app

    verb, extra = "train", []
    if case == "binary-recipe":
        recipe = tmp_path / "garbage.yaml"
        recipe.write_bytes(bytes(range(128, 256)) * 4)
        expect = ["garbage.yaml", "not a YAML text file", "UTF-8"]
    elif case == "binary-data":
        (tmp_path / "blob.jsonl").write_bytes(b'{"text": "fine"}\n' * 3 + bytes(range(128, 256)) + b"\n")
        recipe = write_recipe(tmp_path / "r.yaml", "method: sft\nmodel: {name: builtin:tiny}\n"
                                                   "data: {train: [{path: blob.jsonl}]}\n")
        expect = ["blob.jsonl:4:", "not UTF-8 text", "save the file as UTF-8"]
    elif case == "missing-recipe":
        recipe, expect = tmp_path / "nope.yaml", ["nope.yaml: no such recipe file", "llmtune recipes list"]
    else:
        recipe = BAD / case
        header = [line[2:] for line in recipe.read_text().splitlines() if line.startswith("# ")]
        expect = [line.removeprefix("expect: ") for line in header if line.startswith("expect: ")]
        verb = next((line.removeprefix("verb: ") for line in header if line.startswith("verb: ")), verb)
        extra = next((line.removeprefix("args: ").split() for line in header if line.startswith("args: ")), [])
    assert expect
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, [verb, str(recipe), *extra, "--output-dir", str(tmp_path / "out")])
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.stderr  # no traceback
    assert sum(line.startswith("error: ") for line in result.stderr.splitlines()) == 1, result.stderr
    for text in expect:
        assert text in result.stderr, (text, result.stderr)
    assert not (tmp_path / "out").exists() and not (tmp_path / "runs").exists()


def test_yaml_tags_that_construct_objects_are_refused_not_run(tmp_path):
    marker = tmp_path / "pwned"
    recipe = write_recipe(tmp_path / "r.yaml", f'method: sft\nmodel: !!python/object/apply:os.system ["touch {marker}"]'
                                               "\ndata: {train: [{path: x.jsonl}]}\n")
    with pytest.raises(UserError, match=r"r.yaml:2:8: YAML tag '!!python/object/apply:os.system' is not allowed"):
        resolve(recipe)
    result = cli("validate", recipe)
    assert result.returncode == 2 and "is not allowed" in result.stderr
    assert not marker.exists()


def short_recipe(tmp_path, steps=6):
    return recipe_in(tmp_path, max_steps=steps, save_steps=2)


@pytest.mark.slow
def test_disk_full_during_a_checkpoint_says_so_and_keeps_the_last_one(tmp_path, monkeypatch):
    import errno

    import torch

    original = torch.save

    def save(obj, f, *args, **kwargs):
        if "checkpoint-4" in str(f):
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    out = tmp_path / "run"
    with pytest.raises(TrainingFailed) as failed:
        run_in_process(short_recipe(tmp_path), out)
    hint = failed.value.hint
    assert f"the disk holding {out} is full" in hint and "MiB free" in hint and "save_total_limit" in hint
    assert f"{out / 'checkpoint-2'}, is intact" in hint and "--resume auto" in hint
    assert [p.name for p in complete_checkpoints(out)] == ["checkpoint-2"]
    assert not (out / STAGING / "checkpoint-4").exists()  # the half-written one gave its space back
    assert manifest(out)["status"] == "failed" and not (out / lock.NAME).exists()


@pytest.mark.slow
def test_out_of_memory_names_the_knobs_that_lower_it(tmp_path, monkeypatch):
    import torch
    from transformers import Trainer

    original = Trainer.training_step

    def step(self, *args, **kwargs):
        if self.state.global_step >= 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "training_step", step)
    out = tmp_path / "run"
    with pytest.raises(TrainingFailed) as failed:
        run_in_process(short_recipe(tmp_path), out)
    hint = failed.value.hint
    assert "ran out of" in hint and "`llmtune plan` estimates" in hint and "`data.max_length: 128`" in hint, hint
    for change in ("`train.gradient_checkpointing: true`", "`train.per_device_train_batch_size: 4`",
                   "`quantization: {bits: 4}`"):  # the knobs `llmtune plan` suggests, each with its estimate
        assert re.search(re.escape(change) + r".*: [0-9.]+ GiB\n", hint), (change, hint)
    assert f"{out / 'checkpoint-2'}, is intact" in hint


def test_disk_full_is_recognised_however_the_writer_reports_it():
    from llmtune.runner.diagnose import disk_full, out_of_memory

    torch_style = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    torch_style.__context__ = RuntimeError("basic_ios::clear: iostream error")
    assert disk_full(torch_style)
    assert disk_full(Exception("Error while serializing: I/O error: No space left on device (os error 28)"))
    assert not disk_full(ValueError("bad value")) and not out_of_memory(ValueError("bad value"))
    assert out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 GB"))


def test_trust_remote_code_is_off_unless_the_recipe_sets_it_and_recorded(tmp_path, monkeypatch):
    import transformers

    seen = []
    original = transformers.AutoModelForCausalLM.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        seen.append(kwargs.get("trust_remote_code"))
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", classmethod(spy))
    recipe = short_recipe(tmp_path, steps=2)
    run_in_process(recipe, tmp_path / "off")
    run_in_process(recipe, tmp_path / "on", ["model.trust_remote_code=true"])
    assert seen == [False, True]
    assert manifest(tmp_path / "off")["trust_remote_code"] is False
    assert manifest(tmp_path / "on")["trust_remote_code"] is True


# Every method, adapter and full: a SIGINT during step 4 (sent by the process to itself, so it lands in the
# same step every time), then `--resume auto`, against the same run uninterrupted.
LORA = {"type": "lora", "r": 8, "alpha": 16}
METHODS = {  # method, data file, adapter, extra `train:` settings
    "sft-full": ("sft", "chat.jsonl", None, {}),
    "dpo": ("dpo", "preference.jsonl", LORA, {}),
    "orpo": ("orpo", "preference.jsonl", LORA, {}),
    "kto": ("kto", "kto.jsonl", LORA, {}),
    "reward-full": ("reward", "preference.jsonl", None, {}),
    "grpo": ("grpo", "preference.jsonl", LORA, {"num_generations": 4, "max_completion_length": 8}),
    "ppo": ("ppo", "preference.jsonl", LORA, {"response_length": 8, "num_mini_batches": 2}),
}
METHOD_TRAIN = {"learning_rate": 1.0e-3, "max_steps": 8, "per_device_train_batch_size": 8,
                "gradient_checkpointing": False, "logging_steps": 1, "save_strategy": "no", "disable_tqdm": True}


@pytest.fixture(scope="module")
def scorer(tmp_path_factory):
    """A sequence-classification model for PPO/GRPO to score with (its scores need not mean anything)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from llmtune.builtin import builtin_path

    out = tmp_path_factory.mktemp("scorer") / "rm"
    AutoModelForSequenceClassification.from_pretrained(builtin_path("tiny"), num_labels=1).save_pretrained(out)
    AutoTokenizer.from_pretrained(builtin_path("tiny")).save_pretrained(out)
    return out


def rows_by_step(out: Path) -> dict:
    """Every logged training value by step, but timings (and the end-of-session summaries, which are timings)."""
    rows = {}
    for row in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()):
        if "train_runtime" not in row:
            rows.setdefault(row["step"], {}).update(
                {k: v for k, v in row.items() if isinstance(v, float) and "time" not in k and "per_second" not in k})
    return rows


@pytest.mark.slow
@pytest.mark.parametrize("case", METHODS)
def test_every_method_resumes_to_the_same_run(case, scorer, tmp_path, monkeypatch):
    import torch
    from safetensors.torch import load_file
    from transformers.trainer_callback import CallbackHandler

    from llmtune.runner.interrupt import Interrupted

    method, data, adapter, train = METHODS[case]
    fmt = "prompt" if method in ("grpo", "ppo") else "auto"
    source = {"path": RECIPES / "data" / data, "format": fmt}
    recipe = make_recipe(tmp_path, method, {"train": [source], "max_length": 128},
                         adapter=adapter, reward_model=scorer if method in ("grpo", "ppo") else None,
                         train={**METHOD_TRAIN, **train})

    def go(out, **kwargs):
        return run(resolve(recipe), ["llmtune", method, str(recipe)], output_dir=str(out), **kwargs)

    go(tmp_path / "whole")
    begin = CallbackHandler.on_step_begin

    def signal_in_step_4(self, args, state, control):
        if state.global_step == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return begin(self, args, state, control)

    with monkeypatch.context() as patch:
        patch.setattr(CallbackHandler, "on_step_begin", signal_in_step_4)
        with pytest.raises(Interrupted, match="stopped at step 4"):
            go(tmp_path / "run")
    assert [p.name for p in complete_checkpoints(tmp_path / "run")] == ["checkpoint-4"]
    go(tmp_path / "run", resume="auto")

    got, want = rows_by_step(tmp_path / "run"), rows_by_step(tmp_path / "whole")
    assert sorted(got) == sorted(want) == list(range(1, 9))
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-5, abs=1e-6), step
    weights = sorted(p.name for p in (tmp_path / "whole").glob("*.safetensors"))
    assert weights == sorted(p.name for p in (tmp_path / "run").glob("*.safetensors")) and weights
    for name in weights:
        a, b = load_file(tmp_path / "run" / name), load_file(tmp_path / "whole" / name)
        assert a.keys() == b.keys(), name
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


def test_a_new_run_clears_the_earlier_runs_model_files(tmp_path):
    from llmtune.runner.resume import prepare

    for name in ("adapter_config.json", "adapter_model.safetensors", "model.safetensors", "config.json",
                 "tokenizer.json", "notes.txt"):
        (tmp_path / name).write_text("old")
    prepare(tmp_path, None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "tokenizer.json"]


@pytest.mark.slow
def test_a_diverged_run_stops_at_the_step_says_what_to_try_and_saves_no_model(tmp_path):
    out = tmp_path / "run"
    result = plain_cli("sft", "quickstart", "--output-dir", out, "--set", "train.learning_rate=1e30",
                       "--set", "train.max_steps=8", "--set", "train.logging_steps=1", "--set", "train.eval_strategy=no")
    assert result.returncode == 1, result.stderr
    stopped = re.search(r"training diverged at step (\d+): grad_norm = nan", result.stderr)
    assert stopped and int(stopped.group(1)) < 8, result.stderr
    assert "Lower `train.learning_rate`" in result.stderr and "Traceback" not in result.stderr
    assert json.loads((out / "manifest.json").read_text())["status"] == "failed"
    assert not (out / "adapter_model.safetensors").exists()  # no NaN weights left behind as a model


def test_the_divergence_guard_leaves_fp16_loss_scaling_alone():
    from types import SimpleNamespace

    from llmtune.runner.diagnose import Diverged, divergence_guard

    state = SimpleNamespace(global_step=3)
    divergence_guard(SimpleNamespace(fp16=True)).on_log(None, state, None, logs={"grad_norm": float("inf")})
    for fp16, logs in ((True, {"loss": float("nan")}), (False, {"grad_norm": float("inf")}),
                       (False, {"eval_loss": float("nan"), "loss": 1.0})):
        with pytest.raises(Diverged, match="diverged at step 3"):
            divergence_guard(SimpleNamespace(fp16=fp16)).on_log(None, state, None, logs=logs)


def test_a_staged_folder_appears_whole_or_not_at_all(tmp_path):
    from llmtune.files import staged_folder

    target = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with staged_folder(target) as tmp:
            (tmp / "half.bin").write_bytes(b"x")
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []  # neither the target nor the staging folder
    with staged_folder(target) as tmp:
        (tmp / "a").write_text("first")
    with staged_folder(target) as tmp:
        (tmp / "b").write_text("second")
    assert sorted(p.name for p in target.iterdir()) == ["b"]  # replaced whole
    with staged_folder(target, replace=False) as tmp:  # another process got there first: its copy stays
        (tmp / "c").write_text("third")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and (target / "b").read_text() == "second"
