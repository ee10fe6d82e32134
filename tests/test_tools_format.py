"""Tool-calling rows (`tools`, assistant `tool_calls`, `tool` messages): rendered through each family's own template,
the assistant's calls and answers trained, tool results never; templates without tool support refused with the line."""

import json

import pytest

from llmtune.data import load_data
from llmtune.errors import UserError
from llmtune.recipe.check import resolve
from llmtune.tokenizer import load_tokenizer
from llmtune.tools.inspect import TrainingView

from .conftest import RECIPES, cli, make_recipe, write_jsonl
from .families import family_model
from .test_masking import trained_runs

TOOLS = RECIPES / "data" / "tools.jsonl"
ROWS = [json.loads(line) for line in TOOLS.read_text().splitlines()]
PARIS = 'It is sunny and 21 degrees Celsius in Paris.'
PRODUCT = "17 * 23 = 391."
# Per family whose template renders tools: what each assistant turn of rows 1 and 2 trains, exactly.
LLAMA = {1: ['{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>', f"{PARIS}<|eot_id|>"],
         2: ['{"name": "calculate", "parameters": {"expression": "17 * 23"}}<|eot_id|>', f"{PRODUCT}<|eot_id|>"]}
QWEN_CALLS = {1: '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
              2: '<tool_call>\n{"name": "calculate", "arguments": {"expression": "17 * 23"}}\n</tool_call>'}
ANSWERS = {1: PARIS, 2: PRODUCT}
TRAINED = {
    "llama3_1": LLAMA,
    "llama3_2": LLAMA,
    # TRL's training copies (data/masking.py: TRL marks their turns), as for plain chat rows (test_masking.py).
    "qwen2_5": {n: [f"\n{QWEN_CALLS[n]}<|im_end|>\n", f"\n{ANSWERS[n]}<|im_end|>\n"] for n in (1, 2)},
    "qwen3": {n: [f"<think>\n\n</think>\n\n{QWEN_CALLS[n]}<|im_end|>\n",
                  f"<think>\n\n</think>\n\n{ANSWERS[n]}<|im_end|>\n"] for n in (1, 2)},
}


def view(tmp_path, model, rows=ROWS):
    path = make_recipe(tmp_path, data=write_jsonl(tmp_path / "tools.jsonl", rows), model={"name": str(model)})
    resolved = resolve(path)
    data = load_data(resolved.config["data"], method="sft", seed=0, locate=resolved.locate,
                     model=resolved.config["model"])
    return TrainingView(resolved, load_tokenizer(resolved.config["model"]), data), data


@pytest.mark.parametrize("name", TRAINED)
def test_tool_calls_and_answers_are_trained_and_tool_results_never(tmp_path, tmp_path_factory, name):
    view_, data = view(tmp_path, family_model(tmp_path_factory, name))
    rows = [r for r, _ in view_.rows(data.train)]
    by_question = {row["messages"][-4]["content"]: row for row in rows if len(row["messages"]) >= 4}
    for n, question in ((1, "What's the weather in Paris?"), (2, "What is 17 * 23?")):
        tokens = view_.tokenize([by_question[question]])[0]
        runs = trained_runs(view_.tokenizer, tokens)
        assert runs == TRAINED[name][n], (name, n)
        rendered = view_.tokenizer.decode(tokens["input_ids"])
        tool = by_question[question]["messages"][-2]
        # The tool result and the schemas are in the context (the runs above are all that trains).
        assert tool["role"] == "tool" and tool["content"] in rendered.replace('\\"', '"')
        assert "Get the current weather in a city." in rendered
    # Stored as written: Arrow would have given row 1's arguments the `unit` key of row 4's (null).
    paris = next(r for r in rows if r["messages"][0]["content"] == "What's the weather in Paris?")
    assert paris["messages"][1]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    assert paris["tools"][0]["function"]["name"] == "get_weather" and len(paris["tools"]) == 1


NO_SCHEMAS = "a tool-calling row, but the model's chat template has no tool support: it does not render the row's " \
    "`tools` (no 'get_weather' in the rendering)"


