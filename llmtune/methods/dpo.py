"""DPO: the recipe as `trl.DPOConfig` + `trl.DPOTrainer` (loss variants via `train.loss_type`).

The reference model: with an adapter, the base with the adapter switched off (no second copy);
in full fine-tuning, the starting model, or `ref_model:` when the recipe names one. Reference
log-probs are precomputed before training and cached on disk (see llmtune/methods/ref_logps.py).
"""

from . import ref_logps, shared_defaults


def defaults(config: dict, data) -> dict:
    """DPOConfig values llmtune sets unless the recipe's `train:` does."""
    return {**shared_defaults(config, data), **ref_logps.defaults(config["train"])}


def build_trainer(**kwargs):
    from trl import DPOTrainer

    return ref_logps.build_trainer(DPOTrainer, ("max_length", "truncation_mode", "ld_alpha", "bf16", "fp16"),
                                   **kwargs)
