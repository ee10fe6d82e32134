"""Adapter types through PEFT's own config classes: each trains, saves, reloads and generates."""

import json

import pytest
import torch

from llmtune.builtin import builtin_path
from llmtune.errors import UserError
from llmtune.model import convert_adapter, peft_config, save_initial_adapter
from llmtune.recipe.check import resolve
from llmtune.recipe.schema import mergeable
from llmtune.runner.session import train as run
from llmtune.tools.infer import Sampling, generate, load, prompt_ids

from .conftest import RECIPES, make_recipe

SHORT = ["train.max_steps=20", "train.logging_steps=2", "data.eval=0"]
# name: (shipped recipe, overrides, PEFT's peft_type in the saved adapter_config.json)
CASES = {
    "ia3": ("adapters/ia3.yaml", [], "IA3"),
    "prefix": ("adapters/prefix.yaml", [], "PREFIX_TUNING"),
    "prompt": ("adapters/prompt.yaml", [], "PROMPT_TUNING"),
    "p_tuning": ("adapters/p_tuning.yaml", [], "P_TUNING"),
    "pissa": ("adapters/pissa.yaml", [], "LORA"),
    "olora": ("adapters/pissa.yaml", ["adapter.init_lora_weights=olora"], "LORA"),
    "gaussian": ("quickstart.yaml", ["adapter.init_lora_weights=gaussian"], "LORA"),
    "loraplus": ("adapters/loraplus.yaml", [], "LORA"),
}


def tiny():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(builtin_path("tiny"))


@pytest.mark.slow
@pytest.mark.parametrize("name", CASES)
def test_each_adapter_trains_saves_reloads_and_generates(tmp_path, name):
    recipe, sets, peft_type = CASES[name]
    out = tmp_path / name
    metrics = run(resolve(RECIPES / recipe, [*SHORT, *sets]), ["llmtune", "sft"], output_dir=str(out))
    assert metrics["last_loss"] < 0.95 * metrics["first_loss"], metrics
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["peft_type"] == peft_type
    loaded = load(out)
    new = generate(loaded, prompt_ids(loaded.tokenizer, [{"role": "user", "content": "Hi"}]), Sampling(6))
    assert len(new) > 0
    ids = torch.tensor([[1, 40, 50, 60, 70]])
    with torch.no_grad():
        logits = loaded.model(ids).logits
        if mergeable(peft_type):  # what `llmtune merge` relies on: folded in, the model computes the same
            torch.testing.assert_close(loaded.model.merge_and_unload()(ids).logits, logits, atol=1e-4, rtol=1e-4)
        else:  # virtual tokens: `llmtune merge` says there is nothing to fold
            from llmtune.tools.export import merge

            with pytest.raises(UserError, match="adds virtual tokens rather than weight updates"):
                merge(out, tmp_path / "merged")
    if name in ("pissa", "olora"):  # saved converted to plain LoRA of twice the rank (see the test below)
        assert saved["r"] == 32 and saved["init_lora_weights"] is True
        assert not (out / "initial_adapter").exists()
    if name == "loraplus":  # modules_to_save: the whole head is trained and saved with the adapter
        from safetensors.torch import load_file

        head = [k for k in load_file(out / "adapter_model.safetensors") if "lm_head" in k]
        assert head and not any("lora" in k for k in head)


@pytest.mark.slow
def test_lora_plus_gives_b_matrices_a_higher_learning_rate(tmp_path):
    import llmtune.runner.session

    seen = {}
    real = llmtune.runner.session.loraplus_optimizer

    def spy(trainer, ratio):
        seen["optimizer"] = real(trainer, ratio)
        return seen["optimizer"]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(llmtune.runner.session, "loraplus_optimizer", spy)
        run(resolve(RECIPES / "adapters/loraplus.yaml", ["train.max_steps=1", "data.eval=0"]), ["llmtune"],
            output_dir=str(tmp_path / "run"))
    rates = {group["initial_lr"] for group in seen["optimizer"].param_groups if group["params"]}
    assert {1.5e-3, 1.5e-3 * 16} <= rates


@pytest.mark.slow
@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_pissa_and_olora_start_from_a_decomposition_of_the_weights(init):
    from peft import get_peft_model

    base = tiny()
    weight = base.model.layers[0].self_attn.q_proj.weight.detach().clone()
    adapter = {"type": "lora", "loraplus_lr_ratio": None, "r": 8, "lora_alpha": 8, "init_lora_weights": init}
    layer = get_peft_model(base, peft_config(adapter)).base_model.model.model.layers[0].self_attn.q_proj
    a, b = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
    assert b.abs().sum() > 0  # plain LoRA starts B at zero; these start from the weight itself
    # The base keeps the residual: residual + B A is the original weight (scale alpha / r = 1).
    torch.testing.assert_close(layer.base_layer.weight.detach() + b @ a, weight, atol=1e-5, rtol=1e-5)
    if init == "pissa":  # B A is the weight's best rank-r approximation: its r principal singular components
        u, s, vh = torch.linalg.svd(weight)
        torch.testing.assert_close(b @ a, u[:, :8] @ torch.diag(s[:8]) @ vh[:8], atol=1e-4, rtol=1e-4)
    else:  # OLoRA: B is the first r columns of Q in weight = QR, orthonormal
        torch.testing.assert_close(b.T @ b, torch.eye(8), atol=1e-5, rtol=1e-5)


def test_a_pissa_adapter_is_saved_as_lora_that_fits_the_original_base(tmp_path):
    from peft import PeftModel, get_peft_model

    adapter = {"type": "lora", "loraplus_lr_ratio": None, "r": 8, "lora_alpha": 8, "init_lora_weights": "pissa"}
    model = get_peft_model(tiny(), peft_config(adapter))
    initial = save_initial_adapter(model, tmp_path)
    torch.manual_seed(0)
    with torch.no_grad():  # stands in for training
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.add_(0.05 * torch.randn_like(param))
    ids = torch.tensor([[1, 40, 50, 60, 70]])
    with torch.no_grad():
        trained = model(ids).logits
    model.save_pretrained(tmp_path)  # what the run saves; it fits only the residual base
    convert_adapter(model, tmp_path, initial)
    reloaded = PeftModel.from_pretrained(tiny(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, trained, atol=1e-4, rtol=1e-4)
    assert not initial.exists()


@pytest.mark.parametrize("adapter, message", [
    ({"type": "ia3", "r": 8}, r"r\.yaml:3:\d+: unknown key 'r' in adapter .*takes the fields of IA3Config"),
    ({"type": "prefix"}, r"`adapter.type: prefix` needs `adapter.num_virtual_tokens` \(Number of virtual tokens\)"),
    ({"type": "prompt", "num_virtual_tokens": 8, "loraplus_lr_ratio": 16}, r"LoRA\+ scales .* `type: prompt` has none"),
    ({"type": "lora", "loraplus_lr_ratio": 0}, r"`adapter.loraplus_lr_ratio` must be > 0"),
    ({"type": "lora", "use_dora": True}, r"`adapter.use_dora` is managed by llmtune: use `type: dora`"),
    ({"type": "lora", "init_lora_weights": "loftq"},
     r"`init_lora_weights: loftq` is not supported: it replaces the base"),
    ({"type": "prompt", "num_virtual_tokens": 8, "tokenizer_name_or_path": "x"},
     r"managed by llmtune: set from `model.name`"),
])
def test_adapter_sections_are_checked_against_their_peft_class(tmp_path, adapter, message):
    recipe = make_recipe(tmp_path, adapter=adapter)
    with pytest.raises(UserError, match=message):
        resolve(recipe)
