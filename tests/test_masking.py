"""The right tokens trained for real model families (tests/families.py), whatever their chat template does."""

import json

import pytest

from llmtune.data import load_data
from llmtune.recipe.check import resolve
from llmtune.tokenizer import load_tokenizer
from llmtune.tools.inspect import TrainingView, inspect

from .conftest import RECIPES, built_trainer, cli, make_recipe, write_jsonl, write_recipe
from .families import FAMILIES, build_model, build_tokenizer, family_model, template_text

RECIPE = """\
method: {method}
model: {{name: "{model}", dtype: float32}}
data:
  train:
    - path: {data}
  max_length: 512
train: {{max_steps: 2, per_device_train_batch_size: 2, learning_rate: 1.0e-2, logging_steps: 1, save_strategy: "no"}}
"""
SYSTEM = {"role": "system", "content": "Answer briefly."}
SINGLE = [{"role": "user", "content": "What is the capital of France?"},
          {"role": "assistant", "content": "The capital of France is Paris."}]
MULTI = SINGLE + [{"role": "user", "content": "Thank you!"}, {"role": "assistant", "content": "You're welcome."}]
CONVERSATIONS = {"single": SINGLE, "multi": MULTI, "system-single": [SYSTEM] + SINGLE, "system-multi": [SYSTEM] + MULTI}
NO_SYSTEM_ROLE = {"gemma2", "mistral"}  # their templates raise on a system message
# What TRL's training copies of templates it knows (`get_training_chat_template`) put inside {% generation %}, where
# that is more than the answer and its end-of-turn token. The extra tokens are harmless to generation: a newline
# the generation prompt already ends with, or one after the stop token, or the role token before the answer.
# Qwen3's copy renders the (empty) reasoning block in every turn, earlier ones included.
TRL_COPY_TRAINS = {
    "qwen2_5": "\n{}<|im_end|>\n",
    "qwen3": "<think>\n\n</think>\n\n{}<|im_end|>\n",
    "deepseek_r1_distill": "<｜Assistant｜>{}<｜end▁of▁sentence｜>",
    "gemma2": "{}<end_of_turn>\n",
    "gemma3": "{}<end_of_turn>\n",
    "phi3": "{}<|end|>\n",
}
TRL_COPY_CLOSES = {"phi3": "<|endoftext|>"}  # the eos token closing the conversation, trained after the last turn


def recipe(tmp_path, model, rows, method="sft"):
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    return write_recipe(tmp_path / "r.yaml", RECIPE.format(method=method, model=model, data=data))


def trained_runs(tokenizer, tokens) -> list[str]:
    """The decoded runs of labelled tokens."""
    runs, current = [], []
    for token, label in zip(tokens["input_ids"], tokens["labels"]):
        if label != -100:
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    return runs + ([tokenizer.decode(current)] if current else [])


def view_of(tmp_path, model, rows):
    resolved = resolve(recipe(tmp_path, model, rows))
    data = load_data(resolved.config["data"], method="sft", seed=0, locate=resolved.locate,
                     model=resolved.config["model"])
    tokenizer = load_tokenizer(resolved.config["model"])
    return TrainingView(resolved, tokenizer, data), data


@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("name", FAMILIES)
def test_labels_are_exactly_the_assistant_text_and_its_end_of_turn_token(tmp_path, tmp_path_factory, name,
                                                                         conversation):
    family = FAMILIES[name]
    messages = CONVERSATIONS[conversation]
    view, data = view_of(tmp_path, family_model(tmp_path_factory, name), [{"messages": messages}])
    tokens = view.tokenize([r for r, _ in view.rows(data.train)])[0]
    trained = TRL_COPY_TRAINS.get(name, "{}" + family.end_of_turn)
    expected = [trained.format(m["content"]) for m in messages if m["role"] == "assistant"]
    expected[-1] += TRL_COPY_CLOSES.get(name, "")
    assert trained_runs(view.tokenizer, tokens) == expected
    rendered = view.tokenizer.decode(tokens["input_ids"])
    if messages[0]["role"] == "system" and name != "mistral_nemo":  # Nemo's drop is a warning (below)
        assert SYSTEM["content"] in rendered
    if name in NO_SYSTEM_ROLE and messages[0]["role"] == "system":  # folded into the first user turn
        assert f"{SYSTEM['content']}\n\n{SINGLE[0]['content']}" in rendered


