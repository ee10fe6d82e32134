"""Recipe loading and checking: extends, --set, interpolation, errors with file:line."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from llmtune.errors import UserError
from llmtune.recipe import loader
from llmtune.recipe.check import resolve
from llmtune.secret import redact

from .conftest import RECIPES, cli, make_recipe, write_recipe


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n')
    return path


def problems(path, *sets):
    with pytest.raises(UserError) as info:
        resolve(path, sets)
    return info.value.problems


def test_extends_merges_maps_and_replaces_lists(tmp_path, data_file):
    (tmp_path / "base").mkdir()
    make_recipe(tmp_path / "base", data=data_file, name="common",
                adapter={"type": "lora", "r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]},
                train={"learning_rate": 1.0e-4, "num_train_epochs": 2})
    child = write_recipe(tmp_path / "child.yaml", """\
extends: base/common.yaml
adapter: {r: 32, target_modules: [o_proj]}
train: {learning_rate: 5.0e-5}
""")
    config = resolve(child).config
    assert config["adapter"] == {"type": "lora", "loraplus_lr_ratio": None, "r": 32, "lora_alpha": 16,
                                 "target_modules": ["o_proj"]}
    assert config["train"] == {"learning_rate": 5e-5, "num_train_epochs": 2.0}
    assert config["name"] == "child" and config["output_dir"] == str(tmp_path / "runs" / "child")  # beside the recipe


def test_extends_a_shipped_recipe_by_name(tmp_path, data_file):
    child = write_recipe(tmp_path / "mine.yaml", f"""\
extends: base/lora.yaml
method: sft
model: {{name: builtin:tiny}}
data: {{train: [{{path: {data_file}}}]}}
""")
    assert resolve(child).config["adapter"]["type"] == "lora"


def test_extends_cycle_is_an_error(tmp_path):
    write_recipe(tmp_path / "a.yaml", "extends: b.yaml\nmethod: sft\n")
    write_recipe(tmp_path / "b.yaml", "method: sft\nextends: a.yaml\n")
    (message,) = problems(tmp_path / "a.yaml")
    where, chain = message.split(": extends cycle: ")
    assert where.endswith("b.yaml:2:1")
    assert [Path(p).name for p in chain.split(" -> ")] == ["a.yaml", "b.yaml", "a.yaml"]


def test_data_paths_are_relative_to_the_file_that_names_them(tmp_path, data_file):
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "data.jsonl").write_text(data_file.read_text())
    make_recipe(tmp_path / "base", data="data.jsonl", name="b")
    child = write_recipe(tmp_path / "c.yaml", "extends: base/b.yaml\n")
    assert resolve(child).config["data"]["train"][0]["path"] == str(tmp_path / "base" / "data.jsonl")


def test_set_overrides_are_typed(tmp_path, data_file):
    recipe = make_recipe(tmp_path, data=data_file, adapter={"type": "lora"})
    config = resolve(recipe, ["train.learning_rate=1e-4", "adapter.r=32", "train.bf16=false",
                              "adapter.target_modules=[q_proj, k_proj]", "data.train.0.weight=2",
                              "train.report_to=none"]).config
    assert config["train"] == {"learning_rate": 1e-4, "bf16": False, "report_to": "none"}
    assert config["adapter"]["r"] == 32 and config["adapter"]["target_modules"] == ["q_proj", "k_proj"]
    assert config["data"]["train"][0]["weight"] == 2.0


def test_a_bad_set_names_itself(tmp_path, data_file):
    recipe = make_recipe(tmp_path, data=data_file)
    (message,) = problems(recipe, "train.learing_rate=1")
    assert message.startswith("--set train.learing_rate=1: unknown key 'learing_rate' in train")
    assert "did you mean 'learning_rate'" in message


def test_env_and_self_interpolation(tmp_path, data_file, monkeypatch):
    monkeypatch.setenv("RUNS", "/scratch/runs")
    recipe = make_recipe(tmp_path, data=data_file, text="""\
