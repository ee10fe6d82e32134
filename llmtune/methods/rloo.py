"""RLOO: the recipe as `trl.RLOOConfig` + `trl.RLOOTrainer`, scored by `reward_model:` and/or
`reward_functions:` (see rewards.py)."""

from .rewards import online_defaults as defaults  # noqa: F401 - the method interface
from .rewards import online_trainer


def build_trainer(**inputs):
    from trl import RLOOTrainer

    return online_trainer(RLOOTrainer, **inputs)
