"""Smaller promises: no secret from the environment in any file llmtune writes, however it came in;
SIGTERM from the first moment, and to a multi-process launch, exits 130; a resume that would train nothing is
refused; prefix tuning trains on padded batches of a real architecture."""

import json
import shutil
import signal
import subprocess
import sys
import time

import pytest

from llmtune.errors import UserError
from llmtune.recipe.check import resolve
from llmtune.runner.session import train as run

from .conftest import RECIPES, cli, make_recipe, write_jsonl
from .families import family_model

SECRET = "tok_planted_5555_secret"


def sft_recipe(tmp_path, data):
    return make_recipe(tmp_path, data={"train": [{"path": str(data)}], "max_length": 128},
                       adapter={"type": "lora", "r": 8, "alpha": 16},
                       train={"learning_rate": 3.0e-3, "max_steps": 4, "per_device_train_batch_size": 8,
                              "gradient_checkpointing": False, "save_steps": 2, "disable_tqdm": True})


@pytest.mark.slow
def test_a_secret_from_set_or_a_data_path_reaches_no_file(tmp_path, llmtune_cache):
    data = tmp_path / SECRET / "chat.jsonl"  # a folder named after a token, e.g. a signed URL's mount
    data.parent.mkdir()
    shutil.copy(RECIPES / "data" / "chat.jsonl", data)
    recipe = sft_recipe(tmp_path, data)
    out = tmp_path / "run"
    result = cli("sft", recipe, "--output-dir", out, "--set", f"train.run_name=x-{SECRET}",
                 env={"MY_SERVICE_TOKEN": SECRET})
    assert result.returncode == 0, result.stderr
    written = [p for folder in (out, llmtune_cache) for p in folder.rglob("*") if p.is_file()]
    assert any(p.name == "meta.json" for p in written)  # the data cache was written, and is checked too
    leaked = [str(p) for p in written if SECRET.encode() in p.read_bytes()]
    assert leaked == []
    assert "run_name: x-${env:MY_SERVICE_TOKEN}" in (out / "recipe.yaml").read_text()


@pytest.mark.slow
def test_sigterm_before_training_starts_exits_130_and_leaves_no_run(tmp_path):
    shutil.copytree(RECIPES / "data", tmp_path / "data")
    recipe = sft_recipe(tmp_path, "data/chat.jsonl")
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "llmtune", "sft", recipe, "--output-dir", out],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(2)  # imports and pre-flight: no run directory yet
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "interrupted" in err
    assert not out.exists()


