"""Publishing runs to the Hub (`hub:` and `llmtune push`), with huggingface_hub's HfApi replaced: no network."""

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest
import yaml
from huggingface_hub import HfApi, RepoUrl
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.hf_api import CommitInfo
from typer.testing import CliRunner

from llmtune.cli import app
from llmtune.files import is_repo_id
from llmtune.tools import push as hub

from .conftest import RECIPES, cli, make_recipe, write_recipe

SECRET = "hf_planted_token_5150"
UPLOADED = {"README.md", "adapter_config.json", "adapter_model.safetensors", "chat_template.jinja", "tokenizer.json",
            "tokenizer_config.json", "recipe.yaml", "manifest.json", "metrics.jsonl", "loss.png"}
COMMIT = "c0ffee" * 6 + "abcd"


class FakeHub:
    """Stands in for the Hub behind HfApi: records each call and the bytes of every uploaded file."""

    def __init__(self, public=(), fail=False, offline=False):
        self.public, self.fail, self.offline = set(public), fail, offline
        self.calls, self.tokens, self.uploaded = [], [], {}

    def _call(self, api, name, *args, **kwargs):
        if self.offline:
            raise AssertionError(f"HfApi.{name} called")
        self.calls.append((name, args, kwargs))
        self.tokens.append(api.token)

    def install(self, mp):
        fake = self

        def create_repo(api, repo_id, **kwargs):
            fake._call(api, "create_repo", repo_id, **kwargs)
            return RepoUrl(f"https://huggingface.co/{repo_id}")

        def repo_info(api, repo_id, **kwargs):
            fake._call(api, "repo_info", repo_id, **kwargs)
            return SimpleNamespace(private=repo_id not in fake.public)

        def create_branch(api, repo_id, **kwargs):
            fake._call(api, "create_branch", repo_id, **kwargs)

        def create_commit(api, repo_id, operations, **kwargs):
            fake._call(api, "create_commit", repo_id, **kwargs)
            if fake.fail:
                raise HfHubHTTPError("500 Server Error: Internal Server Error for url: "
                                     f"https://huggingface.co/api/models/{repo_id}/commit/main",
                                     response=SimpleNamespace(headers={}, request=None))
            for op in operations:
                data = op.path_or_fileobj
                fake.uploaded[op.path_in_repo] = data if isinstance(data, bytes) else Path(data).read_bytes()
            return CommitInfo(commit_url=f"https://huggingface.co/{repo_id}/commit/{COMMIT}", commit_message="",
                              commit_description="", oid=COMMIT, pr_url=None)

        for method in (create_repo, repo_info, create_branch, create_commit):
            mp.setattr(HfApi, method.__name__, method)
        return self

    def names(self):
        return [call[0] for call in self.calls]


def invoke(mp, tmp, args, fake: FakeHub, token: str | None = SECRET):
    """Run the CLI in this process, with the fake Hub and HF_TOKEN set (or no token anywhere)."""
    fake.install(mp)
    mp.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp / "no-login" / "token"))  # no stored login
    mp.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    if token:
        mp.setenv("HF_TOKEN", token)
    else:
        mp.delenv("HF_TOKEN", raising=False)
    return CliRunner().invoke(app, list(map(str, args)))


def train(mp, tmp, fake, token=SECRET, steps=4):
    recipe = make_recipe(tmp, data={"max_length": 64, "packing": False}, name="recipe",
                         adapter={"type": "lora", "r": 4},
                         train={"max_steps": steps, "per_device_train_batch_size": 4, "logging_steps": 1,
                                "save_steps": 2, "disable_tqdm": True},
                         hub={"repo_id": "me/tiny-sft"})
    out = tmp / "runs" / "tiny"
    return out, invoke(mp, tmp, ["sft", recipe, "--output-dir", out], fake, token)


@pytest.fixture(scope="module")
def pushed(tmp_path_factory, llmtune_cache):
    """One tiny run trained with `hub:` and a token: it is uploaded when training ends."""
    tmp = tmp_path_factory.mktemp("hub")
    with pytest.MonkeyPatch.context() as mp:
        fake = FakeHub()
        out, result = train(mp, tmp, fake)
    assert result.exit_code == 0, result.output
    return out, result, fake


@pytest.mark.slow
def test_training_uploads_exactly_the_run_files_to_a_private_repo(pushed):
    out, result, fake = pushed
    assert fake.names() == ["create_repo", "repo_info", "create_commit"]
    assert fake.calls[0][1] == ("me/tiny-sft",) and fake.calls[0][2] == {"private": True, "exist_ok": True}
    assert set(fake.uploaded) == UPLOADED
    # Left out though present: checkpoints, the log, the lock-free run's other files.
    assert (out / "checkpoint-2").is_dir() and (out / "checkpoint-4").is_dir() and (out / "train.log").is_file()
    assert fake.uploaded["adapter_model.safetensors"] == (out / "adapter_model.safetensors").read_bytes()


