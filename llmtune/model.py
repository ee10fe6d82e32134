"""Tokenizer, chat template, model loading (dtype, attention, bitsandbytes) and PEFT config.

`builtin:tiny` is a 2-layer Llama-shaped model with a byte-level tokenizer, built from a
fixed seed and saved once under the llmtune cache, so the quickstart and the tests run
offline and a run directory made from it reloads like any other.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

from .errors import UserError

BUILTIN_PREFIX = "builtin:"
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


def cache_dir() -> Path:
    root = os.environ.get("LLMTUNE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "llmtune")
    return Path(root)


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


def build_tiny_model(tokenizer):
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=False,
        # Wider than the usual 0.02 so the output head can express sharp predictions and a LoRA
        # on the inner layers (the head is not adapted) visibly learns within a minute.
        initializer_range=0.1,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    return model


def builtin_path(name: str) -> Path:
    """The folder of a builtin model, built on first use (atomically: rename when complete)."""
    if name != "tiny":
        raise UserError(f"unknown builtin model 'builtin:{name}'; the builtin model is `builtin:tiny`")
    target = cache_dir() / "builtin" / TINY_VERSION
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=target.parent))
    tokenizer = build_tiny_tokenizer()
    build_tiny_model(tokenizer).save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(target)
    except OSError:  # another process finished first; its copy is identical
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def model_path(model: dict) -> str:
    """Where to load the model from: a builtin's cache folder, or the name as given."""
    name = model["name"]
    if name.startswith(BUILTIN_PREFIX):
        return str(builtin_path(name[len(BUILTIN_PREFIX):]))
    return name


def _trl_templates_dir() -> Path:
    spec = importlib.util.find_spec("trl")
    return Path(spec.submodule_search_locations[0]) / "chat_templates"


def named_chat_templates() -> list[str]:
    return sorted(p.stem for p in _trl_templates_dir().glob("*.jinja") if not p.stem.endswith("_training"))


def read_chat_template(value: str) -> str:
    """A `.jinja` file, or the name of a template TRL ships (llama3, qwen2_5, ...)."""
    if value.endswith((".jinja", ".j2")):
        path = Path(value).expanduser()
        if not path.is_file():
            raise UserError(f"model.chat_template: file '{value}' not found")
        return path.read_text(encoding="utf-8")
    path = _trl_templates_dir() / f"{value}.jinja"
    if not path.is_file():
        raise UserError(f"model.chat_template: unknown template '{value}'; give a .jinja file or one of: "
                        + ", ".join(named_chat_templates()))
    return path.read_text(encoding="utf-8")


def load_tokenizer(model: dict):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        model_path(model), revision=model.get("revision"), trust_remote_code=model["trust_remote_code"])
    if model.get("chat_template"):
        tokenizer.chat_template = read_chat_template(model["chat_template"])
    if tokenizer.pad_token is None:  # batching needs one; the EOS token is the usual stand-in
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def torch_dtype(name: str | None):
    import torch

    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}.get(name, "auto")


def quantization_config(quant: dict | None):
    """The recipe's `quantization:` section as transformers' BitsAndBytesConfig."""
    if quant is None:
        return None
    from transformers import BitsAndBytesConfig

    if quant["bits"] == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=quant["quant_type"],
        bnb_4bit_use_double_quant=quant["double_quant"], bnb_4bit_compute_dtype=torch_dtype(quant["compute_dtype"]),
        bnb_4bit_quant_storage=torch_dtype(quant["quant_storage"]) if quant.get("quant_storage") else None)


def adapter_run(model: dict) -> dict | None:
    """The adapter config of a run directory named by `model.name` (e.g. an SFT LoRA run), else None."""
    path = Path(model["name"]).expanduser() / "adapter_config.json"
    if model["name"].startswith(BUILTIN_PREFIX) or not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def auto_config(model: dict):
    """The transformers config of the recipe's model (of its base, for a run directory holding an adapter)."""
    import transformers

    stacked = adapter_run(model)
    source = stacked["base_model_name_or_path"] if stacked else model_path(model)
    try:
        return transformers.AutoConfig.from_pretrained(source, revision=model.get("revision"),
                                                       trust_remote_code=model["trust_remote_code"])
    except (OSError, ValueError) as err:
        raise UserError(f"model.name: cannot read the config of '{model['name']}': {err}") from None


