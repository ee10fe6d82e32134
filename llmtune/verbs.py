"""The verb table: one entry per training method, carrying every fact about it.

Adding a method is one entry here plus one runner module under llmtune/methods/. Kept
import-light (no torch/TRL): the CLI builds its verbs from it and `validate` reads each
method's TRL config class from source through `config`.
"""

import importlib
from dataclasses import dataclass

_SFT = ("messages", "sharegpt", "alpaca", "prompt_completion", "text")
_PAIRED = ("preference",)
_PROMPTS = ("prompt",)


@dataclass(frozen=True)
class Metric:
    key: str  # the logged name; evaluation logs it as `eval_<key>`
    label: str  # the card's name for it, and its curve's
    about: str  # what it says, for the card
    short: str = ""  # its name in the progress bar; empty: not shown there
    panel: str = ""  # the plot panel it is drawn in [default: its label]; metrics sharing a panel share axes
    from_loss: bool = False  # not logged: exp(loss), perplexity

    @property
    def title(self) -> str:
        return self.panel or self.label


LOSS = Metric("loss", "loss", "the training objective", "loss")
PERPLEXITY = Metric("perplexity", "perplexity", "exp(loss): how many tokens the model hesitates between",
                    from_loss=True)
PAIRS = (
    Metric("rewards/accuracies", "reward accuracy", "share of pairs whose chosen answer gets the higher implicit "
           "reward", "acc"),
    Metric("rewards/margins", "reward margin", "mean implicit reward of the chosen answer minus the rejected one's",
           "margin"),
    Metric("logps/chosen", "log-prob chosen", "mean log-probability of the chosen answers", panel="log-probs"),
    Metric("logps/rejected", "log-prob rejected", "mean log-probability of the rejected answers", panel="log-probs"),
)
KL = Metric("kl", "KL to the reference", "how far the policy has moved from the reference model", "kl")
REWARD = (Metric("reward", "mean reward", "mean reward of the sampled responses", "reward"), KL)


@dataclass(frozen=True)
class Method:
    name: str
    config: str          # the TRL config class the recipe's `train:` section becomes
    runner: str          # module with `defaults(config, data)` and `build_trainer(...)` (see runner/session.py)
    summary: str
    formats: tuple[str, ...] = _PROMPTS  # the data formats (data/formats.py) its trainer takes
    experimental: bool = False  # TRL ships the trainer under `trl.experimental`, without a stability contract
    head: str = "CausalLM"  # the model class is `AutoModelFor<head>` (reward: SequenceClassification)
    paired: bool = False  # each row is a chosen + rejected pair: two sequences per row in memory (`plan`)
    reference: bool = False  # trains against a frozen reference model (`ref_model:`, cached log-probs)
    teacher: bool = False  # trains toward a frozen teacher model's token distributions (`teacher_model:`)
    rewards: bool = False  # scores sampled responses (`reward_model:`, ...); build_trainer gets `recipe`
    reward_functions: bool = False  # scores with `reward_functions:` too, not only a `reward_model:`
    streams: bool = False  # can train on `data.streaming: true` sources
    # trains a conversation's assistant turns: where TRL cannot mark them, data/masking.py cuts each row into turns
    assistant_turns: bool = False
    # Liger picked by default on a CUDA GPU (defaults.py): TRL 1.16's trainer applies only Liger's layer kernels
    # (RMSNorm, SwiGLU, RoPE) and keeps its own chunked LM-head loss. For the others transformers' Trainer would
    # also swap in Liger's causal-LM fused-loss forward (over a reward model's classifier, too); ORPO
    # (experimental) and llmtune's PPO are not verified with it. Those get Liger only when the recipe sets it.
    liger: bool = False
    # the metrics it is judged by (progress bar, summary, plot, manifest, card, `runs`, `compare`; runner/metrics.py);
    # a method that scores sampled responses plots them first, its loss last
    judged: tuple[Metric, ...] = ()


METHODS = {
    m.name: m
    for m in (
        Method("sft", "trl:SFTConfig", "llmtune.methods.sft",
               "Supervised fine-tuning on chat, instruction, prompt-completion or plain text data.",
               formats=_SFT, streams=True, assistant_turns=True, liger=True,
               judged=(PERPLEXITY, Metric("mean_token_accuracy", "mean token accuracy", "share of trained tokens the "
                                          "model predicts exactly (argmax)", "acc"))),
        Method("dpo", "trl:DPOConfig", "llmtune.methods.dpo",
               "Direct preference optimization (and IPO, hinge, ... via train.loss_type) on chosen/rejected pairs.",
               formats=_PAIRED, paired=True, reference=True, liger=True, judged=PAIRS),
        Method("orpo", "trl.experimental.orpo:ORPOConfig", "llmtune.methods.orpo",
               "Odds-ratio preference optimization: SFT and preference in one pass, no reference model.",
               formats=_PAIRED, experimental=True, paired=True, judged=PAIRS),
        Method("kto", "trl:KTOConfig", "llmtune.methods.kto",
               "Kahneman-Tversky optimization on completions labelled good or bad (or on unpaired preference pairs).",
               formats=("kto", "preference"), reference=True, liger=True,  # KTOTrainer unpairs preference data
               judged=(*PAIRS[1:], KL)),  # unpaired: no accuracy
        Method("reward", "trl:RewardConfig", "llmtune.methods.reward",
               "Train a reward model (a sequence-classification head scoring text) on chosen/rejected pairs.",
               formats=_PAIRED, head="SequenceClassification", paired=True,
               judged=(Metric("accuracy", "accuracy", "share of pairs the model scores chosen above rejected", "acc"),
                       Metric("margin", "margin", "mean score of the chosen answer minus the rejected one's",
                              "margin"))),
        Method("distill", "trl.experimental.gkd:GKDConfig", "llmtune.methods.distill",
               "Distil a teacher model into the student: match its token distributions (generalized JSD, forward "
               "or reverse KL via train.beta), optionally on the student's own samples (train.lmbda).",
               formats=("messages", "sharegpt"), experimental=True, teacher=True),
        Method("ppo", "llmtune.methods.ppo_config:PPOConfig", "llmtune.methods.ppo",
               "RLHF with PPO (llmtune's own; TRL has none): policy and value model, reward model, KL to the "
               "reference.", rewards=True, judged=REWARD),
        Method("grpo", "trl:GRPOConfig", "llmtune.methods.grpo",
               "Group relative policy optimization: scores groups of sampled responses with a reward model or "
               "functions.", rewards=True, reward_functions=True, liger=True, judged=REWARD),
        Method("rloo", "trl:RLOOConfig", "llmtune.methods.rloo",
               "REINFORCE leave-one-out: online RL with a reward model or reward functions.", rewards=True,
               reward_functions=True, liger=True, judged=REWARD),
    )
}


def config_class(target: str):
    """The class a `module:Name` target names (a method's TRL config, an adapter's PEFT config)."""
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)
