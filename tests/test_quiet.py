"""A successful run's terminal: the effective batch, the progress bar and the summary, at most 8 lines besides the
bar (one process here; 2-process launches of every backend in test_launch.py); library chatter goes to train.log;
an error starts its own line."""

import importlib.util

import pytest

from .conftest import assert_quiet, cli, make_recipe


def recipe(folder, train=None, adapter=None, **sections):
    """Three steps of SFT on builtin:tiny: LoRA, or full fine-tuning with `adapter=False` (which loads bitsandbytes'
    CPU kernels, and with them kernels' "Skipping publisher trust check" note)."""
    adapter = None if adapter is False else adapter or {"type": "lora", "r": 8, "alpha": 16}
    return make_recipe(folder, data={"max_length": 128}, adapter=adapter,
                       train={"max_steps": 3, "logging_steps": 1, "learning_rate": 3e-3, "save_strategy": "no",
                              "per_device_train_batch_size": 4, **(train or {})}, **sections)


@pytest.mark.slow
def test_a_single_process_run_prints_the_batch_the_bar_and_the_summary(tmp_path):
    out = tmp_path / "out"
    result = cli("sft", recipe(tmp_path, adapter=False), "--output-dir", out, cwd=tmp_path)
    assert_quiet(result, out, 1)
    # DeepSpeed, where installed, announces the CPU on import: in train.log, not on the terminal
    if importlib.util.find_spec("deepspeed"):
        assert "DeepSpeed: Setting accelerator to CPU" in (out / "train.log").read_text()


@pytest.mark.slow
def test_an_error_during_training_starts_its_own_line_after_the_bar(tmp_path):
    result = cli("sft", recipe(tmp_path, train={"learning_rate": 1e30, "max_steps": 6}), "--output-dir",
                 tmp_path / "out", cwd=tmp_path)
    assert result.returncode == 1
    errors = [line for line in result.stderr.split("\n") if "error: " in line]
    assert errors and all(line.startswith("error: ") for line in errors), errors
    assert errors[0].startswith("error: training failed: Diverged: training diverged at step")