def test_previously_refused_templates_are_masked_by_rendering(tmp_path, tmp_path_factory):
    """Llama 3.1/3.2, SmolLM2 and Mistral have no {% generation %} markers and no TRL training copy."""
    from llmtune.data.masking import RENDERED, masking_mode

    for name in ("llama3_1", "llama3_2", "smollm2", "mistral", "mistral_nemo"):
        tokenizer = load_tokenizer({"name": str(family_model(tmp_path_factory, name)), "trust_remote_code": False})
        assert masking_mode(tokenizer) == RENDERED, name


def test_sft_trainer_gets_the_rendered_masks_as_labels(tmp_path, tmp_path_factory):
    """The pre-tokenized rows handed to TRL's SFTTrainer become exactly these labels (inspect shows the same)."""
    from llmtune.methods import sft
    from llmtune.model import load_model
    from llmtune.runner.trainer_args import training_args

    model = family_model(tmp_path_factory, "llama3_1")
    resolved = resolve(recipe(tmp_path, model, [{"messages": [SYSTEM] + MULTI}]))
    view, data = view_of(tmp_path, model, [{"messages": [SYSTEM] + MULTI}])
    args = training_args(resolved, tmp_path / "scratch", sft.defaults(resolved.config, data))
    trainer = sft.build_trainer(args=args, model=load_model(resolved.config), tokenizer=view.tokenizer, data=data,
                                peft_config=None, callbacks=[])
    real = trainer.train_dataset[0]
    assert trained_runs(view.tokenizer, real) == ["The capital of France is Paris.<|eot_id|>",
                                                  "You're welcome.<|eot_id|>"]
    mine = view.tokenize([r for r, _ in view.rows(data.train)])[0]
    assert mine["input_ids"] == real["input_ids"] and mine["labels"] == real["labels"]
    assert view.tokenizer.chat_template == template_text(FAMILIES["llama3_1"])  # the template is not patched


@pytest.mark.slow
def test_sft_with_llama3_1_trains_and_keeps_the_original_template(tmp_path, tmp_path_factory):
    """With tool-calling rows (recipes/data/tools.jsonl) mixed in: the run takes them as they are (stored as JSON)."""
    tools = [json.loads(line) for line in (RECIPES / "data" / "tools.jsonl").read_text().splitlines()]
    rows = [{"messages": [SYSTEM] + MULTI}] * 8 + tools * 2
    result = cli("sft", recipe(tmp_path, family_model(tmp_path_factory, "llama3_1"), rows),
                 "--output-dir", tmp_path / "run")
    assert result.returncode == 0, result.stderr
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["status"] == "completed"
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert len(losses) == 2 and losses[-1] < losses[0]
    saved = load_tokenizer({"name": str(tmp_path / "run"), "trust_remote_code": False}).chat_template
    assert saved == template_text(FAMILIES["llama3_1"])


@pytest.mark.slow
def test_a_template_that_rewrites_earlier_turns_is_refused_at_validate_with_the_line(tmp_path):
    """Another revision of Qwen3's template (not TRL's exact text): earlier turns lose the empty reasoning block."""
    template = template_text(FAMILIES["qwen3"]) + "\n"  # TRL recognises templates by exact text
    (tmp_path / "t.jinja").write_text(template)
    rows = [{"messages": SINGLE}] * 3 + [{"messages": MULTI}] * 2
    path = recipe(tmp_path, "builtin:tiny", rows)
    template_file = tmp_path / "t.jinja"
    path.write_text(path.read_text().replace("dtype: float32", f"dtype: float32, chat_template: {template_file}"))
    result = cli("validate", path)
    assert result.returncode == 2
    assert f"{tmp_path / 'data.jsonl'}:4: the chat template renders assistant turn 1 differently once later turns " \
           "follow" in result.stderr
    assert "one row per assistant turn" in result.stderr and "Traceback" not in result.stderr
    assert cli("sft", path, "--dry-run").returncode == 2


