"""PPO: the math against hand-computed values, and end-to-end runs on the builtin tiny model
scored by a small hand-built reward model that likes lowercase letters."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llmtune.methods import ppo_core as core
from llmtune.recipe.check import resolve
from llmtune.runner.session import train as run

from .conftest import ROOT, cli, make_recipe, write_jsonl

# -- the PPO arithmetic, on small cases worked out by hand -------------------------------------


def test_gae_matches_hand_computed_values():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 9.0]])
    values = torch.tensor([[0.5, 0.6, 0.7], [0.5, 1.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])  # row 2 ends after 2 tokens; its 9s are padding
    advantages, returns = core.gae(rewards, values, mask, gamma=0.9, lam=0.8)
    # row 1: d2 = 1 - .7 = .3; d1 = .9*.7 - .6 = .03; d0 = .9*.6 - .5 = .04; A_t = d_t + .72 A_t+1
    # row 2: the bootstrap stops at the end: d1 = 2 - 1 = 1; d0 = .9*1 - .5 = .4
    torch.testing.assert_close(advantages, torch.tensor([[0.21712, 0.246, 0.3], [1.12, 1.0, 0.0]]))
    torch.testing.assert_close(returns, torch.tensor([[0.71712, 0.846, 1.0], [1.62, 2.0, 0.0]]))


def test_whitening_uses_only_unmasked_values():
    values = torch.tensor([1.0, 2.0, 3.0, 4.0, 100.0])
    mask = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0])
    std = math.sqrt(5 / 3)  # unbiased variance of 1..4
    expected = [(v - 2.5) / std for v in (1, 2, 3, 4)]
    assert core.masked_whiten(values, mask)[:4].tolist() == pytest.approx(expected, rel=1e-5)
    assert core.masked_whiten(values, mask, shift_mean=False)[:4].tolist() == pytest.approx(
        [e + 2.5 for e in expected], rel=1e-5)


def test_kl_estimators_and_reward_shaping():
    logprobs, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])
    assert core.kl_per_token(logprobs, ref, "k1").tolist() == pytest.approx([0.5, -1.0])
    # k3 = (q/p - 1) - log(q/p), never negative
    assert core.kl_per_token(logprobs, ref, "k3").tolist() == pytest.approx(
        [math.exp(-0.5) - 1 + 0.5, math.exp(1.0) - 1 - 1.0])

    scores = torch.tensor([2.0, 1.0])
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 7.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    rewards, non_score = core.shaped_rewards(scores, kl, mask, kl_coef=0.5)
    torch.testing.assert_close(non_score, torch.tensor([[-0.05, -0.1, -0.15], [-0.2, -0.25, 0.0]]))
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, -0.1, 1.85], [-0.2, 0.75, 0.0]]))  # score at the end


def test_clipped_policy_and_value_losses():
    old = torch.zeros(1, 4)
    new = torch.log(torch.tensor([[1.5, 0.5, 1.1, 9.0]]))  # the 4th token is padding
    advantages = torch.tensor([[1.0, -1.0, 2.0, 5.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    loss, clipfrac, approx_kl = core.policy_loss(new, old, advantages, mask, cliprange=0.2)
    # max(-A r, -A clip(r)): token 1 -> -1.2 (clipped), token 2 -> 0.8 (clipped), token 3 -> -2.2
    assert loss.item() == pytest.approx((-1.2 + 0.8 - 2.2) / 3)
    assert clipfrac.item() == pytest.approx(2 / 3)
    assert approx_kl.item() == pytest.approx(0.5 * sum(math.log(r) ** 2 for r in (1.5, 0.5, 1.1)) / 3)

    values, old_values = torch.tensor([[1.5, 0.9]]), torch.tensor([[1.0, 1.0]])
    returns, mask = torch.tensor([[2.0, 0.0]]), torch.ones(1, 2)
    loss, clipfrac = core.value_loss(values, old_values, returns, mask, cliprange_value=0.2)
    # token 1: max((1.5-2)^2, (1.2-2)^2) = .64 (clipped); token 2: .81 either way
    assert loss.item() == pytest.approx(0.5 * (0.64 + 0.81) / 2)
    assert clipfrac.item() == pytest.approx(0.5)


def test_response_mask_and_adaptive_kl_controller():
    responses = torch.tensor([[5, 7, 9, 7], [5, 5, 5, 5]])
    assert core.response_mask(responses, [7]).tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]  # the stop token counts
    assert core.response_mask(responses, []).tolist() == [[1] * 4] * 2

    controller = core.AdaptiveKLController(0.1, target=6.0, horizon=100)
    controller.update(12.0, n_responses=10)  # KL twice the target: error clipped to +0.2
    assert controller.value == pytest.approx(0.1 * 1.02)
    controller.update(3.0, n_responses=10)  # half the target: -0.2
    assert controller.value == pytest.approx(0.1 * 1.02 * 0.98)


# -- end to end ----------------------------------------------------------------------------------

LETTERS = "abcdefghijklmnopqrstuvwxyz"


def build_letter_reward_model(out: Path) -> Path:
    """A Llama sequence classifier whose score grows with the share of lowercase letters in the text.

    Every token carries a constant feature, letters one more; attention with zero queries and
    keys averages the letter feature over the sequence into the last token, and the score
    head reads it (through the final RMS norm, which keeps it increasing in the share).
    """
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    from llmtune.builtin import builtin_path

    tokenizer = AutoTokenizer.from_pretrained(builtin_path("tiny"))
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=1, num_key_value_heads=1, num_labels=1,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    model = LlamaForSequenceClassification(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.fill_(1.0 if "norm" in name else 0.0)
        model.model.embed_tokens.weight[:, 2] = 1.0
        model.model.embed_tokens.weight[tokenizer.convert_tokens_to_ids(list(LETTERS)), 0] = 1.0
        model.model.layers[0].self_attn.v_proj.weight[0, 0] = 1.0
        model.model.layers[0].self_attn.o_proj.weight[1, 0] = 1.0
        model.score.weight[0, 1] = 0.25
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def letter_rm(tmp_path_factory, llmtune_cache):
    return build_letter_reward_model(tmp_path_factory.mktemp("letter-rm") / "rm")


def test_letter_reward_model_prefers_letters(letter_rm):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(letter_rm)
    tokenizer = AutoTokenizer.from_pretrained(letter_rm)
    texts = ["TASK 1: XYZ!<|end|>", "TASK 1: a!!!<|end|>", "TASK 1: ab!!<|end|>", "TASK 1: abcd<|end|>"]
    scores = [model(**tokenizer(t, return_tensors="pt")).logits.item() for t in texts]
    assert scores == sorted(scores) and scores[0] == 0 and scores[-1] > 1


LORA = {"type": "lora", "r": 8, "alpha": 16}
TRAIN = {"lr_scheduler_type": "constant", "per_device_train_batch_size": 16, "num_mini_batches": 2,
         "response_length": 12, "temperature": 1.0, "kl_coef": 0.05, "save_strategy": "no", "disable_tqdm": True}


@pytest.fixture(scope="session")
def prompts(tmp_path_factory):
    # No lowercase letters in the prompts: the reward is the responses' doing.
    return write_jsonl(tmp_path_factory.mktemp("prompts") / "prompts.jsonl",
                       [{"prompt": f"TASK {i}: "} for i in range(64)])


def ppo_recipe(tmp_path, rm, data, name="ppo", adapter=LORA, steps=20, lr=3e-3, eval_=0.0, **sections):
    """PPO on `data` scored by the reward model `rm` (None: no `reward_model:`)."""
    return make_recipe(tmp_path, "ppo", {"train": [{"path": data}], "eval": eval_, "max_length": 64}, name=name,
                       adapter=adapter, reward_model=rm, train={**TRAIN, "learning_rate": lr, "max_steps": steps},
                       **sections)


def logged(out: Path) -> list[dict]:
    return [row for row in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "reward" in row]


def quarter_means(values: list[float]) -> tuple[float, float]:
    k = max(len(values) // 4, 1)
    return sum(values[:k]) / k, sum(values[-k:]) / k


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, letter_rm, prompts):
    tmp = tmp_path_factory.mktemp("ppo-lora")
    recipe = ppo_recipe(tmp, letter_rm, prompts, lr=5e-3, eval_=0.25)
    out = tmp / "runs" / "lora"
    return out, run(resolve(recipe), ["llmtune", "ppo", str(recipe)], output_dir=str(out))


@pytest.mark.slow
def test_lora_ppo_raises_the_reward_with_bounded_kl(lora_run):
    out, metrics = lora_run
    steps = logged(out)
    assert [s["step"] for s in steps] == list(range(1, 21))
    first, last = quarter_means([s["reward"] for s in steps])
    assert last > 1.5 * first and last - first > 0.2, (first, last)
    kls = [s["kl"] for s in steps]
    assert kls[0] == pytest.approx(0.0, abs=1e-4)  # a new LoRA starts as the reference
    assert all(math.isfinite(k) and k < 20 for k in kls), kls
    for key in ("reward", "reward_std", "non_score_reward", "rlhf_reward", "kl", "kl_coef", "entropy", "policy_loss",
                "value_loss", "policy_clipfrac", "value_clipfrac", "approx_kl", "response_length",
                "tokens_per_second", "learning_rate", "loss"):
        assert all(math.isfinite(s[key]) for s in steps), key
    assert all(s["non_score_reward"] == pytest.approx(-0.05 * s["kl"], rel=1e-4, abs=1e-6) for s in steps)
    assert 1 <= steps[-1]["response_length"] <= 12 and steps[-1]["tokens_per_second"] > 0
    assert "eval_reward" in metrics and math.isfinite(metrics["eval_reward"])


@pytest.mark.slow
def test_lora_policy_reloads_and_generates_on_an_unchanged_base(lora_run):
    out, _ = lora_run
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmtune.builtin import builtin_path

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "completed" and manifest["method"] == "ppo"
    model = AutoPeftModelForCausalLM.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(builtin_path("tiny")).state_dict()
    for name, tensor in model.get_base_model().state_dict().items():
        key = name.replace(".base_layer", "")
        if "lora_" not in name and key in base:
            assert torch.equal(tensor, base[key]), name
    tokenizer = AutoTokenizer.from_pretrained(out)
    prompt = tokenizer("TASK 99: ", return_tensors="pt")
    generated = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert generated.shape[1] > prompt["input_ids"].shape[1]


def capture_trainer(monkeypatch):
    """Keeps the PPOTrainer a run builds, to look at its models afterwards."""
    from llmtune.methods import ppo

    seen = {}
    build = ppo.build_trainer

    def spy(**inputs):
        seen["trainer"] = build(**inputs)
        return seen["trainer"]

    monkeypatch.setattr(ppo, "build_trainer", spy)
    return seen


@pytest.mark.slow
def test_full_fine_tuning_keeps_a_frozen_reference_and_learns_values(tmp_path, letter_rm, prompts, monkeypatch):
    from transformers import AutoModelForCausalLM

    from llmtune.builtin import builtin_path

    seen = capture_trainer(monkeypatch)
    recipe = ppo_recipe(tmp_path, letter_rm, prompts, adapter=None, steps=8, lr=1e-4)
    out = tmp_path / "full"
    run(resolve(recipe, ["train.value_model=policy", "train.kl_target=1.0", "train.kl_horizon=100"]), ["llmtune"],
        output_dir=str(out))
    trainer = seen["trainer"]
    base = AutoModelForCausalLM.from_pretrained(builtin_path("tiny")).state_dict()
    reference = trainer.ref_model.state_dict()
    assert all(torch.equal(reference[k], v) for k, v in base.items())  # the reference never moved
    trained = AutoModelForCausalLM.from_pretrained(out).state_dict()
    assert sum(not torch.equal(trained[k], v) for k, v in base.items()) == len(base)

    steps = logged(out)
    value_losses = [s["value_loss"] for s in steps]
    # A new value head starts far from the returns and learns them.
    assert sum(value_losses[-3:]) / 3 < 0.5 * value_losses[0], value_losses
    # Adaptive KL: the coefficient moves from 0.05 towards keeping the KL at its target.
    coefs = [s["kl_coef"] for s in steps]
    assert coefs[0] == 0.05 and coefs[-1] != 0.05
    assert [b > a for a, b in zip(coefs, coefs[1:])] == [s["kl"] > 1.0 for s in steps[:-1]]


def lora_trainer(tmp_path, letter_rm, prompts, sets=()):
    """The PPOTrainer `llmtune ppo` builds for a LoRA recipe, untrained, its adapter given random weights."""
    from llmtune.data import load_data
    from llmtune.methods import ppo
    from llmtune.model import load_model, peft_config
    from llmtune.runner.session import training_args
    from llmtune.tokenizer import load_tokenizer

    resolved = resolve(ppo_recipe(tmp_path, letter_rm, prompts), sets)
    config = resolved.config
    data = load_data(config["data"], method="ppo", seed=0)
    args = training_args(resolved, tmp_path / "scratch", ppo.defaults(config, data))
    trainer = ppo.build_trainer(args=args, model=load_model(config), tokenizer=load_tokenizer(config["model"]),
                                data=data, peft_config=peft_config(config["adapter"]), callbacks=[], recipe=config)
    with torch.no_grad():  # B starts at zero, which would make the adapter a no-op
        for name, param in trainer.model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)
    rows = [trainer.train_dataset[i] for i in range(4)]
    rows[1] = {**rows[1], "input_ids": rows[1]["input_ids"][:3]}  # a shorter prompt, so the batch is left-padded
    return trainer, trainer._collate(rows)


def test_adapter_disabled_reference_matches_the_base_model(tmp_path, letter_rm, prompts):
    from transformers import AutoModelForCausalLM

    from llmtune.builtin import builtin_path

    trainer, batch = lora_trainer(tmp_path, letter_rm, prompts)
    sequences, attention, positions, _ = trainer._generate(batch)
    n_query = batch["input_ids"].shape[1]
    reference = trainer.reference_logprobs(sequences, attention, positions, n_query)
    base = AutoModelForCausalLM.from_pretrained(builtin_path("tiny"))
    with torch.no_grad():
        expected = trainer._response_logprobs(base, sequences, attention, positions, n_query)
        policy = trainer._response_logprobs(trainer.model, sequences, attention, positions, n_query)
    assert torch.allclose(reference, expected, atol=1e-5)
    assert not torch.allclose(policy, expected, atol=1e-2)


def test_rollout_logprobs_are_those_responses_were_sampled_from(tmp_path, letter_rm, prompts):
    """PPO's ratio starts at 1 only if its forward pass (left-padded prompts, temperature) reproduces
    the distribution `generate` sampled from."""
    trainer, batch = lora_trainer(tmp_path, letter_rm, prompts, ["train.temperature=0.7"])
    n_query = batch["input_ids"].shape[1]
    trainer.model.eval()
    out = trainer.model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                 generation_config=trainer.generation_config, output_scores=True,
                                 return_dict_in_generate=True)
    sequences = out.sequences
    sampled = torch.log_softmax(torch.stack(out.scores, 1).float(), -1)  # scores: after temperature
    sampled = sampled.gather(-1, sequences[:, n_query:, None]).squeeze(-1)
    mask = core.response_mask(sequences[:, n_query:], trainer.stop_ids)
    attention = torch.cat([batch["attention_mask"], mask.long()], 1)
    positions = (attention.cumsum(1) - 1).clamp(min=0)
    trainer.model.train()
    with torch.no_grad():
        logprobs = trainer._response_logprobs(trainer.model, sequences, attention, positions, n_query)
    assert ((logprobs - sampled).abs() * mask).max() < 1e-4


@pytest.mark.slow
def test_qlora_ppo_trains_on_a_4bit_base(tmp_path, letter_rm, prompts, monkeypatch):
    import bitsandbytes as bnb

    seen = capture_trainer(monkeypatch)
    recipe = ppo_recipe(tmp_path, letter_rm, prompts, steps=4, quantization={"bits": 4, "compute_dtype": "float32"})
    out = tmp_path / "qlora"
    run(resolve(recipe), ["llmtune"], output_dir=str(out))
    trainer = seen["trainer"]
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in trainer.model.modules()) == 14
    assert trainer.ref_model is None  # one 4-bit base: the reference is the policy without its adapter
    assert len(logged(out)) == 4 and (out / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_resuming_a_checkpoint_continues_the_same_run(tmp_path, letter_rm, prompts):
    recipe = ppo_recipe(tmp_path, letter_rm, prompts, steps=6)
    sets = ["train.save_strategy=steps", "train.save_steps=3"]
    first = tmp_path / "first"
    run(resolve(recipe, sets), ["llmtune"], output_dir=str(first))
    checkpoint = first / "checkpoint-3"
    assert {"value_model.safetensors", "ppo_state.json", "optimizer.pt"} <= {p.name for p in checkpoint.iterdir()}
    again = tmp_path / "again"
    run(resolve(recipe, sets), ["llmtune"], output_dir=str(again), resume=str(checkpoint))
    continued = logged(again)
    assert [s["step"] for s in continued] == [4, 5, 6]
    for expected, got in zip(logged(first)[3:], continued):
        for key in ("reward", "kl", "value_loss", "policy_loss"):
            assert got[key] == pytest.approx(expected[key], rel=1e-4, abs=1e-6), key


DDP_SCRIPT = """\
import hashlib, sys, torch
from llmtune.methods import ppo
from llmtune.recipe.check import resolve
from llmtune.runner.session import train as run

