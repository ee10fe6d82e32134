"""Method runners: each module turns the recipe into its TRL config defaults and trainer (see verbs.py)."""


def shared_defaults(config: dict, data) -> dict:
    """TRL config values every preference method takes from llmtune's own sections."""
    out = {"max_length": config["data"]["max_length"]}
    if data.eval is not None:
        out["eval_strategy"] = "steps"  # TRL's default is never to evaluate
    return out

