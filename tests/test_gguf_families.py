"""Merge and GGUF export for each architecture llmtune writes: a LoRA folded in by `llmtune merge` computes what
the adapter model computes, token-exact greedy parity in llama.cpp on the merged model's GGUF against the adapter
model, llama.cpp's tokenization equal to transformers', and the Ollama Modelfile rendering like the chat template
(in Go too).

Each family is a tiny random-weight model of its real architecture (hidden 64, 2 layers; Gemma 3 six, so
one layer attends globally) with a byte-level BPE trained here on the family's own pre-tokenizer split,
its real special tokens and its chat template (TRL's, or the one published with the model). Every 1-D
weight (norms, biases) is randomized too: left at HF's init (ones, zeros), a missing Gemma norm shift
or a dropped Qwen2 bias would go unseen; the final norm is scaled up so that no two logits nearly
tie (f32 kernels differ in the last bits, and a near-tie would flip a greedy pick).
"""

import json
import subprocess
from pathlib import Path

import pytest
import torch

from llmtune.tools.export import PRE_TOKENIZERS

from .gotemplate import execute
from .llamacpp import llama_cpp
from .test_export import expected_renders, read_modelfile

SPLIT = {name: regex for regex, name in PRE_TOKENIZERS.items()}
# Mistral-7B-Instruct-v0.1's published template (TRL ships none for Mistral).
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}")
QWEN = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
GEMMA = ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"]
# family: (config class, model class, config, pre-tokenizer, special tokens, (bos, eos, pad), chat template,
#          why there is no Modelfile or None)
FAMILIES = {
    "llama3": ("LlamaConfig", "LlamaForCausalLM", {"rope_parameters": {
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64}, "tie_word_embeddings": True},
        "llama-bpe", ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                      "<|eot_id|>"], ("<|begin_of_text|>", "<|eot_id|>", "<|end_of_text|>"), "llama3_1", None),
    "qwen2_5": ("Qwen2Config", "Qwen2ForCausalLM", {}, "qwen2", QWEN, (None, "<|im_end|>", "<|endoftext|>"),
                "qwen2_5", None),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 32, "tie_word_embeddings": False}, "qwen2",
              QWEN + ["<think>", "</think>"], (None, "<|im_end|>", "<|endoftext|>"), "qwen3",
              "is not a fixed text around each message"),
    "mistral": ("MistralConfig", "MistralForCausalLM", {}, "tekken", ["<unk>", "<s>", "</s>", "[INST]", "[/INST]"],
                ("<s>", "</s>", "<unk>"), MISTRAL_TEMPLATE, None),
    # Softcaps low enough to bite (the real 50 and 30 leave a tiny model's logits as they are).
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 16, "query_pre_attn_scalar": 16,
                                                     "attn_logit_softcapping": 2.0, "final_logit_softcapping": 15.0},
               "llama-bpe",
               GEMMA, ("<bos>", "<eos>", "<pad>"), "gemma", None),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {
        "head_dim": 16, "query_pre_attn_scalar": 16, "num_hidden_layers": 6, "rope_parameters": {
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0}}},
        "llama-bpe", GEMMA, ("<bos>", "<eos>", "<pad>"), "gemma3", "depends on the turns around it"),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                                                   "partial_rotary_factor": 0.75}},
             "default", ["<unk>", "<s>", "<|endoftext|>", "<|assistant|>", "<|end|>", "<|system|>", "<|user|>"],
             ("<s>", "<|endoftext|>", "<|endoftext|>"), "phi3", None),
}
CORPUS = ["The quick brown fox jumps over the lazy dog.", "It's 12345 o'clock, isn't it? We'll see.",
          "Hello there! Say hi, say bye, count to 3: 1 2 3.", "Name a color: blue, red, green.\n\nDone.",
          "ünïcödé ✓ and CamelCaseWords like JSONParser"] * 4
PROMPTS = [[{"role": "user", "content": "Say hi"}], [{"role": "user", "content": "Name a color"}],
           [{"role": "user", "content": "Count to 3"}, {"role": "assistant", "content": "1 2 3"},
            {"role": "user", "content": "Name a color"}]]
TRICKY = "Hello, wörld! It's 12345 CamelCase\n\n  x  {special}y"


