"""Preference methods end to end on the builtin tiny model: DPO (+ the on-disk reference
log-prob cache), ORPO, KTO and reward models; chaining from an SFT run; wrong data per method."""

import json
import math

import pytest
import torch

from llmtune.recipe.check import resolve
from llmtune.runner.session import train as run

from .conftest import RECIPES, cli, make_recipe, write_jsonl

PAIRS = RECIPES / "data" / "preference.jsonl"  # prompt + chosen/rejected message lists
UNPAIRED = RECIPES / "data" / "kto.jsonl"  # prompt + completion message lists, label true/false
CHAT = RECIPES / "data" / "chat.jsonl"
LN2 = math.log(2)  # DPO's loss while the policy equals its reference

LORA = {"type": "lora", "r": 8, "alpha": 16}


def recipe_file(tmp_path, method, name="r", adapter=LORA, data=PAIRS, steps=2, lr=1e-3, eval_=0.0, log=1,
                model="builtin:tiny", **sections):
    return make_recipe(tmp_path, method, {"train": [{"path": data}], "eval": eval_, "max_length": 128}, name=name,
                       model={"name": model}, adapter=adapter,
                       train={"learning_rate": lr, "max_steps": steps, "per_device_train_batch_size": 8,
                              "gradient_checkpointing": False, "logging_steps": log, "save_strategy": "no",
                              "disable_tqdm": True}, **sections)


def train(tmp_path, method, name="run", adapter=LORA, data=PAIRS, steps=16, lr=3e-3, eval_=0.0, log=2, sets=(),
          model="builtin:tiny", **sections):
    recipe = recipe_file(tmp_path, method, name, adapter, data, steps, lr, eval_, log, model, **sections)
    out = tmp_path / "runs" / name
    metrics = run(resolve(recipe, sets), ["llmtune", method, str(recipe)], output_dir=str(out))
    return out, metrics


def logged(out, key):
    """The values of a training metric, in step order (eval rows carry `eval_*` keys instead)."""
    return [m[key] for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if key in m]


# Held-out pairs (prompts not in the sample data); the rejected answers are the sample data's kind.
HELD_OUT = [("What is the capital of Norway?", "The capital of Norway is Oslo.", "I don't know."),
            ("What is 21 + 4?", "21 + 4 = 25.", "Figure it out yourself."),
            ("Spell 'lamp' backwards.", "'lamp' backwards is 'pmal'.", "No idea, ask someone else."),
            ("What is the capital of Egypt?", "The capital of Egypt is Cairo.", "Why would I tell you that?")]


def chat(question, answer=None):
    turns = [{"role": "user", "content": question}]
    return turns + ([{"role": "assistant", "content": answer}] if answer is not None else [])


def answer_logp(model, tokenizer, question, answer):
    """log p(answer | question) under the chat template: the sum over the answer's tokens."""
    prompt = tokenizer.apply_chat_template(chat(question), add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template(chat(question, answer), tokenize=False)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([tokenizer(full, add_special_tokens=False)["input_ids"]])
    assert ids[0, :len(prompt_ids)].tolist() == prompt_ids
    with torch.no_grad():
        logps = torch.log_softmax(model(ids).logits[0, :-1], -1).gather(1, ids[0, 1:, None])[:, 0]
    return logps[len(prompt_ids) - 1:].sum().item()


def chosen_over_rejected(model, tokenizer):
    """Mean over the held-out pairs of log p(chosen) - log p(rejected)."""
    return sum(answer_logp(model, tokenizer, q, c) - answer_logp(model, tokenizer, q, r)
               for q, c, r in HELD_OUT) / len(HELD_OUT)


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory, llmtune_cache):
    return train(tmp_path_factory.mktemp("dpo"), "dpo", steps=24, eval_=0.1, sets=["train.eval_steps=12"])


