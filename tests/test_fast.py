"""Fast defaults picked for the machine: flash attention and Liger on a GPU, tokenizing workers on big data.

No GPU is needed: CUDA and the kernel packages are made to look present; what is checked is what
llmtune passes on (the TRL config, the attention it loads with), what `plan` shows and what a real
CPU run records and caches.
"""

import json
import os

import pytest
from transformers import utils

from llmtune import defaults as fast
from llmtune.data import load_data
from llmtune.methods import sft
from llmtune.recipe.check import resolve
from llmtune.runner.resume import fingerprint
from llmtune.runner.session import train as run
from llmtune.runner.trainer_args import training_args
from llmtune.tools.plan import plan

from .conftest import RECIPES, make_recipe

VERSIONS = {"flash-attn": "2.8.3", "flash-attn-3": "3.0.0b1", "liger-kernel": "0.6.4"}


def machine(monkeypatch, gpu=(8, 0), flash2=False, flash3=False, liger=False, liger_types=("llama",)):
    """Make this process look like it has `gpu` (a compute capability, None = no CUDA) and the packages."""
    monkeypatch.setattr(fast, "_gpu", lambda: gpu)
    monkeypatch.setattr(utils, "is_flash_attn_2_available", lambda: flash2)
    monkeypatch.setattr(utils, "is_flash_attn_3_available", lambda: flash3)
    monkeypatch.setattr(utils, "is_liger_kernel_available", lambda: liger)
    monkeypatch.setattr(fast, "_liger_model_types", lambda: set(liger_types))
    monkeypatch.setattr(fast, "_installed", VERSIONS.get)


def tiny(dtype="bfloat16", **extra):
    return {"name": "builtin:tiny", "revision": None, "dtype": dtype, "attn_implementation": None,
            "trust_remote_code": False, **extra}


def test_attention_pick(monkeypatch):
    machine(monkeypatch, gpu=None, flash2=True)
    assert fast.attention(tiny()) == fast.Pick(None, "no CUDA GPU")
    machine(monkeypatch, flash2=False)
    assert fast.attention(tiny()) == fast.Pick(None, "flash-attn is not installed")
    machine(monkeypatch, flash2=True)
    assert fast.attention(tiny()) == fast.Pick("flash_attention_2", "flash-attn 2.8.3 installed, CUDA, bfloat16")
    # builtin:tiny's checkpoint is float32: flash attention would only warn and run it badly
    assert fast.attention(tiny("auto")).value is None and "float32" in fast.attention(tiny("auto")).why
    assert fast.attention(tiny(trust_remote_code=True)).value is None
    assert fast.attention(tiny(attn_implementation="eager")) == fast.Pick("eager", "set in the recipe")
    machine(monkeypatch, gpu=(9, 0), flash2=True, flash3=True)  # Hopper with FA3
    assert fast.attention(tiny()) == fast.Pick("flash_attention_3", "flash-attn-3 3.0.0b1 installed, CUDA, bfloat16")
    machine(monkeypatch, gpu=(8, 0), flash2=True, flash3=True)  # FA3 is built for Hopper only
    assert fast.attention(tiny()).value == "flash_attention_2"


def test_liger_pick(monkeypatch):
    config = {"model": tiny(), "train": {}}
    machine(monkeypatch, liger=True)
    assert fast.liger(config, "sft") == fast.Pick(True, "liger-kernel 0.6.4 installed, CUDA, llama supported")
    assert fast.liger(config, "dpo").value is True
    # transformers would swap in Liger's causal-LM loss forward over the reward model's classifier
    assert fast.liger(config, "reward").value is None
    assert fast.liger({**config, "train": {"use_liger_kernel": False}}, "sft") == fast.Pick(False, "set in the recipe")
    machine(monkeypatch, liger=True, liger_types=("qwen2",))
    assert fast.liger(config, "sft") == fast.Pick(None, "Liger has no kernels for llama")
    machine(monkeypatch, liger=False)
    assert fast.liger(config, "sft") == fast.Pick(None, "liger-kernel is not installed")
    machine(monkeypatch, gpu=None, liger=True)
    assert fast.liger(config, "sft") == fast.Pick(None, "no CUDA GPU")


def test_tokenize_processes_by_rows_and_cores(monkeypatch):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    rows = fast.PARALLEL_ROWS
    assert fast.tokenize_processes(2 * rows - 1) is None  # each worker must get enough rows to pay for itself
    assert fast.tokenize_processes(2 * rows) == 2
    assert fast.tokenize_processes(100 * rows) == fast.MAX_TOKENIZE_PROCESSES
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")  # 8 ranks on this machine share its 16 cores
    assert fast.tokenize_processes(100 * rows) == 2
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert fast.tokenize_processes(100 * rows) is None


def lora_recipe(tmp_path, method="sft", data="chat.jsonl", dtype="bfloat16"):
    return make_recipe(tmp_path, method, {"train": [{"path": RECIPES / "data" / data}], "max_length": 128},
                       model={"dtype": dtype}, adapter={"type": "lora", "r": 8},
                       train={"max_steps": 2, "per_device_train_batch_size": 8, "save_strategy": "no",
                              "disable_tqdm": True})


def args_for(recipe, sets=()):
    resolved = resolve(recipe, sets)
    data = load_data(resolved.config["data"], method="sft", seed=resolved.config["seed"])
    return training_args(resolved, recipe.parent / "scratch", sft.defaults(resolved.config, data), data)


