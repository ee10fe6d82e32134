"""After training: merge (LoRA, DoRA, QLoRA), generate/chat, and GGUF export read back and run by llama.cpp."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from llmtune.recipe.check import resolve
from llmtune.runner.session import train as run
from llmtune.tools.infer import Sampling, generate, load, prompt_ids

from .conftest import cli, make_recipe, write_jsonl
from .llamacpp import llama_cpp

PAIRS = [("Say hi", "hi!"), ("Say bye", "bye!"), ("Count to 3", "1 2 3"), ("Name a color", "blue")]
PROMPTS = [p for p, _ in PAIRS] + ["What is up", "Say hello"]
TRAIN = {"learning_rate": 1.0e-2, "max_steps": 30, "per_device_train_batch_size": 8, "gradient_checkpointing": False,
         "logging_steps": 10, "save_strategy": "no", "disable_tqdm": True}
FOUR_BIT = {"bits": 4, "compute_dtype": "float32"}


def train(tmp, adapter="lora", quantization=None):
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in PAIRS]
    data = write_jsonl(tmp / "pairs.jsonl", rows * 8)
    recipe = make_recipe(tmp, data={"train": [{"path": data}], "max_length": 64}, name=adapter,
                         adapter={"type": adapter, "r": 8, "alpha": 16}, quantization=quantization, train=TRAIN)
    out = tmp / adapter
    run(resolve(recipe), ["llmtune", "sft", str(recipe)], output_dir=str(out))
    return out


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, llmtune_cache):
    return train(tmp_path_factory.mktemp("lora"))


def answers(loaded, prompts=PROMPTS, max_new_tokens=12):
    return [generate(loaded, prompt_ids(loaded.tokenizer, [{"role": "user", "content": p}]),
                     Sampling(max_new_tokens=max_new_tokens)) for p in prompts]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["lora", "dora", "qlora"])
def test_merged_model_generates_what_the_adapter_generates(tmp_path, kind):
    run_dir = train(tmp_path, *{"lora": ("lora",), "dora": ("dora",),
                                "qlora": ("lora", FOUR_BIT)}[kind])
    result = cli("merge", run_dir)
    assert result.returncode == 0, result.stderr
    merged = run_dir / "merged"
    assert f"wrote {merged}" in result.stdout
    assert ("dequantized the 4-bit base" in result.stdout) == (kind == "qlora")
    assert ("DoRA" if kind == "dora" else "LoRA") in result.stdout
    assert (merged / "model.safetensors").is_file() and not (merged / "adapter_config.json").exists()
    assert "quantization_config" not in json.loads((merged / "config.json").read_text())

    adapter, full = load(run_dir), load(merged)
    assert not full.adapter and "{% generation %}" in full.tokenizer.chat_template
    assert answers(full) == answers(adapter)  # token for token
    assert answers(adapter, PROMPTS[:1]) == [adapter.tokenizer.encode("hi!")]  # it learned something to compare


@pytest.mark.slow
def test_qlora_merge_folds_into_the_dequantized_weights_it_trained_against(tmp_path):
    """Folding into the original float weights instead would change what the model computes."""
    run_dir = train(tmp_path, quantization=FOUR_BIT)
    adapter = load(run_dir)
    ids = prompt_ids(adapter.tokenizer, [{"role": "user", "content": "Count to 3"}])
    with torch.no_grad():
        reference = adapter.model(input_ids=ids).logits
        from llmtune.tools.export import merged_model

        ours = merged_model(run_dir)[0](input_ids=ids).logits
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        from llmtune.builtin import builtin_path

        naive = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(builtin_path("tiny")),
                                          run_dir).merge_and_unload()(input_ids=ids).logits
    # What is left is the 4-bit kernel's own rounding (the quantized base alone differs as much from its
    # dequantized weights); folding into the original weights is off by 60x that on this run.
    assert (ours - reference).abs().max() < 0.1
    assert (naive - reference).abs().max() > 10 * (ours - reference).abs().max()


@pytest.mark.slow
def test_generate_stops_at_the_trained_stop_token(lora_run):
    result = cli("generate", lora_run, "-p", "Say hi", "-p", "Count to 3", "--max-new-tokens", "40")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines() == ["### Say hi", "hi!", "", "### Count to 3", "1 2 3"]
    # Without stop tokens the model goes on after its answer, with the stop token first.
    loaded = load(lora_run)
    ids = prompt_ids(loaded.tokenizer, [{"role": "user", "content": "Say hi"}])
    raw = loaded.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                                do_sample=False, eos_token_id=None)[0, ids.shape[1]:].tolist()
    assert raw[:4] == loaded.tokenizer.encode("hi!") + [loaded.tokenizer.convert_tokens_to_ids("<|end|>")]
    assert len(raw) == 6


@pytest.mark.slow
def test_sampling_flags_and_seed(lora_run):
    loaded = load(lora_run)
    ids = prompt_ids(loaded.tokenizer, [{"role": "user", "content": "What is up"}])
    hot = Sampling(max_new_tokens=20, temperature=5.0, seed=1)
    first, again = generate(loaded, ids, hot), generate(loaded, ids, hot)
    assert first == again  # the seed makes sampling repeatable
    assert any(generate(loaded, ids, Sampling(max_new_tokens=20, temperature=5.0, seed=s)) != first
               for s in range(2, 6))


@pytest.mark.slow
def test_generate_passes_each_sampling_flag_through_the_cli(lora_run, monkeypatch):
    from transformers.generation.utils import GenerationMixin
    from typer.testing import CliRunner

    from llmtune.cli import app

    real, seen = GenerationMixin.generate, []

    def spy(self, *args, **kwargs):
        seen.append(kwargs)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(GenerationMixin, "generate", spy)

    def answers(*flags, tokens=20, prompt="What is up"):
        """The answers to `prompt`, asked twice in one command."""
        result = CliRunner().invoke(app, ["generate", str(lora_run), "-p", prompt, "-p", prompt,
                                          "--max-new-tokens", str(tokens), *flags])
        assert result.exit_code == 0, result.output
        return [block.rstrip("\n") for block in result.stdout.split(f"### {prompt}\n")[1:]]

    def used(*keys):
        return tuple(seen[-1][key] for key in keys)

    greedy = answers()
    assert greedy[0] == greedy[1] and greedy[0] and used("do_sample", "max_new_tokens") == (False, 20)
    hot = answers("--temperature", "5", "--seed", "1")
    assert hot[0] == hot[1]  # the seed is set before each answer: the same prompt, the same sample
    assert used("do_sample", "temperature", "top_p", "top_k") == (True, 5.0, 1.0, None)
    assert any(answers("-t", "5", "--seed", str(seed))[0] != hot[0] for seed in range(2, 6))
    # At any temperature, the single likeliest token (top-k 1, or a tiny nucleus) is the greedy answer.
    assert answers("--temperature", "5", "--top-k", "1", "--seed", "2") == greedy and used("top_k") == (1,)
    assert answers("--temperature", "5", "--top-p", "1e-6", "--seed", "3") == greedy and used("top_p") == (1e-6,)
    answers("--repetition-penalty", "1.5")
    assert used("do_sample", "repetition_penalty") == (False, 1.5)
    assert answers(prompt="Count to 3") == ["1 2 3"] * 2
    assert answers(prompt="Count to 3", tokens=2) == ["1 "] * 2 and used("max_new_tokens") == (2,)  # byte tokens


def test_chat_reset_forgets_the_conversation_but_keeps_the_system_message(monkeypatch):
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    import llmtune.tools.infer as infer
    from llmtune.builtin import builtin_path

    tokenizer = AutoTokenizer.from_pretrained(builtin_path("tiny"))
    seen = []  # the prompt of each turn, as the model gets it

    def reply(loaded, ids, sampling, streamer=None):
        seen.append(ids[0].tolist())
        return tokenizer.encode("ok", add_special_tokens=False)

    monkeypatch.setattr(infer, "generate", reply)
    typed = iter(["Say hi", "Say more", "/reset", "Say bye", "/exit", "never read"])
    infer.chat(SimpleNamespace(tokenizer=tokenizer), Sampling(), "Be brief.", read=lambda prompt: next(typed),
               write=lambda *args: None)

    def rendered(*turns):
        messages = [{"role": "system", "content": "Be brief."}] + [{"role": r, "content": c} for r, c in turns]
        return prompt_ids(tokenizer, messages)[0].tolist()

    assert seen == [rendered(("user", "Say hi")),
                    rendered(("user", "Say hi"), ("assistant", "ok"), ("user", "Say more")),
                    rendered(("user", "Say bye"))]
    assert next(typed) == "never read"


@pytest.mark.slow
def test_chat_answers_each_turn_on_a_merged_dir(lora_run, tmp_path):
    result = cli("merge", lora_run, "--out", tmp_path / "merged")
    assert result.returncode == 0, result.stderr
    import subprocess
    import sys

    chat = subprocess.run([sys.executable, "-m", "llmtune", "chat", tmp_path / "merged"],
                          input="Say hi\n/reset\nSay bye\n", capture_output=True, text=True, timeout=300)
    assert chat.returncode == 0, chat.stderr
    assert "hi!" in chat.stdout and "bye!" in chat.stdout


@pytest.mark.slow
def test_merge_refuses_what_it_cannot_merge(lora_run, tmp_path):
    result = cli("merge", tmp_path)
    assert result.returncode == 2 and "not a run directory" in result.stderr
    half = cli("merge", lora_run, "--out", tmp_path / "m", "--dtype", "bfloat16")
    assert half.returncode == 0 and "saved in bfloat16" in half.stdout, half.stderr
    from safetensors import safe_open

    with safe_open(tmp_path / "m" / "model.safetensors", "pt") as weights:
        assert {weights.get_tensor(name).dtype for name in weights.keys()} == {torch.bfloat16}  # the run's: float32
    assert cli("merge", lora_run, "--dtype", "float8").returncode == 2
    again = cli("merge", tmp_path / "m")
    assert again.returncode == 2 and "holds a full model" in again.stderr
    busy = cli("merge", lora_run, "--out", tmp_path / "m")
    assert busy.returncode == 2 and "--overwrite" in busy.stderr


def unpermute(data, n_head):
    """Undo llama.cpp's q/k row order, back to Hugging Face's."""
    return data.reshape(n_head, data.shape[0] // n_head // 2, 2, *data.shape[1:]).swapaxes(1, 2).reshape(data.shape)


@pytest.mark.slow
@pytest.mark.parametrize("quant", ["f32", "f16", "q8_0"])
def test_gguf_round_trips_through_the_gguf_reader(lora_run, tmp_path, quant):
    import gguf

    out = tmp_path / f"tiny-{quant}.gguf"
    result = cli("export", lora_run, "--format", "gguf", "--quant", quant, "--out", out)
    assert result.returncode == 0, result.stderr
    reader = gguf.GGUFReader(out)
    meta = {name: field.contents() for name, field in reader.fields.items()}
    tokenizer = load(lora_run).tokenizer
    assert meta["general.architecture"] == "llama" and meta["llama.block_count"] == 2
    assert meta["llama.embedding_length"] == 64 and meta["llama.attention.head_count_kv"] == 2
    assert meta["tokenizer.ggml.model"] == "gpt2"
    assert meta["tokenizer.ggml.tokens"] == [tokenizer.convert_ids_to_tokens(i) for i in range(len(tokenizer))]
    assert meta["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id
    assert meta["tokenizer.ggml.bos_token_id"] == tokenizer.bos_token_id
    assert meta["tokenizer.chat_template"] == tokenizer.chat_template.replace("{% generation %}", "").replace(
        "{% endgeneration %}", "")

    from llmtune.tools.export import merged_model

    weights = merged_model(lora_run)[0].state_dict()
    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == len(weights) == 21
    q = tensors["blk.0.attn_q.weight"]
    assert q.tensor_type.name == quant.upper() and tuple(reversed(q.shape.tolist())) == (64, 64)
    assert tensors["blk.0.attn_norm.weight"].tensor_type.name == "F32"
    for name, hf, heads in (("blk.1.attn_k.weight", "model.layers.1.self_attn.k_proj.weight", 2),
                            ("blk.0.ffn_down.weight", "model.layers.0.mlp.down_proj.weight", None),
                            ("output.weight", "lm_head.weight", None)):
        data = gguf.quants.dequantize(tensors[name].data, tensors[name].tensor_type).reshape(weights[hf].shape)
        data = unpermute(data, heads) if heads else data
        tolerance = {"f32": 0, "f16": 1e-3, "q8_0": 2e-2}[quant]
        assert np.abs(data - weights[hf].numpy()).max() <= tolerance * np.abs(weights[hf].numpy()).max() + 1e-7, name


@pytest.mark.slow
def test_unsupported_architecture_fails_clearly(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from llmtune.builtin import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2)).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    result = cli("export", tmp_path, "--quant", "f16")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "supports the LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, Gemma2ForCausalLM, " \
           "Gemma3ForCausalLM, Phi3ForCausalLM architectures; this model is GPT2LMHeadModel" in result.stderr
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*.tmp"))


@pytest.mark.slow
@pytest.mark.parametrize("quant", ["f32", "q8_0"])
def test_llama_cpp_generates_the_same_greedy_tokens(lora_run, tmp_path, quant):
    out = tmp_path / f"tiny-{quant}.gguf"
    assert cli("export", lora_run, "--quant", quant, "--out", out).returncode == 0
    loaded = load(lora_run)
    with llama_cpp(out) as llm:
        for prompt in PROMPTS:
            ids = prompt_ids(loaded.tokenizer, [{"role": "user", "content": prompt}])
            ours = generate(loaded, ids, Sampling(max_new_tokens=12))  # stops before the end-of-turn token
            end = [loaded.tokenizer.eos_token_id] if len(ours) < 12 else []  # llama.cpp's answer ends with it
            assert llm.greedy(ids[0].tolist(), 12) == ours + end, prompt
        text = "Hello, wörld! ~~ <|end|> 123"
        assert llm.tokenize(text) == loaded.tokenizer(text)["input_ids"]


@pytest.mark.slow
def test_llama3_rope_scaling_and_tied_embeddings_match_llama_cpp(tmp_path):
    """Llama 3.x shapes: rope_freqs from llama3 rope scaling, output head tied to the embeddings."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from llmtune.builtin import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=4096, initializer_range=0.1, tie_word_embeddings=True,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    torch.manual_seed(1)
    model = LlamaForCausalLM(config)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    assert cli("export", tmp_path, "--quant", "f32", "--out", tmp_path / "m.gguf").returncode == 0
    ids = tokenizer("The quick brown fox jumps over the lazy dog, past the original context of 64 tokens.")["input_ids"]
    ours = model.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False)[0, len(ids):].tolist()
    with llama_cpp(tmp_path / "m.gguf") as llm:
        assert llm.greedy(ids, 16) == ours


