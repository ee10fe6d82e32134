"""Every conversation renders with the chat template training will use.

A template may refuse a conversation (Gemma's "System role not supported", a strict
user/assistant alternation); TRL would find out after the model has loaded. What a template
accepts depends on the roles and their order, so one conversation per distinct sequence of
roles is rendered: cheap on a million rows, and the first such row is the one named.
"""

from __future__ import annotations

from llmtune.errors import UserError


def conversations(row: dict) -> list[list[dict]]:
    """The message lists training renders from a converted conversational row."""
    if "messages" in row:
        return [row["messages"]]
    prompt = row.get("prompt") or []
    answers = [row[key] for key in ("completion", "chosen", "rejected") if isinstance(row.get(key), list)]
    return [prompt + answer for answer in answers] or [prompt]


def check_rendering(sources, model: dict) -> None:
    """Raise a UserError naming FILE:LINE of the first row of each role sequence the template refuses."""
    from llmtune.model import load_tokenizer

    tokenizer = load_tokenizer(model)
    if not tokenizer.chat_template:
        return  # no template at all: reported by the run's own check (require_chat_template)
    tried, problems = set(), []
    for source in sources:
        for row, where in zip(source.rows, source.locations):
            for messages in conversations(row):
                roles = tuple(m.get("role") for m in messages)
                if roles in tried:
                    continue
                tried.add(roles)
                try:
                    tokenizer.apply_chat_template(messages, tokenize=False)
                except Exception as err:  # the template is code (jinja2 and its raise_exception): any error is the data's
                    problems.append(f"{where}: the chat template of '{model['name']}' refuses this conversation "
                                    f"(roles {', '.join(map(str, roles))}): {err}; change such rows (e.g. fold a "
                                    "system message into the first user turn) or set `model.chat_template:` to a "
                                    "template that takes them")
    if problems:
        raise UserError(problems)
