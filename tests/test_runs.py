"""`llmtune runs` and `llmtune compare` on three real tiny runs (sft, dpo, grpo), and their bad-input messages."""

import json
import math
import struct
import subprocess

import pytest

from llmtune.runner import metrics

from .conftest import cli
from .test_metrics import three_runs  # noqa: F401 - a session fixture, shared with the metrics tests


def head_commit(repo):
    return subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()


@pytest.mark.slow
def test_runs_lists_each_run_with_its_facts(three_runs):  # noqa: F811
    repo, _ = three_runs
    result = cli("runs", repo / "runs")
    assert result.returncode == 0, result.stderr
    header, *lines = result.stdout.splitlines()
    assert header.split() == ["run", "status", "method", "model", "rows", "steps", "duration", "commit", "key",
                              "metrics"]
    assert [line.split()[0] for line in lines] == ["sft", "dpo", "grpo"]  # oldest first
    rows = {line.split()[0]: line.split() for line in lines}
    commit = head_commit(repo)[:8]
    for name, used in (("sft", "192"), ("dpo", "192"), ("grpo", "32")):
        assert rows[name][1:8] == ["completed", name, "builtin:tiny", used, "4", rows[name][6], commit], rows[name]
        assert rows[name][6].endswith("s") and rows[name][6][0].isdigit()  # e.g. 0m12s
    manifest = json.loads((repo / "runs" / "dpo" / "manifest.json").read_text())["metrics"]
    assert rows["dpo"][8:] == [f"eval_loss={metrics.fmt(manifest['eval_loss'])}",
                               f"eval_rewards/accuracies={metrics.fmt(manifest['eval_rewards/accuracies'])}",
                               f"eval_rewards/margins={metrics.fmt(manifest['eval_rewards/margins'])}"]
    grpo = json.loads((repo / "runs" / "grpo" / "manifest.json").read_text())["metrics"]
    assert rows["grpo"][8:] == [f"train_loss={metrics.fmt(grpo['train_loss'])}",
                                f"reward={metrics.fmt(grpo['reward'])}", f"kl={metrics.fmt(grpo['kl'])}"]
    # The default folder is ./runs, searched at any depth.
    nested = cli("runs", cwd=repo)
    assert nested.returncode == 0 and nested.stdout == result.stdout


@pytest.mark.slow
def test_compare_shows_recipe_differences_metrics_and_an_overlay_plot(three_runs):  # noqa: F811
    repo, _ = three_runs
    runs = [repo / "runs" / name for name in ("sft", "dpo", "grpo")]
    result = cli("compare", *runs)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    differences = lines[1:lines.index("")]
    table = {line.split()[0]: line.split()[1:] for line in differences}
    assert table["key"] == [str(r) for r in runs]
    assert table["method"] == ["sft", "dpo", "grpo"]
    assert table["train.learning_rate"] == ["0.001", "0.002", "0.01"]
    assert table["data.train[0].path"] == [f"{repo}/data/{n}" for n in ("chat.jsonl", "preference.jsonl",
                                                                         "prompts.jsonl")]
    assert table["reward_functions"] == ["[]", "[]", f'["{repo}/lower.py:share"]']  # lower.py beside the recipe
    assert "model.name" not in table and "adapter.r" not in table  # the same in all three: not a difference

    values = {line.split()[0]: line.split()[1:] for line in lines if line.startswith("  ")}
    finals = [json.loads((r / "manifest.json").read_text())["metrics"] for r in runs]
    for key in ("train_loss", "eval_loss", "eval_perplexity", "eval_rewards/accuracies", "reward", "kl"):
        assert values[key] == [metrics.fmt(f[key]) if key in f else "-" for f in finals], key
    assert values["steps"] == ["4", "4", "4"]

    out = repo / "runs" / "compare-sft-vs-dpo-vs-grpo.png"  # beside the first run
    panels = ["loss", "perplexity", "mean token accuracy", "reward accuracy", "reward margin", "log-probs",
              "mean reward", "KL to the reference"]
    assert lines[-1] == f"wrote {out} ({', '.join(panels)})"
    width, height = struct.unpack(">II", out.read_bytes()[16:24])
    assert (width, height) == (1500, 360 * math.ceil(len(panels) / 3))


@pytest.mark.slow
def test_compare_writes_the_plot_where_asked(three_runs, tmp_path):  # noqa: F811
    repo, _ = three_runs
    out = tmp_path / "plots" / "sft-vs-dpo.svg"
    result = cli("compare", repo / "runs" / "sft", repo / "runs" / "dpo", "--out", out)
    assert result.returncode == 0, result.stderr
    assert out.read_text().lstrip().startswith("<?xml") and "reward accuracy" in out.read_text()
    assert result.stdout.splitlines()[-1].startswith(f"wrote {out} (loss, perplexity")


def test_bad_input_is_one_message_each_and_exit_2(tmp_path):
    (tmp_path / "empty").mkdir()
    result = cli("compare", tmp_path / "empty", "--out", tmp_path / "x.txt")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.splitlines() == [
        f"error: {tmp_path / 'empty'}: not a run directory (no manifest.json written by a training command); pass "
        "folders such as runs/NAME",
        "error: compare needs two or more run directories, e.g. `llmtune compare runs/a runs/b`",
        f"error: --out {tmp_path / 'x.txt'}: the plot is written as .png, .svg, .pdf; end the file name with one"]
    assert list(tmp_path.iterdir()) == [tmp_path / "empty"]  # nothing written

    missing = cli("runs", tmp_path / "nope")
    assert missing.returncode == 2 and missing.stderr.startswith(f"error: {tmp_path / 'nope'}: no such directory")
    empty = cli("runs", tmp_path / "empty")
    assert empty.returncode == 0 and empty.stdout.startswith(f"no run directories under {tmp_path / 'empty'}")
