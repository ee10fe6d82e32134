"""The `llmtune` command: one thin function per verb; heavy imports happen inside verbs."""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import List, Optional

import typer

from .errors import UserError
from .verbs import METHODS

app = typer.Typer(
    help="Fine-tune language models from YAML recipes (TRL, PEFT, bitsandbytes, accelerate).",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]})
recipes_app = typer.Typer(help="Shipped recipes: list, show, copy.", no_args_is_help=True)
app.add_typer(recipes_app, name="recipes")
data_app = typer.Typer(help="Look at training data the way the trainer will see it.", no_args_is_help=True)
app.add_typer(data_app, name="data")

def _version(value: bool) -> None:
    if value:
        from . import __version__

        typer.echo(f"llmtune {__version__}")
        raise typer.Exit()


@app.callback()
def _options(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                          help="Print llmtune's version and exit.")):
    pass  # the app's options; its help is the Typer app's


SET_HELP = "Override a recipe key, e.g. --set train.learning_rate=1e-4 (repeatable; values are YAML)."
# Launch options, shared by the training verbs and `launch`; each but --node-rank sets a `launch:` key.
NUM_PROCESSES = typer.Option(None, "--num-processes", "--gpus", metavar="N|auto",
                             help="Processes per machine (sets launch.num_processes); more than one re-runs under "
                             "`accelerate launch`. Without GPUs, N CPU processes.")
BACKEND = typer.Option(None, "--backend", metavar="ddp|fsdp|zero1|zero2|zero3|zero3-offload",
                       help="How processes share the model (sets launch.backend); configs in recipes/launch/.")
NODES = typer.Option(None, "--nodes", help="Machines taking part (sets launch.nodes); run llmtune on each.")
NODE_RANK = typer.Option(0, "--node-rank", help="This machine's rank among --nodes (0 = the main one).")
MAIN_ADDR = typer.Option(None, "--main-addr", help="Address of the node-rank-0 machine (sets launch.main_addr).")
MAIN_PORT = typer.Option(None, "--main-port", help="Its rendezvous port (sets launch.main_port).")


RESUME = typer.Option(None, "--resume", metavar="auto|PATH",
                      help="Continue from the newest complete checkpoint in the output directory (`auto`; a new run "
                      "when there is none) or from checkpoint folder PATH. The recipe and data must match the "
                      "checkpoint's.")
RESUME_FORCE = typer.Option(False, "--resume-force",
                            help="Resume even though the recipe or data changed since the checkpoint.")


def _launch_sets(num_processes, backend, nodes, main_addr, main_port) -> list[str]:
    given = {"num_processes": num_processes, "backend": backend, "nodes": nodes, "main_addr": main_addr,
             "main_port": main_port}
    return [f"launch.{key}={value}" for key, value in given.items() if value is not None]


def _fail(problems: list[str], code: int = 2, details: str = ""):
    from .launch.rank import record_failure

    if not record_failure(problems, code, details):  # a launched process hands its error to the launcher
        for problem in problems:
            typer.echo(f"error: {problem}", err=True)
        if details:
            typer.echo(details, err=True)
    raise typer.Exit(code)


def _train(recipe: Path, sets: list[str], verb: Optional[str], output_dir: Optional[str], overwrite: bool,
           dry_run: bool, resume: Optional[str] = None, resume_force: bool = False, node_rank: int = 0,
           extra_args=(), print_command: bool = False, force_launch: bool = False) -> None:
    from . import ranks
    from .recipe.check import resolve
    from .runner.session import RunOptions, run_recipe

    if resume_force and resume is None:
        _fail(["--resume-force goes with --resume auto|PATH"])
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        # SIGTERM (a scheduler's pre-emption) ends the command like Ctrl-C, with 130, from its first moment;
        # once training runs, runner/interrupt.py turns both into a checkpoint first.
        signal.signal(signal.SIGTERM, signal.default_int_handler)
    options = RunOptions(str(recipe), tuple(sets or ()), verb or "train", tuple(sys.argv), output_dir, overwrite,
                         resume, resume_force, node_rank, tuple(extra_args), print_command, force_launch)
    with _exit_codes():
        resolved = resolve(recipe, sets or [], verb=verb)
        if dry_run:
            return _dry_run(resolved)
        outcome = run_recipe(resolved, options)
        finished = outcome.metrics is not None and ranks.is_main_process()
        if finished and (resolved.config.get("eval") or {}).get("judge"):  # before the upload, which takes it along
            from .tools.judge import judge_finished

            typer.echo("\n".join(judge_finished(outcome.run_dir, resolved.config["eval"]["judge"])))
        if finished and resolved.config.get("hub"):
            _upload(outcome.run_dir, resolved.config["hub"])  # after the run: a failed upload loses nothing
    _summary(outcome, options)