def build_tokenizer(pre: str, specials: list[str], roles: tuple, template: str):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from llmtune.builtin import _byte_alphabet
    from llmtune.paths import read_chat_template

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    if pre == "default":  # every byte its own token, no merges (as builtin:tiny's)
        core = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(_byte_alphabet())}, merges=[]))
        core.pre_tokenizer = byte_level
        core.add_special_tokens(specials)
    else:
        core = Tokenizer(models.BPE())
        core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(SPLIT[pre]), "isolated"), byte_level])
        core.train_from_iterator(CORPUS, trainers.BpeTrainer(
            vocab_size=256 + len(specials) + 64, special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    core.decoder = decoders.ByteLevel()
    bos, eos, pad = roles
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token=bos, eos_token=eos, pad_token=pad, model_max_length=2048,
        chat_template=template if "{%" in template else read_chat_template(template))


def build_family(name: str, folder: Path):
    import transformers

    config_class, model_class, extra, pre, specials, roles, template, _ = FAMILIES[name]
    tokenizer = build_tokenizer(pre, specials, roles, template)
    ids = {f"{role}_token_id": tokenizer.convert_tokens_to_ids(token) if token else None
           for role, token in zip(("bos", "eos", "pad"), roles)}
    config = getattr(transformers, config_class)(**{
        "vocab_size": len(tokenizer), "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 2048,
        "initializer_range": 0.1, **ids, **extra})
    config._attn_implementation = "eager"  # Gemma 2's attention softcap is computed only there
    torch.manual_seed(0)
    model = getattr(transformers, model_class)(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.ndim == 1:
                parameter.add_(torch.randn_like(parameter) * 0.2)
        # Sharper predictions (logits x10 through the final norm, whose Gemma form scales by 1 + weight):
        # greedy parity is only exact where no two logits nearly tie.
        shift = 1.0 if "Gemma" in model_class else 0.0
        model.model.norm.weight.copy_((model.model.norm.weight + shift) * 10 - shift)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model, tokenizer


def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    """Argmax continuation by full forward passes: no cache, no generation-config stopping rules."""
    seq = list(ids)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(ids):]


def adapt(model, tokenizer, base: Path):
    """The base with a LoRA as llmtune configures one (all linear layers), saved as an adapter run directory;
    its B matrices random, as training leaves them, so that merging has something to get right."""
    from peft import get_peft_model

    from llmtune.model import peft_config

    adapted = get_peft_model(model, peft_config({"type": "lora", "r": 8, "lora_alpha": 16}))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, parameter in adapted.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.05)
    adapted.peft_config["default"].base_model_name_or_path = str(base)
    adapted.save_pretrained(base / "adapter")
    tokenizer.save_pretrained(base / "adapter")
    return adapted.eval(), base / "adapter"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """family -> (adapter model, tokenizer, gguf path, notes, warnings, Modelfile path, merged folder).

    Each family's base gets a LoRA; `llmtune merge` folds it in, and the merged model is what is exported: llama.cpp
    on the GGUF is compared with the adapter model itself (base + LoRA, as `llmtune generate` runs it)."""
    from llmtune.tools.export import export_gguf, merge

    out = {}
    for name in FAMILIES:
        # Not named after the family: llama.cpp keys some tokenizer quirks on the model's name ("phi3" ...).
        folder = tmp_path_factory.mktemp("model")
        model, tokenizer = build_family(name, folder)
        model, adapter = adapt(model, tokenizer, folder)
        merged, _ = merge(adapter)
        path, notes, warnings = export_gguf(merged, folder / f"{name}.gguf", quant="f32")
        out[name] = (model, tokenizer, path, notes, warnings, path.with_suffix(".Modelfile"), merged)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILIES)
def test_merged_model_computes_what_the_adapter_computes(exported, name):
    """`llmtune merge` per architecture (Phi-3's fused projections, Gemma's norms ...): the merged model's greedy
    tokens are the adapter model's, its logits within float error; the adapter does change them; the merged
    generation_config.json stops at the template's end of turn."""
    import transformers

    from llmtune.tokenizer import end_of_turn_token

    adapter, tokenizer, _, _, _, _, merged = exported[name]
    full = transformers.AutoModelForCausalLM.from_pretrained(merged, attn_implementation="eager").eval()
    for chat in PROMPTS:
        ids = tokenizer(tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False),
                        add_special_tokens=False)["input_ids"]
        assert hf_greedy(full, ids, 16) == hf_greedy(adapter, ids, 16), (name, chat)
        with torch.no_grad():
            theirs, ours = full(torch.tensor([ids])).logits, adapter(torch.tensor([ids])).logits
            with adapter.disable_adapter():
                base = adapter(torch.tensor([ids])).logits
        assert torch.allclose(theirs, ours, atol=1e-4), (name, float((theirs - ours).abs().max()))
        assert float((base - ours).abs().max()) > 0.1, name
    stops = full.generation_config.eos_token_id
    assert end_of_turn_token(tokenizer)[0] in (stops if isinstance(stops, list) else [stops])


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILIES)
def test_llama_cpp_runs_each_architecture_token_for_token(exported, name):
    import gguf

    model, tokenizer, path, notes, _, _, _ = exported[name]
    pre = FAMILIES[name][3]
    meta = {key: field.contents() for key, field in gguf.GGUFReader(path).fields.items()}
    assert meta["general.architecture"] == {"mistral": "llama"}.get(name, model.config.model_type.split("_")[0])
    assert meta["tokenizer.ggml.pre"] == pre
    eog = set(tokenizer.all_special_ids)
    with llama_cpp(path) as llm:
        special = next(t for t in FAMILIES[name][4] if t not in (tokenizer.bos_token, tokenizer.pad_token))
        text = TRICKY.format(special=special)
        assert llm.tokenize(text) == tokenizer(text, add_special_tokens=False)["input_ids"]
        for chat in PROMPTS:
            ids = tokenizer(tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False),
                            add_special_tokens=False)["input_ids"]
            ours, theirs = hf_greedy(model, ids, 16), llm.greedy(ids, 16)
            assert theirs == ours[:len(theirs)], (name, chat)
            # llama.cpp stops early only at an end-of-generation token.
            assert len(theirs) == 16 or theirs[-1] in eog, (name, ours, theirs)
            # The distribution too, which greedy picks cannot show (Gemma 2's final softcap keeps the order).
            top = llm.next_logprobs(ids, 5, tokenizer.convert_tokens_to_ids("a"))
            with torch.no_grad():
                logprobs = model(torch.tensor([ids])).logits[0, -1].log_softmax(-1)
            assert list(top) == logprobs.topk(5).indices.tolist(), name
            # Relative: ggml's CPU GELU (Gemma) goes through an f16 table.
            assert all(abs(p - float(logprobs[i])) < 2e-3 * (1 + abs(p)) for i, p in top.items()), (name, top)
    if name == "mistral":
        assert any("sliding window of 4096 tokens" in note for note in notes)


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILIES)
def test_modelfile_renders_each_family_like_its_chat_template_or_says_why_not(exported, name):
    _, tokenizer, _, _, warnings, modelfile, _ = exported[name]
    refused = FAMILIES[name][-1]
    if refused:
        assert not modelfile.exists() and len(warnings) == 1 and refused in warnings[0]
        return
    assert warnings == [] and modelfile.is_file()
    commands = read_modelfile(modelfile.read_text())
    for data, expected in expected_renders(tokenizer, commands, ""):
        assert execute(commands["TEMPLATE"][0], data) == expected, (name, data)


