"""Rows as the tokenizer will see them, checked before a model loads.

Every conversation renders with the chat template training will use: a template may refuse
one (Gemma's "System role not supported", a strict user/assistant alternation), which TRL would
find out after the model has loaded. What a template accepts depends on the roles and their
order, so one conversation per distinct sequence of roles is rendered.

A row whose prompt fills `data.max_length` trains nothing: truncation keeps the start, and its
trained part (the completion, the first assistant turn) is cut away. Such rows are dropped
with a warning (count and first FILE:LINE), so the rows reported as used are the rows trained;
when none is left the run is refused.
"""

from __future__ import annotations

from llmtune.errors import UserError
from llmtune.verbs import METHODS

from ..builtin import build_tiny_tokenizer
from ..paths import named_chat_templates, read_chat_template
from ..tokenizer import byte_bound
from . import masking


def conversations(row: dict) -> list[list[dict]]:
    """The message lists training renders from a converted conversational row."""
    if "messages" in row:
        return [row["messages"]]
    prompt = row.get("prompt") or []
    answers = [row[key] for key in ("completion", "chosen", "rejected") if isinstance(row.get(key), list)]
    return [prompt + answer for answer in answers] or [prompt]


def check_template(sources, shape: str, method: str, model: dict, tokenizer, locate, tried: set | None = None):
    """The checks of conversations against the chat template, before the model loads: the role sequences the
    template refuses (`check_rendering`, a system message folded where it has no system role) and, where
    assistant-only loss renders each turn, the conversations that cannot be cut into turns (masking.check_rows,
    which folds the rows in place). Returns the warnings on what the template does to the rows. `tried`: the role
    sequences rendered, for checking more rows later (a stream's)."""
    if not shape.startswith("conversational") or not tokenizer.chat_template:
        return []  # no template at all: reported by the run's own check (require_chat_template)
    system = masking.has_system_role(tokenizer)
    check_rendering(sources, model, tokenizer, (lambda m: m) if system else masking.fold_system, tried)
    try:
        effects = masking.check_rows(tokenizer, [(s.rows, s.locations) for s in sources],
                                     cut=cuts_turns(method, shape, tokenizer))
    except masking.Undecomposable as err:
        raise undecomposable(err, locate) from None
    return effects.warnings(model.get("chat_template") or model["name"])


def check_rendering(sources, model: dict, tokenizer, prepare=lambda messages: messages, tried=None) -> None:
    """Raise a UserError naming FILE:LINE of the first row of each role sequence the template refuses, each
    conversation rendered as training will (`prepare`: e.g. a system message folded, data/masking.py)."""
    tried = set() if tried is None else tried
    problems = [problem for source in sources
                for problem in refused(zip(source.rows, source.locations), model, tokenizer, prepare, tried)]
    if problems:
        raise UserError(problems)


def refused(rows, model: dict, tokenizer, prepare, tried: set) -> list[str]:
    """`check_rendering`'s problems for (row, FILE:LINE) pairs; `tried` holds the role sequences rendered before."""
    problems = []
    for row, where in rows:
        tools = row.get("tools") or None
        for messages in map(prepare, conversations(row)):
            roles = tuple(m.get("role") for m in messages)
            calls = tools is not None or any(m.get("tool_calls") for m in messages)
            if (roles, calls) in tried:
                continue
            tried.add((roles, calls))
            try:
                tokenizer.apply_chat_template(messages, tools=tools, tokenize=False)
            except Exception as err:  # the template is code (jinja2 and its raise_exception): any error is the data's
                fix = ("the template has no tool support: use a model (or `model.chat_template:`) whose template "
                       "renders tools, or leave tool-calling rows out") if calls or "tool" in roles else (
                    "change such rows (e.g. fold a system message into the first user turn) or set "
                    "`model.chat_template:` to a template that takes them")
                problems.append(f"{where}: the chat template of '{model['name']}' refuses this conversation "
                                f"(roles {', '.join(map(str, roles))}): {err}; {fix}")
    return problems


def _prompt(row: dict):
    """What comes before the first trained token: the prompt, or a conversation's turns before its first
    assistant turn (a list of messages, still to render)."""
    if "messages" not in row:
        return row.get("prompt")
    messages = row["messages"]
    return messages[:next((i for i, m in enumerate(messages) if m.get("role") == "assistant"), len(messages))]


def _prompts(rows, tokenizer) -> list[str | None]:
    """Each row's prompt as text; the conversations without tools rendered in one call, which costs less per
    conversation than a call each."""
    prompts = [_prompt(row) or None for row in rows]
    plain = [i for i, (row, prompt) in enumerate(zip(rows, prompts)) if isinstance(prompt, list) and not row.get("tools")]
    if plain:
        rendered = tokenizer.apply_chat_template([prompts[i] for i in plain], tokenize=False, add_generation_prompt=True)
        for i, text in zip(plain, rendered):
            prompts[i] = text
    for i, (row, prompt) in enumerate(zip(rows, prompts)):
        if isinstance(prompt, list):
            prompts[i] = tokenizer.apply_chat_template(prompt, tools=row["tools"], tokenize=False,
                                                       add_generation_prompt=True)
    return prompts


