"""The reference model of DPO and KTO, and its log-probs computed once and kept on disk.

With `precompute_ref_log_probs`, TRL runs the frozen reference model over every training (and
eval) row before training, but keeps the result only for the life of the process (trl#3985,
LLaMA-Factory#4810). The mixin below stores it under `<llmtune cache>/ref-logps/KEY.safetensors`,
KEY hashing everything that decides the numbers:

- the reference weights: the model with its trainable adapter left out (with an adapter the
  reference is the base with the adapter off, or the frozen "ref" copy of a stacked run adapter);
- the tokenized rows, in order (data files, mixing, seed, tokenizer and chat template all show here);
- the settings the trainer applies to them (`ref_settings`: truncation, precision, ...);

so a rerun, a resumed run or a run that only changes the loss (`loss_type`, `beta`) skips the pass.
Under DeepSpeed ZeRO-3 no process holds the whole reference to key it, so the pass always runs.
The hook is TRL's `_precompute_ref_logps(dataset, name, batch_size)`, identical in DPOTrainer and
KTOTrainer as of TRL 1.16.
"""

from __future__ import annotations

import hashlib
import json
import logging

from ..compat import RefLogpsHook
from ..files import atomic_path
from ..paths import cache_dir
from . import trl_datasets

log = logging.getLogger("llmtune")


def cache_path(key: str):
    return cache_dir() / "ref-logps" / f"{key}.safetensors"


def weights_digest(model) -> str:
    """sha256 over the reference's tensors; the trainable adapter ("default") does not count."""
    import torch

    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if ".default." in name:  # PEFT names every tensor of the trained adapter `*.default.*`
            continue
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def rows_digest(dataset) -> str:
    """sha256 over the token-id columns (`*_ids`) of a tokenized dataset, row order included."""
    import numpy as np

    digest = hashlib.sha256()
    columns = sorted(c for c in dataset.column_names if c.endswith("_ids"))
    digest.update(json.dumps([columns, len(dataset)]).encode())
    for batch in dataset.with_format("arrow").iter(batch_size=4096):
        for column in columns:
            values = batch.column(column).combine_chunks()
            digest.update(np.asarray(values.value_lengths(), dtype=np.int64).tobytes())
            digest.update(np.asarray(values.flatten(), dtype=np.int64).tobytes())
    return digest.hexdigest()


def defaults(train: dict) -> dict:
    """Precompute (and so cache) the reference pass, unless the recipe syncs the reference during
    training, which TRL refuses together with precomputing."""
    return {} if train.get("sync_ref_model") else {"precompute_ref_log_probs": True}


def build_trainer(trl_trainer, ref_settings, *, args, model, tokenizer, data, peft_config, callbacks,
                  ref_model=None):
    """`trl_trainer` (DPOTrainer, KTOTrainer) with its reference set up and its log-probs cached;
    `ref_settings` names the fields of its config that change the reference log-probs."""
    cached = type(f"Cached{trl_trainer.__name__}", (RefLogpsCache, trl_trainer), {"ref_settings": ref_settings})
    train, evals = trl_datasets(data, tokenizer)
    return cached(model=model, ref_model=reference(model, ref_model, peft_config, args), args=args,
                  train_dataset=train, eval_dataset=evals, processing_class=tokenizer,
                  peft_config=peft_config, callbacks=callbacks)


def reference(model, ref_model, peft_config, args):
    """The `ref_model` to hand TRL: the recipe's own; None where TRL needs no copy (an adapter is
    switched off, or the reference pass runs once before training); else a frozen copy of the
    starting model (TRL would reload it from its path, which misses an adapter merged in memory)."""
    from accelerate.utils import is_peft_model

    if ref_model is not None or peft_config is not None or is_peft_model(model) or args.precompute_ref_log_probs:
        return ref_model
    import copy

    return copy.deepcopy(model).requires_grad_(False).eval()


class RefLogpsCache(RefLogpsHook):
    """Mix into DPOTrainer/KTOTrainer (before it) to keep precomputed reference log-probs on disk."""

    ref_settings: tuple[str, ...] = ()  # fields of the trainer's args that change the reference log-probs

    def ref_logps(self, dataset, name, compute):
        import torch
        from accelerate.utils import broadcast_object_list

        # Rank 0 decides, so every process takes the same branch (a miss runs collective ops).
        path = [None, False]  # where the log-probs are kept, and whether they are there already
        if self.accelerator.is_main_process and not _partitioned(self.ref_model or self.model):
            path[0] = cache_path(self._ref_logps_key(dataset))
            path[1] = path[0].is_file()
        broadcast_object_list(path, from_process=0)
        path, found = path
        if found:
            log.info("reference log-probs of the %s set: loaded from %s", name, path)
            return _attach(dataset, path)

        # The pass draws from the global RNG (a DataLoader seed per iteration); restore it after, so
        # training shuffles the same whether the log-probs were computed or loaded.
        with torch.random.fork_rng(devices=[]):
            out = compute()
        if path is not None and self.accelerator.is_main_process:
            _store(path, {c: out[c] for c in out.column_names if c not in dataset.column_names})
            log.info("reference log-probs of the %s set: computed, cached in %s", name, path)
        return out

    def _ref_logps_key(self, dataset) -> str:
        if getattr(self, "_ref_weights_digest", None) is None:  # once per trainer: train and eval share it
            self._ref_weights_digest = weights_digest(self.ref_model or self.model)
        settings = {field: getattr(self.args, field, None) for field in self.ref_settings}
        parts = [type(self).__name__, self._ref_weights_digest, rows_digest(dataset),
                 json.dumps(settings, sort_keys=True, default=str)]
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]


def _partitioned(model) -> bool:
    """DeepSpeed ZeRO-3 loads each parameter as a shard: no one process sees the weights to key them."""
    return any(hasattr(p, "ds_numel") for p in model.parameters())


def _store(path, columns: dict) -> None:
    """Write then rename, so a concurrent or interrupted run never reads half a file."""
    import torch
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file({name: torch.tensor(values, dtype=torch.float32) for name, values in columns.items()}, str(tmp))


def _attach(dataset, path):
    from safetensors.torch import load_file

    for name, values in load_file(path).items():
        dataset = dataset.add_column(name, values.tolist())
    return dataset
