"""Tests for llmtune.recipe.fields: reading dataclass fields from source, checking values."""

import dataclasses
import importlib
import json
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest

from llmtune.recipe import fields as f

REPO_ROOT = Path(__file__).resolve().parents[1]

# (target given to dataclass_fields, module to import, class name) for every config
# class recipes are passed to.
REAL_TARGETS = [
    ("trl:SFTConfig", "trl", "SFTConfig"),
    ("trl:DPOConfig", "trl", "DPOConfig"),
    ("trl:KTOConfig", "trl", "KTOConfig"),
    ("trl:RewardConfig", "trl", "RewardConfig"),
    ("trl:GRPOConfig", "trl", "GRPOConfig"),
    ("trl:RLOOConfig", "trl", "RLOOConfig"),
    ("trl.experimental.orpo:ORPOConfig", "trl.experimental.orpo", "ORPOConfig"),
    ("peft:LoraConfig", "peft", "LoraConfig"),
    ("transformers:TrainingArguments", "transformers", "TrainingArguments"),
]


def real_class(module, name):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # trl.experimental warns on import
        return getattr(importlib.import_module(module), name)


def init_field_names(cls):
    # dataclass_fields leaves out init=False fields, which the constructor does not
    # take, and private (_name) fields, which recipes must not set. None of the real
    # config classes has either today; the demo package below has both.
    return [fld.name for fld in dataclasses.fields(cls) if fld.init and not fld.name.startswith("_")]


@pytest.mark.parametrize(("target", "module", "name"), REAL_TARGETS, ids=[t[0] for t in REAL_TARGETS])
def test_fields_match_the_real_dataclass(target, module, name):
    # Same names in the same order, inherited fields (TrainingArguments, PeftConfig) included.
    assert list(f.dataclass_fields(target)) == init_field_names(real_class(module, name))


def test_module_path_target_matches_exported_name():
    assert f.dataclass_fields("trl.trainer.sft_config:SFTConfig") == f.dataclass_fields("trl:SFTConfig")
    assert f.field_names("trl:SFTConfig") == list(f.dataclass_fields("trl:SFTConfig"))


def test_literal_defaults_match_the_real_sftconfig():
    parsed = f.dataclass_fields("trl:SFTConfig")
    computed = set()
    for fld in dataclasses.fields(real_class("trl", "SFTConfig")):
        if not isinstance(fld.default, (type(None), bool, int, float, str)):
            continue
        ours = parsed[fld.name].default
        if ours is f.COMPLEX:
            computed.add(fld.name)
        else:
            # Compare types too: 10 and 10.0 (or True and 1) are equal but not the same default.
            assert (type(ours), ours) == (type(fld.default), fld.default), fld.name
    # TrainingArguments.optim defaults to a class-level variable set from the torch
    # version at import time; source alone cannot tell its value.
    assert computed == {"optim"}


def test_help_and_choices():
    sft = f.dataclass_fields("trl:SFTConfig")
    assert sft["learning_rate"].help
    assert sft["loss_type"].choices == ("nll", "dft", "chunked_nll")
    assert sft["include_for_metrics"].default is f.FACTORY  # inherited, default_factory=list


def test_bad_targets():
    with pytest.raises(ValueError):
        f.dataclass_fields("trl.SFTConfig")
    with pytest.raises(LookupError):
        f.dataclass_fields("trl:NoSuchConfig")
    with pytest.raises(LookupError):
        f.dataclass_fields("no_such_package_llmtune:Config")


# --- the resolution rules, on a small package written for the test -------------

