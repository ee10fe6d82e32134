"""An Ollama Modelfile for an exported GGUF: the run's own chat template as an Ollama (Go) template.

A Jinja chat template is a program, so it is not translated. It is rendered on conversations whose
contents are sentinels, and the text between the sentinels gives what each role's turn puts before
and after its content, the text before the first turn, the generation prompt and any default
system message. Those pieces make a Go template that ranges over Ollama's `.Messages`. It is kept
only if the pieces reproduce transformers' rendering of other conversations exactly (with and
without a system message, one to three turns, a prefilled answer, content with newlines, quotes and
braces). A template that does more than that (reasoning stripped from content, dates, role
tricks) gets no Modelfile and a warning: a wrong template silently degrades answers
(LLaMA-Factory#6020), a missing one is easy to write by hand.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..tokenizer import GENERATION_TAG

ROLES = ("system", "user", "assistant")


class NotDecomposable(Exception):
    """The chat template is not a fixed prefix and suffix around each turn's content."""


@dataclass
class Turns:
    head: str  # before the first message (without the BOS llama.cpp adds itself)
    prefix: dict  # role -> text before its content
    suffix: dict  # role -> text after its content (left off a final assistant turn: Ollama continues it)
    generation: str  # after the last message when it is not the assistant's
    # The default system message: Ollama inserts the Modelfile's SYSTEM as one when a chat has none.
    # "" is a system turn the template writes, empty, into every chat that has none (Llama 3.1's).
    system: str | None

    def messages(self, conversation: list[dict]) -> list[dict]:
        """The messages Ollama hands the template: the Modelfile's SYSTEM first when there is none."""
        if self.system and (not conversation or conversation[0]["role"] != "system"):
            return [{"role": "system", "content": self.system}, *conversation]
        return conversation

    def render(self, messages: list[dict]) -> str:
        """What `go_template()` renders for `messages`."""
        text = self.head
        if self.system == "" and messages and messages[0]["role"] != "system":
            text += self.prefix["system"] + self.suffix["system"]
        for i, message in enumerate(messages):
            role, last = message["role"], i == len(messages) - 1
            if role in self.prefix:
                text += self.prefix[role] + message["content"]
                text += "" if last and role == "assistant" else self.suffix[role]
            if last and role != "assistant":
                text += self.generation
        return text

    def go_template(self) -> str:
        """The Ollama TEMPLATE. Literal text never touches a `{{-`, which would trim its whitespace."""
        branches = []
        for role in (r for r in ROLES if r in self.prefix):
            end = "{{ if not $last }}" + _literal(self.suffix[role]) + "{{ end }}" if role == "assistant" \
                else _literal(self.suffix[role])
            keyword = "{{- if" if not branches else "{{ else if"
            branches.append(f'{keyword} eq .Role "{role}" }}}}{_literal(self.prefix[role])}{{{{ .Content }}}}{end}')
        empty = "" if self.system != "" else ('{{ if and .Messages (ne (index .Messages 0).Role "system") }}'
                                              + _literal(self.prefix["system"] + self.suffix["system"]) + "{{ end }}")
        return (_literal(self.head) + empty + "{{ range $i, $_ := .Messages }}\n"
                "{{- $last := eq (len (slice $.Messages $i)) 1 }}\n"
                + "".join(branches) + "{{ end }}\n"
                '{{- if and $last (ne .Role "assistant") }}' + _literal(self.generation) + "{{ end }}\n"
                "{{- end }}")


def _raw_ok(text: str) -> bool:
    """Text Ollama's Modelfile parser keeps as it is inside \"\"\"...\"\"\" (it drops unprintable characters)."""
    return all(ch.isprintable() or ch in "\n\t" for ch in text) and '"""' not in text


def _literal(text: str) -> str:
    """Template text for `text`: as it is, or as a Go string when braces, quotes or unprintables could misparse."""
    if _raw_ok(text) and "{" not in text and '"' not in text:
        return text
    escaped = {"\n": "\\n", "\t": "\\t", '"': '\\"', "\\": "\\\\"}
    return '{{ "' + "".join(escaped.get(ch) or (ch if ch.isprintable() else f"\\U{ord(ch):08x}")
                           for ch in text) + '" }}'


