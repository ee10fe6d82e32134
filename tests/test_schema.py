"""`llmtune schema`: a JSON Schema derived from the recipe schema, TRL and PEFT, that editors can use."""

import copy
import json

import jsonschema
import pytest
import yaml

from llmtune.recipe import fields
from llmtune.recipe.jsonschema import library_versions, recipe_schema
from llmtune.recipe.loader import Loader
from llmtune.recipe.schema import ModelSection

from .conftest import RECIPES, cli

SCHEMA_FILE = RECIPES / "recipe.schema.json"
MODELINE = "# yaml-language-server: $schema="
# merge/ recipes have a schema of their own (llmtune/tools/merging.py), not the training recipe's.
RECIPE_FILES = sorted(p for p in RECIPES.rglob("*.yaml")
                      if not {"launch", "data", "eval", "merge"} & set(p.relative_to(RECIPES).parts))


@pytest.fixture(scope="module")
def schema():
    return recipe_schema()


@pytest.fixture(scope="module")
def validator(schema):
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def problems(validator, recipe) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(recipe)]


def load(path):
    return yaml.load(path.read_text(encoding="utf-8"), Loader=Loader)  # YAML 1.2, as llmtune and editors read it


def test_committed_schema_is_current(schema):
    committed = json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))
    hint = (f"recipes/recipe.schema.json is stale ({committed['$comment']}; installed: {library_versions()}); "
            "regenerate it: llmtune schema > recipes/recipe.schema.json")
    # In full, TRL's and PEFT's fields included: only the note of the versions it was generated from may differ
    # (a patch release that changes no field leaves the file current).
    assert committed["$comment"].startswith("Generated from trl==")
    assert {**committed, "$comment": None} == {**schema, "$comment": None}, hint


def test_cli_prints_the_schema(schema):
    result = cli("schema")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == schema


@pytest.mark.parametrize("path", RECIPE_FILES, ids=lambda p: str(p.relative_to(RECIPES)))
def test_every_shipped_recipe_fits_the_schema_and_names_it(validator, path):
    assert problems(validator, load(path)) == []
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.startswith(MODELINE)]
    assert len(lines) == 1, f"{path} lacks the modeline `{MODELINE}...`"
    assert (path.parent / lines[0][len(MODELINE):]).resolve() == SCHEMA_FILE.resolve()


@pytest.fixture
def quickstart():
    return load(RECIPES / "quickstart.yaml")


def test_rejects_a_misspelt_key_in_train_and_in_model(validator, quickstart):
    recipe = copy.deepcopy(quickstart)
    recipe["train"]["learing_rate"] = 1e-4
    recipe["model"]["nmae"] = "x"
    found = problems(validator, recipe)
    assert any(p.startswith("train:") and "'learing_rate' was unexpected" in p for p in found), found
    assert any(p.startswith("model:") and "'nmae' was unexpected" in p for p in found), found
    assert len(found) == 2, found


def test_rejects_bad_values_and_keys_llmtune_owns(validator, quickstart):
    for path, value in ((("model", "dtype"), "float8"), (("train", "output_dir"), "x"), (("data", "max_length"), "long"),
                        (("adapter", "r"), "eight"), (("adapter", "use_dora"), True), (("seed",), 1.5)):
        recipe = copy.deepcopy(quickstart)
        section = recipe
        for key in path[:-1]:
            section = section[key]
        section[path[-1]] = value
        assert problems(validator, recipe), path


def test_train_takes_the_fields_of_the_methods_config(validator, quickstart):
    recipe = copy.deepcopy(quickstart)
    recipe["train"]["beta"] = 0.1  # a DPOConfig field, not an SFTConfig one
    assert any("'beta' was unexpected" in p for p in problems(validator, recipe))
    recipe["method"] = "dpo"
    assert problems(validator, recipe) == []
    overlay = {"train": {"beta": 0.1, "learning_rate": 1e-5}}  # no method: any method's field
    assert problems(validator, overlay) == []
    assert problems(validator, {"train": {"betta": 0.1}})


def test_adapter_takes_the_fields_of_its_types_peft_class(validator, quickstart):
    def check(adapter):
        return problems(validator, {**quickstart, "adapter": adapter})

    assert check({"r": 8, "alpha": 16, "init_lora_weights": "pissa_niter_4", "loraplus_lr_ratio": 16}) == []
    assert check({"type": "ia3", "target_modules": ["k_proj"], "feedforward_modules": []}) == []
    assert check({"type": "ia3", "r": 8})  # a LoraConfig field
    assert check({"type": "ia3", "loraplus_lr_ratio": 16})  # LoRA+ is for LoRA only
    assert check({"type": "prefix"})  # num_virtual_tokens is required
    assert check({"type": "p_tuning", "num_virtual_tokens": 8, "encoder_hidden_size": 32}) == []
    assert check({"type": "lorra"})


def test_descriptions_and_defaults_come_from_their_one_source(schema):
    model = schema["properties"]["model"]["properties"]
    assert model["dtype"]["description"] == ModelSection.__dataclass_fields__["dtype"].metadata["help"]
    assert model["dtype"]["enum"] == ["auto", "bfloat16", "float16", "float32"]
    sft = next(b["then"]["properties"]["train"] for b in schema["allOf"]
               if b["if"]["properties"].get("method", {}).get("enum") == ["sft"])
    ref = sft["properties"]["learning_rate"]["$ref"].split("/")[-1]
    info = fields.dataclass_fields("trl:SFTConfig")["learning_rate"]
    assert schema["definitions"][ref] == {"description": info.help, "type": "number", "default": info.default}

