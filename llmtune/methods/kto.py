"""KTO: the recipe as `trl.KTOConfig` + `trl.KTOTrainer`.

Data is `prompt`/`completion`/`label` rows, or preference pairs, which KTOTrainer splits into a
desirable (chosen, label true) and an undesirable (rejected, label false) row each. The reference
model is handled as in DPO, with its log-probs cached on disk the same way (llmtune/methods/ref_logps.py).
"""

from . import ref_logps, shared_defaults


def defaults(config: dict, data) -> dict:
    """KTOConfig values llmtune sets unless the recipe's `train:` does."""
    return {**shared_defaults(config, data), **ref_logps.defaults(config["train"])}


def build_trainer(**kwargs):
    from trl import KTOTrainer

    # `loss_type` decides whether the KL log-probs are computed at all.
    return ref_logps.build_trainer(KTOTrainer, ("max_length", "loss_type", "bf16", "fp16"), **kwargs)
