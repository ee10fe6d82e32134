"""SFT end to end on the builtin tiny model: training, masks, run directory, reload."""

import json
import math

import pytest
import torch

from llmtune.recipe.check import resolve
from llmtune.runner.session import train as run

from .conftest import RECIPES, cli, make_recipe, write_jsonl

CHAT = RECIPES / "data" / "chat.jsonl"
SECRET = "hf_do_not_leak_4242"

LORA = {"type": "lora", "r": 8, "alpha": 16}


def recipe_file(tmp_path, name="r", adapter=LORA, data=CHAT, steps=2, lr=1e-3, eval_=0.0, **sections):
    return make_recipe(tmp_path, data={"train": [{"path": data}], "eval": eval_, "max_length": 128, "packing": False},
                       name=name, adapter=adapter,
                       train={"learning_rate": lr, "max_steps": steps, "per_device_train_batch_size": 8,
                              "gradient_checkpointing": False, "logging_steps": 2, "save_strategy": "no",
                              "disable_tqdm": True}, **sections)


def train(tmp_path, name="run", adapter=LORA, data=CHAT, steps=20, lr=3e-3, eval_=0.0, sets=(), **sections):
    recipe = recipe_file(tmp_path, name, adapter, data, steps, lr, eval_, **sections)
    out = tmp_path / "runs" / name
    metrics = run(resolve(recipe, sets), ["llmtune", "sft", str(recipe)], output_dir=str(out))
    return out, metrics


def base_weights():
    from transformers import AutoModelForCausalLM

    from llmtune.builtin import builtin_path

    return AutoModelForCausalLM.from_pretrained(builtin_path("tiny")).state_dict()


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, llmtune_cache):
    tmp = tmp_path_factory.mktemp("lora")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_TOKEN", SECRET)
        return train(tmp, eval_=0.1, sets=["train.eval_steps=10"])


@pytest.mark.slow
def test_lora_loss_falls_and_only_adapter_weights_change(lora_run):
    out, metrics = lora_run
    assert metrics["last_loss"] < 0.8 * metrics["first_loss"], metrics
    from safetensors.torch import load_file

    adapter = load_file(out / "adapter_model.safetensors")
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)  # B starts at zero: nonzero means it trained
    assert not any("lora" not in k for k in adapter)  # the base is not saved again

    from peft import AutoPeftModelForCausalLM

    model = AutoPeftModelForCausalLM.from_pretrained(out)
    base = base_weights()
    for name, tensor in model.get_base_model().state_dict().items():
        key = name.replace(".base_layer", "")
        if "lora_" not in name and key in base:
            assert torch.equal(tensor, base[key]), name


@pytest.mark.slow
def test_run_directory_is_complete_and_reloads_and_generates(lora_run):
    out, metrics = lora_run
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "tokenizer_config.json",
                 "recipe.yaml", "manifest.json", "README.md", "metrics.jsonl", "loss.png", "train.log"):
        assert (out / name).is_file(), name
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "completed" and manifest["method"] == "sft"
    assert {"llmtune", "torch", "transformers", "trl", "peft"} <= set(manifest["packages"])
    assert manifest["data"][0]["sha256"] and manifest["data"][0]["rows"] == 240
    assert manifest["started"] <= manifest["finished"]
    assert math.isclose(manifest["metrics"]["last_loss"], metrics["last_loss"])
    assert "eval_loss" in manifest["metrics"]
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps if "loss" in s] == list(range(2, 21, 2))
    assert any("eval_loss" in s for s in steps)
    card = (out / "README.md").read_text()
    assert "AutoPeftModelForCausalLM" in card and "builtin:tiny" in card and "chat.jsonl" in card

    for path in out.rglob("*"):  # the token was in the environment during training
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path

    from peft import AutoPeftModelForCausalLM
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out)
    assert "{% generation %}" in tokenizer.chat_template  # the training template travels with the model
    model = AutoPeftModelForCausalLM.from_pretrained(out)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of Peru?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    generated = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert generated.shape[1] > prompt["input_ids"].shape[1]