@pytest.mark.parametrize("name, warning", [
    ("mistral_nemo", "drops the system prompt from 1 of 1 row(s)"),
    ("deepseek_r1_distill", "the generation prompt ends '<think>\\n'"),
    ("qwen3", "adds '<think>\\n\\n</think>\\n\\n' before the assistant's text"),
    ("gemma2", "has no system role: the system message of 1 row(s) is put at the start of the first user turn"),
])
def test_what_the_template_does_to_the_data_is_warned(tmp_path, tmp_path_factory, name, warning):
    path = recipe(tmp_path, family_model(tmp_path_factory, name), [{"messages": [SYSTEM] + SINGLE}])
    lines, warnings = inspect(resolve(path), rows=1)
    assert any(warning in w for w in warnings), warnings


@pytest.mark.slow
def test_trl_data_warnings_reach_the_terminal_once(tmp_path, tmp_path_factory):
    """DeepSeek-R1-Distill with prompt-completion rows: TRL says the prompt is not a prefix; llmtune shows it."""
    rows = [{"prompt": [{"role": "user", "content": f"Question {i}?"}],
             "completion": [{"role": "assistant", "content": f"Answer {i}."}]} for i in range(3)]
    result = cli("data", "inspect", recipe(tmp_path, family_model(tmp_path_factory, "deepseek_r1_distill"), rows),
                 "--rows", "3")
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("The tokenized prompt is not a prefix") == 1


@pytest.mark.slow
def test_gemma_inspect_and_generate_with_a_system_prompt(tmp_path, tmp_path_factory):
    model = family_model(tmp_path_factory, "gemma2")
    result = cli("data", "inspect", recipe(tmp_path, model, [{"messages": [SYSTEM] + SINGLE}]))
    assert result.returncode == 0, result.stderr
    assert f"{SYSTEM['content']}\n    \n    {SINGLE[0]['content']}" in result.stdout or \
        f"{SYSTEM['content']}\n\n{SINGLE[0]['content']}" in result.stdout.replace("\n    ", "\n")
    generated = cli("generate", model, "--prompt", "Hi", "--system", "Be brief.", "--max-new-tokens", "3")
    assert generated.returncode == 0, generated.stderr


@pytest.mark.slow
def test_preference_rows_get_the_system_prompt_folded_for_gemma(tmp_path, tmp_path_factory):
    """DPO data on a template without a system role: the system text opens the user turn, chosen/rejected intact."""
    model = family_model(tmp_path_factory, "gemma2")
    rows = [{"prompt": [SYSTEM, SINGLE[0]], "chosen": [SINGLE[1]],
             "rejected": [{"role": "assistant", "content": "Lyon."}]}] * 2
    path = recipe(tmp_path, model, rows, method="dpo")
    resolved = resolve(path)
    data = load_data(resolved.config["data"], method="dpo", seed=0, locate=resolved.locate,
                     model=resolved.config["model"])
    row = data.train[0]
    assert row["prompt"] == [{"role": "user", "content": f"{SYSTEM['content']}\n\n{SINGLE[0]['content']}"}]
    assert row["chosen"] == [SINGLE[1]]
    assert any("system message of 2 row(s) is put at the start of the first user turn" in w for w in data.warnings)
    planned = cli("plan", path)
    assert planned.returncode == 0, planned.stderr
    assert "system message of 2 row(s)" in planned.stdout + planned.stderr


@pytest.mark.slow
def test_a_run_shows_the_template_warnings_and_trls_once_in_the_terminal_and_train_log(tmp_path, tmp_path_factory):
    rows = [{"prompt": [{"role": "user", "content": f"Question {i}?"}],
             "completion": [{"role": "assistant", "content": f"Answer {i}."}]} for i in range(16)]
    path = recipe(tmp_path, family_model(tmp_path_factory, "deepseek_r1_distill"), rows)
    result = cli("sft", path, "--output-dir", tmp_path / "run")
    assert result.returncode == 0, result.stderr
    log = (tmp_path / "run" / "train.log").read_text()
    for text in (result.stderr, log):
        assert text.count("The tokenized prompt is not a prefix") == 1
        assert text.count("the generation prompt ends '<think>\\n'") == 1


