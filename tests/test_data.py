"""llmtune.data: reading sources, format detection, row checks, conversion, mixing, eval."""

import hashlib
import json
import subprocess
import sys

import pytest

from llmtune.data import load_data
from llmtune.errors import UserError
from llmtune.verbs import METHODS

from .conftest import write_jsonl

CHAT = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]


def locate(key):
    """Stands in for the recipe loader: names a key the way `recipe.yaml:LINE:COL` would."""
    return "recipe.yaml@" + ".".join(map(str, key))


def load(*sources, method="sft", seed=0, eval=None):
    """load_data on sources given as paths or source dicts (the schema's defaults filled in)."""
    train = [{"path": str(s)} if not isinstance(s, dict) else {**s, "path": str(s["path"])} for s in sources]
    return load_data({"train": train, "eval": eval}, method=method, seed=seed, locate=locate)


def problems(*sources, **options):
    with pytest.raises(UserError) as caught:
        load(*sources, **options)
    return caught.value.problems


def numbered(tmp_path, count, name="n.jsonl"):
    """A text file of `count` rows whose text is the row number, to track rows through mixing."""
    return write_jsonl(tmp_path / name, [{"text": f"{name}:{i}"} for i in range(count)])


# Detection and conversion of each SFT format


@pytest.mark.parametrize(
    "row, fmt, reason, shape",
    [
        ({"messages": CHAT}, "messages", "column 'messages' found", "conversational_language_modeling"),
        (
            {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]},
            "sharegpt",
            "column 'conversations' found",
            "conversational_language_modeling",
        ),
        (
            {"instruction": "Add", "input": "1+1", "output": "2"},
            "alpaca",
            "columns 'instruction', 'output' found",
            "conversational_prompt_completion",
        ),
        (
            {"prompt": "The sky is", "completion": " blue."},
            "prompt_completion",
            "columns 'prompt', 'completion' found",
            "prompt_completion",
        ),
        (
            {"prompt": CHAT[:1], "completion": CHAT[1:]},
            "prompt_completion",
            "columns 'prompt', 'completion' found",
            "conversational_prompt_completion",
        ),
        ({"text": "Once upon a time", "id": 7}, "text", "column 'text' found", "language_modeling"),
    ],
)
def test_each_sft_format_is_detected_from_its_columns(tmp_path, row, fmt, reason, shape):
    data = load(write_jsonl(tmp_path / "d.jsonl", [row]))

    (source,) = data.sources
    assert (source.format, source.reason, data.shape) == (fmt, reason, shape)


def test_messages_keep_only_role_and_content_and_drop_other_columns(tmp_path):
    chat = [{"role": "system", "content": "Be brief.", "weight": 0}, *CHAT]
    data = load(write_jsonl(tmp_path / "m.jsonl", [{"messages": chat, "id": 1}]))

    assert data.train.column_names == ["messages"]
    assert data.train[0] == {"messages": [{"role": "system", "content": "Be brief."}, *CHAT]}


def test_sharegpt_becomes_messages_with_standard_roles(tmp_path):
    conversation = [
        {"from": "system", "value": "Be brief."},
        {"from": "human", "value": "Hi"},
        {"from": "gpt", "value": "Hello!"},
    ]
    data = load(write_jsonl(tmp_path / "s.jsonl", [{"conversations": conversation, "source": "x"}]))

    assert data.train.to_list() == [{"messages": [{"role": "system", "content": "Be brief."}, *CHAT]}]


def test_alpaca_becomes_conversational_prompt_completion(tmp_path):
    rows = [
        {"instruction": "Add the numbers.", "input": "1 + 1", "output": "2"},
        {"instruction": "Say hi.", "input": "", "output": "Hi!"},
        {"instruction": "Say hi.", "output": "Hi!", "system": "You are terse."},
    ]
    # Three sources of one row each, so the shuffle cannot change which row is which.
    data = load(*(write_jsonl(tmp_path / f"a{i}.jsonl", [row]) for i, row in enumerate(rows)))

    assert sorted(data.train.to_list(), key=str) == sorted(
        [
            {
                "prompt": [{"role": "user", "content": "Add the numbers.\n\n1 + 1"}],
                "completion": [{"role": "assistant", "content": "2"}],
            },
            {
                "prompt": [{"role": "user", "content": "Say hi."}],
                "completion": [{"role": "assistant", "content": "Hi!"}],
            },
            {
                "prompt": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hi."}],
                "completion": [{"role": "assistant", "content": "Hi!"}],
            },
        ],
        key=str,
    )