def test_picks_reach_the_trl_config_packing_follows_and_the_recipe_wins(tmp_path, monkeypatch):
    recipe = lora_recipe(tmp_path)
    machine(monkeypatch, flash2=True, liger=True)
    args = args_for(recipe)
    assert args.use_liger_kernel is True and args.packing is True  # varlen flash attention: packing pays
    args = args_for(recipe, ["model.attn_implementation=sdpa", "train.use_liger_kernel=false"])
    assert args.use_liger_kernel is False and args.packing is False
    machine(monkeypatch, gpu=None, flash2=True, liger=True)
    args = args_for(recipe)
    assert args.use_liger_kernel is False and args.packing is False


def test_a_checkpoint_records_the_packing_used_not_the_null_written(tmp_path, monkeypatch):
    # Made on a CPU host (no packing), resumed on a GPU host with flash-attn (packing): other batches.
    recipe = lora_recipe(tmp_path)
    resolved = resolve(recipe)
    data = load_data(resolved.config["data"], method="sft", seed=resolved.config["seed"])
    machine(monkeypatch, gpu=None)
    on_cpu = fingerprint(resolved, data, args_for(recipe))
    machine(monkeypatch, flash2=True)
    on_gpu = fingerprint(resolved, data, args_for(recipe))
    assert (on_cpu["data.packing"], on_gpu["data.packing"]) == ("false", "true")


def test_plan_shows_what_was_picked_and_why(tmp_path, monkeypatch):
    recipe = lora_recipe(tmp_path)
    machine(monkeypatch, flash2=True, liger=True)
    text = "\n".join(plan(resolve(recipe), recipe))
    assert "attention: flash_attention_2 (flash-attn 2.8.3 installed, CUDA, bfloat16)" in text
    assert "packing: on (data.packing: null" in text and "packed sequences per optimizer step" in text
    assert "Liger kernels: on (liger-kernel 0.6.4 installed, CUDA, llama supported)" in text
    machine(monkeypatch, gpu=None)
    text = "\n".join(plan(resolve(recipe, ["train.dataset_num_proc=3"]), recipe))
    assert "attention: sdpa (transformers' default: no CUDA GPU)" in text
    assert "packing: off (data.packing: null" in text and "Liger kernels: off (no CUDA GPU)" in text
    assert "tokenization: 3 processes (set in the recipe)" in text


@pytest.mark.slow
def test_parallel_tokenization_trains_is_cached_and_keeps_the_resume_fingerprint(tmp_path, monkeypatch):
    """Workers picked by row count: the run trains and records them, a second run reuses the tokenized shards,
    and the resume fingerprint is the same as with one process (a checkpoint resumes on another machine)."""
    from llmtune.data import cache

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr(fast, "PARALLEL_ROWS", 100)  # chat.jsonl's 240 rows: 2 workers
    recipe = lora_recipe(tmp_path, dtype="float32")
    resolved = resolve(recipe)
    run(resolved, ["llmtune", "sft", str(recipe)], output_dir=str(tmp_path / "one"))
    manifest = json.loads((tmp_path / "one" / "manifest.json").read_text())
    assert manifest["speed"] == {"attn_implementation": "sdpa", "use_liger_kernel": False, "dataset_num_proc": 2}

    folder = cache.folder(cache.key(resolved.config["data"], "sft", resolved.config["seed"], resolved.config["model"]))
    # (Earlier tests may have tokenized the same prepared data otherwise: their files are there too.)
    files = {p: p.stat().st_mtime_ns for p in folder.rglob("cache-*.arrow")}
    assert [p for p in files if p.name.endswith("_of_00002.arrow")]  # each worker's share of TRL's tokenization
    run(resolve(recipe), ["llmtune", "sft", str(recipe)], output_dir=str(tmp_path / "two"))
    assert {p: p.stat().st_mtime_ns for p in folder.rglob("cache-*.arrow")} == files  # all hits: none new or rewritten

    data = load_data(resolved.config["data"], method="sft", seed=resolved.config["seed"])
    parallel = training_args(resolved, tmp_path / "s", sft.defaults(resolved.config, data), data)
    single = training_args(resolved, tmp_path / "s", sft.defaults(resolved.config, data))
    assert (parallel.dataset_num_proc, single.dataset_num_proc) == (2, None)
    assert fingerprint(resolved, data, parallel) == fingerprint(resolved, data, single)


@pytest.mark.parametrize("method", ["dpo", "kto", "reward", "orpo"])
def test_every_method_with_the_field_gets_workers(method, tmp_path, monkeypatch):
    """TRL's DPO, KTO, reward and ORPO configs have `dataset_num_proc` too; GRPO/RLOO/PPO do not."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr(fast, "PARALLEL_ROWS", 100)
    data = "kto.jsonl" if method == "kto" else "preference.jsonl"
    recipe = lora_recipe(tmp_path, method, data)
    resolved = resolve(recipe)
    prepared = load_data(resolved.config["data"], method=method, seed=resolved.config["seed"])
    runner = __import__(resolved.method.runner, fromlist=["defaults"])
    args = training_args(resolved, tmp_path / "s", runner.defaults(resolved.config, prepared), prepared)
    assert args.dataset_num_proc == 2