name: exp-${model.name}
output_dir: ${env:RUNS}/${name}
seed: ${env:SEED_VALUE}
""")
    (message,) = problems(recipe)
    assert message.endswith("r.yaml:8:1: environment variable 'SEED_VALUE' is not set (referenced as ${env:SEED_VALUE})")
    monkeypatch.setenv("SEED_VALUE", "7")
    config = resolve(recipe).config
    assert config["output_dir"] == "/scratch/runs/exp-builtin:tiny"
    assert config["seed"] == 7  # a lone reference keeps YAML typing of the variable's value


def test_secret_env_values_are_redacted(tmp_path, data_file, monkeypatch):
    monkeypatch.setenv("MY_API_KEY", "secret_value_123")
    recipe = make_recipe(tmp_path, data=data_file, text="output_dir: runs/${env:MY_API_KEY}\n")
    resolved = resolve(recipe)
    assert resolved.config["output_dir"] == str(tmp_path / "runs" / "secret_value_123")
    assert redact(resolved.config, resolved.recipe.secrets)["output_dir"] == str(tmp_path / "runs/${env:MY_API_KEY}")
    hub_token = make_recipe(tmp_path, data=data_file, name="t", train={"hub_token": "x"})
    assert "export HF_TOKEN instead" in problems(hub_token)[0]


def test_every_error_in_one_pass_with_file_line_col(tmp_path, data_file):
    recipe = write_recipe(tmp_path / "bad.yaml", f"""\
method: sft
model:
  name: builtin:tiny
  dtype: bf16
  attn: sdpa
adapter:
  type: lorra
data:
  train:
    - path: {data_file}
      weight: heavy
train:
  learing_rate: 1.0e-4
  num_train_epochs: many
  seed: 1