@pytest.mark.slow
def test_every_family_modelfile_renders_the_same_in_go(exported):
    """Go's own text/template, as Ollama executes the Modelfiles (tests/ollama_render.go)."""
    jobs, expected = [], []
    for name, (_, tokenizer, _, _, _, modelfile, _) in exported.items():
        if not modelfile.exists():
            continue
        commands = read_modelfile(modelfile.read_text())
        pairs = expected_renders(tokenizer, commands, "")
        jobs.append({"Template": commands["TEMPLATE"][0], "Chats": [data["Messages"] for data, _ in pairs]})
        expected.append([text for _, text in pairs])
    assert len(jobs) == sum(1 for family in FAMILIES.values() if family[-1] is None)
    result = subprocess.run(["go", "run", str(Path(__file__).with_name("ollama_render.go"))], input=json.dumps(jobs),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == expected


@pytest.mark.parametrize("name, change, message", [
    ("gemma2", {"query_pre_attn_scalar": 256}, "query_pre_attn_scalar is 256; llama.cpp scales queries by 16 for this shape"),
    ("gemma3", {"layer_types": ["sliding_attention"] * 6},
     "its layer_types are not llama.cpp's fixed gemma3 pattern (one full-attention layer in 6)"),
    ("gemma3", {"rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 50000.0},
                                    "full_attention": {"rope_type": "default", "rope_theta": 1000000.0}}},
     "its sliding layers' rope is not llama.cpp's fixed gemma3 rope (theta 10000, unscaled)"),
    ("qwen2_5", {"use_sliding_window": True, "max_window_layers": 0}, "it attends through a sliding window"),
    ("qwen3", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                   "original_max_position_embeddings": 512}}, "rope scaling 'yarn' is not handled (default, linear and Llama 3's are)"),
])
def test_what_llama_cpp_would_compute_otherwise_is_refused(tmp_path, name, change, message):
    """llama.cpp fixes some things per architecture: a config that differs gets no GGUF rather than a wrong one.

    (In process: `test_unsupported_architecture_fails_clearly` checks the CLI's exit 2 for the same UserError.)"""
    from llmtune.errors import UserError
    from llmtune.tools.export import export_gguf

    family = FAMILIES[name]
    FAMILIES[name] = (*family[:2], {**family[2], **change}, *family[3:])
    try:
        build_family(name, tmp_path)
    finally:
        FAMILIES[name] = family
    with pytest.raises(UserError) as err:
        export_gguf(tmp_path, quant="f16")
    assert f"GGUF export: {message}, so llama.cpp would not compute what this model computes" in str(err.value)
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob("*Modelfile")) \
        and not list(tmp_path.glob(".*.tmp"))


def test_a_sentencepiece_style_tokenizer_is_refused_by_name(tmp_path):
    """Real Gemma, Mistral v0.3 and Phi-3 tokenizers are BPE with byte fallback: not written (yet), said so."""
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    from llmtune.errors import UserError
    from llmtune.tools.export import export_gguf

    build_family("phi3", tmp_path)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}, "▁": 259}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    core.normalizer = normalizers.Replace(" ", "▁")
    core.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>") \
        .save_pretrained(tmp_path)
    with pytest.raises(UserError, match=r"this one is SentencePiece-style BPE with byte fallback \(Llama 2, Mistral "
                                        r"v0\.1-v0\.3, Gemma, Phi-3\); convert with llama\.cpp's convert_hf_to_gguf"):
        export_gguf(tmp_path, quant="f16")
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*.tmp"))
