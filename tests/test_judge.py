"""`llmtune judge`: pairwise verdicts in both orders, grading, aggregation, a fake OpenAI-compatible endpoint on
127.0.0.1 with scripted verdicts, a tiny local judge, and recipes refused with their file:line."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from llmtune.errors import UserError
from llmtune.recipe.judge import resolve_judge
from llmtune.tools.judge import combine, parse_rating, parse_verdict, run, wilson

from .conftest import cli, make_recipe, write_jsonl, write_recipe

KEY = "sk-judge-test-0123456789"
KEY_ENV = "LLMTUNE_JUDGE_ACCESS"  # a name `scrub` would not recognise as a secret: llmtune drops the key itself

# Candidate A's and B's answers, and how the scripted judge reacts to each prompt.
PROMPTS = [
    {"prompt": "What is 2+2?", "reference": "4"},          # the judge prefers A's answer in both orders: a win
    {"prompt": "Capital of France?", "reference": "Paris"},  # prefers B's in both orders: a loss
    {"prompt": "Spell cat backwards.", "reference": "tac"},  # always says the first shown: orders disagree, a tie
    {"prompt": "Say hi.", "reference": "hi"},               # a tie in both orders
    {"prompt": "Name a colour.", "reference": "red"},       # no verdict in the first order: a parse failure
]
ANSWERS_A = ["4", "Lyon", "tac", "hi", "blue"]
ANSWERS_B = ["5", "Paris", "cat", "hello", "red"]


def scripted(user: str, auth: str) -> str:
    """The judge's reply: reasoning, then a verdict (or a rating) picked from what the prompt shows."""
    first = user.split("[The Start of Assistant A's Answer]\n")[1].split("\n")[0] if "Assistant A" in user else None
    if first is None:  # single grading
        given = user.split("[The Start of Assistant's Answer]\n")[1].split("\n")[0]
        ratings = {"4": "Correct. Rating: [[9]]", "Paris": "Right. [[8]]", "tac": "Good. [[7]]", "hi": "Fine. [[6]]"}
        return ratings.get(given, "I would rather not rate this.")
    if "2+2" in user:
        return "The answer 4 is right. " + ("[[A]]" if first == "4" else "[[B]]")
    if "France" in user:
        return "Paris is right. " + ("[[A]]" if first == "Paris" else "[[B]]")
    if "backwards" in user:
        return f"I like the first one (the caller sent {auth}). [[A]]"  # echoes the key: it must not be written
    if "hi" in user:
        return "Both fine. [[C]]"
    return "Hard to say." if first == "blue" else "[[A]]"