@pytest.mark.slow
def test_dpo_margins_rise_and_the_policy_prefers_chosen(dpo_run):
    out, metrics = dpo_run
    margins = logged(out, "rewards/margins")
    assert margins[0] < 0.5 < 2 < margins[-1], margins  # starts near 0 (policy == reference), then grows
    assert logged(out, "rewards/accuracies")[-1] == 1.0
    assert metrics["last_loss"] < 0.2 * metrics["first_loss"] and metrics["eval_rewards/margins"] > 2

    from peft import AutoPeftModelForCausalLM
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out)
    policy = AutoPeftModelForCausalLM.from_pretrained(out)
    with policy.disable_adapter():  # the reference: the base with the adapter off
        before = chosen_over_rejected(policy, tokenizer)
    after = chosen_over_rejected(policy, tokenizer)
    assert after > before + 5, (before, after)  # log-prob ratio chosen/rejected on unseen prompts grew

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["method"] == "dpo" and manifest["experimental"] is False and manifest["status"] == "completed"
    assert "AutoPeftModelForCausalLM" in (out / "README.md").read_text()


@pytest.fixture
def ref_pass_calls(monkeypatch, tmp_path, llmtune_cache):
    """Count the reference model's forward passes, in an empty ref-log-prob cache."""
    from trl import DPOTrainer

    from llmtune.builtin import builtin_path

    builtin_path("tiny")  # built in the session cache first
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "builtin").symlink_to(llmtune_cache / "builtin")  # reuse the tiny model, not its cached log-probs
    monkeypatch.setenv("LLMTUNE_CACHE", str(cache))
    calls = []
    original = DPOTrainer.compute_ref_log_probs

    def counted(self, model, inputs):
        calls.append(len(inputs["input_ids"]))
        return original(self, model, inputs)

    monkeypatch.setattr(DPOTrainer, "compute_ref_log_probs", counted)
    return calls, cache / "ref-logps"


@pytest.mark.slow
def test_second_run_loads_reference_log_probs_instead_of_computing_them(tmp_path, ref_pass_calls):
    calls, folder = ref_pass_calls
    first, m1 = train(tmp_path, "dpo", name="first", steps=6, eval_=0.1)
    assert sum(calls) == 2 * 240  # every train and eval pair, chosen and rejected, once
    assert len(list(folder.glob("*.safetensors"))) == 2  # train and eval sets
    assert "computed, cached in" in (first / "train.log").read_text()

    calls.clear()
    second, m2 = train(tmp_path, "dpo", name="second", steps=6, eval_=0.1)
    assert calls == []  # the reference model never ran
    assert "loaded from" in (second / "train.log").read_text()
    assert logged(second, "loss") == logged(first, "loss")  # the same numbers as computing them
    assert m2["eval_loss"] == m1["eval_loss"]

    # The loss and its strength do not change the reference; the tokenized rows do.
    train(tmp_path, "dpo", name="ipo", steps=6, eval_=0.1, sets=["train.loss_type=[ipo]", "train.beta=0.5"])
    assert calls == []
    train(tmp_path, "dpo", name="shorter", steps=6, eval_=0.1, sets=["data.max_length=64"])
    assert calls  # computed again
    assert len(list(folder.glob("*.safetensors"))) == 4


@pytest.mark.slow
def test_a_resumed_run_loads_reference_log_probs(tmp_path, ref_pass_calls, monkeypatch):
    import os
    import signal

    from llmtune.runner import session as run_module
    from llmtune.runner.interrupt import Interrupted

    metrics_callback = run_module.metrics_callback

    def with_ctrl_c(path):  # the metrics writer, plus a Ctrl-C during step 4
        class WriterAndCtrlC(type(metrics_callback(path))):
            def on_step_begin(self, args, state, control, **kwargs):
                if state.global_step == 3:
                    os.kill(os.getpid(), signal.SIGINT)

        return WriterAndCtrlC()

    calls, _ = ref_pass_calls
    recipe = recipe_file(tmp_path, "dpo", steps=8, lr=3e-3)
    out = tmp_path / "out"
    with monkeypatch.context() as stopping:
        stopping.setattr(run_module, "metrics_callback", with_ctrl_c)
        with pytest.raises(Interrupted):
            run(resolve(recipe), ["llmtune", "dpo"], output_dir=str(out))
    assert calls and (out / "checkpoint-4").is_dir()

    calls.clear()
    run(resolve(recipe), ["llmtune", "dpo"], output_dir=str(out), resume="auto")
    assert calls == []  # the resumed run loaded the reference log-probs
    assert json.loads((out / "manifest.json").read_text())["status"] == "completed"
    assert [m["step"] for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
            if "loss" in m][-1] == 8


