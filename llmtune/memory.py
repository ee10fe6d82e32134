"""The memory model: what a recipe will cost per GPU, before any weight is loaded (`plan`, diagnose.py).

Parameter counts come from the model's config: the model (and its PEFT adapter) is built
on the `meta` device, which allocates nothing, so counts are exact for any architecture.
Data is read and tokenized as `data inspect` does. Memory is an estimate per GPU, term by
term (docs/plan.md, "How plan estimates memory", gives the formula and what it leaves out):

  weights      P_lin * q + (P - P_lin) * w     q = w, 1 (8-bit), 0.5 + scales (4-bit)
  adapter      T * 4                           PEFT keeps adapter weights in float32
  gradients    T * g                           g = 4 for an adapter, w when fully fine-tuned
  optimizer    T * k                           k by optimizer: AdamW 2 states * g, 8-bit 2 * 1, ...
  activations  b * s * (L * a_layer + a_out)   or b * s * (L * h * e + a_layer + a_out) checkpointed
               a_layer = e * (6h + 4i + 2h_kv) + 8h (+ LoRA's input copies), a_out = V * (8 + e)

P parameters, P_lin of them in quantizable linear layers, T trainable; w bytes per weight,
e bytes per activation; b per-device batch, s sequence length, L layers, h hidden size,
i MLP size, h_kv the key/value width, V vocabulary. a_layer was measured on Llama blocks
(saved-tensor bytes per token with SDPA attention; RMSNorm keeps float32 copies: the 8h).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

from .compat import attn_implementation
from .defaults import auto_config
from .errors import UserError
from .files import adapter_run
from .model import peft_config

GIB = 1024 ** 3


# CUDA context, kernels and allocator slack: not in any term above, always there on a GPU.
RUNTIME_OVERHEAD = 1.0 * GIB


DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass
class Shape:
    """What memory depends on, read from the model config (nothing loaded)."""

    params: int  # all parameters
    linear: int  # in linear layers bitsandbytes would quantize (not the output head)
    trainable: int  # adapter parameters, or all of them
    lora_per_rank: int  # LoRA parameters per unit of rank on every linear layer (`target_modules: all-linear`)
    layer_params: int  # parameters of one decoder layer (what ZeRO-3/FSDP gathers at a time)
    layers: int
    hidden: int
    intermediate: int
    kv_width: int  # num_key_value_heads * head_dim
    vocab: int
    dtype: str  # weights dtype of the checkpoint (or the recipe's `model.dtype`)
    architecture: str
    attention: str = "sdpa"  # the attention transformers picks for the model by default


@dataclass
class Settings:
    """The knobs the estimate turns on; `plan` suggests changes to them."""

    batch: int
    seq_len: int
    checkpointing: bool
    optim: str
    quant: dict | None
    adapter: dict | None
    processes: int = 1
    backend: str = "ddp"


@dataclass
class Estimate:
    terms: dict  # name -> bytes, per GPU
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.terms.values())


def model_shape(config: dict, head: str = "CausalLM") -> Shape:
    """Parameter counts and sizes of the recipe's model (and adapter) from its config alone."""
    import torch.nn as nn
    import transformers
    from accelerate import init_empty_weights


    model = config["model"]
    adapter = config.get("adapter")
    stacked = adapter_run(model)
    hf_config = auto_config(model)
    with init_empty_weights():  # parameters on the meta device: shapes without memory
        net = getattr(transformers, f"AutoModelFor{head}").from_config(
            hf_config, trust_remote_code=model["trust_remote_code"])
    net.tie_weights()  # from_config leaves tied embeddings as two tensors (and cannot tie under init_empty_weights)
    attention = attn_implementation(net.config)
    params = sum(p.numel() for p in net.parameters())
    output = net.get_output_embeddings()
    linears = [m for m in net.modules() if isinstance(m, nn.Linear) and m is not output]
    layer = sum(p.numel() for p in _decoder_layers(net)[0].parameters())
    with init_empty_weights():
        if stacked and model.get("run_adapter") == "stack":
            from peft import PeftConfig, get_peft_model

            net = get_peft_model(net, PeftConfig.from_pretrained(model["name"]))
        elif adapter is not None:
            from peft import get_peft_model

            net = get_peft_model(net, peft_config(adapter, head, model))
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    text = hf_config.get_text_config()
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    dtype = model["dtype"] if model["dtype"] != "auto" else str(getattr(text, "dtype", None) or "float32")
    return Shape(params=params, linear=sum(m.weight.numel() for m in linears), trainable=trainable,
                 lora_per_rank=sum(m.in_features + m.out_features for m in linears), layer_params=layer,
                 layers=text.num_hidden_layers, hidden=text.hidden_size,
                 intermediate=getattr(text, "intermediate_size", 4 * text.hidden_size),
                 kv_width=getattr(text, "num_key_value_heads", heads) * head_dim, vocab=text.vocab_size,
                 dtype=dtype.removeprefix("torch."), architecture=(hf_config.architectures or ["?"])[0],
                 attention=attention)


