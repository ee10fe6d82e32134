"""PPOConfig: the `train:` section of `method: ppo`.

TRL 1.16 has no PPO (TRL PR #7020 removed it), so this dataclass is llmtune's own. Like
TRL's configs it subclasses `transformers.TrainingArguments`, so optimizer, schedule,
logging, saving, `report_to` and seed work as in every other method, and `llmtune validate`
reads its fields (and their help) from this file's source like TRL's (recipe/fields.py).

Batches: each step generates one response for each of `per_device_train_batch_size` prompts
per process (the rollout batch), then runs `num_ppo_epochs` passes over it in
`num_mini_batches` mini-batches, one optimizer step each; a mini-batch is processed in
`gradient_accumulation_steps` micro-batches. `max_steps`, `logging_steps`, `save_steps` and
the learning-rate schedule count rollout batches.
"""

from dataclasses import dataclass, field
from typing import Literal

from transformers import TrainingArguments


@dataclass
class PPOConfig(TrainingArguments):
    # -- rollouts ---------------------------------------------------------------------------
    response_length: int = field(default=128, metadata={
        "help": "Most tokens generated per response; longer responses are cut here."})
    temperature: float = field(default=0.7, metadata={
        "help": "Sampling temperature for the responses (and for the log-probs PPO computes from them)."})
    stop_token: str | None = field(default="eos", metadata={
        "help": "Token that ends a response: `eos` = the tokenizer's and the model's end-of-sequence tokens, "
        "another string = that token, null = none (every response runs to `response_length`). The stop "
        "token is part of the response, so the model learns when to stop."})
    missing_eos_penalty: float | None = field(default=None, metadata={
        "help": "Subtracted from the score of a response that reached `response_length` without a stop "
        "token; e.g. 1.0 discourages rambling. null = no penalty."})
    max_length: int | None = field(default=512, metadata={
        "help": "Prompts longer than this many tokens keep their last tokens (set by `data.max_length`)."})
    # -- KL penalty to the reference ----------------------------------------------------------
    kl_coef: float = field(default=0.05, metadata={
        "help": "Coefficient of the per-token KL penalty to the reference model (the start value when "
        "`kl_target` is set). Higher: responses stay closer to the reference."})
    kl_target: float | None = field(default=None, metadata={
        "help": "Adaptive KL (Ziegler et al. 2019): the coefficient moves so the KL per response tracks this "
        "value, e.g. 6.0. null = fixed `kl_coef`."})
    kl_horizon: int = field(default=10000, metadata={
        "help": "Adaptive KL: responses over which the coefficient can change by about 20%. Lower: faster."})
    kl_estimator: Literal["k1", "k3"] = field(default="k1", metadata={
        "help": "Per-token KL estimate: `k1` = log(p/q); `k3` = (q/p - 1) - log(q/p), never negative, lower variance."})
    # -- advantages and losses ----------------------------------------------------------------
    gamma: float = field(default=1.0, metadata={"help": "Discount factor of the per-token rewards."})
    lam: float = field(default=0.95, metadata={
        "help": "GAE lambda: 1 = Monte-Carlo returns (more variance), 0 = one-step TD (more bias)."})
    whiten_rewards: bool = field(default=False, metadata={
        "help": "Scale each batch's per-token rewards to unit variance before GAE (keeps their mean)."})
    whiten_advantages: bool = field(default=True, metadata={
        "help": "Normalise each batch's advantages to zero mean and unit variance."})
    cliprange: float = field(default=0.2, metadata={
        "help": "PPO clip range of the policy's probability ratio: updates move each token's probability "
        "by at most this factor per batch."})
    cliprange_value: float = field(default=0.2, metadata={
        "help": "Clip range of the value model's estimates around those at rollout time."})
    vf_coef: float = field(default=0.1, metadata={"help": "Weight of the value loss in the total loss."})
    num_ppo_epochs: int = field(default=4, metadata={
        "help": "Optimisation passes over each rollout batch. More: more learning per sample, more drift."})
    num_mini_batches: int = field(default=1, metadata={
        "help": "Mini-batches (optimizer steps) per pass over a rollout batch; must divide "
        "`per_device_train_batch_size`."})
    # -- models -------------------------------------------------------------------------------
    value_model: Literal["reward_model", "policy"] = field(default="reward_model", metadata={
        "help": "What the value model starts from: `reward_model` (a copy of the reward model, which already "
        "scores responses) or `policy` (the base model with a new value head). With an `adapter:` it trains "
        "an adapter of the same kind; without, all its weights."})
    disable_dropout: bool = field(default=True, metadata={
        "help": "Turn dropout off in policy and value model, so log-probs at rollout and update time agree."})
    # -- TrainingArguments defaults that suit PPO -------------------------------------------------
    logging_steps: float = field(default=1, metadata={
        "help": "Log every X rollout batches (a float in [0, 1) is a fraction of all batches)."})
    dataloader_drop_last: bool = field(default=True, metadata={
        "help": "Leave out an epoch's last, incomplete batch of prompts (whitening wants full batches)."})
    ddp_find_unused_parameters: bool | None = field(default=False, metadata={
        "help": "DDP's search for parameters without gradients; off, since every step trains all of them."})

    def __post_init__(self):
        super().__post_init__()
        micro = self.num_mini_batches * self.gradient_accumulation_steps
        if self.per_device_train_batch_size % micro:
            raise ValueError(
                f"per_device_train_batch_size ({self.per_device_train_batch_size}) must be a multiple of "
                f"num_mini_batches x gradient_accumulation_steps ({self.num_mini_batches} x "
                f"{self.gradient_accumulation_steps} = {micro})")
        positive = {"response_length": self.response_length, "temperature": self.temperature,
                    "num_ppo_epochs": self.num_ppo_epochs, "num_mini_batches": self.num_mini_batches,
                    "kl_horizon": self.kl_horizon}
        if self.kl_target is not None:
            positive["kl_target"] = self.kl_target
        for name, value in positive.items():
            if value <= 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        for name in ("kl_coef", "cliprange", "cliprange_value", "vf_coef"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("gamma", "lam"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
