"""The one run path, and what every method's run shares: data, tokenizer, model, run directory, train, save.

`run_recipe`: check and prepare the data once -> launch under accelerate, or stay in this process ->
`train`: create the run directory -> `build_trainer` -> `execute`. A method module
(llmtune/methods/<name>.py) only turns the recipe into its TRL config defaults and trainer;
everything around that lives here, once.
"""

from __future__ import annotations

import importlib
import logging
import shlex
import sys
import traceback
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

from ..builtin import model_path
from ..compat import attn_implementation
from ..data import load_data
from ..errors import UserError
from ..launch.launcher import child_args, gpu_count, launch_command, preflight, settle, spawn, write_config
from ..launch.rank import report_callback
from ..logs import quiet
from ..model import convert_adapter, frozen_config, load_model, loraplus_optimizer, peft_config, save_initial_adapter
from ..ranks import is_main_process, launched
from ..recipe.check import Resolved
from ..tokenizer import load_tokenizer, require_chat_template, stop_at_end_of_turn
from . import stopping, trackers
from .card import settings
from .diagnose import divergence_guard, explain
from .gate import Gate
from .interrupt import Interrupted, Interruption
from .metrics import final
from .preflight import model as check_model
from .resume import checkpoint_to_resume, fingerprint, make_resumable, refuse_nothing_left, save_final
from .rundir import RunDir, close_progress, metrics_callback, progress_callback, read_metrics
from .trainer_args import training_args


class TrainingFailed(Exception):
    """Training raised; the traceback is in the run directory's train.log."""

    def __init__(self, log: Path | None, cause: BaseException, hint: str | None = None):
        self.log = log  # None: train.log could not be written (full disk), so the caller shows the traceback
        self.hint = hint  # what to try, for failures users can fix (disk full, out of memory)
        # A UserError (a bad row reached while streaming) is the user's to fix: its message, not a class name.
        super().__init__(str(cause) if isinstance(cause, UserError) else f"{type(cause).__name__}: {cause}")


@dataclass(frozen=True)
class RunOptions:
    """What the command line adds to the recipe."""

    recipe: str = ""  # as given (a path or a shipped name): launched processes run it again
    sets: tuple = ()
    verb: str = "train"
    argv: tuple = ()  # recorded in the manifest
    output_dir: str | None = None
    overwrite: bool = False
    resume: str | None = None
    resume_force: bool = False
    node_rank: int = 0
    extra_args: tuple = ()  # passed on to `accelerate launch`
    print_command: bool = False  # print the launch command and write its config instead of running it
    force_launch: bool = False  # launch under accelerate even a single process

    def run_dir(self, resolved: Resolved) -> Path:
        return Path(self.output_dir or resolved.config["output_dir"])


@dataclass(frozen=True)
class Outcome:
    code: int  # the exit code
    run_dir: Path
    metrics: dict | None  # None when launched processes trained (the run's manifest has their metrics)


def run_recipe(resolved: Resolved, options: RunOptions) -> Outcome:
    """The one run path: check and prepare the data once, launch or stay in this process, then train."""
    data = None
    if not options.print_command:
        # Data problems first, before torch is imported to count GPUs, and once, not by every process; the
        # prepared data is cached, so launched processes load it instead of reading the sources again.
        check_model(resolved)  # what the run would refuse once the model loaded, refused before
        data = prepare_data(resolved)
    if not launched():  # many processes: run this command again in each, under accelerate
        code = _launch(resolved, options)
        if code is not None:
            return Outcome(code, options.run_dir(resolved), None)
    metrics = train(resolved, list(options.argv), options.output_dir, options.overwrite, options.resume,
                    options.resume_force, data=data)
    return Outcome(0, options.run_dir(resolved), metrics)


def prepare_data(resolved: Resolved):
    config = resolved.config
    return load_data(config["data"], method=resolved.method.name, seed=config["seed"], locate=resolved.locate,
                     model=config["model"])


def _launch(resolved: Resolved, options: RunOptions) -> int | None:
    """Check the launch, print its notes, and run it; None when the recipe is one plain process (trained in
    this process), else the launch's exit code."""
    gpus = gpu_count()
    launch = settle(resolved.config, options.node_rank, gpus)
    for line in preflight(resolved, launch, gpus, options.extra_args):
        sys.stderr.write(line + "\n")
    if not (launch.needed or options.force_launch or options.print_command):
        return None
    passthrough = [*(["--output-dir", options.output_dir] if options.output_dir else []),
                   *(["--overwrite"] if options.overwrite else []),
                   *(["--resume", options.resume] if options.resume else []),
                   *(["--resume-force"] if options.resume_force else [])]
    args = child_args(options.verb, options.recipe, options.sets, launch, passthrough)
    if options.print_command:
        write_config(resolved, launch)
        print(shlex.join(launch_command(resolved, launch, args, options.extra_args)))
        return 0
    if options.node_rank == 0:  # the machine whose rank 0 writes the run directory: refuse a used one now
        RunDir(options.run_dir(resolved), resolved, options.overwrite, options.resume)
    return spawn(resolved, launch, args, options.extra_args)


