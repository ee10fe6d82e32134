"""Which tokens a conversation trains, for any chat template, and what the template does to the data.

TRL finds assistant tokens from `{% generation %}` blocks in the template, or from its own training copy of
a template it recognises by exact text (`trl.chat_template_utils.get_training_chat_template`). Other
templates (Llama 3.1-3.3, SmolLM2, Mistral, other revisions of known ones) have neither, so here the
trained spans are found by rendering, with the model's own template:

- the piece of assistant turn i is what `messages[:i + 1]` renders past the generation prompt of
  `messages[:i]` (`add_generation_prompt=True`), up to and including the first special token after the
  assistant's text (the end-of-turn token: what generation stops at; a newline after it is not trained);
  where the generation prompt is not a prefix of that rendering (DeepSeek-R1-Distill's `<think>\n`,
  Mistral-Nemo's system prompt in the last user turn only), the piece starts where the template puts the
  assistant's text;
- each `messages[:i + 1]`, up to that token, must render as a prefix of the whole conversation, so that
  the pieces cut from the whole rendering are those inference produces; a template that rewrites earlier
  turns once later ones follow cannot be cut this way (`Undecomposable`);
- the whole rendering is tokenized once with character offsets; a token is trained when it starts in a piece.

The same renderings show what a template does to the data (`Effects`): a system prompt it drops, a
generation prompt that differs from the context a finished turn renders with (training then sees a context
inference never produces), assistant text it rewrites or adds to (reasoning stripped, an empty
`<think></think>` added), earlier turns it rewrites. Templates without a system role (Gemma 1/2 raise
"System role not supported") get the system text at the start of the first user turn (`fold_system`), as
Gemma's documentation recommends.

Pure functions over a tokenizer and messages: nothing here loads a model or reads a recipe.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from itertools import islice

from llmtune.errors import UserError

# How a run marks assistant tokens (see `masking_mode`).
MARKERS = "markers"  # the template's own {% generation %} blocks
TRL_COPY = "trl"  # TRL's training copy of a template it recognises
RENDERED = "rendered"  # derived here, by rendering prefixes

# Rows whose renderings are compared for `Effects`: enough to count a pattern, cheap on large data.
EFFECT_ROWS = 1000
# Rows of a stream whose roles decide whether it goes to TRL as text (`inference_prompts`), as its head is checked.
HEAD_ROWS = 1000


class Undecomposable(ValueError):
    """The template renders a conversation so that its assistant turns cannot be cut out of the whole."""


def masking_mode(tokenizer) -> str:
    """How assistant-only loss finds the assistant tokens with this tokenizer's chat template."""
    from trl.chat_template_utils import get_training_chat_template

    try:
        patched = get_training_chat_template(tokenizer)
    except ValueError:  # no markers and not a template TRL knows: TRL's SFTTrainer would refuse it
        return RENDERED
    return MARKERS if patched is None else TRL_COPY


def render(tokenizer, messages, generation_prompt=False, tools=None) -> str:
    # A dataset gives every message every key (null where a row had none): render the message as it was written.
    messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
    # `or None`: Llama 3.1's template renders its tool preamble for an empty list.
    return tokenizer.apply_chat_template(messages, tools=tools or None, tokenize=False,
                                         add_generation_prompt=generation_prompt)


def has_system_role(tokenizer) -> bool:
    """False when the template raises on a system message (Gemma 1/2: "System role not supported")."""
    from jinja2 import TemplateError

    try:
        render(tokenizer, [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}])
    except TemplateError:
        return False
    return True


def fold_system(messages: list[dict]) -> list[dict]:
    """`messages` with a leading system message moved to the start of the first user turn."""
    if not messages or messages[0]["role"] != "system":
        return messages
    system, rest = messages[0], list(messages[1:])
    if rest and rest[0]["role"] == "user":
        rest[0] = {**rest[0], "content": f"{system['content']}\n\n{rest[0]['content']}"}
    else:
        rest.insert(0, {**system, "role": "user"})
    return rest


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


