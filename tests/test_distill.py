"""`llmtune distill` (TRL's experimental GKD): the student's divergence from the teacher falls over the run; the
teacher must share the student's tokenizer, checked before any model loads (validate), with the reason."""

import pytest
import torch

from llmtune.errors import UserError
from llmtune.recipe.check import resolve
from llmtune.runner import preflight
from llmtune.runner.session import train as run

from .conftest import CHAT, cli, make_recipe

TRAIN = {"learning_rate": 1.0e-2, "max_steps": 16, "per_device_train_batch_size": 8, "gradient_checkpointing": False,
         "logging_steps": 4, "save_strategy": "no", "disable_tqdm": True, "lmbda": 0.0, "beta": 0.5}


def teacher_model(folder, seed=7, extra_token=None):
    """builtin:tiny's architecture and tokenizer with other random weights (a model the student is not)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmtune.builtin import builtin_path

    tiny = builtin_path("tiny")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(tiny)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.1)
    model.save_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    if extra_token:
        tokenizer.add_tokens([extra_token])
    tokenizer.save_pretrained(folder)
    return folder


def forward_kl(student, teacher, tokenizer, rows=16):
    """Mean KL(teacher || student) per next-token position over the first rows of the training data."""
    import json

    texts = [tokenizer.apply_chat_template(json.loads(line)["messages"], tokenize=False)
             for line in CHAT.read_text().splitlines()[:rows]]
    total, count = 0.0, 0
    with torch.no_grad():
        for text in texts:
            ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
            p = torch.log_softmax(teacher(input_ids=ids).logits, -1)
            q = torch.log_softmax(student(input_ids=ids).logits, -1)
            total += (p.exp() * (p - q)).sum(-1).sum().item()
            count += ids.shape[1]
    return total / count


@pytest.mark.slow
def test_student_moves_toward_the_teacher(tmp_path):
    from transformers import AutoModelForCausalLM

    from llmtune.builtin import builtin_path
    from llmtune.tools.infer import load

    teacher = teacher_model(tmp_path / "teacher")
    recipe = make_recipe(tmp_path, "distill", teacher_model=str(teacher), adapter={"type": "lora", "r": 16,
                         "alpha": 32}, data={"max_length": 128}, train=TRAIN)
    metrics = run(resolve(recipe), ["llmtune", "distill", str(recipe)], output_dir=str(tmp_path / "run"))
    assert metrics["last_loss"] < 0.7 * metrics["first_loss"], metrics  # GKD's loss: the JSD to the teacher

    # Measured apart from the trainer: the forward KL to the teacher on the data, before and after.
    teacher_lm = AutoModelForCausalLM.from_pretrained(teacher).eval()
    before = AutoModelForCausalLM.from_pretrained(builtin_path("tiny")).eval()
    after = load(tmp_path / "run")
    tokenizer = after.tokenizer
    kl_before, kl_after = (forward_kl(m, teacher_lm, tokenizer) for m in (before, after.model))
    assert kl_after < 0.8 * kl_before, (kl_before, kl_after)
    manifest = (tmp_path / "run" / "train.log").read_text()
    assert "trl.experimental.gkd, which TRL ships as experimental" in manifest


def problems(recipe):
    with pytest.raises(UserError) as err:
        preflight.model(resolve(recipe))
    return err.value.problems


def test_teacher_with_another_tokenizer_is_refused_with_the_reason(tmp_path, llmtune_cache):
    teacher = teacher_model(tmp_path / "teacher", extra_token="<extra>")
    found = problems(make_recipe(tmp_path, "distill", teacher_model=str(teacher)))
    assert len(found) == 1 and found[0].startswith(f"{tmp_path / 'r.yaml'}:3:1: the teacher")
    assert "does not share the student's tokenizer: their vocabularies differ" in found[0]
    assert "'<extra>' is id None in the student's and" in found[0]
    assert "llmtune generate TEACHER --data" in found[0]  # the other way: data distillation


def test_distill_needs_a_teacher_and_only_distill_takes_one(tmp_path):
    with pytest.raises(UserError, match=r"r.yaml:1:1: `method: distill` learns from a teacher model: add "
                       "`teacher_model:`"):
        resolve(make_recipe(tmp_path, "distill"))
    with pytest.raises(UserError, match=r"`llmtune sft` learns from no teacher; remove `teacher_model:`"):
        resolve(make_recipe(tmp_path, "sft", teacher_model="builtin:tiny"))
    with pytest.raises(UserError, match=r"set the top-level `teacher_model:`"):
        resolve(make_recipe(tmp_path, "distill", teacher_model="builtin:tiny",
                            train={"teacher_model_name_or_path": "x"}))


def test_missing_teacher_folder(tmp_path):
    found = problems(make_recipe(tmp_path, "distill", teacher_model=str(tmp_path / "nope")))
    assert found[0].startswith(f"{tmp_path / 'r.yaml'}:3:1: teacher_model: {tmp_path / 'nope'}: no such folder")


@pytest.mark.slow  # a CLI subprocess
def test_cli_validate_refuses_another_tokenizer_with_exit_2(tmp_path):
    teacher = teacher_model(tmp_path / "teacher", extra_token="<extra>")
    result = cli("validate", make_recipe(tmp_path, "distill", teacher_model=str(teacher)))
    assert result.returncode == 2 and "does not share the student's tokenizer" in result.stderr
    assert "Traceback" not in result.stderr
