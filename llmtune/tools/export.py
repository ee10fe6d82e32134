"""After training: fold an adapter into its base (`merge`) and write GGUF for llama.cpp (`export`).

A QLoRA adapter was trained against the *dequantized* 4-bit weights, not the original
ones, so merging loads the base quantized exactly as in training, dequantizes it and
folds the adapter into that: the merged model computes what the adapter model computes.

GGUF is written with the `gguf` package (llama.cpp's own writer library), following
llama.cpp's `convert_hf_to_gguf.py` for each architecture in `GGUF_ARCHITECTURES`: tensor
names from gguf's per-architecture name map, Llama's q/k rows permuted to llama.cpp's
rotary layout, Gemma's norms shifted by one, norms kept in f32, and whatever llama.cpp
fixes for an architecture (Gemma's attention scale and sliding-window layers) checked
against the model's config rather than assumed.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from ..files import staged_folder, write_atomic, write_json
from ..runner.rundir import package_versions
from ..tokenizer import GENERATION_TAG, end_of_turn_token, stop_at_end_of_turn, stop_token_ids
from .infer import is_adapter, load
from .ollama import NotDecomposable, modelfile


@dataclass(frozen=True)
class GGUFArch:
    name: str  # llama.cpp's architecture (gguf.MODEL_ARCH_NAMES)
    permute_qk: bool = False  # llama.cpp's llama rotates interleaved pairs; the others rotate halves as HF does
    norm_shift: float = 0.0  # Gemma's RMSNorm scales by (1 + weight); llama.cpp's by the weight
    swa_pattern: int = 0  # llama.cpp fixes which layers slide: those with index % pattern < pattern - 1
    swa_rope_theta: float | None = None  # ... and the sliding layers' rope base


# Architectures the GGUF writer handles (transformers class -> how llama.cpp runs it). Mistral is
# llama to llama.cpp, as its converter writes it.
GGUF_ARCHITECTURES = {
    "LlamaForCausalLM": GGUFArch("llama", permute_qk=True),
    "MistralForCausalLM": GGUFArch("llama", permute_qk=True),
    "Qwen2ForCausalLM": GGUFArch("qwen2"),
    "Qwen3ForCausalLM": GGUFArch("qwen3"),
    "Gemma2ForCausalLM": GGUFArch("gemma2", norm_shift=1.0, swa_pattern=2),
    "Gemma3ForCausalLM": GGUFArch("gemma3", norm_shift=1.0, swa_pattern=6, swa_rope_theta=10000.0),
    "Phi3ForCausalLM": GGUFArch("phi3"),
}
# Layer counts at which llama.cpp takes a Gemma for its 27B size, whose attention scale is hidden/heads.
GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}
# --quant values: what `gguf` itself can write (k-quants need llama.cpp's `llama-quantize`).
GGUF_QUANTS = ("f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0")
# Pre-tokenizer splits (the regex in tokenizer.json) -> llama.cpp's name for the same split.
PRE_TOKENIZERS = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+": "llama-bpe",  # Llama 3
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+": "qwen2",  # Qwen2, Qwen2.5, Qwen3: digits one by one
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?"
    r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+": "tekken",  # Mistral NeMo, Ministral
}


def _fresh_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UserError(f"{out}: output directory is not empty; pass --out DIR for another one or --overwrite")


def merged_model(run_dir: Path):
    """(model, tokenizer, recipe, notes): the run's model with any adapter folded in, in memory."""
    loaded = load(run_dir, quantized=False)
    notes = list(loaded.notes)
    model = loaded.model
    if loaded.adapter:
        config = model.peft_config["default"]
        if config.is_prompt_learning:
            raise UserError(f"{run_dir}: a {config.peft_type.value.lower().replace('_', ' ')} adapter adds virtual "
                            "tokens rather than weight updates: there is nothing to fold into the base; use the run "
                            "directory as it is (`llmtune generate` loads it)")
        kind = "DoRA" if getattr(config, "use_dora", False) else config.peft_type.value.replace("LORA", "LoRA")
        model = model.merge_and_unload()
        notes.append(f"folded the {kind} adapter into the base")
    return model, loaded.tokenizer, loaded.recipe, notes


