"""Merging several runs (`llmtune merge RECIPE`): each method's weights against its formula worked by hand on the
runs' task vectors, and the bad inputs a merge recipe is refused for (file:line, exit 2)."""

import json
from pathlib import Path

import pytest
import torch
import yaml

from llmtune.errors import UserError
from llmtune.tools import merging
from llmtune.tools.infer import Sampling, generate, load, prompt_ids

from .conftest import cli, make_recipe, write_jsonl, write_recipe

KEY = "model.layers.0.self_attn.q_proj.weight"
BASE = {"name": "builtin:tiny", "revision": None, "dtype": "float32", "attn_implementation": None,
        "trust_remote_code": False}


def tiny():
    from transformers import AutoModelForCausalLM

    from llmtune.builtin import builtin_path

    return AutoModelForCausalLM.from_pretrained(builtin_path("tiny"), dtype=torch.float32)


def adapter_run(folder: Path, seed: int, r: int = 4) -> Path:
    """A LoRA run directory on builtin:tiny whose adapter is random (B too, so its task vector is not zero)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer

    from llmtune.builtin import builtin_path

    torch.manual_seed(seed)
    model = get_peft_model(tiny(), LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "v_proj"]))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.5)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(builtin_path("tiny")).save_pretrained(folder)
    (folder / "recipe.yaml").write_text(yaml.safe_dump({"method": "sft", "model": BASE}), encoding="utf-8")
    return folder


def full_run(folder: Path, seed: int) -> Path:
    """A full model of builtin:tiny's architecture: builtin:tiny with noise added to every weight."""
    from transformers import AutoTokenizer

    from llmtune.builtin import builtin_path

    torch.manual_seed(seed)
    model = tiny()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(builtin_path("tiny")).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def runs(tmp_path_factory, llmtune_cache):
    root = tmp_path_factory.mktemp("merge-runs")
    return adapter_run(root / "a", 1), adapter_run(root / "b", 2)


def recipe(folder: Path, runs, name="m", **fields) -> Path:
    body = {"method": "merge", "runs": [{"path": str(r)} for r in runs], **fields}
    return write_recipe(folder / f"{name}.yaml", yaml.safe_dump(body, sort_keys=False))


def with_weights(folder, runs, weights, **fields):
    path = recipe(folder, runs, **fields)
    body = yaml.safe_load(path.read_text())
    for source, w in zip(body["runs"], weights):
        source["weight"] = w
    return write_recipe(path, yaml.safe_dump(body, sort_keys=False))


def deltas(runs):
    """Each adapter's task vector on KEY, from its A and B: scaling * B @ A (LoRA's own formula)."""
    from safetensors.torch import load_file

    out = []
    for run in runs:
        state = load_file(run / "adapter_model.safetensors")
        config = json.loads((run / "adapter_config.json").read_text())
        prefix = "base_model.model." + KEY.removesuffix(".weight")
        a, b = state[f"{prefix}.lora_A.weight"], state[f"{prefix}.lora_B.weight"]
        out.append(config["lora_alpha"] / config["r"] * b @ a)
    return out


def merged(path) -> dict:
    model, _, notes = merging.merged_weights(merging.resolve(path))
    return model.state_dict(), notes


def trim(delta, density):
    """Keep the `density` share of entries largest in magnitude."""
    k = int(density * delta.numel())
    threshold = delta.abs().flatten().sort(descending=True).values[k - 1]
    return torch.where(delta.abs() >= threshold, delta, torch.zeros_like(delta))


def elect(trimmed, weights=(1.0, 1.0)):
    """TIES: per entry, the sign of the task vectors' sum; the mean of the weighted entries that agree with it."""
    sign = torch.where(sum(trimmed) >= 0, 1.0, -1.0)
    agree = [(d.sign() == sign).float() for d in trimmed]
    return sum(w * d * m for w, d, m in zip(weights, trimmed, agree)) / torch.clamp(sum(agree), min=1.0)


def test_linear_is_the_weighted_average_of_the_runs(tmp_path, runs):
    state, notes = merged(with_weights(tmp_path, runs, [0.25, 0.75]))
    base = tiny().state_dict()[KEY]
    d1, d2 = deltas(runs)
    # (W0 + d1) * 0.25 + (W0 + d2) * 0.75
    torch.testing.assert_close(state[KEY], base + 0.25 * d1 + 0.75 * d2)
    assert "merged 2 adapter runs with linear (weights 0.25, 0.75) onto builtin:tiny" in notes[0]
    untouched = "model.layers.0.mlp.up_proj.weight"  # no adapter on it: the base's own weight
    torch.testing.assert_close(state[untouched], tiny().state_dict()[untouched])


