"""`llmtune plan`: no weights loaded, exact parameter counts, the memory formula, fit advice, batch and steps."""

import pytest
import torch

from llmtune.memory import GIB, RUNTIME_OVERHEAD, Settings, Shape, estimate, model_shape
from llmtune.recipe.check import resolve
from llmtune.tools.plan import plan

from .conftest import RECIPES, cli, make_recipe

# Llama-3.2-1B's shape (config.json of meta-llama/Llama-3.2-1B): 16 layers, hidden 2048, MLP 8192,
# 8 key/value heads of 64, vocabulary 128256, embeddings tied to the output head.
LLAMA_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True,
                dtype="bfloat16")


@pytest.fixture(scope="module")
def config_only_model(tmp_path_factory, llmtune_cache):
    """A model folder with config.json and a tokenizer, and no weights at all."""
    from transformers import LlamaConfig

    from llmtune.builtin import build_tiny_tokenizer

    folder = tmp_path_factory.mktemp("llama-1b-config")
    LlamaConfig(**LLAMA_1B, architectures=["LlamaForCausalLM"]).save_pretrained(folder)
    build_tiny_tokenizer().save_pretrained(folder)
    assert not list(folder.glob("*.safetensors")) and not list(folder.glob("*.bin"))
    return folder


def recipe_for(tmp_path, model, adapter=None):
    return make_recipe(tmp_path, model={"name": model, "dtype": None}, adapter=adapter, data={"max_length": 2048},
                       train={"per_device_train_batch_size": 4, "gradient_accumulation_steps": 4})


