"""Publishing a finished run to the Hugging Face Hub: the recipe's `hub:` section and `llmtune push`.

What goes up is an allow-list of the run directory's top-level files (`files`): the model or
adapter, the tokenizer, the model card and the run record, plus `llmtune eval`'s results. `checkpoint-N/` only when asked for;
train.log only when `hub.include` names it; hidden files (the lock, staging folders) never.
The token comes from HF_TOKEN or `hf auth login` (huggingface_hub.get_token), goes to HfApi
only, and is never written or printed.

Import-light: the recipe checker calls `check`; huggingface_hub is imported where it is used.
"""

from __future__ import annotations

import datetime as dt
import re
import sys
from fnmatch import fnmatch
from pathlib import Path

from ..errors import UserError
from ..files import ARTIFACTS, read_manifest, write_json
from ..recipe.schema import Checker, HubSection
from ..recipe.sections import check_hub
from ..runner.card import portable_file

MODEL = ("*.safetensors", "*.safetensors.index.json", "config.json", "generation_config.json", "adapter_config.json")
TOKENIZER = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*", "merges.txt", "chat_template.*")
RECORD = ("README.md", "recipe.yaml", "manifest.json", "metrics.jsonl", "loss.png")
UPLOADED = MODEL + TOKENIZER + RECORD
PORTABLE = ("recipe.yaml", "manifest.json")  # uploaded, as RESULTS, with local paths made relative (card.portable)
RESULTS = "eval/*.json"  # `llmtune eval` scores, which the card's readers want next to the model
CHECKPOINTS = "checkpoint-*/**/*"
NO_TOKEN = "no Hugging Face token: export HF_TOKEN (a token with write access, from " \
           "https://huggingface.co/settings/tokens) or run `hf auth login`"


class PushFailed(Exception):
    """The Hub could not be reached or refused the upload; the run directory is as it was."""


def files(run_dir: Path, include_checkpoints: bool = False, include=()) -> list[str]:
    """The files of `run_dir` that are uploaded, as sorted paths relative to it."""
    chosen = {p.name for p in run_dir.iterdir() if p.is_file() and any(fnmatch(p.name, u) for u in UPLOADED)}
    for pattern in [RESULTS, *include, *([CHECKPOINTS] if include_checkpoints else [])]:
        chosen.update(p.relative_to(run_dir).as_posix() for p in run_dir.glob(pattern) if p.is_file())
    return sorted(name for name in chosen if not any(part.startswith(".") for part in Path(name).parts))


def target(run_dir: Path, repo_id: str | None = None, private: bool | None = None,
           revision: str | None = None) -> dict:
    """The `hub:` settings for pushing a finished run: its recipe.yaml's section under the command line's."""
    import yaml

    recipe = run_dir / "recipe.yaml"
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: no such directory")
    if not recipe.is_file() or not (run_dir / "manifest.json").is_file():
        raise UserError(f"{run_dir}: not a run directory (no recipe.yaml and manifest.json); pass the folder "
                        "a training command wrote, e.g. runs/NAME")
    status = read_manifest(run_dir).get("status")
    if status != "completed":
        raise UserError(f"{run_dir}: the run is not finished (status: {status}); push a completed run")
    if not any((run_dir / name).is_file() for name in ARTIFACTS):
        raise UserError(f"{run_dir}: no saved model in it ({' or '.join(ARTIFACTS)}); nothing to push")
    section = (yaml.safe_load(recipe.read_text(encoding="utf-8")) or {}).get("hub") or {}
    given = {k: v for k, v in (("repo_id", repo_id), ("private", private), ("revision", revision)) if v is not None}
    if "repo_id" not in {**section, **given}:
        raise UserError(f"{run_dir}: no Hub repository to push to: its recipe has no `hub:` section; pass "
                        "--repo-id namespace/name (or add `hub: {repo_id: namespace/name}` to the recipe)")

    def where(path: tuple) -> str:  # a value from the command line is reported as its option
        return f"--{path[-1].replace('_', '-')}" if path[-1:] and path[-1] in given else str(recipe)

    checker = Checker(where)
    settings = checker.section(HubSection, {**section, **given}, ("hub",))
    if settings is not None:
        check_hub(checker, {"hub": settings})
    if checker.problems:
        raise UserError(checker.problems)
    return settings


