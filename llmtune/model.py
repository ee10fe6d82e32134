"""Model loading (dtype, attention, bitsandbytes) and the PEFT config.

The tokenizer is in tokenizer.py, `builtin:tiny` in builtin.py, the attention pick in defaults.py.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from .builtin import model_path
from .defaults import attention
from .files import adapter_run
from .launch.rank import device_map
from .recipe.schema import ADAPTERS, AdapterSection
from .verbs import config_class


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


def frozen_config(config: dict, key: str) -> dict:
    """The recipe as it loads the frozen model named by `key` (`ref_model`, `teacher_model`): the `model:`
    section's settings on that name, no adapter trained, and a run adapter in it merged."""
    return {**config, "adapter": None,
            "model": {**config["model"], "name": config[key], "revision": None, "run_adapter": "merge"}}


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
    attn = attention(model).value  # the recipe's, or flash attention where this machine has it
    if attn:
        kwargs["attn_implementation"] = attn
    quant = quantization_config(config.get("quantization"))
    if quant is not None:
        kwargs["quantization_config"] = quant
        # bitsandbytes quantizes while placing weights, so the device is chosen at load time: this process's
        # own (under a launch too), or none when FSDP/ZeRO-3 shard the model.
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

    kind = ADAPTERS[adapter["type"]]
    mine = {f.name for f in dataclasses.fields(AdapterSection)}
    options = {**kind.defaults, **{k: v for k, v in adapter.items() if k not in mine}, **kind.sets}
    cls = config_class(kind.config)
    if model is not None and "tokenizer_name_or_path" in {f.name for f in dataclasses.fields(cls)}:
        options["tokenizer_name_or_path"] = model_path(model)  # prompt tuning's `TEXT` init tokenizes with it
    # SEQ_CLS also trains and saves the new score head (PEFT adds it to modules_to_save).
    task_type = {"CausalLM": "CAUSAL_LM", "SequenceClassification": "SEQ_CLS"}[head]
    return cls(task_type=task_type, **options)


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
