"""llmtune's PPO trainer: the rollout / score / GAE / clipped-update loop around a `transformers.Trainer`.

The Trainer supplies what every method shares: the accelerator (DDP across processes),
optimizer and schedule from the config, callbacks (metrics.jsonl, progress bar),
checkpoint saving and loading, and `save_model`. `train` is PPO's own loop.
The math lives in ppo_core.py.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time

import torch
from torch import nn
from transformers import GenerationConfig, Trainer, TrainerState
from transformers.trainer_callback import ExportableState
from transformers.trainer_utils import TrainOutput, get_last_checkpoint

from ..compat import KeepColumns
from . import ppo_core as core

VALUE_WEIGHTS = "value_model.safetensors"  # a file, not a folder: Trainer would take an adapter folder for the policy's
PPO_STATE = "ppo_state.json"


def value_estimates(model, input_ids, attention_mask, position_ids) -> torch.Tensor:
    """A sequence-classification model's score head applied at every position, not only the last."""
    inner = model.get_base_model() if hasattr(model, "peft_config") else model
    backbone = getattr(inner, inner.base_model_prefix)
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                      use_cache=False).last_hidden_state
    return inner.score(hidden).squeeze(-1).float()


class PolicyAndValue(nn.Module):
    """Policy and value model as one module, so one backward through DDP synchronises both."""

    def __init__(self, policy, value):
        super().__init__()
        self.policy = policy
        self.value = value

    def forward(self, input_ids, attention_mask, position_ids):
        logits = self.policy(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             use_cache=False).logits
        return logits, value_estimates(self.value, input_ids, attention_mask, position_ids)


def pad(rows: list[list[int]], value: int, left: bool) -> torch.Tensor:
    width = max(len(row) for row in rows)
    return torch.tensor([[value] * (width - len(r)) + r if left else r + [value] * (width - len(r)) for r in rows])


