"""Reward model: the recipe as `trl.RewardConfig` + `trl.RewardTrainer`.

The model is loaded as `AutoModelForSequenceClassification` with one label (the verb table's
`head`), so it outputs one score per sequence; it is trained to score `chosen` above `rejected`,
by at least `score_chosen - score_rejected` where the data has scores. With an adapter, PEFT
trains and saves the new score head along with it.
"""

from . import shared_defaults


def defaults(config: dict, data) -> dict:
    """RewardConfig values llmtune sets unless the recipe's `train:` does."""
    return shared_defaults(config, data)


def build_trainer(*, args, model, tokenizer, data, peft_config, callbacks):
    from trl import RewardTrainer

    return RewardTrainer(model=model, args=args, train_dataset=data.train, eval_dataset=data.eval,
                         processing_class=tokenizer, peft_config=peft_config, callbacks=callbacks)