# Ollama Modelfile: its TEMPLATE is executed as Go's text/template would (tests/gotemplate.py, and Go itself
# when installed) and compared with transformers' rendering of the chat template the run trained with.
CHATS = [  # (messages, ends in an answer Ollama continues); other texts than llmtune.tools.ollama checks itself with
    ([{"role": "user", "content": "Say hi"}], False),
    ([{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi!"},
      {"role": "user", "content": "And\nbye?"}], False),
    ([{"role": "system", "content": "Answer in {one} word."}, {"role": "user", "content": "Say hi"},
      {"role": "assistant", "content": "hi!"}, {"role": "user", "content": "Count to 3"},
      {"role": "assistant", "content": "1 2 3"}, {"role": "user", "content": 'A "color"?'}], False),
    ([{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}], True),
    ([{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Name a color"},
      {"role": "assistant", "content": "blue"}, {"role": "user", "content": "Another"},
      {"role": "assistant", "content": "re"}], True),
]
TINY_OLLAMA_TEMPLATE = """<s>{{ range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if eq .Role "system" }}<|system|>
{{ .Content }}<|end|>
{{ else if eq .Role "user" }}<|user|>
{{ .Content }}<|end|>
{{ else if eq .Role "assistant" }}<|assistant|>
{{ .Content }}{{ if not $last }}<|end|>
{{ end }}{{ end }}
{{- if and $last (ne .Role "assistant") }}<|assistant|>
{{ end }}
{{- end }}"""


def read_modelfile(text: str) -> dict:
    """Commands -> values, unquoted as Ollama's parser does (triple or single double quotes)."""
    import re

    commands = {}
    for name, value in re.findall(r'^(FROM|TEMPLATE|SYSTEM|PARAMETER) ("""[\s\S]*?"""|[^\n]*)$', text, re.M):
        value = value[3:-3] if value.startswith('"""') else value
        commands.setdefault(name, []).append(value.replace('"', "") if name == "PARAMETER" else value)
    return commands


def ollama_data(chat, system):
    """What Ollama hands the template: the Modelfile's SYSTEM first when the chat has no system message."""
    if system and chat[0]["role"] != "system":
        chat = [{"role": "system", "content": system}, *chat]
    return {"Messages": [{"Role": m["role"], "Content": m["content"]} for m in chat],
            "System": "\n\n".join(m["content"] for m in chat if m["role"] == "system")}


def hf_render(tokenizer, chat, prefill):
    return tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=not prefill,
                                         continue_final_message=prefill)


@pytest.mark.slow
def test_export_writes_an_ollama_modelfile_that_renders_like_the_run(lora_run, tmp_path):
    import gguf
    from transformers import AutoTokenizer

    from llmtune.tokenizer import end_of_turn_token

    from .gotemplate import execute

    out = tmp_path / "tiny-q8_0.gguf"
    result = cli("export", lora_run, "--quant", "q8_0", "--out", out)
    assert result.returncode == 0 and "warning" not in result.stderr, result.stderr
    path = tmp_path / "tiny-q8_0.Modelfile"
    assert f"ollama create NAME -f {path}" in result.stdout
    commands = read_modelfile(path.read_text())
    assert commands["FROM"] == ["./tiny-q8_0.gguf"] and (path.parent / commands["FROM"][0]).is_file()
    tokenizer = AutoTokenizer.from_pretrained(lora_run)  # the template the run trained with
    assert commands["PARAMETER"] == [f"stop {end_of_turn_token(tokenizer)[1]}"] == ["stop <|end|>"]
    assert "SYSTEM" not in commands  # the tiny template has no default system message
    assert commands["TEMPLATE"] == [TINY_OLLAMA_TEMPLATE]
    # The tokenizer adds no BOS and neither does llama.cpp (GGUF metadata): the template writes <s> itself.
    assert gguf.GGUFReader(out).fields["tokenizer.ggml.add_bos_token"].contents() is False
    prompts = [execute(commands["TEMPLATE"][0], ollama_data(chat, None)) for chat, _ in CHATS]
    assert prompts == [hf_render(tokenizer, chat, prefill) for chat, prefill in CHATS]
    with llama_cpp(out) as llm:  # what Ollama's llama.cpp runner feeds the model: these prompts' tokens, as trained
        assert [llm.tokenize(p, add_special=True) for p in prompts] == \
            [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]


@pytest.mark.slow
def test_no_modelfile_without_a_decomposable_template_and_never_a_stale_one(lora_run, tmp_path):
    from llmtune.paths import read_chat_template

    run_dir = tmp_path / "run"
    shutil.copytree(lora_run, run_dir)
    (run_dir / "chat_template.jinja").write_text(read_chat_template("llama3_2"))  # writes today's date
    result = cli("export", run_dir, "--quant", "f16")
    assert result.returncode == 0, result.stderr
    assert "warning: no Ollama Modelfile: the chat template cannot be written as an Ollama template: it writes " \
           "today's date" in result.stderr and "The GGUF itself is fine" in result.stderr
    assert [p.name for p in run_dir.glob("*.gguf")] == ["lora-f16.gguf"] and not list(run_dir.glob("*Modelfile*"))

    from llmtune.errors import UserError
    from llmtune.tools.export import export_gguf

    assert export_gguf(lora_run, tmp_path / "a.gguf", ollama=False)[2] == []  # --no-ollama
    assert (tmp_path / "a.gguf").is_file() and not (tmp_path / "a.Modelfile").exists()
    (tmp_path / "b.Modelfile").write_text("FROM ./other.gguf\n")
    with pytest.raises(UserError, match="b.Modelfile: file exists; pass --out FILE or --overwrite"):
        export_gguf(lora_run, tmp_path / "b.gguf")
    assert not (tmp_path / "b.gguf").exists()


# TRL's shipped chat templates: these decompose (with what the Modelfile then says about them) ...
TRIM, NO_SYSTEM = "strips whitespace around each message", "takes no system message"
DECOMPOSABLE = {"llama3": [TRIM], "llama3_1": [TRIM], "qwen2_5": [], "phi3": [], "gemma": [NO_SYSTEM, TRIM],
                "qwen3_instruct_2507": []}
# ... and these do not, for the reason given: no Modelfile rather than a wrong one.
REFUSED = {"llama3_2": "writes today's date", "gemma3": "depends on the turns around it",
           "qwen3": "is not a fixed text around each message", "smolvlm": "rewrites or repeats message content",
           "deepseekv3": "fails on a 4-message conversation"}


def trl_template_modelfiles(adds_bos):
    """(name, tokenizer, Modelfile commands, notes, BOS llama.cpp adds) per decomposable TRL template (tiny vocab)."""
    from llmtune.builtin import build_tiny_tokenizer
    from llmtune.paths import read_chat_template
    from llmtune.tools.ollama import modelfile

    for name in DECOMPOSABLE:
        tokenizer = build_tiny_tokenizer()
        tokenizer.chat_template = read_chat_template(name)
        text, notes = modelfile(tokenizer, Path("m.gguf"), [tokenizer.eos_token_id], adds_bos)
        writes_bos = hf_render(tokenizer, *CHATS[0]).startswith(tokenizer.bos_token)
        yield name, tokenizer, read_modelfile(text), notes, tokenizer.bos_token if adds_bos and writes_bos else ""


def expected_renders(tokenizer, commands, bos):
    """(Ollama's data, transformers' rendering less the BOS llama.cpp adds) for each chat the template takes."""
    system = (commands.get("SYSTEM") or [None])[0]
    pairs = []
    for chat, prefill in CHATS:
        if "system" not in commands["TEMPLATE"][0] and chat[0]["role"] == "system":
            continue  # e.g. Gemma: transformers raises on a system message; Ollama's are left out
        pairs.append((ollama_data(chat, system), hf_render(tokenizer, chat, prefill)[len(bos):]))
    return pairs


@pytest.mark.parametrize("adds_bos", [False, True])
def test_trl_chat_templates_become_ollama_templates_or_a_reason(adds_bos):
    from llmtune.builtin import build_tiny_tokenizer
    from llmtune.paths import read_chat_template
    from llmtune.tools.ollama import NotDecomposable, modelfile

    from .gotemplate import execute

    for name, tokenizer, commands, notes, bos in trl_template_modelfiles(adds_bos):
        writes_bos = hf_render(tokenizer, *CHATS[0]).startswith("<s>")
        expected_notes = DECOMPOSABLE[name] + (["one token more than in training"] if adds_bos and not writes_bos
                                               else [])
        assert len(notes) == len(expected_notes) and all(
            any(part in note for note in notes) for part in expected_notes), (name, notes)
        assert commands.get("SYSTEM") == (["You are Qwen, created by Alibaba Cloud. You are a helpful assistant."]
                                          if name == "qwen2_5" else None), name
        template = commands["TEMPLATE"][0]
        assert not (bos and template.startswith(bos)), name  # llama.cpp adds it: never twice
        for data, expected in expected_renders(tokenizer, commands, bos):
            assert execute(template, data) == expected, (name, data)
    for name, reason in REFUSED.items():
        tokenizer = build_tiny_tokenizer()
        tokenizer.chat_template = read_chat_template(name)
        with pytest.raises(NotDecomposable, match=reason):
            modelfile(tokenizer, Path("m.gguf"), [tokenizer.eos_token_id], adds_bos)


def test_every_shipped_trl_template_gets_a_verified_modelfile_or_a_reason():
    """No template TRL ships (their `_training` variants included) crashes the export or gets a wrong template."""
    from llmtune.builtin import build_tiny_tokenizer
    from llmtune.paths import _trl_templates_dir
    from llmtune.tools.ollama import NotDecomposable, modelfile

    from .gotemplate import execute

    written, tokenizer = 0, build_tiny_tokenizer()
    for path in sorted(_trl_templates_dir().glob("*.jinja")):
        tokenizer.chat_template = path.read_text()
        try:
            commands = read_modelfile(modelfile(tokenizer, Path("m.gguf"), [tokenizer.eos_token_id], False)[0])
        except NotDecomposable as err:
            assert "The GGUF itself is fine" in str(err)
            continue
        written += 1
        for data, expected in expected_renders(tokenizer, commands, ""):
            assert execute(commands["TEMPLATE"][0], data) == expected, (path.stem, data)
    assert written >= len(DECOMPOSABLE)


@pytest.mark.slow
def test_modelfile_templates_render_the_same_in_go_text_template():
    """The same templates through Go's own text/template, as Ollama executes them (tests/ollama_render.go)."""
    import subprocess

    from llmtune.builtin import build_tiny_tokenizer

    tiny = build_tiny_tokenizer()
    jobs = [{"Template": TINY_OLLAMA_TEMPLATE, "Chats": [ollama_data(chat, None)["Messages"] for chat, _ in CHATS]}]
    expected = [[hf_render(tiny, chat, prefill) for chat, prefill in CHATS]]
    for adds_bos in (False, True):
        for _, tokenizer, commands, _, bos in trl_template_modelfiles(adds_bos):
            pairs = expected_renders(tokenizer, commands, bos)
            jobs.append({"Template": commands["TEMPLATE"][0], "Chats": [data["Messages"] for data, _ in pairs]})
            expected.append([text for _, text in pairs])
    result = subprocess.run(["go", "run", str(Path(__file__).with_name("ollama_render.go"))], input=json.dumps(jobs),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == expected
