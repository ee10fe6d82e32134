"""Generate and chat with a trained model: the run's own chat template and stop token.

A run directory holds either an adapter (`adapter_config.json`, loaded onto the base the
run's `recipe.yaml` names, quantized as in training) or a full model (`config.json`: a full
fine-tune or the output of `llmtune merge`). Its tokenizer carries the chat template used
in training, and generation stops at the end-of-turn token that template trains as well as
at the model's eos tokens.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..data.masking import fold_system, has_system_role
from ..errors import UserError
from ..files import adapter_run
from ..logs import quiet
from ..model import load_model
from ..tokenizer import stop_token_ids
from ..verbs import METHODS


@dataclass
class Loaded:
    model: object
    tokenizer: object
    adapter: bool  # an adapter on its base (else a full model)
    recipe: dict | None  # the run's resolved recipe, when it has one
    head: str  # AutoModelFor<head>: CausalLM, or a reward model's SequenceClassification
    notes: list[str]


def run_recipe(run_dir: Path) -> dict | None:
    path = run_dir / "recipe.yaml"
    return yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else None


def is_adapter(run_dir: Path) -> bool:
    """True for an adapter run directory, False for a full model; UserError for anything else."""
    if (run_dir / "adapter_config.json").is_file():
        return True
    if (run_dir / "config.json").is_file():
        return False
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: no such run directory")
    what = "an unfinished run (no saved model yet)" if (run_dir / "manifest.json").is_file() else "not a run directory"
    raise UserError(f"{run_dir}: {what}; expected adapter_config.json (an adapter) or config.json (a full or merged "
                    "model), as `llmtune sft` and `llmtune merge` write them")


def base_model_section(run_dir: Path, recipe: dict | None) -> dict:
    """A `model:` section for an adapter's base: the recipe's (from adapter_config.json without a recipe)."""
    if recipe and recipe.get("model"):
        section = recipe["model"]
        stacked = adapter_run(section)  # the run kept training another run's adapter: load that one's base
        return {**section, "name": stacked["base_model_name_or_path"]} if stacked else section
    base = json.loads((run_dir / "adapter_config.json").read_text())["base_model_name_or_path"]
    return {"name": base, "revision": None, "dtype": "auto", "attn_implementation": None, "trust_remote_code": False}


def model_head(recipe: dict | None) -> str:
    """`CausalLM`, or the head of the method that trained the run (a reward model's SequenceClassification)."""
    method = METHODS.get((recipe or {}).get("method"))
    return method.head if method else "CausalLM"


def load(run_dir, *, quantized: bool = True) -> Loaded:
    """The model of a run directory ready to generate; `quantized=False` loads a quantized base dequantized."""
    import torch
    import transformers

    quiet()
    run_dir = Path(run_dir)
    adapter = is_adapter(run_dir)
    recipe = run_recipe(run_dir)
    head = model_head(recipe)
    tokenizer = transformers.AutoTokenizer.from_pretrained(run_dir)
    notes = []
    if adapter:
        from peft import PeftModel

        quant = (recipe or {}).get("quantization")
        base = load_model({"model": base_model_section(run_dir, recipe), "quantization": quant}, head)
        if quant and not quantized:
            base = base.dequantize()
            notes.append(f"dequantized the {quant['bits']}-bit base to {quant['compute_dtype']} (the weights the "
                         "adapter was trained against) before merging")
        model = PeftModel.from_pretrained(base, run_dir)
    else:
        trust = bool(((recipe or {}).get("model") or {}).get("trust_remote_code"))
        auto = getattr(transformers, f"AutoModelFor{head}")
        model = auto.from_pretrained(run_dir, dtype="auto", trust_remote_code=trust)
    if torch.cuda.is_available() and model.device.type == "cpu":  # a quantized base is placed at load time
        model = model.to("cuda")
    model.eval()
    return Loaded(model, tokenizer, adapter, recipe, head, notes)


@dataclass
class Sampling:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    repetition_penalty: float = 1.0
    seed: int | None = None

    def kwargs(self) -> dict:
        if self.temperature <= 0:
            return {"do_sample": False, "max_new_tokens": self.max_new_tokens,
                    "repetition_penalty": self.repetition_penalty}
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k or None,
                "max_new_tokens": self.max_new_tokens, "repetition_penalty": self.repetition_penalty}


def prompt_ids(tokenizer, messages: list[dict] | None = None, text: str | None = None):
    """Token ids of a chat (rendered with the run's template and a generation prompt) or of raw text."""
    if messages is not None:
        if not tokenizer.chat_template:
            raise UserError("this model's tokenizer has no chat template; pass --raw to send the prompt as plain text")
        if not has_system_role(tokenizer):  # as training did (data/masking.py): the system text opens the user turn
            messages = fold_system(messages)
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                             return_tensors="pt")["input_ids"]
    return tokenizer(text, return_tensors="pt")["input_ids"]


def generate(loaded: Loaded, ids, sampling: Sampling, streamer=None) -> list[int]:
    """New token ids after `ids`, stopping at a stop token (which is not returned)."""
    import torch

    if loaded.head != "CausalLM":
        raise UserError("this run trained a reward model: it scores text and does not generate")
    if sampling.seed is not None:
        torch.manual_seed(sampling.seed)
    model, tokenizer = loaded.model, loaded.tokenizer
    stops = stop_token_ids(model, tokenizer)
    ids = ids.to(model.device)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), eos_token_id=stops,
                             pad_token_id=tokenizer.pad_token_id, streamer=streamer, **sampling.kwargs())
    new = out[0, ids.shape[1]:].tolist()
    for i, token in enumerate(new):
        if token in stops:
            return new[:i]
    return new


def chat(loaded: Loaded, sampling: Sampling, system: str | None, read=input, write=print) -> None:
    """An interactive chat on the terminal; `/reset` forgets the conversation, `/exit` or EOF ends it."""
    from transformers import TextStreamer

    history = [{"role": "system", "content": system}] if system else []
    start = len(history)
    write("chat with the model: /reset starts over, /exit (or Ctrl-D) quits")
    while True:
        try:
            line = read("> ")
        except EOFError:
            write("")
            return
        if line.strip() == "/exit":
            return
        if line.strip() == "/reset":
            del history[start:]
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        streamer = TextStreamer(loaded.tokenizer, skip_prompt=True, skip_special_tokens=True)
        new = generate(loaded, prompt_ids(loaded.tokenizer, history), sampling, streamer=streamer)
        history.append({"role": "assistant", "content": loaded.tokenizer.decode(new, skip_special_tokens=True)})
