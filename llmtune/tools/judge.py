"""`llmtune judge`: a model judges answers to a set of prompts (LLM-as-a-judge, as MT-Bench and AlpacaEval do).

- **pairwise**: each prompt's two answers are judged twice, once in each order, to cancel the judge's position bias.
  An answer wins a prompt only when it is preferred in both orders; the same verdict twice is that verdict, and
  disagreeing orders are a tie (MT-Bench's rule). The win rate of the first candidate counts a tie as half a win;
  its 95% interval is the Wilson score interval over the prompts judged. A prompt where either order's verdict
  cannot be read is a parse failure: counted, kept with the judge's text, and left out of the win rate.
- **single**: each answer is graded 1-10; per candidate the mean and a 95% normal-approximation interval.

The judge is a local model (generated greedily through its chat template) or an OpenAI-compatible endpoint
(`/chat/completions` over the standard library's urllib), its key read from the environment variable the recipe names and never written.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import statistics
import time
import urllib.error
import urllib.request
from pathlib import Path

from .. import __version__
from ..errors import UserError
from ..files import read_manifest, write_json
from ..model import load_model as load_weights
from ..recipe.judge import REFERENCE, Judging, resolve_judge
from ..runner import card
from ..runner.rundir import now
from ..secret import scrub
from ..tokenizer import load_tokenizer
from .infer import Loaded, Sampling, generate, load, prompt_ids

Z95 = 1.959963984540054  # the normal quantile of a two-sided 95% interval

PAIR_SYSTEM = (
    "Please act as an impartial judge and evaluate the quality of the responses provided by two AI assistants to "
    "the user question displayed below. Choose the assistant that answers the user's question better. {rubric} "
    "Begin your evaluation by comparing the two responses and provide a short explanation. Avoid any position "
    "biases and ensure that the order in which the responses were presented does not influence your decision. Do "
    "not allow the length of the responses to influence your evaluation. Do not favor certain names of the "
    "assistants. Be as objective as possible. After providing your explanation, output your final verdict by "
    'strictly following this format: "[[A]]" if assistant A is better, "[[B]]" if assistant B is better, and '
    '"[[C]]" for a tie.')
PAIR_USER = ("[User Question]\n{question}\n\n[The Start of Assistant A's Answer]\n{a}\n[The End of Assistant A's "
             "Answer]\n\n[The Start of Assistant B's Answer]\n{b}\n[The End of Assistant B's Answer]")
SINGLE_SYSTEM = (
    "Please act as an impartial judge and evaluate the quality of the response provided by an AI assistant to the "
    "user question displayed below. {rubric} {reference}Begin your evaluation by providing a short explanation. Be "
    "as objective as possible. After providing your explanation, you must rate the response on a scale of 1 to 10 "
    'by strictly following this format: "[[rating]]", for example: "Rating: [[5]]".')
SINGLE_REFERENCE = "Compare the assistant's answer with the reference answer. "
SINGLE_USER = "[Question]\n{question}\n\n{reference}[The Start of Assistant's Answer]\n{answer}\n[The End of " \
              "Assistant's Answer]"

_VERDICT = re.compile(r"\[\[([ABC])\]\]")
_RATING = re.compile(r"\[\[(\d+(?:\.\d+)?)\]\]")


def parse_verdict(text: str) -> str | None:
    """`A`, `B` or `C` (tie): the one verdict the text gives; None when it gives none or several different ones."""
    found = set(_VERDICT.findall(text))
    return found.pop() if len(found) == 1 else None


def parse_rating(text: str) -> float | None:
    """The last `[[N]]` rating of the text when it is within 1-10, else None."""
    found = _RATING.findall(text)
    value = float(found[-1]) if found else None
    return value if value is not None and 1 <= value <= 10 else None


def combine(first: str | None, second: str | None) -> tuple[str | None, bool]:
    """The outcome for the first candidate from the verdict with it shown as A (`first`) and the verdict with it
    shown as B (`second`): (`win`/`tie`/`loss`, or None when a verdict is unreadable; whether the orders agree)."""
    if first is None or second is None:
        return None, False
    second = {"A": "B", "B": "A", "C": "C"}[second]  # back to the first order's letters
    outcome = {"A": "win", "B": "loss", "C": "tie"}[first]
    return (outcome, True) if first == second else ("tie", False)


def wilson(successes: float, n: int, z: float = Z95) -> tuple[float, float] | None:
    """The Wilson score interval of a proportion (ties count as half a success); None without observations."""
    if n == 0:
        return None
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def pairwise_summary(names: list[str], outcomes: list[dict]) -> dict:
    counts = {key: sum(o["outcome"] == key for o in outcomes) for key in ("win", "tie", "loss")}
    judged = sum(counts.values())
    won = counts["win"] + counts["tie"] / 2
    return {"what": f"{names[0]} vs {names[1]}", "wins": counts["win"], "ties": counts["tie"],
            "losses": counts["loss"], "inconsistent": sum(o["outcome"] is not None and not o["consistent"]
                                                          for o in outcomes),
            "parse_failures": len(outcomes) - judged, "judged": judged,
            "win_rate": won / judged if judged else None, "interval": wilson(won, judged),
            "interval_method": "wilson"}


def single_summary(name: str, scores: list[float | None]) -> dict:
    read = [s for s in scores if s is not None]
    mean = statistics.fmean(read) if read else None
    half = Z95 * statistics.stdev(read) / math.sqrt(len(read)) if len(read) > 1 else None
    return {"what": name, "mean": mean, "interval": (mean - half, mean + half) if half is not None else None,
            "interval_method": "normal", "scored": len(read), "parse_failures": len(scores) - len(read)}


class Endpoint:
    """An OpenAI-compatible chat completions endpoint, over the standard library's HTTP client; the key stays in
    this object's headers."""

    RETRIES = 3  # rate limits, server errors and dropped connections are retried, with a growing pause

    def __init__(self, judge: dict):
        key = os.environ.get(judge["api_key_env"] or "", "")
        self.url = judge["base_url"].rstrip("/") + "/chat/completions"
        self.timeout = judge["timeout"]
        self.headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
        self.body = {"model": judge["model"], "temperature": judge["temperature"],
                     "max_tokens": judge["max_new_tokens"]}

    def ask(self, system: str, user: str) -> str:
        body = {**self.body, "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}]}
        request = urllib.request.Request(self.url, json.dumps(body).encode(), self.headers, method="POST")
        for attempt in range(self.RETRIES + 1):
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    text = response.read().decode("utf-8", "replace")
                try:
                    return json.loads(text)["choices"][0]["message"]["content"] or ""
                except (ValueError, KeyError, IndexError, TypeError):
                    raise UserError(f"{self.url}: not an OpenAI-style chat completion: {scrub(text[:200])!r}") from None
            except urllib.error.HTTPError as err:
                problem = f"{self.url} answered {err.code}: {scrub(err.read().decode('utf-8', 'replace')[:300])}"
                if err.code not in (408, 429) and err.code < 500:
                    raise UserError(problem + ("; check the key in `judge.api_key_env`" if err.code in (401, 403)
                                               else "")) from None
            except (urllib.error.URLError, OSError) as err:
                problem = f"cannot reach {self.url}: {getattr(err, 'reason', err)}"
            if attempt < self.RETRIES:
                time.sleep(2 ** attempt)
        raise UserError(problem)


class LocalJudge:
    """A model loaded here, answering greedily (unless `temperature` says otherwise) through its chat template."""

    def __init__(self, judge: dict):
        self.loaded = load_model(judge["model"])
        self.sampling = Sampling(max_new_tokens=judge["max_new_tokens"], temperature=judge["temperature"], seed=0)

    def ask(self, system: str, user: str) -> str:
        return answer(self.loaded, [{"role": "system", "content": system}, {"role": "user", "content": user}],
                      self.sampling)


def load_model(name: str) -> Loaded:
    """A run directory or model folder as `generate` loads it; a Hub id or builtin model by its name."""
    path = Path(name)
    if (path / "adapter_config.json").is_file() or (path / "config.json").is_file():
        return load(path)
    section = {"name": name, "revision": None, "dtype": "auto", "attn_implementation": None, "chat_template": None,
               "trust_remote_code": False, "run_adapter": "stack"}
    model = load_weights({"model": section})
    model.eval()
    return Loaded(model, load_tokenizer(section), False, None, "CausalLM", [])


def answer(loaded: Loaded, messages: list[dict], sampling: Sampling) -> str:
    return loaded.tokenizer.decode(generate(loaded, prompt_ids(loaded.tokenizer, messages), sampling),
                                   skip_special_tokens=True).strip()


def candidate_answers(judging: Judging) -> dict[str, list[str]]:
    """Every candidate's answer to every prompt: written ones as they are, the others generated greedily."""
    out = {}
    for name in judging.config["candidates"]:
        if name == REFERENCE:
            out[name] = [row[REFERENCE] for row in judging.rows]
        elif name in judging.answers:
            out[name] = judging.answers[name]
        else:
            loaded = load_model(name)
            sampling = Sampling(max_new_tokens=judging.config["max_new_tokens"])
            out[name] = [answer(loaded, [{"role": "user", "content": row["prompt"]}], sampling)
                         for row in judging.rows]
    return out


def judge_pairwise(judge, rubric: str, rows: list[dict], a: list[str], b: list[str]) -> list[dict]:
    system = PAIR_SYSTEM.format(rubric=rubric)
    out = []
    for row, first, second in zip(rows, a, b):
        texts = [judge.ask(system, PAIR_USER.format(question=row["prompt"], a=x, b=y))
                 for x, y in ((first, second), (second, first))]
        verdicts = [parse_verdict(text) for text in texts]
        outcome, consistent = combine(*verdicts)
        out.append({"prompt": row["prompt"], "answers": [first, second], "outcome": outcome, "consistent": consistent,
                    "orders": [{"shown_first": shown, "verdict": verdict, "judge": text}
                               for shown, verdict, text in zip((0, 1), verdicts, texts)]})
    return out


def judge_single(judge, rubric: str, rows: list[dict], answers: list[str]) -> list[dict]:
    out = []
    for row, given in zip(rows, answers):
        reference = row.get(REFERENCE) if isinstance(row.get(REFERENCE), str) else None
        system = SINGLE_SYSTEM.format(rubric=rubric, reference=SINGLE_REFERENCE if reference else "")
        shown = f"[The Start of Reference Answer]\n{reference}\n[The End of Reference Answer]\n\n" if reference else ""
        text = judge.ask(system, SINGLE_USER.format(question=row["prompt"], reference=shown, answer=given))
        out.append({"prompt": row["prompt"], "answer": given, "score": parse_rating(text), "judge": text})
    return out


def target(judging: Judging) -> Path:
    """`output_dir`, else the first candidate's run directory, else runs/NAME."""
    config = judging.config
    first = Path(config["candidates"][0])
    # The loader fills in `output_dir: runs/NAME` when the recipe leaves it out: only a written one wins.
    if ("output_dir",) not in judging.recipe.locs and read_manifest(first).get("method"):
        return first
    return Path(config["output_dir"]).expanduser()


def run(judging: Judging, folder: Path | None = None) -> tuple[list[str], Path]:
    """Judge, then write the results into `folder` (default: `target`); (lines to print, results file). Nothing is
    written unless all went well."""
    config = judging.config
    folder = folder or target(judging)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{folder}: not a folder; set `output_dir:` to a folder for the results")
    started = time.monotonic()
    answers = candidate_answers(judging)
    judge = Endpoint(config["judge"]) if config["judge"]["base_url"] else LocalJudge(config["judge"])
    names = config["candidates"]
    if config["mode"] == "pairwise":
        per_prompt = judge_pairwise(judge, config["rubric"], judging.rows, answers[names[0]], answers[names[1]])
        summary = [pairwise_summary(names, per_prompt)]
    else:
        per_prompt = {name: judge_single(judge, config["rubric"], judging.rows, answers[name]) for name in names}
        summary = [single_summary(name, [p["score"] for p in per_prompt[name]]) for name in names]
    prompts = Path(config["prompts"])
    judge_id = {k: config["judge"][k] for k in ("model", "base_url", "api_key_env", "temperature", "max_new_tokens")}
    record = {"name": config["name"], "mode": config["mode"], "judge": judge_id, "rubric": config["rubric"],
              "candidates": names, "prompts": {"path": str(prompts),
                                               "sha256": hashlib.sha256(prompts.read_bytes()).hexdigest(),
                                               "rows": len(judging.rows)},
              "summary": summary, "seconds": round(time.monotonic() - started, 1), "time": now(),
              "llmtune": __version__}
    out = save(folder, record, per_prompt, config["judge"])
    return [line for item in summary for line in describe(item)], out


def judge_finished(run_dir: Path, recipe: str) -> list[str]:
    """A training recipe's `eval.judge`: the judge recipe on the run just finished (its candidate `run`), the results
    into that run's eval/ folder, manifest and card."""
    try:
        lines, _ = run(resolve_judge(recipe, run=str(run_dir)), folder=run_dir)
    except UserError as err:
        raise UserError([f"the run finished in {run_dir}, but `eval.judge` failed: {problem}"
                         for problem in err.problems]) from None
    return [f"judge: {line}" for line in lines]


def _secret_free(payload: dict, judge: dict) -> dict:
    """The payload with the endpoint's key (and any secret from the environment) taken out."""
    text = scrub(json.dumps(payload, default=str))
    key = os.environ.get(judge["api_key_env"] or "", "")
    return json.loads(text.replace(key, f"${{env:{judge['api_key_env']}}}") if key else text)


def save(folder: Path, record: dict, per_prompt, judge: dict) -> Path:
    """FOLDER/eval/judge-NAME.json (everything, per prompt) and an entry in the folder's manifest (the summary)."""
    name = re.sub(r"[^A-Za-z0-9_.+-]", "_", record["name"])
    out = folder / "eval" / f"judge-{name}.json"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        write_json(out, _secret_free({**record, "per_prompt": per_prompt}, judge))
        manifest = read_manifest(folder) or {"llmtune": __version__}
        entry = {**record, "file": str(out.relative_to(folder))}
        write_json(folder / "manifest.json", _secret_free(
            {**manifest, "judgements": [*manifest.get("judgements", []), entry]}, judge))
        card.write(folder, scrub)  # a training run's card shows the result
    except OSError as err:
        raise UserError(f"{folder}: cannot write the results: {err.strerror}; set `output_dir:` to a writable "
                        "folder") from None
    return out


def describe(item: dict) -> list[str]:
    """The summary of one pairing or candidate, as printed."""
    failures = f"{item['parse_failures']} parse failures"
    if item["interval"] is None and not (item.get("judged") or item.get("scored")):
        return [f"{item['what']}: no verdict could be read ({failures}; the judge's text for each is in the "
                "results file)"]
    low, high = item["interval"] or (math.nan, math.nan)
    if "win_rate" in item:
        return [f"{item['what']}: win rate {item['win_rate']:.3f}, 95% Wilson interval [{low:.3f}, {high:.3f}] "
                f"({item['wins']} wins, {item['ties']} ties, {item['losses']} losses over {item['judged']} prompts; "
                f"{item['inconsistent']} of the ties from orders that disagreed; {failures})"]
    return [f"{item['what']}: mean score {item['mean']:.2f}/10, 95% interval [{low:.2f}, {high:.2f}] "
            f"({item['scored']} answers graded; {failures})"]
