"""Turn a recipe file into a checked configuration, or every problem with it at once."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UserError
from ..methods import METHODS, Method
from . import fields, loader
from .schema import (ADAPTER_ALIASES, ADAPTER_OWNED, ADAPTER_TYPES, Checker, RecipeSection, did_you_mean)

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
}


@dataclass
class Resolved:
    """A recipe that passed every check: plain data with defaults, and where it came from."""

    recipe: loader.Recipe
    config: dict
    method: Method

    def locate(self, keypath) -> str:
        return self.recipe.locate(keypath)


def resolve(path, overrides=(), verb: str | None = None) -> Resolved:
    recipe = loader.load(path, list(overrides))
    recipe.data.setdefault("output_dir", f"runs/{recipe.data['name']}")
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


def _check_adapter(check: Checker, adapter: dict) -> dict:
    kind = adapter.get("type", "lora")
    if kind not in ADAPTER_TYPES:
        check.error(("adapter", "type"), f"`adapter.type` must be one of: {', '.join(ADAPTER_TYPES)}; got "
                    f"{kind!r}{did_you_mean(str(kind), ADAPTER_TYPES)}")
    rest = {k: v for k, v in adapter.items() if k != "type"}
    return {"type": kind, **_check_fields(check, "adapter", "peft:LoraConfig", rest, ADAPTER_OWNED,
                                          ADAPTER_ALIASES)}


def _cross_checks(check: Checker, config: dict) -> None:
    """Combinations that each key allows alone but that cannot work together."""
    quant = config.get("quantization")
    if quant is not None and config.get("adapter") is None:
        check.error(("quantization",), "a quantized base cannot be fully fine-tuned; add an `adapter:` section "
                    "(e.g. `adapter: {type: lora, r: 16}`) for QLoRA, or remove `quantization:`")
    template = (config.get("model") or {}).get("chat_template")
    if template:
        from ..model import read_chat_template

        try:
            read_chat_template(template)
        except UserError as err:
            check.error(("model", "chat_template"), err.problems[0].removeprefix("model.chat_template: "))
    data = config.get("data") or {}
    if isinstance(data.get("eval"), float) and not 0 <= data["eval"] < 1:
        check.error(("data", "eval"), f"`data.eval` as a fraction must be in [0, 1); got {data['eval']}")
    for i, source in enumerate(data.get("train") or []):
        if source and source.get("weight") is not None and source["weight"] <= 0:
            check.error(("data", "train", i, "weight"), f"`weight` must be > 0; got {source['weight']}")
    if isinstance(data.get("max_length"), int) and data["max_length"] < 1:
        check.error(("data", "max_length"), f"`data.max_length` must be >= 1; got {data['max_length']}")
