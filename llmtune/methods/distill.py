"""Distillation: the recipe as `trl.experimental.gkd.GKDConfig` + `GKDTrainer` (generalized knowledge distillation).

The student (the recipe's `model:`) learns the frozen teacher's (`teacher_model:`) next-token distribution on
each conversation: `train.beta` 0 is forward KL, 1 reverse KL, between them the generalized JSD; `train.lmbda` is
the share of batches the student answers itself (on-policy), `train.seq_kd` has the teacher answer instead.
Teacher and student share a tokenizer (runner/preflight.py checks it before the run). TRL ships GKD under
`trl.experimental`: the verb table marks it experimental, as ORPO.
"""

from . import shared_defaults


def defaults(config: dict, data) -> dict:
    """GKDConfig values llmtune sets unless the recipe's `train:` does."""
    return shared_defaults(config, data)


def build_trainer(*, args, model, tokenizer, data, peft_config, callbacks, teacher_model):
    from trl.experimental.gkd import GKDTrainer

    return GKDTrainer(model=model, teacher_model=teacher_model, args=args, train_dataset=data.train,
                      eval_dataset=data.eval, processing_class=tokenizer, peft_config=peft_config,
                      callbacks=callbacks)
