"""ORPO: the recipe as `trl.experimental.orpo.ORPOConfig` + `ORPOTrainer`.

ORPO adds an odds-ratio preference term to the SFT loss, so it needs no reference model and
usually starts from a base model. TRL ships it under `trl.experimental` without a stability
contract: the verb table marks it experimental, and llmtune shows that in `--help`, the run log
and the manifest.
"""

from . import shared_defaults, trl_datasets


def defaults(config: dict, data) -> dict:
    """ORPOConfig values llmtune sets unless the recipe's `train:` does."""
    return shared_defaults(config, data)


def build_trainer(*, args, model, tokenizer, data, peft_config, callbacks):
    from trl.experimental.orpo import ORPOTrainer

    train, evals = trl_datasets(data, tokenizer)
    return ORPOTrainer(model=model, args=args, train_dataset=train, eval_dataset=evals,
                       processing_class=tokenizer, peft_config=peft_config, callbacks=callbacks)
