"""The run directory: resolved recipe, manifest, metrics, loss plot, model card.

Layout (DESIGN.md): the model or adapter and tokenizer, `recipe.yaml`, `manifest.json`,
`README.md`, `metrics.jsonl`, `loss.png`, `checkpoint-N/`, and `train.log` with warnings
and, after a failure, the traceback.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import platform
import subprocess
import sys
import warnings
from importlib import metadata
from pathlib import Path

import yaml

from . import __version__
from .errors import UserError
from .recipe.loader import SECRET_NAME, redact

PACKAGES = ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "bitsandbytes", "deepspeed")
ARTIFACTS = ("adapter_config.json", "config.json", "manifest.json")


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def write_json(path: Path, payload) -> None:
    """Write then rename, so a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def scrub(text: str) -> str:
    """Remove the values of secret-looking environment variables from text."""
    for var, value in os.environ.items():
        if value and len(value) >= 6 and SECRET_NAME.search(var):
            text = text.replace(value, f"${{env:{var}}}")
    return text


def package_versions() -> dict:
    versions = {"llmtune": __version__, "python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def git_state(folder: Path) -> dict | None:
    """Commit of the git repository holding the recipe, and whether it had local changes."""
    try:
        commit = subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=5)
        if commit.returncode:
            return None
        dirty = subprocess.run(["git", "-C", str(folder), "status", "--porcelain"], capture_output=True,
                               text=True, timeout=5)
        return {"commit": commit.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return None


def devices() -> dict:
    import torch

    info = {"cpu_count": os.cpu_count(), "platform": platform.platform()}
    if torch.cuda.is_available():
        info["cuda"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


class RunDir:
    """Everything llmtune writes for one run, in one folder."""

    def __init__(self, path: Path, resolved, overwrite: bool = False):
        self.path = Path(path)
        self.resolved = resolved
        if self.path.exists() and any(self.path.iterdir()) and not overwrite:
            finished = any((self.path / name).exists() for name in ARTIFACTS)
            what = "holds a finished run" if finished else "is not empty"
            raise UserError(f"{self.path}: output directory {what}; pass --output-dir DIR for a new run or "
                            "--overwrite to write into it")
        self.manifest: dict = {}

    def start(self, data, argv: list[str]) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        recipe = redact({**self.resolved.config, "output_dir": str(self.path)}, self.resolved.recipe.secrets)
        text = "# Resolved by llmtune: every default filled in; rerun with `llmtune train recipe.yaml`.\n"
        (self.path / "recipe.yaml").write_text(text + yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
        method = self.resolved.method
        self.manifest = {
            "llmtune": __version__,
            "method": method.name,
            "experimental": method.experimental,
            "recipe": str(self.resolved.recipe.path),
            "recipe_git": git_state(self.resolved.recipe.path.parent),
            "command": scrub(" ".join(argv)),
            "packages": package_versions(),
            "devices": devices(),
            "data": [vars(s) for s in data.sources],
            "started": _now(),
            "status": "running",
        }
        write_json(self.path / "manifest.json", self.manifest)

    def finish(self, status: str, metrics: dict) -> None:
        self.manifest.update(status=status, finished=_now(), metrics=metrics)
        write_json(self.path / "manifest.json", self.manifest)

    def log_handler(self) -> logging.Handler:
        """A file handler for `train.log`; warnings go there, not to the terminal."""
        handler = logging.FileHandler(self.path / "train.log", encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        return handler

    def write_card(self, metrics: dict, data) -> None:
        config = self.resolved.config
        adapter = config.get("adapter")
        quant = config.get("quantization")
        kind = "full fine-tune" if adapter is None else (
            f"{'Q' if quant else ''}{adapter['type'].upper()} adapter (r={adapter.get('r', 'PEFT default')})")
        loader = "AutoModelForCausalLM" if adapter is None else "AutoPeftModelForCausalLM"
        package = "transformers" if adapter is None else "peft"
        rows = "\n".join(f"| `{s.path}` | {s.format} | {s.used} | {s.sha256 or s.revision or ''} |"
                         for s in data.sources)
        shown = "\n".join(f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |"
                          for k, v in metrics.items())
        card = f"""---
library_name: {package}
base_model: {config['model']['name']}
tags: [llmtune, {self.resolved.method.name}]
---
# {config['name']}

{kind} of `{config['model']['name']}` trained with `llmtune {self.resolved.method.name}` (llmtune {__version__}).

## Data

| source | format | rows used | sha256 / revision |
|---|---|---|---|
{rows}

## Final metrics

| metric | value |
|---|---|
{shown}

## Settings

The full resolved recipe is in `recipe.yaml`; package versions and devices in `manifest.json`.

## Load it

```python
from {package} import {loader}
from transformers import AutoTokenizer

model = {loader}.from_pretrained("{self.path}")
tokenizer = AutoTokenizer.from_pretrained("{self.path}")  # carries the chat template used in training
```
"""
        (self.path / "README.md").write_text(scrub(card), encoding="utf-8")


def metrics_callback(path: Path):
    """A TrainerCallback appending every logged step to metrics.jsonl."""
    from transformers import TrainerCallback

    class MetricsWriter(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and logs:
                with path.open("a", encoding="utf-8") as out:
                    out.write(json.dumps({"step": state.global_step, "epoch": state.epoch, **logs}) + "\n")

    return MetricsWriter()


def read_metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def plot_loss(metrics: list[dict], out: Path) -> bool:
    """Training (and eval) loss against step; False when nothing was logged."""
    train = [(m["step"], m["loss"]) for m in metrics if "loss" in m]
    evals = [(m["step"], m["eval_loss"]) for m in metrics if "eval_loss" in m]
    if not train and not evals:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for points, label, style in ((train, "train loss", "-"), (evals, "eval loss", "o--")):
        if points:
            ax.plot(*zip(*points), style, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return True


def quiet() -> None:
    """Keep the terminal to a progress bar and a summary; details go to train.log."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", module=r"(torch|transformers|trl|peft|accelerate|bitsandbytes)(\.|$)")
    logging.captureWarnings(True)
    for name in ("trl", "peft", "accelerate", "bitsandbytes"):
        logging.getLogger(name).setLevel(logging.ERROR)


def progress_callback():
    """Transformers' progress bar, without printing every log dict under it."""
    from transformers.trainer_callback import ProgressCallback

    class Bar(ProgressCallback):
        def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
            pass  # evaluation is short; a second bar would only scroll the first

        def on_log(self, args, state, control, logs=None, **kwargs):
            if self.training_bar is not None and logs and "loss" in logs:
                self.training_bar.set_postfix(loss=f"{logs['loss']:.4f}", refresh=False)

    return Bar


def summarize(run_dir: Path, metrics: dict, stream=sys.stdout) -> None:
    keys = [k for k in ("train_loss", "eval_loss", "train_runtime") if k in metrics]
    shown = ", ".join(f"{k} {metrics[k]:.4g}" for k in keys)
    stream.write(f"\nrun directory: {run_dir}\n{shown}\n")