def _special_tokens(tokenizer) -> list[str]:
    return [t.content for t in tokenizer.added_tokens_decoder.values() if t.special]


def _called(message) -> list[str]:
    """The names of the functions an assistant message calls."""
    return [call["function"]["name"] for call in message.get("tool_calls") or ()]


def _turn_end(text: str, start: int, message: dict, specials: list[str]) -> int:
    """Where the trained piece starting at `start` ends: after the first special token past the assistant's text
    and its tool calls (the end-of-turn token), else at its last non-space character."""
    piece = text[start:]
    after = 0
    for part in (message["content"].strip(), *_called(message)):
        if part and part in piece[after:]:
            after = piece.index(part, after) + len(part)
    hits = sorted((piece.find(s, after), len(s)) for s in specials if s and piece.find(s, after) >= 0)
    return start + (hits[0][0] + hits[0][1] if hits else len(piece.rstrip()))


# Stands in for an assistant message's text to find where the template puts it.
SENTINEL = "LLMTUNE-ANSWER-7f3a"


def _answer_start(tokenizer, before, upto, tools, i) -> int:
    """Where assistant turn `i`'s text begins in `upto`, found with a stand-in text (templates may trim or cut it)."""
    probe = render(tokenizer, before + [{"role": "assistant", "content": SENTINEL}], tools=tools)
    at = probe.find(SENTINEL)
    if at < 0 or not upto.startswith(probe[:at]):
        raise Undecomposable(f"the chat template does not render assistant turn {i}'s text where its context ends")
    return at


@dataclass
class Turn:
    """One assistant turn of a rendered conversation."""

    start: int  # the trained piece in the whole rendering: [start, end)
    end: int
    context: str  # the generation prompt's tail from where it and the rendered turn part (empty: a prefix)
    trained_context: str  # what training renders there instead, up to the piece
    rendered: str  # the trained piece
    content: str  # the message's own text
    reasoning: str | None = None  # its reasoning_content


def assistant_turns(tokenizer, messages, tools=None) -> tuple[str, list[Turn]]:
    """The whole rendering of `messages` and its assistant turns; Undecomposable when they cannot be cut out."""
    full = render(tokenizer, messages, tools=tools)
    specials = _special_tokens(tokenizer)
    turns, done = [], 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        upto = render(tokenizer, messages[:i + 1], tools=tools)
        context = render(tokenizer, messages[:i], generation_prompt=True, tools=tools) if i else ""
        start = _common_prefix(context, upto)
        if start < len(context):  # the generation prompt is not what training renders: start at the answer
            start = _answer_start(tokenizer, messages[:i], upto, tools, i)
        end = _turn_end(upto, start, message, specials)
        # The turn as rendered alone (up to its end-of-turn token: a template may close the conversation after
        # it) must be what the whole conversation renders, or cutting the whole would train other text.
        if not full.startswith(upto[:end]):
            at = _common_prefix(full, upto)
            raise Undecomposable(
                f"the chat template renders assistant turn {i} differently once later turns follow "
                f"({upto[at:at + 40]!r} alone, {full[at:at + 40]!r} in the whole conversation)")
        if start < done:
            raise Undecomposable(f"the generation prompt for assistant turn {i} rewrites the conversation before "
                                 f"it ({context[start:start + 40]!r} where the turn renders "
                                 f"{upto[start:start + 40]!r})")
        diverged = _common_prefix(context, upto)
        turns.append(Turn(start, end, context[diverged:], upto[diverged:start], upto[start:end], message["content"],
                          message.get("reasoning_content")))
        done = end
    return full, turns


# The answer columns of prompt + answer rows (prompt-completion, preference, KTO).
ANSWER_COLUMNS = ("completion", "chosen", "rejected")


