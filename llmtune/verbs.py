"""The verb table: one entry per training method, pointing at its runner module.

Kept import-light (no torch/TRL): the CLI builds its verbs from it and `validate` reads
each method's TRL config class from source through `config`.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    name: str
    config: str          # the TRL config class the recipe's `train:` section becomes
    runner: str          # module with `defaults(config, data)` and `build_trainer(...)` (see train.py)
    summary: str
    experimental: bool = False  # TRL ships the trainer under `trl.experimental`, without a stability contract
    head: str = "CausalLM"  # the model class is `AutoModelFor<head>` (reward: SequenceClassification)
    reference: bool = False  # trains against a frozen reference model (`ref_model:`, cached log-probs)
    rewards: bool = False  # scores sampled responses (`reward_model:`, ...); build_trainer gets `recipe`


METHODS = {
    m.name: m
    for m in (
        Method("sft", "trl:SFTConfig", "llmtune.methods.sft",
               "Supervised fine-tuning on chat, instruction, prompt-completion or plain text data."),
        Method("dpo", "trl:DPOConfig", "llmtune.methods.dpo",
               "Direct preference optimization (and IPO, hinge, ... via train.loss_type) on chosen/rejected pairs.",
               reference=True),
        Method("orpo", "trl.experimental.orpo:ORPOConfig", "llmtune.methods.orpo",
               "Odds-ratio preference optimization: SFT and preference in one pass, no reference model.",
               experimental=True),
        Method("kto", "trl:KTOConfig", "llmtune.methods.kto",
               "Kahneman-Tversky optimization on completions labelled good or bad (or on unpaired preference pairs).",
               reference=True),
        Method("reward", "trl:RewardConfig", "llmtune.methods.reward",
               "Train a reward model (a sequence-classification head scoring text) on chosen/rejected pairs.",
               head="SequenceClassification"),
        Method("ppo", "llmtune.methods.ppo_config:PPOConfig", "llmtune.methods.ppo",
               "RLHF with PPO (llmtune's own; TRL has none): policy and value model, reward model, KL to the "
               "reference.", rewards=True),
        Method("grpo", "trl:GRPOConfig", "llmtune.methods.grpo",
               "Group relative policy optimization: scores groups of sampled responses with a reward model or "
               "functions.", rewards=True),
        Method("rloo", "trl:RLOOConfig", "llmtune.methods.rloo",
               "REINFORCE leave-one-out: online RL with a reward model or reward functions.", rewards=True),
    )
}


def shared_defaults(config: dict, data) -> dict:
    """TRL config values every preference method takes from llmtune's own sections."""
    out = {"max_length": config["data"]["max_length"]}
    if data.eval is not None:
        out["eval_strategy"] = "steps"  # TRL's default is never to evaluate
    return out