@contextmanager
def _exit_codes():
    """What a run raises, as the message and exit code the user gets: 2 bad input, 1 failed, 130 interrupted."""
    from . import ranks
    from .runner.session import TrainingFailed

    try:
        yield
    except UserError as err:
        _fail(err.problems)
    except TrainingFailed as err:
        if ranks.is_main_process() and err.log is not None:
            _fail([f"training failed: {err}", *([err.hint] if err.hint else []), f"full traceback: {err.log}"],
                  code=1)
        import traceback  # only rank 0 writes train.log: another rank's traceback goes with its error

        _fail([f"training failed: {err}", *([err.hint] if err.hint else [])], code=1,
              details="".join(traceback.format_exception(err.__cause__)))
    except KeyboardInterrupt as err:
        if ranks.is_main_process():
            typer.echo(f"interrupted{': ' if str(err) else ''}{err}", err=True)
        global _interrupted
        _interrupted = True
        raise typer.Exit(130)


_interrupted = False


def _exit_130_if_interrupted() -> None:
    """Registered first, so it runs after every other exit handler. A KeyboardInterrupt raised inside code that an
    extension ran through `PyRun_String` (some imports do) makes `python -m` kill itself with SIGINT at exit,
    status -2 instead of 130, even once llmtune caught it: an interrupted command ends here, with 130."""
    if _interrupted:
        import logging

        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        os._exit(130)


def _dry_run(resolved) -> None:
    import yaml

    from .runner import preflight
    from .runner.session import prepare_data
    from .secret import redact

    preflight.model(resolved)
    data = prepare_data(resolved)
    typer.echo(yaml.safe_dump(redact(resolved.config, resolved.recipe.secrets), sort_keys=False))
    for s in data.sources:
        typer.echo(f"data: {s.path}: {s.format} ({s.reason}), {s.counted}")
    for warning in data.warnings:
        typer.echo(f"warning: {warning}", err=True)


def _upload(run_dir: Path, settings: dict) -> None:
    from .tools.push import PushFailed, after_training

    try:
        after_training(run_dir, settings)
    except PushFailed as err:  # training finished; only the upload did not
        _fail([f"upload to the Hub failed: {err}", f"the run is complete and intact in {run_dir}; retry the upload "
               f"with `llmtune push {run_dir}`"], code=1)


def _summary(outcome, options) -> None:
    """The run directory and final metrics, printed once (by rank 0, or by the launcher that started the launch)."""
    from .files import read_manifest
    from .launch import rank
    from .runner.rundir import summarize

    if outcome.metrics is None:  # launched processes trained; their metrics are in the run's manifest
        if outcome.code == 0 and not options.print_command and options.node_rank == 0:
            summarize(outcome.run_dir, read_manifest(outcome.run_dir).get("metrics") or {})
        raise typer.Exit(outcome.code)
    if rank.prints_summary():
        summarize(outcome.run_dir, outcome.metrics)


