"""A successful run's terminal: the effective batch, the progress bar and the summary, at most 8 lines besides the
bar, in one process and in a 2-process DDP launch; library chatter goes to train.log; an error starts its own line."""

import importlib.util
import re

import pytest

from .conftest import cli, make_recipe

BAR = re.compile(r"^\s*\d+%\|")  # one redraw of the progress bar: "  33%|███▎      | 1/3 [...]"
CHATTER = ("Setting accelerator to CPU", "Skipping publisher trust check", "trust_remote_code", "find_unused_parameters",
           "Retrying in")


def recipe(folder, train=None, adapter=None, **sections):
    """Three steps of SFT on builtin:tiny: LoRA, or full fine-tuning with `adapter=False` (which loads bitsandbytes'
    CPU kernels, and with them kernels' "Skipping publisher trust check" note)."""
    adapter = None if adapter is False else adapter or {"type": "lora", "r": 8, "alpha": 16}
    return make_recipe(folder, data={"max_length": 128}, adapter=adapter,
                       train={"max_steps": 3, "logging_steps": 1, "learning_rate": 3e-3, "save_strategy": "no",
                              "per_device_train_batch_size": 4, **(train or {})}, **sections)


def terminal_lines(result) -> list[str]:
    """What the run printed on stdout and stderr, line by line, without the bar's redraws (joined by \\r)."""
    lines = []
    for line in (result.stdout + result.stderr).split("\n"):
        kept = [part for part in line.split("\r") if part.strip() and not BAR.match(part)]
        lines.extend(kept)
    return lines


def assert_quiet(result, out, processes):
    assert result.returncode == 0, result.stderr[-3000:]
    lines = terminal_lines(result)
    assert len(lines) <= 8, lines
    assert f"effective batch: 4 per device x 1 accumulation x {processes} process(es) = {4 * processes} " \
           "per optimizer step" in lines
    assert f"run directory: {out}" in lines
    assert any(line.startswith("train_loss ") for line in lines), lines
    assert not [line for line in lines if any(chatter in line for chatter in CHATTER)], lines
    assert "100%|" in result.stderr  # the bar was there, and ran to the end


@pytest.mark.slow
def test_a_single_process_run_prints_the_batch_the_bar_and_the_summary(tmp_path):
    out = tmp_path / "out"
    result = cli("sft", recipe(tmp_path, adapter=False), "--output-dir", out, cwd=tmp_path)
    assert_quiet(result, out, 1)
    # DeepSpeed, where installed, announces the CPU on import: in train.log, not on the terminal
    if importlib.util.find_spec("deepspeed"):
        assert "DeepSpeed: Setting accelerator to CPU" in (out / "train.log").read_text()


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("backend", ["ddp", pytest.param("zero2", marks=pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None, reason="the deepspeed extra is not installed"))])
def test_a_two_process_run_prints_the_same(tmp_path, backend):
    out = tmp_path / "out"
    result = cli("sft", recipe(tmp_path, launch={"num_processes": 2, "backend": backend}), "--output-dir", out,
                 cwd=tmp_path)
    assert_quiet(result, out, 2)
    assert result.stdout.count("run directory:") == 1
    assert "built successfully" not in result.stdout  # DeepSpeed's shared-memory op, built by each CPU process


@pytest.mark.slow
def test_an_error_during_training_starts_its_own_line_after_the_bar(tmp_path):
    result = cli("sft", recipe(tmp_path, train={"learning_rate": 1e30, "max_steps": 6}), "--output-dir",
                 tmp_path / "out", cwd=tmp_path)
    assert result.returncode == 1
    errors = [line for line in result.stderr.split("\n") if "error: " in line]
    assert errors and all(line.startswith("error: ") for line in errors), errors
    assert errors[0].startswith("error: training failed: Diverged: training diverged at step")