@pytest.mark.slow
def test_ipo_loss_runs_and_falls(tmp_path):
    # Plain strings with an explicit prompt (the sample data is conversational).
    rows = [json.loads(line) for line in PAIRS.read_text().splitlines()]
    plain = write_jsonl(tmp_path / "plain.jsonl", [
        {"prompt": r["prompt"][-1]["content"] + "\n", "chosen": r["chosen"][0]["content"],
         "rejected": r["rejected"][0]["content"]} for r in rows])
    out, metrics = train(tmp_path, "dpo", data=plain, steps=20, sets=["train.loss_type=[ipo]"])
    assert metrics["last_loss"] < 0.5 * metrics["first_loss"], metrics
    assert logged(out, "rewards/margins")[-1] > logged(out, "rewards/margins")[0]


@pytest.mark.slow
def test_full_fine_tuning_dpo_reference_is_the_starting_model(tmp_path):
    # Precomputed (the default: no second copy in memory) and a frozen copy kept during training.
    for name, sets in (("precomputed", []), ("copy", ["train.precompute_ref_log_probs=false"])):
        out, metrics = train(tmp_path, "dpo", name=name, adapter=None, steps=6, lr=1e-4, log=1, sets=sets)
        assert metrics["first_loss"] == pytest.approx(LN2, abs=1e-4)  # policy == reference at step 1
        assert metrics["last_loss"] < metrics["first_loss"]
        assert (out / "model.safetensors").is_file() and not (out / "adapter_config.json").exists()


@pytest.mark.slow
def test_qlora_dpo_trains_a_4bit_base(tmp_path):
    out, metrics = train(tmp_path, "dpo", steps=12, quantization={"bits": 4, "compute_dtype": "float32"})
    assert metrics["last_loss"] < 0.7 * metrics["first_loss"], metrics
    assert logged(out, "rewards/margins")[-1] > 0.5
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "LORA"


@pytest.mark.slow
def test_orpo_is_marked_experimental_trains_and_reloads(tmp_path):
    out, metrics = train(tmp_path, "orpo", steps=16)
    assert metrics["last_loss"] < 0.85 * metrics["first_loss"], metrics
    for key in ("nll_loss", "log_odds_ratio", "rewards/margins", "rewards/accuracies"):
        assert logged(out, key), key
    assert logged(out, "log_odds_ratio")[-1] > logged(out, "log_odds_ratio")[0]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["method"] == "orpo" and manifest["experimental"] is True
    assert "trl.experimental.orpo, which TRL ships as experimental" in (out / "train.log").read_text()
    generates(out)

    assert "(experimental in TRL)" in cli("orpo", "--help").stdout
    assert "experimental" not in cli("dpo", "--help").stdout


