"""What every method's run shares: data, tokenizer, model, run directory, train, save.

A method module (llmtune/methods/<name>.py) only turns the recipe into its TRL config
defaults and trainer; everything around that lives here, once.
"""

from __future__ import annotations

import importlib
import logging
import traceback
from pathlib import Path

from .errors import UserError
from .recipe.check import Resolved


class TrainingFailed(Exception):
    """Training raised; the traceback is in the run directory's train.log."""

    def __init__(self, log: Path, cause: BaseException):
        self.log = log
        super().__init__(f"{type(cause).__name__}: {cause}")


def config_class(target: str):
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def training_args(resolved: Resolved, run_dir: Path, defaults: dict):
    """The method's TRL config: llmtune's defaults, under what the recipe's `train:` says."""
    import torch

    config = resolved.config
    args = {
        "output_dir": str(run_dir),
        "seed": config["seed"],
        "report_to": "none",  # no telemetry or trackers unless the recipe names one
        "disable_tqdm": False,  # transformers ties the bar to its log level, which quiet() lowers
        # Mixed precision only where the hardware has it; TRL would turn bf16 on regardless.
        "bf16": torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
        **defaults,
        **config["train"],
    }
    try:
        return config_class(resolved.method.config)(**args)
    except (ValueError, TypeError) as err:  # TRL's own cross-field checks
        raise UserError(f"{resolved.locate(('train',))}: {resolved.method.config.split(':')[1]} rejected the "
                        f"`train:` settings: {err}") from None


def run(resolved: Resolved, argv: list[str], output_dir: str | None = None, overwrite: bool = False) -> dict:
    from .data import load_data
    from .model import load_model, load_tokenizer, peft_config
    from .run import RunDir, metrics_callback, plot_loss, progress_callback, quiet, read_metrics

    config = resolved.config
    run_dir = RunDir(Path(output_dir or config["output_dir"]), resolved, overwrite)
    data = load_data(config["data"], method=resolved.method.name, seed=config["seed"], locate=resolved.locate)
    quiet()
    tokenizer = load_tokenizer(config["model"])
    if data.shape.startswith("conversational") and not tokenizer.chat_template:
        raise UserError(f"{resolved.locate(('model', 'name'))}: the data is conversational but the tokenizer of "
                        f"'{config['model']['name']}' has no chat template; set `model.chat_template:` to a "
                        "named template or a .jinja file")
    method = importlib.import_module(resolved.method.runner)
    args = training_args(resolved, run_dir.path, method.defaults(config, data))

    run_dir.start(data, argv)
    handler = run_dir.log_handler()
    logging.getLogger().addHandler(handler)
    for warning in data.warnings:
        logging.getLogger("llmtune").warning(warning)
    try:
        model = load_model(config)
        trainer = method.build_trainer(
            args=args, model=model, tokenizer=tokenizer, data=data, peft_config=peft_config(config.get("adapter")),
            callbacks=[metrics_callback(run_dir.path / "metrics.jsonl")])
        from transformers.trainer_callback import PrinterCallback, ProgressCallback

        trainer.remove_callback(ProgressCallback)
        trainer.remove_callback(PrinterCallback)
        if not args.disable_tqdm:
            trainer.add_callback(progress_callback())
        result = trainer.train()
        metrics = dict(result.metrics)
        if data.eval is not None:
            metrics.update(trainer.evaluate())
        logged = [m["loss"] for m in read_metrics(run_dir.path / "metrics.jsonl") if "loss" in m]
        if logged:
            metrics.update(first_loss=logged[0], last_loss=logged[-1])
        trainer.save_model(str(run_dir.path))
        # A pickle of the arguments: not loadable without llmtune's exact versions, and recipe.yaml says it all.
        (run_dir.path / "training_args.bin").unlink(missing_ok=True)
        tokenizer.save_pretrained(str(run_dir.path))
        plot_loss(read_metrics(run_dir.path / "metrics.jsonl"), run_dir.path / "loss.png")
        run_dir.write_card(metrics, data)
        run_dir.finish("completed", metrics)
        return metrics
    except Exception as err:
        logging.getLogger("llmtune").error("training failed\n%s", traceback.format_exc())
        run_dir.finish("failed", {})
        raise TrainingFailed(run_dir.path / "train.log", err) from err
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()