# Sentinel contents: plain words no chat template contains, so each is found exactly where it was put.
S, U1, A1, U2 = "LLMTUNEsys0", "LLMTUNEusr1", "LLMTUNEast1", "LLMTUNEusr2"


def _render(tokenizer, template: str, messages: list[dict], **kwargs) -> str:
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False, **kwargs)


def _cut(text: str, contents: list[str]) -> list[str]:
    """The text before, between and after the contents, which must appear in order, each once."""
    pieces, at = [], 0
    for content in contents:
        i = text.find(content, at)
        if i < 0 or content in text[i + 1:]:
            raise NotDecomposable("it drops, rewrites or repeats message content")
        pieces.append(text[at:i])
        at = i + len(content)
    return pieces + [text[at:]]


def _common_prefix(texts: list[str], specials: list[str]) -> str:
    """The longest common prefix, not ending inside a special token ("<|end|>\\n<|" -> "<|end|>\\n")."""
    n, moved = len(os.path.commonprefix(texts)), True
    while moved:
        moved = False
        for text in texts:
            for token in specials:
                start = text.find(token, max(0, n - len(token) + 1))
                if -1 < start < n:
                    n, moved = start, True
    return texts[0][:n]


def _strip(text: str, prefix: str = "", suffix: str = "") -> str:
    if not (text.startswith(prefix) and text.endswith(suffix) and len(text) >= len(prefix) + len(suffix)):
        raise NotDecomposable("a turn's text depends on the turns around it")
    return text[len(prefix):len(text) - len(suffix)]


def decompose(tokenizer, template: str, adds_bos: bool) -> tuple[Turns, list[str]]:
    """Per-role pieces of `template`, verified against transformers' rendering, and notes on their limits."""
    if "strftime_now" in template:
        raise NotDecomposable("it writes today's date, which a fixed template would freeze")
    if any(s in template for s in (S, U1, A1, U2)):
        raise NotDecomposable("it contains llmtune's probe text")
    specials = sorted(set(tokenizer.get_added_vocab()) | set(tokenizer.all_special_tokens), key=len)
    user, assistant, user2 = {"role": "user", "content": U1}, {"role": "assistant", "content": A1}, \
        {"role": "user", "content": U2}
    try:
        start_u, u_a, a_u, end_gen_u = _cut(_render(tokenizer, template, [user, assistant, user2],
                                                    add_generation_prompt=True), [U1, A1, U2])
        _, end_u = _cut(_render(tokenizer, template, [user]), [U1])
        _, _, end_a = _cut(_render(tokenizer, template, [user, assistant]), [U1, A1])
    except NotDecomposable:
        raise
    except Exception as err:  # the template refuses a plain user/assistant conversation
        raise NotDecomposable(f"it fails on a plain user/assistant conversation ({err})") from None
    suffix = {"user": _common_prefix([end_gen_u, u_a, end_u], specials),
              "assistant": _common_prefix([a_u, end_a], specials)}
    prefix = {"user": _strip(a_u, suffix["assistant"]), "assistant": _strip(u_a, suffix["user"])}
    generation = _strip(end_gen_u, suffix["user"])
    head = _strip(start_u, "", prefix["user"])
    system, notes = None, []
    try:
        start_s, s_u, _, _, _ = _cut(_render(tokenizer, template, [{"role": "system", "content": S}, user,
                                                                    assistant, user2], add_generation_prompt=True),
                                     [S, U1, A1, U2])
    except NotDecomposable:
        raise
    except Exception:  # e.g. Gemma's "System role not supported"
        notes.append("the chat template takes no system message: Ollama's system messages are left out")
    else:
        suffix["system"] = _strip(s_u, "", prefix["user"])
        if start_s.startswith(head):
            prefix["system"] = start_s[len(head):]
        else:  # the template writes a default system turn when there is none: `head` holds it
            default = _strip(head, start_s, suffix["system"])
            bos = tokenizer.bos_token or ""
            head = bos if bos and start_s.startswith(bos) else ""
            prefix["system"], system = start_s[len(head):], default
    # llama.cpp puts BOS before every prompt when the tokenizer adds one: the template must not write it again.
    bos = tokenizer.bos_token if adds_bos and tokenizer.bos_token and head.startswith(tokenizer.bos_token) else ""
    if adds_bos and not bos:
        notes.append("llama.cpp and Ollama start every prompt with BOS, as the tokenizer adds one, but this chat "
                     "template's text does not begin with it: the model sees one token more than in training")
    turns = Turns(head[len(bos):], prefix, suffix, generation, system)
    notes += _verify(tokenizer, template, turns, bos)
    return turns, notes