@pytest.fixture
def endpoint():
    """A fake OpenAI-compatible server on 127.0.0.1 answering /v1/chat/completions from `scripted`."""
    requests = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            auth = self.headers.get("Authorization", "")
            requests.append({"path": self.path, "auth": auth, "body": body})
            reply = scripted(body["messages"][-1]["content"], auth)
            data = json.dumps({"choices": [{"message": {"role": "assistant", "content": reply}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1", requests
    server.shutdown()
    server.server_close()


def judge_recipe(folder, mode="pairwise", candidates=("a.jsonl", "b.jsonl"), judge=None, **extra):
    write_jsonl(folder / "prompts.jsonl", PROMPTS)
    write_jsonl(folder / "a.jsonl", [{"answer": a} for a in ANSWERS_A])
    write_jsonl(folder / "b.jsonl", [{"answer": b} for b in ANSWERS_B])
    body = {"mode": mode, "prompts": "prompts.jsonl", "candidates": list(candidates),
            "judge": judge or {"model": "builtin:tiny"}, "output_dir": str(folder / "out"), **extra}
    return write_recipe(folder / "judge.yaml", json.dumps(body, indent=1))


def files_text(folder) -> str:
    return "".join(p.read_text(errors="replace") for p in folder.rglob("*") if p.is_file())


def test_verdicts_and_the_wilson_interval():
    assert parse_verdict("reasoning... [[A]]") == "A" and parse_verdict("[[C]]") == "C"
    assert parse_verdict("no verdict") is None and parse_verdict("[[A]] or maybe [[B]]") is None
    assert parse_rating("Rating: [[7]]") == 7 and parse_rating("[[3]] then [[8.5]]") == 8.5
    assert parse_rating("[[11]]") is None and parse_rating("seven") is None
    # First order: the first candidate shown as A; second order: shown as B, so its letters swap back.
    assert combine("A", "B") == ("win", True) and combine("B", "A") == ("loss", True)
    assert combine("C", "C") == ("tie", True) and combine("A", "A") == ("tie", False)  # position bias cancels
    assert combine("A", "C") == ("tie", False) and combine(None, "A") == (None, False)
    # Wilson at p = 0.8, n = 10: the textbook interval (0.4902, 0.9433).
    low, high = wilson(8, 10)
    assert (round(low, 4), round(high, 4)) == (0.4902, 0.9433)
    assert wilson(0, 0) is None and wilson(5, 5)[1] == 1.0


def test_pairwise_on_an_endpoint_judges_both_orders_and_never_writes_the_key(tmp_path, endpoint, monkeypatch):
    url, requests = endpoint
    monkeypatch.setenv(KEY_ENV, KEY)
    recipe = judge_recipe(tmp_path, judge={"model": "judge-model", "base_url": url, "api_key_env": KEY_ENV})
    lines, out = run(resolve_judge(recipe))

    # Each prompt judged twice, A's answer first and then B's, with the key sent as a bearer token.
    assert len(requests) == 2 * len(PROMPTS)
    assert {r["path"] for r in requests} == {"/v1/chat/completions"} and {r["auth"] for r in requests} == {
        f"Bearer {KEY}"}
    assert all(r["body"]["model"] == "judge-model" and r["body"]["temperature"] == 0 for r in requests)
    shown_first = [r["body"]["messages"][-1]["content"].split("Assistant A's Answer]\n")[1].split("\n")[0]
                   for r in requests]
    assert shown_first == [x for pair in zip(ANSWERS_A, ANSWERS_B) for x in pair]

    result = json.loads(out.read_text())
    assert out == tmp_path / "out" / "eval" / "judge-judge.json"
    assert [p["outcome"] for p in result["per_prompt"]] == ["win", "loss", "tie", "tie", None]
    assert [p["consistent"] for p in result["per_prompt"]] == [True, True, False, True, False]
    assert [[o["verdict"] for o in p["orders"]] for p in result["per_prompt"]][2] == ["A", "A"]
    assert result["per_prompt"][0]["orders"][0]["judge"] == "The answer 4 is right. [[A]]"  # the reasoning, kept
    (summary,) = result["summary"]
    low, high = wilson(2, 4)  # 1 win + 2 ties as halves over 4 prompts judged
    assert summary == {"what": f"{tmp_path / 'a.jsonl'} vs {tmp_path / 'b.jsonl'}", "wins": 1, "ties": 2,
                       "losses": 1, "inconsistent": 1, "parse_failures": 1, "judged": 4, "win_rate": 0.5,
                       "interval": [low, high], "interval_method": "wilson"}
    assert lines == [f"{summary['what']}: win rate 0.500, 95% Wilson interval [{low:.3f}, {high:.3f}] (1 wins, 2 ties, "
                     "1 losses over 4 prompts; 1 of the ties from orders that disagreed; 1 parse failures)"]
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["judgements"][0]["summary"] == result["summary"]
    assert manifest["judgements"][0]["judge"]["api_key_env"] == KEY_ENV
    # The judge echoed the key in its reasoning; no file holds it.
    assert KEY not in files_text(tmp_path) and f"${{env:{KEY_ENV}}}" in out.read_text()


def test_single_grading_against_the_reference(tmp_path, endpoint, monkeypatch):
    url, requests = endpoint
    recipe = judge_recipe(tmp_path, mode="single", candidates=["b.jsonl", "reference"],
                          judge={"model": "m", "base_url": url}, rubric="Only correctness matters.")
    lines, out = run(resolve_judge(recipe))
    result = json.loads(out.read_text())
    b, ref = result["summary"]
    assert lines[1].startswith("reference: mean score 7.50/10, 95% interval [") and "1 parse failures" in lines[1]
    # b: "5" unrated, "Paris" 8, "cat" unrated, "hello" unrated, "red" unrated.
    assert (b["mean"], b["scored"], b["parse_failures"], b["interval"]) == (8.0, 1, 4, None)
    # The references: 9, 8, 7, 6 and "red" unrated; mean 7.5, normal interval from the sample deviation.
    assert (ref["mean"], ref["scored"], ref["parse_failures"]) == (7.5, 4, 1)
    half = 1.959963984540054 * (5 / 3) ** 0.5 / 2
    assert ref["interval"] == pytest.approx([7.5 - half, 7.5 + half])
    assert all("Only correctness matters." in r["body"]["messages"][0]["content"] for r in requests)
    assert "[The Start of Reference Answer]\n4\n" in requests[0]["body"]["messages"][-1]["content"]
    assert not any(r["auth"] for r in requests)  # no key named: none sent


def test_bad_recipes_are_refused_with_file_and_line(tmp_path, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    recipe = judge_recipe(tmp_path, candidates=["a.jsonl", "b.jsonl", "reference"],
                          judge={"model": "m", "base_url": "127.0.0.1:8000", "api_key_env": KEY_ENV}, temprature=0)
    write_jsonl(tmp_path / "b.jsonl", [{"answer": "x"}])
    with open(tmp_path / "prompts.jsonl", "a") as f:
        f.write('{"prompt": 3}\n')
    with pytest.raises(UserError) as err:
        resolve_judge(recipe)
    text = "\n".join(err.value.problems)
    assert "judge.yaml:" in text and "unknown key 'temprature'" in text
    assert "`mode: pairwise` compares two different candidates; got 3" in text
    assert f"environment variable {KEY_ENV} is not set" in text
    assert "`judge.base_url` must be an http:// or https:// address" in text
    assert f"{tmp_path / 'prompts.jsonl'}:6: a row needs a string `prompt`" in text


def test_cli_exits_2_with_one_message_and_writes_nothing_and_validate_agrees(tmp_path):
    recipe = judge_recipe(tmp_path, candidates=["a.jsonl", "missing.jsonl"])
    for verb in ("judge", "validate"):
        result = cli(verb, recipe)
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert "judge.yaml:" in result.stderr and "no such answers file 'missing.jsonl'" in result.stderr
    assert not (tmp_path / "out").exists()
    good = judge_recipe(tmp_path)
    assert cli("validate", good).stdout == f"ok: {good}\n"


@pytest.mark.slow  # loads a model to judge and trains a run to be judged
def test_a_tiny_local_judge_on_a_run_counts_its_parse_failures(tmp_path):
    from llmtune.recipe.check import resolve
    from llmtune.runner.session import train

    run_dir = tmp_path / "run"
    trained = make_recipe(tmp_path, train={"max_steps": 2, "save_strategy": "no"})
    train(resolve(trained), ["llmtune", "sft"], output_dir=str(run_dir))
    write_jsonl(tmp_path / "prompts.jsonl", PROMPTS[:2])
    write_recipe(tmp_path / "judge.yaml", json.dumps({
        "mode": "pairwise", "prompts": "prompts.jsonl", "candidates": [str(run_dir), "reference"],
        "judge": {"model": "builtin:tiny", "max_new_tokens": 8}, "max_new_tokens": 8}))
    lines, out = run(resolve_judge(tmp_path / "judge.yaml"))
    assert out == run_dir / "eval" / "judge-judge.json"  # the judged run's own eval folder
    result = json.loads(out.read_text())
    (summary,) = result["summary"]
    # An untrained 2-layer judge writes no [[A]]/[[B]]/[[C]]: every prompt is a parse failure, none is judged.
    assert (summary["parse_failures"], summary["judged"], summary["win_rate"], summary["interval"]) == (2, 0, None,
                                                                                                       None)
    assert lines == [f"{run_dir} vs reference: no verdict could be read (2 parse failures; the judge's text for each "
                     "is in the results file)"]
    texts = [o["judge"] for p in result["per_prompt"] for o in p["orders"]]
    assert len(texts) == 4 and all(isinstance(t, str) and t for t in texts)
    # Greedy: judging again gives the same reasoning, word for word.
    _, again = run(resolve_judge(tmp_path / "judge.yaml"))
    assert [o["judge"] for p in json.loads(again.read_text())["per_prompt"] for o in p["orders"]] == texts
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert [j["summary"] for j in manifest["judgements"]] == [result["summary"]] * 2
    assert "## Judged (`llmtune judge`)" in (run_dir / "README.md").read_text() and "2 parse failures" in (
        run_dir / "README.md").read_text()


def eval_judge(folder, url, candidates=("run", "reference")):
    """A training recipe whose `eval.judge` names a judge recipe on the fake endpoint."""
    write_jsonl(folder / "prompts.jsonl", PROMPTS[:2])
    write_recipe(folder / "judge.yaml", json.dumps({
        "mode": "pairwise", "prompts": "prompts.jsonl", "candidates": list(candidates), "max_new_tokens": 8,
        "judge": {"model": "m", "base_url": url}}, indent=1))
    return make_recipe(folder, name="trained", train={"max_steps": 2, "save_strategy": "no"},
                       eval={"judge": "judge.yaml"})


def test_eval_judge_is_checked_with_the_training_recipe(tmp_path):
    from llmtune.recipe.check import resolve

    assert resolve(eval_judge(tmp_path, "http://127.0.0.1:9/v1")).config["eval"]["judge"] == str(
        tmp_path / "judge.yaml")  # relative to the training recipe
    with pytest.raises(UserError) as err:
        resolve(eval_judge(tmp_path, "127.0.0.1:9", candidates=("reference", "run")))
    text = "\n".join(err.value.problems)
    assert f"{tmp_path / 'judge.yaml'}:" in text  # each at the judge recipe's own line
    assert "make `run` the first candidate" in text and "`judge.base_url` must be an http:// or https://" in text
    # On its own, `run` stands for nothing.
    with pytest.raises(UserError, match="`run` stands for the finished run of a training recipe whose `eval.judge`"):
        resolve_judge(tmp_path / "judge.yaml")
    with pytest.raises(UserError, match=r"`eval:` scores nothing: name at least one task in `eval.tasks`"):
        resolve(make_recipe(tmp_path, eval={"tasks": []}))


@pytest.mark.slow  # trains a run (a CLI subprocess) that is then judged
def test_eval_judge_judges_the_finished_run_into_its_folder(tmp_path, endpoint):
    url, requests = endpoint
    recipe = eval_judge(tmp_path, url)
    (tmp_path / "bad").mkdir()
    bad = eval_judge(tmp_path / "bad", "127.0.0.1:9")
    refused = cli("sft", bad)  # what validate refuses, the run refuses first, writing nothing
    assert refused.returncode == 2 and "judge.yaml:" in refused.stderr and "Traceback" not in refused.stderr
    assert not (tmp_path / "bad" / "runs").exists()

    result = cli("sft", recipe)
    assert result.returncode == 0, result.stderr
    run_dir = tmp_path / "runs" / "trained"
    out = run_dir / "eval" / "judge-judge.json"
    judged = json.loads(out.read_text())
    # Both prompts, in both orders: the run's greedy answers against the references, which the judge prefers.
    assert len(requests) == 4 and judged["candidates"] == [str(run_dir), "reference"]
    assert [p["answers"][1] for p in judged["per_prompt"]] == ["4", "Paris"]
    assert [p["outcome"] for p in judged["per_prompt"]] == ["loss", "loss"]
    assert judged["summary"][0]["win_rate"] == 0.0
    assert f"judge: {run_dir} vs reference: win rate 0.000" in result.stdout
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "completed" and manifest["judgements"][0]["summary"] == judged["summary"]
    assert "## Judged (`llmtune judge`)" in (run_dir / "README.md").read_text()