def test_plan_loads_no_weights(config_only_model, tmp_path, monkeypatch):
    """Counts come from the config: a folder without weight files plans fine, and nothing reads weights."""
    import safetensors.torch
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("plan tried to load weights")

    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", refuse)
    monkeypatch.setattr(safetensors.torch, "load_file", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    lines = plan(resolve(recipe_for(tmp_path, config_only_model, {"type": "lora", "r": 16})), "r.yaml")
    text = "\n".join(lines)
    # Llama-3.2-1B has 1,235,814,400 parameters; LoRA r=16 on every linear layer adds 11,272,192.
    assert "parameters: 1,235,814,400 total; 11,272,192 trainable" in text


def test_parameter_counts_equal_the_loaded_model(tmp_path):
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from llmtune.builtin import builtin_path
    from llmtune.model import peft_config

    resolved = resolve(recipe_for(tmp_path, "builtin:tiny", {"type": "dora", "r": 4}))
    shape = model_shape(resolved.config)
    model = AutoModelForCausalLM.from_pretrained(builtin_path("tiny"))
    assert shape.params == sum(p.numel() for p in model.parameters()) == 107_712
    peft = get_peft_model(model, peft_config(resolved.config["adapter"]))
    assert shape.trainable == sum(p.numel() for p in peft.parameters() if p.requires_grad)
    assert (shape.layers, shape.hidden, shape.intermediate, shape.kv_width, shape.vocab) == (2, 64, 128, 32, 263)


SHAPE = Shape(params=1_235_814_400, linear=973_078_528, trainable=1_235_814_400, lora_per_rank=704_512,
              layer_params=60_821_504, layers=16, hidden=2048, intermediate=8192, kv_width=512, vocab=128256,
              dtype="bfloat16", architecture="LlamaForCausalLM")


def test_memory_estimate_full_fine_tune_by_hand():
    """Full fine-tune in bf16 with AdamW, batch 4 x 2048 tokens, gradient checkpointing."""
    est = estimate(SHAPE, Settings(batch=4, seq_len=2048, checkpointing=True, optim="adamw_torch_fused",
                                   quant=None, adapter=None))
    weights = 1_235_814_400 * 2  # bf16
    # Per token: the 16 checkpointed layer inputs (2048 x 2 bytes each), one layer recomputed
    # (2 * (6*2048 + 4*8192 + 2*512) + 8*2048 = 108544 bytes) and the output (128256 * (8 + 2)).
    per_token = 16 * 2048 * 2 + (2 * (6 * 2048 + 4 * 8192 + 2 * 512) + 8 * 2048) + 128256 * 10
    assert est.terms == {"weights": weights, "adapter": 0, "gradients": weights, "optimizer": 2 * weights,
                         "activations": 4 * 2048 * per_token, "runtime": RUNTIME_OVERHEAD}
    assert round(est.total / GIB, 2) == 21.32


def test_memory_estimate_qlora_by_hand():
    """4-bit base (double quantization), LoRA r=16 with dropout, paged 8-bit AdamW, batch 2 x 1024, no checkpointing."""
    lora = 16 * 704_512
    shape = Shape(**{**SHAPE.__dict__, "trainable": lora})
    est = estimate(shape, Settings(batch=2, seq_len=1024, checkpointing=False, optim="paged_adamw_8bit",
                                   quant={"bits": 4, "double_quant": True, "compute_dtype": "bfloat16"},
                                   adapter={"type": "lora", "r": 16, "lora_dropout": 0.05}))
    # Half a byte per linear weight + 1/64 byte (8-bit scale per 64) + 4/16384 (a float32 per 256 scales);
    # embeddings and norms stay in bf16.
    weights = 973_078_528 * (0.5 + 1 / 64 + 4 / (64 * 256)) + (1_235_814_400 - 973_078_528) * 2
    # Per layer and token: the block's own activations in bf16, plus the inputs of the 7 adapted layers
    # cast to float32 (6*2048 + 8192 values) and dropout's output on each.
    layer = 2 * (6 * 2048 + 4 * 8192 + 2 * 512) + 8 * 2048 + 2 * 4 * (6 * 2048 + 8192)
    assert est.terms == {"weights": int(weights), "adapter": lora * 4, "gradients": lora * 4,
                         "optimizer": lora * 2, "activations": 2 * 1024 * (16 * layer + 128256 * 10),
                         "runtime": RUNTIME_OVERHEAD}


def test_zero3_shards_weights_gradients_and_optimizer():
    base = Settings(batch=1, seq_len=512, checkpointing=True, optim="adamw_torch", quant=None, adapter=None)
    one = estimate(SHAPE, base).terms
    four = estimate(SHAPE, Settings(**{**base.__dict__, "processes": 4, "backend": "zero3"})).terms
    assert four["weights"] == one["weights"] // 4 + 60_821_504 * 2  # a quarter, plus one gathered layer
    assert four["gradients"] == one["gradients"] // 4 and four["optimizer"] == one["optimizer"] // 4
    assert four["activations"] == one["activations"]
    ddp = estimate(SHAPE, Settings(**{**base.__dict__, "processes": 4, "backend": "ddp"})).terms
    assert ddp == one


def test_activation_formula_matches_saved_tensors_of_a_real_step():
    """The activations term against the bytes autograd actually keeps for backward (full fine-tune, no
    checkpointing), on a small Llama in bf16 and fp32; the logits term is at the loss and only partly saved."""
    from transformers import LlamaConfig, LlamaForCausalLM

    for dtype, name in ((torch.bfloat16, "bfloat16"), (torch.float32, "float32")):
        config = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=688, num_hidden_layers=2,
                             num_attention_heads=8, num_key_value_heads=2, attn_implementation="sdpa")
        model = LlamaForCausalLM(config).to(dtype)
        saved = {}

        def keep(tensor):
            storage = tensor.untyped_storage()
            saved[storage.data_ptr()] = storage.nbytes()
            return tensor

        ids = torch.randint(0, 512, (2, 128))
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            model(input_ids=ids, labels=ids)
        weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
        measured = sum(n for ptr, n in saved.items() if ptr not in weights)
        shape = Shape(params=0, linear=0, trainable=0, lora_per_rank=0, layer_params=0, layers=2, hidden=256,
                      intermediate=688, kv_width=64, vocab=0, dtype=name, architecture="")
        blocks = estimate(shape, Settings(batch=2, seq_len=128, checkpointing=False, optim="sgd", quant=None,
                                          adapter=None)).terms["activations"]
        # Saved outside the blocks, per token: float32 log-probs (4 bytes per vocabulary entry) and the
        # final norm's input and float32 copies.
        e = 2 if dtype == torch.bfloat16 else 4
        outside = 2 * 128 * (512 * 4 + (2 * e + 4) * 256)
        assert abs(measured - outside - blocks) / blocks < 0.05, (name, measured, blocks)