def test_linear_default_weights_are_equal(tmp_path, runs):
    state, _ = merged(recipe(tmp_path, runs))
    d1, d2 = deltas(runs)
    torch.testing.assert_close(state[KEY], tiny().state_dict()[KEY] + (d1 + d2) / 2)


def test_task_arithmetic_adds_the_scaled_task_vectors(tmp_path, runs):
    state, _ = merged(with_weights(tmp_path, runs, [1.0, -0.5], merge_method="task_arithmetic"))
    d1, d2 = deltas(runs)
    torch.testing.assert_close(state[KEY], tiny().state_dict()[KEY] + d1 - 0.5 * d2)


@pytest.mark.parametrize("density", [0.3, 1.0])
def test_ties_trims_elects_a_sign_and_averages_the_agreeing(tmp_path, runs, density):
    state, notes = merged(with_weights(tmp_path, runs, [1.0, 1.0], merge_method="ties", density=density))
    d1, d2 = deltas(runs)
    expected = elect([trim(d1, density), trim(d2, density)])
    torch.testing.assert_close(state[KEY], tiny().state_dict()[KEY] + expected)
    assert f"density {density:g}, majority sign by total" in notes[0]
    if density < 1:  # trimming changed something: not the plain average
        assert not torch.allclose(state[KEY], tiny().state_dict()[KEY] + (d1 + d2) / 2)


def test_ties_frequency_sign_counts_runs_not_magnitudes(tmp_path, runs):
    state, _ = merged(with_weights(tmp_path, [*runs, runs[0]], [1.0, 1.0, 1.0], merge_method="ties", density=1.0,
                                   majority_sign="frequency"))
    d1, d2 = deltas(runs)
    votes = 2 * d1.sign() + d2.sign()  # run a is listed twice: two votes
    sign = torch.where(votes >= 0, 1.0, -1.0)
    agree = [(d.sign() == sign).float() for d in (d1, d2, d1)]
    expected = sum(d * m for d, m in zip((d1, d2, d1), agree)) / torch.clamp(sum(agree), min=1.0)
    torch.testing.assert_close(state[KEY], tiny().state_dict()[KEY] + expected)


def test_dare_keeps_a_random_share_rescaled_reproducibly(tmp_path, runs):
    path = with_weights(tmp_path, runs, [1.0, 1.0], merge_method="dare_linear", density=0.5, seed=7)
    state, _ = merged(path)
    d1, d2 = deltas(runs)
    delta = state[KEY] - tiny().state_dict()[KEY]
    # Every entry is one of: dropped in both, kept (rescaled by 1/density) in one, or in both.
    options = torch.stack([torch.zeros_like(d1), 2 * d1, 2 * d2, 2 * d1 + 2 * d2])
    assert torch.isclose(delta.unsqueeze(0), options, atol=1e-5).any(dim=0).all()
    kept = torch.isclose(delta.unsqueeze(0), options[1:], atol=1e-5).any(dim=0).float().mean().item()
    assert 0.6 < kept < 0.9  # 1 - 0.5 * 0.5 of entries keep something, expected 0.75
    torch.testing.assert_close(merged(path)[0][KEY], state[KEY])  # the seed fixes the drops


def test_dare_ties_at_full_density_is_ties_without_trimming(tmp_path, runs):
    state, _ = merged(with_weights(tmp_path, runs, [0.5, 2.0], merge_method="dare_ties", density=1.0))
    d1, d2 = deltas(runs)
    torch.testing.assert_close(state[KEY], tiny().state_dict()[KEY] + elect([d1, d2], (0.5, 2.0)))


def test_full_models_linear_averages_weights_without_a_base(tmp_path):
    a, b = full_run(tmp_path / "a", 1), full_run(tmp_path / "b", 2)
    state, _ = merged(with_weights(tmp_path, [a, b], [0.5, 0.5]))
    from transformers import AutoModelForCausalLM

    wa, wb = (AutoModelForCausalLM.from_pretrained(r).state_dict()[KEY] for r in (a, b))
    torch.testing.assert_close(state[KEY], (wa + wb) / 2)


