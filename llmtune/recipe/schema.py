"""The recipe schema: llmtune's own sections, declared once with their help text.

`train:` is not declared here: it is checked against the fields of the method's TRL
config class (read from TRL's source, see fields.py), and `adapter:` against PEFT's
`LoraConfig` the same way, so neither can drift from the libraries.
"""

from __future__ import annotations

import difflib
import typing
from dataclasses import MISSING, dataclass, field, fields
from typing import Literal, Union

from ..verbs import METHODS

# The verb table is the one list of methods; the schema takes its names from there.
MethodName = Literal[tuple(METHODS)]


def opt(default=MISSING, help: str = "", factory=MISSING):
    """A schema field with its help text, the one place that text is written."""
    if factory is not MISSING:
        return field(default_factory=factory, metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class ModelSection:
    name: str = opt(help="Hub id (`Qwen/Qwen2.5-0.5B`), a local model folder or run directory (relative to the "
                    "recipe), or `builtin:tiny`.")
    revision: Union[str, None] = opt(None, help="Hub revision (branch, tag or commit) of the model.")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = opt(
        "auto", help="Weights dtype; `auto` = the checkpoint's own (float32 for builtin:tiny).")
    attn_implementation: Union[Literal["eager", "sdpa", "flash_attention_2", "flash_attention_3",
                                       "flex_attention"], None] = opt(
        None, help="Attention kernel; null = picked for the machine: flash_attention_2 (flash_attention_3 on "
        "Hopper with FA3) when there is a CUDA GPU, flash-attn is installed and the weights are bfloat16/float16, "
        "else transformers' default (sdpa for most models). `llmtune plan` shows the pick and why.")
    chat_template: Union[str, None] = opt(
        None, help="null = the tokenizer's own; a `.jinja` file (relative to the recipe), or a template TRL ships, by "
        "name "
        "(llama3, qwen2_5, phi3, gemma, ...).")
    trust_remote_code: bool = opt(False, help="Run Python code shipped with a Hub model. Off unless you set it.")
    run_adapter: Literal["stack", "merge"] = opt(
        "stack", help="When `name` is a run directory holding an adapter (e.g. `runs/sft-x`): `stack` keeps "
        "training that adapter on its base (no `adapter:` section; DPO/KTO's reference is its frozen copy), "
        "`merge` folds it into the base and fully fine-tunes the result (no `adapter:`, no `quantization:`).")


@dataclass
class QuantizationSection:
    bits: Literal[4, 8] = opt(help="Load the base model in 4-bit (QLoRA) or 8-bit with bitsandbytes.")
    quant_type: Literal["nf4", "fp4"] = opt("nf4", help="4-bit data type; nf4 suits normally distributed weights.")
    double_quant: bool = opt(True, help="Also quantize the 4-bit scales (saves ~0.4 bit per weight).")
    compute_dtype: Literal["bfloat16", "float16", "float32"] = opt(
        "bfloat16", help="dtype the 4-bit matmuls run in.")
    quant_storage: Union[Literal["bfloat16", "float16", "float32", "uint8"], None] = opt(
        None, help="Storage dtype of packed 4-bit weights; FSDP/ZeRO-3 need it equal to compute_dtype.")


@dataclass(frozen=True)
class AdapterType:
    """An `adapter.type`: the PEFT config class the rest of the section is passed to."""

    config: str  # "peft:LoraConfig": the section's other keys are this class's fields
    sets: dict = field(default_factory=dict)  # fields the type itself fixes (dora = LoRA with use_dora)
    defaults: dict = field(default_factory=dict)  # llmtune's defaults where PEFT has none that fits
    required: tuple = ()  # fields PEFT leaves unset and cannot build the adapter without
    mergeable: bool = True  # `llmtune merge` can fold it into the base weights
    # Its trained vectors go in as the attention cache (past_key_values), which transformers' gradient
    # checkpointing drops: the attention mask, widened for them, then no longer matches the keys.
    in_cache: bool = False


_LORA_DEFAULTS = {"target_modules": "all-linear"}
_VIRTUAL_TOKENS = ("num_virtual_tokens",)
# The one table of adapter types; the checks, `peft_config`, `merge` and the JSON schema read it.
ADAPTERS = {
    "lora": AdapterType("peft:LoraConfig", defaults=_LORA_DEFAULTS),
    "dora": AdapterType("peft:LoraConfig", {"use_dora": True}, _LORA_DEFAULTS),
    "rslora": AdapterType("peft:LoraConfig", {"use_rslora": True}, _LORA_DEFAULTS),
    "ia3": AdapterType("peft:IA3Config"),
    # Prompt learning: trained virtual tokens in front of the input, nothing to fold into weights.
    "prefix": AdapterType("peft:PrefixTuningConfig", required=_VIRTUAL_TOKENS, mergeable=False, in_cache=True),
    "prompt": AdapterType("peft:PromptTuningConfig", required=_VIRTUAL_TOKENS, mergeable=False),
    "p_tuning": AdapterType("peft:PromptEncoderConfig", required=_VIRTUAL_TOKENS, mergeable=False),
}
ADAPTER_TYPES = tuple(ADAPTERS)
# Short names DESIGN.md uses for PEFT's `LoraConfig` fields (where the type's class has them).
ADAPTER_ALIASES = {"alpha": "lora_alpha", "dropout": "lora_dropout"}
# PEFT config fields llmtune sets itself (from `type:` or the model); users set `type:` instead.
ADAPTER_OWNED = {"task_type": "set by the method", "peft_type": "set by `type:`", "use_dora": "use `type: dora`",
                 "use_rslora": "use `type: rslora`", "base_model_name_or_path": "set from `model.name`",
                 "revision": "set from `model.revision`", "inference_mode": "set by llmtune",
                 "auto_mapping": "set by PEFT", "peft_version": "set by PEFT",
                 "tokenizer_name_or_path": "set from `model.name`"}


@dataclass
class AdapterSection:
    """llmtune's own `adapter:` keys; every other key is a field of the type's PEFT config class."""

    type: Literal[ADAPTER_TYPES] = opt(
        "lora", help="`lora`, `dora`, `rslora` (peft.LoraConfig), `ia3` (IA3Config), `prefix` (PrefixTuningConfig), "
        "`prompt` (PromptTuningConfig) or `p_tuning` (PromptEncoderConfig); the other keys are that class's fields. "
        "prefix/prompt/p_tuning need `num_virtual_tokens` and cannot be merged into the base.")
    loraplus_lr_ratio: Union[float, None] = opt(
        None, help="LoRA+ (lora, dora, rslora): the B matrices learn this many times faster than "
        "`train.learning_rate` (the LoRA+ paper suggests 16); null = plain LoRA.")


@dataclass
class SourceSection:
    path: str = opt(help="A .jsonl/.json/.csv/.parquet file, a folder or a glob (relative to the recipe), or a Hub "
                    "dataset id (`owner/name`).")
    format: Literal["auto", "messages", "sharegpt", "alpaca", "prompt_completion", "text", "preference", "kto",
                    "prompt"] = opt("auto", help="Row format; `auto` detects it from the columns.")
    columns: dict[str, str] = opt(factory=dict, help="Rename map applied first, "
                                  "`{old: new}`, e.g. `{question: instruction, answer: output}`.")
    weight: float = opt(1.0, help="Multiplies this source's rows when mixing: 0.5 = a random half, 2 = twice.")
    split: str = opt("train", help="Hub dataset split.")
    name: Union[str, None] = opt(None, help="Hub dataset configuration name.")
    revision: Union[str, None] = opt(None, help="Hub dataset revision (branch, tag or commit).")


# Responses `curate.drop_empty` treats as empty (compared lower-case, surrounding whitespace ignored).
PLACEHOLDERS = ["n/a", "na", "none", "null", "nan", "-", "...", "todo", "tbd", "<noinput>", "no response"]


@dataclass
class CurateSection:
    dedup: bool = opt(False, help="Drop rows identical to an earlier row (train sources together, eval sources "
                      "together).")
    near_dedup: Union[float, None] = opt(
        None, help="Drop rows whose word 3-gram Jaccard similarity to an earlier row is at least this, e.g. 0.8 "
        "(MinHash with LSH); null = off.")
    drop_empty: bool = opt(False, help="Drop rows with an empty or placeholder response (any assistant turn, "
                           "completion, chosen or rejected; the text of `text` rows).")
    placeholders: list[str] = opt(factory=lambda: list(PLACEHOLDERS),
                                  help="Responses `drop_empty` counts as empty, compared lower-case.")
    min_tokens: Union[int, None] = opt(
        None, help="Drop rows shorter than this many tokens, counted with the model's tokenizer and chat template "
        "as training renders them (preference rows: the longer of chosen and rejected).")
    max_tokens: Union[int, None] = opt(
        None, help="Drop rows longer than this many tokens (counted as for `min_tokens`) instead of letting "
        "`max_length` truncate them.")
    contamination: Literal["off", "report", "remove"] = opt(
        "off", help="Train rows sharing a `contamination_ngram`-word n-gram with an eval row: counted and listed "
        "(`report`), or also dropped (`remove`). Needs `data.eval`.")
    contamination_ngram: int = opt(13, help="Words per n-gram of the contamination check (13, as GPT-3's; lower "
                                   "finds more overlap).")


@dataclass
class DataSection:
    train: list[SourceSection] = opt(help="Training sources; several are mixed by `weight`.")
    eval: Union[float, list[SourceSection], None] = opt(
        None, help="A fraction of `train` held out (e.g. 0.05), or a list of sources like `train`.")
    max_length: Union[int, None] = opt(2048, help="Token length rows are truncated to (or packed into).")
    packing: Union[bool, None] = opt(
        None, help="Pack several rows into each sequence of `max_length` tokens, padding-free (position ids keep "
        "packed rows apart). null = on for SFT with flash attention (set, or picked on a GPU by "
        "`model.attn_implementation: null`), whose varlen kernels make it pay; off otherwise (sdpa/eager would "
        "attend over the whole packed batch).")
    curate: Union[CurateSection, None] = opt(
        None, help="Clean the data before training: duplicates, near duplicates, empty responses, token "
        "lengths, train/eval contamination; the counts go to the manifest and `llmtune data inspect`.")
    streaming: bool = opt(
        False, help="Read the train sources while training, for data larger than memory (sft): only the first "
        "1000 rows of each are checked before the run, later rows as they stream; several sources are "
        "interleaved at random, `weight` giving each one's share of rows. Needs `train.max_steps` and `eval:` as "
        "sources or null; no `curate:`; .json arrays are read whole (stream .jsonl, .csv, .parquet or the Hub).")


# The launch backends, each a config under recipes/launch/ (llmtune/launch reads them).
BACKENDS = ("ddp", "fsdp", "zero1", "zero2", "zero3", "zero3-offload")


@dataclass
class LaunchSection:
    num_processes: Union[Literal["auto"], int] = opt(
        "auto", help="Processes per machine: `auto` = every visible GPU (1 on a host without one); on a host "
        "without GPUs, N runs N CPU processes (gloo).")
    backend: Literal[BACKENDS] = opt(
        "ddp", help="`ddp` (a copy per GPU), `fsdp` (FSDP2), `zero1`/`zero2`/`zero3` (DeepSpeed ZeRO), "
        "`zero3-offload` (ZeRO-3, optimizer and parameters in CPU memory).")
    nodes: int = opt(1, help="Machines; start llmtune on each with `--node-rank R` (recipes/launch/slurm.sh).")
    main_addr: Union[str, None] = opt(None, help="Address of the machine with node rank 0 (nodes > 1).")
    main_port: Union[int, None] = opt(None, help="Its rendezvous port; null = 29500 across machines, a free "
                                      "port on one machine.")
    deepspeed_config: Union[str, None] = opt(
        None, help="A DeepSpeed JSON of your own instead of recipes/launch/<backend>.json (zero backends; "
        "relative to the recipe). Keep \"auto\" where it should follow `train:`.")


@dataclass
class EarlyStoppingSection:
    patience: int = opt(help="Stop after this many evaluations in a row without an improvement of `metric`.")
    threshold: float = opt(0.0, help="How much `metric` must improve to count as an improvement.")
    metric: str = opt("eval_loss", help="The eval metric watched, as the trainer logs it (`eval_loss`, "
                      "`eval_rewards/accuracies`, ...); lower is better for names ending in `loss`, higher otherwise "
                      "(`train.greater_is_better` overrides).")


@dataclass
class HubSection:
    repo_id: str = opt(help="Hub model repository the finished run is uploaded to, `namespace/name` (your user or an "
                       "organization); created if missing.")
    private: bool = opt(True, help="Create the repository private, and refuse to upload into an existing public one: "
                        "a fine-tune of private data should not become public by accident. `false` = public.")
    revision: Union[str, None] = opt(None, help="Branch to upload to (created from `main` if missing); null = `main`.")
    include_checkpoints: bool = opt(False, help="Also upload the `checkpoint-N/` folders (with optimizer states: "
                                    "large). Off: only the final model, tokenizer, card and run record.")
    include: list[str] = opt(factory=list, help="More files to upload, as glob patterns relative to the run "
                             "directory, e.g. `[\"*.gguf\"]` after `llmtune export`.")


@dataclass
class EvalSection:
    tasks: list[str] = opt(factory=list, help="lm-evaluation-harness tasks scored on the starting model before training and on the "
                           "result after: task names (`hellaswag`), task YAML files or folders (relative to the "
                           "recipe), or a shipped task (`eval/chat-mc`), as `llmtune eval --tasks` takes them.")
    metric: Union[str, None] = opt(None, help="The metric each task is judged by (`acc`, `exact_match`, ...); null = "
                                   "the first one the task reports. Every metric is recorded.")
    tolerance: Union[float, None] = opt(
        None, help="Flag the run (catastrophic forgetting) when a task's metric gets worse than before training by "
        "more than this, in the metric's own units (0.02 = two points of accuracy); null = no such check.")
    targets: dict[str, float] = opt(factory=dict, help="Flag the run when a task ends worse than its target, "
                                    "`{task: value}` (task names as lm-eval reports them, e.g. `llmtune_chat_mc`).")
    every_n_steps: Union[int, None] = opt(None, help="Also score the tasks every this many optimizer steps (recorded "
                                          "with the step); null = before and after training only.")
    keep_best: Union[str, None] = opt(
        None, help="End the run on the checkpoint that scored best on this task's metric, `TASK/METRIC` (e.g. "
        "`llmtune_chat_mc/acc`): the tasks are scored at every evaluation of the eval set (`train.eval_steps`), a "
        "checkpoint is saved at each, and the best is loaded at the end (transformers' `load_best_model_at_end`; "
        "higher is better unless `train.greater_is_better: false`). Needs `data.eval`; null = the last step's model.")
    judge: Union[str, None] = opt(
        None, help="A `llmtune judge` recipe (relative to this one) run on the finished run, its candidate `run` "
        "standing for it: `candidates: [run, BASE_MODEL]` (pairwise, against the base) or `[run]` (`mode: "
        "single`). Results go to RUN_DIR/eval/judge-NAME.json, the manifest (`judgements`) and the card.")
    limit: Union[float, None] = opt(None, help="Rows per task (a fraction below 1: that share); null = all.")
    num_fewshot: Union[int, None] = opt(None, help="Solved examples before each question; null = the task's own.")
    chat_template: Union[bool, None] = opt(
        None, help="Wrap prompts in the chat template; null = when the training data is conversational and the "
        "tokenizer has a template (as `llmtune eval` decides).")


@dataclass
class RecipeSection:
    method: MethodName = opt(help="Training method; the verb (`llmtune sft`) must match it.")
    model: ModelSection = opt(help="The base model.")
    data: DataSection = opt(help="Training and evaluation data.")
    name: str = opt(help="Run name, usable as `${name}`; defaults to the recipe file's name.")
    quantization: Union[QuantizationSection, None] = opt(None, help="bitsandbytes quantization; omitted = none.")
    adapter: Union[dict, None] = opt(
        None, help=f"PEFT adapter: `type:` ({', '.join(ADAPTER_TYPES)}) plus any field of that type's PEFT config "
        "class (for LoRA: `r`, `alpha`, `dropout`, `target_modules`, `init_lora_weights`, `modules_to_save`, ...); "
        "omitted = full fine-tuning.")
    train: dict = opt(factory=dict,
                      help="Passed to the method's TRL config class (SFTConfig, ...), any of its fields.")
    early_stopping: Union[EarlyStoppingSection, None] = opt(
        None, help="Stop when the eval metric stops improving, and load the best checkpoint at the end "
        "(transformers' EarlyStoppingCallback). Needs `data.eval`; sets `load_best_model_at_end`, "
        "`metric_for_best_model` and a save schedule matching the evaluations unless `train:` sets them.")
    ref_model: Union[str, None] = opt(
        None, help="dpo, kto: the frozen reference model (Hub id, or a folder or run directory relative to the "
        "recipe); null = the starting "
        "model (with an adapter: the base with the adapter switched off).")
    teacher_model: Union[str, None] = opt(
        None, help="distill: the teacher whose token distributions the student learns (Hub id, folder or run "
        "directory, whose adapter is then merged into its base); it must share the student's tokenizer.")
    reward_model: Union[str, None] = opt(
        None, help="ppo, grpo, rloo: the model that scores responses, a run directory of `llmtune reward` (e.g. "
        "`runs/my-reward`, relative to the recipe) or a local or Hub sequence-classification model with one output.")
    reward_functions: list[str] = opt(
        factory=list, help="grpo, rloo: Python reward functions as `module:function` (`module.py` beside the recipe, "
        "else importable from PYTHONPATH) or `path/to/file.py:function` (relative to the recipe), each called as TRL "
        "calls them: `f(prompts, completions, **columns) -> list[float]`.")
    launch: LaunchSection = opt(factory=lambda: {f.name: f.default for f in fields(LaunchSection)}, help="How many processes run the recipe, and how they "
                                "share the model (`llmtune launch`).")
    hub: Union[HubSection, None] = opt(
        None, help="Upload the finished run to the Hugging Face Hub (needs a token: `HF_TOKEN` or `hf auth login`; "
        "without one the upload is skipped and `llmtune push` does it later); omitted = nothing is uploaded.")
    eval: Union[EvalSection, None] = opt(
        None, help="lm-evaluation-harness tasks scored before and after training (and every N steps if asked); the "
        "change per task, and a verdict when a task drops by more than `tolerance` or misses its target, go to the "
        "manifest, the card, the summary and `llmtune compare`.")
    output_dir: str = opt("runs/${name}", help="Run directory, relative to the recipe (`--output-dir` and `--set`: to "
                          "the working directory).")
    seed: int = opt(42, help="Seed for data mixing, splits and training.")


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of: " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is Union:
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return "a list"
    if origin is dict or tp is dict:
        return "a mapping"
    if isinstance(tp, type) and hasattr(tp, "__dataclass_fields__"):
        return "a mapping"
    return {type(None): "null", str: "a string", int: "an integer", float: "a number", bool: "true/false"}.get(
        tp, str(tp))


def did_you_mean(key: str, choices) -> str:
    close = difflib.get_close_matches(key, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


class Checker:
    """Validates plain recipe data against a schema class, collecting every problem."""

    def __init__(self, locate):
        self.locate = locate
        self.problems: list[str] = []

    def error(self, path: tuple, message: str) -> None:
        self.problems.append(f"{self.locate(path)}: {message}")

    def section(self, cls, value, path: tuple):
        """Return `value` with defaults filled in, or None after reporting problems."""
        if not isinstance(value, dict):
            self.error(path, f"`{_dotted(path)}` must be a mapping of keys, got {_kind(value)}")
            return None
        hints = typing.get_type_hints(cls)
        known = {f.name: f for f in fields(cls)}
        out = {}
        for key, item in value.items():
            if key not in known:
                where = f" in {_dotted(path)}" if path else ""
                self.error(path + (key,), f"unknown key '{key}'{where}{did_you_mean(key, known)}")
                continue
            out[key] = self.value(hints[key], item, path + (key,))
        for name, f in known.items():
            if name in out:
                continue
            if f.default is not MISSING:
                out[name] = f.default
            elif f.default_factory is not MISSING:
                out[name] = f.default_factory()
            else:
                self.error(path, f"missing required key `{_dotted(path + (name,))}`: {f.metadata.get('help', '')}")
        return out

    def value(self, tp, value, path: tuple):
        origin = typing.get_origin(tp)
        if origin is Union:
            options = typing.get_args(tp)
            if value is None and type(None) in options:
                return None
            for option in options:  # the first option the value fits, checked quietly
                probe = Checker(self.locate)
                result = probe.value(option, value, path)
                if not probe.problems:
                    return result
            dataclass_options = [o for o in options if hasattr(o, "__dataclass_fields__") or
                                 typing.get_origin(o) is list]
            if len(dataclass_options) == 1 and isinstance(value, (dict, list)):
                return self.value(dataclass_options[0], value, path)  # report its own detailed problems
            self.error(path, f"`{_dotted(path)}` must be {_type_name(tp)}, got {_kind(value)}")
            return None
        if origin is Literal:
            allowed = typing.get_args(tp)
            if value in allowed and type(value) is type(allowed[allowed.index(value)]):
                return value
            self.error(path, f"`{_dotted(path)}` must be {_type_name(tp)}; got {value!r}"
                       f"{did_you_mean(str(value), [str(a) for a in allowed])}")
            return None
        if hasattr(tp, "__dataclass_fields__"):
            return self.section(tp, value, path)
        if origin is list:
            if not isinstance(value, list):
                self.error(path, f"`{_dotted(path)}` must be a list, got {_kind(value)}")
                return None
            (item_tp,) = typing.get_args(tp)
            return [self.value(item_tp, v, path + (i,)) for i, v in enumerate(value)]
        if origin is dict or tp is dict:
            if not isinstance(value, dict):
                self.error(path, f"`{_dotted(path)}` must be a mapping, got {_kind(value)}")
                return None
            args = typing.get_args(tp)
            if args:
                for k, v in value.items():
                    if not isinstance(v, args[1]):
                        self.error(path + (k,), f"`{_dotted(path + (k,))}` must be {_type_name(args[1])}, "
                                   f"got {_kind(v)}")
            return dict(value)
        if tp is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
            return value
        self.error(path, f"`{_dotted(path)}` must be {_type_name(tp)}, got {_kind(value)}")
        return None


def _dotted(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def _kind(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, (dict, list)):
        return {dict: "a mapping", list: "a list"}[type(value)]
    return f"{type(value).__name__} {value!r}"


def mergeable(adapter_type: str) -> bool:
    """Whether an adapter can be folded into its base weights (`llmtune merge`); prompt learning cannot.

    `adapter_type` is the recipe's `adapter.type` (`lora`, `prefix`, ...) or PEFT's `peft_type` from a run's
    adapter_config.json (`LORA`, `PREFIX_TUNING`, ...).
    """
    if adapter_type in ADAPTERS:
        return ADAPTERS[adapter_type].mergeable
    from peft import PromptLearningConfig
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    cls = PEFT_TYPE_TO_CONFIG_MAPPING[adapter_type]
    kinds = [kind for kind in ADAPTERS.values() if kind.config.split(":")[1] == cls.__name__]
    return kinds[0].mergeable if kinds else not issubclass(cls, PromptLearningConfig)