def test_plain_prompt_completion_and_text_are_kept_as_they_are(tmp_path):
    pairs = load(write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "The sky is", "completion": " blue.", "x": 1}]))
    text = load(write_jsonl(tmp_path / "t.jsonl", [{"text": "Once upon a time"}]))

    assert pairs.train.to_list() == [{"prompt": "The sky is", "completion": " blue."}]
    assert text.train.to_list() == [{"text": "Once upon a time"}]


def test_columns_renames_before_detection(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"question": "2+2?", "answer": "4"}])

    data = load({"path": path, "columns": {"question": "instruction", "answer": "output"}})

    assert data.sources[0].format == "alpaca"
    assert data.train[0]["completion"] == [{"role": "assistant", "content": "4"}]


def test_renaming_a_column_the_data_lacks_lists_the_columns_found(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"q": "2+2?", "a": "4"}])

    with pytest.raises(UserError, match=r"^recipe.yaml@data.train.0.columns: no column 'question' in .*qa.jsonl "
                                        r"to rename; columns found: q, a$"):
        load({"path": path, "columns": {"question": "instruction", "a": "output"}})


def test_forced_format_skips_detection_but_checks_rows(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "fine"}, {"text": ""}])

    assert problems({"path": path, "format": "text"}) == [f"{path}:2: 'text' is empty"]
    forced = load({"path": write_jsonl(tmp_path / "ok.jsonl", [{"text": "fine", "messages": 1}]), "format": "text"})
    assert (forced.sources[0].format, forced.sources[0].reason) == ("text", "forced by format:")


def test_forced_format_missing_its_columns_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "hi"}])

    assert problems({"path": path, "format": "alpaca"}) == [
        f"{path}: format 'alpaca' needs column(s) instruction, output; columns found: text"
    ]


def test_columns_matching_no_format_list_the_columns_and_every_format(tmp_path):
    path = write_jsonl(tmp_path / "odd.jsonl", [{"question": "?", "reply": "!"}])

    (problem,) = problems(path)
    assert problem.startswith(f"{path}: columns question, reply match no data format")
    assert "  alpaca: instruction, output (optional: input, system)" in problem
    assert "  preference: chosen, rejected (optional: prompt, score_chosen, score_rejected)" in problem
    assert "  kto: prompt, completion, label" in problem


def stray(path, row, other, columns, fmt, kept, first):
    """The refusal of a row of format `other` among the `fmt` rows of the source `path`."""
    return (f"{row}: this row's columns ({columns}) make it {other} data, but {path} holds {fmt} rows ({kept} rows "
            f"read, the first at {first}); one source holds one format: move the {other} rows into a file "
            f"of their own (a `data.train` entry of its own), or set `format: {fmt}` on this source (with `columns: "
            f"{{old: new}}` to rename) to read every row as {fmt}")


def test_a_stray_row_of_another_format_is_refused_at_its_line_not_taken_for_the_file_format(tmp_path):
    chat = [{"messages": CHAT}] * 9
    path = write_jsonl(tmp_path / "chat.jsonl", chat[:4] + [{"prompt": "a", "completion": "b"}] + chat[4:])
    assert problems(path) == [stray(path, f"{path}:5", "prompt_completion", "'prompt', 'completion'", "messages",
                                    "9 of the 10", f"{path}:1")]
    # The file's format is its most rows' format, wherever the first row of another one is.
    alpaca = [{"instruction": "Add", "output": "2"}] * 3
    path = write_jsonl(tmp_path / "alpaca.jsonl", [{"messages": CHAT}] + alpaca + [{"messages": CHAT}])
    assert problems(path) == [stray(path, f"{path}:1", "messages", "'messages'", "alpaca", "3 of the 5", f"{path}:2")]
    # A stray row once made the whole file a format the method cannot train (prompt_completion rows, one with a label).
    pairs = [{"prompt": "a", "completion": "b"}] * 3
    path = write_jsonl(tmp_path / "pc.jsonl", pairs + [{"prompt": "a", "completion": "b", "label": True}])
    assert problems(path) == [stray(path, f"{path}:4", "kto", "'prompt', 'completion', 'label'", "prompt_completion",
                                    "3 of the 4", f"{path}:1")]


