"""The metrics each method is judged by: in the progress bar, the summary, loss.png's panels, manifest.json and
the model card; the card's settings, `llmtune eval` scores, and no absolute local path in what `push` uploads."""

import json
import math
import shutil
import struct
import subprocess

import pytest

from llmtune.runner import card, metrics
from llmtune.tools.evaluation import save

from .conftest import RECIPES, cli, write_jsonl, write_recipe

# -- the table, on logged rows shaped like TRL's -----------------------------------------------------------------

DPO_ROWS = [
    {"step": 1, "loss": 0.6931, "rewards/accuracies": 0.0, "rewards/margins": 0.0, "logps/chosen": -100.0,
     "logps/rejected": -137.0},
    {"step": 2, "loss": 0.6925, "rewards/accuracies": 0.75, "rewards/margins": 0.02, "logps/chosen": -98.0,
     "logps/rejected": -140.0},
    {"step": 2, "eval_loss": 0.6920, "eval_rewards/accuracies": 1.0, "eval_rewards/margins": 0.03,
     "eval_logps/chosen": -90.0, "eval_logps/rejected": -150.0},
]


def test_final_values_are_the_last_logged_and_eval_values_win_the_headline():
    final = {"train_loss": 0.69, "eval_loss": 0.692, "eval_rewards/accuracies": 1.0}
    added = metrics.final("dpo", DPO_ROWS, final)
    assert added == {"rewards/accuracies": 0.75, "rewards/margins": 0.02, "logps/chosen": -98.0,
                     "logps/rejected": -140.0}
    head = metrics.headline("dpo", {**final, **added})
    assert list(head) == ["train_loss", "eval_loss", "eval_rewards/accuracies", "rewards/margins", "logps/chosen",
                          "logps/rejected"]
    assert metrics.summary("dpo", {**final, **added, "train_runtime": 1.5}) == (
        "train_loss 0.69, eval_loss 0.692, eval_rewards/accuracies 1, rewards/margins 0.02, logps/chosen -98, "
        "logps/rejected -140, train_runtime 1.5")


def test_sft_perplexity_is_exp_of_the_loss():
    rows = [{"step": 1, "loss": 2.0, "mean_token_accuracy": 0.3}, {"step": 2, "loss": 1.0, "mean_token_accuracy": 0.4}]
    added = metrics.final("sft", rows, {"eval_loss": 0.5})
    assert added == {"perplexity": pytest.approx(math.e), "eval_perplexity": pytest.approx(math.exp(0.5)),
                     "mean_token_accuracy": 0.4}


def test_progress_bar_keeps_loss_eval_loss_and_the_method_metrics():
    shown = {}
    metrics.bar("grpo", {"loss": 0.01, "reward": 0.5, "kl": 0.002, "grad_norm": 3.0}, shown)
    assert shown == {"loss": "0.0100", "reward": "0.5000", "kl": "0.0020"}
    metrics.bar("sft", {"eval_loss": 1.25}, shown)  # an eval row: the training fields stay
    assert shown["eval_loss"] == "1.2500" and shown["loss"] == "0.0100"


def test_panels_put_the_reward_first_for_rl_and_share_axes_for_log_probs():
    assert [t for t, _ in metrics.panels(["grpo"])] == ["mean reward", "KL to the reference", "loss"]
    assert [t for t, _ in metrics.panels(["dpo"])] == ["loss", "reward accuracy", "reward margin", "log-probs"]
    assert [m.key for m in dict(metrics.panels(["dpo"]))["log-probs"]] == ["logps/chosen", "logps/rejected"]
    assert [t for t, _ in metrics.panels(["sft", "reward"])] == ["loss", "perplexity", "mean token accuracy",
                                                                 "accuracy", "margin"]


def png_size(path):
    width, height = struct.unpack(">II", path.read_bytes()[16:24])
    return width, height


def test_plot_draws_only_panels_with_data(tmp_path):
    out = tmp_path / "p.png"
    assert metrics.plot({"": ("dpo", DPO_ROWS)}, out) == ["loss", "reward accuracy", "reward margin", "log-probs"]
    assert png_size(out) == (1500, 720)  # 3 columns, 2 rows
    grpo = [{"step": 1, "loss": 0.0, "reward": 0.2}, {"step": 2, "loss": 0.0, "reward": 0.4}]  # beta 0: no KL
    assert metrics.plot({"": ("grpo", grpo)}, tmp_path / "g.png") == ["mean reward", "loss"]
    assert metrics.plot({"": ("sft", [])}, tmp_path / "none.png") == [] and not (tmp_path / "none.png").exists()


