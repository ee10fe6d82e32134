"""GRPO and RLOO through TRL's trainers, scored by the user's reward functions (`module:function`)
and/or a reward model."""

import json

import pytest

from llmtune.recipe.check import resolve
from llmtune.runner.session import train as run

from .conftest import cli, make_recipe, write_jsonl
from .test_ppo import letter_rm, quarter_means  # noqa: F401 - a fixture, shared with the PPO tests

TRAIN = {"learning_rate": 1.0e-2, "lr_scheduler_type": "constant", "per_device_train_batch_size": 8,
         "num_generations": 4, "max_completion_length": 12, "beta": 0.0, "logging_steps": 1,
         "gradient_checkpointing": False, "save_strategy": "no", "disable_tqdm": True}

REWARDS = '''\
def lowercase_share(prompts, completions, **kwargs):
    """The share of lowercase letters in each completion."""
    return [sum(c.islower() for c in text) / max(len(text), 1) for text in completions]
'''


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A working directory holding prompts and a reward module named after the test."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"TASK {i}: "} for i in range(64)])
    return tmp_path


def recipe(workdir, method, rewards, steps=20):
    """`rewards`: the recipe's `reward_functions:` and/or `reward_model:`."""
    return make_recipe(workdir, method, {"train": [{"path": workdir / "prompts.jsonl"}], "max_length": 64}, name=method,
                       adapter={"type": "lora", "r": 8, "alpha": 16}, train={**TRAIN, "max_steps": steps}, **rewards)


def reward_module(workdir, name):
    (workdir / f"{name}.py").write_text(REWARDS)
    return f"{name}:lowercase_share"


def logged(out):
    return [row for row in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "reward" in row]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["grpo", "rloo"])
def test_reward_function_from_the_recipe_raises_the_reward(workdir, method):
    function = reward_module(workdir, f"rewards_{method}")
    path = recipe(workdir, method, {"reward_functions": [function]})
    out = workdir / "out"
    run(resolve(path), ["llmtune", method, str(path)], output_dir=str(out))
    steps = logged(out)
    assert len(steps) == 20 and all("rewards/lowercase_share/mean" in s for s in steps)
    first, last = quarter_means([s["reward"] for s in steps])
    assert last > 1.5 * first and last - first > 0.15, (first, last)
    assert (out / "adapter_model.safetensors").is_file()
    assert json.loads((out / "manifest.json").read_text())["method"] == method


@pytest.mark.slow
def test_reward_model_and_functions_score_together(workdir, letter_rm):  # noqa: F811 - the fixture
    function = reward_module(workdir, "rewards_mixed")
    path = recipe(workdir, "grpo", {"reward_model": letter_rm, "reward_functions": [function]}, steps=2)
    out = workdir / "out"
    run(resolve(path), ["llmtune"], output_dir=str(out))
    for step in logged(out):
        assert {"rewards/rm/mean", "rewards/lowercase_share/mean"} <= set(step)
        assert step["reward"] == pytest.approx(step["rewards/rm/mean"] + step["rewards/lowercase_share/mean"],
                                               rel=1e-4)


@pytest.mark.slow
def test_missing_rewards_and_bad_function_names_exit_2(workdir):
    path = recipe(workdir, "grpo", {})
    result = cli("validate", path)
    assert result.returncode == 2 and "grpo.yaml:1:1: `method: grpo` needs something to score" in result.stderr

    path = recipe(workdir, "rloo", {"reward_functions": ["no_such_module:f", "rewards"]})
    result = cli("validate", path)
    assert result.returncode == 2 and "takes `module:function` names" in result.stderr and "'rewards'" in result.stderr

    from llmtune.errors import UserError
    from llmtune.methods.rewards import load_reward_functions

    with pytest.raises(UserError, match=r"reward_functions\[0\] `no_such_module:f`: cannot import module "
                                        r"'no_such_module' .*a .py file beside the recipe, or importable from PYTHONPATH"):
        load_reward_functions(["no_such_module:f"])
    function = reward_module(workdir, "rewards_typo")
    with pytest.raises(UserError, match=r"'rewards_typo' \(.*rewards_typo.py\) has no function 'lowercase_sharex'"):
        load_reward_functions([function + "x"])
    result = cli("rloo", path, "--set", f"reward_functions=[{function}x]", "--output-dir", "out", cwd=workdir)
    assert result.returncode == 2 and "has no function 'lowercase_sharex'" in result.stderr, result.stderr
    assert not (workdir / "out").exists() and "Traceback" not in result.stderr
