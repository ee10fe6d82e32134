"""Every use of a library's private API, in one place: what it uses, the versions it was checked
against, and when it can go.

Each shim is registered with `@shim(...)`; tests/test_compat.py fails, listing the shims to
re-check, when an installed library is outside the versions they were checked against
(CHECKED). Nothing else in llmtune touches a private name of TRL, transformers, accelerate,
datasets or lm-eval.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .logs import LIBRARIES

# The versions every shim below was checked against, per library (oldest, newest).
CHECKED = {
    "trl": ("1.16.0", "1.16.0"),
    "transformers": ("5.25.0", "5.25.0"),
    "accelerate": ("1.15.0", "1.16.0"),
    "datasets": ("5.2.0", "5.2.0"),
    "lm_eval": ("0.4.13", "0.4.13"),
    "deepspeed": ("0.19.8", "0.19.8"),
    "bitsandbytes": ("0.50.2", "0.50.2"),
}


@dataclass(frozen=True)
class Shim:
    name: str
    library: str  # a key of CHECKED
    uses: str  # the private names it relies on
    remove_when: str


SHIMS: list[Shim] = []


def shim(library: str, uses: str, remove_when: str):
    def register(thing):
        SHIMS.append(Shim(thing.__name__, library, uses, remove_when))
        return thing

    return register


@shim("bitsandbytes", "what bitsandbytes.backends.{cpu,default}.ops do at import: kernels.get_kernel(...), whose Hub "
      "lookup is local-only while huggingface_hub.constants.HF_HUB_OFFLINE is true; torch.compile(fn) as a decorator",
      "bitsandbytes neither asks the Hub for a kernel nor calls torch.compile when it is imported")
def bitsandbytes_import_hook(offline: bool) -> None:
    """Make importing bitsandbytes (PEFT does it, whenever bitsandbytes is installed) offline and light.

    bitsandbytes 0.50 does two costly things as it is imported, for kernels most runs never call: on a CPU with
    AVX512-BF16 it asks the Hub for a kernel (`kernels.get_kernel("kernels-community/...")`: DNS and HTTPS to
    huggingface.co, a stall where DNS hangs), and it wraps its default ops in `torch.compile`, which imports
    TorchInductor (about 1 s and 40 MB on 2 CPU cores). While bitsandbytes is imported, huggingface_hub is told it
    is offline (`offline`: the kernel comes from the local cache or not at all, and bitsandbytes uses its own CPU
    code), and `torch.compile` compiles each wrapped op at its first call instead. A finder on sys.meta_path does it
    when something imports bitsandbytes: nothing is imported early. Checked against bitsandbytes 0.50.2.
    """
    import functools
    import importlib.abc
    import importlib.machinery
    import sys

    def lazily(compile_now):
        def compile_later(fn=None, **options):
            if fn is None:  # @torch.compile(mode=...)
                return lambda f: compile_later(f, **options)
            compiled = []

            @functools.wraps(fn)
            def call(*args, **kwargs):
                if not compiled:
                    compiled.append(compile_now(fn, **options))
                return compiled[0](*args, **kwargs)

            return call

        return compile_later

    class Light(importlib.abc.Loader):
        def __init__(self, loader):
            self.loader = loader

        def create_module(self, spec):
            return self.loader.create_module(spec)

        def exec_module(self, module):
            import torch
            from huggingface_hub import constants

            online, compile_now = constants.HF_HUB_OFFLINE, torch.compile
            constants.HF_HUB_OFFLINE, torch.compile = online or offline, lazily(compile_now)
            try:
                self.loader.exec_module(module)
            finally:
                constants.HF_HUB_OFFLINE, torch.compile = online, compile_now

        def __getattr__(self, name):  # resources and the like: the real loader's
            return getattr(self.loader, name)

    class Finder(importlib.abc.MetaPathFinder):
        llmtune_bitsandbytes = True  # installed once

        def find_spec(self, name, path, target=None):
            if name != "bitsandbytes":
                return None
            spec = importlib.machinery.PathFinder.find_spec(name, path)
            if spec is not None and spec.loader is not None:
                spec.loader = Light(spec.loader)
            return spec

    if "bitsandbytes" not in sys.modules and not any(hasattr(f, "llmtune_bitsandbytes") for f in sys.meta_path):
        sys.meta_path.insert(0, Finder())


@shim("deepspeed", "deepspeed.comm.torch.build_shm_op (looked up as a module global when the backend starts)",
      "DeepSpeed says 'built successfully' through its logger rather than print()")
def quiet_shm_build() -> None:
    """Keep DeepSpeed's CPU shared-memory op build off the terminal.

    On a machine without GPUs each launched process builds (or loads) that op and prints
    `DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully` on stdout: a print(), out of reach
    of its logger. Its output goes to llmtune's library log instead: train.log when open, which it is not yet
    when the backend starts, so today the line is dropped. Checked against deepspeed 0.19.8.
    """
    import contextlib
    import importlib
    import io
    import logging

    comm = importlib.import_module("deepspeed.comm.torch")  # `deepspeed.comm.torch` as an attribute is torch

    build = comm.build_shm_op
    if getattr(build, "llmtune_quiet", False):
        return

    def quiet_build():
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            module = build()
        for line in out.getvalue().splitlines():
            logging.getLogger(LIBRARIES).info(line)
        return module

    quiet_build.llmtune_quiet = True
    comm.build_shm_op = quiet_build


@shim("accelerate", "AcceleratorState.__init__, PartialState._shared_state",
      "accelerate's FSDP branch accepts MULTI_CPU (tests/test_launch.py asserts the FSDP run is FSDP-wrapped)")
def fsdp_on_cpu() -> None:
    """Let accelerate run FSDP on a machine without GPUs (how the tests run FSDP2 for real).

    accelerate 1.15 turns an FSDP launch into FSDP only from a GPU-type distributed state:
    `AcceleratorState.__init__` checks MULTI_GPU/XPU/NPU/..., and MULTI_CPU falls through to
    plain DDP, silently. PyTorch's FSDP2 itself runs on CPU over gloo. So when accelerate's
    launcher asked for FSDP (ACCELERATE_USE_FSDP) and the state came up MULTI_CPU, promote it
    to FSDP. Checked against accelerate 1.15.0; remove once its FSDP branch accepts MULTI_CPU
    (tests/test_launch.py asserts the FSDP run's model really is FSDP-wrapped).
    """
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    if getattr(AcceleratorState.__init__, "llmtune_fsdp_on_cpu", False):
        return
    original = AcceleratorState.__init__

    def init(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    init.llmtune_fsdp_on_cpu = True
    AcceleratorState.__init__ = init


@shim("transformers", "Trainer._save_checkpoint(model, trial), Trainer._get_output_dir(trial)",
      "transformers writes checkpoints atomically itself, or takes a checkpoint folder as an argument")
def stage_checkpoints(trainer, staged_save) -> None:
    """Route `trainer`'s checkpoint saving through `staged_save(save_into, run_dir)`: `save_into(folder)` writes
    transformers' `checkpoint-N` under `folder` instead of the run directory (runner/resume.py renames it in)."""
    save = trainer._save_checkpoint

    def hook(model, trial):
        def save_into(folder: Path) -> None:
            trainer._get_output_dir = lambda trial=None: str(folder)  # where transformers puts checkpoint-N
            try:
                save(model, trial)
            finally:
                del trainer._get_output_dir

        staged_save(save_into, Path(trainer._get_output_dir(trial)))

    trainer._save_checkpoint = hook


@shim("transformers", "PreTrainedModel._supports_flash_attn, AutoModel._model_mapping",
      "transformers has a public way to ask whether a model class supports flash attention")
def supports_flash_attention(config) -> bool:
    import transformers

    try:
        return bool(transformers.AutoModel._model_mapping[type(config)]._supports_flash_attn)
    except KeyError:
        return False


@shim("transformers", "PretrainedConfig._attn_implementation",
      "transformers exposes the attention kernel a loaded model uses under a public name")
def attn_implementation(config) -> str | None:
    """The attention kernel a model (config) was set up with: sdpa, eager, flash_attention_2, ..."""
    return getattr(config, "_attn_implementation", None)


@shim("datasets", "Dataset._fingerprint",
      "datasets exposes a dataset's fingerprint publicly")
def dataset_fingerprint(dataset) -> str | None:
    return getattr(dataset, "_fingerprint", None)


@shim("trl", "SFTTrainer._prepare_dataset, SFTTrainer._tokenizer, built without __init__",
      "TRL offers SFT's tokenize-and-mask step as a function (no trainer, no model)")
def sft_dataset_preparer(tokenizer, chat_template: str | None, completion_only_loss: bool):
    """`prepare(dataset, args, name)`: SFTTrainer's own tokenizing and label masking, without a model."""
    from trl import SFTTrainer

    trainer = SFTTrainer.__new__(SFTTrainer)  # only its dataset preparation is used
    trainer._tokenizer = tokenizer
    trainer.chat_template = chat_template
    trainer.completion_only_loss = completion_only_loss

    def prepare(dataset, args, name: str):
        return trainer._prepare_dataset(dataset, tokenizer, args, packing=False, formatting_func=None,
                                        dataset_name=name)

    return prepare


@shim("trl", "DPOTrainer/KTOTrainer._precompute_ref_logps(dataset, name, batch_size)",
      "TRL caches precomputed reference log-probs itself, or takes them as a dataset column")
class RefLogpsHook:
    """Mix in before DPOTrainer/KTOTrainer: their reference log-prob pass goes through
    `self.ref_logps(dataset, name, compute)`, where `compute()` runs TRL's own pass."""

    def _precompute_ref_logps(self, dataset, name, batch_size):
        return self.ref_logps(dataset, name,
                              lambda: super(RefLogpsHook, self)._precompute_ref_logps(dataset, name, batch_size))


@shim("transformers", "Trainer._set_signature_columns_if_needed, Trainer._signature_columns",
      "Trainer takes the columns to keep as an argument (today only `remove_unused_columns`, all or nothing)")
class KeepColumns:
    """Mix in before a Trainer: the dataset columns in `keep_columns` reach the collator, the rest are dropped."""

    keep_columns: tuple[str, ...] = ()

    def _set_signature_columns_if_needed(self):
        self._signature_columns = list(self.keep_columns)


@shim("lm_eval", "lm_eval.tasks._yaml_loader.load_yaml",
      "lm-eval exports its task-YAML loader (with its !function tags) publicly")
def load_task_yaml(path, **kwargs):
    """lm-eval's own reader of a task file (`!function` tags and `include:` resolved)."""
    from lm_eval.tasks._yaml_loader import load_yaml

    return load_yaml(path, **kwargs)
