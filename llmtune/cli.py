"""The `llmtune` command: one thin function per verb; heavy imports happen inside verbs."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

from .errors import UserError
from .methods import METHODS

app = typer.Typer(
    help="Fine-tune language models from YAML recipes (TRL, PEFT, bitsandbytes, accelerate).",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]})
recipes_app = typer.Typer(help="Shipped recipes: list, show, copy.", no_args_is_help=True)
app.add_typer(recipes_app, name="recipes")

SET_HELP = "Override a recipe key, e.g. --set train.learning_rate=1e-4 (repeatable; values are YAML)."


def _fail(problems: list[str], code: int = 2):
    for problem in problems:
        typer.echo(f"error: {problem}", err=True)
    raise typer.Exit(code)


def _train(recipe: Path, sets: list[str], verb: Optional[str], output_dir: Optional[str], overwrite: bool,
           dry_run: bool) -> None:
    from .recipe.check import resolve

    try:
        resolved = resolve(recipe, sets or [], verb=verb)
        if dry_run:
            import yaml

            from .data import load_data
            from .recipe.loader import redact

            data = load_data(resolved.config["data"], method=resolved.method.name, seed=resolved.config["seed"],
                             locate=resolved.locate)
            typer.echo(yaml.safe_dump(redact(resolved.config, resolved.recipe.secrets), sort_keys=False))
            for s in data.sources:
                typer.echo(f"data: {s.path}: {s.format} ({s.reason}), {s.rows} rows, {s.used} used")
            return
        from .run import summarize
        from .train import TrainingFailed, run

        metrics = run(resolved, sys.argv, output_dir=output_dir, overwrite=overwrite)
    except UserError as err:
        _fail(err.problems)
    except TrainingFailed as err:
        _fail([f"training failed: {err}", f"full traceback: {err.log}"], code=1)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        raise typer.Exit(130)
    summarize(Path(output_dir or resolved.config["output_dir"]), metrics)


def _method_verb(name: Optional[str], doc: str):
    """A training verb; `name` None means the recipe's own `method:` decides."""

    def verb(
        recipe: Path = typer.Argument(..., help="Recipe YAML file (or a shipped recipe name)."),
        set_: List[str] = typer.Option([], "--set", help=SET_HELP),
        output_dir: Optional[str] = typer.Option(None, "--output-dir", help="Run directory (overrides output_dir)."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Write into an output directory that is not empty."),
        dry_run: bool = typer.Option(False, "--dry-run", help="Check recipe and data, print the resolved recipe."),
    ):
        _train(recipe, set_, name, output_dir, overwrite, dry_run)

    verb.__doc__ = doc
    return verb


for _name, _method in METHODS.items():
    app.command(_name)(_method_verb(_name, _method.summary + (" [experimental in TRL]" if _method.experimental
                                                                else "")))
app.command("train")(_method_verb(None, "Train with the method named by the recipe's `method:`."))


@app.command()
def validate(
    recipes: List[Path] = typer.Argument(..., help="Recipe files to check."),
    set_: List[str] = typer.Option([], "--set", help=SET_HELP),
    no_data: bool = typer.Option(False, "--no-data", help="Check the recipe only, not its data files."),
):
    """Check recipes (and their data) without loading a model; every problem at once. Exit 0 or 2."""
    from .recipe.check import resolve

    problems = []
    for recipe in recipes:
        try:
            resolved = resolve(recipe, set_)
            if not no_data:
                from .data import load_data

                load_data(resolved.config["data"], method=resolved.method.name, seed=resolved.config["seed"],
                          locate=resolved.locate)
        except UserError as err:
            problems.extend(err.problems)
        else:
            typer.echo(f"ok: {recipe}")
    if problems:
        _fail(problems)


@app.command()
def env():
    """Versions of llmtune and its libraries, and the devices torch sees."""
    import json

    from .run import devices, package_versions

    typer.echo(json.dumps({"packages": package_versions(), "devices": devices()}, indent=2))


@recipes_app.command("list")
def recipes_list():
    """Shipped recipes with the first line of their header comment."""
    from .recipe.loader import SHIPPED

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
    dest: Path = typer.Argument(..., help="Where to write it (a file, or a folder)."),
):
    """Copy a shipped recipe, and the sample data files it names, to edit as your own."""
    from .recipe.copy import copy_recipe

    try:
        for written in copy_recipe(name, dest):
            typer.echo(f"wrote {written}")
    except UserError as err:
        _fail(err.problems)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