@pytest.mark.slow
def test_resolved_recipe_reproduces_the_run(lora_run, tmp_path):
    out, metrics = lora_run
    again = tmp_path / "again"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_TOKEN", SECRET)
        rerun = run(resolve(out / "recipe.yaml"), ["llmtune"], output_dir=str(again))
    def losses(folder):
        return [s["loss"] for s in map(json.loads, (folder / "metrics.jsonl").read_text().splitlines()) if "loss" in s]

    assert len(losses(out)) == 10
    assert losses(again) == pytest.approx(losses(out), rel=1e-4)
    assert rerun["last_loss"] == pytest.approx(metrics["last_loss"], rel=1e-4)


@pytest.mark.slow
def test_qlora_trains_4bit_base_on_cpu(tmp_path):
    from llmtune.runner import session as model_module

    seen = {}
    original = model_module.load_model

    def spy(*args, **kwargs):
        loaded = original(*args, **kwargs)
        import bitsandbytes as bnb

        seen["4bit"] = sum(isinstance(m, bnb.nn.Linear4bit) for m in loaded.modules())
        return loaded

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(model_module, "load_model", spy)
        out, metrics = train(tmp_path, quantization={"bits": 4, "compute_dtype": "float32"}, steps=16)
    assert seen["4bit"] == 14  # 7 linear layers x 2 blocks; lm_head stays full precision
    assert metrics["last_loss"] < 0.9 * metrics["first_loss"], metrics
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"


@pytest.mark.slow
def test_full_fine_tuning_changes_base_weights_and_reloads(tmp_path):
    out, metrics = train(tmp_path, adapter=None, steps=12, lr=1e-3)
    assert metrics["last_loss"] < metrics["first_loss"]
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    base = base_weights()
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, base[k])]
    assert len(changed) == len(base)
    assert not (out / "adapter_config.json").exists()


@pytest.mark.slow
def test_dora_and_rslora_adapters(tmp_path):
    for kind in ("dora", "rslora"):
        out, metrics = train(tmp_path, name=kind, adapter={"type": kind, "r": 4}, steps=6)
        config = json.loads((out / "adapter_config.json").read_text())
        assert config["use_dora"] is (kind == "dora") and config["use_rslora"] is (kind == "rslora")
        assert metrics["last_loss"] < metrics["first_loss"]