def test_rows_of_one_format_may_differ_in_optional_and_null_columns(tmp_path):
    import pyarrow
    import pyarrow.parquet

    alpaca = load(write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Add", "output": "2", "system": "Be brief."},
                                                     {"instruction": "Sub", "input": "3 1", "output": "2"},
                                                     {"instruction": "Say", "input": "", "output": "hi"}]))
    assert alpaca.sources[0].format == "alpaca" and alpaca.sources[0].rows == 3
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    chat = load(write_jsonl(tmp_path / "c.jsonl", [{"messages": CHAT, "tools": [tool]}, {"messages": CHAT}]))
    assert chat.sources[0].format == "messages" and chat.sources[0].rows == 2
    # Parquet gives every row every column: null where a row has none (here a `messages` column, set in no row).
    rows = [{"instruction": "Add", "output": "2", "system": "Be brief.", "messages": None},
            {"instruction": "Sub", "output": "1", "system": None, "messages": None}]
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), tmp_path / "p.parquet")
    table = load(tmp_path / "p.parquet")
    assert table.sources[0].format == "alpaca" and table.sources[0].rows == 2
    # A row lacking a column of the file's format is one of its rows, refused for what it lacks.
    kto = [{"prompt": "a", "completion": "b", "label": True}] * 2
    path = write_jsonl(tmp_path / "k.jsonl", kto + [{"prompt": "a", "completion": "b"}])
    assert problems(path, method="kto") == [f"{path}:3: missing 'label'"]
    path = write_jsonl(tmp_path / "e.jsonl", [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": ""}])
    assert problems(path) == [f"{path}:2: 'completion' is empty"]


def test_a_csv_row_of_another_format_is_refused_at_its_line(tmp_path):
    path = tmp_path / "d.csv"  # CSV gives every row every column: an empty cell where a row has none
    path.write_text("text,instruction,output\nfirst,,\nsecond,,\n,Add,2\nthird,,\n")
    assert problems(path) == [stray(path, f"{path}:4", "alpaca", "'instruction', 'output'", "text", "3 of the 4",
                                    f"{path}:2")]


def test_a_forced_format_reads_every_row_as_it(tmp_path):
    pairs = [{"prompt": "a", "completion": "b"}] * 2 + [{"prompt": "c", "completion": "d", "label": False}]
    forced = load({"path": write_jsonl(tmp_path / "pc.jsonl", pairs), "format": "prompt_completion"})
    assert forced.sources[0].format == "prompt_completion" and forced.train.column_names == ["prompt", "completion"]
    assert sorted(forced.train["prompt"]) == ["a", "a", "c"]


# Reading files, and where problems are reported


def test_json_syntax_error_names_its_line(tmp_path):
    lines = [json.dumps({"text": f"row {i}"}) for i in range(40)]
    lines[36] = '{"text": "row 36",}'
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")

    assert problems(path) == [f"{path}:37: invalid JSON: Expecting property name enclosed in double quotes (column 19)"]


def test_blank_lines_are_skipped_but_counted(tmp_path):
    path = tmp_path / "gaps.jsonl"
    path.write_text('{"text": "a"}\n\n\n[1]\n{"text": "b"}\n')

    assert problems(path) == [f"{path}:4: expected a JSON object, got array"]


def test_bad_messages_are_all_reported_with_their_lines(tmp_path):
    rows = [
        {"messages": CHAT},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "user", "content": "again"}]},
        {"messages": CHAT},
        {"messages": [*CHAT, {"role": "bot", "content": 3}]},
        {"messages": []},
    ]
    path = write_jsonl(tmp_path / "chat.jsonl", rows)

    assert problems(path) == [
        f"{path}:2: conversation has no assistant turn",
        f"{path}:4: unknown role 'bot' in messages[2]; expected one of: system, user, assistant, tool",
        f"{path}:4: 'content' of messages[2] must be a string, got number",
        f"{path}:5: 'messages' is empty",
    ]


def test_sharegpt_unknown_speaker_is_reported(tmp_path):
    path = write_jsonl(tmp_path / "s.jsonl", [{"conversations": [{"from": "bot", "value": "Hi"}]}])

    (problem, no_answer) = problems(path)
    assert problem.startswith(f"{path}:1: unknown role 'bot' in conversations[0]; expected one of: human, gpt,")
    assert no_answer == f"{path}:1: conversation has no assistant turn"


def test_alpaca_empty_output_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Say hi.", "output": ""}])

    assert problems(path) == [f"{path}:1: 'output' is empty"]


