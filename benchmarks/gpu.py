"""GPU benchmark: LoRA and QLoRA SFT at 2048 tokens, llmtune defaults vs a plain TRL + PEFT + bitsandbytes script.

Needs one CUDA GPU; no Hub access: Llama-shaped models of ~0.5B and ~1.5B parameters are
built from config with random weights (throughput does not depend on the values) and saved
to a temporary folder with llmtune's byte-level tokenizer. For each model x {lora, qlora}
it prints tokens/s, peak GPU memory (torch.cuda.max_memory_allocated), model FLOPs
utilisation and, when `llmtune plan` is available, the plan's estimate next to the peak.

Then, as a check on a real architecture rather than a speed figure, it runs llmtune's QLoRA SFT and
LoRA DPO on a Qwen2-shaped ~0.5B random-weight model carrying Qwen2.5's chat template and special
tokens, and prints each run's first and last loss, time and peak memory, and a generation from the
SFT run directory.

Run: python benchmarks/gpu.py [--steps 30] [--sizes 0.5b 1.5b] [--no-families]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from common import PYTHON, ROOT

SIZES = {  # hidden, layers, heads, kv heads, intermediate
    "0.5b": (1024, 24, 16, 8, 2816),
    "1.5b": (2048, 24, 16, 8, 5504),
}
VOCAB = 32000
SEQ = 2048
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "4090": 165.0, "A10": 125.0}


def build_model(size: str, out: Path) -> int:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(ROOT))
    from llmtune.builtin import build_tiny_tokenizer

    hidden, layers, heads, kv, inter = SIZES[size]
    tokenizer = build_tiny_tokenizer()
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv, intermediate_size=inter, max_position_embeddings=4096,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    params = sum(p.numel() for p in model.parameters())
    del model
    torch.cuda.empty_cache()
    return params


def write_data(path: Path, rows: int) -> None:
    """Chat rows of ~SEQ tokens with the byte tokenizer (one token per byte)."""
    import random

    rng = random.Random(0)
    with path.open("w") as out:
        for i in range(rows):
            answer = " ".join(rng.choice(["alpha", "beta", "gamma", "delta"]) for _ in range(SEQ // 6 - 20))
            out.write(json.dumps({"messages": [{"role": "user", "content": f"Write about {i}."},
                                               {"role": "assistant", "content": answer}]}) + "\n")


def attention() -> str:
    try:
        import flash_attn  # noqa: F401

        return "flash_attention_2"
    except ImportError:
        return "sdpa"


LLMTUNE_CHILD = """
import json, sys, torch
sys.path.insert(0, {root!r})
from llmtune.recipe.check import resolve
from llmtune.runner.session import train as run
metrics = run(resolve({recipe!r}), ["llmtune"], output_dir={out!r}, overwrite=True)
print(json.dumps({{"runtime": metrics["train_runtime"], "peak": torch.cuda.max_memory_allocated(),
                  "tokens": [r["num_tokens"] for r in map(json.loads, open({out!r} + "/metrics.jsonl"))
                             if "num_tokens" in r][-1],
                  "speed": json.load(open({out!r} + "/manifest.json"))["speed"]}}))
"""

TRL_CHILD = """
import json, sys, torch
from datasets import load_dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
from trl import SFTConfig, SFTTrainer
quant = {qlora} and BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                       bnb_4bit_compute_dtype=torch.bfloat16)
model = AutoModelForCausalLM.from_pretrained({model!r}, dtype=torch.bfloat16, attn_implementation={attn!r},
                                             quantization_config=quant or None, device_map={{"": 0}})
tokenizer = AutoTokenizer.from_pretrained({model!r})
args = SFTConfig(output_dir={out!r}, max_steps={steps}, per_device_train_batch_size=1, gradient_accumulation_steps=4,
                 learning_rate=2e-4, logging_steps=5, save_strategy="no", report_to="none", max_length={seq},
                 assistant_only_loss=True, gradient_checkpointing=True, bf16=True)