@pytest.mark.slow
def test_the_token_goes_to_the_hub_only(pushed):
    out, result, fake = pushed
    assert set(fake.tokens) == {SECRET}  # taken from HF_TOKEN
    for name, data in fake.uploaded.items():
        assert SECRET.encode() not in data, name
    for path in out.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path
    assert SECRET not in result.output


@pytest.mark.slow
def test_manifest_and_summary_record_the_upload(pushed):
    out, result, fake = pushed
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "completed"
    assert {k: manifest["hub"][k] for k in ("repo_id", "revision", "commit", "url", "private")} == {
        "repo_id": "me/tiny-sft", "revision": "main", "commit": COMMIT, "url": "https://huggingface.co/me/tiny-sft",
        "private": True}
    assert "on the Hub: https://huggingface.co/me/tiny-sft" in result.stdout


@pytest.mark.slow
def test_uploaded_card_is_a_hub_card(pushed):
    out, result, fake = pushed
    card = fake.uploaded["README.md"].decode()
    front = card.split("---\n")[1]
    assert "library_name: peft\n" in front and "pipeline_tag: text-generation\n" in front
    assert "tags: [llmtune, trl, sft, lora]" in front
    assert "base_model" not in front  # builtin:tiny is no Hub id; the Hub's metadata takes only those
    # On the Hub the card loads from the repository; the local card from the folder, relative to the recipe's.
    assert card.count('from_pretrained("me/tiny-sft")') == 2 and str(out) not in card
    assert 'from_pretrained("runs/tiny")' in (out / "README.md").read_text()
    # Uploaded, the record names local paths relative to the recipe's folder (no git repository here), or cuts them.
    for name in ("recipe.yaml", "manifest.json"):
        assert str(out.parent.parent) not in fake.uploaded[name].decode() and "output_dir: runs/tiny" in \
            fake.uploaded["recipe.yaml"].decode()
    assert "path: .../chat.jsonl" in fake.uploaded["recipe.yaml"].decode()
    assert is_repo_id("Qwen/Qwen2.5-0.5B") and not is_repo_id("builtin:tiny")
    assert not is_repo_id("Qwen2.5-0.5B") and not is_repo_id("a--b/c") and not is_repo_id("a/b.git")


@pytest.mark.slow
def test_push_dry_run_lists_files_and_sizes_without_the_network(pushed, tmp_path):
    out, _, _ = pushed
    with pytest.MonkeyPatch.context() as mp:
        result = invoke(mp, tmp_path, ["push", out, "--dry-run"], FakeHub(offline=True), token=None)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"would push {len(UPLOADED)} files (") and "to me/tiny-sft (private, branch main)" in \
        lines[0]
    listed = {line.split()[0]: line.split()[1:] for line in lines[1:] if line.startswith("  ")}
    assert set(listed) == UPLOADED
    size = (out / "adapter_model.safetensors").stat().st_size
    assert listed["adapter_model.safetensors"] == [f"{size / 1000:.1f}", "kB"]
    assert "HF_TOKEN" in result.stdout  # says a real push needs a token
    assert hub.files(out, include_checkpoints=True, include=["train.log"]) == sorted(
        [*UPLOADED, "train.log", *(p.relative_to(out).as_posix() for p in out.glob("checkpoint-*/*"))])


@pytest.mark.slow
def test_without_a_token_the_run_succeeds_and_says_how_to_push(tmp_path):
    with pytest.MonkeyPatch.context() as mp:
        fake = FakeHub()
        out, result = train(mp, tmp_path, fake, token=None, steps=2)
    assert result.exit_code == 0, result.output
    assert fake.calls == []
    assert f"nothing was uploaded. Push this run later with `llmtune push {out}`" in result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "completed" and "hub" not in manifest