def _method_verb(name: Optional[str], doc: str):
    """A training verb; `name` None means the recipe's own `method:` decides."""

    def verb(
        recipe: Path = typer.Argument(..., help="Recipe YAML file (or a shipped recipe name)."),
        set_: List[str] = typer.Option([], "--set", help=SET_HELP),
        output_dir: Optional[str] = typer.Option(None, "--output-dir", help="Run directory (overrides output_dir)."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Write into an output directory that is not empty."),
        dry_run: bool = typer.Option(False, "--dry-run", help="Check recipe and data, print the resolved recipe."),
        resume: Optional[str] = RESUME, resume_force: bool = RESUME_FORCE,
        num_processes: Optional[str] = NUM_PROCESSES, backend: Optional[str] = BACKEND,
        nodes: Optional[int] = NODES, node_rank: int = NODE_RANK, main_addr: Optional[str] = MAIN_ADDR,
        main_port: Optional[int] = MAIN_PORT,
    ):
        sets = [*set_, *_launch_sets(num_processes, backend, nodes, main_addr, main_port)]
        _train(recipe, sets, name, output_dir, overwrite, dry_run, resume=resume, resume_force=resume_force,
               node_rank=node_rank)

    verb.__doc__ = doc
    return verb


for _name, _method in METHODS.items():
    # The marker leads, so the one-line command list (which cuts summaries short) still shows it.
    app.command(_name)(_method_verb(_name, ("(experimental in TRL) " if _method.experimental else "")
                                    + _method.summary))
app.command("train")(_method_verb(None, "Train with the method named by the recipe's `method:`."))


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def launch(
    ctx: typer.Context,
    recipe: Path = typer.Argument(..., help="Recipe YAML file (or a shipped recipe name)."),
    set_: List[str] = typer.Option([], "--set", help=SET_HELP),
    output_dir: Optional[str] = typer.Option(None, "--output-dir", help="Run directory (overrides output_dir)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Write into an output directory that is not empty."),
    resume: Optional[str] = RESUME, resume_force: bool = RESUME_FORCE,
    num_processes: Optional[str] = NUM_PROCESSES, backend: Optional[str] = BACKEND,
    nodes: Optional[int] = NODES, node_rank: int = NODE_RANK, main_addr: Optional[str] = MAIN_ADDR,
    main_port: Optional[int] = MAIN_PORT,
    print_command: bool = typer.Option(False, "--print", help="Print the accelerate command and write the config it "
                                       "uses; run nothing."),
):
    """Run the recipe's method under `accelerate launch` (even as one process); options after `--` go to accelerate."""
    sets = [*set_, *_launch_sets(num_processes, backend, nodes, main_addr, main_port)]
    _train(recipe, sets, None, output_dir, overwrite, False, resume=resume, resume_force=resume_force,
           node_rank=node_rank, extra_args=ctx.args, print_command=print_command, force_launch=True)


@app.command()
def validate(
    recipes: List[Path] = typer.Argument(..., help="Recipe files to check."),
    set_: List[str] = typer.Option([], "--set", help=SET_HELP),
    no_data: bool = typer.Option(False, "--no-data", help="Check the recipe only, not its data files and model."),
):
    """Check recipes (and their data) without loading a model; every problem at once. Exit 0 or 2. Judge recipes
    (`llmtune judge`) are checked too."""
    from .data import check_data
    from .recipe.check import resolve
    from .recipe.judge import is_judge_recipe, resolve_judge
    from .tools import merging

    problems = []
    for recipe in recipes:
        try:
            if is_judge_recipe(recipe):  # `llmtune judge`'s: prompts, candidates and answers files checked
                resolve_judge(recipe, set_)
            elif merging.is_merge_recipe(recipe):
                merging.resolve(recipe, set_)  # its runs are checked (their configs only) with or without --no-data
            else:
                resolved = resolve(recipe, set_)
                if not no_data:
                    from .runner import preflight

                    preflight.check(resolved)  # the model (its config only) and the launch rules for this machine
                    for warning in check_data(resolved.config["data"], method=resolved.method.name,
                                              seed=resolved.config["seed"], locate=resolved.locate,
                                              model=resolved.config["model"]):
                        typer.echo(f"warning: {warning}", err=True)  # as the run prints it
        except UserError as err:
            problems.extend(err.problems)
        else:
            typer.echo(f"ok: {recipe}")
    if problems:
        _fail(problems)


@app.command()
def schema():
    """Print the recipe's JSON Schema (llmtune's sections, each method's TRL config fields, each adapter type's PEFT
    fields, with their help text) for YAML editors: `llmtune schema > recipe.schema.json`."""
    from .recipe.jsonschema import render

    typer.echo(render(), nl=False)


@app.command()
def env():
    """Versions of llmtune and its libraries, and the devices torch sees."""
    import json

    from .runner.rundir import devices, package_versions

    typer.echo(json.dumps({"packages": package_versions(), "devices": devices()}, indent=2))


@data_app.command("inspect")
def data_inspect(
    recipe: Path = typer.Argument(..., help="Recipe YAML file (or a shipped recipe name)."),
    set_: List[str] = typer.Option([], "--set", help=SET_HELP),
    rows: int = typer.Option(1, "--rows", "-n", help="Sample rows to render per source."),
    color: Optional[bool] = typer.Option(None, "--color/--no-color",
                                         help="Colour the trained tokens (default: when writing to a terminal; "
                                         "otherwise they are shown in [[ ]])."),
):
    """Per source: format and why, token lengths, sample rows through the real chat template with the trained
    tokens marked, the stop token; warnings about templates, masks and truncation. Exit 0, or 2 on bad data."""
    from .recipe.check import resolve
    from .tools.inspect import inspect

    try:
        color = sys.stdout.isatty() if color is None else color
        lines, warnings = inspect(resolve(recipe, set_), rows, color)
    except UserError as err:
        _fail(err.problems)
    typer.echo("\n".join(lines), color=color)
    for warning in warnings:
        typer.echo(f"warning: {warning}", err=True)


@data_app.command("formats")
def data_formats():
    """Each data format llmtune reads: the columns that identify it, an example row, what the example becomes (TRL's
    dataset kind) and the methods that train on it. `format: auto` picks the first whose columns a source has."""
    from .data.formats import format_table

    typer.echo("\n".join(format_table(METHODS)))


@app.command()
def templates():
    """The chat templates `model.chat_template:` takes by name (those TRL ships), and how each one's assistant turns
    are found for assistant-only loss: by TRL, by llmtune, or not at all (and why)."""
    from .data.templates import named_templates

    table = named_templates()
    width = max(len(name) for name, _ in table)
    typer.echo("\n".join(f"{name:<{width}}  {how}" for name, how in table))


@app.command()
def plan(
    recipe: Path = typer.Argument(..., help="Recipe YAML file (or a shipped recipe name)."),
    set_: List[str] = typer.Option([], "--set", help=SET_HELP),
    gpu_memory: Optional[str] = typer.Option(None, "--gpu-memory", help="Memory of one GPU, e.g. 24GiB: says whether "
                                             "the run fits and what to change if not."),
    num_processes: Optional[str] = NUM_PROCESSES, backend: Optional[str] = BACKEND, nodes: Optional[int] = NODES,
    show_recipe: bool = typer.Option(False, "--recipe", help="Also print the fully resolved recipe (every default "
                                     "filled in, paths absolute), as the run directory's recipe.yaml will hold it."),
):
    """What a run will cost, without loading any weights: first the findings (what trains, steps, memory per GPU and
    whether it fits, warnings), then the data summary, parameter counts, speed picks, batch, the memory estimate
    term by term and the launch command."""
    from .recipe.check import resolve
    from .tools.plan import plan as make_plan

    sets = [*set_, *_launch_sets(num_processes, backend, nodes, None, None)]
    try:
        lines = make_plan(resolve(recipe, sets), recipe, sets, gpu_memory, show_recipe)
    except UserError as err:
        _fail(err.problems)
    typer.echo("\n".join(lines))


class MergeDtype(str, Enum):
    bfloat16 = "bfloat16"
    float16 = "float16"
    float32 = "float32"


@app.command()
def merge(
    run_dir: Path = typer.Argument(..., metavar="RUN_DIR|RECIPE", help="Run directory holding an adapter, or a "
                                   "merge recipe (`method: merge`) listing runs to merge."),
    out: Optional[Path] = typer.Option(None, "--out", help="Where to write the merged model "
                                       "[default: RUN_DIR/merged; a recipe's `output_dir`]."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty output directory."),
    set_: List[str] = typer.Option([], "--set", help=SET_HELP + " Merge recipes only."),
    dtype: Optional[MergeDtype] = typer.Option(None, "--dtype", help="Save the weights in this dtype [default: the "
                                               "dtype the run loaded the model in, `model.dtype`]."),
):
    """Fold a LoRA/DoRA adapter into its base and save the full model with the run's tokenizer and chat template
    (a 4-bit/8-bit base is dequantized first: the weights the adapter was trained against). Given a merge recipe,
    merge several runs instead (linear, task_arithmetic, ties, dare_linear, dare_ties) into a new run directory."""
    from .tools import merging
    from .tools.export import merge as merge_run

    try:
        if merging.is_merge_recipe(run_dir):
            if dtype:
                raise UserError("--dtype goes with a run directory; a merge recipe keeps the runs' dtype")
            written, notes = merging.merge(merging.resolve(run_dir, set_), out, overwrite)
        elif set_:
            raise UserError("--set goes with a merge recipe, not a run directory")
        else:
            written, notes = merge_run(run_dir, out, overwrite, dtype and dtype.value)
    except UserError as err:
        _fail(err.problems)
    for note in notes:
        typer.echo(note)
    typer.echo(f"wrote {written}")


@app.command()
def export(
    run_dir: Path = typer.Argument(..., help="Run directory (an adapter is merged first) or a merged model folder."),
    format_: str = typer.Option("gguf", "--format", help="Output format; `gguf` (llama.cpp, Ollama)."),
    quant: str = typer.Option("f16", "--quant", help="Tensor type: f32, f16, bf16, q8_0, q5_1, q5_0, q4_1, q4_0."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output file [default: RUN_DIR/NAME-QUANT.gguf]."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output file."),
    ollama: bool = typer.Option(True, "--ollama/--no-ollama", help="Also write NAME-QUANT.Modelfile for `ollama "
                                "create`: the GGUF, the run's chat template as TEMPLATE, its stop tokens."),
):
    """Write the trained model as one GGUF file with its tokenizer and chat template (Llama, Mistral, Qwen2/2.5,
    Qwen3, Gemma 2, Gemma 3 text, Phi-3 architectures), and an Ollama Modelfile beside it."""
    from .tools.export import export_gguf

    if format_ != "gguf":
        _fail([f"--format {format_}: the only export format is `gguf`"])
    try:
        written, notes, warnings = export_gguf(run_dir, out, quant, overwrite, ollama)
    except ImportError as err:
        _fail([f"GGUF export needs the `gguf` package: pip install 'llmtune-recipes[export]' ({err})"])
    except UserError as err:
        _fail(err.problems)
    for note in notes:
        typer.echo(note)
    for warning in warnings:
        typer.echo(f"warning: {warning}", err=True)
    typer.echo(f"wrote {written}")


@app.command()
def push(
    run_dir: Path = typer.Argument(..., help="A finished run directory."),
    repo_id: Optional[str] = typer.Option(None, "--repo-id", help="Hub repository `namespace/name` [default: the "
                                          "run's `hub.repo_id`]."),
    private: Optional[bool] = typer.Option(None, "--private/--public", help="Visibility of the repository [default: "
                                           "the run's `hub.private`, else private]."),
    revision: Optional[str] = typer.Option(None, "--revision", help="Branch to push to [default: the run's "
                                           "`hub.revision`, else main]."),
    dry_run: bool = typer.Option(False, "--dry-run", help="List the files that would be uploaded and their sizes; "
                                 "touch no network."),
):
    """Upload a finished run to the Hugging Face Hub: model or adapter, tokenizer, model card, recipe.yaml,
    manifest.json, metrics.jsonl, loss.png, eval results (no checkpoints, no train.log). Token: HF_TOKEN or
    `hf auth login`."""
    from .tools import push as hub

    try:
        settings = hub.target(run_dir, repo_id, private, revision)
        if dry_run:
            typer.echo("\n".join(hub.describe(run_dir, settings)))
            return
        secret = hub.token()
        if secret is None:
            raise UserError(hub.NO_TOKEN)
        entry = hub.push(run_dir, settings, secret)
    except UserError as err:
        _fail(err.problems)
    except hub.PushFailed as err:
        _fail([f"upload to the Hub failed: {err}", f"nothing in {run_dir} changed; run the same command to retry"],
              code=1)
    typer.echo(f"pushed {run_dir} to {entry['url']} (commit {entry['commit'][:12]})")


@app.command("runs")
def runs_(folder: Path = typer.Argument(Path("runs"), help="Folder holding run directories, searched at any depth.")):
    """List the runs under FOLDER, oldest first: status, method, model, data rows used, steps, duration, git commit
    of the recipe, and the metrics its method is judged by."""
    from .tools.runs import list_runs

    try:
        typer.echo("\n".join(list_runs(folder)))
    except UserError as err:
        _fail(err.problems)


@app.command()
def compare(
    run_dirs: List[Path] = typer.Argument(..., metavar="RUN", help="Two or more run directories (RUN_A RUN_B ...)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Where to write the overlay plot (.png, .svg or .pdf) "
                                       "[default: compare-A-vs-B.png beside the first run]."),
):
    """Runs side by side: the keys where their resolved recipes differ, their metrics, and one plot with every
    run's curves overlaid, a panel per metric."""
    from .tools.runs import compare as run_compare

    try:
        lines, _ = run_compare(run_dirs, out)
    except UserError as err:
        _fail(err.problems)
    typer.echo("\n".join(lines))


@app.command("reward-score")
def reward_score(
    run_dir: Path = typer.Argument(..., help="Run directory of `llmtune reward` (or its merged model folder)."),
    prompt: str = typer.Option(..., "--prompt", "-p", help="The user message the responses answer."),
    response: List[str] = typer.Option(..., "--response", "-r", help="A response to score (repeatable: one score "
                                       "each)."),
    system: Optional[str] = typer.Option(None, "--system", help="A system message before the prompt."),
):
    """Score responses to a prompt with a trained reward model, through the run's chat template (as the reward
    trainer scored its rows); prints one score per response, higher = preferred."""
    from .tools.score import reward_scores

    try:
        scores = reward_scores(run_dir, prompt, response, system)
    except UserError as err:
        _fail(err.problems)
    for text, value in zip(response, scores):
        typer.echo(f"{value:.4f}\t{text}")


MAX_NEW_TOKENS = typer.Option(256, "--max-new-tokens", help="Most tokens to generate per answer.")
TEMPERATURE = typer.Option(0.0, "--temperature", "-t", help="0 = greedy (deterministic); higher samples more freely.")
TOP_P = typer.Option(1.0, "--top-p", help="Nucleus sampling: keep the smallest set of tokens with this probability.")
TOP_K = typer.Option(0, "--top-k", help="Sample among the k likeliest tokens (0 = no limit).")
REPETITION_PENALTY = typer.Option(1.0, "--repetition-penalty", help="> 1 discourages repeating tokens.")
SEED = typer.Option(None, "--seed", help="Seed for sampling.")
SYSTEM = typer.Option(None, "--system", help="A system message before the conversation (at the start of the first user turn "
                      "when the chat template has no system role, as in training).")


def _sampling(max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed):
    from .tools.infer import Sampling

    return Sampling(max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed)


@app.command()
def generate(
    run_dir: Path = typer.Argument(..., help="Run directory (adapter or full model) or a merged model folder."),
    prompt: List[str] = typer.Option([], "--prompt", "-p", help="A user message (repeatable: one answer each)."),
    system: Optional[str] = SYSTEM,
    raw: bool = typer.Option(False, "--raw", help="Send the prompt as plain text, without the chat template."),
    max_new_tokens: int = MAX_NEW_TOKENS, temperature: float = TEMPERATURE, top_p: float = TOP_P, top_k: int = TOP_K,
    repetition_penalty: float = REPETITION_PENALTY, seed: Optional[int] = SEED,
    data: Optional[Path] = typer.Option(None, "--data", help="A .jsonl of prompts to answer, one per row: `prompt` "
                                        "(text or messages) or `messages` (its last assistant turn is answered "
                                        "again). Goes with --out."),
    out: Optional[Path] = typer.Option(None, "--out", help="With --data: the .jsonl the answers are appended to, "
                                       "as `messages` rows `llmtune sft` trains on; rows already there are skipped "
                                       "(rerun to resume)."),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="With --data: prompts generated together."),
):
    """Answer prompts with the trained model, through the run's own chat template; stops at the trained stop token.
    With --data and --out, answer a whole file of prompts in batches (data distillation), resumable."""
    from .tools.infer import generate as run_generate
    from .tools.infer import generate_file, load, prompt_ids

    sampling = _sampling(max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed)
    if (data is None) != (out is None) or bool(prompt) == (data is not None) or (raw and data is not None):
        _fail(["give --prompt TEXT (repeatable), or --data PROMPTS.jsonl with --out ANSWERS.jsonl (without --raw)"])
    try:
        if data is not None:
            if data.resolve() == out.resolve():
                raise UserError("--out must be another file than --data")
            written, before = generate_file(load(run_dir), data, out, sampling, batch_size, system,
                                            progress=sys.stderr.isatty())
            typer.echo(f"wrote {written} answers to {out}" + (f" (after {before} already there)" if before else ""))
            return
        loaded = load(run_dir)
        for i, text in enumerate(prompt):
            messages = None if raw else ([{"role": "system", "content": system}] if system else []) + [
                {"role": "user", "content": text}]
            new = run_generate(loaded, prompt_ids(loaded.tokenizer, messages, text), sampling)
            if len(prompt) > 1:
                typer.echo(f"{'' if i == 0 else chr(10)}### {text}")
            typer.echo(loaded.tokenizer.decode(new, skip_special_tokens=True))
    except UserError as err:
        _fail(err.problems)


@app.command()
def chat(
    run_dir: Path = typer.Argument(..., help="Run directory (adapter or full model) or a merged model folder."),
    system: Optional[str] = SYSTEM,
    max_new_tokens: int = MAX_NEW_TOKENS, temperature: float = TEMPERATURE, top_p: float = TOP_P, top_k: int = TOP_K,
    repetition_penalty: float = REPETITION_PENALTY, seed: Optional[int] = SEED,
):
    """Chat with the trained model in the terminal, through the run's own chat template."""
    from .tools.infer import chat as run_chat
    from .tools.infer import load

    try:
        run_chat(load(run_dir), _sampling(max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed),
                 system)
    except UserError as err:
        _fail(err.problems)


@app.command()
def judge(
    recipe: Path = typer.Argument(..., help="A judge recipe: prompts, candidates, judge, rubric (docs/evaluation.md)."),
    set_: List[str] = typer.Option([], "--set", help=SET_HELP),
):
    """Judge answers with a model (LLM-as-a-judge): two candidates pairwise, each pair in both orders (win rate with
    a 95% Wilson interval), or each candidate graded 1-10. The judge is a local model or an OpenAI-compatible
    endpoint; results go to the first candidate run's eval/ folder, manifest and card (or `output_dir`)."""
    from .recipe.judge import resolve_judge
    from .tools.judge import run

    try:
        lines, written = run(resolve_judge(recipe, set_))
    except UserError as err:
        _fail(err.problems)
    typer.echo("\n".join(lines))
    typer.echo(f"wrote {written}")


@app.command("eval")
def eval_(
    run_dir: Path = typer.Argument(..., help="Run directory (adapter or full model) or a merged model folder."),
    tasks: str = typer.Option(..., "--tasks", help="Comma-separated lm-eval task names (globs too, e.g. mmlu_*), "
                              "task YAML files, folders of them, or a shipped task such as eval/chat-mc."),
    limit: Optional[float] = typer.Option(None, "--limit", help="Rows per task (a fraction below 1): for a quick "
                                          "look; the score is then not comparable with published ones."),
    num_fewshot: Optional[int] = typer.Option(None, "--num-fewshot", help="Solved examples before each question "
                                              "[default: the task's own]."),
    batch_size: str = typer.Option("1", "--batch-size", metavar="N|auto", help="Rows per forward pass; `auto` "
                                   "finds the largest that fits."),
    apply_chat_template: Optional[bool] = typer.Option(
        None, "--apply-chat-template/--no-apply-chat-template",
        help="Wrap each prompt in the run's chat template [default: yes, unless the run trained on plain text or "
        "the tokenizer has no template: a chat-trained model answers after its template's assistant marker]."),
    device: Optional[str] = typer.Option(None, "--device", help="Where to run, e.g. cuda:1 or cpu [default: the "
                                         "GPU when there is one]."),
):
    """Score the trained model on lm-evaluation-harness tasks; results go to RUN_DIR/eval/ and manifest.json."""
    from .tools.evaluation import Options, evaluate

    try:
        lines, written = evaluate(run_dir, tasks, Options(limit, num_fewshot, batch_size, apply_chat_template,
                                                          device))
    except UserError as err:
        _fail(err.problems)
    typer.echo("\n".join(lines))
    typer.echo(f"wrote {written}")


@recipes_app.command("list")
def recipes_list():
    """Shipped recipes with the first line of their header comment."""
    from .paths import SHIPPED

    for path in sorted(SHIPPED.rglob("*.yaml")):
        first = path.read_text(encoding="utf-8").splitlines()[:1]
        about = first[0].lstrip("# ").strip() if first and first[0].startswith("#") else ""
        typer.echo(f"{str(path.relative_to(SHIPPED))[:-5]:<28} {about}")


@recipes_app.command("show")
def recipes_show(name: str = typer.Argument(..., help="Recipe name from `llmtune recipes list`.")):
    """Print a shipped recipe."""
    from .recipe.loader import shipped_recipe

    path = shipped_recipe(name)
    if path is None:
        _fail([f"no shipped recipe '{name}'; see `llmtune recipes list`"])
    typer.echo(path.read_text(encoding="utf-8"), nl=False)


@recipes_app.command("copy")
def recipes_copy(
    name: str = typer.Argument(..., help="Recipe name from `llmtune recipes list`."),
    dest: Path = typer.Argument(..., help="A .yaml file, or a folder (created if missing)."),
):
    """Copy a shipped recipe to edit as your own; the sample data it names goes to data/ beside it."""
    from .recipe.copy import copy_recipe

    try:
        for written in copy_recipe(name, dest):
            typer.echo(f"wrote {written}")
    except UserError as err:
        _fail(err.problems)


def main() -> None:
    # transformers 5.25 swaps Hub kernels into every model it loads on a GPU unless told not to: code fetched from
    # the Hub at load time, and a crash offline ("not available in the local cache"). llmtune stays offline unless
    # asked; USE_HUB_KERNELS=YES in the environment opts in.
    os.environ.setdefault("USE_HUB_KERNELS", "NO")
    # No telemetry: TRL's trainers report each run to the Hub (huggingface_hub's send_telemetry) unless told not to.
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    from .compat import bitsandbytes_import_hook

    # bitsandbytes asks the Hub for a CPU kernel as it is imported: not unless Hub kernels are asked for
    bitsandbytes_import_hook(offline=os.environ["USE_HUB_KERNELS"].upper() not in ("1", "ON", "YES", "TRUE"))
    import atexit

    atexit.register(_exit_130_if_interrupted)
    from .logs import quiet_loggers

    quiet_loggers()
    app()


if __name__ == "__main__":
    main()
