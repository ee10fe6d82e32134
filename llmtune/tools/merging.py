"""Merging several fine-tunes into one model (`llmtune merge RECIPE`): model soups, task arithmetic, TIES, DARE.

A merge recipe (`method: merge`) lists runs: adapter run directories on one base, or full models of
one architecture. Each run becomes a task vector per weight (the run's weights, adapter folded in,
minus the base's), and PEFT's merge functions (`peft.utils.merge_utils`: task_arithmetic, ties,
dare_linear, dare_ties, the ones `add_weighted_adapter` calls) combine them, weight by weight, onto
the base. We merge the exact deltas rather than call `add_weighted_adapter` itself: its `linear`
mixes the runs' A and B matrices (cross terms between adapters), and its TIES/DARE refactor the
result to a rank by SVD, which drops part of what the merge computed. The output is a full model in
a run directory (manifest, card, recipe) that `generate`, `eval` and `export` take.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Union

import yaml

from ..builtin import model_path
from ..defaults import auto_config
from ..errors import UserError
from ..files import read_manifest, staged_folder, write_json
from ..recipe import loader
from ..recipe.schema import Checker, mergeable, opt
from ..runner.rundir import now, package_versions
from ..tokenizer import stop_token_ids
from .export import merged_model
from .infer import base_model_section, is_adapter, run_recipe

# merge_method -> (PEFT merge function, takes density, takes majority_sign)
MERGE_METHODS = {
    "linear": ("task_arithmetic", False, False),
    "task_arithmetic": ("task_arithmetic", False, False),
    "ties": ("ties", True, True),
    "dare_linear": ("dare_linear", True, False),
    "dare_ties": ("dare_ties", True, True),
}
# Config values that fix every weight's shape: runs differing in one of them cannot be merged.
SHAPE_KEYS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads", "head_dim", "tie_word_embeddings")


@dataclass
class MergeSource:
    path: str = opt(help="A run directory: an adapter run (`llmtune sft` with `adapter:`) or a full model folder.")
    weight: Union[float, None] = opt(
        None, help="Its weight: linear weights sum to 1 (a weighted average) [default: equal]; for the other methods "
        "each task vector is scaled by it [default: 1.0]; a negative one subtracts a task.")


@dataclass
class MergeRecipe:
    method: Literal["merge"] = opt(help="`merge`: this recipe merges runs (`llmtune merge RECIPE`), it trains nothing.")
    runs: list[MergeSource] = opt(help="The runs to merge, two or more: adapter runs on one base, or full models of "
                                  "one architecture.")
    name: str = opt(help="Run name, usable as `${name}`; defaults to the recipe file's name.")
    merge_method: Literal[tuple(MERGE_METHODS)] = opt(
        "linear", help="linear: weighted average (model soup); task_arithmetic: base + sum of weighted task "
        "vectors; ties: trim each task vector to `density`, elect a sign per weight, average those agreeing; "
        "dare_linear / dare_ties: drop task-vector entries at random (keep `density`, rescale), then add / TIES.")
    density: Union[float, None] = opt(
        None, help="ties, dare_linear, dare_ties: the share of each task vector's entries kept, in (0, 1]; lower "
        "drops more.")
    majority_sign: Union[Literal["total", "frequency"], None] = opt(
        None, help="ties, dare_ties: how each weight's sign is elected: `total` (sign of the summed values) or "
        "`frequency` (most runs' sign) [default: total].")
    base: Union[str, None] = opt(
        None, help="The model the runs were fine-tuned from (Hub id, folder or `builtin:tiny`): task vectors are "
        "each run minus it. Adapter runs: their own base [default]; full models: needed by every method but linear.")
    output_dir: str = opt("runs/${name}", help="Run directory of the merged model.")
    seed: int = opt(42, help="Seed for DARE's random drops.")


@dataclass
class Run:
    path: Path
    adapter: bool
    base: str | None  # an adapter's base model
    shape: dict  # the SHAPE_KEYS of its architecture


@dataclass
class MergePlan:
    recipe: loader.Recipe
    config: dict
    runs: list[Run]
    weights: list[float]
    base: str | None


def is_merge_recipe(path) -> bool:
    """Whether a recipe file itself says `method: merge` (its YAML only: its problems are for `resolve` to report
    with their lines)."""
    path = Path(path)
    if not path.is_file():
        path = loader.shipped_recipe(str(path)) if not path.is_dir() else None
        if path is None:
            return False
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=loader.Loader)
    except (yaml.YAMLError, UnicodeDecodeError):
        return False
    return isinstance(raw, dict) and raw.get("method") == "merge"


def resolve(path, overrides=()) -> MergePlan:
    """The merge recipe checked without loading a weight: every problem at once, each with its file:line."""
    recipe = loader.load(path, list(overrides))
    check = Checker(recipe.locate)
    config = check.section(MergeRecipe, recipe.data, ())
    if config is None or check.problems:
        raise UserError(check.problems)
    method = config["merge_method"]
    _, sparse, signs = MERGE_METHODS[method]
    if len(config["runs"]) < 2:
        check.error(("runs",), f"a merge needs two runs or more, got {len(config['runs'])}")
    if sparse and config["density"] is None:
        check.error(("merge_method",), f"`{method}` keeps a share of each task vector: set `density:` in (0, 1], "
                    "e.g. `density: 0.5`")
    if config["density"] is not None:
        if not sparse:
            check.error(("density",), f"`density` applies to ties, dare_linear and dare_ties, not `{method}`; "
                        "remove it")
        elif not 0 < config["density"] <= 1:
            check.error(("density",), f"`density` must be in (0, 1] (the share of entries kept), got "
                        f"{config['density']}")
    if config["majority_sign"] is not None and not signs:
        check.error(("majority_sign",), f"`majority_sign` applies to ties and dare_ties, not `{method}`; remove it")
    config["majority_sign"] = config["majority_sign"] or ("total" if signs else None)
    weights = _weights(check, config)
    runs = [_run(check, i, source["path"]) for i, source in enumerate(config["runs"])]
    base = _base(check, config, [r for r in runs if r is not None])
    if check.problems:
        raise UserError(check.problems)
    return MergePlan(recipe, config, runs, weights, base)


def _weights(check: Checker, config: dict) -> list[float]:
    given = [source["weight"] for source in config["runs"]]
    linear = config["merge_method"] == "linear"
    if all(w is None for w in given):
        return [1 / len(given) if linear else 1.0] * len(given)
    for i, w in enumerate(given):
        if w is None:
            check.error(("runs", i), "give every run a `weight:` or none (equal weights)")
        elif w == 0:
            check.error(("runs", i, "weight"), "a weight of 0 leaves the run out; remove the run instead")
    if linear and None not in given and not math.isclose(sum(given), 1.0, abs_tol=1e-6):
        check.error(("runs",), f"the weights of a linear merge (a weighted average) must sum to 1, they sum to "
                    f"{sum(given):g}; e.g. {', '.join(f'{w / sum(given):.3g}' for w in given)} (or use "
                    "`merge_method: task_arithmetic` to add scaled task vectors)" if sum(given) else
                    "the weights of a linear merge must sum to 1, they sum to 0")
    return given


def _run(check: Checker, i: int, path: str) -> Run | None:
    where = ("runs", i, "path")
    run_dir = Path(path).expanduser()
    try:
        adapter = is_adapter(run_dir)
    except UserError as err:
        check.error(where, err.problems[0])
        return None
    if not adapter:
        config = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
        return Run(run_dir, False, None, _shape(config))
    peft = json.loads((run_dir / "adapter_config.json").read_text(encoding="utf-8"))
    recipe = run_recipe(run_dir)
    if not mergeable(peft["peft_type"]):
        check.error(where, f"{path}: a {peft['peft_type'].lower().replace('_', ' ')} adapter adds virtual tokens, "
                    "not weight updates: there is no task vector to merge")
        return None
    if (recipe or {}).get("quantization"):
        check.error(where, f"{path}: an adapter trained on a quantized base ({recipe['quantization']['bits']}-bit): "
                    "its task vector is not defined against the float base; merge it into a full model first "
                    "(`llmtune merge RUN`) and list that folder with the base named in `base:`")
        return None
    section = base_model_section(run_dir, recipe)
    try:
        shape = _shape(auto_config(section).to_dict())
    except UserError as err:
        check.error(where, f"{path}: its base: {err.problems[0]}")
        return None
    return Run(run_dir, True, section["name"], shape)


def _shape(config: dict) -> dict:
    return {key: config.get(key) for key in SHAPE_KEYS}


def _base(check: Checker, config: dict, runs: list[Run]) -> str | None:
    bases = {r.base for r in runs if r.adapter}
    base = config["base"]
    if base is None and len(bases) > 1:
        listed = "; ".join(f"{r.path} on '{r.base}'" for r in runs if r.adapter)
        check.error(("runs",), f"adapter runs on different bases cannot be merged ({listed}): merge runs trained "
                    "on one base model")
    elif base is not None:
        for i, r in enumerate(runs):
            if r.adapter and r.base != base:
                check.error(("runs", i, "path"), f"{r.path}: an adapter on '{r.base}', not on `base: {base}`")
    base = base or (bases.pop() if len(bases) == 1 else None)
    if base is None and config["merge_method"] != "linear" and runs:
        check.error(("base",), f"`{config['merge_method']}` adds task vectors (each model minus the model it was "
                    "fine-tuned from): set `base:` to that model")
    shapes = list(runs)
    if base is not None and not check.problems:
        try:
            shapes.insert(0, Run(Path(base), False, None, _shape(auto_config(_model_section(base)).to_dict())))
        except UserError as err:
            check.error(("base",), err.problems[0])
    for i, r in enumerate(runs):
        if shapes and r.shape != shapes[0].shape:
            differ = ", ".join(f"{k} {shapes[0].shape[k]} vs {r.shape[k]}" for k in SHAPE_KEYS
                               if shapes[0].shape[k] != r.shape[k])
            check.error(("runs", i, "path"), f"{r.path}: its weights do not have the shapes of {shapes[0].path}'s "
                        f"({differ}): merged models must share one architecture and size")
    return base


def _model_section(name: str) -> dict:
    return {"name": name, "revision": None, "dtype": "float32", "attn_implementation": None,
            "trust_remote_code": False}


def merge(plan: MergePlan, out=None, overwrite: bool = False) -> tuple[Path, list[str]]:
    """Merge the plan's runs and write the run directory; returns it and what was done."""
    out = Path(out or plan.config["output_dir"])
    if out.resolve() in [r.path.resolve() for r in plan.runs]:
        raise UserError(f"{out}: the output directory is one of the runs merged; set another `output_dir` or --out")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UserError(f"{plan.recipe.locate(('output_dir',))}: {out} is not empty; set another `output_dir`, pass "
                        "--out DIR or --overwrite")
    started = now()
    model, tokenizer, notes = merged_weights(plan)
    model.generation_config.eos_token_id = stop_token_ids(model, tokenizer)
    with staged_folder(out) as tmp:  # an interrupted merge leaves nothing half-written
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        config = {**plan.config, "base": plan.base,
                  "runs": [{"path": str(r.path.resolve()), "weight": w} for r, w in zip(plan.runs, plan.weights)]}
        (tmp / "recipe.yaml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
        manifest = {"method": "merge", "merge_method": plan.config["merge_method"], "base": plan.base,
                    "runs": config["runs"], "recipe": str(plan.recipe.path), "command": sys.argv,
                    "started": started, "finished": now(), "notes": notes, "packages": package_versions(),
                    **_data_shape(plan.runs)}
        write_json(tmp / "manifest.json", manifest)
        (tmp / "README.md").write_text(card(plan, notes), encoding="utf-8")
    return out, notes


def merged_weights(plan: MergePlan):
    """(model, tokenizer, notes): the base plus the merged task vectors, weight by weight, in memory."""
    import warnings

    import torch
    from peft.utils import merge_utils
    from transformers import AutoModelForCausalLM

    method = plan.config["merge_method"]
    function, sparse, signs = MERGE_METHODS[method]
    extra = {**({"density": plan.config["density"]} if sparse else {}),
             **({"majority_sign_method": plan.config["majority_sign"]} if signs else {})}
    loaded = [merged_model(r.path) for r in plan.runs]  # each run with its adapter folded in
    model, tokenizer = loaded[0][0], loaded[0][1]
    states = [m.state_dict() for m, *_ in loaded]
    base = None
    if plan.base is not None:
        base = AutoModelForCausalLM.from_pretrained(model_path(_model_section(plan.base)), dtype=torch.float32)
        base = base.state_dict()
    weights = torch.tensor(plan.weights, dtype=torch.float32)
    torch.manual_seed(plan.config["seed"])
    merged = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns that a density of 1 prunes nothing: as asked
        for key, first in states[0].items():
            tensors = [state[key] for state in states]
            reference = base[key] if base is not None else first
            if any(t.shape != reference.shape for t in tensors):
                raise UserError(f"{key}: shapes {[tuple(t.shape) for t in tensors]} differ between the runs "
                                f"({', '.join(str(r.path) for r in plan.runs)}); merged models must share one "
                                "architecture and size")
            if not first.is_floating_point():
                merged[key] = first
                continue
            if base is None:  # a linear merge of full models: the weighted average of the weights themselves
                merged[key] = merge_utils.task_arithmetic([t.float() for t in tensors], weights)
                continue
            origin = base[key].float()
            deltas = [t.float() - origin for t in tensors]
            merged[key] = origin + getattr(merge_utils, function)(deltas, weights, **extra)
    model.load_state_dict({k: v.to(states[0][k].dtype) for k, v in merged.items()})
    kinds = "adapter runs" if all(r.adapter for r in plan.runs) else "models"
    notes = [f"merged {len(plan.runs)} {kinds} with {method} (weights {', '.join(f'{w:g}' for w in plan.weights)}"
             + (f", density {plan.config['density']:g}" if sparse else "")
             + (f", majority sign by {plan.config['majority_sign']}" if signs else "") + ")"
             + (f" onto {plan.base}" if plan.base else "")]
    templates = {getattr(t, "chat_template", None) for _, t, *_ in loaded}
    if len(templates) > 1:
        notes.append(f"the runs' chat templates differ: the merged model keeps {plan.runs[0].path}'s")
    return model, tokenizer, notes


def _data_shape(runs: list[Run]) -> dict:
    """The runs' common training-data shape (conversational or not), which `eval` reads for its chat default."""
    shapes = {read_manifest(r.path).get("data_shape") for r in runs}
    return {"data_shape": shapes.pop()} if len(shapes) == 1 and None not in shapes else {}


def card(plan: MergePlan, notes: list[str]) -> str:
    rows = "\n".join(f"| `{r.path}` | {'adapter' if r.adapter else 'full model'} | {w:g} |"
                     for r, w in zip(plan.runs, plan.weights))
    settings = [f"merge method: `{plan.config['merge_method']}`", *(
        [f"density: {plan.config['density']:g}"] if plan.config["density"] is not None else []), *(
        [f"majority sign: {plan.config['majority_sign']}"] if plan.config["majority_sign"] else []),
        f"base: `{plan.base}`" if plan.base else "base: none (a weighted average of the models)"]
    return f"""---
library_name: transformers
pipeline_tag: text-generation
tags: [llmtune, merge, {plan.config['merge_method']}]
---

# {plan.config['name']}

Merged by llmtune from {len(plan.runs)} runs (peft.utils.merge_utils).

| run | kind | weight |
|---|---|---|
{rows}

{chr(10).join(f'- {line}' for line in settings)}

{chr(10).join(f'{note}.' for note in notes)}

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{plan.config['name']}")
tokenizer = AutoTokenizer.from_pretrained("{plan.config['name']}")
```
"""
