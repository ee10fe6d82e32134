"""One rule for every path in a recipe: relative to the recipe file that writes it; `--set` relative to the
working directory; a path that does not exist is reported as a path (file:line), never looked up on the Hub."""

import pytest

from llmtune.files import is_repo_id
from llmtune.paths import SHIPPED
from llmtune.recipe.loader import load
from llmtune.recipe.locations import PATH_KEYS

from .conftest import CHAT, cli, write_recipe

EVERY_PATH = """\
extends: ../shared/base.yaml
method: grpo
model:
  name: runs/policy
  chat_template: templates/chat.jinja
ref_model: ./models/ref
reward_model: runs/rm
teacher_model: models/ref
reward_functions: [rewards:score, lib/more.py:bonus, installed.module:f]
data:
  train:
    - path: data/train.jsonl
    - path: data/*.jsonl
    - path: owner/hub-dataset
  eval:
    - path: ../eval.jsonl
launch:
  backend: zero2
  deepspeed_config: ds.json
train:
  deepspeed: ds.json
  fsdp_config: fsdp.json
  accelerator_config: accel.json
  resume_from_checkpoint: runs/policy
eval:
  judge: judge.yaml
"""


@pytest.fixture
def project(tmp_path, monkeypatch):
    """proj/sub/r.yaml naming one of each path, everything it names beside it; the working directory elsewhere."""
    sub = tmp_path / "proj" / "sub"
    for folder in ("runs/policy", "runs/rm", "models/ref", "templates", "data", "lib"):
        (sub / folder).mkdir(parents=True)
    for file in ("templates/chat.jinja", "data/train.jsonl", "rewards.py", "lib/more.py", "ds.json", "fsdp.json",
                 "accel.json", "judge.yaml"):
        (sub / file).write_text("{}")
    (tmp_path / "proj" / "eval.jsonl").write_text("{}")
    (tmp_path / "proj" / "shared").mkdir()
    (tmp_path / "proj" / "shared" / "base.yaml").write_text("model:\n  name: x\n  chat_template: base.jinja\n")
    (tmp_path / "proj" / "shared" / "base.jinja").write_text("")
    write_recipe(sub / "r.yaml", EVERY_PATH)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    return sub


def test_every_path_key_is_relative_to_the_recipe_not_the_working_directory(project):
    data = load(project / "r.yaml").data
    sub = str(project)
    assert data["output_dir"] == f"{sub}/runs/r"  # the default `runs/NAME`, beside the recipe too
    assert data["model"] == {"name": f"{sub}/runs/policy", "chat_template": f"{sub}/templates/chat.jinja"}
    assert data["ref_model"] == f"{sub}/models/ref"
    assert data["reward_model"] == f"{sub}/runs/rm"
    assert data["teacher_model"] == f"{sub}/models/ref"
    assert data["reward_functions"] == [f"{sub}/rewards.py:score", f"{sub}/lib/more.py:bonus", "installed.module:f"]
    assert [s["path"] for s in data["data"]["train"]] == [f"{sub}/data/train.jsonl", f"{sub}/data/*.jsonl",
                                                          "owner/hub-dataset"]
    assert data["data"]["eval"] == [{"path": str(project.parent / "eval.jsonl")}]
    assert data["launch"]["deepspeed_config"] == f"{sub}/ds.json"
    assert data["train"] == {"deepspeed": f"{sub}/ds.json", "fsdp_config": f"{sub}/fsdp.json",
                             "accelerator_config": f"{sub}/accel.json", "resume_from_checkpoint": f"{sub}/runs/policy"}
    assert data["eval"] == {"judge": f"{sub}/judge.yaml"}
    written = {k[0] for k in PATH_KEYS} - {"data", "output_dir", "runs", "base"}  # the last two: a merge recipe's
    assert written <= set(data), "the recipe above names every path key"


def test_a_merge_recipes_runs_and_base_are_relative_to_it(project):
    write_recipe(project / "m.yaml", "method: merge\nruns:\n  - {path: runs/policy}\n  - {path: runs/rm}\n"
                 "base: models/ref\n")
    data = load(project / "m.yaml").data
    assert [r["path"] for r in data["runs"]] == [f"{project}/runs/policy", f"{project}/runs/rm"]
    assert data["base"] == f"{project}/models/ref" and data["output_dir"] == f"{project}/runs/m"


def test_an_overlay_path_is_relative_to_the_overlay(project):
    (project / "r.yaml").write_text(EVERY_PATH.replace("  chat_template: templates/chat.jinja\n", ""))
    assert load(project / "r.yaml").data["model"]["chat_template"] == str(project.parent / "shared" / "base.jinja")


def test_set_and_output_dir_on_the_command_line_are_relative_to_the_working_directory(project, tmp_path):
    (tmp_path / "elsewhere" / "mine.jsonl").write_text("{}")
    data = load(project / "r.yaml", ["data.train.0.path=mine.jsonl", "output_dir=out"]).data
    assert data["data"]["train"][0]["path"] == str(tmp_path / "elsewhere" / "mine.jsonl")
    assert data["output_dir"] == str(tmp_path / "elsewhere" / "out")


