"""`llmtune reward-score`: a trained reward model's score for responses to a prompt.

Each response is scored as the reward trainer saw its rows: prompt and response as one conversation through
the run's chat template (a template without a system role gets the system text in the first user turn), or,
for a run that trained on plain text, the prompt and response joined, ending in the eos token.
"""

from __future__ import annotations

from pathlib import Path

from ..data.masking import fold_system, has_system_role
from ..errors import UserError
from .evaluation import chat_template_default
from .infer import load


def reward_scores(run_dir, prompt: str, responses: list[str], system: str | None = None) -> list[float]:
    """One score per response (higher: preferred), from the run's reward model."""
    import torch

    run_dir = Path(run_dir)
    loaded = load(run_dir)
    if loaded.head != "SequenceClassification":
        method = (loaded.recipe or {}).get("method", "a method other than reward")
        raise UserError(f"{run_dir}: not a reward model (trained by `llmtune {method}`); reward-score needs a run of "
                        "`llmtune reward`")
    tokenizer, model = loaded.tokenizer, loaded.model
    chat, _ = chat_template_default(run_dir, tokenizer)
    scores = []
    for response in responses:
        if chat:
            messages = ([{"role": "system", "content": system}] if system else []) + [
                {"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
            if not has_system_role(tokenizer):
                messages = fold_system(messages)
            ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                                return_tensors="pt")["input_ids"]
        else:  # TRL's RewardTrainer ends plain rows with eos
            text = (f"{system}\n\n" if system else "") + prompt + response
            ids = tokenizer(text + (tokenizer.eos_token or ""), return_tensors="pt")["input_ids"]
        with torch.no_grad():
            scores.append(model(input_ids=ids.to(model.device)).logits[0, 0].item())
    return scores
