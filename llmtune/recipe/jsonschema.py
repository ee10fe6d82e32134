"""`llmtune schema`: the recipe as a JSON Schema, so YAML editors complete, explain and check recipes.

Derived, never written by hand: llmtune's own sections from the dataclasses of schema.py
(help text -> description), `train:` from each method's TRL config class and `adapter:` from
each adapter type's PEFT config class, read by fields.py (annotation -> type, metadata help
and choices, literal defaults). `train:` depends on `method:` and `adapter:` on `type:`
(draft-07 if/then, which the YAML language server follows).

Mappings merge across `extends:`, so keys a full recipe needs may come from another file:
the schema requires keys only inside list items (a data source needs its `path`).
`llmtune validate` checks the merged recipe, with every cross-check.
"""

from __future__ import annotations

import ast
import json
import math
import typing
from dataclasses import MISSING, fields
from importlib import metadata
from typing import Literal, Union

from ..verbs import METHODS
from . import fields as library
from .check import TRAIN_OWNED
from .schema import ADAPTER_ALIASES, ADAPTER_OWNED, ADAPTERS, AdapterSection, RecipeSection

DRAFT = "http://json-schema.org/draft-07/schema#"
EXTENDS_HELP = ("Recipes this one builds on, merged depth-first (maps merge key by key, lists and scalars "
                "replace): a path relative to this file, or a shipped recipe name (`base/lora.yaml`).")


def recipe_schema() -> dict:
    root = _section(RecipeSection)
    root["properties"] = {"extends": {"description": EXTENDS_HELP, "anyOf": [
        {"type": "string"}, {"type": "array", "items": {"type": "string"}}]}, **root["properties"]}
    adapter = root["properties"]["adapter"]
    root["properties"]["adapter"] = {"description": adapter["description"], "default": None,
                                     "anyOf": [{"type": "null"}, _adapter()]}
    # Each method's `train:` is its own TRL config class; without `method:` (an overlay), any method's field.
    # The classes share most fields (TrainingArguments), each defined once and referenced.
    definitions: dict = {}
    trains = {name: _library_section(m.config, TRAIN_OWNED) for name, m in METHODS.items()}
    union = {"type": "object", "additionalProperties": False,
             "properties": {k: v for t in reversed(trains.values()) for k, v in t["properties"].items()}}
    for train in (*trains.values(), union):
        train["properties"] = {k: _shared(definitions, f"train.{k}", v) for k, v in train["properties"].items()}
    root["allOf"] = [_when("method", [name], {"properties": {"train": train}}) for name, train in trains.items()]
    root["allOf"].append({"if": {"not": {"required": ["method"]}}, "then": {"properties": {"train": union}}})
    return {"$schema": DRAFT, "$comment": f"Generated from {library_versions()} by `llmtune schema`; do not edit", "title": "llmtune recipe",
            **root, "definitions": definitions}


def library_versions() -> str:
    """The libraries whose config classes `train:` and `adapter:` are read from (the schema follows them)."""
    return ", ".join(f"{name}=={metadata.version(name)}" for name in ("trl", "peft", "transformers"))


def _shared(definitions: dict, name: str, schema: dict) -> dict:
    """A reference to `schema` in `definitions`, under `name` (numbered when another schema has that name)."""
    key, n = name, 1
    while key in definitions and definitions[key] != schema:
        n += 1
        key = f"{name}.{n}"
    definitions[key] = schema
    return {"$ref": f"#/definitions/{key}"}


def render() -> str:
    return json.dumps(recipe_schema(), indent=1, ensure_ascii=False) + "\n"


def _when(key: str, values: list, then: dict, required: bool = True) -> dict:
    condition = {"properties": {key: {"enum": values}}}
    return {"if": {**condition, "required": [key]} if required else condition, "then": then}


def _adapter() -> dict:
    """`type:` picks the PEFT config class whose fields the rest of the section takes."""
    own = _section(AdapterSection)
    branches = []
    for config in dict.fromkeys(kind.config for kind in ADAPTERS.values()):
        names = [name for name, kind in ADAPTERS.items() if kind.config == config]
        known = library.dataclass_fields(config)
        owned = {**ADAPTER_OWNED, **{k: "" for name in names for k in ADAPTERS[name].sets}}
        section = _library_section(config, owned)
        aliases = {alias: section["properties"][name] for alias, name in ADAPTER_ALIASES.items()
                   if name in section["properties"]}
        properties = {**own["properties"], **aliases, **section["properties"]}
        if "loraplus_lr_ratio" in properties and config != "peft:LoraConfig":
            del properties["loraplus_lr_ratio"]
        then = {**section, "properties": properties}
        required = sorted({r for name in names for r in ADAPTERS[name].required if r in known})
        if required:
            then["required"] = required
        # `type:` left out means lora, so LoRA's branch also applies without it.
        branches.append(_when("type", names, then, required="lora" not in names))
    return {"type": "object", "properties": own["properties"], "allOf": branches}


# --- llmtune's own sections: dataclasses with their help text ------------------