def _conversations(system: bool) -> list[tuple[list[dict], bool]]:
    """(messages, ends in a prefilled assistant turn) pairs the pieces must reproduce."""
    texts = ["Hello there", "two\nlines", 'quotes " and {braces} {{ x }} """', "<think>Hm.</think>ünïcödé ✓", "x",
             "Bye."]
    chats = []
    for turns in (1, 2, 3):
        chat = []
        for i in range(turns):
            chat += [{"role": "user", "content": texts[2 * i]}, {"role": "assistant", "content": texts[2 * i + 1]}]
        chats += [(chat[:-1], False), (chat, True)]
    with_system = [([{"role": "system", "content": "Be brief.\nAlways."}, *chat], prefill) for chat, prefill in chats]
    return chats + (with_system if system else [])


def _verify(tokenizer, template: str, turns: Turns, bos: str) -> list[str]:
    """Notes on what the pieces cannot do; NotDecomposable if they render a conversation otherwise than Jinja.

    `bos` is the BOS text taken off the head, which llama.cpp adds as a token instead."""

    def ours(chat, strip=False):
        chat = [{**m, "content": m["content"].strip()} for m in chat] if strip else chat
        return bos + turns.render(turns.messages(chat))

    def theirs(chat, prefill):
        return _render(tokenizer, template, chat, add_generation_prompt=not prefill, continue_final_message=prefill)

    for chat, prefill in _conversations("system" in turns.prefix):
        try:
            expected = theirs(chat, prefill)
        except Exception as err:
            raise NotDecomposable(f"it fails on a {len(chat)}-message conversation ({err})") from None
        if ours(chat) != expected:
            raise NotDecomposable(f"its rendering of a {len(chat)}-message conversation is not a fixed text "
                                  "around each message")
    padded = [{"role": "user", "content": "  Hi \n"}]
    expected = theirs(padded, False)
    if ours(padded) == expected:
        return []
    if ours(padded, strip=True) == expected:
        return ["the chat template strips whitespace around each message and Ollama's template language cannot: "
                "a message with leading or trailing whitespace reaches the model unstripped"]
    raise NotDecomposable("it rewrites message content")


def modelfile(tokenizer, gguf: Path, stop_ids: list[int], adds_bos: bool) -> tuple[str, list[str]]:
    """The Modelfile text for `gguf` and notes on its limits; NotDecomposable says why there is none."""
    template = tokenizer.chat_template
    if not template:
        raise NotDecomposable("the run's tokenizer has no chat template (a Modelfile with only "
                              f"`FROM ./{gguf.name}` sends prompts to the model as they are)")

    template = GENERATION_TAG.sub("", template)  # training-only markers
    try:
        turns, notes = decompose(tokenizer, template, adds_bos)
        if turns.system and not _raw_ok(turns.system):
            raise NotDecomposable("its default system message has characters a Modelfile cannot hold")
    except NotDecomposable as err:
        raise NotDecomposable(f"the chat template cannot be written as an Ollama template: {err}. The GGUF itself "
                              "is fine and carries the template for llama.cpp; for Ollama, write the Modelfile's "
                              "TEMPLATE by hand (see Ollama's docs/template.mdx)") from None
    stops = [t for t in tokenizer.convert_ids_to_tokens(stop_ids) if t and _raw_ok(t) and '"' not in t]
    lines = ["# Written by `llmtune export`: the run's chat template as an Ollama template, checked against",
             "# transformers' rendering. Create the model with: ollama create NAME -f THIS_FILE",
             f"FROM ./{gguf.name}", f'TEMPLATE """{turns.go_template()}"""']
    if turns.system:
        lines.append(f'SYSTEM """{turns.system}"""')
    lines += [f'PARAMETER stop "{stop}"' for stop in dict.fromkeys(stops)]
    return "\n".join(lines) + "\n", notes
