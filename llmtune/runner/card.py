"""The model card (the run directory's README.md), rendered from the run's own files, and paths made portable.

The card is written at the end of training and again after `llmtune eval`, from manifest.json,
recipe.yaml and adapter_config.json, so it always shows what the folder holds. Paths in it (and in
the recipe.yaml and manifest.json that `push` uploads) are relative to the recipe's git repository
(its folder when it has none); a path outside that is shown as `.../NAME`.
"""

from __future__ import annotations

import json
import re
import subprocess
from functools import lru_cache
from pathlib import Path

import yaml

from ..files import is_repo_id
from ..verbs import METHODS
from . import metrics as judged

# An absolute POSIX path, not part of a URL, a metric name (rewards/accuracies) or a fraction.
_ABSOLUTE = re.compile(r"(?<![\w.~:/-])/[^\s\"'`<>|,;:()\[\]{}]+")
# Trainer settings worth reading on a card, when the method's config has them.
SETTINGS = ("learning_rate", "lr_scheduler_type", "warmup_steps", "warmup_ratio", "num_train_epochs", "max_steps",
            "per_device_train_batch_size", "gradient_accumulation_steps", "max_length", "packing", "beta",
            "loss_type", "num_generations", "max_completion_length", "gradient_checkpointing", "seed")


def settings(args) -> dict:
    """The trainer settings that matter, as the trainer really used them (the recipe's, TRL's and llmtune's
    defaults), with the effective batch; recorded in manifest.json's `settings`."""
    out = {}
    for name in SETTINGS:
        value = getattr(args, name, None)
        if value is not None:
            out[name] = getattr(value, "value", value)  # enums (the scheduler) as their names
    out["processes"] = args.world_size
    out["effective_batch"] = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    return out