def _section(cls, whole: bool = False) -> dict:
    """An object schema of a schema.py dataclass; `whole` (a list item, never merged) requires its required keys."""
    hints = typing.get_type_hints(cls)
    properties, required = {}, []
    for f in fields(cls):
        prop = {"description": f.metadata.get("help", ""), **_python_type(hints[f.name])}
        if f.default is not MISSING:
            prop["default"] = f.default
        elif f.default_factory is not MISSING:
            prop["default"] = f.default_factory()
        else:
            required.append(f.name)
        properties[f.name] = prop
    out = {"type": "object", "properties": properties, "additionalProperties": False}
    if whole and required:
        out["required"] = required
    return out


def _python_type(tp) -> dict:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return {"enum": list(typing.get_args(tp))}
    if origin is Union:
        return _union([_python_type(a) for a in typing.get_args(tp)])
    if origin is list:
        (item,) = typing.get_args(tp)
        return {"type": "array", "items": _python_type(item) if not hasattr(item, "__dataclass_fields__")
                else _section(item, whole=True)}
    if origin is dict or tp is dict:
        args = typing.get_args(tp)
        return {"type": "object", **({"additionalProperties": _python_type(args[1])} if args else {})}
    if hasattr(tp, "__dataclass_fields__"):
        return _section(tp)
    return {"type": _JSON_TYPES[tp]}


_JSON_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean", type(None): "null"}


def _union(options: list[dict]) -> dict:
    if any(not option for option in options):  # one option takes anything: so does the union
        return {}
    if all(set(option) == {"type"} for option in options):
        types = []
        for option in options:
            for t in option["type"] if isinstance(option["type"], list) else [option["type"]]:
                types += [t] if t not in types else []
        if "integer" in types and "number" in types:
            types.remove("integer")
        return {"type": types[0] if len(types) == 1 else types}
    return {"anyOf": options}


# --- library sections: fields read from TRL/PEFT source ------------------------


def _library_section(target: str, owned: dict) -> dict:
    properties = {}
    for name, info in library.dataclass_fields(target).items():
        if name in owned:
            continue
        prop = {"description": info.help} if info.help else {}
        prop.update(_annotation(info.annotation))
        if info.choices is not None:
            allowed = list(info.choices)
            if library.check_value(info, None) is None and None not in allowed:
                allowed.append(None)
            prop = {k: v for k, v in prop.items() if k not in ("type", "anyOf")} | {"enum": allowed}
        default = _json_default(info.default)
        if default is not _NO_DEFAULT:
            prop["default"] = default
        properties[name] = prop
    return {"type": "object", "properties": properties, "additionalProperties": False}


_NO_DEFAULT = object()


def _json_default(value):
    """The default as JSON, or _NO_DEFAULT for what JSON cannot say (MISSING, a factory, an expression, inf)."""
    if value in (library.MISSING, library.FACTORY, library.COMPLEX) or (
            isinstance(value, float) and not math.isfinite(value)):
        return _NO_DEFAULT
    if isinstance(value, tuple):
        value = list(value)
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return _NO_DEFAULT
    return value


def _annotation(text: str) -> dict:
    try:
        return _node(ast.parse(text, mode="eval").body)
    except SyntaxError:
        return {}


_NAMES = {"int": "integer", "float": "number", "bool": "boolean", "str": "string", "NoneType": "null",
          "dict": "object", "Dict": "object", "Mapping": "object", "MutableMapping": "object",
          **{seq: "array" for seq in ("list", "List", "tuple", "Tuple", "set", "Set", "frozenset", "FrozenSet",
                                      "Sequence")}}


def _node(node) -> dict:
    """An annotation expression as a schema; what cannot be read (enum classes, config classes) takes anything,
    as fields.check_value does."""
    if isinstance(node, ast.Constant):
        if node.value is None:
            return {"type": "null"}
        return _annotation(node.value) if isinstance(node.value, str) else {}
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        return _union([_node(node.left), _node(node.right)])
    if isinstance(node, ast.Subscript):
        origin = library._tail(node.value)
        args = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
        if origin == "Optional":
            return _union([_node(args[0]), {"type": "null"}])
        if origin == "Union":
            return _union([_node(a) for a in args])
        if origin == "Annotated":
            return _node(args[0])
        if origin == "Literal":
            return _literal(args)
        kind = _NAMES.get(origin)
        if kind == "array" and len(args) == 1:
            return {"type": "array", "items": _node(args[0])}
        if kind == "object" and len(args) == 2:
            return {"type": "object", "additionalProperties": _node(args[1])}
        return {"type": kind} if kind else {}
    kind = _NAMES.get(library._tail(node))
    return {"type": kind} if kind else {}


def _literal(args) -> dict:
    values = [library._literal(a) for a in args]
    if library.COMPLEX in values:
        return {}
    # peft spells a family of values as one placeholder, e.g. 'pissa_niter_[number of iters]'.
    families = [v.partition("[")[0] for v in values if isinstance(v, str) and "[" in v]
    plain = [v for v in values if not (isinstance(v, str) and "[" in v)]
    if not families:
        return {"enum": plain}
    return {"anyOf": [{"enum": plain}, *({"type": "string", "pattern": f"^{f}"} for f in families)]}
