"""Generate and chat with a trained model: the run's own chat template and stop token.

A run directory holds either an adapter (`adapter_config.json`, loaded onto the base the
run's `recipe.yaml` names, quantized as in training) or a full model (`config.json`: a full
fine-tune or the output of `llmtune merge`). Its tokenizer carries the chat template used
in training, and generation stops at the end-of-turn token that template trains as well as
at the model's eos tokens.
"""

from __future__ import annotations

import json
import os
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


def generate_batch(loaded: Loaded, batch: list, sampling: Sampling) -> list[list[int]]:
    """New token ids for each prompt (a 1-row id tensor each), generated together: padded on the left, each answer
    cut at its first stop token."""
    import torch

    if loaded.head != "CausalLM":
        raise UserError("this run trained a reward model: it scores text and does not generate")
    model, tokenizer = loaded.model, loaded.tokenizer
    stops = stop_token_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    width = max(ids.shape[1] for ids in batch)
    ids = torch.full((len(batch), width), pad, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, prompt in enumerate(batch):  # left padding: every answer starts right after its prompt
        ids[row, width - prompt.shape[1]:] = prompt[0]
        mask[row, width - prompt.shape[1]:] = 1
    with torch.no_grad():
        out = model.generate(input_ids=ids.to(model.device), attention_mask=mask.to(model.device), eos_token_id=stops,
                             pad_token_id=pad, **sampling.kwargs())
    answers = []
    for new in out[:, width:].tolist():
        cut = next((i for i, token in enumerate(new) if token in stops), len(new))
        answers.append(new[:cut])
    return answers


def read_prompts(path: Path) -> list[list[dict]]:
    """Each row's conversation up to the turn to answer: a `prompt` (text or messages) or `messages` (the turns
    before its last assistant turn, which is answered again). UserError with the file and line otherwise."""
    if not path.is_file():
        raise UserError(f"--data {path}: no such file")
    prompts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{where}: not valid JSON ({err.msg}, column {err.colno})") from None
        turns = row.get("prompt", row.get("messages")) if isinstance(row, dict) else None
        if isinstance(turns, str):
            turns = [{"role": "user", "content": turns}]
        elif isinstance(turns, list) and "prompt" not in row:
            while turns and isinstance(turns[-1], dict) and turns[-1].get("role") == "assistant":
                turns = turns[:-1]  # a finished conversation: its last answer is the one written again
        if not (isinstance(turns, list) and turns and all(isinstance(t, dict) and isinstance(t.get("role"), str)
                                                           and isinstance(t.get("content"), str) for t in turns)):
            raise UserError(f"{where}: a prompt row needs `prompt` (text, or a list of {{role, content}} messages) "
                            "or `messages` (a conversation); this row has "
                            f"{', '.join(map(repr, row)) if isinstance(row, dict) and row else 'neither'}")
        if turns[-1]["role"] != "user":
            raise UserError(f"{where}: the conversation to answer ends with a `{turns[-1]['role']}` turn; it must "
                            "end with a `user` turn")
        prompts.append(turns)
    if not prompts:
        raise UserError(f"--data {path}: no rows")
    return prompts


def answered(out: Path, prompts: list[list[dict]]) -> int:
    """How many rows `out` already holds for these prompts (in order). A last row cut short by a killed run is
    removed, to be written again; rows of other prompts are refused rather than mixed in."""
    if not out.is_file():
        return 0
    data = out.read_bytes()
    whole = data[:data.rfind(b"\n") + 1]  # rows end with a newline: anything after the last one is a cut row
    if len(whole) != len(data):
        with out.open("r+b") as handle:
            handle.truncate(len(whole))
    rows = [json.loads(line) for line in whole.decode("utf-8").splitlines() if line.strip()]
    if len(rows) > len(prompts):
        raise UserError(f"--out {out}: holds {len(rows)} rows, more than the {len(prompts)} prompts; choose another "
                        "--out")
    for number, (row, prompt) in enumerate(zip(rows, prompts), 1):
        if row.get("messages", [])[:-1] != prompt:
            raise UserError(f"--out {out}:{number}: this answer is to another prompt than row {number} of --data; "
                            "it was written from other prompts (or they changed): choose another --out")
    return len(rows)


def generate_file(loaded: Loaded, data: Path, out: Path, sampling: Sampling, batch_size: int = 8,
                  system: str | None = None, progress: bool = True) -> tuple[int, int]:
    """Answer every prompt of `data` into `out` as `messages` rows (what `sft` trains on), `batch_size` at a time;
    rows already in `out` are kept and skipped. Returns (rows written now, rows there before)."""
    from tqdm.auto import tqdm

    head = [{"role": "system", "content": system}] if system else []
    prompts = [head + turns for turns in read_prompts(Path(data))]
    out = Path(out)
    done = answered(out, prompts)
    if sampling.seed is not None:
        import torch

        torch.manual_seed(sampling.seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    todo = prompts[done:]
    with out.open("a", encoding="utf-8") as handle, \
            tqdm(total=len(prompts), initial=done, unit="row", desc="generate", disable=not progress) as bar:
        for start in range(0, len(todo), batch_size):
            batch = todo[start:start + batch_size]
            answers = generate_batch(loaded, [prompt_ids(loaded.tokenizer, turns) for turns in batch], sampling)
            rows = [{"messages": [*turns, {"role": "assistant",
                                           "content": loaded.tokenizer.decode(new, skip_special_tokens=True)}]}
                    for turns, new in zip(batch, answers)]
            handle.write("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))  # whole rows only
            handle.flush()
            os.fsync(handle.fileno())
            bar.update(len(rows))
    return len(todo), done
