"""`llmtune data inspect`: what the trainer will see, token by token, before a model is loaded.

Rows are tokenized and masked by TRL's own SFT preparation (the `_prepare_dataset` of
`SFTTrainer`, run on a trainer that has no model), with the template TRL would train with,
so the marked tokens are exactly the ones that get a label. Preference, KTO and prompt-only
rows are shown as prompt + completion with the completion (the tokens those methods
score) marked. `plan` reuses `TrainingView` for token lengths.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..compat import sft_dataset_preparer
from ..data import curate, load_data, stream
from ..data.formats import to_dataset
from ..data.masking import fold_system, has_system_role, inference_prompts, renders_masks, tokenize
from ..logs import quiet
from ..runner.trainer_args import training_args
from ..tokenizer import end_of_turn_token, load_tokenizer, require_chat_template

# Token lengths are measured on at most this many rows per source (a seeded random sample).
MEASURED_ROWS = 5000
GREEN, DIM, RESET = "\033[1;32m", "\033[2m", "\033[0m"


@dataclass
class Template:
    """The chat template training uses, against the one saved with the model for inference."""

    saved: str | None  # tokenizer.chat_template: saved into the run directory, used at inference
    training: str | None  # what TRL renders training rows with (a patched copy, or `saved`)
    masks_assistant: bool  # can the training template mark assistant turns?
    patched: bool  # TRL swapped in its training version of the template


class TrainingView:
    """How the trainer of a resolved recipe tokenizes and masks rows (untruncated)."""

    def __init__(self, resolved, tokenizer, data):
        from trl import SFTConfig

        self.tokenizer = tokenizer
        self.shape = shape = data.shape
        self.conversational = shape.startswith("conversational")
        if resolved.method.config == "trl:SFTConfig":
            from importlib import import_module

            # The run's own SFTConfig, as `llmtune sft` builds it (method defaults under `train:`).
            method = import_module(resolved.method.runner)
            args = training_args(resolved, Path(".llmtune-inspect"), method.defaults(resolved.config, data))
        else:  # other methods score the completion; SFT's completion masking shows those tokens
            args = SFTConfig(output_dir=".llmtune-inspect", report_to="none", completion_only_loss=True,
                             bf16=False)
        self.max_length = resolved.config["data"]["max_length"]
        self.packing = bool(args.packing)
        # The run's own decision (methods/sft.py): rows masked by rendering here, handed to TRL tokenized.
        self.renders_masks = renders_masks(args, shape, tokenizer)
        self.template = self._template(args)
        if self.renders_masks:
            args.assistant_only_loss = False
        if args.assistant_only_loss and not self.template.masks_assistant:
            # SFTTrainer would refuse to start; show what `assistant_only_loss: false` would train instead.
            args.assistant_only_loss = False
        self.args = args
        self._prepare = sft_dataset_preparer(
            tokenizer, self.template.training if self.template.patched else None,
            args.completion_only_loss if args.completion_only_loss is not None
            else "prompt" in shape or "preference" in shape)
        self.stop_token = self._stop_token()
        # Causal-LM methods train a completion cut from its prompt, and get rows as methods/__init__.py hands them to
        # TRL; a reward model scores the whole conversation.
        self.inference_prompts = resolved.method.head == "CausalLM"

    def _template(self, args) -> Template:
        from trl.chat_template_utils import get_training_chat_template, has_generation_markers

        saved = self.tokenizer.chat_template
        if not self.conversational or not saved:
            return Template(saved, saved, False, False)
        if has_generation_markers(saved) or self.renders_masks:
            return Template(saved, saved, True, False)
        try:
            patched = get_training_chat_template(self.tokenizer)
        except ValueError:
            return Template(saved, saved, False, False)
        if not args.assistant_only_loss:  # TRL patches only to mask assistant turns
            return Template(saved, saved, patched is not None, False)
        return Template(saved, patched, True, True)

    def _stop_token(self) -> tuple[int, str] | None:
        if self.conversational and self.template.training:
            found = end_of_turn_token(self.tokenizer, self.template.training)
            if found is not None:
                return found
        if self.tokenizer.eos_token_id is None:
            return None
        return self.tokenizer.eos_token_id, self.tokenizer.eos_token

    def rows(self, dataset):
        """Rows in the shape SFT tokenizes, each with a label for the sample header."""
        if self.inference_prompts:
            dataset = inference_prompts(dataset, self.tokenizer)
        if "preference" in self.shape and "label" not in dataset.column_names:
            from trl.data_utils import maybe_extract_prompt

            out = []
            for row in dataset:
                row = maybe_extract_prompt(row)
                out += [({"prompt": row["prompt"], "completion": row[k]}, k) for k in ("chosen", "rejected")]
            return out
        if "label" in dataset.column_names:  # KTO
            return [({"prompt": r["prompt"], "completion": r["completion"]},
                     "desirable" if r["label"] else "undesirable") for r in dataset]
        return [(row, "") for row in dataset]

    def tokenize(self, rows: list[dict]):
        """`rows` tokenized and labelled as the trainer would, before truncation and packing."""
        import datasets

        if "prompt_only" in self.shape:  # nothing is trained on prompts; the policy writes the rest
            return [self._prompt_only(row) for row in rows]
        args = self.args
        if self.renders_masks:
            rows = [tokenize(self.tokenizer, row["messages"], row.get("tools")) for row in rows]
        untruncated = {"max_length": None, "shuffle_dataset": False}  # rows stay in order: labels follow them
        table = to_dataset(rows) if not self.renders_masks else datasets.Dataset.from_list(rows)
        prepared = self._prepare(table, _Override(args, untruncated), "inspect")
        return [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in prepared]

    def _prompt_only(self, row):
        if self.conversational:
            ids = self.tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=True,
                                                     return_dict=True)["input_ids"]
        else:
            ids = self.tokenizer(row["prompt"])["input_ids"]
        return {"input_ids": ids, "labels": [-100] * len(ids)}


class _Override:
    """`args` with some attributes replaced (the TRL config itself stays untouched)."""

    def __init__(self, args, values):
        self._args, self._values = args, values

    def __getattr__(self, name):
        return self._values[name] if name in self._values else getattr(self._args, name)


def percentiles(lengths: list[int]) -> dict:
    ordered = sorted(lengths)

    def at(q):
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return {"p50": at(0.5), "p90": at(0.9), "p99": at(0.99), "max": ordered[-1]}


@dataclass
class SourceStats:
    report: object  # data.SourceReport
    lengths: list[int]  # token lengths of the measured rows
    measured: int  # rows measured (all, or a sample of MEASURED_ROWS)
    truncated: int  # measured rows longer than max_length
    samples: list[tuple[dict, str]]  # tokenized rows to show, with their labels


def sampled(stats: SourceStats) -> str:
    """How the measured rows relate to the source's, for the line showing their lengths."""
    if stats.report.rows is None:
        return f" (the first {stats.measured} rows of the stream)"
    return f" (a sample of {stats.measured})" if stats.measured < stats.report.rows else ""