def test_portable_paths_relative_to_the_base_or_cut(tmp_path):
    text = (f"data {tmp_path}/data/chat.jsonl, run `{tmp_path}/runs/a`, base {tmp_path}, other /opt/x/y.jsonl; "
            "rewards/accuracies https://huggingface.co/me/m 1/2 sha256 / revision")
    assert card.portable(text, tmp_path) == ("data data/chat.jsonl, run `runs/a`, base ., other .../y.jsonl; "
                                             "rewards/accuracies https://huggingface.co/me/m 1/2 sha256 / revision")


# -- real tiny runs: sft (with an eval set), dpo (with an eval set), grpo; in a git repository -------------------

RECIPE = """\
# {method}: a tiny run for the metrics tests
method: {method}
model: {{name: "builtin:tiny", dtype: float32}}
adapter: {{type: lora, r: 8, alpha: 16}}
{extra}
data:
  train:
    - path: data/{data}
  eval: {eval}
  max_length: {max_length}
train:
  learning_rate: {lr}
  max_steps: 4
  per_device_train_batch_size: 4
  logging_steps: 1
  gradient_checkpointing: false
  save_strategy: "no"
{train}
"""
RUNS = {
    "sft": dict(data="chat.jsonl", eval=0.2, max_length=128, lr=1e-3, extra="",
                train="  eval_strategy: steps\n  eval_steps: 2"),
    "dpo": dict(data="preference.jsonl", eval=0.2, max_length=128, lr=2e-3, extra="",
                train="  eval_strategy: steps\n  eval_steps: 2"),
    "grpo": dict(data="prompts.jsonl", eval=0.0, max_length=64, lr=1e-2, extra="reward_functions: [lower:share]",
                 train="  num_generations: 4\n  max_completion_length: 8\n  beta: 0.04"),
}
REWARD = "def share(prompts, completions, **kwargs):\n    return [sum(c.islower() for c in t) / max(len(t), 1) " \
         "for t in completions]\n"


def git(repo, *args):
    subprocess.run(["git", "-C", str(repo), "-c", "user.email=t@example.com", "-c", "user.name=t", *args],
                   check=True, capture_output=True)


@pytest.fixture(scope="session")
def three_runs(tmp_path_factory):
    """A recipe repository (git) with sft, dpo and grpo recipes, each trained for 4 steps through the CLI; the
    completed processes by method. Runs land in REPO/runs/METHOD."""
    repo = tmp_path_factory.mktemp("repo")
    (repo / "data").mkdir()
    for name in ("chat.jsonl", "preference.jsonl"):
        shutil.copy(RECIPES / "data" / name, repo / "data" / name)
    write_jsonl(repo / "data" / "prompts.jsonl", [{"prompt": f"TASK {i}: "} for i in range(32)])
    (repo / "lower.py").write_text(REWARD)
    (repo / ".gitignore").write_text("runs/\n__pycache__/\n")  # the runs leave the recipes' commit clean
    for method, fields in RUNS.items():
        write_recipe(repo / f"{method}.yaml", RECIPE.format(method=method, **fields))
    git(repo, "init", "-q")
    git(repo, "add", ".")
    git(repo, "commit", "-qm", "recipes")
    results = {}
    for method in RUNS:
        results[method] = cli(method, f"{repo}/{method}.yaml", "--output-dir", repo / "runs" / method, cwd=repo)
        assert results[method].returncode == 0, results[method].stderr
    return repo, results


# What each run must show: the judged metrics, under the names of its manifest.
EXPECTED = {
    "sft": ["train_loss", "eval_loss", "eval_perplexity", "eval_mean_token_accuracy"],
    "dpo": ["train_loss", "eval_loss", "eval_rewards/accuracies", "eval_rewards/margins", "eval_logps/chosen",
            "eval_logps/rejected"],
    "grpo": ["train_loss", "reward", "kl"],
}
PANELS = {"sft": ["loss", "perplexity", "mean token accuracy"],
          "dpo": ["loss", "reward accuracy", "reward margin", "log-probs"],
          "grpo": ["mean reward", "KL to the reference", "loss"]}