def test_a_missing_path_is_reported_as_a_path_with_its_line(project):
    recipe = (project / "r.yaml").read_text()
    for gone in ("runs/policy", "runs/rm", "models/ref", "templates", "lib", "ds.json", "fsdp.json", "accel.json",
                 "data/train.jsonl", "../eval.jsonl"):
        target = project / gone
        if target.is_dir():
            target.rename(target.with_name(target.name + "-gone"))
        else:
            target.unlink()
    (project / "data" / "other.jsonl").write_text("{}")  # the glob still matches: its files are the data's check
    missing = load(project / "r.yaml").missing  # for what needs the files (`validate` with data, every verb)
    lines = {i + 1: line for i, line in enumerate(recipe.splitlines())}
    where = {p.split(": ")[1]: p for p in missing}
    expected = {"model.name": ("runs/policy", "no such folder"), "ref_model": ("./models/ref", "no such folder"),
                "reward_model": ("runs/rm", "no such folder"), "teacher_model": ("models/ref", "no such folder"),
                "model.chat_template": ("templates/chat.jinja", "no such file"),
                "reward_functions.1": ("lib/more.py:bonus", "no such file"),
                "launch.deepspeed_config": ("ds.json", "no such file"), "train.deepspeed": ("ds.json", "no such file"),
                "train.fsdp_config": ("fsdp.json", "no such file"),
                "train.accelerator_config": ("accel.json", "no such file"),
                "train.resume_from_checkpoint": ("runs/policy", "no such folder"),
                "data.train.0.path": ("data/train.jsonl", "no such file or folder"),
                "data.eval.0.path": ("../eval.jsonl", "no such file or folder")}
    assert set(where) == set(expected)
    for key, (value, what) in expected.items():
        message = where[key]
        file_line = message.split(f": {key}:")[0]
        line = int(file_line.split(":")[-2])
        assert file_line.startswith(str(project / "r.yaml")) and value.split(":")[0] in lines[line], message
        assert f": {key}: {value}: {what} (relative to {project});" in message, message


def test_a_path_of_the_wrong_kind_is_named_as_such(project):
    (project / "runs" / "policy").rmdir()
    (project / "runs" / "policy").write_text("")  # a file where a model folder goes
    (project / "ds.json").unlink()
    (project / "ds.json").mkdir()  # a folder where a file goes
    where = {p.split(": ")[1]: p for p in load(project / "r.yaml").missing}
    assert f"model.name: runs/policy: not a folder (relative to {project});" in where["model.name"]
    assert f"launch.deepspeed_config: ds.json: not a file (relative to {project});" in where["launch.deepspeed_config"]


def test_a_run_folder_not_made_yet_is_a_path_not_a_hub_id(tmp_path):
    """`runs/x` beside the recipe's own runs is a run that does not exist yet, even before `runs/` exists."""
    recipe = write_recipe(tmp_path / "g.yaml", f"method: sft\nmodel:\n  name: runs/x\ndata:\n  train:\n"
                          f"    - path: {CHAT}\n")
    (tmp_path / "elsewhere").mkdir()
    result = cli("validate", recipe, cwd=tmp_path / "elsewhere")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"{recipe}:3:3: model.name: runs/x: no such folder (relative to {tmp_path});" in result.stderr
    run = cli("sft", recipe, cwd=tmp_path / "elsewhere")  # the run refuses it with the same message
    assert run.returncode == 2 and result.stderr == run.stderr and not (tmp_path / "runs").exists()
    # `--no-data` checks the recipe alone: a pipeline's later steps validate before the earlier ones have run.
    assert cli("validate", "--no-data", recipe, cwd=tmp_path / "elsewhere").returncode == 0


def test_hub_ids_are_owner_name_that_nothing_local_claims(tmp_path):
    assert is_repo_id("Qwen/Qwen2.5-0.5B", tmp_path)
    for path in ("./a/b", "../a/b", "/a/b", "~a/b", "runs", "a/b/c", "builtin:tiny"):
        assert not is_repo_id(path, tmp_path), path
    (tmp_path / "Qwen").mkdir()
    assert not is_repo_id("Qwen/Qwen2.5-0.5B", tmp_path)  # a folder named like the owner: a local path


def test_a_shipped_recipe_finds_its_sample_data_and_the_runs_in_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for run in ("rlhf-tiny-sft", "rlhf-tiny-reward"):
        (tmp_path / "runs" / run).mkdir(parents=True)
    data = load("rlhf/tiny-grpo").data
    assert data["output_dir"] == str(tmp_path / "runs" / "rlhf-tiny-grpo")
    assert (data["model"]["name"], data["reward_model"]) == (str(tmp_path / "runs" / "rlhf-tiny-sft"),
                                                             str(tmp_path / "runs" / "rlhf-tiny-reward"))
    assert data["data"]["train"][0]["path"] == str(SHIPPED.resolve() / "data" / "preference.jsonl")