def test_plain_and_chat_rows_cannot_share_a_source(tmp_path):
    path = write_jsonl(
        tmp_path / "pc.jsonl",
        [
            {"prompt": "a", "completion": "b"},
            {"prompt": CHAT[:1], "completion": CHAT[1:]},
            {"prompt": "a", "completion": CHAT},
        ],
    )

    assert problems(path) == [
        f"{path}:2: row is conversational_prompt_completion (prompt, completion) but {path}:1 is "
        "prompt_completion (prompt, completion); one source must hold one kind of row",
        f"{path}:3: 'prompt' and 'completion' must be all strings or all message lists",
    ]


def test_problems_are_capped_per_source(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": ""}] * 25)

    found = problems(path)
    assert len(found) == 21
    assert found[-1] == f"... and 5 more problems in {path}"


def test_empty_file_is_an_error_naming_it(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "blank.jsonl").write_text("\n\n")
    (tmp_path / "header.csv").write_text("instruction,output\n")

    for name in ("empty.jsonl", "blank.jsonl", "header.csv"):
        assert problems(tmp_path / name) == [f"{tmp_path / name}: file has no rows; add rows to it or remove it "
                                             "from `data:`"]


def test_missing_file_is_an_error_at_its_recipe_line(tmp_path):
    found = "; a relative path in a recipe is relative to the recipe's folder"
    assert problems("data/chat.jsonl") == [f"recipe.yaml@data.train.0.path: data file 'data/chat.jsonl' not found{found}"]
    assert problems("./data") == [f"recipe.yaml@data.train.0.path: data file './data' not found{found}"]
    assert problems("/dev/null") == [
        "recipe.yaml@data.train.0.path: cannot read '/dev/null': it is neither a file nor a folder"]
    assert problems(f"{tmp_path}/*.jsonl") == [
        f"recipe.yaml@data.train.0.path: no .jsonl, .json, .csv, .parquet files match '{tmp_path}/*.jsonl'"
    ]


def test_problems_of_every_source_come_in_one_error(tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": 1}])

    assert problems("gone.jsonl", bad, {"path": bad, "format": "messages"}) == [
        "recipe.yaml@data.train.0.path: data file 'gone.jsonl' not found; a relative path in a recipe is relative "
        "to the recipe's folder",
        f"{bad}:1: 'text' must be a string, got number",
        f"{bad}: format 'messages' needs column(s) messages; columns found: text",
    ]


def test_csv_rows_are_read_with_their_line_numbers(tmp_path):
    path = tmp_path / "qa.csv"
    path.write_text('instruction,input,output\nAdd,"1\n+ 1",2\n\nSay hi.,,\nSpell it,x\n')

    # Problems reading the file come before problems with the rows read.
    assert problems(path) == [f"{path}:6: 2 fields, but the header has 3; quote fields that hold commas or line "
                              "breaks", f"{path}:5: 'output' is empty"]
    path.write_text('instruction,input,output\nAdd,"1\n+ 1",2\n')
    assert load(path).train[0]["prompt"] == [{"role": "user", "content": "Add\n\n1\n+ 1"}]


def test_json_and_parquet_files_are_read(tmp_path):
    import pyarrow
    import pyarrow.parquet

    rows = [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"}]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), tmp_path / "d.parquet")

    for name in ("d.json", "d.parquet"):
        data = load(tmp_path / name)
        assert sorted(data.train.to_list(), key=str) == rows
        assert data.sources[0].format == "prompt_completion"


def test_json_and_parquet_problems_name_the_row_index(tmp_path):
    import pyarrow
    import pyarrow.parquet

    rows = [{"text": "a"}, {"text": None}]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), tmp_path / "d.parquet")
    (tmp_path / "list.json").write_text('{"text": "a"}')
    (tmp_path / "syntax.json").write_text('[\n  {"text": "a"},\n  {"text" "b"}\n]')

    assert problems(tmp_path / "d.json") == [f"{tmp_path}/d.json: row 1: missing 'text'"]
    assert problems(tmp_path / "d.parquet") == [f"{tmp_path}/d.parquet: row 1: missing 'text'"]
    assert problems(tmp_path / "list.json")[0].startswith(f"{tmp_path}/list.json: expected a JSON array of objects")
    assert problems(tmp_path / "syntax.json") == [
        f"{tmp_path}/syntax.json:3: invalid JSON: Expecting ':' delimiter (column 11)"
    ]


def test_folder_and_glob_read_every_supported_file_in_order(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    write_jsonl(folder / "b.jsonl", [{"text": "b"}])
    write_jsonl(folder / "a.jsonl", [{"text": "a"}])
    (folder / "c.csv").write_text("text\nc\n")
    (folder / "notes.txt").write_text("not data")

    by_folder = load(folder)
    by_glob = load(f"{folder}/*.jsonl")

    assert sorted(by_folder.train["text"]) == ["a", "b", "c"]
    assert by_folder.sources[0].files == [f"{folder}/a.jsonl", f"{folder}/b.jsonl", f"{folder}/c.csv"]
    assert by_glob.sources[0].files == [f"{folder}/a.jsonl", f"{folder}/b.jsonl"]
    expected = hashlib.sha256((folder / "a.jsonl").read_bytes() + (folder / "b.jsonl").read_bytes()).hexdigest()
    assert by_glob.sources[0].sha256 == expected
    assert (by_glob.sources[0].rows, by_glob.sources[0].revision) == (2, None)


def test_a_single_file_hash_equals_sha256sum(tmp_path):
    path = numbered(tmp_path, 3)

    assert load(path).sources[0].sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_hub_id_loads_the_split_at_a_pinned_commit(tmp_path, monkeypatch):
    import datasets
    import huggingface_hub

    calls = []

    def dataset_info(self, repo_id, revision=None):
        calls.append(("info", repo_id, revision))
        return huggingface_hub.hf_api.DatasetInfo(id=repo_id, sha="c0ffee")

    def load_dataset(path, name=None, split=None, revision=None):
        calls.append(("load", path, name, split, revision))
        return datasets.Dataset.from_list([{"text": "from the hub"}])

    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", dataset_info)
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)

    data = load({"path": "org/name", "split": "test", "revision": "v1", "name": "en"})

    assert calls == [("info", "org/name", "v1"), ("load", "org/name", "en", "test", "c0ffee")]
    (source,) = data.sources
    assert (source.revision, source.sha256, source.files, source.rows) == ("c0ffee", None, [], 1)


# Methods and shapes


def test_method_rejects_a_format_it_cannot_train_on(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "Q", "chosen": "good", "rejected": "bad"}])

    assert problems(path) == [
        f"{path}: method 'sft' cannot train on 'preference' data; it needs one of: "
        "messages, sharegpt, alpaca, prompt_completion, text"
    ]