@pytest.mark.parametrize("name, problem", [
    *((name, NO_SCHEMAS) for name in ("llama3", "smollm2", "phi3", "deepseek_r1_distill")),
    # Templates that raise on a `tool` message or on two assistant turns in a row.
    ("mistral", "Conversation roles must alternate"),
    ("mistral_nemo", "After the optional system message, conversation roles must alternate"),
    ("gemma2", "Conversation roles must alternate"),
    ("gemma3", "Conversation roles must alternate"),
])
def test_a_template_without_tool_support_is_refused_with_the_line(tmp_path, tmp_path_factory, name, problem):
    with pytest.raises(UserError) as err:
        view(tmp_path, family_model(tmp_path_factory, name))
    message = str(err.value)
    assert f"{tmp_path / 'tools.jsonl'}:1: " in message and problem in message, message
    assert "no tool support" in message


def test_a_template_that_drops_the_calls_is_refused(tmp_path, tmp_path_factory):
    """Without a `tools` column, SmolLM2's template still renders the turn, but not its call."""
    rows = [{"messages": [m for m in ROWS[0]["messages"] if m["role"] != "tool"][:2] +
             [{"role": "user", "content": "Thanks"}, {"role": "assistant", "content": "You're welcome."}]}]
    with pytest.raises(UserError) as err:
        view(tmp_path, family_model(tmp_path_factory, "smollm2"), rows)
    assert f"{tmp_path / 'tools.jsonl'}:1: a tool-calling row, but the model's chat template has no tool support: it " \
           "drops the tool calls of messages[1] ('get_weather' not rendered)" in str(err.value)


@pytest.mark.slow
def test_validate_refuses_tool_rows_on_a_template_that_raises_on_them(tmp_path, tmp_path_factory):
    """Mistral v0.1/v0.2's template raises on a `tool` message: exit 2, the line, the reason, nothing written."""
    path = make_recipe(tmp_path, data=TOOLS, model={"name": str(family_model(tmp_path_factory, "mistral"))})
    result = cli("validate", path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"{TOOLS}:1: the chat template of '{family_model(tmp_path_factory, 'mistral')}' refuses this conversation " \
           "(roles user, assistant, tool, assistant): Conversation roles must alternate" in result.stderr
    assert "the template has no tool support" in result.stderr


@pytest.mark.parametrize("row, problem", [
    ({"messages": [{"role": "user", "content": "Hi", "tool_calls": [{"function": {"name": "f"}}]},
                   {"role": "assistant", "content": "Hello"}]},
     "'tool_calls' of messages[0] must be a non-empty list on an assistant turn"),
    ({"messages": [{"role": "user", "content": "Hi"},
                   {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{city"}}]}]},
     "the arguments of tool_calls[0] of messages[1] is a string but not JSON"),
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "tool_calls": [{"name": "f"}]}]},
     'tool_calls[0] of messages[1] must be {"type": "function", "function": {"name", "arguments"}}'),
    ({"tools": {"name": "f"}, "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "x"}]},
     "'tools' must be a list (or a JSON string of one), got object"),
    ({"tools": [{"type": "function"}], "messages": [{"role": "user", "content": "Hi"},
                                                    {"role": "assistant", "content": "x"}]},
     'tools[0] must be a JSON schema {"type": "function", "function": {"name", "description", "parameters"}}'),
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "x"},
                   {"role": "tool", "content": "1", "tool_call_id": 7}, {"role": "assistant", "content": "y"}]},
     "'tool_call_id' of messages[2] must be a string, got number"),
])
def test_bad_tool_rows_name_the_line_and_the_field(tmp_path, row, problem):
    path = make_recipe(tmp_path, data=write_jsonl(tmp_path / "bad.jsonl", [row]))
    resolved = resolve(path)
    with pytest.raises(UserError) as err:
        load_data(resolved.config["data"], method="sft", seed=0, locate=resolved.locate)
    assert f"{tmp_path / 'bad.jsonl'}:1: {problem}" in str(err.value)


def test_tools_as_json_text_and_rows_without_tools_mix_in_one_source(tmp_path, tmp_path_factory):
    """A `tools` JSON string (as Hub datasets often store it) is read as the list; a row without tools has none."""
    rows = [{**ROWS[1], "tools": json.dumps(ROWS[1]["tools"])}, {"messages": ROWS[2]["messages"]}]
    view_, data = view(tmp_path, family_model(tmp_path_factory, "llama3_1"), rows)
    assert data.train[0]["tools"] == ROWS[1]["tools"] and data.train[1]["tools"] is None
    first, second = view_.tokenize([r for r, _ in view_.rows(data.train)])
    assert trained_runs(view_.tokenizer, first) == LLAMA[2]
    assert "Environment: ipython" not in view_.tokenizer.decode(second["input_ids"])  # no tool preamble
