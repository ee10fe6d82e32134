"""The recipe reference in docs/recipes.md, rendered from the schema's own help text.

`python -m llmtune.recipe.reference` prints it; a test keeps docs/recipes.md in step.
"""

import typing
from dataclasses import MISSING, fields

from .schema import (
    AdapterSection,
    CurateSection,
    DataSection,
    EarlyStoppingSection,
    EvalSection,
    HubSection,
    LaunchSection,
    ModelSection,
    QuantizationSection,
    RecipeSection,
    SourceSection,
    _type_name,
)


def _default(f) -> str:
    if f.default is not MISSING:
        return "null" if f.default is None else f"`{f.default}`"
    if f.default_factory is not MISSING:
        value = f.default_factory()
        return "each key's default" if isinstance(value, dict) and value else f"`{value}`"
    return "required"


def table(cls, prefix: str) -> str:
    hints = typing.get_type_hints(cls)
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for f in fields(cls):
        kind = _type_name(hints[f.name]).replace("|", "\\|")
        rows.append(f"| `{prefix}{f.name}` | {kind} | {_default(f)} | {f.metadata['help']} |")
    return "\n".join(rows)


def render() -> str:
    parts = [table(RecipeSection, ""), table(ModelSection, "model."), table(QuantizationSection, "quantization."),
             table(AdapterSection, "adapter."), table(DataSection, "data."), table(SourceSection, "data.train[]."),
             table(CurateSection, "data.curate."), table(EarlyStoppingSection, "early_stopping."),
             table(EvalSection, "eval."), table(LaunchSection, "launch."), table(HubSection, "hub.")]
    return "\n\n".join(parts) + "\n"


if __name__ == "__main__":
    print(render(), end="")