# Only Qwen3's template renders `reasoning_content` (in the last turn); every other family trains the answer alone.
REASONING_TRAINS = {"qwen3": ("<think>\n17 + 25: 17 + 20 = 37, plus 5 is 42.\n</think>\n\n17 + 25 = 42.<|im_end|>\n",
                              "rewrites earlier turns once later ones follow"),
                    "deepseek_r1_distill": ("<｜Assistant｜>17 + 25 = 42.<｜end▁of▁sentence｜>",
                                            "rewrites the assistant's text")}


@pytest.mark.parametrize("name", FAMILIES)
def test_reasoning_rows_train_what_the_template_renders(tmp_path, tmp_path_factory, name):
    """recipes/data/reasoning.jsonl: `reasoning_content` and inline <think> rows, through each family's template."""
    rows = [json.loads(line) for line in (RECIPES / "data" / "reasoning.jsonl").read_text().splitlines()]
    view, data = view_of(tmp_path, family_model(tmp_path_factory, name), rows)
    first = [r for r, _ in view.rows(data.train) if r["messages"][0]["content"] == "What is 17 + 25?"]
    default = (TRL_COPY_TRAINS.get(name, "{}" + FAMILIES[name].end_of_turn).format("17 + 25 = 42.") +
               TRL_COPY_CLOSES.get(name, ""), "does not render the reasoning_content of")
    trained, warning = REASONING_TRAINS.get(name, default)
    assert trained_runs(view.tokenizer, view.tokenize(first)[0]) == [trained]
    assert any(warning in w for w in data.warnings), data.warnings


def test_reasoning_content_belongs_to_assistant_turns(tmp_path):
    rows = [{"messages": [{"role": "user", "content": "Hi", "reasoning_content": "r"},
                          {"role": "assistant", "content": "Hello"}]}]
    result = cli("validate", recipe(tmp_path, "builtin:tiny", rows))
    assert result.returncode == 2
    assert f"{tmp_path / 'data.jsonl'}:1: 'reasoning_content' of messages[0] must be a string on an assistant turn" \
        in result.stderr


PREFERENCE = [{"prompt": [SYSTEM, {"role": "user", "content": "Say hi"}], "chosen": [{"role": "assistant", "content": "hi!"}],
               "rejected": [{"role": "assistant", "content": "go away"}]}] * 2


@pytest.mark.parametrize("name", FAMILIES)
def test_dpo_chosen_and_rejected_end_with_the_end_of_turn_token(tmp_path, tmp_path_factory, name):
    """As TRL's DPOTrainer tokenizes them through llmtune: what follows the end-of-turn token is at most a newline
    and the eos the template closes the conversation with (Phi-3), both of which generation stops before; each is
    the answer as alpaca rows train it, after the prompt inference renders (system prompt included)."""
    family = FAMILIES[name]
    trainer = built_trainer(tmp_path, "dpo", PREFERENCE, family_model(tmp_path_factory, name))
    tokenizer, row = trainer.processing_class, trainer.train_dataset[0]
    end = tokenizer.convert_tokens_to_ids(family.end_of_turn)
    for key, answer in (("chosen_ids", "hi!"), ("rejected_ids", "go away")):
        ids = row[key]
        last = len(ids) - 1 - ids[::-1].index(end)
        assert answer in tokenizer.decode(ids[:last]), (key, tokenizer.decode(ids))
        tail = ids[last + 1:]
        assert tokenizer.decode([t for t in tail if t != tokenizer.eos_token_id]).strip() == "", (key, tail)
        # Exactly the answer as the template renders it after the prompt, Mistral-Nemo's with the system prompt too.
        trained = ALPACA_TRAINS.get(name, "{}" + family.end_of_turn).format(answer)
        assert tokenizer.decode(row[key]) == trained, (key, tokenizer.decode(row[key]))
    assert_context_is_the_inference_prompt(tokenizer, row["prompt_ids"], PREFERENCE[0]["prompt"], name)


