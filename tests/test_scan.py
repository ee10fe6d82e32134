"""`llmtune validate` checks data row by row (data/scan.py): the run's problems and warnings, without the rows."""

import json
import tracemalloc
from pathlib import Path

import pytest

from llmtune.data import load_data, scan
from llmtune.errors import UserError

from .conftest import CHAT, write_jsonl

ALTERNATE = Path(__file__).parent / "data" / "bad" / "data" / "alternate.jinja"
CHAT_ROWS = [json.loads(line) for line in CHAT.read_text().splitlines()]


def chat(i, user="What is 2+2?"):
    return {"messages": [{"role": "user", "content": f"{user} ({i})"}, {"role": "assistant", "content": "4"}]}


def where(key):
    return "recipe.yaml:" + ".".join(map(str, key))


def outcome(check, data, method, model):
    """(warnings, None) or (None, problems) of one way of checking `data`."""
    try:
        return check(data, method=method, seed=0, locate=where, model=model), None
    except UserError as err:
        return None, err.problems


def whole(data, **kwargs):
    return load_data(data, store=False, **kwargs).warnings


TINY = {"name": "builtin:tiny", "trust_remote_code": False}
# name -> (files' rows or text, the `data:` section beyond its train files, method, model, what the check says)
CASES = {
    "more problems than are shown": (
        [[*CHAT_ROWS[:3], *("{broken" for _ in range(12)), *({"messages": "no"} for _ in range(15))]], {}, "sft",
        None, "... and 7 more problems in"),
    "a stray row first, most rows of another format": (
        [[{"prompt": "a", "completion": "b"}, *CHAT_ROWS]], {}, "sft", TINY, "make it prompt_completion data"),
    "the first row lacks what the others have": (
        [[{"prompt": "a", "completion": "b"}, *({"prompt": "q", "completion": "c", "label": i % 2 == 0}
                                               for i in range(5))]], {}, "kto", None, "missing 'label'"),
    "an unknown column to rename": ([CHAT_ROWS], {"train": [{"columns": {"nope": "text"}}]}, "sft", None,
                                    "no column 'nope'"),
    "rows cut away at max_length": (
        [[chat(i, "long " * (60 if i % 3 else 1)) for i in range(30)]], {"max_length": 64}, "sft", TINY,
        "20 of 30 rows"),
    "every row cut away at max_length": ([[chat(i, "long " * 60) for i in range(30)]], {"max_length": 64}, "sft",
                                         TINY, "fills `data.max_length: 64`"),
    "a conversation the template refuses": (
        [[*CHAT_ROWS, {"messages": [{"role": "user", "content": "s"}, *CHAT_ROWS[0]["messages"]]}]], {}, "sft",
        {**TINY, "chat_template": str(ALTERNATE)}, "refuses this conversation (roles user, user, assistant)"),
    "an eval fraction and weights leave few rows": (
        [[chat(i) for i in range(12)], [chat(i) for i in range(5)]],
        {"eval": 0.25, "train": [{"weight": 0.5}, {"weight": 1.5}]}, "sft", TINY, "row(s), fewer than 16"),
    "conversations and prompt-completion pairs mixed": (
        [[{"instruction": "long " * (60 if i % 2 else 1), "output": "4", "system": "Be brief."} for i in range(10)],
         CHAT_ROWS], {"max_length": 64}, "sft", TINY, "5 of 10 rows"),
    "too few rows to hold out": ([[chat(0)]], {"eval": 0.1}, "sft", None, "there is only 1"),
    "sources of different kinds": ([CHAT_ROWS, [{"text": "plain"}]], {}, "sft", None, "cannot be mixed"),
}


@pytest.mark.parametrize("name", CASES)
def test_the_row_by_row_check_finds_what_the_run_finds(name, tmp_path):
    files, section, method, model, expected = CASES[name]
    section = dict(section)
    train = [{"path": str(write_jsonl(tmp_path / f"d{i}.jsonl", rows))} for i, rows in enumerate(files)]
    for spec, extra in zip(train, section.pop("train", [])):
        spec.update(extra)
    data = {"train": train, **section}
    assert scan.streamable(data, where)
    streamed, run = outcome(scan.check, data, method, model), outcome(whole, data, method, model)
    assert streamed == run
    assert expected in "\n".join(run[1] if run[0] is None else run[0])


def test_the_check_holds_no_rows(tmp_path):
    """Memory does not grow with the rows: the Python objects of 50,000 conversations would take tens of MB."""
    path = write_jsonl(tmp_path / "big.jsonl", (chat(i) for i in range(50_000)))
    data = {"train": [{"path": str(path)}]}
    tracemalloc.start()
    try:
        assert scan.check(data, method="sft", seed=0, locate=where) == []
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < path.stat().st_size / 4, f"{peak / 2**20:.1f} MiB for a {path.stat().st_size / 2**20:.1f} MiB file"