def test_merged_run_directory_generates_and_reloads(tmp_path, runs):
    out = tmp_path / "merged"
    path = recipe(tmp_path, runs, merge_method="ties", density=0.5, output_dir=str(out))
    written, _ = merging.merge(merging.resolve(path))
    assert written == out
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["method"] == "merge" and manifest["merge_method"] == "ties"
    assert [r["weight"] for r in manifest["runs"]] == [1.0, 1.0]
    assert "ties" in (out / "README.md").read_text()
    assert yaml.safe_load((out / "recipe.yaml").read_text())["density"] == 0.5
    loaded = load(out)  # what `generate`, `eval` and `export` load
    assert not loaded.adapter
    torch.testing.assert_close(loaded.model.state_dict()[KEY], merged(path)[0][KEY])
    ids = prompt_ids(loaded.tokenizer, [{"role": "user", "content": "hi"}])
    assert len(generate(loaded, ids, Sampling(max_new_tokens=4))) <= 4
    with pytest.raises(UserError, match="is not empty"):
        merging.merge(merging.resolve(path))


NOUNS = ["apple", "car", "sky", "rose", "ball", "cup", "shoe", "hat", "door", "lamp", "fish", "bird", "tree", "box",
         "pen", "book", "coat", "kite", "boat", "ring"]
TASKS = {"colour": lambda i: {"prompt": f"What colour is the {NOUNS[i % 20]}?", "completion": " red"},
         "repeat": lambda i: {"prompt": f"Repeat {i % 10}:", "completion": f" {i % 10} {i % 10} {i % 10}"}}


def completion_loss(loaded, rows) -> float:
    """The mean loss on the completions of `rows` (prompt tokens masked), on one row at a time."""
    total = 0.0
    for row in rows:
        prompt, answer = (loaded.tokenizer(row[k], add_special_tokens=False)["input_ids"]
                          for k in ("prompt", "completion"))
        with torch.no_grad():
            total += loaded.model(input_ids=torch.tensor([prompt + answer]),
                                  labels=torch.tensor([[-100] * len(prompt) + answer])).loss.item()
    return total / len(rows)


@pytest.mark.slow  # trains two LoRA runs (8 steps each)
@pytest.mark.parametrize("method", ["linear", "ties"])
def test_merging_runs_of_two_tasks_does_well_on_both(tmp_path, method):
    from llmtune.recipe.check import resolve
    from llmtune.runner.session import train

    folders = {}
    for task, row in TASKS.items():
        write_jsonl(tmp_path / f"{task}.jsonl", [row(i) for i in range(40)])
        trained = make_recipe(tmp_path, name=task, data={"train": [{"path": f"{task}.jsonl"}]},
                              adapter={"type": "lora", "r": 8, "alpha": 16},
                              train={"learning_rate": 1e-2, "max_steps": 8, "per_device_train_batch_size": 8,
                                     "save_strategy": "no", "disable_tqdm": True})
        folders[task] = tmp_path / task
        train(resolve(trained), ["llmtune", "sft"], output_dir=str(folders[task]))
    extra = {"density": 1.0} if method == "ties" else {}  # TIES: sum the agreeing task vectors, trimming none
    weights = [1.0, 1.0] if method == "ties" else [0.5, 0.5]
    out, _ = merging.merge(merging.resolve(with_weights(tmp_path, list(folders.values()), weights,
                                                        merge_method=method, output_dir=str(tmp_path / "merged"),
                                                        **extra)))
    models = {name: load(folder) for name, folder in {**folders, "merged": out}.items()}
    loss = {name: {task: completion_loss(loaded, [row(i) for i in range(20)]) for task, row in TASKS.items()}
            for name, loaded in models.items()}
    # Measured (linear): colour 2.03 / 5.57 / 3.11, repeat 5.58 / 2.93 / 3.19 for the colour run, the repeat run and
    # the merge (builtin:tiny itself: 6.1 and 6.0). The merge is far better on each task than the run trained on
    # the other one, and worse than the run trained on it.
    for task, other in (("colour", "repeat"), ("repeat", "colour")):
        assert loss["merged"][task] < loss[other][task] - 1.0, loss
        assert loss[task][task] < loss["merged"][task], loss


def refused(path, match):
    with pytest.raises(UserError) as err:
        merging.resolve(path)
    assert any(match in problem for problem in err.value.problems), err.value.problems
    return err.value.problems


def test_a_training_verb_points_a_merge_recipe_to_merge(tmp_path, runs):
    from llmtune.recipe.check import resolve

    path = recipe(tmp_path, runs)
    with pytest.raises(UserError, match=f"m.yaml:1:1: this recipe merges runs .* run `llmtune merge {path}`"):
        resolve(path)


def test_weights_of_a_linear_merge_must_sum_to_one(tmp_path, runs):
    problems = refused(with_weights(tmp_path, runs, [1.0, 1.0]), "must sum to 1, they sum to 2; e.g. 0.5, 0.5")
    assert problems[0].startswith(f"{tmp_path / 'm.yaml'}:2:")  # the `runs:` line