def train(resolved: Resolved, argv: list[str], output_dir: str | None = None, overwrite: bool = False,
          resume: str | None = None, resume_force: bool = False, data=None) -> dict:
    """Train in this process (one of a launch's, or the only one) and write the run directory; `data` is the
    prepared data (prepared here when not given). Returns the final metrics."""
    config = resolved.config
    run_dir = RunDir(Path(output_dir or config["output_dir"]).expanduser(), resolved, overwrite, resume)
    if data is None:
        data = prepare_data(resolved)
    quiet()
    model_path(config["model"])  # build a builtin now: its tokenizer read back hashes as later runs' (datasets' cache)
    tokenizer = load_tokenizer(config["model"])
    require_chat_template(resolved, data.shape, tokenizer)
    gate = Gate(config, tokenizer, data.shape) if (config.get("eval") or {}).get("tasks") else None  # its tasks, loaded now
    method = importlib.import_module(resolved.method.runner)
    args = training_args(resolved, run_dir.path, method.defaults(config, data), data)
    stamp = fingerprint(resolved, data, args)
    checkpoint = checkpoint_to_resume(run_dir.path, resume, stamp, resume_force)
    refuse_nothing_left(checkpoint, args.max_steps, resume_force)
    if resume and is_main_process():
        print(f"resuming from {checkpoint}" if checkpoint else
              f"--resume {resume}: no complete checkpoint in {run_dir.path} yet; starting a new run", file=sys.stderr)

    run_dir.start(data, argv, checkpoint)
    tracked = trackers.point(args.report_to, run_dir.path)  # read as the trainer is built and as it starts
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
    trainer = None
    try:
        trainer = build_trainer(resolved, method, args, tokenizer, data, run_dir)
        if gate:
            trainer.add_callback(gate.callback(run_dir, interruption))
        interruption.attach(trainer)
        make_resumable(trainer, stamp, checkpoint)
        metrics = execute(trainer, tokenizer, data, run_dir, checkpoint, interruption)
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
        close_progress(trainer)
        trackers.unpoint(tracked)
        interruption.uninstall()
        logging.getLogger().removeHandler(handler)
        handler.close()
    return metrics


def build_trainer(resolved: Resolved, method, args, tokenizer, data, run_dir: RunDir):
    """The models the recipe names, and the method's trainer over them with llmtune's callbacks."""
    from transformers import set_seed
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    config = resolved.config
    set_seed(config["seed"])  # new weights (a LoRA, a reward head) start the same on every run
    model = load_model(config, resolved.method.head)
    if resolved.method.head == "CausalLM":  # the saved model stops where its chat template ends a turn
        stop_at_end_of_turn(model, tokenizer)
    extra = {}
    for key in ("ref_model", "teacher_model"):  # frozen, so a run adapter in one is merged
        if config.get(key):
            extra[key] = load_model(frozen_config(config, key), resolved.method.head)
    if resolved.method.rewards:  # reward (and value) models load with the recipe's model settings
        extra["recipe"] = config
    trainer = method.build_trainer(
        args=args, model=model, tokenizer=tokenizer, data=data,
        peft_config=peft_config(config.get("adapter"), resolved.method.head, config["model"]),
        callbacks=[metrics_callback(run_dir.path / "metrics.jsonl"), divergence_guard(args),
                   *stopping.callbacks(config), *([report_callback(run_dir, data)] if launched() else [])],
        **extra)
    # What this run really uses: the recipe's settings, or those picked for this machine.
    run_dir.record(speed={"attn_implementation": attn_implementation(model.config),
                          "use_liger_kernel": args.use_liger_kernel,
                          "dataset_num_proc": getattr(args, "dataset_num_proc", None)},
                  settings=settings(args))
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    if not args.disable_tqdm:
        trainer.add_callback(progress_callback(resolved.method.name))
    if (config.get("adapter") or {}).get("loraplus_lr_ratio"):
        trainer.optimizer = loraplus_optimizer(trainer, config["adapter"]["loraplus_lr_ratio"])
    return trainer


def execute(trainer, tokenizer, data, run_dir: RunDir, checkpoint: Path | None, interruption) -> dict:
    """Train, evaluate, save the model and write the run's record; the final metrics."""
    args = trainer.args
    method = run_dir.resolved.method.name
    initial = save_initial_adapter(trainer.model, run_dir.path) if args.should_save else None  # PiSSA, OLoRA
    result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    if interruption.step is not None:
        run_dir.plot(method, read_metrics(run_dir.path / "metrics.jsonl"))
        raise Interrupted(f"stopped at step {interruption.step}, checkpoint saved in "
                          f"{run_dir.path / f'checkpoint-{interruption.step}'}; continue with the same "
                          "command plus `--resume auto`")
    metrics = dict(result.metrics)
    if data.eval is not None:
        metrics.update(trainer.evaluate())
    rows = read_metrics(run_dir.path / "metrics.jsonl")
    logged = [m["loss"] for m in rows if "loss" in m]
    if logged:
        metrics.update(first_loss=logged[0], last_loss=logged[-1])
    metrics.update(final(method, rows, metrics))
    if args.load_best_model_at_end and trainer.state.best_global_step:  # transformers loaded that checkpoint
        run_dir.record(best_checkpoint={"step": trainer.state.best_global_step,
                                        "metric": args.metric_for_best_model, "value": trainer.state.best_metric})
    save_final(trainer, tokenizer, run_dir.path)
    if initial:
        convert_adapter(trainer.model, run_dir.path, initial)
    run_dir.plot(method, rows)
    run_dir.finish("completed", metrics)
    return metrics