def load_model(config: dict, head: str = "CausalLM"):
    """The model as the recipe describes it, as `AutoModelFor<head>` (not yet wrapped in the recipe's adapter).

    A run directory holding an adapter is loaded on the adapter's base, and the adapter is folded
    into it (`model.run_adapter: merge`) or kept as the trainable adapter (`stack`).
    """
    import transformers

    model = config["model"]
    kwargs = dict(revision=model.get("revision"), trust_remote_code=model["trust_remote_code"],
                  dtype=torch_dtype(model["dtype"]))
    if head == "SequenceClassification":
        kwargs["num_labels"] = 1  # a reward model: one score per sequence
    from .fast import attention

    attn = attention(model).value  # the recipe's, or flash attention where this machine has it
    if attn:
        kwargs["attn_implementation"] = attn
    quant = quantization_config(config.get("quantization"))
    if quant is not None:
        kwargs["quantization_config"] = quant
        # bitsandbytes quantizes while placing weights, so the device is chosen at load time: this process's
        # own (under a launch too), or none when FSDP/ZeRO-3 shard the model.
        from .launch.rank import device_map

        placement = device_map()
        if placement is not None:
            kwargs["device_map"] = placement
    auto = getattr(transformers, f"AutoModelFor{head}")
    run = adapter_run(model)
    if run is None:
        return auto.from_pretrained(model_path(model), **kwargs)
    from peft import PeftConfig, PeftModel

    base = auto.from_pretrained(run["base_model_name_or_path"], **{**kwargs, "revision": run.get("revision")})
    if model["run_adapter"] == "merge":
        # Without its task type the adapter fits any head on the same body (an SFT adapter into a reward model).
        adapter = PeftConfig.from_pretrained(model["name"])
        adapter.task_type = None
        merged = PeftModel.from_pretrained(base, model["name"], config=adapter).merge_and_unload()
        return merged.requires_grad_(True)  # loading froze it; merging leaves a model to fine-tune fully
    return PeftModel.from_pretrained(base, model["name"], is_trainable=True)


def peft_config(adapter: dict | None, head: str = "CausalLM", model: dict | None = None):
    """The recipe's `adapter:` section as its type's PEFT config class (None = full fine-tuning)."""
    if adapter is None:
        return None
    import dataclasses

    from .recipe.schema import ADAPTERS, AdapterSection
    from .train import config_class

    kind = ADAPTERS[adapter["type"]]
    mine = {f.name for f in dataclasses.fields(AdapterSection)}
    options = {**kind.defaults, **{k: v for k, v in adapter.items() if k not in mine}, **kind.sets}
    cls = config_class(kind.config)
    if model is not None and "tokenizer_name_or_path" in {f.name for f in dataclasses.fields(cls)}:
        options["tokenizer_name_or_path"] = model_path(model)  # prompt tuning's `TEXT` init tokenizes with it
    # SEQ_CLS also trains and saves the new score head (PEFT adds it to modules_to_save).
    task_type = {"CausalLM": "CAUSAL_LM", "SequenceClassification": "SEQ_CLS"}[head]
    return cls(task_type=task_type, **options)


def mergeable(adapter_type: str) -> bool:
    """Whether an adapter can be folded into its base weights (`llmtune merge`); prompt learning cannot.

    `adapter_type` is the recipe's `adapter.type` (`lora`, `prefix`, ...) or PEFT's `peft_type` from a run's
    adapter_config.json (`LORA`, `PREFIX_TUNING`, ...).
    """
    from .recipe.schema import ADAPTERS

    if adapter_type in ADAPTERS:
        return ADAPTERS[adapter_type].mergeable
    from peft import PromptLearningConfig
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    cls = PEFT_TYPE_TO_CONFIG_MAPPING[adapter_type]
    kinds = [kind for kind in ADAPTERS.values() if kind.config.split(":")[1] == cls.__name__]
    return kinds[0].mergeable if kinds else not issubclass(cls, PromptLearningConfig)


# LoRA initialisations that move part of each base weight into the adapter (W = W_res + BA): the trained adapter
# fits only the residual base, so it is saved converted (PEFT) to a plain LoRA of rank 2r that fits the original.
BASE_REWRITING_INITS = ("pissa", "olora")
INITIAL_ADAPTER = "initial_adapter"  # PEFT loads it back as an adapter by this folder name: no dots


def save_initial_adapter(model, run_dir: Path) -> Path | None:
    """A PiSSA/OLoRA adapter saved as initialised, before training, for `convert_adapter`; None for others."""
    config = getattr(model, "peft_config", {}).get("default")
    if not str(getattr(config, "init_lora_weights", "")).lower().startswith(BASE_REWRITING_INITS):
        return None
    config.init_lora_weights = True  # saved so that loading it does not decompose the base a second time
    model.save_pretrained(run_dir / INITIAL_ADAPTER)
    return run_dir / INITIAL_ADAPTER


def convert_adapter(model, run_dir: Path, initial: Path) -> None:
    """Replace the saved adapter of `run_dir` by its plain-LoRA form, which loads on the original base."""
    staging = run_dir / f".{INITIAL_ADAPTER}-converted"
    model.save_pretrained(staging, path_initial_model_for_weight_conversion=str(initial))
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        os.replace(staging / name, run_dir / name)
    shutil.rmtree(staging)
    shutil.rmtree(initial)


def loraplus_optimizer(trainer, ratio: float):
    """LoRA+ (peft.optimizers): the optimizer `train:` configures, with LoRA's B matrices at `ratio` x its rate."""
    from peft.optimizers import create_loraplus_optimizer

    optimizer_cls, kwargs = trainer.get_optimizer_cls_and_kwargs(trainer.args, trainer.model)
    kwargs = dict(kwargs)
    return create_loraplus_optimizer(trainer.model, optimizer_cls, lr=kwargs.pop("lr"), loraplus_lr_ratio=ratio,
                                     loraplus_weight_decay=trainer.args.weight_decay, **kwargs)
