"""`data.curate`: planted duplicates, near duplicates, empty, short, long and contaminated rows are found."""

import json
import random

import pytest

from llmtune.data import load_data
from llmtune.errors import UserError
from llmtune.recipe.check import resolve

from .conftest import make_recipe, write_jsonl

ALL = {"dedup": True, "near_dedup": 0.8, "drop_empty": True, "min_tokens": 100, "max_tokens": 800,
       "contamination": "report"}
EVAL = [{"path": "eval.jsonl"}]


def recipe(tmp_path, curate, eval_=EVAL):
    """A recipe on the train.jsonl and eval.jsonl next to it, with `curate` as its `data.curate:`."""
    return make_recipe(tmp_path, data={"train": [{"path": "train.jsonl"}], "eval": eval_, "max_length": 512,
                                       "curate": curate},
                       adapter={"type": "lora", "r": 4},
                       train={"max_steps": 1, "per_device_train_batch_size": 4, "gradient_checkpointing": False,
                              "save_strategy": "no", "disable_tqdm": True})


def chat(question, answer):
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def fixture(tmp_path):
    """Train and eval files with planted rows; returns {step: [planted train line numbers]}."""
    rng = random.Random(0)
    vocab = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 7))) for _ in range(3000)]

    def words(n):
        return " ".join(rng.choice(vocab) for _ in range(n))

    rows = [chat(words(8), words(50)) for _ in range(40)]  # lines 1-40, distinct (byte tokens: ~400 each)
    rows += [rows[2], rows[9], rows[2]]  # 41-43: exact duplicates of lines 3, 10, 3
    answer = rows[4]["messages"][1]["content"].split()
    answer[25] = "changed"
    rows.append(chat(rows[4]["messages"][0]["content"], " ".join(answer)))  # 44: one word differs from line 5
    q, a = (m["content"] for m in rows[19]["messages"])
    rows.append(chat(q.upper() + "!", a.replace(" ", ", ")))  # 45: line 20 in other case and punctuation
    rows += [chat(words(8), ""), chat(words(8), " N/A ")]  # 46-47: empty and placeholder answers
    rows += [chat(words(8), words(300)), chat(words(8), words(300))]  # 48-49: ~1900 tokens, over max_tokens
    rows.append(chat("hi", "ok"))  # 50: ~25 tokens, under min_tokens
    passages = [words(20), words(20)]
    evals = [chat(words(8), words(10) + " " + p + " " + words(10)) for p in passages]
    evals += [chat(words(8), words(50)) for _ in range(4)]
    rows += [chat(words(8), words(15) + " " + p + " " + words(15)) for p in passages]  # 51-52: share 20 eval words
    rows.append(chat(words(8), words(90)))  # 53: ~620 tokens: kept, but longer than max_length
    write_jsonl(tmp_path / "train.jsonl", rows)
    write_jsonl(tmp_path / "eval.jsonl", evals)
    return {"empty": [46, 47], "duplicates": [41, 42, 43], "near_duplicates": [44, 45], "too_short": [50],
            "too_long": [48, 49], "truncated": [53], "contaminated": [51, 52]}, len(rows)


def prepare(tmp_path, curate=ALL):
    planted, total = fixture(tmp_path)
    config = resolve(recipe(tmp_path, curate)).config
    return load_data(config["data"], method="sft", seed=0, model=config["model"]), planted, total


def lines_of(result):
    return [int(where.rsplit(":", 1)[1]) for where in result["examples"]]


def test_drops_exactly_the_planted_rows_and_flags_contamination(tmp_path):
    data, planted, total = prepare(tmp_path)
    train, evals = data.sources
    assert {step: lines_of(result) for step, result in train.curated.items()} == planted
    assert {step: result["count"] for step, result in train.curated.items()} == {k: len(v) for k, v in planted.items()}
    assert not train.curated["truncated"]["removed"] and not train.curated["contaminated"]["removed"]
    dropped = sum(len(planted[step]) for step in ("empty", "duplicates", "near_duplicates", "too_short", "too_long"))
    assert len(data.train) == total - dropped
    assert all(result["count"] == 0 for result in evals.curated.values() if result["removed"])
    assert any("2 training row(s) share a 13-word sequence with the eval set" in w for w in data.warnings)