def test_messages_mixed_with_alpaca_become_messages(tmp_path):
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}])
    alpaca = write_jsonl(tmp_path / "alpaca.jsonl", [{"instruction": "Say hi.", "output": "Hi!"}])

    data = load(chat, alpaca)

    assert data.shape == "conversational_language_modeling"
    assert data.train.column_names == ["messages"]
    assert sorted(data.train.to_list(), key=str) == sorted(
        [
            {"messages": CHAT},
            {"messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi!"}]},
        ],
        key=str,
    )


def test_sources_of_other_shapes_cannot_be_mixed(tmp_path):
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}])
    text = write_jsonl(tmp_path / "text.jsonl", [{"text": "plain"}])

    assert problems(chat, text) == [
        f"recipe.yaml@data.train: data sources of different shapes cannot be mixed: "
        f"{chat} is conversational_language_modeling (messages), {text} is language_modeling (text)"
    ]


def test_preference_data_for_dpo(tmp_path):
    rows = [
        {"prompt": "Q", "chosen": "good", "rejected": "bad"},
        {"prompt": "Q", "chosen": "good"},
        {"prompt": "Q", "chosen": "same", "rejected": "same"},
    ]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)

    assert problems(path, method="dpo") == [
        f"{path}:2: missing 'rejected'",
        f"{path}:3: 'chosen' and 'rejected' are identical",
    ]
    implicit = load(write_jsonl(tmp_path / "implicit.jsonl", [{"chosen": CHAT, "rejected": CHAT[:1]}]), method="dpo")
    assert (implicit.shape, implicit.train.column_names) == ("conversational_preference", ["chosen", "rejected"])


def test_kto_label_must_be_a_boolean(tmp_path):
    rows = [
        {"prompt": "Q", "completion": "A", "label": True},
        {"prompt": "Q", "completion": "A", "label": "true"},
        {"prompt": "Q", "completion": "A", "label": 1},
    ]
    path = write_jsonl(tmp_path / "kto.jsonl", rows)

    assert problems(path, method="kto") == [
        f"{path}:2: 'label' must be true or false, got 'true'",
        f"{path}:3: 'label' must be true or false, got 1",
    ]
    good = load(write_jsonl(tmp_path / "ok.jsonl", rows[:1]), method="kto")
    assert (good.shape, good.train.to_list()) == ("unpaired_preference", rows[:1])