def disable_dropout(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


class PPOTrainer(KeepColumns, Trainer):
    keep_columns = ("input_ids", "prompt")  # the prompt text is what the reward model reads

    def __init__(self, *, args, model, ref_model, value_model, reward_model, reward_tokenizer, processing_class,
                 train_dataset, eval_dataset=None, callbacks=None):
        """`model` is the policy (a PeftModel when training an adapter, whose reference is the
        same model with the adapter disabled; otherwise `ref_model` is a frozen copy)."""
        self.value_model, self.ref_model = value_model, ref_model
        self.reward_model, self.reward_tokenizer = reward_model, reward_tokenizer
        tokenizer = processing_class
        self.stop_ids = stop_token_ids(args.stop_token, tokenizer, model)
        train_dataset = self._tokenized(train_dataset, tokenizer, args.max_length)
        if eval_dataset is not None:
            eval_dataset = self._tokenized(eval_dataset, tokenizer, args.max_length)
        super().__init__(model=model, args=args, data_collator=self._collate, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=tokenizer, callbacks=callbacks)
        for other in (ref_model, reward_model, value_model):
            if other is not None and not quantized(other):  # bitsandbytes placed those while loading
                other.to(self.accelerator.device)
        if args.disable_dropout:
            disable_dropout(model)
            disable_dropout(value_model)
        self.kl_coef = args.kl_coef
        self.kl_controller = (core.AdaptiveKLController(args.kl_coef, args.kl_target, args.kl_horizon)
                              if args.kl_target is not None else None)
        self.generation_config = GenerationConfig(
            max_new_tokens=args.response_length, do_sample=True, temperature=args.temperature, top_k=0, top_p=1.0,
            eos_token_id=self.stop_ids or None, pad_token_id=tokenizer.pad_token_id,
            # Without a stop token every response runs to its full length.
            min_new_tokens=None if self.stop_ids else args.response_length)

    # -- data --------------------------------------------------------------------------------

    @staticmethod
    def _tokenized(dataset, tokenizer, max_length):
        def tokenize(row):
            prompt = row["prompt"]
            if isinstance(prompt, list):  # conversational: rendered up to the assistant's turn
                ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True,
                                                    return_dict=True)["input_ids"]
            else:
                ids = tokenizer(prompt)["input_ids"]
            return {"input_ids": ids[-max_length:] if max_length else ids}

        return dataset.map(tokenize)

    def _collate(self, rows):
        ids = pad([row["input_ids"] for row in rows], self.processing_class.pad_token_id, left=True)
        mask = pad([[1] * len(row["input_ids"]) for row in rows], 0, left=True)
        return {"input_ids": ids, "attention_mask": mask, "prompt": [row["prompt"] for row in rows]}

    # -- rollouts --------------------------------------------------------------------------

    def _micro_batches(self, size: int):
        step = self.args.per_device_train_batch_size // (self.args.num_mini_batches *
                                                         self.args.gradient_accumulation_steps)
        return [slice(i, i + step) for i in range(0, size, step)]

    @torch.no_grad()
    def _generate(self, batch):
        """(query + response ids, attention mask over both, position ids, response mask)."""
        queries, query_mask = batch["input_ids"], batch["attention_mask"]
        self.model.eval()
        with self.accelerator.autocast():
            sequences = self.model.generate(input_ids=queries, attention_mask=query_mask,
                                            generation_config=self.generation_config)
        self.model.train()
        mask = core.response_mask(sequences[:, queries.shape[1]:], self.stop_ids)
        attention = torch.cat([query_mask, mask.long()], dim=1)
        positions = (attention.cumsum(1) - 1).clamp(min=0)
        return sequences, attention, positions, mask

    def _response_logprobs(self, model, sequences, attention, positions, n_query):
        logits = model(input_ids=sequences, attention_mask=attention, position_ids=positions, use_cache=False).logits
        logits = logits[:, n_query - 1:-1] / (self.args.temperature + 1e-7)
        return core.token_logprobs(logits, sequences[:, n_query:])

    @torch.no_grad()
    def reference_logprobs(self, sequences, attention, positions, n_query):
        """Log-probs of the responses under the reference: the frozen copy, or the policy without its adapter."""
        with self.accelerator.autocast():
            if self.ref_model is not None:
                return self._response_logprobs(self.ref_model, sequences, attention, positions, n_query)
            with self.model.disable_adapter():
                return self._response_logprobs(self.model, sequences, attention, positions, n_query)

    @torch.no_grad()
    def _scores(self, prompts, responses, mask):
        """The reward model's score of each response, formatted as `llmtune reward` (TRL's RewardTrainer)
        formats its training pairs: the chat template for conversations, else text + EOS."""
        keep = mask.bool() & ~torch.isin(responses, torch.tensor(self.stop_ids or [-1], device=responses.device))
        tok = self.reward_tokenizer
        rows = []
        for prompt, response, kept in zip(prompts, responses, keep):
            completion = self.processing_class.decode(response[kept], skip_special_tokens=True)
            if isinstance(prompt, list):
                rows.append(tok.apply_chat_template(prompt + [{"role": "assistant", "content": completion}],
                                                    tokenize=True, return_dict=True)["input_ids"])
            else:
                text = prompt + completion
                rows.append(tok(text if text.endswith(tok.eos_token) else text + tok.eos_token)["input_ids"])
        ids = pad(rows, tok.pad_token_id, left=False).to(responses.device)
        attention = pad([[1] * len(r) for r in rows], 0, left=False).to(responses.device)
        with self.accelerator.autocast():
            scores = self.reward_model(input_ids=ids, attention_mask=attention).logits[:, 0].float()
        if self.args.missing_eos_penalty is not None and self.stop_ids:
            stopped = (torch.isin(responses, torch.tensor(self.stop_ids, device=responses.device)) & mask.bool()).any(1)
            scores = scores - self.args.missing_eos_penalty * (~stopped).float()
        return scores

    @torch.no_grad()
    def _rollout(self, batch) -> dict:
        args = self.args
        sequences, attention, positions, mask = self._generate(batch)
        n_query = batch["input_ids"].shape[1]
        responses = sequences[:, n_query:]
        logprobs, ref_logprobs, values = [], [], []
        for part in self._micro_batches(len(sequences)):
            inputs = (sequences[part], attention[part], positions[part])
            with self.accelerator.autocast():
                logprobs.append(self._response_logprobs(self.model, *inputs, n_query))
                values.append(value_estimates(self.value_model, *inputs)[:, n_query - 1:-1])
            ref_logprobs.append(self.reference_logprobs(*inputs, n_query))
        logprobs, ref_logprobs, values = torch.cat(logprobs), torch.cat(ref_logprobs), torch.cat(values)
        logprobs = torch.where(mask.bool(), logprobs, core.INVALID_LOGPROB)
        values = values * mask
        scores = self._scores(batch["prompt"], responses, mask)

        kl = core.kl_per_token(logprobs, ref_logprobs, args.kl_estimator) * mask
        rewards, non_score = core.shaped_rewards(scores, kl, mask, self.kl_coef)
        if args.whiten_rewards:
            rewards = core.masked_whiten(rewards, mask, shift_mean=False) * mask
        advantages, returns = core.gae(rewards, values, mask, args.gamma, args.lam)
        if args.whiten_advantages:
            advantages = core.masked_whiten(advantages, mask) * mask
        return dict(sequences=sequences, attention=attention, positions=positions, mask=mask, n_query=n_query,
                    logprobs=logprobs, values=values, advantages=advantages, returns=returns, scores=scores,
                    kl=kl.sum(1), non_score=non_score.sum(1))

    # -- updates ---------------------------------------------------------------------------

    def _update(self, wrapped, roll: dict) -> dict:
        """`num_ppo_epochs` passes of clipped policy + value updates over the rollout batch."""
        args, n_query = self.args, roll["n_query"]
        size = len(roll["sequences"])
        mini = max(size // args.num_mini_batches, 1)
        sums: dict[str, float] = {}
        count = 0
        grad_norms = []
        for _ in range(args.num_ppo_epochs):
            order = torch.randperm(size, device=roll["sequences"].device)
            for start in range(0, size, mini):
                parts = self._micro_batches(mini)
                for i, part in enumerate(parts):
                    idx = order[start:start + mini][part]
                    last = i == len(parts) - 1
                    with (contextlib.nullcontext() if last else self.accelerator.no_sync(wrapped)):
                        stats, loss = self._losses(wrapped, roll, idx, n_query)
                        self.accelerator.backward(loss / len(parts))
                    for key, value in stats.items():
                        sums[key] = sums.get(key, 0.0) + value
                    count += 1
                if args.max_grad_norm and args.max_grad_norm > 0:
                    grad_norms.append(float(self.accelerator.clip_grad_norm_(wrapped.parameters(), args.max_grad_norm)))
                self.optimizer.step()
                self.optimizer.zero_grad()
        out = {key: value / count for key, value in sums.items()}
        if grad_norms:
            out["grad_norm"] = sum(grad_norms) / len(grad_norms)
        return out

    def _losses(self, wrapped, roll, idx, n_query):
        args = self.args
        mask = roll["mask"][idx]
        logits, values = wrapped(roll["sequences"][idx], roll["attention"][idx], roll["positions"][idx])
        logits = logits[:, n_query - 1:-1] / (args.temperature + 1e-7)
        logprobs = core.token_logprobs(logits, roll["sequences"][idx][:, n_query:])
        pg_loss, pg_clipfrac, approx_kl = core.policy_loss(logprobs, roll["logprobs"][idx], roll["advantages"][idx],
                                                           mask, args.cliprange)
        vf_loss, vf_clipfrac = core.value_loss(values[:, n_query - 1:-1], roll["values"][idx], roll["returns"][idx],
                                               mask, args.cliprange_value)
        loss = pg_loss + args.vf_coef * vf_loss
        with torch.no_grad():
            entropy = core.masked_mean(core.entropy_from_logits(logits.float()), mask)
            ratio = core.masked_mean(torch.exp(logprobs - roll["logprobs"][idx]), mask)
        stats = {"loss": loss, "policy_loss": pg_loss, "value_loss": vf_loss, "policy_clipfrac": pg_clipfrac,
                 "value_clipfrac": vf_clipfrac, "approx_kl": approx_kl, "entropy": entropy, "ratio": ratio}
        return {k: float(v.detach()) for k, v in stats.items()}, loss

    # -- the loop ----------------------------------------------------------------------------

    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None, **kwargs):
        args = self.args
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"no checkpoint found in {args.output_dir}")
        dataloader = self.get_train_dataloader()
        per_epoch = len(dataloader)
        if per_epoch == 0:
            raise ValueError(f"{len(self.train_dataset)} prompts do not fill one batch of "
                             f"{args.per_device_train_batch_size} prompts x {args.world_size} process(es); lower "
                             "`train.per_device_train_batch_size` or add prompts")
        max_steps = args.max_steps if args.max_steps > 0 else math.ceil(args.num_train_epochs * per_epoch)

        if args.activation_checkpointing:
            for model in (self.model, self.value_model):
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
                if hasattr(model, "enable_input_require_grads"):
                    model.enable_input_require_grads()
        wrapper = PolicyAndValue(self.model, self.value_model).train()
        self.create_optimizer(wrapper)
        wrapped, self.optimizer = self.accelerator.prepare(wrapper, self.optimizer)
        self.model_wrapped = wrapped
        self.create_scheduler(max_steps, optimizer=self.optimizer)

        self.state = TrainerState(stateful_callbacks=[
            cb for cb in self.callback_handler.callbacks + [self.control] if isinstance(cb, ExportableState)])
        if resume_from_checkpoint:
            self._resume(resume_from_checkpoint)
        self.state.compute_steps(args, max_steps)
        self.state.init_training_references(self, max_steps, args.num_train_epochs, trial)
        for attr in ("model", "optimizer", "lr_scheduler"):
            setattr(self.callback_handler, attr, getattr(self, attr))
        self.callback_handler.train_dataloader = dataloader

        start = time.time()
        first_step = self.state.global_step
        self.control = self.callback_handler.on_train_begin(args, self.state, self.control)
        window: dict[str, float] = {}
        window_steps, window_tokens, window_start = 0, 0.0, time.time()
        losses = []
        epoch = first_step // per_epoch
        while self.state.global_step < max_steps and not self.control.should_training_stop:
            skip = self.state.global_step - epoch * per_epoch
            if hasattr(dataloader, "set_epoch"):
                dataloader.set_epoch(epoch)
            batches = self.accelerator.skip_first_batches(dataloader, skip) if skip else dataloader
            if resume_from_checkpoint and not skip:
                self._load_rng_state(resume_from_checkpoint)
            self.control = self.callback_handler.on_epoch_begin(args, self.state, self.control)
            for i, batch in enumerate(batches, start=skip):
                if resume_from_checkpoint and skip:
                    # As in Trainer: starting a partly skipped epoch drew from the RNGs; restore them after.
                    self._load_rng_state(resume_from_checkpoint)
                resume_from_checkpoint = None
                self.control = self.callback_handler.on_step_begin(args, self.state, self.control)
                stats, tokens = self._step(wrapped, batch)
                losses.append(stats["loss"])
                for key, value in stats.items():
                    window[key] = window.get(key, 0.0) + value
                window_steps += 1
                window_tokens += tokens
                learning_rate = self._get_learning_rate()  # the rate this step used
                self.lr_scheduler.step()
                self.state.global_step += 1
                self.state.epoch = epoch + (i + 1) / per_epoch
                self.control = self.callback_handler.on_step_end(args, self.state, self.control)
                if self.control.should_log:
                    logs = {key: value / window_steps for key, value in window.items()}
                    logs["tokens_per_second"] = window_tokens / (time.time() - window_start)
                    logs["learning_rate"] = learning_rate
                    self.log(logs)
                    window, window_steps, window_tokens, window_start = {}, 0, 0.0, time.time()
                if self.control.should_evaluate and self.eval_dataset is not None:
                    self.evaluate()
                if self.control.should_save:
                    self._save_checkpoint(wrapped, trial)
                    self.control = self.callback_handler.on_save(args, self.state, self.control)
                if self.control.should_training_stop or self.state.global_step >= max_steps:
                    break
            self.control = self.callback_handler.on_epoch_end(args, self.state, self.control)
            epoch += 1

        runtime = time.time() - start
        steps = self.state.global_step - first_step
        metrics = {"train_runtime": runtime, "train_steps_per_second": steps / runtime if runtime else 0.0,
                   "train_loss": sum(losses) / len(losses) if losses else float("nan")}
        self.log(dict(metrics))
        self.control = self.callback_handler.on_train_end(args, self.state, self.control)
        return TrainOutput(self.state.global_step, metrics["train_loss"], metrics)

    def _step(self, wrapped, batch) -> tuple[dict, float]:
        """One PPO step on a batch of prompts: (metrics averaged over processes, response tokens generated)."""
        roll = self._rollout(batch)
        stats = self._update(wrapped, roll)
        lengths = roll["mask"].sum(1)
        local = {
            "reward": roll["scores"].mean(), "non_score_reward": roll["non_score"].mean(), "kl": roll["kl"].mean(),
            "rlhf_reward": (roll["scores"] + roll["non_score"]).mean(), "response_length": lengths.mean(),
        }
        device = roll["scores"].device
        merged = {k: self.accelerator.reduce(v.detach().float(), "mean") for k, v in local.items()}
        merged.update({k: self.accelerator.reduce(torch.tensor(v, device=device), "mean") for k, v in stats.items()})
        all_scores = self.accelerator.gather(roll["scores"].detach())
        out = {k: float(v) for k, v in merged.items()}
        out["reward_std"] = float(all_scores.std()) if len(all_scores) > 1 else 0.0
        out["kl_coef"] = self.kl_coef
        tokens = float(self.accelerator.gather(lengths.sum().reshape(1)).sum())
        if self.kl_controller is not None:
            self.kl_controller.update(out["kl"], len(all_scores))
            self.kl_coef = self.kl_controller.value
        return out, tokens

    # -- evaluation, saving, resuming --------------------------------------------------------

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict:
        """Mean and spread of the reward model's scores of responses sampled for the eval prompts."""
        scores, lengths = [], []
        for batch in self.get_eval_dataloader(eval_dataset):
            sequences, _, _, mask = self._generate(batch)
            responses = sequences[:, batch["input_ids"].shape[1]:]
            scores.append(self.accelerator.gather(self._scores(batch["prompt"], responses, mask)))
            lengths.append(self.accelerator.gather(mask.sum(1)))
        if not scores:  # fewer eval prompts than one batch (`dataloader_drop_last`)
            logging.getLogger("llmtune").warning("no full batch of eval prompts: nothing evaluated")
            return {}
        scores, lengths = torch.cat(scores), torch.cat(lengths).float()
        metrics = {f"{metric_key_prefix}_reward": float(scores.mean()),
                   f"{metric_key_prefix}_reward_std": float(scores.std()) if len(scores) > 1 else 0.0,
                   f"{metric_key_prefix}_response_length": float(lengths.mean())}
        self.log(dict(metrics))
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """The policy (adapter or full model) and tokenizer; a checkpoint also keeps the value
        model's trained weights and the KL coefficient, which resuming needs."""
        super().save_model(output_dir, _internal_call)
        if _internal_call and self.args.should_save:
            from safetensors.torch import save_file

            trained = {name: p.detach().contiguous().cpu() for name, p in self.value_model.named_parameters()
                       if p.requires_grad}
            save_file(trained, os.path.join(output_dir, VALUE_WEIGHTS))
            with open(os.path.join(output_dir, PPO_STATE), "w", encoding="utf-8") as out:
                json.dump({"kl_coef": self.kl_coef}, out)

    def _resume(self, checkpoint: str) -> None:
        from safetensors.torch import load_file

        self._load_from_checkpoint(checkpoint)
        missing = set(load_file(os.path.join(checkpoint, VALUE_WEIGHTS))) - {
            name for name, _ in self.value_model.named_parameters()}
        if missing:
            raise ValueError(f"{checkpoint}: value model weights do not match this recipe's value model")
        self.value_model.load_state_dict(load_file(os.path.join(checkpoint, VALUE_WEIGHTS),
                                                   device=str(self.accelerator.device)), strict=False)
        with open(os.path.join(checkpoint, PPO_STATE), encoding="utf-8") as f:
            self.kl_coef = json.load(f)["kl_coef"]
        if self.kl_controller is not None:
            self.kl_controller.value = self.kl_coef
        self.state = TrainerState.load_from_json(os.path.join(checkpoint, "trainer_state.json"))
        self._load_callback_state()
        self._load_optimizer_and_scheduler(checkpoint)


def quantized(model) -> bool:
    return getattr(model, "is_quantized", False) or getattr(getattr(model, "base_model", None), "is_quantized", False)


def stop_token_ids(stop_token: str | None, tokenizer, model) -> list[int]:
    """Token ids that end a response (see PPOConfig.stop_token)."""
    if stop_token is None:
        return []
    if stop_token != "eos":
        return [tokenizer.convert_tokens_to_ids(stop_token)]
    ids = model.generation_config.eos_token_id
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    return sorted({tokenizer.eos_token_id, *ids} - {None})
