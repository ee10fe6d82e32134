"""Compatibility rules checked before anything is launched: one table, rendered in docs/distributed.md.

Each rule names the combination it is about, what llmtune does about it, and a check.
`recipe` rules depend on the recipe alone, so `llmtune validate` runs them too (from
recipe/check.py); `launch` rules also need the machine and the command line, and run
when a training verb or `llmtune launch` starts. A check returns findings: errors stop
the run (exit 2) with the recipe's FILE:LINE:COL; warnings and notes are printed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib.util import find_spec
from typing import Callable

from ..verbs import METHODS
from . import fields

DEEPSPEED = ("zero1", "zero2", "zero3", "zero3-offload")
SHARDED = ("fsdp", "zero3", "zero3-offload")  # backends that split the weights over processes themselves
# accelerate options llmtune sets from the recipe and its own flags; passing them after `--` too would
# leave two answers to one question.
OWNED_ARGS = {"--config_file": "--backend", "--num_processes": "--num-processes", "--num_machines": "--nodes",
              "--machine_rank": "--node-rank", "--main_process_ip": "--main-addr",
              "--main_process_port": "--main-port", "-m": "the training verb", "--module": "the training verb"}


@dataclass
class Context:
    """What the rules look at: the resolved recipe, and at launch time the machine and command line."""

    config: dict
    processes: int | None = None  # per machine
    gpus: int | None = None  # GPUs visible on this machine
    node_rank: int = 0
    extra_args: tuple = ()  # passed through to `accelerate launch`

    @property
    def launch(self) -> dict:
        return self.config.get("launch") or {}

    @property
    def backend(self) -> str:
        return self.launch.get("backend", "ddp")


@dataclass
class Finding:
    key: tuple  # recipe key to point at; () for the command line
    message: str
    level: str = "error"  # error | warning | note


@dataclass(frozen=True)
class Rule:
    name: str
    when: str  # the combination, as docs/distributed.md shows it
    does: str  # what llmtune does or asks for
    stage: str  # recipe | launch
    check: Callable[[Context], list[Finding]] | None = field(default=None, compare=False)


def _quant(ctx: Context) -> dict:
    return ctx.config.get("quantization") or {}


def _eight_bit_sharded(ctx: Context) -> list[Finding]:
    if _quant(ctx).get("bits") == 8 and ctx.backend in SHARDED:
        return [Finding(("quantization", "bits"), f"8-bit bitsandbytes weights cannot be sharded by `launch.backend: "
                        f"{ctx.backend}`; use `quantization.bits: 4` (QLoRA shards with a matching `quant_storage`), "
                        "or `launch.backend: ddp` / `zero2`, which keep a whole copy per process")]
    return []


def _four_bit_storage(ctx: Context) -> list[Finding]:
    """Sharding flattens parameters into one dtype, so packed 4-bit weights must be stored in the compute dtype."""
    quant = _quant(ctx)
    if quant.get("bits") != 4 or ctx.backend not in SHARDED:
        return []
    storage, compute = quant.get("quant_storage"), quant.get("compute_dtype")
    if storage is None:
        quant["quant_storage"] = compute  # the resolved recipe (recipe.yaml, --dry-run) shows it
        return []
    if storage != compute:
        return [Finding(("quantization", "quant_storage"), f"`launch.backend: {ctx.backend}` shards 4-bit weights "
                        f"only when they are stored in the compute dtype; set `quantization.quant_storage: {compute}` "
                        f"(or remove it: llmtune then sets it), or change `quantization.compute_dtype`")]
    return []


# DeepSpeed keys that must agree with the trainer's arguments, and the `train:` field each follows.
DEEPSPEED_FOLLOWS = {("train_micro_batch_size_per_gpu",): "per_device_train_batch_size",
                     ("gradient_accumulation_steps",): "gradient_accumulation_steps",
                     ("gradient_clipping",): "max_grad_norm",
                     ("bf16", "enabled"): "bf16", ("fp16", "enabled"): "fp16"}


def read_deepspeed(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _deepspeed_file(ctx: Context) -> list[Finding]:
    path = ctx.launch.get("deepspeed_config")
    if path is None:
        return []
    key = ("launch", "deepspeed_config")
    if ctx.backend not in DEEPSPEED:
        return [Finding(key, f"`launch.backend: {ctx.backend}` does not use DeepSpeed; remove "
                        f"`launch.deepspeed_config`, or set `launch.backend:` to one of {', '.join(DEEPSPEED)}")]
    try:
        settings = read_deepspeed(path)
    except (OSError, ValueError) as err:
        return [Finding(key, f"cannot read the DeepSpeed file {path}: {err}")]
    found = []
    enabled = [p for p in ("bf16", "fp16") if str((settings.get(p) or {}).get("enabled")).lower() == "true"]
    if len(enabled) == 2:
        found.append(Finding(key, f"{path} enables both bf16 and fp16; set one of them, or both to \"auto\" to "
                             "follow `train.bf16` / `train.fp16`"))
    train = ctx.config.get("train") or {}
    for keys, arg in DEEPSPEED_FOLLOWS.items():
        value = settings
        for k in keys:
            value = value.get(k) if isinstance(value, dict) else None
        if value is None or value == "auto" or arg not in train or value == train[arg]:
            continue
        found.append(Finding(key, f"{path} sets `{'.'.join(keys)}: {json.dumps(value)}` but `train.{arg}` is "
                             f"{json.dumps(train[arg])}; DeepSpeed would refuse the run: set it to \"auto\" in the "
                             "file, or make the two agree"))
    return found


def _launch_args(ctx: Context) -> list[Finding]:
    found = []
    for arg in ctx.extra_args:
        name = "--" + arg.split("=", 1)[0].lstrip("-").replace("-", "_") if arg.startswith("--") else arg
        if name in OWNED_ARGS:
            found.append(Finding((), f"`{arg}` after `--`: llmtune sets it; use {OWNED_ARGS[name]} instead"))
        elif name == "--mixed_precision" and ctx.backend in DEEPSPEED:
            found.append(Finding((), f"`{arg}` after `--` with `launch.backend: {ctx.backend}`: accelerate refuses "
                                 "mixed_precision together with a DeepSpeed file; remove it and set `train.bf16: true` "
                                 "(or `train.fp16: true`), which the file's \"auto\" follows"))
    return found


def _packing(ctx: Context) -> list[Finding]:
    train = ctx.config.get("train") or {}
    if ctx.config["data"].get("packing") and train.get("packing_strategy") == "wrapped":
        return [Finding(("train", "packing_strategy"), "`packing_strategy: wrapped` cuts rows at `max_length` and "
                        "lets packed rows attend to each other; `bfd` (TRL's default) keeps rows whole and apart "
                        "with position ids, in sdpa, eager and flash attention alike", "warning")]
    return []


def _processes(ctx: Context) -> list[Finding]:
    if ctx.processes is None:
        return []
    if ctx.processes < 1:
        return [Finding(("launch", "num_processes"), f"`launch.num_processes` must be >= 1 or `auto`; got "
                        f"{ctx.processes}")]
    if ctx.gpus and ctx.processes > ctx.gpus:
        return [Finding(("launch", "num_processes"), f"{ctx.processes} processes asked for, but this machine has "
                        f"{ctx.gpus} GPU(s); use `--num-processes {ctx.gpus}` or `auto` (every visible GPU)")]
    if not ctx.gpus and ctx.processes > 1:
        return [Finding((), f"no GPU on this machine: {ctx.processes} processes run on the CPU (gloo)", "note")]
    return []


def _nodes(ctx: Context) -> list[Finding]:
    nodes = ctx.launch.get("nodes", 1)
    found = []
    if nodes < 1:
        found.append(Finding(("launch", "nodes"), f"`launch.nodes` must be >= 1; got {nodes}"))
    if not 0 <= ctx.node_rank < max(nodes, 1):
        found.append(Finding((), f"--node-rank {ctx.node_rank}: must be from 0 to {nodes - 1} for {nodes} node(s)"))
    if nodes > 1 and not ctx.launch.get("main_addr"):
        found.append(Finding(("launch", "main_addr"), f"{nodes} nodes need the address of node 0: pass "
                             "`--main-addr HOST` (or set `launch.main_addr:`) on every node"))
    return found


def _deepspeed_installed(ctx: Context) -> list[Finding]:
    if ctx.backend in DEEPSPEED and find_spec("deepspeed") is None:
        return [Finding(("launch", "backend"), f"`launch.backend: {ctx.backend}` needs DeepSpeed, which is not "
                        "installed: pip install 'llmtune-recipes[deepspeed]'")]
    return []


def _effective_batch(ctx: Context) -> list[Finding]:
    if ctx.processes is None:
        return []
    per_device, accumulation = batch_settings(ctx.config)
    world = ctx.processes * ctx.launch.get("nodes", 1)
    return [Finding((), f"effective batch: {per_device} per device x {accumulation} accumulation x {world} "
                    f"process(es) = {per_device * accumulation * world} per optimizer step", "note")]


RULES = (
    Rule("8-bit and sharding", "`quantization.bits: 8` with `fsdp`, `zero3` or `zero3-offload`",
         "error: use 4-bit, or a backend that keeps a whole copy per process", "recipe", _eight_bit_sharded),
    Rule("4-bit storage dtype", "`quantization.bits: 4` with `fsdp`, `zero3` or `zero3-offload`",
         "sets `quant_storage` to `compute_dtype`; error when set to something else", "recipe", _four_bit_storage),
    Rule("device_map", "any launch of more than one process",
         "never `device_map: auto` (one model split over GPUs): a quantized model goes whole onto each process's "
         "own device (ddp, zero1/2), and is not placed when fsdp/zero3 shard it; `train.model_init_kwargs` is "
         "refused", "recipe"),
    Rule("DeepSpeed file vs trainer", "`launch.deepspeed_config` values that are not \"auto\"",
         "error when one disagrees with `train:` (batch size, accumulation, clipping, bf16/fp16) or enables both "
         "bf16 and fp16, or the backend is not a zero one", "recipe", _deepspeed_file),
    Rule("mixed_precision vs DeepSpeed", "`--mixed_precision` passed to accelerate with a zero backend; any "
         "accelerate option llmtune sets", "error: precision comes from `train.bf16`/`fp16` through the file's "
         "\"auto\"; use llmtune's own flags", "launch", _launch_args),
    Rule("packing vs attention", "`data.packing` with `train.packing_strategy: wrapped`",
         "warning: packed rows would attend to each other; `bfd` keeps them apart", "launch", _packing),
    Rule("processes vs GPUs", "`num_processes` above the GPUs of the machine",
         "error before launch; with no GPU, N processes run on the CPU (gloo)", "launch", _processes),
    Rule("machines", "`nodes` > 1", "error without `--main-addr`, or with a `--node-rank` out of range", "launch",
         _nodes),
    Rule("DeepSpeed installed", "a zero backend", "error naming the extra to install", "launch",
         _deepspeed_installed),
    Rule("effective batch", "every run", "prints per device x accumulation x processes", "launch", _effective_batch),
)


def batch_settings(config: dict) -> tuple[int, int]:
    """(per-device batch size, gradient accumulation steps): the recipe's, else the TRL config's defaults."""
    train = config.get("train") or {}
    known = fields.dataclass_fields(METHODS[config["method"]].config)
    return tuple(train.get(name, known[name].default)
                 for name in ("per_device_train_batch_size", "gradient_accumulation_steps"))


def findings(ctx: Context, stage: str) -> list[Finding]:
    return [f for rule in RULES if rule.stage == stage and rule.check for f in rule.check(ctx)]


def check_recipe(checker, config: dict) -> None:
    """The recipe-only rules, reported (with FILE:LINE:COL) through recipe/check.py's Checker."""
    if not isinstance(config.get("launch"), dict) or not isinstance(config.get("data"), dict):
        return  # the schema already reported the section
    for f in findings(Context(config), "recipe"):
        checker.error(f.key, f.message)


def markdown() -> str:
    """The rules as the Markdown table in docs/distributed.md."""
    rows = ["| rule | when | llmtune |", "|---|---|---|"]
    rows += [f"| {r.name} | {r.when} | {r.does} |" for r in RULES]
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(markdown(), end="")
