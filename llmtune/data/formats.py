"""Data formats: detection from column names, row validation, conversion to TRL's shapes.

Each format turns a row into the columns of one TRL dataset shape and nothing else, so
sources that end in the same shape can be concatenated. A shape is named after TRL's
dataset types ("language_modeling", "prompt_completion", "preference",
"unpaired_preference", "prompt_only"), prefixed with "conversational_" when its values are
lists of ``{role, content}`` messages rather than plain strings.

A converter checks everything it can in a row and appends each problem to ``bad`` (the
caller adds the row's location); it only has to return something sensible when ``bad``
stays empty.
"""

import json
from dataclasses import dataclass
from typing import Callable

from llmtune.data.sources import json_type

# Roles TRL's chat templates understand; `messages` rows must use exactly these.
ROLES = {role: role for role in ("system", "user", "assistant", "tool")}

# ShareGPT speaker names (plus the function-calling ones LLaMA-Factory's variant uses),
# mapped onto the roles above.
SHAREGPT_ROLES = {
    "human": "user",
    "gpt": "assistant",
    "system": "system",
    "user": "user",
    "assistant": "assistant",
    "tool": "tool",
    "function_call": "assistant",
    "observation": "tool",
}


def _text(row, key, bad, *, optional=False):
    """A non-empty string column; None counts as missing because Parquet and Hub tables
    fill a row's absent fields with null."""
    value = row.get(key)
    if value is None:
        if not optional:
            bad.append(f"missing '{key}'")
    elif not isinstance(value, str):
        bad.append(f"'{key}' must be a string, got {json_type(value)}")
    elif not value.strip() and not optional:
        bad.append(f"'{key}' is empty")
    else:
        return value
    return ""


def _chat(value, field, bad, *, roles=ROLES, keys=("role", "content")):
    """A non-empty list of turns, returned as [{role, content}] with roles mapped through `roles`."""
    role_key, content_key = keys
    if not isinstance(value, list):
        bad.append(f"'{field}' must be a list of {{{role_key}, {content_key}}}, got {json_type(value)}")
        return []
    if not value:
        bad.append(f"'{field}' is empty")
    turns = []
    for i, turn in enumerate(value):
        if not isinstance(turn, dict):
            bad.append(f"{field}[{i}] must be an object {{{role_key}, {content_key}}}, got {json_type(turn)}")
            continue
        role, content = turn.get(role_key), turn.get(content_key)
        if role is None:
            bad.append(f"{field}[{i}] has no '{role_key}'")
        elif role not in roles:
            bad.append(f"unknown role {role!r} in {field}[{i}]; expected one of: {', '.join(roles)}")
        calls = _tool_calls(turn, roles.get(role), f"{field}[{i}]", bad)
        if calls and content is None:  # OpenAI's format: a turn that only calls tools has no content
            content = ""
        if not isinstance(content, str):
            bad.append(f"'{content_key}' of {field}[{i}] must be a string, got {json_type(content)}")
        turns.append({"role": roles.get(role), "content": content})
        if calls:
            turns[-1]["tool_calls"] = calls
        for key in TOOL_RESULT_KEYS if roles.get(role) == "tool" else ():
            value = turn.get(key)
            if isinstance(value, str):
                turns[-1][key] = value
            elif value is not None:
                bad.append(f"'{key}' of {field}[{i}] must be a string, got {json_type(value)}")
        reasoning = turn.get("reasoning_content")
        if reasoning is not None:  # the template decides how (and whether) reasoning renders: see data/masking.py
            if roles.get(role) != "assistant" or not isinstance(reasoning, str):
                bad.append(f"'reasoning_content' of {field}[{i}] must be a string on an assistant turn")
            turns[-1]["reasoning_content"] = reasoning
    return turns


# A tool message's link to the call it answers (OpenAI's `tool_call_id`, TRL's and Hermes-style `name`).
TOOL_RESULT_KEYS = ("tool_call_id", "name")
# Message keys of tool use: `to_dataset` stores such conversations as JSON.
TOOL_KEYS = {"tool_calls", *TOOL_RESULT_KEYS}


