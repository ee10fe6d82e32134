"""What `validate` and every training verb check before a model loads, beyond the recipe itself.

`check`: the model exists (a folder, the builtin, or a Hub id, cached when offline), the adapter fits it
(built on the meta device from its config, no weights, as `llmtune plan` does), flash attention has a GPU,
the reward model exists and the reward functions import, a teacher shares the student's tokenizer, the
`eval:` tasks load, the method's trainer would take the settings (its runner module's `refusals`; its TRL config
class built as the run builds it), and the launch rules for this machine hold.
"""

from __future__ import annotations

import importlib
import logging
import os
import warnings
from pathlib import Path

from ..defaults import auto_config
from ..errors import UserError
from ..files import BUILTIN_PREFIX, adapter_run, not_on_hub
from ..launch.launcher import gpu_count, preflight, settle
from ..memory import model_shape
from ..methods.rewards import load_reward_functions
from ..ranks import launched
from ..recipe.schema import ADAPTERS
from ..tokenizer import load_tokenizer
from . import gate
from .trainer_args import training_args


def check(resolved, node_rank: int = 0, extra_args=()) -> list[str]:
    """Raise UserError on what the run would refuse after loading the model; the launch's notes otherwise."""
    model(resolved)
    gpus = gpu_count()
    return preflight(resolved, settle(resolved.config, node_rank, gpus), gpus, extra_args)


def model(resolved) -> None:
    """The model exists (a folder, the builtin, or a Hub id: cached when offline) and the adapter fits it."""
    resolved.require_paths()
    config = resolved.config
    name = config["model"]["name"]
    where = resolved.locate(("model", "name"))
    if not name.startswith(BUILTIN_PREFIX) and not Path(name).expanduser().is_dir():
        _hub_model(name, config["model"].get("revision"), where)
    if config["model"].get("attn_implementation") == "flash_attention_2":
        import torch

        if not torch.cuda.is_available():
            raise UserError(f"{resolved.locate(('model', 'attn_implementation'))}: `flash_attention_2` runs on a "
                            "CUDA GPU only and none is visible; set `model.attn_implementation: sdpa`")
    _rewards(resolved)
    _teacher(resolved)
    if (config.get("eval") or {}).get("tasks"):
        try:
            gate.tasks(config)
        except UserError as err:
            raise UserError([f"{resolved.locate(('eval',))}: {problem}" for problem in err.problems]) from None
    for key, message in getattr(importlib.import_module(resolved.method.runner), "refusals", lambda c: [])(config):
        raise UserError(f"{resolved.locate(key)}: {message}")
    if not launched():  # a launch's ranks: the command that launched them checked it
        _trainer_settings(resolved)
    adapter = config.get("adapter")
    # Prompt-learning adapters (prefix, prompt, p_tuning) add virtual tokens rather than wrap named modules; a
    # prompt initialised from text needs the real embeddings, which the meta device does not have.
    if adapter is None or adapter_run(config["model"]) or \
            "num_virtual_tokens" in ADAPTERS[adapter.get("type", "lora")].required:
        return
    try:
        with warnings.catch_warnings():  # validate is quiet: the libraries' notes on import are not ours to print
            warnings.simplefilter("ignore")
            logging.disable(logging.WARNING)
            try:
                model_shape(config, resolved.method.head)
            finally:
                logging.disable(logging.NOTSET)
    except (ValueError, TypeError, RuntimeError) as err:  # PEFT: target modules not in the model, bad ranks
        key = ("adapter", "target_modules") if "arget modules" in str(err) else ("adapter",)
        raise UserError(f"{resolved.locate(key)}: the `adapter:` does not fit '{name}': "
                        f"{str(err).splitlines()[0]}") from None


def _trainer_settings(resolved) -> None:
    """The method's TRL config class takes the `train:` settings over llmtune's defaults, as the run builds it: its
    own cross-field checks (`load_best_model_at_end` with unlike save and eval strategies, ...) refuse here, with
    the run's message. The data enters the defaults only by whether an eval set is held out (`eval_strategy`)."""
    from types import SimpleNamespace

    held_out = SimpleNamespace(shape=None, eval=resolved.config["data"].get("eval") or None, warnings=[])
    defaults = importlib.import_module(resolved.method.runner).defaults(resolved.config, held_out)
    environment = dict(os.environ)  # the config class sets ACCELERATE_* variables a launch's ranks must not inherit
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            training_args(resolved, Path(".llmtune-preflight"), defaults)  # creates nothing
    finally:
        os.environ.clear()
        os.environ.update(environment)


# One question to the Hub, answered or given up on within this many seconds (no retries): exists or not.
HUB_TIMEOUT_S = 10


