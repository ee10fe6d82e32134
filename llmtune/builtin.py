"""`builtin:tiny`: a 2-layer Llama-shaped model with a byte-level tokenizer, built offline.

Built from a fixed seed and saved once under the llmtune cache, so the quickstart and the tests
run offline and a run directory made from it reloads like any other.
"""

from __future__ import annotations

from pathlib import Path

from .errors import UserError
from .files import BUILTIN_PREFIX, staged_folder
from .paths import cache_dir

TINY_VERSION = "tiny-v2"  # bump when the builtin model or tokenizer changes


# Assistant turns sit inside {% generation %} so TRL can train only them, and the stop
# token <|end|> is inside the block too, so the model learns to stop.
TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|assistant|>\n' }}{% generation %}{{ message['content'] }}{{ '<|end|>' }}{% endgeneration %}"
    "{{ '\n' }}"
    "{% else %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


TINY_SPECIALS = ["<s>", "<|end|>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>", "<|tool|>"]


def _byte_alphabet() -> list[str]:
    """GPT-2's printable stand-in for each of the 256 bytes (what ByteLevel pre-tokenizing emits)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def build_tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(_byte_alphabet())}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(TINY_SPECIALS)
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="<|end|>", pad_token="<pad>",
        chat_template=TINY_CHAT_TEMPLATE, model_max_length=2048)


def tiny_config(tokenizer):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=False,
        # Wider than the usual 0.02 so the output head can express sharp predictions and a LoRA
        # on the inner layers (the head is not adapted) visibly learns within a minute.
        initializer_range=0.1, dtype="float32",
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)


def build_tiny_model(tokenizer):
    import torch
    from transformers import GenerationConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config(tokenizer))
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    return model


def _save(model, folder: Path) -> None:
    """Write the model's files. Not `save_pretrained`: under a launch it writes only on global rank 0, and any
    rank (or the first rank of another machine) may be the one that builds the model."""
    from safetensors.torch import save_file

    model.config.architectures = [type(model).__name__]  # as save_pretrained records them (GGUF export and the
    model.config.dtype = model.dtype  # attention pick read them)
    model.config.save_pretrained(folder)
    model.generation_config.save_pretrained(folder)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "model.safetensors",
              metadata={"format": "pt"})


def builtin_path(name: str) -> Path:
    """The folder of a builtin model, built on first use (atomically: rename when complete)."""
    if name != "tiny":
        raise UserError(f"unknown builtin model 'builtin:{name}'; the builtin model is `builtin:tiny`")
    target = cache_dir() / "builtin" / TINY_VERSION
    if (target / "config.json").is_file():
        return target
    with staged_folder(target, replace=False) as tmp:  # another process finishing first: its copy is identical
        tokenizer = build_tiny_tokenizer()
        _save(build_tiny_model(tokenizer), tmp)
        tokenizer.save_pretrained(tmp)
    return target


def _unbuilt_builtin(model: dict) -> bool:
    """`builtin:tiny` whose folder is not built yet (an unknown builtin is left to builtin_path to refuse)."""
    name = model["name"]
    return name == f"{BUILTIN_PREFIX}tiny" and not (cache_dir() / "builtin" / TINY_VERSION / "config.json").is_file()


def builtin_config(model: dict):
    """A builtin model's config, made in memory when the model is not built yet (see builtin_tokenizer); None for
    any other model."""
    return tiny_config(build_tiny_tokenizer()) if _unbuilt_builtin(model) else None


def builtin_tokenizer(model: dict):
    """A builtin model's tokenizer, made in memory when the model is not built yet: checking a recipe (`validate`)
    neither builds the model nor writes into the cache; None for any other model."""
    return build_tiny_tokenizer() if _unbuilt_builtin(model) else None


def model_path(model: dict) -> str:
    """Where to load the model from: a builtin's cache folder, or the name as given."""
    name = model["name"]
    if name.startswith(BUILTIN_PREFIX):
        return str(builtin_path(name[len(BUILTIN_PREFIX):]))
    return name