def _json_value(value, what, bad, kind):
    """`value`, or the `kind` (dict or list) a JSON string of one decodes to; None with a problem otherwise."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as err:
            bad.append(f"{what} is a string but not JSON ({err})")
            return None
    if not isinstance(value, kind):
        bad.append(f"{what} must be {'an object' if kind is dict else 'a list'} (or a JSON string of one), "
                   f"got {json_type(value)}")
        return None
    return value


def _tool_calls(turn, role, where, bad) -> list[dict]:
    """An assistant turn's `tool_calls` in OpenAI's format, arguments as an object (what templates render with
    `tojson`; a JSON string of one is decoded)."""
    calls = turn.get("tool_calls")
    if calls is None:
        return []
    if role != "assistant" or not isinstance(calls, list) or not calls:
        bad.append(f"'tool_calls' of {where} must be a non-empty list on an assistant turn")
        return []
    out = []
    for j, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(name, str) or not name:
            bad.append(f"tool_calls[{j}] of {where} must be {{\"type\": \"function\", \"function\": "
                       "{\"name\", \"arguments\"}}")
            continue
        arguments = _json_value(function.get("arguments", {}), f"the arguments of tool_calls[{j}] of {where}", bad,
                                dict)
        out.append({**call, "type": call.get("type", "function"), "function": {**function, "arguments": arguments}})
    return out


def _tools(row, bad) -> list[dict] | None:
    """A row's `tools`: JSON schemas of the functions its assistant may call (a list, or a JSON string of one)."""
    if row.get("tools") is None:
        return None
    tools = _json_value(row["tools"], "'tools'", bad, list)
    for i, tool in enumerate(tools or []):
        function = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            bad.append(f"tools[{i}] must be a JSON schema {{\"type\": \"function\", \"function\": {{\"name\", "
                       "\"description\", \"parameters\"}}}")
    return tools


def _conversation(row, field, bad, **chat_options):
    """A whole conversation to train on: without an assistant turn there is nothing to learn."""
    if row.get(field) is None:
        bad.append(f"missing '{field}'")
        return []
    turns = _chat(row[field], field, bad, **chat_options)
    if turns and not any(turn["role"] == "assistant" for turn in turns):
        bad.append("conversation has no assistant turn")
    return turns


def _text_or_chat(row, fields, bad):
    """Columns that hold either plain strings or message lists, the same kind in all of them."""
    values = {}
    for field in fields:
        value = row.get(field)
        values[field] = _chat(value, field, bad) if isinstance(value, list) else _text(row, field, bad)
    kinds = {isinstance(row[field], list) for field in fields if row.get(field) is not None}
    if len(kinds) > 1:
        named = " and ".join(f"'{field}'" for field in fields)
        bad.append(f"{named} must be all strings or all message lists")
    return values


def _messages(row, bad):
    tools = _tools(row, bad)
    return {"messages": _conversation(row, "messages", bad), **({"tools": tools} if tools is not None else {})}


def _sharegpt(row, bad):
    return {"messages": _conversation(row, "conversations", bad, roles=SHAREGPT_ROLES, keys=("from", "value"))}


def _alpaca(row, bad):
    instruction = _text(row, "instruction", bad)
    extra_input = _text(row, "input", bad, optional=True)
    system = _text(row, "system", bad, optional=True)
    output = _text(row, "output", bad)
    user = f"{instruction}\n\n{extra_input}" if extra_input else instruction
    prompt = [{"role": "system", "content": system}] if system else []
    prompt.append({"role": "user", "content": user})
    return {"prompt": prompt, "completion": [{"role": "assistant", "content": output}]}


def _prompt_completion(row, bad):
    return _text_or_chat(row, ("prompt", "completion"), bad)


def _text_row(row, bad):
    return {"text": _text(row, "text", bad)}


def _preference(row, bad):
    # Without a prompt column the prompt is implicit in chosen/rejected; TRL's trainers
    # extract it themselves, so both layouts pass through.
    fields = ("prompt", "chosen", "rejected") if row.get("prompt") is not None else ("chosen", "rejected")
    values = _text_or_chat(row, fields, bad)
    if not bad and values["chosen"] == values["rejected"]:
        bad.append("'chosen' and 'rejected' are identical")
    scores = [row.get(key) for key in ("score_chosen", "score_rejected")]
    if scores != [None, None]:
        # TRL's RewardTrainer reads a `margin` column: chosen must outscore rejected by at least that much.
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in scores):
            bad.append(f"'score_chosen' and 'score_rejected' must both be numbers, got {json_type(scores[0])} "
                       f"and {json_type(scores[1])}")
        else:
            values["margin"] = float(scores[0] - scores[1])
    return values


def _kto(row, bad):
    values = _text_or_chat(row, ("prompt", "completion"), bad)
    label = row.get("label")
    if label is None:
        bad.append("missing 'label'")
    elif not isinstance(label, bool):
        bad.append(f"'label' must be true or false, got {label!r}")
    return {**values, "label": label}