def merge(run_dir, out=None, overwrite: bool = False, dtype: str | None = None) -> tuple[Path, list[str]]:
    """Write the run's adapter merged into its base as a full model folder (default RUN_DIR/merged), in `dtype`
    (`bfloat16`, `float16`, `float32`; None: the dtype the run loaded the model in)."""
    run_dir = Path(run_dir)
    if not is_adapter(run_dir):
        raise UserError(f"{run_dir}: holds a full model (config.json, no adapter_config.json); there is nothing to "
                        "merge, use the directory as it is")
    out = Path(out) if out else run_dir / "merged"
    _fresh_dir(out, overwrite)
    model, tokenizer, recipe, notes = merged_model(run_dir)
    if dtype is not None:
        import torch

        model = model.to(getattr(torch, dtype))
        notes.append(f"saved in {dtype}")
    stop_at_end_of_turn(model, tokenizer)
    with staged_folder(out) as tmp:  # an interrupted merge leaves nothing half-written
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)  # with the chat template used in training
        if (run_dir / "recipe.yaml").is_file():
            shutil.copy2(run_dir / "recipe.yaml", tmp / "recipe.yaml")
        write_json(tmp / "manifest.json",
                   {"merged_from": str(run_dir.resolve()), "notes": notes, "packages": package_versions()})
    return out, notes


def _permute(weights, n_head: int):
    """HF's rotate-half q/k layout to llama.cpp's interleaved one (as convert_hf_to_gguf.py does)."""
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def _llama3_rope_factors(rope: dict, head_dim: int):
    """Per-frequency factors llama.cpp reads from `rope_freqs.weight` for Llama 3 rope scaling."""
    import numpy as np

    freqs = 1.0 / (rope["rope_theta"] ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    factor, low, high = rope.get("factor", 8.0), rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old = rope.get("original_max_position_embeddings", 8192)
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def _check_arch(run_dir: Path, arch: GGUFArch, config, head_dim: int) -> tuple[dict, list[str]]:
    """(rope parameters of the full-attention layers, notes); UserError where llama.cpp would compute otherwise."""
    def refuse(what: str):
        raise UserError(f"{run_dir}: GGUF export: {what}, so llama.cpp would not compute what this model computes; "
                        "convert the output of `llmtune merge` with llama.cpp's convert_hf_to_gguf.py if it handles it")

    params = getattr(config, "rope_parameters", None) or {}
    rope = params.get("full_attention", params)  # Gemma 3 keeps one set per layer type
    rope_type = rope.get("rope_type", "default")
    if rope_type not in ("default", "linear") and not (rope_type == "llama3" and arch.name == "llama"):
        refuse(f"rope scaling '{rope_type}' is not handled (default, linear and Llama 3's are)")
    notes = []
    if arch.swa_pattern:  # llama.cpp fixes which layers slide and how their queries are scaled
        expected = ["sliding_attention" if i % arch.swa_pattern < arch.swa_pattern - 1 else "full_attention"
                    for i in range(config.num_hidden_layers)]
        if list(config.layer_types) != expected:
            refuse(f"its layer_types are not llama.cpp's fixed {arch.name} pattern (one full-attention layer in "
                   f"{arch.swa_pattern})")
        scale_dim = config.hidden_size // config.num_attention_heads \
            if config.num_hidden_layers == GEMMA_27B_LAYERS[arch.name] else head_dim
        if config.query_pre_attn_scalar != scale_dim:
            refuse(f"query_pre_attn_scalar is {config.query_pre_attn_scalar}; llama.cpp scales queries by "
                   f"{scale_dim} for this shape")
        local = params.get("sliding_attention", rope)
        if arch.swa_rope_theta and (local.get("rope_type", "default") != "default"
                                    or local.get("rope_theta") != arch.swa_rope_theta):
            refuse(f"its sliding layers' rope is not llama.cpp's fixed {arch.name} rope (theta "
                   f"{arch.swa_rope_theta:g}, unscaled)")
        if getattr(config, "attn_logit_softcapping", None) and arch.name != "gemma2":
            refuse("it caps attention logits")
    elif getattr(config, "use_sliding_window", False):
        refuse("it attends through a sliding window")
    elif getattr(config, "sliding_window", None) and arch.name == "llama":
        notes.append(f"the model attends over a sliding window of {config.sliding_window} tokens; llama.cpp "
                     "attends over the whole context, so longer prompts are answered differently")
    return rope, notes


def _add_arch_metadata(writer, arch: GGUFArch, config, rope: dict, head_dim: int) -> None:
    """The architecture's own hyperparameters, as llama.cpp's converter writes them."""
    import gguf

    writer.add_rope_freq_base(rope.get("rope_theta", 10000.0))
    if rope.get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    # Phi-3 rotates only part of each head.
    writer.add_rope_dimension_count(int(head_dim * rope.get("partial_rotary_factor", 1.0)))
    if arch.swa_pattern or arch.name == "phi3":
        writer.add_sliding_window(getattr(config, "sliding_window", None) or 0)  # 0: no window (Phi-4)
    if arch.name == "phi3" and "original_max_position_embeddings" in rope:
        writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
    if getattr(config, "attn_logit_softcapping", None):
        writer.add_attn_logit_softcapping(config.attn_logit_softcapping)
    if getattr(config, "final_logit_softcapping", None):
        writer.add_final_logit_softcapping(config.final_logit_softcapping)


def _pre_tokenizer(spec: dict) -> str:
    """llama.cpp's name for a byte-level BPE tokenizer's pre-tokenizer (how text is split before merges)."""
    pre = spec.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre])
    splits = [p["pattern"].get("Regex") for p in parts if p.get("type") == "Split"]
    if len(splits) == 1 and splits[0] in PRE_TOKENIZERS:
        return PRE_TOKENIZERS[splits[0]]
    byte_level = [p for p in parts if p.get("type") == "ByteLevel"]
    if not splits and byte_level and byte_level[0].get("use_regex", True):
        return "gpt-2"
    if not splits and not spec["model"].get("merges"):
        return "default"  # no merges: every byte is its own token however the text is split
    raise UserError("GGUF export: this tokenizer's pre-tokenizer is not one llmtune can name for llama.cpp "
                    "(supported: Llama 3's, Qwen2's, Tekken's, GPT-2's, or byte-level without merges); convert with "
                    "llama.cpp's convert_hf_to_gguf.py on the output of `llmtune merge`")


