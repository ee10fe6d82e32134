"""The plain-TRL script llmtune is measured against: the same SFT, written by hand.

Usage: python benchmarks/plain_trl_sft.py MODEL_DIR DATA.jsonl OUT_DIR [--packing]
Prints one JSON line: train_runtime, tokens, tokens_per_s, final loss.
"""

import json
import sys

from datasets import load_dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer

model_dir, data_file, out_dir = sys.argv[1:4]
packing = "--packing" in sys.argv
tokenizer = AutoTokenizer.from_pretrained(model_dir)
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="float32")
dataset = load_dataset("json", data_files=data_file, split="train")
args = SFTConfig(output_dir=out_dir, learning_rate=3e-3, num_train_epochs=2, per_device_train_batch_size=8,
                 gradient_checkpointing=False, logging_steps=5, save_strategy="no", report_to="none", bf16=False,
                 max_length=256, assistant_only_loss=True, packing=packing, seed=42, disable_tqdm=True)
trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                     peft_config=LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
result = trainer.train()
trainer.save_model(out_dir)
tokens = trainer.state.num_input_tokens_seen or [h for h in trainer.state.log_history if "num_tokens" in h][-1]["num_tokens"]
print(json.dumps({"train_runtime": result.metrics["train_runtime"], "tokens": tokens,
                  "tokens_per_s": tokens / result.metrics["train_runtime"],
                  "loss": [h["loss"] for h in trainer.state.log_history if "loss" in h][-1]}))