def test_an_interrupt_raised_inside_an_extensions_pyrun_string_still_exits_130(tmp_path):
    """What made the test above flaky (1 run in ~20 under load): a signal landing while an extension ran Python
    code through PyRun_String left CPython's 'unhandled KeyboardInterrupt' flag set, so `python -m llmtune` killed
    itself with SIGINT at exit (status -2) after printing 'interrupted'. Here the interrupt lands there on purpose."""
    probe = tmp_path / "probe"
    probe.mkdir()
    (probe / "__main__.py").write_text(
        "import ctypes, sys\n"
        "import llmtune.recipe.check as check\n"
        "from llmtune import cli\n"
        "def resolve(*args, **kwargs):\n"
        "    ctypes.pythonapi.PyRun_String.restype = ctypes.py_object\n"
        "    names = ctypes.py_object({})\n"
        "    ctypes.pythonapi.PyRun_String(b'raise KeyboardInterrupt', 257, names, names)\n"
        "check.resolve = resolve\n"
        "sys.argv = ['llmtune', 'sft', sys.argv[1]]\n"
        "cli.main()\n")
    recipe = sft_recipe(tmp_path, tmp_path / "chat.jsonl")
    proc = subprocess.run([sys.executable, "-m", "probe", str(recipe)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 130, proc.stderr
    assert proc.stderr.strip() == "interrupted"


def test_resuming_a_checkpoint_already_at_max_steps_is_refused_and_a_higher_one_trains_on(tmp_path):
    shutil.copytree(RECIPES / "data", tmp_path / "data")
    recipe = sft_recipe(tmp_path, "data/chat.jsonl")
    first = tmp_path / "first"
    run(resolve(recipe), ["llmtune"], output_dir=str(first))
    again = tmp_path / "again"
    with pytest.raises(UserError, match=r"checkpoint-4: cannot resume: it is at step 4 and `train.max_steps` is 3, "
                                        r"so nothing would be trained; raise `train.max_steps` above 4"):
        run(resolve(recipe, ["train.max_steps=3"]), ["llmtune"], output_dir=str(again),
            resume=str(first / "checkpoint-4"))
    assert not again.exists()
    metrics = run(resolve(recipe, ["train.max_steps=6"]), ["llmtune"], output_dir=str(again),
                  resume=str(first / "checkpoint-4"))
    assert metrics["train_loss"] > 0 and (again / "checkpoint-6").is_dir()


@pytest.mark.distributed
def test_sigterm_to_a_two_process_launch_saves_exits_130_and_resumes(tmp_path):
    shutil.copytree(RECIPES / "data", tmp_path / "data")
    recipe = sft_recipe(tmp_path, "data/chat.jsonl")
    out = tmp_path / "run"
    launch = ["--output-dir", out, "--num-processes", "2", "--set", "train.max_steps=12", "--set", "train.logging_steps=1"]
    proc = subprocess.Popen([sys.executable, "-m", "llmtune", "sft", recipe, *launch],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)  # to llmtune only, as a scheduler pre-empting the job does; it tells the ranks
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    assert err.count("interrupted: stopped at step") == 1 and "Traceback" not in err, err
    assert "death signal" not in err  # torch's agent logs nothing of its own
    manifest = json.loads((out / "manifest.json").read_text())
    step = manifest["metrics"]["step"]
    assert manifest["status"] == "interrupted" and 2 <= step < 12
    assert (out / f"checkpoint-{step}" / "rng_state_0.pth").exists()
    assert (out / f"checkpoint-{step}" / "rng_state_1.pth").exists()

    result = cli("sft", recipe, *launch, "--resume", "auto")
    assert result.returncode == 0, result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "completed" and manifest["resumed"][0]["from"].endswith(f"checkpoint-{step}")
    assert (out / "checkpoint-12").is_dir()


@pytest.mark.slow
def test_prefix_tuning_trains_on_padded_batches_and_refuses_gradient_checkpointing(tmp_path, tmp_path_factory):
    """Prefix tuning's vectors enter as the attention cache, which gradient checkpointing (TRL's default) drops:
    every padded batch then failed ("size of tensor a (128) must match ... (136)"). Off by default, refused if asked."""
    words = "the capital of France is Paris and waves fold into foam".split()
    rows = [{"messages": [{"role": "user", "content": " ".join(words[: 2 + i % 9])},
                          {"role": "assistant", "content": " ".join(words[i % 5:] * (1 + i % 4))}]} for i in range(24)]
    data = write_jsonl(tmp_path / "chat.jsonl", rows)  # 2 to 60 tokens a row: every batch of 4 is padded
    recipe = make_recipe(tmp_path, data=str(data), model={"name": str(family_model(tmp_path_factory, "qwen2_5"))},
                         adapter={"type": "prefix", "num_virtual_tokens": 8},
                         train={"learning_rate": 5.0e-2, "max_steps": 6, "per_device_train_batch_size": 4,
                                "logging_steps": 1, "save_strategy": "no", "disable_tqdm": True})
    with pytest.raises(UserError, match=r"--set train.gradient_checkpointing=true: `adapter.type: prefix` trains "
                                        r"vectors that enter every layer as its attention cache, which gradient "
                                        r"checkpointing drops"):
        resolve(recipe, ["train.gradient_checkpointing=true"])
    out = tmp_path / "run"
    metrics = run(resolve(recipe), ["llmtune"], output_dir=str(out))
    assert metrics["last_loss"] < metrics["first_loss"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["settings"]["gradient_checkpointing"] is False
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "PREFIX_TUNING"