@pytest.fixture(scope="module")
def nemo_adding_bos(tmp_path_factory):
    """Mistral-Nemo's fixture with a tokenizer that puts <s> before any text it encodes, as the published one does."""
    from tokenizers import processors

    family = FAMILIES["mistral_nemo"]
    folder, tokenizer = tmp_path_factory.mktemp("nemo-bos"), build_tokenizer(family)
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tokenizer.bos_token_id)])
    build_model(family, tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


ALPACA_SYSTEM = {"instruction": "Say hi", "output": "hi!", "system": SYSTEM["content"]}
# Where each trainer keeps the context and the trained tokens of a row it has tokenized.
TOKENIZED = {"sft": lambda r: ([t for t, label in zip(r["input_ids"], r["labels"]) if label == -100],
                               [label for label in r["labels"] if label != -100]),
             "dpo": lambda r: (r["prompt_ids"], r["chosen_ids"]),
             "orpo": lambda r: (r["prompt_input_ids"], [t for t in r["chosen_labels"] if t != -100]),
             "kto": lambda r: (r["prompt_ids"], r["completion_ids"])}


@pytest.mark.slow
@pytest.mark.parametrize("method", TOKENIZED)
def test_mistral_nemo_trains_the_answer_after_the_inference_prompt_with_one_bos(tmp_path, nemo_adding_bos, method):
    """With a system prompt (which Nemo's template puts in the last user turn only), every prompt + answer method
    trains exactly the answer and its </s> after the prompt as `llmtune generate` renders it, with one <s>, though
    the tokenizer adds <s> to text as well."""
    rows = [ALPACA_SYSTEM] * 2 if method == "sft" else PREFERENCE
    trainer = built_trainer(tmp_path, method, rows, nemo_adding_bos)
    tokenizer = trainer.processing_class
    context, trained = TOKENIZED[method](trainer.train_dataset[0])
    assert tokenizer.decode(trained) == "hi!</s>"
    assert context.count(tokenizer.bos_token_id) == 1
    assert_context_is_the_inference_prompt(tokenizer, context, PREFERENCE[0]["prompt"], "mistral_nemo")


def trained_answers(dataset, tokenizer) -> dict:
    """Each SFT row's trained tokens, decoded: the token ids of its context."""
    return {tokenizer.decode(TOKENIZED["sft"](row)[1]): TOKENIZED["sft"](row)[0] for row in dataset}


@pytest.mark.slow
def test_a_streamed_mistral_nemo_sft_trains_the_answer_after_the_inference_prompt(tmp_path, nemo_adding_bos):
    """`data.streaming`: the stream's rows go to TRL as text too, decided by its first rows, so each row trains
    exactly what the same rows train when read whole."""
    rows = [{**ALPACA_SYSTEM, "instruction": f"Question {i}?", "output": f"Answer {i}."} for i in range(12)]
    (tmp_path / "stream").mkdir(), (tmp_path / "whole").mkdir()
    streamed = built_trainer(tmp_path / "stream", "sft", rows, nemo_adding_bos,
                             data={"streaming": True}, train={"max_steps": 2})
    tokenizer = streamed.processing_class
    trained = trained_answers(streamed.train_dataset, tokenizer)
    assert sorted(trained) == sorted(f"Answer {i}.</s>" for i in range(12))
    assert trained_answers(built_trainer(tmp_path / "whole", "sft", rows, nemo_adding_bos).train_dataset,
                           tokenizer) == trained
    context = trained["Answer 0.</s>"]
    assert context.count(tokenizer.bos_token_id) == 1
    assert_context_is_the_inference_prompt(tokenizer, context, [SYSTEM, {"role": "user", "content": "Question 0?"}],
                                           "mistral_nemo")


@pytest.mark.slow
def test_a_streamed_mistral_nemo_row_with_a_system_prompt_after_the_head_trains_its_answer(tmp_path, nemo_adding_bos,
                                                                                           monkeypatch):
    """The stream's head shows no system prompt (Mistral-Nemo renders it only in the prompt inference sees), later
    rows have one: those rows, too, train exactly their answer after the inference prompt."""
    from llmtune.data import masking, stream

    monkeypatch.setattr(masking, "HEAD_ROWS", 4)
    monkeypatch.setattr(stream, "SHUFFLE_BUFFER", 1)  # the rows in file order: the head is the first 4
    rows = [{"instruction": f"Question {i}?", "output": f"Answer {i}."} for i in range(4)] + \
        [{**ALPACA_SYSTEM, "instruction": f"Question {i}?", "output": f"Answer {i}."} for i in range(4, 12)]
    streamed = built_trainer(tmp_path, "sft", rows, nemo_adding_bos, data={"streaming": True},
                             train={"max_steps": 2})
    tokenizer = streamed.processing_class
    trained = trained_answers(streamed.train_dataset, tokenizer)
    assert sorted(trained) == sorted(f"Answer {i}.</s>" for i in range(12))
    for i, prompt in ((0, []), (7, [SYSTEM])):
        assert trained[f"Answer {i}.</s>"].count(tokenizer.bos_token_id) == 1
        assert_context_is_the_inference_prompt(tokenizer, trained[f"Answer {i}.</s>"],
                                               prompt + [{"role": "user", "content": f"Question {i}?"}],
                                               "mistral_nemo")


@pytest.mark.parametrize("template, inference, prompt_ends, completion", [
    # The system prompt in the last user turn only: the context is the prompt as inference renders it.
    (FAMILIES["mistral_nemo"].template, True, "[INST]S.\n\nU?[/INST]", "A.{eos}"),
    # The generation prompt opens a reasoning block a finished turn leaves out or closes: TRL's cut is kept.
    ("deepseek_r1_distill", False, "U?<｜Assistant｜>", "A.<｜end▁of▁sentence｜>"),
    ("nemotron_3_nano", False, "<|im_start|>assistant\n<think>", "</think>A.<|im_end|>\n"),
])
def test_prompt_rows_as_text(template, inference, prompt_ends, completion):
    """The text a prompt + answer row goes to TRL as where a template renders the prompt differently before the answer
    (data/masking.py `as_text`); only such a dataset is converted."""
    from llmtune.builtin import build_tiny_tokenizer
    from llmtune.data.masking import as_text
    from llmtune.paths import read_chat_template

    tokenizer = build_tiny_tokenizer()
    tokenizer.chat_template = template if "{" in template else read_chat_template(template)
    row = {"prompt": [{"role": "system", "content": "S."}, {"role": "user", "content": "U?"}],
           "completion": [{"role": "assistant", "content": "A."}]}
    text, took_inference = as_text(tokenizer, row)
    assert took_inference == inference
    assert text["prompt"].endswith(prompt_ends) and text["completion"] == completion.format(eos=tokenizer.eos_token)
    context = tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
    assert text["prompt"] == context if inference else context.startswith(text["prompt"])


@pytest.mark.slow
def test_a_mistral_nemo_run_on_alpaca_rows_with_a_system_prompt(tmp_path, tmp_path_factory):
    """The run trains (loss falls) on the text rows, without TRL's "not a prefix" warning; llmtune's says what the
    template does, once, in the terminal and train.log."""
    rows = [{**ALPACA_SYSTEM, "instruction": f"Question {i}?"} for i in range(8)]
    result = cli("sft", recipe(tmp_path, family_model(tmp_path_factory, "mistral_nemo"), rows),
                 "--output-dir", tmp_path / "run")
    assert result.returncode == 0, result.stderr
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert len(losses) == 2 and losses[-1] < losses[0]
    for text in (result.stderr, (tmp_path / "run" / "train.log").read_text()):
        assert "not a prefix" not in text
        assert text.count("renders the prompt differently before the answer than alone (8 prompt row(s))") == 1


ANSWER = ("Say hi", "hi!")
# What the generation prompt leaves to the model before the answer: Qwen3's empty reasoning block.
GENERATED = {"qwen3": "<think>\n\n</think>\n\n"}


@pytest.fixture(scope="module")
def full_runs(tmp_path_factory):
    """family -> a tiny full fine-tuning run directory that learned to answer ANSWER (one per family, on demand)."""
    from llmtune.runner.session import train as run

    runs = {}

    def trained(name):
        if name not in runs:
            folder = tmp_path_factory.mktemp(f"run-{name}")
            rows = [{"messages": [{"role": "user", "content": ANSWER[0]},
                                  {"role": "assistant", "content": ANSWER[1]}]}] * 8
            recipe = make_recipe(folder, data={"train": [{"path": write_jsonl(folder / "hi.jsonl", rows)}],
                                               "max_length": 256},
                                 model={"name": str(family_model(tmp_path_factory, name))},
                                 train={"learning_rate": 1.0e-2, "max_steps": 40, "per_device_train_batch_size": 8,
                                        "gradient_checkpointing": False, "save_strategy": "no", "disable_tqdm": True})
            run(resolve(recipe), ["llmtune", "sft", str(recipe)], output_dir=str(folder / "run"))
            runs[name] = folder / "run"
        return runs[name]

    return trained


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILIES)
def test_generate_stops_at_the_end_of_turn_token(full_runs, name):
    """`llmtune generate` on the run directory stops there, and so does plain transformers with the saved
    generation_config.json (what serving stacks read): its eos includes the end-of-turn token."""
    import torch
    from transformers import AutoModelForCausalLM

    from llmtune.tools.infer import Sampling, generate, load, prompt_ids

    run_dir = full_runs(name)
    loaded = load(run_dir)
    end = loaded.tokenizer.convert_tokens_to_ids(FAMILIES[name].end_of_turn)
    assert end in json.loads((run_dir / "generation_config.json").read_text())["eos_token_id"]
    ids = prompt_ids(loaded.tokenizer, [{"role": "user", "content": ANSWER[0]}])
    new = generate(loaded, ids, Sampling(max_new_tokens=16))
    assert loaded.tokenizer.decode(new) == GENERATED.get(name, "") + ANSWER[1]
    plain = AutoModelForCausalLM.from_pretrained(run_dir)
    with torch.no_grad():
        out = plain.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=16)
    assert out[0, ids.shape[1]:].tolist() == new + [end]