def _adds_special(tokenizer) -> dict:
    """What the tokenizer itself adds when encoding (the tiny one adds nothing: its template writes <s>)."""
    probe = tokenizer("x")["input_ids"]
    return {"bos": probe[0] == tokenizer.bos_token_id, "eos": probe[-1] == tokenizer.eos_token_id}


def _add_tokenizer(writer, tokenizer, folder: Path, vocab_size: int) -> list[str]:
    import gguf

    spec = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    if spec["model"].get("type") != "BPE" or not any(
            p.get("type") == "ByteLevel" for p in [spec.get("decoder") or {}] + (spec["decoder"] or {}).get(
                "decoders", [])):
        kind = "SentencePiece-style BPE with byte fallback (Llama 2, Mistral v0.1-v0.3, Gemma, Phi-3)" \
            if spec["model"].get("byte_fallback") else spec["model"].get("type")
        raise UserError("GGUF export supports byte-level BPE tokenizers (GPT-2, Llama 3, Qwen, Mistral NeMo style); "
                        f"this one is {kind}; convert with llama.cpp's convert_hf_to_gguf.py on the output of "
                        "`llmtune merge`")
    added = {t["id"]: t for t in spec.get("added_tokens", [])}
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL if i not in added else
                         gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer(spec))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    merges = bool(spec["model"].get("merges"))
    if not merges:
        # llama.cpp refuses a BPE vocabulary without merges, and gguf cannot write an empty list. "~~" is no
        # token, so llama.cpp splits the merged pair back into its two bytes: the merge changes nothing.
        writer.add_token_merges(["~ ~"])
    special = gguf.SpecialVocab(folder, load_merges=merges, n_vocab=vocab_size)
    special.add_special_token.update(_adds_special(tokenizer))
    notes = []
    template = tokenizer.chat_template
    if template:
        # `{% generation %}` only marks trained tokens; llama.cpp's template engine does not know the tag.
        special.chat_template = GENERATION_TAG.sub("", template)
        notes.append("chat template embedded (training-only {% generation %} tags removed)")
    special.add_to_gguf(writer, quiet=True)

    turn = end_of_turn_token(tokenizer) if template else None
    if turn and turn[0] != tokenizer.eos_token_id:  # llama.cpp also stops at the end-of-turn token
        writer.add_eot_token_id(turn[0])
        notes.append(f"end-of-turn token {turn[1]!r} recorded as eot_token_id")
    return notes