def _bos_text(tokenizer) -> str:
    """What the tokenizer puts before any text it encodes (a BOS), as text; TRL's text path adds it itself."""
    ids = tokenizer(SENTINEL)["input_ids"]
    plain = tokenizer(SENTINEL, add_special_tokens=False)["input_ids"]
    return tokenizer.decode(ids[:ids.index(plain[0])]) if plain and plain[0] in ids else ""


def as_text(tokenizer, row: dict, bos: str = "") -> tuple[dict, bool]:
    """A conversational prompt + answer(s) row (its prompt explicit) as text TRL tokenizes the same way, and whether
    its prompt is the rendered generation prompt (True) rather than the start TRL's conversational cut would keep.

    TRL renders the prompt with the generation prompt and the whole conversation, and starts the completion where
    the two part. Where they part inside the prompt's messages, before its generation prompt (Mistral-Nemo puts the
    system prompt in the last user turn only, so the prompt alone renders it and the whole conversation does not),
    that cut would train the prompt's text: the context is then the prompt as inference renders it, and each answer
    the template's rendering from where it puts the answer's text. Where they part inside the generation prompt,
    the assistant turn opens as the template renders a finished one, and the text is cut where TRL cuts it
    (DeepSeek-R1-Distill's generation prompt ends `<think>\n`, which a finished turn leaves out; Nemotron 3's
    `<think>\n` is `<think></think>` there: the turn trains from that closing tag). `bos` (`_bos_text`) is taken off
    the prompt: the tokenizer adds it.
    """
    prompt, tools = row["prompt"], row.get("tools")
    keys = [key for key in ANSWER_COLUMNS if isinstance(row.get(key), list)]
    context = render(tokenizer, prompt, generation_prompt=True, tools=tools)
    wholes = {key: render(tokenizer, prompt + row[key], tools=tools) for key in keys}
    cut = min(_common_prefix(context, whole) for whole in wholes.values())
    # The generation prompt begins where the prompt rendered without it parts from the prompt rendered with it.
    inference = cut < len(context) and cut < _common_prefix(context, render(tokenizer, prompt, tools=tools))
    if inference:
        try:
            start = _answer_start(tokenizer, prompt, next(iter(wholes.values())), tools, len(prompt))
        except Undecomposable:  # the answer is not where the prompt ends either: TRL's cut, as for any template
            inference = False
    text = {key: whole[start:] if inference else whole[cut:] for key, whole in wholes.items()}
    text["prompt"] = context if inference else context[:cut]
    if bos and text["prompt"].startswith(bos):
        text["prompt"] = text["prompt"][len(bos):]
    return {**{k: v for k, v in row.items() if k not in ("tools", "messages")}, **text}, inference


def inference_prompts(dataset, tokenizer):
    """`dataset` as text rows (`as_text`) when the template renders a row's prompt differently before its answer than
    inference does, so that TRL trains the answer after the prompt inference uses; else `dataset` itself (TRL renders
    it, as always). Rows that do not need it get TRL's own cut, so their tokens do not change. A stream
    (`data.streaming`) is decided by its first `HEAD_ROWS` rows and by prompts they may not show (`_probes`), and
    converted as it is read."""
    import datasets
    from trl.data_utils import is_conversational, maybe_extract_prompt

    streamed = isinstance(dataset, datasets.IterableDataset)
    if not streamed and not isinstance(dataset, datasets.Dataset):
        return dataset
    head = list(islice(dataset, HEAD_ROWS)) if streamed else dataset
    if not len(head) or not is_conversational(head[0]) or not set(ANSWER_COLUMNS) & set(head[0]):
        return dataset
    rows = dataset
    if "prompt" not in head[0]:  # preference rows with the prompt in chosen/rejected: as TRL splits them
        rows = rows.map(maybe_extract_prompt)
        head = [maybe_extract_prompt(row) for row in head] if streamed else rows
    # Whether a template renders a prompt differently depends on the roles and their order (templates.py checks
    # rows the same way): one row of each sequence of roles decides, not a rendering of every row.
    shapes = {}
    for row in head:
        shapes.setdefault(tuple(tuple(m["role"] for m in row[k]) if isinstance(row.get(k), list) else None
                                for k in ("prompt", *ANSWER_COLUMNS)) + (bool(row.get("tools")),), row)
    bos = _bos_text(tokenizer)
    if not any(as_text(tokenizer, row, bos)[1] for row in shapes.values()) and \
            not (streamed and any(_needs_text(tokenizer, row, bos) for row in _probes(head[0]))):
        return dataset
    text = partial(_text_row, tokenizer, bos)
    if streamed:  # a stream's columns are not known after a map: the text rows' are given
        return rows.map(text, remove_columns=list(head[0]),
                        features=datasets.Dataset.from_list([text(head[0])]).features)
    return rows.map(text, remove_columns=rows.column_names)


