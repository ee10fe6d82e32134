"""Padding efficiency: the share of real tokens in each batch, llmtune's defaults vs TRL's.

On short-row chat data, TRL's defaults (no packing) pad every batch to its longest row;
llmtune packs rows padding-free by default where the attention is flash-attention (varlen).
Goal: >= 0.95 with packing. Also trains both for an epoch and prints tokens/s: on a CPU
(sdpa) packing wastes attention over the whole packed batch, which is why llmtune only
turns it on by default with flash attention. Run: python benchmarks/padding.py
"""

import sys
import tempfile
import time

from common import ROOT, padding_efficiency

sys.path.insert(0, str(ROOT))


def trainer_for(packing: bool):
    from trl import SFTConfig

    from llmtune.data import load_data
    from llmtune.methods import sft
    from llmtune.model import load_model
    from llmtune.tokenizer import load_tokenizer

    section = {"train": [{"path": str(ROOT / "recipes/data/chat.jsonl"), "format": "auto", "columns": {},
                          "weight": 4.0}], "eval": 0.0, "max_length": 512, "packing": packing}
    config = {"model": {"name": "builtin:tiny", "trust_remote_code": False, "dtype": "float32"}, "data": section}
    data = load_data(section, method="sft", seed=0)
    args = SFTConfig(output_dir=tempfile.mkdtemp(), report_to="none", bf16=False, per_device_train_batch_size=8,
                     num_train_epochs=1, gradient_checkpointing=False, save_strategy="no", disable_tqdm=True,
                     learning_rate=1e-3, **sft.defaults(config, data))
    trainer = sft.build_trainer(args=args, model=load_model(config), tokenizer=load_tokenizer(config["model"]),
                                data=data, peft_config=None, callbacks=[])
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    return trainer


def masks(trainer):
    """Attention masks of every batch; a padding-free batch has none, so all of its tokens are real."""
    out = []
    for batch in trainer.get_train_dataloader():
        mask = batch.get("attention_mask")
        out.append(mask.tolist() if mask is not None else [[1] * batch["input_ids"].shape[1]])
    return out


def main() -> None:
    from llmtune.logs import quiet

    quiet()
    print(f"{'setting':<40} {'efficiency':>10} {'tokens/s':>10}")
    for label, packing in (("TRL defaults (no packing)", False), ("packing (llmtune's flash-attn default)", True)):
        trainer = trainer_for(packing)
        efficiency = padding_efficiency(masks(trainer))
        start = time.perf_counter()
        trainer.train()
        tokens = [h["num_tokens"] for h in trainer.state.log_history if "num_tokens" in h][-1]
        print(f"{label:<40} {efficiency:>10.3f} {tokens / (time.perf_counter() - start):>10.0f}")


if __name__ == "__main__":
    main()
