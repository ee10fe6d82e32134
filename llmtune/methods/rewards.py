"""What scores responses in the RL methods (ppo, grpo, rloo): reward models and reward functions.

A reward model is the recipe's top-level `reward_model:`: a run directory of `llmtune reward`
(a full model, or an adapter over its base) or any local or Hub model that
`AutoModelForSequenceClassification` loads with one output. Reward functions are
`reward_functions: [module:function]`, the user's own code, imported only when a recipe
names them.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

from ..errors import UserError
from ..model import load_model


def check_reward_model(path: str) -> None:
    """A clear error for a reward model path that points nowhere (before any model is loaded).

    `org/name` may be a Hub id, so only paths that cannot be one are checked.
    """
    if Path(path).expanduser().is_dir():
        return
    first = path.split("/")[0]
    if path.startswith((".", "/", "~")) or path.count("/") != 1 or Path(first).is_dir():
        raise UserError(f"reward_model: no model folder at '{path}'; train one with `llmtune reward RECIPE` and "
                        "set `reward_model:` to its run directory (or a Hub sequence-classification model id)")


def load_sequence_classifier(config: dict, name: str, revision: str | None = None, trainable: bool = False):
    """A one-output sequence-classification model, loaded like the recipe's model (dtype, attention,
    quantization; a run directory's adapter folded in). `trainable` without an `adapter:` in the
    recipe leaves every weight trainable (with one, the caller adds it)."""
    model = {**config["model"], "name": name, "revision": revision, "run_adapter": "merge"}
    classifier = load_model({**config, "model": model}, "SequenceClassification")
    return classifier.requires_grad_(trainable and config.get("adapter") is None)


def load_reward_model(path: str, config: dict):
    """(frozen reward model, its tokenizer)."""
    from transformers import AutoTokenizer

    model = load_sequence_classifier(config, path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=config["model"]["trust_remote_code"])
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # The score is read at the last token that is not padding, so the model must know which that is.
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def load_reward_functions(names: list[str]) -> list:
    """The callables named `module:function`; the module is imported from the working
    directory or `PYTHONPATH`. Each takes TRL's reward-function arguments
    (`prompts`, `completions`, `completion_ids`, **columns) and returns one float per completion."""
    if names and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # `llmtune` (unlike `python -m`) does not put it there
    functions = []
    for i, name in enumerate(names):
        module_name, _, attr = name.partition(":")
        where = f"reward_functions[{i}] `{name}`"
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            raise UserError(f"{where}: cannot import module '{module_name}' ({err}); it must be importable from the "
                            "working directory or PYTHONPATH") from None
        function = getattr(module, attr, None)
        if not callable(function):
            raise UserError(f"{where}: module '{module_name}' ({module.__file__}) has no function '{attr}'")
        functions.append(function)
    return functions


def online_defaults(config: dict, data) -> dict:
    """GRPO/RLOO: fail before training (exit 2) on a reward model or function that is not there."""
    if config.get("reward_model"):
        check_reward_model(config["reward_model"])
    load_reward_functions(config["reward_functions"])
    return {}


def online_trainer(trainer_class, *, args, model, tokenizer, data, peft_config, callbacks, recipe):
    """A TRL online-RL trainer (GRPOTrainer, RLOOTrainer) scored by the recipe's reward functions
    and reward model (TRL sums them, weighted by `train.reward_weights`)."""
    rewards = load_reward_functions(recipe["reward_functions"])
    tokenizers = [None] * len(rewards)
    if recipe.get("reward_model"):
        reward_model, reward_tokenizer = load_reward_model(recipe["reward_model"], recipe)
        rewards.append(reward_model)
        tokenizers.append(reward_tokenizer)
    return trainer_class(model=model, reward_funcs=rewards, args=args, train_dataset=data.train,
                         eval_dataset=data.eval, processing_class=tokenizer, reward_processing_classes=tokenizers,
                         callbacks=callbacks, peft_config=peft_config)
