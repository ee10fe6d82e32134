"""Turn a recipe file into a checked configuration, or every problem with it at once."""

from __future__ import annotations

import re
from dataclasses import dataclass
from dataclasses import fields as dataclass_fields

from ..errors import UserError
from ..files import adapter_run
from ..paths import read_chat_template
from ..verbs import METHODS, Method
from . import evals, fields, loader, preflight, sections
from .rules import check_recipe
from .schema import (
    ADAPTER_ALIASES,
    ADAPTER_OWNED,
    ADAPTERS,
    AdapterSection,
    Checker,
    RecipeSection,
    did_you_mean,
    mergeable,
)

# TrainingArguments fields that llmtune fills from its own sections; setting them in
# `train:` as well would leave two sources of truth.
TRAIN_OWNED = {
    "output_dir": "set the top-level `output_dir:`",
    "seed": "set the top-level `seed:`",
    "max_length": "set `data.max_length:`",
    "packing": "set `data.packing:`",
    "model_init_kwargs": "set the `model:` section",
    "trust_remote_code": "set `model.trust_remote_code:`",
    "chat_template_path": "set `model.chat_template:`",
    "hub_token": "export HF_TOKEN instead; tokens never belong in a recipe",
    # llmtune uploads the finished run itself (`hub:`), choosing the files; the Trainer's push would add its own.
    "push_to_hub": "add a `hub:` section (`hub: {repo_id: namespace/name}`) instead",
    "hub_model_id": "set `hub.repo_id:`",
    "hub_private_repo": "set `hub.private:`",
    "hub_revision": "set `hub.revision:`",
    "hub_strategy": "the `hub:` section uploads the finished run (checkpoints with `hub.include_checkpoints: true`)",
    "hub_always_push": "the `hub:` section uploads once, when the run has finished",
    "teacher_model_name_or_path": "set the top-level `teacher_model:`",
    "teacher_model_init_kwargs": "the teacher loads with the `model:` section's settings; set `teacher_model:`",
}


@dataclass
class Resolved:
    """A recipe that passed every check: plain data with defaults, and where it came from."""

    recipe: loader.Recipe
    config: dict
    method: Method

    def locate(self, keypath) -> str:
        return self.recipe.locate(keypath)

    def require_paths(self) -> None:
        """Every file and folder the recipe names exists (what `validate --no-data` leaves unchecked)."""
        if self.recipe.missing:
            raise UserError(self.recipe.missing)


def resolve(path, overrides=(), verb: str | None = None) -> Resolved:
    recipe = loader.load(path, list(overrides))
    if recipe.data.get("method") == "merge":  # tools/merging.py reads these
        raise UserError(f"{recipe.locate(('method',))}: this recipe merges runs (method: merge) and trains nothing; "
                        f"run `llmtune merge {path}`")
    check = Checker(recipe.locate)
    config = check.section(RecipeSection, recipe.data, ())
    if config is None:
        raise UserError(check.problems)
    method = METHODS.get(config.get("method"))
    if verb is not None and method is not None and verb != method.name:
        check.error(("method",), f"this recipe is for `llmtune {method.name}` (method: {method.name}), "
                    f"not `llmtune {verb}`; run `llmtune {method.name} {path}` or `llmtune train {path}`")
    if method is not None and isinstance(config.get("train"), dict):
        config["train"] = _check_train(check, method, config["train"])
    if config.get("adapter") is not None:
        config["adapter"] = _check_adapter(check, config["adapter"])
    _cross_checks(check, config)
    preflight.values(check, config)
    check_recipe(check, config)  # the launch rules that need only the recipe (rules.py)
    if method is not None:
        _method_checks(check, method, config)
        _reward_checks(check, method, config)
    sections.check_early_stopping(check, method, config)
    sections.check_curate(check, config)
    sections.check_hub(check, config)
    evals.check_eval(check, config, recipe.path.parent)
    if check.problems:
        raise UserError(check.problems)
    return Resolved(recipe=recipe, config=config, method=method)


def _check_fields(check: Checker, section: str, target: str, values: dict, owned: dict, aliases=None) -> dict:
    """Check a pass-through section against a library dataclass's own fields."""
    known = fields.dataclass_fields(target)
    aliases = aliases or {}
    out = {}
    for key, value in values.items():
        path = (section, key)
        name = aliases.get(key, key)
        if name in owned:
            check.error(path, f"`{section}.{key}` is managed by llmtune: {owned[name]}")
        elif name not in known:
            check.error(path, f"unknown key '{key}' in {section}{did_you_mean(key, [*known, *aliases])} "
                        f"(`{section}:` takes the fields of {target.split(':')[1]})")
        else:
            problem = fields.check_value(known[name], value)
            if problem:
                check.error(path, f"`{section}.{key}`: {problem}")
            else:
                out[name] = fields.coerce(known[name], value)
    return out