# Alpaca rows train the completion as TRL's prompt-completion tokenization cuts it: where the template renders
# more after the end-of-turn token (a newline, Phi-3's closing eos), that is trained too.
ALPACA_TRAINS = {"smollm2": "{}<|im_end|>\n", "qwen2_5": "{}<|im_end|>\n", "qwen3": "<think>\n\n</think>\n\n{}<|im_end|>\n",
                 "gemma2": "{}<end_of_turn>\n", "gemma3": "{}<end_of_turn>\n", "phi3": "{}<|end|>\n<|endoftext|>"}


@pytest.mark.parametrize("system", [False, True])
@pytest.mark.parametrize("name", FAMILIES)
def test_alpaca_rows_train_the_output_and_its_end_of_turn_token(tmp_path, tmp_path_factory, name, system):
    family = FAMILIES[name]
    row = {"instruction": SINGLE[0]["content"], "output": SINGLE[1]["content"],
           **({"system": SYSTEM["content"]} if system else {})}
    view, data = view_of(tmp_path, family_model(tmp_path_factory, name), [row])
    trained = ALPACA_TRAINS.get(name, "{}" + family.end_of_turn).format(SINGLE[1]["content"])
    tokens = view.tokenize([r for r, _ in view.rows(data.train)])[0]
    assert trained_runs(view.tokenizer, tokens) == [trained]
    first = next(i for i, label in enumerate(tokens["labels"]) if label != -100)
    assert_context_is_the_inference_prompt(view.tokenizer, tokens["input_ids"][:first],
                                           ([SYSTEM] if system else []) + SINGLE[:1], name)
    if name == "mistral_nemo" and system:  # what the template does is still said
        assert any("renders the prompt differently before the answer than alone (1 prompt row(s)): "
                   "'Answer briefly.\\n\\nWhat is the capital of ' alone" in w for w in data.warnings), data.warnings
        assert not any("drops the system prompt" in w for w in data.warnings), data.warnings


def assert_context_is_the_inference_prompt(tokenizer, context, prompt, name):
    """`context` (the tokens before the trained ones) is what `llmtune generate` feeds the model for `prompt` (Mistral-Nemo's
    system prompt included). DeepSeek-R1-Distill's generation prompt ends `<think>\n`, which its template leaves
    out of a finished turn: the answer trains after the context that turn renders with (docs/templates.md)."""
    from llmtune.tools.infer import prompt_ids

    inference = prompt_ids(tokenizer, prompt)[0].tolist()
    if name == "deepseek_r1_distill":
        assert inference[:len(context)] == context and tokenizer.decode(inference[len(context):]) == "<think>\n"
    else:
        assert context == inference, (tokenizer.decode(context), tokenizer.decode(inference))
