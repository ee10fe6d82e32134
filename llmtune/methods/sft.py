"""SFT: the recipe as `trl.SFTConfig` + `trl.SFTTrainer`."""

from ..data import masking
from ..defaults import attention
from . import trl_datasets

# Attention kernels that run packed rows as separate sequences (varlen), so packing saves work
# instead of adding cross-row attention that is then masked away.
VARLEN_ATTENTION = ("flash_attention_2", "flash_attention_3")


def _varlen(model: dict) -> bool:
    """Whether the attention the run will use (the recipe's, or flash attention picked for this machine) is varlen."""
    return attention(model).value in VARLEN_ATTENTION and not model["trust_remote_code"]


def refusals(config: dict) -> list[tuple[tuple, str]]:
    """(key, message) for what SFTTrainer would refuse once the model loaded; the pre-flight says it first."""
    packing = config["data"]["packing"]
    if (config.get("train") or {}).get("padding_free") and not (_varlen(config["model"]) if packing is None
                                                                else packing) \
            and config["data"]["max_length"] is not None:
        return [(("train", "padding_free"), "`train.padding_free: true` without packing would not cut rows to "
                 "`data.max_length` (TRL's SFTTrainer refuses it); set `data.packing: true` too, or remove "
                 "`padding_free`")]
    return []


def defaults(config: dict, data) -> dict:
    """SFTConfig values llmtune sets unless the recipe's `train:` does."""
    varlen = _varlen(config["model"])
    packing = config["data"]["packing"]
    if packing is None:
        packing = varlen
    elif packing and not varlen:
        data.warnings.append(
            "packing without flash attention: rows stay apart, but attention is computed over the whole packed "
            "batch, often slower than no packing on short rows (trl#3910); on a GPU, install flash-attn (picked "
            "while `model.attn_implementation` is null), or set `data.packing: false`")
    out = {"max_length": config["data"]["max_length"], "packing": packing}
    if data.shape == "conversational_language_modeling":
        # Train the assistant turns only (their stop token included), not the prompts.
        out["assistant_only_loss"] = True
    if data.eval is not None:
        out["eval_strategy"] = "steps"
    return out


def build_trainer(*, args, model, tokenizer, data, peft_config, callbacks):
    from trl import SFTTrainer

    train, evals = trl_datasets(data, tokenizer)
    if masking.renders_masks(args, data.shape, tokenizer):
        # A template TRL cannot mark assistant turns in: hand it rows already tokenized with their masks.
        train, evals = (None if d is None else masking.pretokenized(d, tokenizer) for d in (train, evals))
        args.assistant_only_loss = False  # the masks are in the rows; TRL would look for {% generation %}
    return SFTTrainer(model=model, args=args, train_dataset=train, eval_dataset=evals,
                      processing_class=tokenizer, peft_config=peft_config, callbacks=callbacks)