def _prompt(row, bad):
    return _text_or_chat(row, ("prompt",), bad)


@dataclass(frozen=True)
class Format:
    needs: tuple[str, ...]  # columns that identify the format; every row must have them
    shape: str  # TRL shape, without the "conversational_" prefix
    convert: Callable[[dict, list], dict]
    example: dict  # one row, for `llmtune data formats` (a test converts each)
    optional: tuple[str, ...] = ()
    excludes: tuple[str, ...] = ()  # columns that mean the data is another format
    strings_or_messages: bool = False  # its values may be strings (plain) or message lists (conversational)


_USER = {"role": "user", "content": "What is 2+2?"}
_ANSWER = {"role": "assistant", "content": "4"}
# In detection order: the first format whose columns are all present wins.
_FORMATS = {
    "messages": Format(("messages",), "language_modeling", _messages,
                       {"messages": [{"role": "system", "content": "Answer briefly."}, _USER, _ANSWER]},
                       optional=("tools",)),
    "sharegpt": Format(("conversations",), "language_modeling", _sharegpt,
                       {"conversations": [{"from": "human", "value": "What is 2+2?"}, {"from": "gpt", "value": "4"}]}),
    "alpaca": Format(("instruction", "output"), "prompt_completion", _alpaca,
                     {"instruction": "Add the numbers.", "input": "2 and 2", "output": "4"},
                     optional=("input", "system")),
    "prompt_completion": Format(("prompt", "completion"), "prompt_completion", _prompt_completion,
                                {"prompt": "2+2=", "completion": "4"}, excludes=("label",), strings_or_messages=True),
    "text": Format(("text",), "language_modeling", _text_row, {"text": "Two plus two is four."}),
    "preference": Format(("chosen", "rejected"), "preference", _preference,
                         {"prompt": [_USER], "chosen": [_ANSWER], "rejected": [{"role": "assistant", "content": "5"}]},
                         optional=("prompt", "score_chosen", "score_rejected"), strings_or_messages=True),
    "kto": Format(("prompt", "completion", "label"), "unpaired_preference", _kto,
                  {"prompt": "2+2=", "completion": "5", "label": False}, strings_or_messages=True),
    # A prompt next to half a pair or triple is broken preference/KTO data, not prompts.
    "prompt": Format(("prompt",), "prompt_only", _prompt, {"prompt": [_USER]},
                     excludes=("completion", "chosen", "rejected", "label"), strings_or_messages=True),
}

FORMATS = tuple(_FORMATS)


def _quoted(columns):
    return ", ".join(f"'{column}'" for column in columns)


def detect(columns):
    """The format of rows with these columns and why, or None when none fits."""
    name = _detected(columns)
    return name and (name, detected_by(name))


def _detected(columns):
    present = set(columns)
    return next((name for name, fmt in _FORMATS.items()
                 if present.issuperset(fmt.needs) and not present.intersection(fmt.excludes)), None)


def detected_by(name):
    """Why `detect` picks format `name`: the columns that identify it."""
    needs = _FORMATS[name].needs
    return f"column{'s' if len(needs) > 1 else ''} {_quoted(needs)} found"


def row_format(row):
    """The format one row's own columns show, or None: a null or empty value is no column (Parquet and Hub tables
    give every row every column, null where it has none; CSV an empty cell)."""
    return _detected([name for name, value in row.items() if value is not None and value != ""])


def foreign(shown, fmt):
    """Whether a row whose own columns show format `shown` (`row_format`'s name, or None) is of another format than
    `fmt`. A row that is only an `fmt` row lacking something (a kto row without its `label` shows
    prompt_completion; an alpaca row with an empty `instruction`, no format) is `fmt`'s: its converter names what
    is missing."""
    if shown is None or shown == fmt:
        return False
    return not set(_FORMATS[shown].needs).issubset(_FORMATS[fmt].needs + _FORMATS[fmt].optional)


def stray_row(other, fmt, path, among):
    """Why a row of format `other` cannot sit among the `fmt` rows of the source `path` (`among`: which rows those
    are), and the fixes."""
    return (f"this row's columns ({_quoted(_FORMATS[other].needs)}) make it {other} data, but {path} holds {fmt} "
            f"rows ({among}); one source holds one format: move the {other} rows into a file of their own (a "
            f"`data.train` entry of its own), or set `format: {fmt}` on this source (with `columns: {{old: new}}` to "
            f"rename) to read every row as {fmt}")


