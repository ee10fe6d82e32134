"""What scores responses in the RL methods (ppo, grpo, rloo): reward models and reward functions.

A reward model is the recipe's top-level `reward_model:`: a run directory of `llmtune reward`
(a full model, or an adapter over its base) or any local or Hub model that
`AutoModelForSequenceClassification` loads with one output. Reward functions are
`reward_functions: [module:function]`, the user's own code, imported only when a recipe
names them.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

from ..errors import UserError
from ..model import load_model


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
    """The callables named `module:function`: `/path/to/file.py:function` (the recipe resolves a module beside it
    to its file, recipe/locations.py), or a module importable from `PYTHONPATH`. Each takes TRL's reward-function
    arguments (`prompts`, `completions`, `completion_ids`, **columns) and returns one float per completion."""
    functions = []
    for i, name in enumerate(names):
        module_name, _, attr = name.rpartition(":")
        where = f"reward_functions[{i}] `{name}`"
        try:
            module = _import(module_name)
        except ImportError as err:
            raise UserError(f"{where}: cannot import module '{module_name}' ({err}); it must be a .py file beside "
                            "the recipe, or importable from PYTHONPATH") from None
        function = getattr(module, attr, None)
        if not callable(function):
            raise UserError(f"{where}: module '{module_name}' ({module.__file__}) has no function '{attr}'")
        functions.append(function)
    return functions


def _import(name: str):
    """A module by name, or by its file (imported under its file's stem, its folder on the path for its own imports,
    once per process)."""
    if not name.endswith(".py"):
        return importlib.import_module(name)
    path = Path(name)
    if sys.modules.get(path.stem) is not None and getattr(sys.modules[path.stem], "__file__", None) == name:
        return sys.modules[path.stem]
    if str(path.parent) not in sys.path:
        sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module  # TRL names a function by its module; worker processes import it again
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[path.stem]
        raise
    return module


def online_defaults(config: dict, data) -> dict:
    """GRPO/RLOO: fail before training (exit 2) on a reward function that is not there."""
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
