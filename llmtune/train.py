"""What every method's run shares: data, tokenizer, model, run directory, train, save.

A method module (llmtune/methods/<name>.py) only turns the recipe into its TRL config
defaults and trainer; everything around that lives here, once.
"""

from __future__ import annotations

import importlib
import logging
import sys
import traceback
from importlib.metadata import version
from pathlib import Path

from .errors import UserError
from .recipe.check import Resolved


class TrainingFailed(Exception):
    """Training raised; the traceback is in the run directory's train.log."""

    def __init__(self, log: Path | None, cause: BaseException, hint: str | None = None):
        self.log = log  # None: train.log could not be written (full disk), so the caller shows the traceback
        self.hint = hint  # what to try, for failures users can fix (disk full, out of memory)
        super().__init__(f"{type(cause).__name__}: {cause}")


def config_class(target: str):
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def training_args(resolved: Resolved, run_dir: Path, defaults: dict, data=None):
    """The method's TRL config: llmtune's defaults, under what the recipe's `train:` says.

    `data` (the prepared data) sizes the tokenizing workers; without it, TRL tokenizes in one process.
    """
    import torch

    from . import fast, stopping
    from .launch.rank import training_args as launched_args

    config = resolved.config
    args = {
        "output_dir": str(run_dir),
        "seed": config["seed"],
        "report_to": "none",  # no telemetry or trackers unless the recipe names one
        "disable_tqdm": False,  # transformers ties the bar to its log level, which quiet() lowers
        # Mixed precision only where the hardware has it; TRL would turn bf16 on regardless.
        "bf16": torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
        **launched_args(),  # a launch on a machine without GPUs: CPU processes over gloo
        **fast.defaults(resolved, data),  # picked for this machine: tokenizing workers, Liger kernels
        **defaults,
        **stopping.settings(config, resolved.method),
        **config["train"],
    }
    try:
        return config_class(resolved.method.config)(**args)
    except (ValueError, TypeError) as err:  # TRL's own cross-field checks
        raise UserError(f"{resolved.locate(('train',))}: {resolved.method.config.split(':')[1]} rejected the "
                        f"`train:` settings: {err}") from None


def require_chat_template(resolved: Resolved, shape: str, tokenizer) -> None:
    if shape.startswith("conversational") and not tokenizer.chat_template:
        raise UserError(f"{resolved.locate(('model', 'name'))}: the data is conversational but the tokenizer of "
                        f"'{resolved.config['model']['name']}' has no chat template; set `model.chat_template:` to "
                        "a named template or a .jinja file")