@lru_cache(maxsize=None)
def anchor(recipe: str) -> Path:
    """The folder paths are written relative to: the recipe's git repository, else the recipe's folder."""
    folder = Path(recipe).resolve().parent
    try:
        top = subprocess.run(["git", "-C", str(folder), "rev-parse", "--show-toplevel"], capture_output=True,
                             text=True, timeout=5)
        if top.returncode == 0 and top.stdout.strip():
            return Path(top.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return folder


def portable(text: str, base: Path) -> str:
    """`text` with every absolute path made relative to `base`, or, outside it, cut to `.../NAME`."""
    def relative(match: re.Match) -> str:
        path = Path(match.group(0))
        try:
            return path.relative_to(base).as_posix() or "."
        except ValueError:
            return f".../{path.name}"

    return _ABSOLUTE.sub(relative, text)


def portable_file(run_dir: Path, name: str) -> bytes:
    """A run file's bytes as `push` uploads them (recipe.yaml, manifest.json, eval results), paths made portable."""
    text = (run_dir / name).read_text(encoding="utf-8")
    recipe = _read_json(run_dir / "manifest.json").get("recipe")
    return (portable(text, anchor(recipe)) if recipe else text).encode("utf-8")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _hub_id(name: str) -> bool:
    """A Hub model or dataset id, which the card's metadata may name (not a local folder, not builtin:tiny)."""
    return is_repo_id(name) and not Path(name).exists()


def _table(head: tuple, rows: list) -> str:
    lines = [f"| {' | '.join(head)} |", f"|{'---|' * len(head)}"]
    return "\n".join(lines + [f"| {' | '.join(map(str, row))} |" for row in rows])


PEFT_NAMES = {"LORA": "LoRA", "ADALORA": "AdaLoRA", "PREFIX_TUNING": "prefix tuning", "PROMPT_TUNING": "prompt tuning",
              "P_TUNING": "P-tuning"}


def _adapter(peft: dict) -> str:
    """The adapter line: its type and the settings it was saved with (rank, alpha, targets)."""
    if not peft:
        return "none (full fine-tune)"
    kind = str(peft.get("peft_type", "adapter"))
    parts = ["DoRA" if peft.get("use_dora") else PEFT_NAMES.get(kind, kind)]
    if peft.get("use_rslora"):
        parts.append("rsLoRA scaling")
    for key, shown in (("r", "r"), ("lora_alpha", "alpha")):
        if peft.get(key) is not None:
            parts.append(f"{shown} {peft[key]}")
    targets = peft.get("target_modules")
    if targets:
        # PEFT saves the modules it matched, layer by layer: their names are what a reader wants.
        names = sorted({t.rsplit(".", 1)[-1] for t in targets}) if isinstance(targets, list) else [str(targets)]
        parts.append("targets " + " ".join(names))
    return ", ".join(parts)


def _quantization(config: dict) -> str:
    quant = config.get("quantization")
    if not quant:
        return "none"
    parts = [f"{quant.get('bits')}-bit"]
    if quant.get("bits") == 4:
        parts += [str(quant.get("quant_type", "")), "double quant" if quant.get("double_quant") else "",
                  f"compute {quant.get('compute_dtype')}" if quant.get("compute_dtype") else ""]
    return " ".join(p for p in parts if p) + " (bitsandbytes)"


def _settings_rows(manifest: dict, config: dict, peft: dict, steps: int | None) -> list:
    s = manifest.get("settings") or {}
    rows = [("method", f"`{manifest.get('method')}`"), ("adapter", _adapter(peft)),
            ("quantization", _quantization(config))]
    if "learning_rate" in s:
        warmup = s.get("warmup_ratio") or s.get("warmup_steps")
        rows.append(("learning rate", f"{s['learning_rate']:g}, {s.get('lr_scheduler_type')} schedule"
                     + (f", warmup {warmup:g}" if warmup else "")))
    if "effective_batch" in s:
        rows.append(("effective batch", f"{s['effective_batch']} = {s['per_device_train_batch_size']} per device x "
                     f"{s['gradient_accumulation_steps']} accumulated x {s['processes']} "
                     f"process{'es' if s['processes'] > 1 else ''}"))
    if "max_steps" in s:
        length = f"{s['max_steps']} steps" if s["max_steps"] > 0 else f"{s.get('num_train_epochs'):g} epochs"
        rows.append(("length", length + (f" ({steps} trained)" if steps is not None else "")))
    for key in ("max_length", "packing", "beta", "loss_type", "num_generations", "max_completion_length", "seed"):
        if key in s:
            rows.append((key.replace("_", " "), f"`{s[key]}`"))
    return rows


def _evals(manifest: dict) -> list:
    """`llmtune eval` scores, newest per task and metric."""
    rows = {}
    for entry in manifest.get("evals") or []:
        for task, values in (entry.get("metrics") or {}).items():
            for metric, value in values.items():
                rows[(task, metric)] = (task, metric, judged.fmt(value), entry.get("limit") or "all")
    return list(rows.values())


def _gate(manifest: dict) -> str:
    """The recipe's `eval:` scores before and after training, and the verdict."""
    gate = manifest.get("eval_gate")
    if not gate or "verdict" not in gate:
        return ""
    rows = [(task, r["metric"], judged.fmt(r["before"]), judged.fmt(r["after"]), f"{r['change']:+.4g}")
            for task, r in gate["change"].items()]
    limits = [f"tolerance {gate['tolerance']:g}" if gate.get("tolerance") is not None else "",
              ", ".join(f"target {t} {v:g}" for t, v in gate["targets"].items())]
    why = "".join(f"\n- {reason}" for reason in gate["reasons"])
    return f"""
## Evaluation gate (the recipe's `eval:`)

Verdict: **{gate['verdict']}**{' (' + '; '.join(filter(None, limits)) + ')' if any(limits) else ''}{why}

{_table(('task', 'metric', 'before training', 'after', 'change'), rows)}
"""


def _judgements(manifest: dict) -> str:
    """`llmtune judge` results: a win rate per pairing, a mean score per graded candidate."""
    rows = []
    for entry in manifest.get("judgements") or []:
        for item in entry.get("summary") or []:
            interval = "-".join(judged.fmt(v) for v in item["interval"]) if item.get("interval") else "-"
            if "win_rate" in item:
                result = f"win rate {judged.fmt(item['win_rate'])}" if item["win_rate"] is not None else "-"
                counts = f"{item['wins']} W / {item['ties']} T / {item['losses']} L"
            else:
                result = f"mean {judged.fmt(item['mean'])}/10" if item["mean"] is not None else "-"
                counts = f"{item['scored']} graded"
            rows.append((f"`{entry['judge']['model']}`", item["what"], result, interval,
                         f"{counts}, {item['parse_failures']} parse failures"))
    return f"""
## Judged (`llmtune judge`)

{_table(('judge', 'compared', 'result', '95% interval', 'counts'), rows)}
""" if rows else ""


def render(run_dir: Path) -> str:
    """The card's Markdown, from the files in `run_dir`; paths in it made portable."""
    manifest = _read_json(run_dir / "manifest.json")
    config = yaml.safe_load((run_dir / "recipe.yaml").read_text(encoding="utf-8")) or {}
    peft = _read_json(run_dir / "adapter_config.json")  # also a stacked run's (model.run_adapter)
    method = METHODS[manifest["method"]]
    base = config["model"]["name"]
    adapter, quant = config.get("adapter"), config.get("quantization")
    loader = f"AutoPeftModelFor{method.head}" if peft else f"AutoModelFor{method.head}"
    package = "peft" if peft else "transformers"
    # The base's own config has no one-label head: a reward adapter's score head needs it spelled out.
    extra = ", num_labels=1, pad_token_id=tokenizer.pad_token_id" if peft and method.head != "CausalLM" else ""
    tags = ["llmtune", *(["trl"] if method.config.startswith("trl") else []), method.name,
            *([adapter["type"]] if adapter else []), *(["qlora"] if quant and adapter else [])]
    sources = manifest.get("data") or []
    datasets = [s["path"] for s in sources if s.get("revision") and _hub_id(s["path"])]
    front = {"library_name": package, **({"base_model": base} if _hub_id(base) else {}),
             "pipeline_tag": "text-generation" if method.head == "CausalLM" else "text-classification",
             "tags": f"[{', '.join(tags)}]", **({"datasets": f"[{', '.join(datasets)}]"} if datasets else {})}
    kind = f"{'Q' if quant else ''}{_adapter(peft).split(',')[0]} adapter" if peft else "full fine-tune"
    final = manifest.get("metrics") or {}
    results = judged.headline(method.name, final)
    logged = [json.loads(line) for line in _lines(run_dir / "metrics.jsonl")]
    steps = max((row["step"] for row in logged if "step" in row), default=None)
    data_rows = [(f"`{s['path']}`", s["format"], "streamed" if s.get("rows") is None else
                  f"{s['rows']} rows, {s['used']} used", s.get("sha256") or s.get("revision") or "")
                 for s in sources]
    evals = _evals(manifest)
    card = f"""---
{chr(10).join(f'{k}: {v}' for k, v in front.items())}
---
# {config.get('name', run_dir.name)}

{kind} of `{base}` trained with `llmtune {method.name}` (llmtune {manifest.get('llmtune')}).

## Results

{_table(('metric', 'logged as', 'value', 'what it says'), [(judged.label(k), f'`{k}`', judged.fmt(v),
                                                            judged.about(k)) for k, v in results.items()])
 if results else 'No metrics logged.'}

Every logged step is in `metrics.jsonl`; the curves are in `loss.png`.
""" + (f"""
## Evaluation (`llmtune eval`)

{_table(('task', 'metric', 'value', 'rows'), evals)}
""" if evals else "") + _gate(manifest) + _judgements(manifest) + f"""
## Training settings

{_table(('setting', 'value'), _settings_rows(manifest, config, peft, steps))}

The full resolved recipe is in `recipe.yaml`; package versions and devices in `manifest.json`.

## Data

{_table(('source', 'format', 'rows', 'sha256 / revision'), data_rows)}

## Load it

```python
from {package} import {loader}
from transformers import AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained("{run_dir}")  # carries the chat template used in training
model = {loader}.from_pretrained("{run_dir}"{extra})
```
"""
    return portable(card, anchor(manifest["recipe"])) if manifest.get("recipe") else card


def _lines(path: Path) -> list[str]:
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()] if path.is_file() else []


def write(run_dir: Path, scrub) -> None:
    """(Re)write the card of a training run's folder, through `scrub` (run.scrub: no secret from the environment);
    a folder without one (a merged model) is left alone."""
    if _read_json(run_dir / "manifest.json").get("method") not in METHODS or not (run_dir / "recipe.yaml").is_file():
        return
    (run_dir / "README.md").write_text(scrub(render(Path(run_dir).resolve())), encoding="utf-8")