""")
    found = problems(recipe)
    expected = [
        "bad.yaml:4:3: `model.dtype` must be one of: 'auto', 'bfloat16', 'float16', 'float32'; got 'bf16' "
        "(did you mean 'bfloat16'?)",
        "bad.yaml:5:3: unknown key 'attn' in model",
        "bad.yaml:7:3: `adapter.type` must be one of: 'lora', 'dora', 'rslora', 'ia3', 'prefix', 'prompt', "
        "'p_tuning'; got 'lorra' (did you mean 'lora'?)",
        "bad.yaml:11:7: `data.train.0.weight` must be a number, got str 'heavy'",
        "bad.yaml:13:3: unknown key 'learing_rate' in train (did you mean 'learning_rate'?)",
        "bad.yaml:14:3: `train.num_train_epochs`: expected float, got str 'many'",
        "bad.yaml:15:3: `train.seed` is managed by llmtune: set the top-level `seed:`",
    ]
    assert len(found) == len(expected), found
    for want in expected:
        assert any(want in p for p in found), (want, found)


def test_yaml_syntax_and_structure_errors(tmp_path):
    broken = write_recipe(tmp_path / "broken.yaml", "method: sft\nmodel:\n  name: [unclosed\n")
    (message,) = problems(broken)
    assert "broken.yaml:4:1: YAML syntax error" in message
    dup = write_recipe(tmp_path / "dup.yaml", "method: sft\nmethod: sft\n")
    assert any("dup.yaml:2:1: duplicate key 'method'" in p for p in problems(dup))
    listy = write_recipe(tmp_path / "list.yaml", "- method: sft\n")
    assert problems(listy) == [f"{listy}:1:1: a recipe must be a mapping of keys, got list"]


def test_missing_sections_and_cross_checks(tmp_path, data_file):
    recipe = write_recipe(tmp_path / "r.yaml", "method: sft\nmodel: {name: builtin:tiny}\n")
    assert any("missing required key `data`" in p for p in problems(recipe))
    qlora_without_adapter = make_recipe(tmp_path, data=data_file, name="q", quantization={"bits": 4})
    (message,) = problems(qlora_without_adapter)
    assert "q.yaml:3:1: a quantized base cannot be fully fine-tuned; add an `adapter:` section" in message


def test_validate_cli_checks_many_files_and_exits_2(tmp_path, data_file):
    good = make_recipe(tmp_path, data=data_file, name="good")
    bad = make_recipe(tmp_path, data=data_file, name="bad", train={"learning_rat": 1})
    result = cli("validate", good, bad, "--no-data", cwd=tmp_path)
    assert result.returncode == 2
    assert f"ok: {good}" in result.stdout
    assert "error: bad.yaml:6:9: unknown key 'learning_rat' in train (did you mean 'learning_rate'?)" in result.stderr
    assert "Traceback" not in result.stderr


def test_verb_must_match_the_recipe_method(tmp_path, data_file):
    unknown = make_recipe(tmp_path, "sftt", data_file, name="u")
    assert "u.yaml:1:1: `method` must be one of: 'sft'" in problems(unknown)[0]
    assert "(did you mean 'sft'?)" in problems(unknown)[0]
    recipe = make_recipe(tmp_path, "dpo", data_file)
    result = cli("sft", recipe, cwd=tmp_path)
    assert result.returncode == 2
    assert "r.yaml:1:1: this recipe is for `llmtune dpo` (method: dpo), not `llmtune sft`" in result.stderr


# eval/ holds lm-eval task files (tests/test_eval.py runs them), not recipes; merge/ recipes name runs trained
# first (tests/test_merging.py checks them on runs of its own).
SHIPPED = sorted(p for p in RECIPES.rglob("*.yaml")
                 if not {"base", "launch", "eval", "merge"} & set(p.relative_to(RECIPES).parts))


@pytest.mark.slow
@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(RECIPES)))
def test_every_shipped_recipe_validates(path):
    # Recipes on Hub models/datasets cannot reach their data offline; their recipe is still checked in full.
    offline = "builtin:tiny" in path.read_text()
    result = cli("validate", path, *([] if offline else ["--no-data"]))
    assert result.returncode == 0, result.stderr


OVERLAYS = sorted((RECIPES / "base").glob("*.yaml"))
RENAMED = {("adapter", "alpha"): ("adapter", "lora_alpha"), ("adapter", "dropout"): ("adapter", "lora_dropout")}


def leaves(tree, prefix=()):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from leaves(value, (*prefix, key))
        else:
            yield (*prefix, key), value


def overlay_values(path):
    """Every value an overlay sets, those of the overlays it extends included (its own win)."""
    raw = yaml.load(path.read_text(), Loader=loader.Loader)
    parent = raw.pop("extends", None)
    return {**(overlay_values(path.parent / parent) if parent else {}), **dict(leaves(raw))}


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_overlays_are_partial_recipes(overlay, tmp_path, data_file):
    assert isinstance(yaml.safe_load(overlay.read_text()), dict), overlay
    # Alone, it lacks just what only a whole recipe says.
    missing = [p.split("missing required key ")[-1].split(":")[0] for p in problems(overlay)]
    assert sorted(missing) == ["`data`", "`method`", "`model.name`"], problems(overlay)
    # Extended by a recipe, every value it sets arrives.
    extended = make_recipe(tmp_path, data=data_file, model={"dtype": None}, text=f"extends: base/{overlay.name}\n")
    config = resolve(extended).config
    values = overlay_values(overlay)
    assert len(values) >= 4
    for key, value in values.items():
        section, name = RENAMED.get(key, key)
        assert config[section][name] == value, key


def test_overlays_compose_later_ones_win_and_the_recipe_wins_over_all(tmp_path, data_file):
    both = "extends: [base/full.yaml, base/qlora.yaml]\n"
    config = resolve(make_recipe(tmp_path, data=data_file, model={"dtype": None}, text=both)).config
    assert config["train"] == {"learning_rate": 2.0e-4, "gradient_checkpointing": True, "lr_scheduler_type": "cosine",
                               "warmup_steps": 0.03, "optim": "paged_adamw_8bit"}  # qlora's rate over full's
    assert config["adapter"]["r"] == 16 and config["quantization"]["bits"] == 4  # qlora.yaml, and lora.yaml under it
    assert config["model"]["dtype"] == "bfloat16"
    mine = resolve(make_recipe(tmp_path, data=data_file, model={"dtype": "float32"}, train={"learning_rate": 5.0e-5},
                               adapter={"r": 4}, text=both)).config
    assert (mine["train"]["learning_rate"], mine["adapter"]["r"], mine["model"]["dtype"]) == (5.0e-5, 4, "float32")
    assert mine["adapter"]["lora_alpha"] == 32 and mine["train"]["optim"] == "paged_adamw_8bit"


def test_help_is_fast_and_imports_no_ml_library():
    code = ("import sys, time; t = time.perf_counter(); from llmtune.cli import app; import typer.testing;"
            "r = typer.testing.CliRunner().invoke(app, ['--help']); assert r.exit_code == 0, r.output;"
            "heavy = [m for m in ('torch', 'transformers', 'trl', 'peft', 'datasets') if m in sys.modules];"
            "print(heavy, time.perf_counter() - t)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == "[]", out
    assert float(out[-1]) < 0.5


HEAVY = ("torch", "transformers", "trl", "peft", "accelerate", "bitsandbytes", "datasets")


def validate_imports(recipe, *args, cache):
    """The heavy packages `llmtune validate RECIPE ARGS` imported, run as a user would (its own process)."""
    code = ("import sys; from llmtune.cli import main; sys.argv = ['llmtune', 'validate', *sys.argv[1:]]\n"
            "try:\n    main()\nexcept SystemExit as exit:\n    assert not exit.code, exit.code\n"
            f"print([m for m in {HEAVY!r} if sys.modules.get(m)])")
    result = subprocess.run([sys.executable, "-c", code, str(recipe), *args], capture_output=True, text=True,
                            env={**os.environ, "LLMTUNE_CACHE": str(cache)})
    assert result.returncode == 0 and f"ok: {recipe}" in result.stdout, result.stderr
    return result.stdout.splitlines()[-1]


@pytest.mark.slow
def test_validate_imports_only_what_its_checks_need(tmp_path, data_file):
    recipe = make_recipe(tmp_path, data=data_file, adapter={"type": "lora"}, quantization={"bits": 4})
    # The recipe alone: no ML library.
    assert validate_imports(recipe, "--no-data", cache=tmp_path / "cold-too") == "[]"
    # With the data, validate checks what the run would refuse once the model loaded: the adapter against the
    # model built on the meta device (torch, PEFT; no weights: builtin:tiny is not even built), the rows against
    # the tokenizer (chat template, prompts that fill max_length: transformers, TRL's training templates).
    imported = validate_imports(recipe, cache=tmp_path / "cold-chat")
    assert all(m in imported for m in ("torch", "transformers", "peft", "trl", "datasets")), imported
    assert not (tmp_path / "cold-chat" / "builtin").exists()


@pytest.mark.slow
def test_recipes_list_show_copy(tmp_path):
    listing = cli("recipes", "list").stdout
    assert "quickstart" in listing
    shown = cli("recipes", "show", "quickstart")
    assert shown.stdout == (RECIPES / "quickstart.yaml").read_text()
    copied = cli("recipes", "copy", "quickstart", tmp_path)
    assert copied.returncode == 0, copied.stderr
    assert (tmp_path / "quickstart.yaml").is_file() and (tmp_path / "data" / "chat.jsonl").is_file()
    header = (tmp_path / "quickstart.yaml").read_text().splitlines()[1]
    assert header == f"# Run:  llmtune sft {tmp_path / 'quickstart.yaml'}"  # the copy, not recipes/quickstart.yaml
    assert cli("validate", tmp_path / "quickstart.yaml").returncode == 0
    again = cli("recipes", "copy", "quickstart", tmp_path)
    assert again.returncode == 2 and "already exists" in again.stderr
    # A recipe in a subfolder with `../data/...` paths, into a folder that does not exist yet.
    nested = tmp_path / "new" / "dir"
    assert cli("recipes", "copy", "dpo/tiny-lora", nested).returncode == 0
    copied = (nested / "tiny-lora.yaml").read_text()
    assert "path: data/preference.jsonl" in copied and (nested / "data" / "preference.jsonl").is_file()
    assert "recipes/dpo/tiny-lora.yaml" not in copied and f"llmtune dpo {nested / 'tiny-lora.yaml'}" in copied
    assert f"$schema={(RECIPES / 'recipe.schema.json').resolve().as_uri()}" in copied
    assert cli("validate", nested / "tiny-lora.yaml").returncode == 0


def test_docs_reference_matches_the_schema():
    from llmtune.recipe.reference import render

    page = (RECIPES.parent / "docs" / "recipes.md").read_text()
    block = page.split("<!-- reference:start -->\n")[1].split("<!-- reference:end -->")[0]
    assert block == render(), "docs/recipes.md is stale: paste `python -m llmtune.recipe.reference` between the markers"