def _decoder_layers(net):
    """The repeated blocks: the longest ModuleList in the model."""
    import torch.nn as nn

    lists = [m for m in net.modules() if isinstance(m, nn.ModuleList)]
    return max(lists, key=len)


def optimizer_bytes(optim: str, grad_bytes: int) -> tuple[float, str]:
    """Bytes of optimizer state per trainable parameter, and how that was read from the name."""
    name = optim.lower()
    states = 1 if "lion" in name else 0 if name.startswith("sgd") else 2
    if "8bit" in name:
        return states * 1.0, f"{states} 8-bit state(s)"
    if "adafactor" in name:
        return 0.0, "Adafactor's factored states (rows + columns): negligible"
    if name.startswith("sgd"):
        return 0.0, "no state (SGD without momentum)"
    if "32bit" in name:  # the bitsandbytes paged/32-bit optimizers keep float32 states
        return states * 4.0, f"{states} float32 state(s)"
    if not any(k in name for k in ("adam", "lion", "rmsprop", "lomo")):
        return 2 * 4.0, f"unknown optimizer '{optim}': assumed 2 float32 states"
    return states * grad_bytes, f"{states} state(s) in the trainable weights' dtype"


def grad_bytes(shape: Shape, s: Settings) -> int:
    """Bytes per gradient (and per AdamW state): float32 adapter weights, or the model's own dtype."""
    return 4 if s.adapter is not None else DTYPE_BYTES.get(shape.dtype, 4)


def estimate(shape: Shape, s: Settings) -> Estimate:
    w = DTYPE_BYTES.get(shape.dtype, 4)
    e = 2 if w == 2 or (s.quant and s.quant.get("compute_dtype") in ("bfloat16", "float16")) else 4
    notes = []
    other = shape.params - shape.linear
    if s.quant is None:
        weights = shape.params * w
    elif s.quant["bits"] == 8:
        weights = shape.linear * 1 + other * w
    else:
        # 4-bit: half a byte per weight, plus a float32 scale per 64 weights (8-bit scales + one float32 per
        # 256 of them with double quantization).
        scales = (1 / 64 + 4 / (64 * 256)) if s.quant.get("double_quant", True) else 4 / 64
        weights = shape.linear * (0.5 + scales) + other * w
    adapter_bytes = shape.trainable * 4 if s.adapter is not None else 0
    per_param, _ = optimizer_bytes(s.optim, grad_bytes(shape, s))

    h, i, kv = shape.hidden, shape.intermediate, shape.kv_width
    layer = e * (6 * h + 4 * i + 2 * kv) + 8 * h
    if s.adapter is not None:
        inputs = 6 * h + i  # inputs of the seven linear layers of a Llama block
        if e < 4:
            layer += 4 * inputs  # each adapted layer's input, cast to the float32 adapter
        if s.adapter.get("lora_dropout", 0):
            layer += 4 * inputs  # dropout's output on each of those inputs
    out = shape.vocab * (8 + e)  # logits, float32 log-probabilities and their gradient at the loss
    if s.checkpointing:
        acts = s.batch * s.seq_len * (shape.layers * h * e + layer + out)
    else:
        acts = s.batch * s.seq_len * (shape.layers * layer + out)

    n = max(s.processes, 1)
    grads, optim = shape.trainable * grad_bytes(shape, s), shape.trainable * per_param
    if n > 1 and s.backend != "ddp":
        optim /= n
        if s.backend != "zero1":
            grads /= n
        if s.backend in ("fsdp", "zero3", "zero3-offload"):
            gathered = shape.layer_params * w  # one layer's full weights while it computes
            weights = weights / n + gathered
            adapter_bytes /= n
        if s.backend == "zero3-offload":
            weights, optim = shape.layer_params * w, 0
            notes.append("zero3-offload keeps weights and optimizer states in CPU memory")
    terms = {"weights": weights, "adapter": adapter_bytes, "gradients": grads, "optimizer": optim,
             "activations": acts, "runtime": RUNTIME_OVERHEAD}
    return Estimate({k: int(v) for k, v in terms.items()}, notes)