@pytest.mark.slow
def test_a_failed_upload_exits_1_keeps_the_run_and_push_retries_it(tmp_path):
    with pytest.MonkeyPatch.context() as mp:
        out, result = train(mp, tmp_path, FakeHub(fail=True), steps=2)
    assert result.exit_code == 1, result.output
    assert "error: upload to the Hub failed: HfHubHTTPError: 500 Server Error" in result.stderr
    assert f"the run is complete and intact in {out}; retry the upload with `llmtune push {out}`" in result.stderr
    assert "Traceback" not in result.output and SECRET not in result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "completed" and "hub" not in manifest
    assert (out / "adapter_model.safetensors").is_file() and not (out / ".llmtune.lock").exists()

    with pytest.MonkeyPatch.context() as mp:  # the retry, to another repo and branch, in public
        fake = FakeHub()
        result = invoke(mp, tmp_path, ["push", out, "--repo-id", "me/other", "--public", "--revision", "exp"], fake)
    assert result.exit_code == 0, result.output
    assert fake.names() == ["create_repo", "create_branch", "create_commit"]  # public: no privacy check
    assert fake.calls[0][2]["private"] is False and fake.calls[1][2]["branch"] == "exp"
    assert fake.calls[2][2]["revision"] == "exp" and set(fake.uploaded) == UPLOADED
    assert 'from_pretrained("me/other", revision="exp")' in fake.uploaded["README.md"].decode()
    entry = json.loads((out / "manifest.json").read_text())["hub"]
    assert entry["url"] == "https://huggingface.co/me/other/tree/exp" and entry["commit"] == COMMIT
    assert result.stdout.strip() == f"pushed {out} to https://huggingface.co/me/other/tree/exp (commit {COMMIT[:12]})"


@pytest.mark.slow
def test_push_refusals_exit_2_with_one_message(pushed, tmp_path):
    out, _, _ = pushed
    no_hub = tmp_path / "no-hub"
    shutil.copytree(out, no_hub)
    recipe = yaml.safe_load((no_hub / "recipe.yaml").read_text())
    del recipe["hub"]
    (no_hub / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    unfinished = tmp_path / "unfinished"
    shutil.copytree(out, unfinished)
    manifest = json.loads((unfinished / "manifest.json").read_text())
    (unfinished / "manifest.json").write_text(json.dumps({**manifest, "status": "running"}))
    no_model = tmp_path / "no-model"
    shutil.copytree(out, no_model)
    (no_model / "adapter_config.json").unlink()
    cases = [
        ([tmp_path / "missing"], "no such directory", SECRET, ()),
        ([tmp_path], "not a run directory", SECRET, ()),
        ([unfinished], "the run is not finished (status: running)", SECRET, ()),
        ([no_model], "no saved model in it (adapter_config.json or config.json)", SECRET, ()),
        ([no_hub], "its recipe has no `hub:` section; pass --repo-id namespace/name", SECRET, ()),
        ([out, "--repo-id", "tiny"], "--repo-id: `hub.repo_id` must be a Hub repository id", SECRET, ()),
        ([out], "no Hugging Face token: export HF_TOKEN", None, ()),
        ([out], "me/tiny-sft exists and is public, and `hub.private` is true", SECRET, ("me/tiny-sft",)),
    ]
    for args, message, token, public in cases:
        with pytest.MonkeyPatch.context() as mp:
            fake = FakeHub(public=public)
            result = invoke(mp, tmp_path, ["push", *args], fake, token)
        assert result.exit_code == 2, (args, result.output)
        assert result.stdout == "" and result.stderr.count("error: ") == 1 and message in result.stderr, result.stderr
        assert "create_commit" not in fake.names()


def test_validate_reports_bad_hub_settings_at_their_line(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", f"""\
method: sft
model: {{name: "builtin:tiny"}}
data: {{train: [{{path: {RECIPES / 'data' / 'chat.jsonl'}}}]}}
train:
  push_to_hub: true
hub:
  repo_id: my model
  revision: "a..b"
""")
    result = cli("validate", recipe)
    assert result.returncode == 2, result.stdout
    errors = result.stderr.splitlines()
    assert "r.yaml:5:3: `train.push_to_hub` is managed by llmtune: add a `hub:` section" in errors[0]
    assert "r.yaml:7:3: `hub.repo_id` must be a Hub repository id `namespace/name`" in errors[1]
    assert "e.g. `my-org/my-model`; got 'my model'" in errors[1]
    assert "r.yaml:8:3: `hub.revision` must be a branch name" in errors[2] and len(errors) == 3
    head = recipe.read_text().split("\ntrain:")[0]
    missing = write_recipe(tmp_path / "m.yaml", head + "\nhub: {private: false}\n")
    result = cli("validate", missing)
    assert result.returncode == 2 and "m.yaml:4:1: missing required key `hub.repo_id`" in result.stderr


def test_eval_results_go_up_with_the_run_and_nothing_else_under_eval(tmp_path):
    (tmp_path / "eval").mkdir()
    for name in ("README.md", "train.log", "eval/llmtune_chat_mc.json", "eval/notes.txt", ".lock"):
        (tmp_path / name).write_text("x")
    assert hub.files(tmp_path) == ["README.md", "eval/llmtune_chat_mc.json"]