def export_gguf(run_dir, out=None, quant: str = "f16", overwrite: bool = False,
                ollama: bool = True) -> tuple[Path, list[str], list[str]]:
    """Write the run's model (adapter merged in memory) as one GGUF file for llama.cpp: (path, notes, warnings).

    With `ollama`, an Ollama Modelfile goes next to it (NAME.Modelfile beside NAME.gguf, so exports of
    several quants do not overwrite each other's), when the chat template can be written as one.
    """
    import gguf
    import numpy as np
    import torch

    run_dir = Path(run_dir)
    if quant not in GGUF_QUANTS:
        raise UserError(f"--quant {quant}: not one of {', '.join(GGUF_QUANTS)} (k-quants such as q4_k_m: run "
                        "llama.cpp's llama-quantize on an f16 export)")

    is_adapter(run_dir)  # a clear error for a folder that holds no model
    model, tokenizer, recipe, notes = merged_model(run_dir)
    config = model.config
    arch = next((GGUF_ARCHITECTURES[a] for a in (config.architectures or []) if a in GGUF_ARCHITECTURES), None)
    if arch is None:
        raise UserError(f"{run_dir}: GGUF export supports the {', '.join(GGUF_ARCHITECTURES)} architectures; this "
                        f"model is {', '.join(config.architectures or ['unknown'])}. Run `llmtune merge` and "
                        "convert the merged folder with llama.cpp's convert_hf_to_gguf.py")
    n_head, n_kv = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    rope, more_notes = _check_arch(run_dir, arch, config, head_dim)
    notes += more_notes
    name = (recipe or {}).get("name") or run_dir.name
    out = Path(out) if out else run_dir / f"{name}-{quant}.gguf"
    modelfile = out.with_suffix(".Modelfile") if ollama else None
    for path in (out, modelfile):
        if path and path.exists() and not overwrite:
            raise UserError(f"{path}: file exists; pass --out FILE or --overwrite")

    qtype = gguf.GGMLQuantizationType[quant.upper()]
    file_type = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16"}.get(quant, f"MOSTLY_{quant.upper()}")
    tmp = out.with_name(f".{out.name}.tmp")
    writer = gguf.GGUFWriter(tmp, arch.name)
    writer.add_type("model")
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(getattr(gguf.LlamaFileType, file_type))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_arch_metadata(writer, arch, config, rope, head_dim)
    notes += _add_tokenizer(writer, tokenizer, run_dir, config.vocab_size)

    names = gguf.get_tensor_name_map(next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch.name),
                                     config.num_hidden_layers)
    fallback = 0
    if rope.get("rope_type") == "llama3":
        writer.add_tensor("rope_freqs.weight", _llama3_rope_factors(rope, head_dim))
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # llama.cpp reuses token_embd when there is no output tensor
        target = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if target is None:
            raise UserError(f"GGUF export: no llama.cpp name for tensor '{hf_name}'")
        data = tensor.detach().to(torch.float32).cpu().numpy()
        if arch.permute_qk and hf_name.endswith("q_proj.weight"):
            data = _permute(data, n_head)
        elif arch.permute_qk and hf_name.endswith("k_proj.weight"):
            data = _permute(data, n_kv)
        elif arch.norm_shift and hf_name.endswith("norm.weight"):
            data = data + arch.norm_shift
        if data.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(target, data)  # norms and biases stay f32, as llama.cpp's converter keeps them
        elif qtype == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(target, data.astype(np.float16))
        else:
            try:
                writer.add_tensor(target, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
            except gguf.quants.QuantError:  # rows not a multiple of the block size
                writer.add_tensor(target, data.astype(np.float16))
                fallback += 1
    if fallback:
        notes.append(f"{fallback} tensor(s) kept in f16: their rows do not divide into {quant} blocks")
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    warnings = []
    if ollama:
        warnings = _write_modelfile(modelfile, out, model, tokenizer, notes)
    return out, notes, warnings


def _write_modelfile(path: Path, gguf_file: Path, model, tokenizer, notes: list[str]) -> list[str]:
    """Write the Ollama Modelfile for `gguf_file`; else the warning saying why not."""
    try:
        text, more = modelfile(tokenizer, gguf_file, stop_token_ids(model, tokenizer), _adds_special(tokenizer)["bos"])
    except NotDecomposable as err:
        return [f"no Ollama Modelfile: {err}"]
    write_atomic(path, text)
    notes += more + [f"wrote {path} (for Ollama: ollama create NAME -f {path})"]
    return []
