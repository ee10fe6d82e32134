"""Smaller promises: no secret from the environment in any file llmtune writes, however it came in;
SIGTERM from the first moment exits 130; a resume that would train nothing is refused."""

import shutil
import signal
import subprocess
import sys
import time

import pytest

from llmtune.errors import UserError
from llmtune.recipe.check import resolve
from llmtune.runner.session import train as run

from .conftest import RECIPES, cli, make_recipe

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