def _check_train(check: Checker, method: Method, train: dict) -> dict:
    return _check_fields(check, "train", method.config, train, TRAIN_OWNED)


# A weight repeats a source's rows in memory; beyond this it only fills memory (`max_steps` trains longer).
MAX_WEIGHT = 1000

# LoRA initialisations that need a step llmtune does not take: PEFT would fail, or save an adapter that fits no base.
UNSUPPORTED_INITS = {
    "loftq": "it replaces the base weights by LoftQ's own quantization of them, so the saved adapter would not fit "
             "the base it is loaded on; for a quantized base use `quantization: {bits: 4}` (QLoRA)",
    "eva": "it needs a pass over the data (peft.initialize_lora_eva_weights) that llmtune does not run",
    "corda": "it needs a calibration pass (peft's CorDA preprocess) that llmtune does not run",
}


def _check_adapter(check: Checker, adapter: dict) -> dict:
    """llmtune's own keys (AdapterSection), then every other key against the type's PEFT config class."""
    mine = {f.name for f in dataclass_fields(AdapterSection)}
    own = check.section(AdapterSection, {k: v for k, v in adapter.items() if k in mine}, ("adapter",))
    kind = ADAPTERS.get(own["type"]) if own else None
    if kind is None:  # a bad `type:` was reported; there is no class to check the rest against
        return own or {}
    known = fields.dataclass_fields(kind.config)
    aliases = {alias: name for alias, name in ADAPTER_ALIASES.items() if name in known}
    owned = {**ADAPTER_OWNED, **{name: f"set by `type: {own['type']}`" for name in kind.sets}}
    rest = {k: v for k, v in adapter.items() if k not in mine}
    out = {**own, **_check_fields(check, "adapter", kind.config, rest, owned, aliases)}
    for name in kind.required:
        if out.get(name) is None:
            check.error(("adapter",), f"`adapter.type: {own['type']}` needs `adapter.{name}` ({known[name].help})")
    init = out.get("init_lora_weights")
    if init in UNSUPPORTED_INITS:
        check.error(("adapter", "init_lora_weights"), f"`init_lora_weights: {init}` is not supported: "
                    f"{UNSUPPORTED_INITS[init]}. `gaussian`, `orthogonal`, `pissa` and `olora` are (PiSSA and OLoRA "
                    "adapters are saved converted to plain LoRA, which loads on the original base)")
    ratio = own["loraplus_lr_ratio"]
    if ratio is not None and kind.config != "peft:LoraConfig":
        check.error(("adapter", "loraplus_lr_ratio"), f"LoRA+ scales the learning rate of LoRA's B matrices; "
                    f"`type: {own['type']}` has none: remove `loraplus_lr_ratio` or use `type: lora`")
    elif ratio is not None and ratio <= 0:
        check.error(("adapter", "loraplus_lr_ratio"), f"`adapter.loraplus_lr_ratio` must be > 0; got {ratio}")
    return out


def _cross_checks(check: Checker, config: dict) -> None:
    """Combinations that each key allows alone but that cannot work together."""
    quant = config.get("quantization")
    if quant is not None and config.get("adapter") is None:
        check.error(("quantization",), "a quantized base cannot be fully fine-tuned; add an `adapter:` section "
                    "(e.g. `adapter: {type: lora, r: 16}`) for QLoRA, or remove `quantization:`")
    template = (config.get("model") or {}).get("chat_template")
    if template:
        try:
            read_chat_template(template)
        except UserError as err:
            check.error(("model", "chat_template"), err.problems[0].removeprefix("model.chat_template: "))
    data = config.get("data") or {}
    if isinstance(data.get("eval"), float) and not 0 <= data["eval"] < 1:
        check.error(("data", "eval"), f"`data.eval` as a fraction must be in [0, 1); got {data['eval']}")
    for i, source in enumerate(data.get("train") or []):
        if source and source.get("weight") is not None and not 0 < source["weight"] <= MAX_WEIGHT:  # nor .nan
            check.error(("data", "train", i, "weight"), f"`weight` must be a number in (0, {MAX_WEIGHT}] (it "
                        f"multiplies the source's rows); got {source['weight']}")
    if isinstance(data.get("max_length"), int) and data["max_length"] < 1:
        check.error(("data", "max_length"), f"`data.max_length` must be >= 1; got {data['max_length']}")
    if data.get("streaming"):
        _streaming_checks(check, config, data)