build = ppo.build_trainer
def keep(**inputs):
    trainer = build(**inputs)
    digest = hashlib.sha256()
    def write():
        for name, p in sorted(trainer.model.named_parameters()) + sorted(trainer.value_model.named_parameters()):
            if p.requires_grad:
                digest.update(p.detach().cpu().numpy().tobytes())
        open(f"{sys.argv[2]}/rank{trainer.args.process_index}.txt", "w").write(digest.hexdigest())
    trainer.add_callback(type("Digest", (__import__("transformers").TrainerCallback,),
                              {"on_train_end": lambda self, *a, **k: write()})())
    return trainer
ppo.build_trainer = keep
run(resolve(sys.argv[1]), ["llmtune"], output_dir=sys.argv[2] + "/run")
"""


@pytest.mark.distributed
def test_two_processes_share_the_prompts_and_agree_on_the_weights(tmp_path, letter_rm, prompts):
    recipe = ppo_recipe(tmp_path, letter_rm, prompts, steps=3)
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             "--master_port", "29531", str(script), str(recipe), str(tmp_path)],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    digests = {(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)}
    assert len(digests) == 1  # the updates were synchronised
    steps = logged(tmp_path / "run")
    # 64 prompts, 16 per process per step: an epoch is 2 steps when the two processes share them.
    assert [s["step"] for s in steps] == [1, 2, 3] and steps[0]["epoch"] == pytest.approx(0.5)


# -- bad recipes ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_ppo_without_a_reward_model_or_with_other_data_exits_2(tmp_path, letter_rm, prompts):
    recipe = ppo_recipe(tmp_path, None, prompts)
    result = cli("validate", recipe)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "ppo.yaml:1:1: `method: ppo` needs a reward model" in result.stderr, result.stderr

    chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "q"},
                                                               {"role": "assistant", "content": "a"}]}] * 20)
    recipe = ppo_recipe(tmp_path, letter_rm, chat)
    result = cli("ppo", recipe, "--output-dir", tmp_path / "out")
    assert result.returncode == 2 and "method 'ppo' cannot train on 'messages' data" in result.stderr, result.stderr
    assert not (tmp_path / "out").exists()

    recipe = ppo_recipe(tmp_path, "./runs/no-such-reward", prompts)
    result = cli("ppo", recipe, "--output-dir", tmp_path / "out")
    assert result.returncode == 2 and f"reward_model: ./runs/no-such-reward: no such folder (relative to {tmp_path})" \
        in result.stderr, result.stderr
    assert "llmtune reward" in result.stderr and not (tmp_path / "out").exists()


@pytest.mark.slow
def test_ppo_settings_are_checked_like_trl_configs(tmp_path, letter_rm, prompts):
    recipe = ppo_recipe(tmp_path, letter_rm, prompts)
    result = cli("validate", recipe, "--set", "train.kl_coeff=0.1", "--set", "train.kl_estimator=k2",
                 "--set", "reward_functions=[rw:f]")
    assert result.returncode == 2
    assert "unknown key 'kl_coeff' in train (did you mean 'kl_coef'?)" in result.stderr
    assert "`train.kl_estimator`: expected Literal['k1', 'k3'], got str 'k2'" in result.stderr
    assert "`llmtune ppo` scores with `reward_model:` only" in result.stderr
    result = cli("ppo", recipe, "--set", "train.num_mini_batches=3", "--output-dir", tmp_path / "out")
    assert result.returncode == 2 and "must be a multiple of num_mini_batches" in result.stderr, result.stderr
    assert not (tmp_path / "out").exists()


def test_stop_token_and_a_foreign_reward_tokenizer_are_refused_before_training(tmp_path, letter_rm, prompts):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from llmtune.errors import UserError
    from llmtune.methods import ppo

    config = resolve(ppo_recipe(tmp_path, letter_rm, prompts), ["train.stop_token=<nope>"]).config
    with pytest.raises(UserError, match="train.stop_token: '<nope>' is not a token of the tokenizer"):
        ppo.defaults(config, None)

    other = tmp_path / "other-rm"
    AutoModelForSequenceClassification.from_pretrained(letter_rm).save_pretrained(other)
    tokenizer = AutoTokenizer.from_pretrained(letter_rm)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|other|>"]})
    tokenizer.save_pretrained(other)
    config = resolve(ppo_recipe(tmp_path, other, prompts)).config
    with pytest.raises(UserError, match="has another tokenizer than the policy.*`train.value_model: policy`"):
        ppo.defaults(config, None)
    config = resolve(ppo_recipe(tmp_path, other, prompts), ["train.value_model=policy"]).config
    assert ppo.defaults(config, None) == {"max_length": 64}


@pytest.mark.slow
def test_shipped_tiny_pipeline_sft_reward_ppo(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # each step finds the one before under ./runs
    rlhf = ROOT / "recipes" / "rlhf"
    for recipe, sets in (("tiny-sft", ["train.num_train_epochs=1"]), ("tiny-reward", ["train.num_train_epochs=1"]),
                         ("tiny-ppo", ["train.max_steps=3"])):
        run(resolve(rlhf / f"{recipe}.yaml", sets), ["llmtune"])
    out = tmp_path / "runs" / "rlhf-tiny-ppo"
    assert [s["step"] for s in logged(out)] == [1, 2, 3]
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoTokenizer

    model = AutoPeftModelForCausalLM.from_pretrained(out)  # the SFT adapter, trained further, on the tiny base
    tokenizer = AutoTokenizer.from_pretrained(out)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2 + 2?"}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    assert model.generate(**prompt, max_new_tokens=4).shape[1] > prompt["input_ids"].shape[1]