def source_stats(resolved, sample_rows: int = 0):
    """(view, [SourceStats per train and eval source], the PreparedData training will use)."""
    import random

    resolved.require_paths()  # the model and data it reads (plan and inspect both start here)
    config = resolved.config
    section = config["data"]
    specs = [("train", i, s) for i, s in enumerate(section["train"])]
    specs += [("eval", i, s) for i, s in enumerate(section["eval"] if isinstance(section.get("eval"), list) else [])]
    per_source = []
    for key, index, spec in specs:
        # Each source alone, unweighted: its own rows, format and reason.
        alone = {**section, "train": [{**spec, "weight": 1.0}], "eval": None}
        # A problem of the source (`data.train.0...` here) is located at the source's own key; any other at its key.
        prepared = load_data(alone, method=resolved.method.name, seed=config["seed"], model=config["model"],
                             locate=lambda path, k=key, i=index: resolved.locate(
                                 ("data", k, i) + tuple(path[3:]) if tuple(path[:3]) == ("data", "train", 0) else path))
        per_source.append(prepared)
    data = load_data(config["data"], method=resolved.method.name, seed=config["seed"], locate=resolved.locate,
                     model=config["model"])
    tokenizer = load_tokenizer(config["model"])
    require_chat_template(resolved, data.shape, tokenizer)
    view = TrainingView(resolved, tokenizer, data)
    out = []
    for prepared in per_source:
        if prepared.sources[0].rows is None:  # a stream (data.streaming): measure its first rows
            prepared.train = stream.head(prepared.train, MEASURED_ROWS)
        rows = view.rows(prepared.train)
        measured = rows if len(rows) <= MEASURED_ROWS else random.Random(config["seed"]).sample(rows, MEASURED_ROWS)
        tokenized = view.tokenize([r for r, _ in measured])
        lengths = [len(t["input_ids"]) for t in tokenized]
        over = sum(n > view.max_length for n in lengths) if view.max_length else 0
        per_row = len(rows) // max(len(prepared.train), 1)  # a preference row shows as chosen and rejected
        samples = [(t, label) for t, (_, label) in zip(tokenized, measured)][:sample_rows * per_row]
        out.append(SourceStats(prepared.sources[0], lengths, len(measured), over, samples))
    return view, out, data