def test_checking_rows_against_the_tokenizer_takes_the_same_memory_for_4x_the_rows(tmp_path, monkeypatch):
    """Rows go through the chat template and `data.max_length` a chunk at a time, then are let go."""
    monkeypatch.setattr(scan, "CHUNK", 100)
    monkeypatch.setattr(scan, "WORKERS", 1)  # all in this process, where tracemalloc sees it
    warm = {"train": [{"path": str(write_jsonl(tmp_path / "warm.jsonl", CHAT_ROWS))}], "max_length": 512}
    scan.check(warm, method="sft", seed=0, locate=where, model=TINY)  # imports what checking needs, once
    peaks = []
    for rows in (1_500, 6_000):
        path = write_jsonl(tmp_path / f"{rows}.jsonl", (chat(i, "long " * (i % 150)) for i in range(rows)))
        data = {"train": [{"path": str(path)}], "max_length": 512}
        tracemalloc.start()
        try:
            warnings = scan.check(data, method="sft", seed=0, locate=where, model=TINY)
            peaks.append(tracemalloc.get_traced_memory()[1])
        finally:
            tracemalloc.stop()
        cut = sum(i % 150 >= 100 for i in range(rows))  # the template's tokens and 500+ of "long "
        assert f"{cut} of {rows} rows" in warnings[0] and f"{path}:101)" in warnings[0]
    assert peaks[1] < 1.3 * peaks[0], [f"{peak / 2**20:.1f} MiB" for peak in peaks]


def test_curated_data_and_hub_datasets_are_checked_whole(tmp_path):
    path = str(write_jsonl(tmp_path / "d.jsonl", CHAT_ROWS))
    assert not scan.streamable({"train": [{"path": path}], "curate": {"dedupe": "exact"}}, where)
    assert not scan.streamable({"train": [{"path": path}, {"path": "someone/dataset"}]}, where)


# Texts a tokenizer may make more tokens of than it has bytes: spaces, non-ASCII, decomposing (U+0958) characters,
# special tokens written in the text, emoji.
AWKWARD = ["", " ", "  a  b ", "caf\u00e9 \u0958\u0959 \u00c5", "<|im_start|>user\n<|im_end|>", "\U0001f600 \u4f60\u597d",
           "The capital of France is Paris.", "\t\n\r", "\u0301\u0301x"]


def sentencepiece_style():
    """A Gemma/Mistral-like pipeline: a space becomes '\u2581', one is put in front, unknown characters are
    spelled in bytes."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"<0x{b:02X}>": b for b in range(256)} | {"a": 256, "b": 257}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True))
    core.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    core.pre_tokenizer = pre_tokenizers.Split("\u2581", "merged_with_next")
    return PreTrainedTokenizerFast(tokenizer_object=core)


def nfc_byte_level():
    """A Qwen-like pipeline: NFC, then byte-level."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(pre_tokenizers.ByteLevel.alphabet())}, merges=[]))
    core.normalizer = normalizers.NFC()
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(), pre_tokenizers.ByteLevel(
        add_prefix_space=False)])
    return PreTrainedTokenizerFast(tokenizer_object=core)


def tokens(tokenizer, text):
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


@pytest.mark.parametrize("family", ["llama3", "qwen2_5", "gemma2", "mistral", "phi3"])
def test_a_byte_level_tokenizer_makes_no_more_tokens_of_a_text_than_it_has_bytes(family):
    from llmtune.tokenizer import byte_bound

    from .families import FAMILIES, build_tokenizer

    tokenizer = build_tokenizer(FAMILIES[family])
    bound = byte_bound(tokenizer)
    assert bound is not None
    for text in AWKWARD + [tokenizer.apply_chat_template(CHAT_ROWS[0]["messages"], tokenize=False)]:
        assert bound(text) and tokens(tokenizer, text) <= len(text.encode())


def test_no_byte_bound_where_a_tokenizer_can_make_more_tokens_than_bytes():
    from llmtune.tokenizer import byte_bound

    spaced = sentencepiece_style()
    assert byte_bound(spaced) is None
    assert tokens(spaced, " ") == 6  # '\u2581\u2581': 3 byte tokens each, from a text of 1 byte
    nfc = nfc_byte_level()
    bound = byte_bound(nfc)
    assert bound("plain ASCII 123") and not bound("\u0958")
    assert tokens(nfc, "\u0958") == 6 > len("\u0958".encode())  # NFC decomposes it: 2 characters of 3 bytes


@pytest.mark.parametrize("make", [sentencepiece_style, nfc_byte_level, "qwen2_5"])
def test_rows_fit_max_length_as_their_prompts_tokenized_one_by_one_say(make):
    """`templates.fits` skips tokenizing prompts the byte bound shows short, and renders conversations without
    tools in one call: the same answers as rendering and tokenizing each prompt."""
    from llmtune.data import templates

    from .families import FAMILIES, build_tokenizer, template_text

    tokenizer = build_tokenizer(FAMILIES[make]) if isinstance(make, str) else make()
    if not tokenizer.chat_template:
        tokenizer.chat_template = template_text(FAMILIES["qwen2_5"])
    tool = [{"type": "function", "function": {"name": "add", "description": "Add.", "parameters": {
        "type": "object", "properties": {"a": {"type": "number"}}, "required": ["a"]}}}]
    rows = []
    for n, text in enumerate(AWKWARD * 3):
        user = {"role": "user", "content": text * n}
        rows += [{"messages": [user, {"role": "assistant", "content": "ok"}]},
                 {"messages": [user, {"role": "assistant", "content": "ok"}], "tools": tool},
                 {"prompt": text * n, "completion": "ok"}, {"prompt": [user], "completion": [user]}]
    for max_length in (8, 40, 120, 400):
        expected = []
        for row in rows:
            prompt = row.get("prompt", row.get("messages", [])[:1])
            if isinstance(prompt, list):
                prompt = tokenizer.apply_chat_template(prompt, tools=row.get("tools"), tokenize=False,
                                                       add_generation_prompt=True)
            expected.append(not prompt or tokens(tokenizer, prompt) < max_length)
        assert templates.fits(rows, max_length, tokenizer) == expected
        assert 0 < sum(expected) < len(rows) or max_length == 400