DEMO_PACKAGE = {
    # Lazy: the exported name appears only in an _import_structure-style dict.
    "llmtune_demo/__init__.py": """
        _import_structure = {"configs": ["ChildConfig"]}
    """,
    "llmtune_demo/base.py": """
        from dataclasses import dataclass, field
        from typing import ClassVar

        class Mixin:
            not_a_field: int = 0

        @dataclass
        class Base(Mixin):
            shared: int = field(default=1, metadata={"help": "from " + "base"})
            overridden: float = 0.5
            dropped: int = 5
            hidden: int = field(default=0, init=False)
            _private: int = 0
            kind: ClassVar[str] = "x"
    """,
    "llmtune_demo/configs/__init__.py": """
        from .child import ChildConfig
    """,
    "llmtune_demo/configs/child.py": """
        from dataclasses import dataclass, field
        from ..base import Base

        @dataclass(kw_only=True)
        class ChildConfig(Base):
            overridden: float = field(default=2.0, metadata={"help": ("a " "b"), "choices": [1.0, 2.0]})
            dropped: int = field(default=5, init=False)
            required: "int | None"
            items: list[str] = field(default_factory=list)
            computed: int = len("abc")
    """,
    # Subclasses an imported class of the same name.
    "llmtune_demo/shadow.py": """
        from dataclasses import dataclass
        from .configs.child import ChildConfig

        @dataclass(kw_only=True)
        class ChildConfig(ChildConfig):
            extra: bool = False
    """,
    # Exported nowhere: only scanning the files finds it, and the string below must not fool the scan.
    "llmtune_demo/aaa_decoy.py": """
        TEXT = "class Hidden(object): pass"
    """,
    # Enum-typed fields: a strict enum (through an imported base) gives choices; a lenient `_missing_` and
    # `auto()` values do not.
    "llmtune_demo/enums.py": """
        from dataclasses import dataclass
        from enum import Enum, auto
        from typing import Optional, Union

        class Explicit(str, Enum):
            @classmethod
            def _missing_(cls, value):
                "Refuse with a better message."
                raise ValueError(f"{value} is not valid")

        class Colour(Explicit):
            RED = "red"
            BLUE = "blue"

        class Lenient(str, Enum):
            A = "a"

            @classmethod
            def _missing_(cls, value):
                return cls.A

        class Counted(Enum):
            ONE = auto()

        @dataclass
        class Painted:
            colour: Union[Colour, str] = "red"
            maybe: Optional[Colour] = None
            lenient: Lenient | str = "a"
            counted: Counted | str = "x"
            colours: list[Colour] | None = None
    """,
    "llmtune_demo/hidden.py": """
        from dataclasses import dataclass

        @dataclass
        class Hidden:
            x: int = 3
    """,
}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("src")
    for name, text in DEMO_PACKAGE.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(root))
        yield
        for name in [m for m in sys.modules if m.split(".")[0] == "llmtune_demo"]:
            del sys.modules[name]


def test_demo_fields_follow_dataclass_rules(demo):
    parsed = f.dataclass_fields("llmtune_demo:ChildConfig")
    real = importlib.import_module("llmtune_demo.configs").ChildConfig
    assert list(parsed) == init_field_names(real) == ["shared", "overridden", "required", "items", "computed"]
    assert parsed["shared"] == f.FieldInfo("shared", "int", 1, "from base", None)
    assert parsed["overridden"] == f.FieldInfo("overridden", "float", 2.0, "a b", (1.0, 2.0))
    assert parsed["required"] == f.FieldInfo("required", "int | None", f.MISSING, "", None)
    assert parsed["items"].default is f.FACTORY
    assert parsed["computed"].default is f.COMPLEX


def test_demo_base_of_the_same_name(demo):
    real = importlib.import_module("llmtune_demo.shadow").ChildConfig
    assert f.field_names("llmtune_demo.shadow:ChildConfig") == init_field_names(real)
    assert f.field_names("llmtune_demo.shadow:ChildConfig")[-1] == "extra"


def test_demo_enum_fields_take_a_strict_enums_values_only(demo):
    painted = f.dataclass_fields("llmtune_demo.enums:Painted")
    assert painted["colour"].choices == painted["maybe"].choices == ("red", "blue")
    assert f.check_value(painted["colour"], "blue") is None and f.check_value(painted["maybe"], None) is None
    assert f.check_value(painted["colour"], "bleu") == "did you mean 'blue'? expected one of: 'red', 'blue'"
    assert f.check_value(painted["colour"], "green") == "expected one of: 'red', 'blue'"
    for lenient in ("lenient", "counted", "colours"):  # _missing_ may accept it; auto(); a list of them
        assert painted[lenient].choices is None, lenient


def test_demo_unexported_class_is_found_by_scanning(demo):
    assert f.dataclass_fields("llmtune_demo:Hidden")["x"].default == 3


# --- check_value and coerce -----------------------------------------------------


def info(annotation, choices=None):
    return f.FieldInfo("x", annotation, f.MISSING, "", choices)


def test_float_field():
    lr = f.dataclass_fields("trl:SFTConfig")["learning_rate"]
    for ok in (2e-4, 1, "2e-4"):
        assert f.check_value(lr, ok) is None, ok
    assert f.coerce(lr, "2e-4") == 0.0002
    assert f.coerce(lr, 1) == 1
    assert f.check_value(lr, "abc") == "expected float, got str 'abc'"
    assert f.check_value(lr, True) == "expected float, got bool True"
    assert f.check_value(info("float | None"), None) is None


