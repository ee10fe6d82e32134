"""SFT: the recipe as `trl.SFTConfig` + `trl.SFTTrainer`."""


def defaults(config: dict, data) -> dict:
    """SFTConfig values llmtune sets unless the recipe's `train:` does."""
    out = {"max_length": config["data"]["max_length"], "packing": config["data"]["packing"]}
    if data.shape == "conversational_language_modeling":
        # Train the assistant turns only (their stop token included), not the prompts.
        out["assistant_only_loss"] = True
    if data.eval is not None:
        out["eval_strategy"] = "steps"
    return out


def build_trainer(*, args, model, tokenizer, data, peft_config, callbacks):
    from trl import SFTTrainer

    return SFTTrainer(model=model, args=args, train_dataset=data.train, eval_dataset=data.eval,
                      processing_class=tokenizer, peft_config=peft_config, callbacks=callbacks)