@pytest.mark.slow
@pytest.mark.parametrize("method", list(RUNS))
def test_each_metric_in_summary_manifest_card_and_plot(three_runs, method):
    repo, results = three_runs
    out = repo / "runs" / method
    manifest = json.loads((out / "manifest.json").read_text())
    final = manifest["metrics"]
    summary = results[method].stdout.strip().splitlines()[-1]
    card_text = (out / "README.md").read_text()
    for key in EXPECTED[method]:
        assert isinstance(final[key], float), (key, final)
        assert f"{key} {metrics.fmt(final[key])}" in summary, (key, summary)
        assert f"| `{key}` | {metrics.fmt(final[key])} |" in card_text, key
    # The last logged training value of a judged metric is recorded too (eval runs show both).
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for metric in metrics.judged(method):
        if not metric.from_loss:
            assert final[metric.key] == [row[metric.key] for row in logged if metric.key in row][-1]
    if method == "sft":
        assert final["eval_perplexity"] == pytest.approx(math.exp(final["eval_loss"]))
    assert manifest["plot"] == {"file": "loss.png", "panels": PANELS[method]}
    cols = min(3, len(PANELS[method]))
    assert png_size(out / "loss.png") == (500 * cols, 360 * math.ceil(len(PANELS[method]) / cols))


@pytest.mark.slow
def test_the_progress_bar_shows_eval_loss_and_the_method_metric(three_runs):
    _, results = three_runs
    assert "eval_loss=" in results["sft"].stderr and "acc=" in results["sft"].stderr
    assert "reward=" in results["grpo"].stderr and "kl=" in results["grpo"].stderr


@pytest.mark.slow
def test_card_lists_the_settings_that_matter_and_how_to_load(three_runs):
    repo, _ = three_runs
    text = (repo / "runs" / "dpo" / "README.md").read_text()
    front = text.split("---\n")[1]
    assert "library_name: peft\n" in front and "tags: [llmtune, trl, dpo, lora]" in front
    assert "| adapter | LoRA, r 8, alpha 16, targets down_proj gate_proj k_proj o_proj q_proj up_proj v_proj |" \
        in text
    assert "| quantization | none |" in text
    assert "| learning rate | 0.002, linear schedule |" in text
    assert "| effective batch | 4 = 4 per device x 1 accumulated x 1 process |" in text
    assert "| length | 4 steps (4 trained) |" in text and "| max length | `128` |" in text
    assert "| beta | `0.1` |" in text
    sha = __import__("hashlib").sha256((repo / "data" / "preference.jsonl").read_bytes()).hexdigest()
    assert f"| `data/preference.jsonl` | preference | 240 rows, 192 used | {sha} |" in text
    assert 'AutoPeftModelForCausalLM.from_pretrained("runs/dpo")' in text
    sft = (repo / "runs" / "sft" / "README.md").read_text()
    assert "| packing | `False` |" in sft


@pytest.mark.slow
def test_no_absolute_local_path_in_the_card_or_the_uploaded_record(three_runs):
    repo, _ = three_runs
    for method in RUNS:
        out = repo / "runs" / method
        assert str(repo) not in (out / "README.md").read_text()
        for name in ("recipe.yaml", "manifest.json"):
            assert str(repo) in (out / name).read_text()  # the local copies keep their paths: a rerun finds its data
            uploaded = card.portable_file(out, name).decode()
            assert str(repo) not in uploaded and "/tmp" not in uploaded, name
        recipe = card.portable_file(out, "recipe.yaml").decode()
        assert f"path: data/{RUNS[method]['data']}" in recipe and "output_dir: runs/" + method in recipe
        assert json.loads(card.portable_file(out, "manifest.json"))["recipe"] == f"{method}.yaml"


@pytest.mark.slow
def test_eval_scores_go_into_the_card(three_runs, tmp_path):
    repo, _ = three_runs
    out = tmp_path / "sft"
    shutil.copytree(repo / "runs" / "sft", out)
    results = {"results": {"chat-mc": {"alias": "chat-mc", "acc,none": 0.625, "acc_stderr,none": 0.1}}}
    save(out, results, {"tasks": ["chat-mc"], "limit": 8, "num_fewshot": None, "chat_template": True})
    text = (out / "README.md").read_text()
    assert "## Evaluation (`llmtune eval`)" in text and "| chat-mc | acc | 0.625 | 8 |" in text
    assert "## Results" in text  # the rest of the card is still there
    assert str(out) in (out / "eval" / "chat-mc.json").read_text()  # lm-eval's record names the model folder ...
    assert str(tmp_path) not in card.portable_file(out, "eval/chat-mc.json").decode()  # ... not as uploaded