def render(tokenizer, tokens: dict, max_length: int | None, color: bool) -> str:
    """The row as text; trained tokens green (a terminal) or in [[ ]] (piped); cut at max_length."""
    ids, labels = tokens["input_ids"], tokens["labels"]
    kept = len(ids) if not max_length else min(len(ids), max_length)
    spans, start = [], 0
    for i in range(1, kept + 1):  # runs of tokens with the same trained/untrained state
        if i == kept or (labels[i] != -100) != (labels[start] != -100):
            spans.append((tokenizer.decode(ids[start:i]), labels[start] != -100))
            start = i
    text = "".join(f"{GREEN}{s}{RESET}" if t and color else f"[[{s}]]" if t else (f"{DIM}{s}{RESET}" if color else s)
                   for s, t in spans)
    if kept < len(ids):
        text += f"\n✂ {len(ids) - kept} more tokens cut at max_length={max_length} (never trained)"
    return text


def inspect(resolved, rows: int = 1, color: bool = False) -> tuple[list[str], list[str]]:
    """(lines to print, warnings) for `llmtune data inspect`."""
    quiet()
    view, sources, data = source_stats(resolved, sample_rows=rows)
    tokenizer = view.tokenizer
    lines, warnings = [], list(data.warnings)
    model_name = resolved.config["model"]["name"]
    if view.conversational:
        lines += _template_lines(resolved, view, warnings)
    stop = view.stop_token
    for stats, mixed in zip(sources, data.sources):
        report = stats.report
        lines.append(f"\nsource {report.path}: {report.format} ({report.reason}), {report.counted}")
        lines += curate.lines(mixed)  # what `data.curate` takes out of this source for the run
        if stats.lengths:
            p = percentiles(stats.lengths)
            lines.append(f"  tokens per row{sampled(stats)}: p50 {p['p50']}, p90 {p['p90']}, p99 {p['p99']}, "
                         f"max {p['max']}; {stats.truncated} longer than max_length {view.max_length}")
        if stats.truncated:
            what = ("packing cuts them at max_length (the rest is dropped)" if view.packing
                    else "the end of each is cut and never trained")
            warnings.append(f"{report.path}: {stats.truncated} of {stats.measured} rows are longer than "
                            f"`data.max_length: {view.max_length}`; {what}. Raise `data.max_length` or shorten them")
        trained_stop = 0
        for n, (tokens, label) in enumerate(stats.samples, 1):
            header = f"  sample {n}{f' ({label})' if label else ''}, trained tokens "
            header += "in green:" if color else "between double brackets:"
            lines.append(header)
            lines += ["    " + line for line in render(tokenizer, tokens, view.max_length, color).split("\n")]
            trained_stop += _stop_trained(tokens, stop)
        if stop and stats.samples and "prompt_only" not in view.shape:
            shown = sum(1 for _ in stats.samples)
            lines.append(f"  stop token {stop[1]!r} (id {stop[0]}): trained in {trained_stop} of {shown} "
                         "sample(s)" + ("" if trained_stop else " — NOT trained"))
            if not trained_stop:
                warnings.append(f"{report.path}: no stop token is trained ({stop[1]!r} never gets a label): the "
                                "model will not learn to stop; the end-of-turn token must be a special token of the "
                                "tokenizer, inside the assistant's {% generation %} block")
    if stop and tokenizer.eos_token and stop[1] != tokenizer.eos_token and "prompt_only" not in view.shape:
        warnings.append(f"the trained stop token {stop[1]!r} is not the tokenizer's eos_token "
                        f"{tokenizer.eos_token!r}: `llmtune generate` stops at both, other inference engines stop "
                        f"at eos_token only; set `train.eos_token: {stop[1]!r}` to make it the eos token")
    if not view.conversational and not stop:
        warnings.append(f"the tokenizer of {model_name} has no eos_token: nothing marks the end of a row")
    return lines, warnings


