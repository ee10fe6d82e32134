"""PPO: the recipe as llmtune's `PPOConfig` + `PPOTrainer` (TRL 1.16 has no PPO; see ppo_trainer.py).

Four models: the policy being trained (the recipe's model, with its adapter if any), the
reference it is kept close to (the same model with the adapter disabled, or a frozen copy
for full fine-tuning), the frozen reward model (`reward_model:`), and the value model
(`train.value_model`: a copy of the reward model or of the policy's base, trained
alongside the policy, with an adapter of the recipe's kind when there is one).
"""

from __future__ import annotations

import copy
import dataclasses

from ..errors import UserError
from ..tokenizer import load_tokenizer
from .rewards import load_reward_model, load_sequence_classifier


def defaults(config: dict, data) -> dict:
    """PPOConfig values llmtune sets unless the recipe's `train:` does; checks what the
    recipe's `train:` cannot (the stop token and tokenizers fit; the recipe checked the reward model's folder)."""
    train = config["train"]
    tokenizer = None
    stop = train.get("stop_token", "eos")
    if stop not in (None, "eos"):
        tokenizer = load_tokenizer(config["model"])
        if tokenizer.convert_tokens_to_ids(stop) in (None, tokenizer.unk_token_id):
            raise UserError(f"train.stop_token: '{stop}' is not a token of the tokenizer of "
                            f"'{config['model']['name']}'; use `eos`, null, or one of its special tokens")
    if train.get("value_model", "reward_model") == "reward_model":
        from transformers import AutoTokenizer

        tokenizer = tokenizer or load_tokenizer(config["model"])
        try:
            reward_tokenizer = AutoTokenizer.from_pretrained(config["reward_model"],
                                                             trust_remote_code=config["model"]["trust_remote_code"])
        except OSError as err:
            raise UserError(f"reward_model: cannot load a tokenizer from '{config['reward_model']}': {err}") from None
        if reward_tokenizer.get_vocab() != tokenizer.get_vocab():
            raise UserError(f"train.value_model: the reward model '{config['reward_model']}' has another tokenizer "
                            "than the policy, so it cannot start the value model (which reads the policy's tokens); "
                            "set `train.value_model: policy`")
    return {"max_length": config["data"]["max_length"]}


def build_trainer(*, args, model, tokenizer, data, peft_config, callbacks, recipe):
    from .ppo_trainer import PPOTrainer

    reward_model, reward_tokenizer = load_reward_model(recipe["reward_model"], recipe)
    if args.value_model == "reward_model":
        source, revision = recipe["reward_model"], None
    else:
        source, revision = recipe["model"]["name"], recipe["model"].get("revision")
    value_model = load_sequence_classifier(recipe, source, revision, trainable=True)
    quantized = recipe.get("quantization") is not None
    stacked = getattr(model, "peft_config", {}).get("default")  # `model.run_adapter: stack`: the run's adapter
    if peft_config is not None:
        from peft import get_peft_model, prepare_model_for_kbit_training

        if quantized:
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
            value_model = prepare_model_for_kbit_training(value_model, use_gradient_checkpointing=False)
        model = get_peft_model(model, peft_config)
        ref_model = None  # the policy with its adapter disabled: one copy of the base in memory
    else:
        # Full fine-tuning, or a run's adapter stacked (whose reference is the run's model, not its
        # base without the adapter): a frozen copy.
        ref_model = copy.deepcopy(model).eval().requires_grad_(False)
    adapter = peft_config or stacked
    if adapter is not None:  # the value model trains an adapter of the same kind
        from peft import get_peft_model

        value_adapter = dataclasses.replace(adapter, task_type="SEQ_CLS", base_model_name_or_path=None,
                                            inference_mode=False)
        value_model = get_peft_model(value_model.requires_grad_(False), value_adapter)
    if not hasattr(value_model.get_base_model() if adapter is not None else value_model, "score"):
        raise UserError(f"train.value_model: {type(value_model).__name__} from '{source}' has no `score` head; "
                        "use a reward model of a decoder architecture (Llama, Qwen, Mistral, ...)")
    return PPOTrainer(args=args, model=model, ref_model=ref_model, value_model=value_model,
                      reward_model=reward_model, reward_tokenizer=reward_tokenizer, processing_class=tokenizer,
                      train_dataset=data.train, eval_dataset=data.eval, callbacks=callbacks)