@pytest.mark.slow
def test_gpu_memory_fit_check_and_advice(config_only_model, tmp_path):
    recipe = recipe_for(tmp_path, config_only_model)
    tight = cli("plan", recipe, "--gpu-memory", "8GiB", "--set", "data.packing=true")
    assert tight.returncode == 0, tight.stderr
    assert "does NOT fit in 8.00 GiB" in tight.stdout
    assert "does NOT fit in 8.00 GiB" in tight.stdout.split("\n# data")[0]  # among the findings, first
    advice = tight.stdout.split("change, in order:")[1].split("# launch")[0].strip().splitlines()
    assert advice[-1].endswith("(fits)") and all(line.endswith("(still over)") for line in advice[:-1])
    assert any("paged_adamw_8bit" in line for line in advice)
    roomy = cli("plan", recipe, "--gpu-memory", "80GB")
    assert "fits in 80.00 GiB" in roomy.stdout
    bad = cli("plan", recipe, "--gpu-memory", "lots")
    assert bad.returncode == 2 and "--gpu-memory lots" in bad.stderr


@pytest.mark.slow
def test_batch_steps_data_summary_and_launch_line():
    result = cli("plan", RECIPES / "quickstart.yaml")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    # The findings lead; the recipe dump only with --recipe.
    assert out.splitlines()[:4] == [
        "# findings", "sft on builtin:tiny: 107,712 parameters, 32,768 trainable (30.42%, lora adapter)",
        "228 training rows, 8 rows per optimizer step: 145 steps (5 epochs)",
        out.splitlines()[3]]
    assert out.splitlines()[3].startswith("memory per GPU: about ") and "# resolved recipe" not in out
    assert "chat.jsonl: messages (column 'messages' found), 240 rows" in out
    assert "p50 69, p90 99, p99 102, max 102; 0 rows over max_length 256" in out
    # 240 rows minus the 5% eval hold-out = 228; 228 / 8 per step = 29 steps, 5 epochs.
    assert "training rows after eval hold-out and weights: 228; eval rows: 12" in out
    assert "= 8 rows per optimizer step" in out and "steps: 29 per epoch, 145 in total (5 epochs)" in out
    assert "parameters: 107,712 total; 32,768 trainable" in out
    assert out.rstrip().endswith(f"llmtune sft {RECIPES / 'quickstart.yaml'}")
    dumped = cli("plan", RECIPES / "quickstart.yaml", "--recipe").stdout
    assert dumped.startswith(out.rstrip()) and "\n# resolved recipe\n" in dumped and "learning_rate: 0.003" in dumped


@pytest.mark.slow
def test_multi_process_plan_uses_the_launch_settings(config_only_model, tmp_path):
    recipe = recipe_for(tmp_path, config_only_model)
    result = cli("plan", recipe, "--gpus", "4", "--backend", "zero3")
    assert result.returncode == 0, result.stderr
    assert "4 per device x 4 accumulation x 4 process(es) = 64 rows per optimizer step" in result.stdout
    assert "4 processes with zero3, sharded" in result.stdout
    assert "which runs: accelerate launch --config_file " in result.stdout
    assert "-m llmtune sft" in result.stdout and "launch.backend=zero3" in result.stdout


def test_distill_plan_counts_the_frozen_teacher(config_only_model, tmp_path):
    """The teacher loads with the student's `model:` settings (float32 here): its weights, and its logits."""
    import re

    from llmtune.memory import gib

    recipe = make_recipe(tmp_path, "distill", teacher_model=str(config_only_model), data={"max_length": 64},
                         train={"per_device_train_batch_size": 2})
    lines = plan(resolve(recipe), "r.yaml")
    (activations,) = [line for line in lines if line.strip().startswith("activations")]
    seq_len = int(re.search(r"2 x (\d+) tokens", activations).group(1))
    (teacher,) = [line for line in lines if line.strip().startswith("teacher")]
    # Llama-3.2-1B's parameters in float32, then 2 x seq_len logits over its 128256 ids (float32 + log-probs).
    assert gib(1_235_814_400 * 4 + 2 * seq_len * 128256 * 8) in teacher and str(config_only_model) in teacher