def _stop_trained(tokens, stop) -> bool:
    return stop is not None and any(token == stop[0] and label != -100
                                    for token, label in zip(tokens["input_ids"], tokens["labels"]))


def _template_lines(resolved, view, warnings) -> list[str]:
    template = view.template
    model = resolved.config["model"]
    source = model.get("chat_template") or f"the tokenizer's own ({model['name']})"
    lines = [f"chat template: {source}"]
    if template.patched:
        lines.append("  training renders with TRL's training version of it ({% generation %} markers added); the "
                     "run directory saves the original, which inference uses")
        differs = _render_difference(view)
        if differs:
            warnings.append(f"the tokenizer's saved chat template (what inference uses) renders differently from the "
                            f"template training uses: {differs}; set `model.chat_template:` to a template with "
                            "{% generation %} markers so both are the same")
    elif view.renders_masks:
        lines.append("  no {% generation %} markers and no TRL training version: assistant turns are found by "
                     "rendering each conversation's prefixes with this template; only they (and their end-of-turn "
                     "token) train")
    elif template.masks_assistant:
        lines.append("  assistant turns are marked with {% generation %}: only they (and their stop token) train"
                     if view.args.assistant_only_loss else "  assistant turns can be marked ({% generation %})")
    elif view.shape == "conversational_language_modeling":  # `train.assistant_only_loss: false`
        lines.append("  every token trains, prompts included (`train.assistant_only_loss: false`)")
    return lines


def _render_difference(view) -> str | None:
    """Where the saved and training templates first render a probe conversation differently, or None."""
    probe = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
             {"role": "assistant", "content": "A"}, {"role": "user", "content": "V"}]
    if not has_system_role(view.tokenizer):  # Gemma 1/2 raise on one; rows get theirs folded (data/masking.py)
        probe = fold_system(probe)
    for messages, gen in ((probe, False), (probe[:2], True)):
        a, b = (view.tokenizer.apply_chat_template(messages, chat_template=t, tokenize=False,
                                                   add_generation_prompt=gen)
                for t in (view.template.saved, view.template.training))
        if a != b:
            at = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            return f"saved {a[max(0, at - 20):at + 30]!r} vs training {b[max(0, at - 20):at + 30]!r}"
    return None