def test_int_and_bool_fields():
    assert f.check_value(info("int"), 3) is None
    assert f.check_value(info("int"), True) == "expected int, got bool True"
    assert f.check_value(info("int"), "1e3") is not None  # text becomes a float, never an int
    assert f.check_value(info("bool"), "yes") == "expected bool, got str 'yes'"
    assert f.check_value(info("bool"), False) is None


def test_text_is_kept_where_the_field_takes_text():
    assert f.coerce(info("float | str"), "1e-4") == "1e-4"
    assert f.coerce(info("str"), "1e-4") == "1e-4"


def test_choices():
    loss_type = f.dataclass_fields("trl:SFTConfig")["loss_type"]
    assert f.check_value(loss_type, "dft") is None
    assert f.check_value(loss_type, "bad") == "expected one of: 'nll', 'dft', 'chunked_nll'"


def test_enum_fields_of_the_trainer_configs_take_the_enums_values():
    """`optim: OptimizerNames | str` and the like: the config class refuses any other text, so validate does."""
    import transformers.trainer_utils as utils
    from transformers.training_args import OptimizerNames

    for target in ("trl:SFTConfig", "trl:DPOConfig", "trl:GRPOConfig"):
        known = f.dataclass_fields(target)
        for name, enum in (("optim", OptimizerNames), ("lr_scheduler_type", utils.SchedulerType),
                           ("eval_strategy", utils.IntervalStrategy), ("save_strategy", utils.SaveStrategy),
                           ("logging_strategy", utils.IntervalStrategy), ("hub_strategy", utils.HubStrategy)):
            assert known[name].choices == tuple(member.value for member in enum), (target, name)
    assert f.check_value(known["lr_scheduler_type"], "cosin").startswith("did you mean 'cosine'? expected one of: ")


def test_uninterpretable_annotation_accepts_anything():
    for annotation in ("SomeEnum", "not valid python [", "Callable[[int], int]"):
        for value in ("abc", 1, None, [1], {"a": 1}):
            assert f.check_value(info(annotation), value) is None


def test_real_annotations():
    sft = f.dataclass_fields("trl:SFTConfig")
    assert f.check_value(sft["lr_scheduler_type"], "cosine") is None  # SchedulerType | str
    for ok in (None, "wandb", ["wandb", "tensorboard"]):
        assert f.check_value(sft["report_to"], ok) is None  # None | str | list[str]
    assert f.check_value(sft["report_to"], [1]) == "expected None | str | list[str], got list [1]"
    assert f.check_value(sft["model_init_kwargs"], {"dtype": "bfloat16"}) is None

    lora = f.dataclass_fields("peft:LoraConfig")
    assert f.check_value(lora["bias"], "none") is None  # Literal['none', 'all', 'lora_only']
    assert f.check_value(lora["bias"], "some") is not None
    # target_modules: Optional[Union[list[str], str]]
    assert f.check_value(lora["target_modules"], ["q_proj", "v_proj"]) is None
    assert f.check_value(lora["target_modules"], "all-linear") is None
    assert f.check_value(lora["target_modules"], 3) is not None
    assert f.check_value(lora["layer_replication"], [[0, 4], [2, 5]]) is None  # list[tuple[int, int]]
    assert f.check_value(lora["layer_replication"], [[0, 4, 5]]) is not None
    # bool | Literal[..., 'pissa_niter_[number of iters]', ...]: the placeholder stands for a family.
    for ok in (True, "gaussian", "pissa_niter_16"):
        assert f.check_value(lora["init_lora_weights"], ok) is None
    assert f.check_value(lora["init_lora_weights"], 1) is not None


def test_long_values_are_shortened():
    message = f.check_value(info("int"), "x" * 500)
    assert len(message) < 100 and message.endswith("...")


def test_reading_fields_imports_no_ml_package_and_is_fast():
    code = (
        "import json, sys, time\n"
        "import llmtune.recipe.fields as f\n"
        "start = time.perf_counter()\n"
        "f.dataclass_fields('trl:SFTConfig')\n"
        "seconds = time.perf_counter() - start\n"
        "heavy = any(m in sys.modules for m in ('torch', 'transformers', 'trl', 'peft'))\n"
        "print(json.dumps({'heavy': heavy, 'seconds': seconds}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    )
    result = json.loads(out.stdout)
    assert result["heavy"] is False
    assert result["seconds"] < 0.5


def test_a_lone_value_is_accepted_where_a_list_is_expected():
    info = f.dataclass_fields("trl:DPOConfig")["loss_type"]
    assert f.check_value(info, "ipo") is None and f.coerce(info, "ipo") == ["ipo"]
    assert f.check_value(info, 3) is not None