def token() -> str | None:
    from huggingface_hub import get_token

    return get_token()


def _size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000


def describe(run_dir: Path, settings: dict) -> list[str]:
    """What `push` would do (`--dry-run`): the repository and each file with its size."""
    names = files(run_dir, settings["include_checkpoints"], settings["include"])
    sizes = {name: (run_dir / name).stat().st_size for name in names}
    width = max(map(len, names), default=0)
    lines = [f"would push {len(names)} files ({_size(sum(sizes.values()))}) to {settings['repo_id']} "
             f"({'private' if settings['private'] else 'public'}, branch {settings['revision'] or 'main'}):"]
    lines += [f"  {name:<{width}}  {_size(size):>9}" for name, size in sizes.items()]
    if token() is None:
        lines.append(f"note: {NO_TOKEN}; a real push needs one")
    return lines


def _card(run_dir: Path, repo_id: str, revision: str | None) -> bytes:
    """The model card as the Hub shows it: its loading snippet reads the repository, not the local folder."""
    where = f'"{repo_id}"' + (f', revision="{revision}"' if revision else "")
    text = (run_dir / "README.md").read_text(encoding="utf-8")
    return re.sub(r'from_pretrained\("[^"]*"', lambda _: f"from_pretrained({where}", text).encode("utf-8")


def push(run_dir: Path, settings: dict, secret: str) -> dict:
    """Upload the run in one commit; record and return {repo_id, revision, commit, url} as manifest.json's `hub`."""
    from huggingface_hub import CommitOperationAdd, HfApi

    repo_id, revision = settings["repo_id"], settings["revision"]
    names = files(run_dir, settings["include_checkpoints"], settings["include"])
    print(f"pushing {len(names)} files to {repo_id} ...", file=sys.stderr)
    api = HfApi(token=secret)
    try:
        url = api.create_repo(repo_id, private=settings["private"], exist_ok=True)
        if settings["private"] and not api.repo_info(repo_id).private:
            raise UserError(f"{repo_id} exists and is public, and `hub.private` is true: make it private on the Hub, "
                            "choose another repo id, or publish on purpose with `hub.private: false` (--public)")
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        operations = [CommitOperationAdd(name, _card(run_dir, repo_id, revision) if name == "README.md"
                                         else portable_file(run_dir, name) if name in PORTABLE
                                         or fnmatch(name, RESULTS)
                                         else str(run_dir / name)) for name in names]
        commit = api.create_commit(repo_id, operations, revision=revision,
                                   commit_message=f"llmtune: {run_dir.name}")
    except UserError:
        raise
    except Exception as err:  # the Hub's HTTP errors, the network's, offline mode: all end the same way
        raise PushFailed(f"{type(err).__name__}: {err}".replace(secret, "***")) from None
    entry = {"repo_id": repo_id, "revision": revision or "main", "commit": commit.oid,
             "url": f"{url}/tree/{revision}" if revision else str(url), "private": settings["private"],
             "pushed": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    write_json(run_dir / "manifest.json", {**read_manifest(run_dir), "hub": entry})
    return entry


def after_training(run_dir: Path, settings: dict) -> None:
    """The last step of a run whose recipe has `hub:`: upload, or say how to do it later. Raises PushFailed."""
    secret = token()
    if secret is None:
        print(f"hub: {NO_TOKEN}; nothing was uploaded. Push this run later with `llmtune push {run_dir}`",
              file=sys.stderr)
        return
    try:
        push(run_dir, settings, secret)
    except UserError as err:
        raise PushFailed("; ".join(err.problems)) from None
