"""The tokenizer: loading it (with the recipe's chat template), and what its chat template implies.

Shared by training, `inspect`, `generate`/`chat` and `export`, so all of them see the same template
and the same end-of-turn token.
"""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING

from .builtin import builtin_tokenizer, model_path
from .errors import UserError
from .paths import read_chat_template

if TYPE_CHECKING:
    from .recipe.check import Resolved

GENERATION_TAG = re.compile(r"\{%-?\s*(end)?generation\s*-?%\}")


def load_tokenizer(model: dict):
    from transformers import AutoTokenizer

    tokenizer = builtin_tokenizer(model) or AutoTokenizer.from_pretrained(
        model_path(model), revision=model.get("revision"), trust_remote_code=model["trust_remote_code"])
    if model.get("chat_template"):
        tokenizer.chat_template = read_chat_template(model["chat_template"])
    if tokenizer.pad_token is None:  # batching needs one; the EOS token is the usual stand-in
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def byte_bound(tokenizer):
    """A test that a text passes only if it has no more tokens than UTF-8 bytes (so that a short text needs no
    tokenizing to be known short), or None where the tokenizer gives no such bound. A byte-level BPE (Llama 3,
    Qwen, GPT-2, Phi-4) turns each byte into a symbol and merges symbols, so each token stands for one byte or
    more; a Unicode normalizer (Qwen's NFC) leaves ASCII as it is but may lengthen other text. Sentencepiece-style
    pipelines (Gemma, Mistral, Llama 2: a space becomes '▁', a prefix is added) and others give no bound."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or type(backend.model).__name__ != "BPE" or backend.pre_tokenizer is None:
        return None
    steps = _parts(backend.pre_tokenizer, "pretokenizers")
    if not any(step["type"] == "ByteLevel" for step in steps) or any(
            step["type"] not in ("ByteLevel", "Split", "Digits") or step.get("add_prefix_space") for step in steps):
        return None
    if backend.normalizer is None:
        return lambda text: True
    if all(step["type"] in ("NFC", "NFD", "NFKC", "NFKD") for step in _parts(backend.normalizer, "normalizers")):
        return str.isascii
    return None


def _parts(component, key: str) -> list[dict]:
    """The steps of a tokenizers pre-tokenizer or normalizer, a Sequence or one, as their JSON."""
    state = json.loads(component.__getstate__())
    return state.get(key, [state]) if state.get("type") == "Sequence" else [state]


def end_of_turn_token(tokenizer, chat_template: str | None = None) -> tuple[int, str] | None:
    """The special token a chat template closes an assistant turn with, as (id, text), or None."""
    content = "LLMTUNE_PROBE"
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": content}],
            chat_template=chat_template, tokenize=False)
    except Exception:  # a template that needs other roles or keys: no probe, fall back to eos
        return None
    if content not in text:
        return None
    suffix = text[text.rindex(content) + len(content):]
    special = set(tokenizer.get_added_vocab().values()) | set(tokenizer.all_special_ids)
    for token_id in tokenizer(suffix, add_special_tokens=False)["input_ids"]:
        if token_id in special:
            return token_id, tokenizer.convert_ids_to_tokens(token_id)
    return None


def stop_token_ids(model, tokenizer) -> list[int]:
    """The model's eos tokens plus the chat template's end-of-turn token."""
    configured = getattr(model.generation_config, "eos_token_id", None)
    ids = [configured] if isinstance(configured, int) else list(configured or [])
    extra = [tokenizer.eos_token_id]
    if tokenizer.chat_template:
        turn = end_of_turn_token(tokenizer)
        extra.append(turn and turn[0])
    return ids + [i for i in extra if i is not None and i not in ids]


def stop_at_end_of_turn(model, tokenizer) -> None:
    """Give the model's generation config the chat template's end-of-turn token as an eos: serving stacks
    (transformers' `generate`, vLLM, TGI) stop at generation_config.json's `eos_token_id`, and a family's
    end of turn is often not its eos (Gemma's `<end_of_turn>`, Phi-3's `<|end|>`)."""
    model.generation_config.eos_token_id = stop_token_ids(model, tokenizer)


def require_chat_template(resolved: Resolved, shape: str, tokenizer) -> None:
    if shape.startswith("conversational") and not tokenizer.chat_template:
        raise UserError(f"{resolved.locate(('model', 'name'))}: the data is conversational but the tokenizer of "
                        f"'{resolved.config['model']['name']}' has no chat template; set `model.chat_template:` to "
                        "a named template or a .jinja file")