# Prompts a stream's later rows may have that its head did not show (a system prompt: Mistral-Nemo's case).
_PROBED_PROMPTS = (("system", "user"), ("user", "assistant", "user"), ("system", "user", "assistant", "user"))


def _probes(row: dict) -> list[dict]:
    """Rows like `row` with each of the prompts above: a stream's rows cannot turn into text after its first ones, so
    where the template needs text for any of them, the whole stream goes as text (the tokens of rows that need no
    text do not change)."""
    answers = {key: [{"role": "assistant", "content": "a"}] for key in ANSWER_COLUMNS if isinstance(row.get(key), list)}
    return [{**row, "prompt": [{"role": role, "content": role[0]} for role in roles], **answers}
            for roles in _PROBED_PROMPTS]


def _needs_text(tokenizer, row: dict, bos: str) -> bool:
    from jinja2 import TemplateError

    try:
        return as_text(tokenizer, row, bos)[1]
    except TemplateError:  # a prompt the template refuses (Gemma's system message): such rows are refused, not trained
        return False


def _text_row(tokenizer, bos, row):
    return as_text(tokenizer, row, bos)[0]


def tokenize(tokenizer, messages, tools=None) -> dict:
    """`input_ids` of the whole conversation and `assistant_masks` (1 = trained), as TRL's SFTTrainer takes them."""
    full, turns = assistant_turns(tokenizer, messages, tools)
    encoded = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    mask = [int(any(t.start <= begin < t.end for t in turns)) for begin, _ in encoded["offset_mapping"]]
    return {"input_ids": encoded["input_ids"], "assistant_masks": mask}


