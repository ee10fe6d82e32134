"""`llmtune eval`: score a run directory on lm-evaluation-harness tasks.

The model is loaded as `llmtune generate` loads it (`infer.load`: an adapter on its base,
quantized as in training, or a full or merged model) and handed to lm-eval's `HFLM`;
lm-eval builds the prompts, scores them and aggregates. `--tasks` takes lm-eval task
names (and globs such as `mmlu_*`), a task YAML file, a folder of them, or a task shipped
under recipes/eval/ (`eval/chat-mc`). With only local tasks nothing goes to the Hub.

Results land in RUN_DIR/eval/NAME.json and as an entry of manifest.json's `evals`.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from ..files import read_manifest, write_json
from ..logs import quiet
from ..runner import card
from ..runner.lmeval import import_lm_eval, load_tasks, metrics, parse_tasks, score
from ..runner.rundir import now, package_versions
from ..secret import scrub
from .infer import is_adapter, load, model_head, run_recipe

# lm-eval's result sections worth keeping; the rest is environment dumps, hashes and the chat template text.
KEPT = ("results", "groups", "group_subtasks", "configs", "versions", "n-shot", "higher_is_better", "n-samples")
DROPPED_CONFIG = ("model_args", "model_sha", "use_cache")


@dataclass
class Options:
    limit: float | None = None  # rows per task (a fraction below 1)
    num_fewshot: int | None = None
    batch_size: str = "1"  # a number, or auto / auto:N
    chat_template: bool | None = None  # None: the run's training data decides (see chat_template_default)
    device: str | None = None


def trained_on_chat(run_dir: Path) -> bool | None:
    """Whether the run's training data was conversational; None when its manifest does not say."""
    manifest = read_manifest(run_dir)
    if manifest.get("merged_from"):  # `llmtune merge` output: the trained run's manifest knows
        manifest = read_manifest(Path(manifest["merged_from"]))
    shape = manifest.get("data_shape")
    return None if shape is None else shape.startswith("conversational_")


def chat_template_default(run_dir: Path, tokenizer) -> tuple[bool, str]:
    """Apply the chat template unless the model has none or the run is known to have trained on plain text.

    A chat-trained model learned to answer after its template's assistant marker: scored on bare
    text it is measured on a format it never saw."""
    if not tokenizer.chat_template:
        return False, "not applied (the tokenizer has none)"
    chat = trained_on_chat(run_dir)
    if chat is False:
        return False, "not applied (the run trained on plain text)"
    return True, "applied (" + ("the run trained on conversations" if chat else "the tokenizer has one") + ")"


def _batch_size(text: str):
    if re.fullmatch(r"auto(:\d+)?", text):
        return text
    if text.isdigit() and int(text) > 0:
        return int(text)
    raise UserError(f"--batch-size {text}: give a number of rows or `auto` (largest that fits, found by trying)")


def _limit(value: float | None):
    if value is None:
        return None
    if value <= 0:
        raise UserError(f"--limit {value:g}: give a number of rows, or a fraction of each task between 0 and 1")
    return int(value) if value >= 1 else value


def _device(name: str):
    import torch

    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name}: not a device; e.g. cpu, cuda or cuda:1") from None
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UserError(f"--device {name}: no such GPU here (torch sees {torch.cuda.device_count()})")
    return device


def _file_name(names: list[str]) -> str:
    name = re.sub(r"[^A-Za-z0-9_.+-]", "_", "+".join(dict.fromkeys(names)))
    return name if len(name) <= 80 else f"{name[:60]}-{hashlib.sha1(name.encode()).hexdigest()[:8]}"


def _chat_template(choice: bool | None, run_dir: Path, tokenizer) -> tuple[bool, str]:
    if choice is None:
        return chat_template_default(run_dir, tokenizer)
    if choice and not tokenizer.chat_template:
        raise UserError(f"--apply-chat-template: the tokenizer in {run_dir} has no chat template")
    return choice, "applied (--apply-chat-template)" if choice else "not applied (--no-apply-chat-template)"


def evaluate(run_dir, tasks: str, options: Options) -> tuple[list[str], Path]:
    """Score the run on the tasks; (lines to print, results file). Nothing is written unless all went well."""
    run_dir = Path(run_dir)
    is_adapter(run_dir)  # a missing or unfinished run fails here, before anything loads
    if model_head(run_recipe(run_dir)) != "CausalLM":
        raise UserError(f"{run_dir}: a reward model scores whole texts; lm-eval tasks need a language model")
    batch_size = _batch_size(options.batch_size)
    limit = _limit(options.limit)
    specs = parse_tasks(tasks)
    lm_eval = import_lm_eval(specs, "llmtune eval")
    from lm_eval.utils import make_table

    device = _device(options.device) if options.device else None
    quiet()
    started = time.monotonic()
    tasks_loaded = load_tasks(specs)  # a bad task file fails before the model loads
    loaded = load(run_dir)
    model = loaded.model
    if device is not None:
        try:
            model = model.to(device)
        except (RuntimeError, ValueError) as err:  # e.g. an 8-bit model, which cannot move once loaded
            raise UserError(f"--device {options.device}: {err}") from None
    apply, why = _chat_template(options.chat_template, run_dir, loaded.tokenizer)
    results = score(model, loaded.tokenizer, tasks_loaded, limit=limit, num_fewshot=options.num_fewshot,
                    batch_size=batch_size, apply_chat_template=apply)

    record = {"tasks": list(tasks_loaded[1]), "limit": limit, "num_fewshot": options.num_fewshot,
              "chat_template": apply, "seconds": round(time.monotonic() - started, 1), "lm_eval": lm_eval.__version__}
    out = save(run_dir, results, record)
    tables = [make_table(results)] + ([make_table(results, "groups")] if results.get("groups") else [])
    return [f"chat template: {why}", *(table.rstrip() for table in tables)], out


def save(run_dir: Path, results: dict, record: dict) -> Path:
    """RUN_DIR/eval/NAME.json (lm-eval's results, less environment dumps and secrets) and a manifest entry."""
    record = {**record, "time": now()}
    config = {k: v for k, v in results.get("config", {}).items() if k not in DROPPED_CONFIG}
    payload = {"run_dir": str(run_dir), **record, "config": {**config, "model": str(run_dir)},
               "packages": package_versions(), **{k: results[k] for k in KEPT if k in results}}
    out = run_dir / "eval" / f"{_file_name(record['tasks'])}.json"
    out.parent.mkdir(exist_ok=True)
    write_json(out, json.loads(scrub(json.dumps(payload, default=str))))
    manifest = read_manifest(run_dir)
    entry = {**record, "file": str(out.relative_to(run_dir)), "metrics": metrics(results)}
    write_json(run_dir / "manifest.json", {**manifest, "evals": [*manifest.get("evals", []), entry]})
    card.write(run_dir, scrub)  # the card shows the scores
    return out