def _hub_model(name: str, revision: str | None, where: str) -> None:
    from huggingface_hub import HfApi, constants, try_to_load_from_cache
    from huggingface_hub.errors import GatedRepoError, HTTPError, RevisionNotFoundError
    from huggingface_hub.utils import HFValidationError

    try:
        cached = try_to_load_from_cache(name, "config.json", revision=revision)
    except HFValidationError:
        raise UserError(f"{where}: model '{name}' is neither a folder nor a Hub model id (`org/name`); give the "
                        "path of a model folder, or a Hub id such as `Qwen/Qwen2.5-0.5B`") from None
    if isinstance(cached, str):
        return
    # huggingface_hub reads HF_HUB_OFFLINE once, when first imported; the variable may have been set since
    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}:
        raise UserError(f"{where}: model '{name}' is not a folder here and not in the local Hub cache, and the Hub "
                        "is offline (HF_HUB_OFFLINE); download it first (`hf download "
                        f"{name}`) with the Hub reachable, or give the path of a model folder")
    try:
        HfApi().model_info(name, revision=revision, timeout=HUB_TIMEOUT_S)
    except RevisionNotFoundError:
        raise UserError(f"{where}: model '{name}' has no revision '{revision}' on the Hub ({constants.ENDPOINT}); "
                        "fix `model.revision`") from None
    except (HTTPError, OSError) as err:  # HfHubHTTPError is both: the Hub's answer; others: no network, a timeout
        if not_on_hub(err):
            raise UserError(f"{where}: '{name}' is not a folder and not a model on the Hub ({constants.ENDPOINT}); "
                            "give the path of a model folder, or a Hub id such as `Qwen/Qwen2.5-0.5B` (a private "
                            "model needs `hf auth login`)") from None
        if not isinstance(err, GatedRepoError):  # a gated model exists: loading it needs access, as anywhere
            raise UserError(f"{where}: model '{name}' is not a folder here and not in the local Hub cache, and the "
                            f"Hub ({constants.ENDPOINT}) did not answer: {str(err).splitlines()[0] or type(err).__name__}; "
                            "download it first, or give the path of a model folder") from None


def _rewards(resolved) -> None:
    """The reward model exists and the reward functions import, as the run will need them."""
    config = resolved.config
    reward_model = config.get("reward_model")
    try:
        if reward_model:
            if not Path(reward_model).is_dir():  # the recipe made a path absolute and checked it: a Hub id
                _hub_model(reward_model, None, "reward_model")
        load_reward_functions(config.get("reward_functions") or [])
    except UserError as err:
        key = ("reward_model",) if err.problems[0].startswith("reward_model") else ("reward_functions",)
        raise UserError(f"{resolved.locate(key)}: {err.problems[0]}") from None


def _teacher(resolved) -> None:
    """The teacher exists and shares the student's tokenizer and logits: distillation compares their next-token
    distributions id by id, so the same id must be the same token in both."""
    config = resolved.config
    name = config.get("teacher_model")
    if not name:
        return
    where = resolved.locate(("teacher_model",))
    if not name.startswith(BUILTIN_PREFIX) and not Path(name).expanduser().is_dir():
        _hub_model(name, None, where)
    teacher = {**config["model"], "name": name, "revision": None, "chat_template": None}
    try:
        ours, theirs = load_tokenizer(config["model"]).get_vocab(), load_tokenizer(teacher).get_vocab()
        widths = auto_config(config["model"]).get_text_config().vocab_size, \
            auto_config(teacher).get_text_config().vocab_size
    except (OSError, ValueError) as err:
        raise UserError(f"{where}: cannot read the teacher '{name}': {str(err).splitlines()[0]}") from None
    except UserError as err:
        raise UserError(f"{where}: the teacher: {err.problems[0]}") from None
    why = None
    if ours != theirs:
        differ = sorted(set(ours.items()) ^ set(theirs.items()), key=lambda item: item[1])[0]
        token, token_id = differ
        why = (f"their vocabularies differ ({len(ours)} tokens in the student's, {len(theirs)} in the teacher's; "
               f"e.g. {token!r} is id {ours.get(token)} in the student's and {theirs.get(token)} in the teacher's)")
    elif widths[0] != widths[1]:
        why = f"the student predicts {widths[0]} token ids, the teacher {widths[1]}"
    if why:
        raise UserError(f"{where}: the teacher '{name}' does not share the student's tokenizer: {why}; distillation "
                        "compares their next-token distributions id by id, so pick a teacher of the student's "
                        "model family (same tokenizer), or write the teacher's answers as data instead "
                        "(`llmtune generate TEACHER --data prompts.jsonl --out answers.jsonl`, then `llmtune sft`)")