def _streaming_checks(check: Checker, config: dict, data: dict) -> None:
    """What a stream cannot give: a length, a random hold-out, a pass over all rows."""
    where = ("data", "streaming")
    method = METHODS.get(config.get("method"))
    if method is not None and not method.streams:
        check.error(where, f"`llmtune {method.name}` cannot stream its data; only "
                    f"{', '.join(m.name for m in METHODS.values() if m.streams)} can. Set `data.streaming: false`")
    steps = (config.get("train") or {}).get("max_steps")
    if not (isinstance(steps, int) and steps > 0):
        check.error(where, "a stream has no length to count epochs by: set `train.max_steps:`")
    if isinstance(data.get("eval"), float) and data["eval"]:
        check.error(("data", "eval"), "a fraction of a stream cannot be held out: give `eval:` as a list of "
                    "sources, or set it to null")
    if data.get("curate"):
        check.error(("data", "curate"), "`data.curate` needs every row before training; it cannot run on a "
                    "stream. Curate the files first, or set `data.streaming: false`")


def _method_checks(check: Checker, method: Method, config: dict) -> None:
    """Settings the method's trainer has no use for, and how `model.name` continues a run's adapter."""
    target = method.config.split(":")[1]
    if (config.get("data") or {}).get("packing") and "packing" not in fields.dataclass_fields(method.config):
        check.error(("data", "packing"), f"`llmtune {method.name}` cannot pack rows ({target} has no `packing`); "
                    "set `data.packing: false`")
    if config.get("ref_model") is not None and not method.reference:
        check.error(("ref_model",), f"`llmtune {method.name}` trains without a reference model; remove `ref_model:`")
    if config.get("teacher_model") is not None and not method.teacher:
        check.error(("teacher_model",), f"`llmtune {method.name}` learns from no teacher; remove `teacher_model:`")
    if method.teacher and config.get("teacher_model") is None:
        check.error(("method",), f"`method: {method.name}` learns from a teacher model: add `teacher_model:` (a Hub "
                    "id, a model folder or a run directory such as `runs/my-sft`)")

    model = config.get("model") or {}
    run = adapter_run(model) if isinstance(model.get("name"), str) else None
    if run is None:
        return
    where = ("model", "run_adapter")
    if model["run_adapter"] == "merge" and not mergeable(run["peft_type"]):
        check.error(where, f"the {run['peft_type']} adapter in '{model['name']}' cannot be folded into its base; "
                    "set `model.run_adapter: stack` to keep training it")
    if model["run_adapter"] == "stack":
        if config.get("adapter") is not None:
            check.error(("adapter",), f"'{model['name']}' holds an adapter, and `model.run_adapter: stack` keeps "
                        "training it with its own settings; remove `adapter:`, or set `model.run_adapter: merge` "
                        "to fold it into its base and fully fine-tune")
        if method.head != "CausalLM":
            check.error(where, f"`llmtune {method.name}` adds a new {method.head} head, so the run's adapter cannot "
                        "be stacked; set `model.run_adapter: merge` to fold it into its base first")
    elif config.get("adapter") is not None or config.get("quantization") is not None:
        check.error(where, "`model.run_adapter: merge` fully fine-tunes the merged model; remove `adapter:` and "
                    "`quantization:`, or set `model.run_adapter: stack` to keep training the run's adapter")


_FUNCTION_NAME = re.compile(r"(?:[A-Za-z_][\w.]*|.+\.py):[A-Za-z_]\w*")


def _reward_checks(check: Checker, method: Method, config: dict) -> None:
    """What scores the responses of the RL methods, and nothing of it for the others."""
    model, functions = config.get("reward_model"), config.get("reward_functions") or []
    if not method.rewards:
        for key, value in (("reward_model", model), ("reward_functions", functions)):
            if value:
                check.error((key,), f"`llmtune {method.name}` scores no responses; remove `{key}:` (it is for "
                            f"{', '.join(m.name for m in METHODS.values() if m.rewards)})")
        return
    if not method.reward_functions:
        if model is None:
            check.error(("method",), f"`method: {method.name}` needs a reward model to score its responses: add "
                        "`reward_model: runs/my-reward` (a run directory of `llmtune reward`) or a Hub "
                        "sequence-classification model id")
        if functions:
            check.error(("reward_functions",), f"`llmtune {method.name}` scores with `reward_model:` only; reward "
                        "functions work with "
                        + " or ".join(f"`method: {m.name}`" for m in METHODS.values() if m.reward_functions))
    elif model is None and not functions:
        check.error(("method",), f"`method: {method.name}` needs something to score its responses: add "
                    "`reward_model: runs/my-reward` and/or `reward_functions: [my_module:my_reward]`")
    for i, name in enumerate(functions):
        if not _FUNCTION_NAME.fullmatch(name):
            check.error(("reward_functions", i), f"`reward_functions` takes `module:function` names, e.g. "
                        f"`my_rewards:length_bonus` (my_rewards.py beside the recipe) or `lib/rewards.py:length_bonus`;"
                        f" got {name!r}")
