"""Method runners: each module turns the recipe into its TRL config defaults and trainer (see verbs.py)."""

from ..data import masking


def shared_defaults(config: dict, data) -> dict:
    """TRL config values every preference method takes from llmtune's own sections."""
    out = {"max_length": config["data"]["max_length"]}
    if data.eval is not None:
        out["eval_strategy"] = "steps"  # TRL's default is never to evaluate
    return out


def trl_datasets(data, tokenizer) -> tuple:
    """The train and eval sets to hand TRL: prompt + answer rows whose prompt the chat template renders differently
    before the answer than for inference (Mistral-Nemo's system prompt) as text, so the context trained is the
    inference prompt and the completion exactly the answer (data/masking.py `inference_prompts`)."""
    return tuple(masking.inference_prompts(d, tokenizer) for d in (data.train, data.eval))