def test_density_outside_zero_one_and_where_it_does_not_apply(tmp_path, runs):
    refused(recipe(tmp_path, runs, merge_method="ties", density=1.5), "`density` must be in (0, 1]")
    refused(recipe(tmp_path, runs, merge_method="dare_ties", density=0.0), "`density` must be in (0, 1]")
    refused(recipe(tmp_path, runs, merge_method="ties"), "set `density:` in (0, 1]")
    refused(recipe(tmp_path, runs, density=0.5), "`density` applies to ties, dare_linear and dare_ties")
    refused(recipe(tmp_path, runs, majority_sign="total"), "`majority_sign` applies to ties and dare_ties")
    refused(recipe(tmp_path, runs, merge_method="slerp"), "`merge_method` must be one of")


def test_missing_run_and_a_single_run(tmp_path, runs):
    problems = refused(recipe(tmp_path, [runs[0], tmp_path / "nope"]), "no such run directory")
    assert problems[0].startswith(f"{tmp_path / 'm.yaml'}:4:3:")  # the second run's `path:` line
    refused(recipe(tmp_path, runs[:1]), "a merge needs two runs or more, got 1")


def test_adapters_on_different_bases(tmp_path, runs):
    other = adapter_run(tmp_path / "other", 3)
    body = yaml.safe_load((other / "recipe.yaml").read_text())
    body["model"]["name"] = str(tiny_copy(tmp_path / "other-base"))
    (other / "recipe.yaml").write_text(yaml.safe_dump(body))
    refused(recipe(tmp_path, [runs[0], other]), "adapter runs on different bases cannot be merged")
    refused(recipe(tmp_path, [runs[0], other], base="builtin:tiny"), "not on `base: builtin:tiny`")


def tiny_copy(folder: Path) -> Path:
    tiny().save_pretrained(folder)
    return folder


def test_mismatched_shapes_and_full_models_without_a_base(tmp_path, runs):
    from transformers import LlamaConfig, LlamaForCausalLM

    wide = tmp_path / "wide"
    config = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    LlamaForCausalLM(config).save_pretrained(wide)
    problems = refused(recipe(tmp_path, [runs[0], wide]), "do not have the shapes of builtin:tiny's")
    assert any("hidden_size 64 vs 32" in p for p in problems)
    a = full_run(tmp_path / "fa", 1)
    refused(recipe(tmp_path, [a, full_run(tmp_path / "fb", 2)], merge_method="task_arithmetic"),
            "set `base:` to that model")


@pytest.mark.slow  # CLI subprocesses
def test_cli_validate_and_merge_refuse_with_exit_2_and_write_nothing(tmp_path, runs):
    bad = with_weights(tmp_path, runs, [0.5, 0.25], output_dir=str(tmp_path / "out"))
    for verb in ("validate", "merge"):
        result = cli(verb, bad)
        assert result.returncode == 2, result.stderr
        assert "must sum to 1, they sum to 0.75" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()
    good = recipe(tmp_path, runs, name="good", merge_method="dare_ties", density=0.7)
    result = cli("merge", good, "--out", tmp_path / "merged")
    assert result.returncode == 0 and f"wrote {tmp_path / 'merged'}" in result.stdout, result.stderr
    assert "merged 2 adapter runs with dare_ties (weights 1, 1, density 0.7" in result.stdout
    result = cli("generate", tmp_path / "merged", "-p", "hi", "--max-new-tokens", "4")
    assert result.returncode == 0, result.stderr


def test_shipped_merge_recipe_checks_on_runs_of_its_own(runs):
    from .conftest import RECIPES

    plan = merging.resolve(RECIPES / "merge" / "tiny-ties.yaml",
                           [f"runs=[{{path: {runs[0]}, weight: 1.0}}, {{path: {runs[1]}, weight: 0.5}}]"])
    assert plan.config["merge_method"] == "ties" and plan.weights == [1.0, 0.5] and plan.base == "builtin:tiny"


def test_problems_of_a_merge_recipe_are_reported_as_its_own(tmp_path, runs):
    path = write_recipe(tmp_path / "m.yaml", f"method: merge\nruns:\n  - path: {runs[0]}\n  - path: {runs[1]}\n"
                        "merge_methd: ties\nname: ${env:NOT_SET_ANYWHERE}\n")
    assert merging.is_merge_recipe(path)
    with pytest.raises(UserError) as err:
        merging.resolve(path)
    assert any("NOT_SET_ANYWHERE" in p for p in err.value.problems), err.value.problems