def run(resolved: Resolved, argv: list[str], output_dir: str | None = None, overwrite: bool = False,
        resume: str | None = None, resume_force: bool = False) -> dict:
    from .data import load_data
    from .faults import divergence_guard, explain
    from .interrupt import Interrupted, Interruption
    from .resume import checkpoint_to_resume, fingerprint, make_resumable, refuse_nothing_left, save_final
    from . import stopping
    from .model import (convert_adapter, load_model, load_tokenizer, loraplus_optimizer, peft_config,
                        save_initial_adapter)
    from .launch.rank import launched, report_callback
    from .run import RunDir, is_main_process, metrics_callback, plot_loss, progress_callback, quiet, read_metrics

    from .recipe import preflight

    config = resolved.config
    run_dir = RunDir(Path(output_dir or config["output_dir"]).expanduser(), resolved, overwrite, resume)
    preflight.model(resolved)  # what `validate` checks of the model, before any weight loads
    data = load_data(config["data"], method=resolved.method.name, seed=config["seed"], locate=resolved.locate,
                     model=config["model"])
    quiet()
    tokenizer = load_tokenizer(config["model"])
    require_chat_template(resolved, data.shape, tokenizer)
    method = importlib.import_module(resolved.method.runner)
    args = training_args(resolved, run_dir.path, method.defaults(config, data), data)
    stamp = fingerprint(resolved, data, args)
    checkpoint = checkpoint_to_resume(run_dir.path, resume, stamp, resume_force)
    refuse_nothing_left(checkpoint, args.max_steps, resume_force)
    if resume and is_main_process():
        print(f"resuming from {checkpoint}" if checkpoint else
              f"--resume {resume}: no complete checkpoint in {run_dir.path} yet; starting a new run", file=sys.stderr)

    run_dir.start(data, argv, checkpoint)
    interruption = Interruption().install()  # SIGINT/SIGTERM: checkpoint at the step's end, exit 130
    handler = run_dir.log_handler()
    logging.getLogger().addHandler(handler)
    for warning in data.warnings:  # few and worth reading: on the terminal and in train.log
        logging.getLogger("llmtune").warning(warning)
        if is_main_process():  # once per launch, not once per rank
            print(f"warning: {warning}", file=sys.stderr)
    if resolved.method.experimental:
        logging.getLogger("llmtune").warning(
            f"`{resolved.method.name}` uses {resolved.method.config.split(':')[0]}, which TRL ships as experimental "
            f"(no stability contract): it may change or go in another TRL release; this run used trl=={version('trl')}")
    try:
        from transformers import set_seed

        set_seed(config["seed"])  # new weights (a LoRA, a reward head) start the same on every run
        model = load_model(config, resolved.method.head)
        extra = {}
        if config.get("ref_model"):  # frozen, so a run adapter in it is merged
            ref = {**config["model"], "name": config["ref_model"], "revision": None, "run_adapter": "merge"}
            extra["ref_model"] = load_model({**config, "model": ref}, resolved.method.head)
        if resolved.method.rewards:  # reward (and value) models load with the recipe's model settings
            extra["recipe"] = config
        trainer = method.build_trainer(
            args=args, model=model, tokenizer=tokenizer, data=data,
            peft_config=peft_config(config.get("adapter"), resolved.method.head, config["model"]),
            callbacks=[metrics_callback(run_dir.path / "metrics.jsonl"), divergence_guard(args),
                       *stopping.callbacks(config), *([report_callback(run_dir, data)] if launched() else [])],
            **extra)
        # What this run really uses: the recipe's settings, or those picked for this machine.
        run_dir.record(speed={"attn_implementation": getattr(model.config, "_attn_implementation", None),
                              "use_liger_kernel": args.use_liger_kernel,
                              "dataset_num_proc": getattr(args, "dataset_num_proc", None)})
        from transformers.trainer_callback import PrinterCallback, ProgressCallback

        trainer.remove_callback(ProgressCallback)
        trainer.remove_callback(PrinterCallback)
        if not args.disable_tqdm:
            trainer.add_callback(progress_callback())
        interruption.attach(trainer)
        make_resumable(trainer, stamp, checkpoint)
        if (config.get("adapter") or {}).get("loraplus_lr_ratio"):
            trainer.optimizer = loraplus_optimizer(trainer, config["adapter"]["loraplus_lr_ratio"])
        initial = save_initial_adapter(trainer.model, run_dir.path) if args.should_save else None  # PiSSA, OLoRA
        result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        if interruption.step is not None:
            plot_loss(read_metrics(run_dir.path / "metrics.jsonl"), run_dir.path / "loss.png")
            raise Interrupted(f"stopped at step {interruption.step}, checkpoint saved in "
                              f"{run_dir.path / f'checkpoint-{interruption.step}'}; continue with the same "
                              "command plus `--resume auto`")
        metrics = dict(result.metrics)
        if data.eval is not None:
            metrics.update(trainer.evaluate())
        logged = [m["loss"] for m in read_metrics(run_dir.path / "metrics.jsonl") if "loss" in m]
        if logged:
            metrics.update(first_loss=logged[0], last_loss=logged[-1])
        save_final(trainer, tokenizer, run_dir.path)
        if initial:
            convert_adapter(trainer.model, run_dir.path, initial)
        plot_loss(read_metrics(run_dir.path / "metrics.jsonl"), run_dir.path / "loss.png")
        run_dir.write_card(metrics, data)
        run_dir.finish("completed", metrics)
    except KeyboardInterrupt:
        run_dir.finish("interrupted", {"step": interruption.step})
        raise
    except Exception as err:
        logging.getLogger("llmtune").error("training failed\n%s", traceback.format_exc())
        unrecorded = run_dir.finish("failed", {})  # a full or read-only disk: said, not raised over `err`
        hint = "\n".join(filter(None, [explain(err, run_dir.path, resolved, args), unrecorded]))
        log = None if getattr(handler, "failed", False) else run_dir.path / "train.log"
        raise TrainingFailed(log, err, hint or None) from err
    finally:
        interruption.uninstall()
        logging.getLogger().removeHandler(handler)
        handler.close()
    if config.get("hub") and is_main_process():  # the run is complete first: a failed upload loses nothing
        from .hub import after_training

        after_training(run_dir.path, config["hub"])
    return metrics