FORMATS = {
    "messages": ({"messages": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi!"}]},
                 "hi!<|end|>"),
    "sharegpt": ({"conversations": [{"from": "human", "value": "Say hi"}, {"from": "gpt", "value": "hi!"}]},
                 "hi!<|end|>"),
    "alpaca": ({"instruction": "Say", "input": "hi", "output": "hi!"}, "hi!<|end|>\n"),
    "prompt_completion": ({"prompt": "Say hi:", "completion": " hi!"}, " hi!<|end|>"),
    "text": ({"text": "hi there"}, "hi there<|end|>"),  # <s> is never a label: nothing precedes it
}


def sft_trainer(recipe, sets=()):
    """The SFTTrainer llmtune builds for a recipe, without training."""
    from llmtune.data import load_data
    from llmtune.methods import sft
    from llmtune.model import load_model
    from llmtune.runner.session import training_args
    from llmtune.tokenizer import load_tokenizer

    resolved = resolve(recipe, sets)
    prepared = load_data(resolved.config["data"], method="sft", seed=0)
    tokenizer = load_tokenizer(resolved.config["model"])
    args = training_args(resolved, recipe.parent / "scratch", sft.defaults(resolved.config, prepared))
    trainer = sft.build_trainer(args=args, model=load_model(resolved.config), tokenizer=tokenizer, data=prepared,
                                peft_config=None, callbacks=[])
    return trainer, tokenizer


@pytest.mark.slow
@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_trains_exactly_the_right_tokens(tmp_path, fmt):
    row, trained = FORMATS[fmt]
    data = write_jsonl(tmp_path / f"{fmt}.jsonl", [row] * 16)
    out, metrics = train(tmp_path, data=data, steps=6)
    assert metrics["last_loss"] < metrics["first_loss"]

    # The trainer's own collated batch: the tokens whose label is not -100 are exactly `trained`.
    trainer, tokenizer = sft_trainer(tmp_path / "run.yaml")
    batch = trainer.data_collator([trainer.train_dataset[0]])
    labels = batch["labels"][0]
    assert tokenizer.decode(labels[labels != -100]) == trained


@pytest.mark.slow
def test_packing_keeps_rows_apart_and_masks_each(tmp_path):
    recipe = recipe_file(tmp_path, "p", steps=6, lr=3e-3)
    trainer, tokenizer = sft_trainer(recipe, ["data.packing=true", "data.max_length=256"])
    batch = trainer.data_collator([trainer.train_dataset[0]])
    starts = (batch["position_ids"][0] == 0).sum().item()
    assert starts >= 2  # several conversations share one packed row...
    labels = batch["labels"][0]
    trained = tokenizer.decode(labels[labels != -100])
    assert trained.count("<|end|>") >= starts and "<|user|>" not in trained  # ...and each is masked on its own
    out, metrics = train(tmp_path, name="packed", sets=["data.packing=true"], steps=8)
    assert metrics["last_loss"] < metrics["first_loss"]


GOOD = json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})
BAD_DATA = {
    "broken JSON": ('{"messages": [oops', "broken.jsonl:37: invalid JSON"),
    "unknown role": (json.dumps({"messages": [{"role": "bot", "content": "q"}, {"role": "assistant", "content": "a"}]}),
                     "broken.jsonl:37: unknown role 'bot'"),
    "no assistant turn": (json.dumps({"messages": [{"role": "user", "content": "q"}]}),
                          "broken.jsonl:37: conversation has no assistant turn"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", BAD_DATA)
def test_bad_data_exits_2_with_the_line_and_writes_nothing(tmp_path, case):
    line, message = BAD_DATA[case]
    lines = [GOOD] * 40
    lines[36] = line
    (tmp_path / "broken.jsonl").write_text("\n".join(lines) + "\n")
    recipe = recipe_file(tmp_path, data="broken.jsonl")
    result = cli("sft", recipe, "--output-dir", tmp_path / "out", cwd=tmp_path)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_columns_matching_no_format_and_empty_files(tmp_path):
    write_jsonl(tmp_path / "odd.jsonl", [{"question": "q", "answer": "a"}] * 3)
    (tmp_path / "empty.jsonl").write_text("")
    for name, message in (("odd.jsonl", "question, answer"), ("empty.jsonl", "empty")):
        recipe = recipe_file(tmp_path, data=name)
        result = cli("sft", recipe, "--output-dir", tmp_path / "out", cwd=tmp_path)
        assert result.returncode == 2 and name in result.stderr and message in result.stderr, result.stderr
        assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_cli_refuses_a_finished_run_directory(lora_run, tmp_path):
    out, _ = lora_run
    result = cli("sft", RECIPES / "quickstart.yaml", "--output-dir", out)
    assert result.returncode == 2 and "holds a finished run" in result.stderr and "--overwrite" in result.stderr


def test_packing_defaults_on_only_with_varlen_attention():
    from types import SimpleNamespace

    from llmtune.methods import sft

    data = SimpleNamespace(shape="conversational_language_modeling", warnings=[], eval=None)
    config = {"data": {"max_length": 64, "packing": None},
              "model": {"trust_remote_code": False, "attn_implementation": "flash_attention_2"}}
    assert sft.defaults(config, data)["packing"] is True and data.warnings == []
    config["model"]["attn_implementation"] = "sdpa"
    assert sft.defaults(config, data)["packing"] is False and data.warnings == []  # quiet, documented fallback
    config["data"]["packing"] = True  # the recipe's word wins, with a warning about the cost
    assert sft.defaults(config, data)["packing"] is True and "packing without flash attention" in data.warnings[0]