@dataclass
class Effects:
    """What a chat template does to the rows, counted over the rows looked at, with one example each."""

    rows: int = 0
    system_rows: int = 0  # rows with a system message
    system_dropped: int = 0
    context_differs: int = 0
    context_example: str = ""
    rewritten: int = 0  # assistant text changed (e.g. reasoning stripped)
    rewritten_example: str = ""
    reasoning_dropped: int = 0  # turns whose reasoning_content is not rendered
    added: int = 0  # text added before the assistant's own (e.g. an empty <think></think>)
    added_example: str = ""
    earlier: int = 0  # earlier turns render differently once later turns follow
    earlier_example: str = ""
    folded: int = 0  # rows whose system message went into the first user turn
    inference: int = 0  # prompt + answer rows trained after their generation prompt (`as_text`)
    inference_example: str = ""

    def look(self, tokenizer, messages, tools=None, prompt=None) -> None:
        """Count what the template does to one conversation (rendered as training renders it); `prompt`: the messages
        of a prompt + answer row before its answer."""
        self.rows += 1
        whole = render(tokenizer, messages, tools=tools)
        if prompt is not None:
            text, inference = as_text(tokenizer, {"prompt": prompt, "completion": messages[len(prompt):],
                                                  "tools": tools})
            if inference:  # trained after the prompt as inference renders it: no other context to report
                at = _common_prefix(text["prompt"], whole)
                self.inference += 1
                self.inference_example = self.inference_example or (
                    f"{text['prompt'][at:at + 40]!r} alone, {whole[at:at + 40]!r} before the answer")
                return
        system = next((m["content"].strip() for m in messages if m["role"] == "system"), None)
        if system:
            self.system_rows += 1
            if system not in whole:
                self.system_dropped += 1
        try:
            _, turns = assistant_turns(tokenizer, messages, tools)
        except Undecomposable as err:
            self.earlier += 1
            self.earlier_example = self.earlier_example or str(err)
            return
        for turn in turns:
            if turn.context:
                self.context_differs += 1
                self.context_example = self.context_example or (
                    f"the generation prompt ends {turn.context[:40]!r} where training renders "
                    f"{(turn.trained_context + turn.rendered)[:40]!r}")
            content, reasoning = turn.content.strip(), (turn.reasoning or "").strip()
            if reasoning and reasoning not in turn.rendered:
                self.reasoning_dropped += 1
            if content and content not in turn.rendered:
                self.rewritten += 1
                self.rewritten_example = self.rewritten_example or f"{content[:40]!r} renders as {turn.rendered[:60]!r}"
            elif content and turn.rendered[:turn.rendered.find(content)].strip() and not reasoning:
                self.added += 1
                self.added_example = self.added_example or turn.rendered[:turn.rendered.find(content)]

    def warnings(self, name: str) -> list[str]:
        """One line per effect found, saying what it means for the trained model."""
        out = []
        if self.folded:
            out.append(f"the chat template of {name} has no system role: the system message of {self.folded} row(s) "
                       "is put at the start of the first user turn (as Gemma's documentation recommends); "
                       "`llmtune generate --system` does the same")
        if self.system_dropped:
            out.append(f"the chat template of {name} drops the system prompt from {self.system_dropped} of "
                       f"{self.system_rows} row(s) with one (as rendered for training): those rows train without "
                       "it, while inference may use it")
        if self.inference:
            out.append(f"the chat template of {name} renders the prompt differently before the answer than alone "
                       f"({self.inference} prompt row(s)): {self.inference_example} (e.g. a system prompt in the last "
                       "user turn only); those rows train the answer after the prompt as inference renders it")
        if self.context_differs:
            out.append(f"the chat template of {name} renders a finished assistant turn after a different context "
                       f"than its generation prompt ({self.context_differs} turn(s)): {self.context_example}; the "
                       "model trains on a context inference never produces")
        if self.rewritten:
            out.append(f"the chat template of {name} rewrites the assistant's text in {self.rewritten} turn(s) "
                       f"(e.g. strips reasoning): {self.rewritten_example}; only the rendered text is trained")
        if self.reasoning_dropped:
            out.append(f"the chat template of {name} does not render the reasoning_content of {self.reasoning_dropped} "
                       "assistant turn(s): the template leaves it out, so it is not trained")
        if self.added:
            out.append(f"the chat template of {name} adds {self.added_example!r} before the assistant's text in "
                       f"{self.added} turn(s): it is trained as part of the answer")
        if self.earlier:
            out.append(f"the chat template of {name} rewrites earlier turns once later ones follow in {self.earlier} "
                       f"row(s) (e.g. strips their reasoning): {self.earlier_example}; multi-turn rows train "
                       "earlier answers in a form inference does not produce")
        return out


# Row columns that hold conversations (TRL's conversational shapes).
CONVERSATION_COLUMNS = ("messages", "prompt", "completion", "chosen", "rejected")


def _conversation(row) -> list | None:
    """The row as training renders it: its messages, or its prompt followed by its (chosen) completion."""
    if "messages" in row:
        return row["messages"]
    answer = row.get("completion") or row.get("chosen")
    return row["prompt"] + answer if isinstance(row.get("prompt"), list) and isinstance(answer, list) else None