trainer = SFTTrainer(model=model, args=args, processing_class=tokenizer,
                     train_dataset=load_dataset("json", data_files={data!r}, split="train"),
                     peft_config=LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
result = trainer.train()
tokens = [h["num_tokens"] for h in trainer.state.log_history if "num_tokens" in h][-1]
print(json.dumps({{"runtime": result.metrics["train_runtime"], "peak": torch.cuda.max_memory_allocated(),
                  "tokens": tokens}}))
"""

RECIPE = """
method: sft
model: {{name: {model}, dtype: bfloat16}}  # attention (and Liger) picked by llmtune for this GPU
{quant}
adapter: {{type: lora, r: 16, alpha: 32, target_modules: all-linear}}
data: {{train: [{{path: {data}}}], max_length: {seq}}}
train: {{max_steps: {steps}, per_device_train_batch_size: 1, gradient_accumulation_steps: 4, learning_rate: 2.0e-4,
         logging_steps: 5, save_strategy: "no", gradient_checkpointing: true}}
"""


def child(code: str) -> dict:
    done = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True)
    if done.returncode:
        sys.exit(done.stderr[-4000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def plan_estimate(recipe: Path) -> str:
    done = subprocess.run([PYTHON, "-m", "llmtune", "plan", str(recipe)], capture_output=True, text=True)
    if done.returncode:
        return "n/a"
    lines = [line for line in done.stdout.splitlines() if "total" in line.lower() and "GiB" in line]
    return lines[0].strip() if lines else "n/a"


QWEN_SHAPE = dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                  intermediate_size=4864)  # Qwen2.5-0.5B's shape

RUN_CHILD = """
import json, sys, torch
sys.path.insert(0, {root!r})
from llmtune.recipe.check import resolve
from llmtune.runner.session import train as run
run(resolve({recipe!r}), ["llmtune"], output_dir={out!r}, overwrite=True)
rows = [json.loads(line) for line in open({out!r} + "/metrics.jsonl")]
losses = [r["loss"] for r in rows if "loss" in r]
print(json.dumps({{"first": losses[0], "last": losses[-1], "steps": len(losses),
                  "runtime": [r for r in rows if "train_runtime" in r][-1]["train_runtime"],
                  "peak": torch.cuda.max_memory_allocated(), "status": json.load(open({out!r} + "/manifest.json"))["status"]}}))
"""

FAMILY_RECIPE = """
method: {method}
model: {{name: {model}, dtype: bfloat16}}
{quant}
adapter: {{type: lora, r: 16, alpha: 32, target_modules: all-linear}}
data: {{train: [{{path: {data}}}], max_length: 512}}
train: {{max_steps: {steps}, per_device_train_batch_size: 8, learning_rate: {lr}, logging_steps: 5,
         save_strategy: "no"{extra}}}
"""


def build_qwen(out: Path) -> None:
    """Qwen2 architecture, random weights, Qwen2.5's template with its <|im_start|>/<|im_end|> special tokens."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    sys.path.insert(0, str(ROOT))
    from llmtune.builtin import build_tiny_tokenizer
    from llmtune.paths import read_chat_template

    tokenizer = build_tiny_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.chat_template = read_chat_template("qwen2_5")
    config = Qwen2Config(vocab_size=VOCAB, max_position_embeddings=4096, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, **QWEN_SHAPE)
    with torch.device("cuda"):
        model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def family_runs(work: Path, steps: int) -> None:
    model = work / "qwen2-0.5b"
    build_qwen(model)
    data = ROOT / "recipes" / "data"
    print(f"\nReal architecture: Qwen2 {QWEN_SHAPE['hidden_size']}x{QWEN_SHAPE['num_hidden_layers']}, random "
          f"weights, Qwen2.5 chat template; {steps} steps, batch 8")
    print(f"{'run':<10} {'loss first':>10} {'loss last':>10} {'seconds':>8} {'peak GiB':>9}  status")
    for name, method, quant, source, lr, extra in (
            ("qlora sft", "sft", "quantization: {bits: 4, compute_dtype: bfloat16}", "chat.jsonl", "2.0e-4", ""),
            ("lora dpo", "dpo", "", "preference.jsonl", "5.0e-5", ", beta: 0.1")):
        recipe = work / f"{method}.yaml"
        recipe.write_text(FAMILY_RECIPE.format(method=method, model=model, quant=quant, data=data / source,
                                               steps=steps, lr=lr, extra=extra))
        out = work / f"run-{method}"
        result = child(RUN_CHILD.format(root=str(ROOT), recipe=str(recipe), out=str(out)))
        print(f"{name:<10} {result['first']:>10.4f} {result['last']:>10.4f} {result['runtime']:>8.1f} "
              f"{result['peak'] / 2**30:>9.2f}  {result['status']}")
        if method == "sft":
            done = subprocess.run([PYTHON, "-m", "llmtune", "generate", str(out), "--prompt", "What is 11 + 5?",
                                   "--max-new-tokens", "12"], capture_output=True, text=True)
            print(f"           generate from the run directory: exit {done.returncode}, "
                  f"{(done.stdout.strip() or done.stderr.strip()[-300:])[:200]!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--no-families", dest="families", action="store_false",
                        help="Skip the QLoRA SFT / DPO runs on a Qwen2-shaped model.")
    opts = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        sys.exit("benchmarks/gpu.py needs a CUDA GPU")
    name = torch.cuda.get_device_name(0)
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    attn = attention()
    print(f"GPU: {name}; plain TRL attention: {attn} (llmtune picks its own: `llmtune plan` shows it); seq {SEQ}; "
          f"batch 1 x 4 accumulation; {opts.steps} steps")
    print(f"{'model':<6} {'kind':<6} {'who':<9} {'tokens/s':>9} {'peak GiB':>9} {'MFU':>6}  plan estimate")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = work / "data.jsonl"
        write_data(data, rows=opts.steps * 4 + 8)  # one pass: batch 1 x 4 accumulation per step
        for size in opts.sizes:
            model_dir = work / size
            params = build_model(size, model_dir)
            for kind in ("lora", "qlora"):
                quant = "quantization: {bits: 4, compute_dtype: bfloat16}" if kind == "qlora" else ""
                recipe = work / f"{size}-{kind}.yaml"
                recipe.write_text(RECIPE.format(model=model_dir, quant=quant, data=data, seq=SEQ, steps=opts.steps))
                runs = {
                    "plain TRL": child(TRL_CHILD.format(qlora=kind == "qlora", model=str(model_dir), attn=attn,
                                                       out=str(work / "trl"), steps=opts.steps, seq=SEQ,
                                                       data=str(data))),
                    "llmtune": child(LLMTUNE_CHILD.format(root=str(ROOT), recipe=str(recipe),
                                                          out=str(work / "llmtune"))),
                }
                estimate = plan_estimate(recipe)
                for who, result in runs.items():
                    tps = result["tokens"] / result["runtime"]
                    # LoRA: forward 2N + input-gradient backward 2N per token (frozen weights get no weight grads).
                    mfu = f"{tps * 4 * params / (peak * 1e12):.1%}" if peak else "n/a"
                    print(f"{size:<6} {kind:<6} {who:<9} {tps:>9.0f} {result['peak'] / 2**30:>9.2f} {mfu:>6}  "
                          f"{estimate if who == 'llmtune' else ''}")
                print(f"       llmtune used: {runs['llmtune']['speed']}")
        if opts.families:
            family_runs(work, opts.steps)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