def test_rows_their_byte_length_settles_are_not_tokenized(tmp_path, monkeypatch):
    import llmtune.data.curate as curate

    tokenized = []  # per rendered row: whether the tokenizer had to count it
    real = curate._token_counter

    def spy(model):
        measure = real(model)

        def recorded(decides):
            return lambda bound: tokenized.append(decides(bound)) or tokenized[-1]

        return lambda rows, decides: measure(rows, recorded(decides))

    monkeypatch.setattr(curate, "_token_counter", spy)
    data, planted, _ = prepare(tmp_path, {"max_tokens": 800})
    train = data.sources[0]
    assert (lines_of(train.curated["too_long"]), lines_of(train.curated["truncated"])) == (
        planted["too_long"], planted["truncated"])
    # Of 59 rows (53 train, 6 eval) only 48, 49 and 53 are long enough in bytes to be over max_length.
    assert (len(tokenized), sum(tokenized)) == (59, 3)


def test_contaminated_rows_are_removed_on_request(tmp_path):
    data, planted, total = prepare(tmp_path, {"contamination": "remove"})
    train = data.sources[0]
    assert list(train.curated) == ["contaminated"] and lines_of(train.curated["contaminated"]) == [51, 52]
    assert train.curated["contaminated"]["removed"] and len(data.train) == total - 2
    assert not any("share a" in w for w in data.warnings)


@pytest.mark.slow
def test_counts_reach_the_manifest_and_data_inspect(tmp_path):
    from llmtune.runner.session import train as run
    from llmtune.tools.inspect import inspect

    prepare(tmp_path)
    resolved = resolve(tmp_path / "r.yaml")
    run(resolved, ["llmtune", "sft"], output_dir=str(tmp_path / "run"))
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["data"][0]["curated"]["duplicates"]["count"] == 3
    shown, _ = inspect(resolved)
    assert any(line.startswith("  curate: removed 3 exact duplicate(s) (e.g. ") for line in shown), shown
    assert any("  curate: found 1 row(s) longer than data.max_length" in line for line in shown), shown


def test_settings_are_part_of_the_data_cache_key(tmp_path):
    first, _, total = prepare(tmp_path, {"dedup": True})
    second, _, _ = prepare(tmp_path, {"dedup": False})
    assert (len(first.train), len(second.train)) == (total - 3, total)


@pytest.mark.parametrize("curate, message", [
    ({"near_dedup": 1.5}, r"r\.yaml:\d+:\d+: `data.curate.near_dedup` is a similarity in \(0, 1\]"),
    ({"min_tokens": 50, "max_tokens": 10}, r"`data.curate.min_tokens: 50` is above `max_tokens: 10`"),
    ({"dedupe": True}, r"unknown key 'dedupe' in data.curate \(did you mean 'dedup'\?\)"),
    ({"contamination": "maybe"}, r"`data.curate.contamination` must be one of: 'off', 'report', 'remove'"),
])
def test_bad_settings_are_refused(tmp_path, curate, message):
    fixture(tmp_path)
    with pytest.raises(UserError, match=message):
        resolve(recipe(tmp_path, curate))


def test_contamination_needs_an_eval_set(tmp_path):
    fixture(tmp_path)
    with pytest.raises(UserError, match=r"the contamination check compares train with eval rows"):
        resolve(recipe(tmp_path, {"contamination": "report"}, eval_=None))


def test_curation_that_removes_everything_says_so(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [chat("q", "")] * 3)
    write_jsonl(tmp_path / "eval.jsonl", [chat("q", "a")])
    config = resolve(recipe(tmp_path, {"drop_empty": True})).config
    with pytest.raises(UserError, match=r"`data.curate` removed every training row \(3 empty or placeholder"):
        load_data(config["data"], method="sft", seed=0, model=config["model"])