def test_kto_also_takes_paired_preference_data(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "Q", "chosen": "good", "rejected": "bad"}])

    assert load(path, method="kto").shape == "preference"


def test_prompts_for_rl_methods(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": CHAT[:1], "answer": "42"}])

    data = load(path, method="grpo")

    assert (data.sources[0].format, data.shape, data.train.to_list()) == (
        "prompt", "conversational_prompt_only", [{"prompt": CHAT[:1]}]
    )
    assert METHODS["ppo"].formats == ("prompt",)


def test_a_prompt_beside_half_a_pair_matches_no_format(tmp_path):
    path = write_jsonl(tmp_path / "half.jsonl", [{"prompt": "Q", "chosen": "good"}])

    assert problems(path, method="dpo")[0].startswith(f"{path}: columns prompt, chosen match no data format")


# Mixing, weights and eval


def test_weights_scale_each_source(tmp_path):
    half = numbered(tmp_path, 10, "half.jsonl")
    twice = numbered(tmp_path, 10, "twice.jsonl")
    more = numbered(tmp_path, 10, "more.jsonl")

    data = load({"path": half, "weight": 0.5}, {"path": twice, "weight": 2.0}, {"path": more, "weight": 1.5})

    assert [(s.rows, s.used) for s in data.sources] == [(10, 5), (10, 20), (10, 15)]
    texts = data.train["text"]
    assert len(texts) == 40
    assert len({t for t in texts if t.startswith("half")}) == 5  # a sample, no repeats
    assert all(texts.count(f"twice.jsonl:{i}") == 2 for i in range(10))
    assert sorted(texts.count(f"more.jsonl:{i}") for i in range(10)) == [1] * 5 + [2] * 5


def test_mixing_is_deterministic_for_a_seed(tmp_path):
    sources = ({"path": numbered(tmp_path, 20, "a.jsonl"), "weight": 0.5}, numbered(tmp_path, 20, "b.jsonl"))

    first, again, other = (load(*sources, seed=seed, eval=0.2) for seed in (1, 1, 2))

    assert first.train.to_list() == again.train.to_list()
    assert first.eval.to_list() == again.eval.to_list()
    assert first.train.to_list() != other.train.to_list()


def test_eval_fraction_holds_out_rows_before_weighting(tmp_path):
    path = numbered(tmp_path, 100)

    data = load({"path": path, "weight": 2.0}, eval=0.1)

    assert (len(data.train), len(data.eval)) == (180, 10)
    assert data.sources[0].used == 180
    assert not set(data.eval["text"]) & set(data.train["text"])


def test_eval_fraction_takes_at_least_one_row(tmp_path):
    data = load(numbered(tmp_path, 3), eval=0.01)

    assert (len(data.train), len(data.eval)) == (2, 1)
    assert problems(numbered(tmp_path, 1, "one.jsonl"), eval=0.1) == [
        "recipe.yaml@data.eval: `eval: 0.1` holds out training rows, but there is only 1; add data or set `eval: 0`"
    ]


def test_no_eval_set_for_zero_or_none(tmp_path):
    path = numbered(tmp_path, 4)

    assert load(path, eval=0).eval is None
    assert load(path, eval=None).eval is None


def test_eval_sources_are_loaded_like_train(tmp_path):
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}] * 20)
    held = write_jsonl(tmp_path / "eval.jsonl", [{"instruction": "Say hi.", "output": "Hi!"}] * 3)

    data = load_data({"train": [{"path": str(chat)}], "eval": [{"path": str(held)}]}, method="sft", seed=0)

    assert (len(data.train), len(data.eval), data.shape) == (20, 3, "conversational_language_modeling")
    assert data.eval.column_names == ["messages"]
    assert [s.path for s in data.sources] == [str(chat), str(held)]


def test_a_small_training_set_is_a_warning(tmp_path):
    assert load(numbered(tmp_path, 15)).warnings == [
        "the training set has 15 row(s), fewer than 16: the model will learn little from it"
    ]
    assert load(numbered(tmp_path, 16, "enough.jsonl")).warnings == []


def test_importing_llmtune_data_imports_no_ml_library():
    code = "import sys, llmtune.data; print(sorted({'torch', 'transformers', 'trl', 'datasets'} & set(sys.modules)))"

    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)

    assert result.stdout.strip() == "[]"


def test_weights_that_leave_no_training_rows_are_an_error(tmp_path):
    assert problems({"path": numbered(tmp_path, 3), "weight": 0.1}) == [
        "recipe.yaml@data.train: no training rows are left after weighting; raise a `weight:`"
    ]