def unrendered_tools(tokenizer, messages, tools) -> str | None:
    """What of a tool-calling conversation the chat template leaves out (a template without tool support renders
    no tool schemas, or drops an assistant's calls), or None."""
    if tools:
        full = render(tokenizer, messages, tools=tools)
        missing = [t.get("function", t)["name"] for t in tools if t.get("function", t)["name"] not in full]
        if missing:
            return f"it does not render the row's `tools` (no {', '.join(map(repr, missing))} in the rendering)"
    for i, message in enumerate(messages):
        if message["role"] == "assistant" and message.get("tool_calls"):
            before = render(tokenizer, messages[:i], tools=tools) if i else ""
            upto = render(tokenizer, messages[:i + 1], tools=tools)
            turn = upto[_common_prefix(before, upto):]
            missing = [name for name in _called(message) if name not in turn]
            if missing:
                return f"it drops the tool calls of messages[{i}] ({', '.join(map(repr, missing))} not rendered)"
    return None


def has_system(row: dict) -> bool:
    """Whether a conversation of the row opens with a system message."""
    return any(isinstance(row.get(c), list) and row[c] and row[c][0]["role"] == "system" for c in CONVERSATION_COLUMNS)


def folded(row: dict) -> dict:
    """The row with the leading system message of each of its conversations folded into the first user turn."""
    return {k: fold_system(v) if k in CONVERSATION_COLUMNS and isinstance(v, list) else v for k, v in row.items()}


def check_rows(tokenizer, sources, *, cut: bool, effects: Effects | None = None, fold: bool | None = None) -> Effects:
    """Fold system messages where the template has no system role, count what the template does to the rows, and
    with `cut` (assistant-only loss by rendering, `RENDERED`) require every conversation to be cut into turns.

    `sources` is a list of (rows, locations) pairs; rows are replaced in place. Raises Undecomposable with the
    FILE:LINE of the first row that cannot be cut. `effects`: counts to go on with (rows checked a chunk at a time).
    `fold`: whether the template lacks a system role, where the caller knows it (a stream checks a row at a time).
    """
    effects = Effects() if effects is None else effects
    fold = not has_system_role(tokenizer) if fold is None else fold
    for rows, locations in sources:
        for n, row in enumerate(rows):
            if fold and has_system(row):
                effects.folded += 1
                rows[n] = row = folded(row)
            messages = _conversation(row)
            if messages is None:
                continue
            unrendered = unrendered_tools(tokenizer, messages, row.get("tools")) \
                if row.get("tools") or any(m.get("tool_calls") for m in messages) else None
            if unrendered:
                raise UserError(f"{locations[n]}: a tool-calling row, but the model's chat template has no tool "
                                f"support: {unrendered}, so the calls would not be trained as written; use a model "
                                "(or `model.chat_template:`) whose template renders tools, or leave such rows out")
            if effects.rows < EFFECT_ROWS:
                effects.look(tokenizer, messages, row.get("tools"), None if "messages" in row else row["prompt"])
            if cut:
                try:
                    assistant_turns(tokenizer, messages, row.get("tools"))
                except Undecomposable as err:
                    raise Undecomposable(f"{locations[n]}: {err}") from None
    return effects


def pretokenized(dataset, tokenizer):
    """A `messages` dataset as `input_ids` + `assistant_masks` rows, which TRL's SFTTrainer turns into labels."""
    return dataset.map(lambda row: tokenize(tokenizer, row["messages"], row.get("tools")),
                       remove_columns=list(dataset.column_names))


def renders_masks(args, shape: str, tokenizer) -> bool:
    """Whether an SFT run (`args`: its SFTConfig) masks by rendering here rather than through TRL."""
    return bool(args.assistant_only_loss) and shape == "conversational_language_modeling" and \
        masking_mode(tokenizer) == RENDERED