def fits(rows, max_length: int, tokenizer) -> list[bool]:
    """Whether each row's prompt is shorter than `max_length` tokens, so that some of it is trained. A prompt of
    fewer UTF-8 bytes than `max_length` is, where the tokenizer has no more tokens than bytes (`byte_bound`); the
    others are tokenized in one call: the fast tokenizers encode a batch in parallel."""
    bound = byte_bound(tokenizer)
    prompts = _prompts(rows, tokenizer)
    known = [not prompt or (bound is not None and len(prompt.encode(errors="surrogatepass")) < max_length
                            and bound(prompt)) for prompt in prompts]
    texts = [prompt for prompt, short in zip(prompts, known) if not short]
    lengths = iter(map(len, tokenizer(texts, add_special_tokens=False)["input_ids"]) if texts else ())
    return [short or next(lengths) < max_length for short in known]


def cut_warning(path: str, cut: int, rows: int, first: str, max_length: int, streamed: bool = False) -> str:
    """What `drop_cut` says of `cut` of a source's `rows` (`first`: where the first is)."""
    counted = (f"{cut} of the first {rows} rows of {path} (those checked before streaming)" if streamed
               else f"{cut} of {rows} rows of {path}")
    outcome = ("the trainer drops them, and rows like them further on, as they stream" if streamed
               else "they are left out")
    return (f"{counted} have a prompt of `data.max_length: {max_length}` tokens or more, so nothing of them would "
            f"be trained; {outcome} (the first: {first}). Raise `data.max_length` or shorten the prompts")


def drop_cut(sources, max_length: int, tokenizer, streamed: bool = False) -> list[str]:
    """Drop the rows whose trained part lies beyond `max_length`; return the warnings saying so. Prompt-only rows
    (ppo, grpo, rloo) are the policy's input, not trained: kept. `streamed`: the sources' rows are the heads of
    streams (data/stream.py), checked before training; the rows a stream yields later are not left out."""
    warnings = []
    for source in sources:
        if source.kind[0].endswith("prompt_only"):
            continue
        fit = fits(source.rows, max_length, tokenizer)
        if all(fit):
            continue
        first = source.locations[fit.index(False)]
        warnings.append(cut_warning(source.report.path, fit.count(False), len(fit), first, max_length, streamed))
        source.rows = [row for row, keep in zip(source.rows, fit) if keep]
        source.locations = [at for at, keep in zip(source.locations, fit) if keep]
        source.cut = first
    return warnings


def cuts_turns(method: str, shape: str, tokenizer) -> bool:
    """Whether every conversation must be cut into turns: assistant-only loss found by rendering (masking.py)."""
    return (METHODS[method].assistant_turns and shape == "conversational_language_modeling"
            and masking.masking_mode(tokenizer) == masking.RENDERED)


def undecomposable(err: masking.Undecomposable, locate) -> UserError:
    """The problem of a conversation `masking.check_rows` cannot cut into turns, with the fixes."""
    return UserError(
        f"{err}: training only the assistant's tokens needs each turn cut out of the whole rendering. Split such "
        "conversations into one row per assistant turn, or set `model.chat_template:` to a template with "
        "{% generation %}...{% endgeneration %} around each assistant message and its end-of-turn token"
        f" ({locate(('model', 'name'))})")


def require_trained(train, max_length: int, where: str, checked: int | None = None) -> None:
    """Refuse when `drop_cut` left no training row; `checked`: how many rows the streams' heads held."""
    if not any(source.rows for source in train):
        first = next(source.cut for source in train if source.cut)
        rows = "every row's prompt" if checked is None else \
            f"the prompt of each of the first {checked} rows (those checked before streaming)"
        raise UserError(f"{where}: {rows} fills `data.max_length: {max_length}` tokens, so nothing would "
                        f"be trained (the first: {first}); raise `data.max_length` or shorten the prompts")


# A conversation every chat model takes: system, then two user/assistant exchanges.
PROBE = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is 2+2?"},
         {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"},
         {"role": "assistant", "content": "6"}]
MASKED_BY = {masking.MARKERS: "masked by TRL ({% generation %} markers in the template)",
             masking.TRL_COPY: "masked by TRL (its training copy of the template)",
             masking.RENDERED: "masked by llmtune (by rendering each turn)"}


def named_templates() -> list[tuple[str, str]]:
    """`llmtune templates`: each chat template TRL ships, by the name `model.chat_template:` takes, and how the
    assistant turns of a conversation are found in it for assistant-only loss, or why they cannot be (probed on a
    system + two-turn conversation, as training renders it)."""
    from jinja2 import TemplateError

    tokenizer = build_tiny_tokenizer()
    table = []
    for name in named_chat_templates():
        tokenizer.chat_template = read_chat_template(name)
        mode = masking.masking_mode(tokenizer)
        how = MASKED_BY[mode]
        if mode == masking.RENDERED:
            probe = PROBE if masking.has_system_role(tokenizer) else masking.fold_system(PROBE)
            try:
                masking.assistant_turns(tokenizer, probe)
            except masking.Undecomposable as err:
                how = f"cannot be masked: {err}"
            except TemplateError as err:
                how = f"cannot be masked: it refuses a system + two-turn conversation ({err})"
        table.append((name, how))
    return table