def describe_formats():
    """One line per format with the columns it needs, for a 'matches no format' error."""
    lines = []
    for name, fmt in _FORMATS.items():
        optional = f" (optional: {', '.join(fmt.optional)})" if fmt.optional else ""
        lines.append(f"  {name}: {', '.join(fmt.needs)}{optional}")
    return "\n".join(lines)


def format_table(methods) -> list[str]:
    """`llmtune data formats`: per format its columns, an example row, what the example becomes (converted here,
    as training converts it) and the methods (name -> Method) that train on it."""
    lines = []
    for name, fmt in _FORMATS.items():
        _, kind, _ = convert([("example", fmt.example)], name)
        users = [m for m, method in methods.items() if name in method.formats]
        either = "; its values may be strings (plain) or message lists (conversational)" if fmt.strings_or_messages \
            else ""
        lines += [name, f"  columns:  {', '.join(fmt.needs)}"
                  + (f" (optional: {', '.join(fmt.optional)})" if fmt.optional else ""),
                  f"  example:  {json.dumps(fmt.example)}",
                  f"  becomes:  {describe_kind(kind).replace('_', ' ')}{either}",
                  f"  methods:  {', '.join(users)}", ""]
    return lines[:-1]


def missing_columns(fmt, columns):
    return [column for column in _FORMATS[fmt].needs if column not in columns]


def describe_kind(kind):
    shape, columns = kind
    return f"{shape} ({', '.join(columns)})"


# Columns a row may have or not, whatever its kind: a conversation's own tools.
ROW_EXTRAS = ("tools",)


def convert(rows, fmt):
    """Validate and convert located rows to `fmt`'s shape.

    Returns the converted rows, their kind ``(shape, columns)`` and the problems found,
    each prefixed with its row's location. All rows of one source must share a kind.
    """
    converter = Converter(fmt)
    converted, problems = [], []
    for where, row in rows:
        out, bad = converter.row(where, row)
        problems += bad
        if out is not None:
            converted.append(out)
    return converted, converter.kind, problems


class Converter:
    """`convert` one row at a time, remembering the first good row's kind (a source read as a stream)."""

    def __init__(self, fmt):
        self.name, self.spec = fmt, _FORMATS[fmt]
        self.first = None  # (kind, where) of the first good row

    @property
    def kind(self):
        return self.first[0] if self.first else None

    def row(self, where, row):
        """(converted row or None, problems of the row)."""
        bad = []
        out = self.spec.convert(row, bad)
        if not bad:
            conversational = any(isinstance(value, list) for value in out.values())
            columns = tuple(column for column in out if column not in ROW_EXTRAS)
            kind = (("conversational_" if conversational else "") + self.spec.shape, columns)
            if self.first is None:
                self.first = (kind, where)
            elif kind != self.first[0]:
                bad.append(
                    f"row is {describe_kind(kind)} but {self.first[1]} is {describe_kind(self.first[0])}; "
                    "one source must hold one kind of row"
                )
        return (None if bad else out), [f"{where}: {problem}" for problem in bad]


# Chat data may mix whole conversations with conversational prompt-completion rows
# (alpaca): the latter then become conversations too, prompt turns followed by completion.
_MESSAGES = ("conversational_language_modeling", ("messages",))
_CHAT_PAIRS = ("conversational_prompt_completion", ("prompt", "completion"))


def common_kind(kinds):
    """The kind every source can be brought to, or None when they cannot be mixed."""
    distinct = set(kinds)
    if distinct == {_MESSAGES, _CHAT_PAIRS}:
        return _MESSAGES
    return distinct.pop() if len(distinct) == 1 else None


def to_kind(rows, kind, target):
    if kind == _CHAT_PAIRS and target == _MESSAGES:
        return [{"messages": row["prompt"] + row["completion"]} for row in rows]
    return rows


def to_dataset(rows):
    """`rows` as a `datasets.Dataset`. Tool-calling conversations are stored one JSON value per message and per
    `tools` list: Arrow would give every row's arguments and schemas the union of all their keys, filled with nulls
    that a template's `tojson` would render (and train)."""
    import datasets

    if not any(ROW_EXTRAS[0] in row or any(TOOL_KEYS.intersection(m) for m in row.get("messages", ()))
               for row in rows):
        return datasets.Dataset.from_list(rows)
    rows = [{**row, "tools": row.get("tools")} for row in rows]  # from_list takes its columns from the first row
    return datasets.Dataset.from_list(rows, features=datasets.Features(
        {"messages": datasets.List(datasets.Json()), "tools": datasets.Json()}))
