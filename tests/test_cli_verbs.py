"""Small verbs: `--version`, `data formats`, `templates`."""

import json
from importlib import metadata

import pytest
from typer.testing import CliRunner

from llmtune import __version__
from llmtune.cli import app
from llmtune.data import formats
from llmtune.paths import named_chat_templates

from .conftest import cli


def test_version_is_the_installed_packages():
    result = cli("--version")
    assert result.returncode == 0 and result.stdout == f"llmtune {__version__}\n"
    assert __version__ == metadata.version("llmtune-recipes")


def test_data_formats_lists_each_format_with_an_example_that_is_that_format():
    out = CliRunner().invoke(app, ["data", "formats"]).stdout
    blocks = {block.splitlines()[0]: block for block in out.strip().split("\n\n")}
    assert list(blocks) == list(formats.FORMATS)  # the format table, in detection order
    for name, block in blocks.items():
        example = json.loads(block.split("  example:  ")[1].splitlines()[0])
        assert formats.detect(example)[0] == name, name  # `format: auto` reads the example as this format
        _, kind, problems = formats.convert([("example", example)], name)
        assert not problems and f"  becomes:  {formats.describe_kind(kind).replace('_', ' ')}" in block
    assert "  becomes:  conversational prompt completion (prompt, completion)" in blocks["alpaca"]
    assert "  methods:  dpo, orpo, kto, reward" in blocks["preference"]


@pytest.mark.slow  # TRL's training templates, matched against 41 named templates: ~18 s on 2 cores
def test_templates_says_how_each_named_template_is_masked(monkeypatch):
    out = CliRunner().invoke(app, ["templates"]).stdout.splitlines()
    table = dict(line.split(None, 1) for line in out)
    assert list(table) == named_chat_templates()
    assert table["llama3"] == "masked by TRL (its training copy of the template)"
    assert table["llama3_1"] == "masked by llmtune (by rendering each turn)"
    assert table["lfm2_2_5"] == "masked by TRL ({% generation %} markers in the template)"

    # A template that renders an earlier answer differently once a later turn follows cannot be cut into turns.
    import llmtune.data.templates as templates

    rewrites = ("{% for m in messages %}{% if m.role == 'assistant' and not loop.last %}(earlier){% else %}"
                "{{ m.role }}: {{ m.content }}{% endif %}\n{% endfor %}")
    monkeypatch.setattr(templates, "named_chat_templates", lambda: ["rewrites"])
    monkeypatch.setattr(templates, "read_chat_template", lambda name: rewrites)
    [(name, how)] = templates.named_templates()
    assert how.startswith("cannot be masked: the chat template renders assistant turn 2 differently once later "
                          "turns follow"), how
