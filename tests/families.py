"""Tiny random-weight models of popular families, each with its real architecture, special tokens and chat template.

Templates come from TRL's shipped copies (trl/chat_templates/*.jinja); SmolLM2's and Mistral's are written below as
published with the models (Mistral's tool-calling branches left out). The vocabulary is a small byte-level BPE
trained here on a fixed text, so nothing is downloaded. `family_model(tmp_path_factory, name)` builds a folder
once per session that `model.name:` can point at.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# SmolLM2-Instruct (HuggingFaceTB/SmolLM2-*-Instruct, tokenizer_config.json): ChatML with a default system prompt.
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Mistral-7B-Instruct-v0.1/v0.2: no system role, [INST] turns, the answer closed by </s>, no generation prompt.
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)

# Mistral-Nemo-Instruct-2407: the system prompt goes into the last user turn only.
MISTRAL_NEMO_TEMPLATE = """{%- if messages[0]["role"] == "system" %}
    {%- set system_message = messages[0]["content"] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- set ns = namespace() %}
{%- set ns.index = 0 %}
{%- for message in loop_messages %}
    {%- if (message["role"] == "user") != (ns.index % 2 == 0) %}
        {{- raise_exception("After the optional system message, conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif %}
    {%- set ns.index = ns.index + 1 %}
{%- endfor %}
{{- bos_token }}
{%- for message in loop_messages %}
    {%- if message["role"] == "user" %}
        {%- if loop.last and system_message is defined %}
            {{- "[INST]" + system_message + "\\n\\n" + message["content"] + "[/INST]" }}
        {%- else %}
            {{- "[INST]" + message["content"] + "[/INST]" }}
        {%- endif %}
    {%- elif message["role"] == "assistant" %}
        {{- message["content"] + eos_token}}
    {%- else %}
        {{- raise_exception("Only user and assistant roles are supported, with the exception of an initial optional system message!") }}
    {%- endif %}
{%- endfor %}"""

LLAMA3 = dict(bos="<|begin_of_text|>", eos="<|eot_id|>", pad="<|end_of_text|>",
              specials=["<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|python_tag|>"])
CHATML = dict(bos=None, eos="<|im_end|>", pad="<|endoftext|>", specials=["<|im_start|>"])
QWEN = dict(CHATML, extra=["<tool_call>", "</tool_call>", "<think>", "</think>"])  # not special in Qwen's vocab
GEMMA = dict(bos="<bos>", eos="<eos>", pad="<pad>", specials=["<start_of_turn>", "<end_of_turn>"])
MISTRAL = dict(bos="<s>", eos="</s>", pad="<unk>", specials=["[INST]", "[/INST]"])


@dataclass(frozen=True)
class Family:
    name: str
    architecture: str  # transformers config class prefix: Llama, Qwen2, Qwen3, Mistral, Gemma2, Gemma3Text, Phi3
    template: str  # a TRL template name, or the template text
    tokens: dict
    end_of_turn: str  # what a finished assistant turn ends with (trained: generation stops there)


FAMILIES = {f.name: f for f in [
    Family("llama3", "Llama", "llama3", LLAMA3, "<|eot_id|>"),
    Family("llama3_1", "Llama", "llama3_1", LLAMA3, "<|eot_id|>"),
    Family("llama3_2", "Llama", "llama3_2", LLAMA3, "<|eot_id|>"),
    Family("smollm2", "Llama", SMOLLM2_TEMPLATE, CHATML, "<|im_end|>"),
    Family("qwen2_5", "Qwen2", "qwen2_5", QWEN, "<|im_end|>"),
    Family("qwen3", "Qwen3", "qwen3", QWEN, "<|im_end|>"),
    Family("deepseek_r1_distill", "Qwen2", "deepseek_r1_distill",
           dict(bos="<｜begin▁of▁sentence｜>", eos="<｜end▁of▁sentence｜>", pad="<｜▁pad▁｜>",
                specials=["<｜User｜>", "<｜Assistant｜>"], extra=["<think>", "</think>"]), "<｜end▁of▁sentence｜>"),
    Family("mistral", "Mistral", MISTRAL_TEMPLATE, MISTRAL, "</s>"),
    Family("mistral_nemo", "Mistral", MISTRAL_NEMO_TEMPLATE, MISTRAL, "</s>"),
    Family("gemma2", "Gemma2", "gemma", GEMMA, "<end_of_turn>"),
    Family("gemma3", "Gemma3Text", "gemma3", GEMMA, "<end_of_turn>"),
    Family("phi3", "Phi3", "phi3", dict(bos="<s>", eos="<|endoftext|>", pad="<|endoftext|>",
                                        specials=["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]), "<|end|>"),
]}

CORPUS = ("You are a helpful assistant. What is the capital of France? The capital of France is Paris. "
          "Write a haiku about the sea. Waves fold into foam. Translate hello into Spanish: hola. "
          "Name three primary colours: red, yellow and blue. 2 + 2 = 4. Thank you! You're welcome.\n") * 4


def template_text(family: Family) -> str:
    if "{" in family.template:
        return family.template
    import trl

    return (Path(trl.__file__).parent / "chat_templates" / f"{family.template}.jinja").read_text(encoding="utf-8")


def build_tokenizer(family: Family):
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokens = family.tokens
    specials = [t for t in (tokens["bos"], tokens["eos"], tokens["pad"], *tokens["specials"]) if t]
    specials += [family.end_of_turn] if family.end_of_turn not in specials else []
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    core.train_from_iterator([CORPUS], trainer)
    core.add_tokens([AddedToken(t, special=False, normalized=False) for t in tokens.get("extra", [])])
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token=tokens["bos"], eos_token=tokens["eos"],
                                   pad_token=tokens["pad"], chat_template=template_text(family), model_max_length=2048)


def build_model(family: Family, tokenizer):
    import torch
    import transformers

    config_cls = getattr(transformers, f"{family.architecture}Config")
    model_cls = getattr(transformers, f"{family.architecture.removesuffix('Text')}ForCausalLM")
    config = config_cls(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=2048,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    return model_cls(config)


def family_model(tmp_path_factory, name: str) -> Path:
    """The saved model + tokenizer folder of family `name`, built once per test session."""
    root = tmp_path_factory.getbasetemp() / "families" / name
    if not (root / "config.json").is_file():
        family = FAMILIES[name]
        tokenizer = build_tokenizer(family)
        build_model(family, tokenizer).save_pretrained(root)
        tokenizer.save_pretrained(root)
    return root