def teacher_bytes(teacher: Shape, s: Settings) -> int:
    """A frozen teacher: its weights (loaded with the student's dtype and quantization), and its logits for the
    batch with their float32 log-probabilities (computed without gradients, alive for the divergence)."""
    weights = estimate(teacher, replace(s, adapter=None)).terms["weights"]
    e = 2 if DTYPE_BYTES.get(teacher.dtype, 4) == 2 else 4
    return int(weights + s.batch * s.seq_len * teacher.vocab * (e + 4))


def parse_size(text: str) -> int:
    """'24GiB', '24GB', '80G', '16000MiB' -> bytes (GB and G read as GiB, as GPU makers mean them)."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?)(i?B)?\s*", text, re.IGNORECASE)
    if not match:
        raise UserError(f"--gpu-memory {text}: expected a size such as 24GiB, 80GB or 16000MiB")
    unit = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}[match.group(2).upper()]
    return int(float(match.group(1)) * 1024 ** unit)


def suggestions(shape: Shape, s: Settings, budget: int) -> list[tuple[str, int]]:
    """Changes, applied one after another until the estimate fits, each with the total it gives."""
    steps = []  # (change, shape, settings) after that change and every one before it
    if not s.checkpointing:
        s = replace(s, checkpointing=True)
        steps.append(("`train.gradient_checkpointing: true`", shape, s))
    if "8bit" not in s.optim:
        s = replace(s, optim="paged_adamw_8bit")
        steps.append(("`train.optim: paged_adamw_8bit`", shape, s))
    while s.batch > 1 and estimate(shape, s).total > budget:
        s = replace(s, batch=s.batch // 2)
        steps.append((f"`train.per_device_train_batch_size: {s.batch}` (raise `gradient_accumulation_steps` as "
                       "much to keep the effective batch)", shape, s))
    if s.adapter is None:
        shape, s = replace(shape, trainable=16 * shape.lora_per_rank), replace(s, adapter={"type": "lora", "r": 16})
        steps.append(("an adapter (`adapter: {type: lora, r: 16}`) instead of full fine-tuning", shape, s))
    if s.quant is None:
        s = replace(s, quant={"bits": 4, "double_quant": True, "compute_dtype": "bfloat16"})
        steps.append(("a 4-bit base (`quantization: {bits: 4}`, QLoRA)", shape, s))
    for n in (2, 4, 8):
        if n > s.processes:
            steps.append((f"{n} GPUs with ZeRO-3 (`--num-processes {n} --backend zero3`)", shape,
                          replace(s, processes=n, backend="zero3")))
    out = []
    for text, changed_shape, settings in steps:
        total = estimate(changed_shape, settings).total
        out.append((text, total))
        if total <= budget:
            break
    return out


def gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB"