def generates(out):
    from peft import AutoPeftModelForCausalLM
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    adapter = load_file(out / "adapter_model.safetensors")
    assert [v for k, v in adapter.items() if "lora_B" in k and v.abs().sum() > 0]  # B starts at zero: it trained
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoPeftModelForCausalLM.from_pretrained(out)
    prompt = tokenizer.apply_chat_template(chat("What is the capital of Peru?"), add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    generated = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert generated.shape[1] > prompt["input_ids"].shape[1]


@pytest.mark.slow
def test_kto_trains_on_labelled_completions_and_reloads(tmp_path):
    out, metrics = train(tmp_path, "kto", data=UNPAIRED, steps=16, eval_=0.1)
    assert metrics["last_loss"] < 0.5 * metrics["first_loss"], metrics
    for key in ("kl", "rewards/chosen", "rewards/rejected", "logps/chosen"):
        assert logged(out, key), key
    assert metrics["eval_rewards/margins"] > 1
    assert "reference log-probs of the train set: computed" in (out / "train.log").read_text()
    generates(out)


@pytest.mark.slow
def test_kto_takes_preference_pairs_with_an_implicit_prompt(tmp_path):
    # Message lists sharing their first turn: the prompt is implicit; KTO unpairs each pair.
    rows = [json.loads(line) for line in PAIRS.read_text().splitlines()]
    implicit = write_jsonl(tmp_path / "implicit.jsonl", [
        {"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]} for r in rows])
    out, metrics = train(tmp_path, "kto", data=implicit, steps=8)
    assert metrics["last_loss"] < metrics["first_loss"]
    assert json.loads((out / "manifest.json").read_text())["data"][0]["format"] == "preference"


REFUSALS = ["I don't know.", "Figure it out yourself.", "No idea, ask someone else.", "Why would I tell you that?"]


def reward_pairs(countries):
    return [{"prompt": chat(f"What is the capital of {country}?"),
             "chosen": [{"role": "assistant", "content": f"The capital of {country} is {city}."}],
             "rejected": [{"role": "assistant", "content": REFUSALS[i % len(REFUSALS)]}]}
            for i, (country, city) in enumerate(countries)]


TRAIN_CAPITALS = [("France", "Paris"), ("Spain", "Madrid"), ("Kenya", "Nairobi"), ("Peru", "Lima"),
                  ("Japan", "Tokyo"), ("Italy", "Rome"), ("Chile", "Santiago"), ("Canada", "Ottawa"),
                  ("Ghana", "Accra"), ("Cuba", "Havana"), ("Iran", "Tehran"), ("Nepal", "Kathmandu"),
                  ("Poland", "Warsaw"), ("Greece", "Athens"), ("Sweden", "Stockholm"), ("Mali", "Bamako")]
HELD_OUT_CAPITALS = [("Norway", "Oslo"), ("Egypt", "Cairo"), ("Brazil", "Brasilia"), ("India", "New Delhi"),
                     ("Chad", "N'Djamena"), ("Laos", "Vientiane"), ("Qatar", "Doha"), ("Fiji", "Suva")]


def pair_accuracy(score, tokenizer):
    held = reward_pairs(HELD_OUT_CAPITALS)
    text = [tokenizer.apply_chat_template(p["prompt"] + p[side], tokenize=False) for p in held
            for side in ("chosen", "rejected")]
    batch = tokenizer(text, add_special_tokens=False, padding=True, return_tensors="pt")
    with torch.no_grad():
        scores = score(**batch).logits[:, 0].view(-1, 2)
    return (scores[:, 0] > scores[:, 1]).float().mean().item(), scores


@pytest.mark.slow
def test_reward_model_ranks_held_out_pairs_and_reloads(tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", reward_pairs(TRAIN_CAPITALS) * 4)
    out, metrics = train(tmp_path, "reward", adapter=None, data=data, steps=16, lr=1e-3)
    assert metrics["last_loss"] < 0.2 * metrics["first_loss"], metrics
    assert logged(out, "accuracy")[-1] == 1.0

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForSequenceClassification.from_pretrained(out)  # the saved run, as users load it
    assert model.config.num_labels == 1
    accuracy, scores = pair_accuracy(model, tokenizer)
    assert accuracy == 1.0 and (scores[:, 0] - scores[:, 1]).min() > 1, scores  # chosen scored above rejected

    # `llmtune reward-score`: the same scores, through the run's chat template, one per --response.
    pair = reward_pairs(HELD_OUT_CAPITALS)[0]
    scored = cli("reward-score", out, "--prompt", pair["prompt"][0]["content"],
                 "--response", pair["chosen"][0]["content"], "--response", pair["rejected"][0]["content"])
    assert scored.returncode == 0, scored.stderr
    printed = [line.split("\t") for line in scored.stdout.splitlines()]
    assert [text for _, text in printed] == [pair["chosen"][0]["content"], pair["rejected"][0]["content"]]
    assert [float(value) for value, _ in printed] == pytest.approx(scores[0].tolist(), abs=1e-3)
    refused = cli("reward-score", RECIPES / "data", "--prompt", "q", "--response", "a")
    assert refused.returncode == 2 and "not a run directory" in refused.stderr

    from transformers import set_seed

    from llmtune.builtin import builtin_path

    set_seed(42)  # the untrained head the run started from
    untrained = AutoModelForSequenceClassification.from_pretrained(builtin_path("tiny"), num_labels=1)
    assert pair_accuracy(untrained, tokenizer)[0] < 0.7  # near chance before training
    assert "AutoModelForSequenceClassification" in (out / "README.md").read_text()


@pytest.mark.slow
def test_reward_adapter_and_score_margins(tmp_path):
    rows = reward_pairs(TRAIN_CAPITALS) * 2
    plain = write_jsonl(tmp_path / "plain.jsonl", rows)
    scored = write_jsonl(tmp_path / "scored.jsonl", [{**r, "score_chosen": 9, "score_rejected": 2} for r in rows])
    _, unscored = train(tmp_path, "reward", name="plain", data=plain, steps=8, lr=3e-3, log=1)
    out, metrics = train(tmp_path, "reward", data=scored, steps=8, lr=3e-3, log=1)
    # The loss asks chosen to win by the scores' margin (9 - 2), not just to win: -log sigmoid(0 - 7) at the start.
    assert unscored["first_loss"] < 2 and metrics["first_loss"] == pytest.approx(7, abs=1)
    assert metrics["last_loss"] < metrics["first_loss"]
    assert json.loads((out / "adapter_config.json").read_text())["task_type"] == "SEQ_CLS"

    from peft import AutoPeftModelForSequenceClassification
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out)
    card = (out / "README.md").read_text()
    assert "AutoPeftModelForSequenceClassification" in card and "num_labels=1" in card
    model = AutoPeftModelForSequenceClassification.from_pretrained(out, num_labels=1,
                                                                   pad_token_id=tokenizer.pad_token_id)
    assert pair_accuracy(model, tokenizer)[0] == 1.0  # the trained score head was saved with the adapter


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory, llmtune_cache):
    tmp = tmp_path_factory.mktemp("sft")
    return train(tmp, "sft", data=CHAT, steps=10)[0]


@pytest.mark.slow
def test_dpo_stacked_on_an_sft_adapter_keeps_training_it(tmp_path, sft_run):
    out, metrics = train(tmp_path, "dpo", model=sft_run, adapter=None, steps=8, log=1)
    # The reference is the SFT adapter's frozen copy: at step 1 the policy equals it.
    assert metrics["first_loss"] == pytest.approx(LN2, abs=1e-4)
    assert metrics["last_loss"] < metrics["first_loss"]
    config = json.loads((out / "adapter_config.json").read_text())
    sft_config = json.loads((sft_run / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == sft_config["base_model_name_or_path"]  # loads on the base
    assert config["r"] == sft_config["r"] == 8

    from safetensors.torch import load_file

    before, after = load_file(sft_run / "adapter_model.safetensors"), load_file(out / "adapter_model.safetensors")
    assert before.keys() == after.keys() and any(not torch.equal(before[k], after[k]) for k in before)
    generates(out)


@pytest.mark.slow
def test_dpo_and_reward_on_an_sft_adapter_merged_into_its_base(tmp_path, sft_run):
    # Full fine-tuning of the merged model; the frozen copy of it is the reference.
    out, metrics = train(tmp_path, "dpo", name="dpo", model=sft_run, adapter=None, steps=4, lr=1e-4, log=1,
                         sets=["model.run_adapter=merge", "train.precompute_ref_log_probs=false"])
    assert metrics["first_loss"] == pytest.approx(LN2, abs=1e-4)

    out, metrics = train(tmp_path, "reward", name="reward", model=sft_run, adapter=None, steps=8, lr=1e-3,
                         sets=["model.run_adapter=merge"])
    assert metrics["last_loss"] < metrics["first_loss"]
    from transformers import AutoModelForSequenceClassification

    assert AutoModelForSequenceClassification.from_pretrained(out).config.num_labels == 1


@pytest.mark.slow
def test_an_explicit_reference_model(tmp_path, sft_run):
    # The policy starts as the base; the SFT model (merged) judges it, so step 1 is not at ln 2.
    out, metrics = train(tmp_path, "dpo", steps=2, log=1, sets=[f"ref_model={sft_run}"])
    assert abs(metrics["first_loss"] - LN2) > 0.01


@pytest.mark.slow
def test_continuing_a_run_adapter_is_checked_before_training(tmp_path, sft_run):
    cases = [("dpo", LORA, [], "holds an adapter, and `model.run_adapter: stack` keeps training it"),
             ("reward", None, [], "`llmtune reward` adds a new SequenceClassification head"),
             ("dpo", LORA, ["model.run_adapter=merge"], "`model.run_adapter: merge` fully fine-tunes"),
             ("orpo", LORA, ["ref_model=builtin:tiny"], "`llmtune orpo` trains without a reference model"),
             ("kto", LORA, ["data.packing=true"], "`llmtune kto` cannot pack rows (KTOConfig has no `packing`)")]
    for method, adapter, sets, message in cases:
        recipe = recipe_file(tmp_path, method, adapter=adapter, model=sft_run)
        result = cli(method, recipe, "--output-dir", tmp_path / "out", *[a for s in sets for a in ("--set", s)])
        assert result.returncode == 2 and message in result.stderr, (method, result.stderr)
        assert "r.yaml:" in result.stderr or "--set" in result.stderr
        assert not (tmp_path / "out").exists()


WRONG_SHAPE = {  # method: (data it cannot take, the format found, the formats it needs)
    "dpo": (UNPAIRED, "kto", "preference"),
    "orpo": (CHAT, "messages", "preference"),
    "reward": (UNPAIRED, "kto", "preference"),
    "kto": (CHAT, "messages", "kto, preference"),
}


@pytest.mark.slow
@pytest.mark.parametrize("method", WRONG_SHAPE)
def test_wrong_data_shape_exits_2_naming_method_and_formats(tmp_path, method):
    data, found, needed = WRONG_SHAPE[method]
    recipe = recipe_file(tmp_path, method, data=data)
    result = cli(method, recipe, "--output-dir", tmp_path / "out")
    assert result.returncode == 2, result.stderr
    assert f"method '{method}' cannot train on '{found}' data; it needs one of: {needed}" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()


@pytest.mark.slow
def test_bad_preference_and_kto_rows_are_reported_by_line(tmp_path):
    good = {"prompt": "Q", "chosen": "good", "rejected": "bad"}
    write_jsonl(tmp_path / "pairs.jsonl", [good] * 5 + [{"prompt": "Q", "chosen": "good"},
                                                        {"prompt": "Q", "chosen": "same", "rejected": "same"}])
    write_jsonl(tmp_path / "kto.jsonl", [{"prompt": "Q", "completion": "A", "label": True}] * 3
                + [{"prompt": "Q", "completion": "A", "label": "yes"}])
    for method, name, problems in (("dpo", "pairs.jsonl", ["pairs.jsonl:6: missing 'rejected'",
                                                           "pairs.jsonl:7: 'chosen' and 'rejected' are identical"]),
                                   ("kto", "kto.jsonl", ["kto.jsonl:4: 'label' must be true or false, got 'yes'"])):
        recipe = recipe_file(tmp_path, method, data=name)
        result = cli(method, recipe, "--output-dir", tmp_path / "out", cwd=tmp_path)
        assert result.returncode == 2 and all(p in result.stderr for p in problems), result.stderr
        assert not (tmp_path / "out").exists()
