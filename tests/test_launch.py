"""Multi-process runs for real on 2 CPU processes (gloo): DDP, FSDP2, DeepSpeed ZeRO-2/3, QLoRA,
two "machines" on 127.0.0.1, a failing rank; the launch configs; every compatibility rule."""

import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from llmtune.errors import UserError
from llmtune.launch import effective_batch, launch_command, settle
from llmtune.launch.launcher import accelerate_config, child_args, preflight
from llmtune.paths import LAUNCH_CONFIGS as CONFIGS
from llmtune.recipe import rules
from llmtune.recipe.check import resolve

from .conftest import RECIPES, ROOT, assert_quiet, cli, make_recipe

CHAT = RECIPES / "data" / "chat.jsonl"
PREFERENCE = RECIPES / "data" / "preference.jsonl"
LORA = {"type": "lora", "r": 8, "alpha": 16}
FOUR_BIT = {"bits": 4, "compute_dtype": "float32"}
TRAIN = {"learning_rate": 3.0e-3, "max_steps": 6, "per_device_train_batch_size": 4, "gradient_checkpointing": False,
         "logging_steps": 2, "save_strategy": "no", "disable_tqdm": True}
needs_deepspeed = pytest.mark.skipif(__import__("importlib").util.find_spec("deepspeed") is None,
                                     reason="the deepspeed extra is not installed")


def recipe(tmp_path, adapter=LORA, method="sft", data=CHAT, name="r", **sections):
    """Six steps of `method` (LoRA unless `adapter` says otherwise) with `sections` (quantization:, launch:)."""
    return make_recipe(tmp_path, method, {"train": [{"path": data}], "max_length": 128}, name=name, adapter=adapter,
                       train=TRAIN, **sections)


def ranks(out: Path) -> list[dict]:
    return json.loads((out / "manifest.json").read_text())["ranks"]


def assert_ranks_agree(out: Path, world: int = 2) -> list[dict]:
    """Every rank took part in one run: same steps, same (all-reduced) losses, same data order."""
    seen = ranks(out)
    assert [r["rank"] for r in seen] == list(range(world))
    for key in ("steps", "losses_sha256", "last_loss", "data_fingerprint", "distributed_type"):
        assert len({json.dumps(r[key]) for r in seen}) == 1, (key, seen)
    assert seen[0]["steps"] == 6
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [m["step"] for m in logged if "loss" in m]
    assert steps == sorted(set(steps)), "only rank 0 writes metrics.jsonl"
    losses = [m["loss"] for m in logged if "loss" in m]
    assert losses[-1] < losses[0]
    return seen


BACKENDS = {  # backend: (adapter or full, what accelerate must really have run)
    "ddp": (LORA, "MULTI_CPU"),
    "fsdp": (LORA, "FSDP"),
    "zero2": (LORA, "DEEPSPEED"),
    "zero3": (None, "DEEPSPEED"),  # full fine-tuning: the 16-bit weights are gathered into one model file
}


@pytest.mark.distributed
@pytest.mark.parametrize("backend", [pytest.param(b, marks=needs_deepspeed) if b.startswith("zero") else b
                                     for b in BACKENDS])
def test_backend_trains_on_two_processes(tmp_path, backend):
    adapter, distributed = BACKENDS[backend]
    out = tmp_path / "out"
    result = cli("sft", recipe(tmp_path, adapter), "--gpus", "2", "--backend", backend, "--output-dir", out,
                 "--set", "train.disable_tqdm=false", cwd=tmp_path)
    assert_quiet(result, out, 2)  # the batch, one bar, one summary (not one per rank), no library chatter
    assert result.stdout.count("run directory:") == 1
    assert "built successfully" not in result.stdout  # DeepSpeed's shared-memory op, built by each CPU process
    # The card, written by rank 0, counts every process in the effective batch.
    assert "| effective batch | 8 = 4 per device x 1 accumulated x 2 processes |" in (out / "README.md").read_text()
    seen = assert_ranks_agree(out)
    assert seen[0]["distributed_type"] == distributed
    if backend == "fsdp":
        assert seen[0]["model"].startswith("FSDP")  # sharded for real, not DDP under another name
    launched = yaml.safe_load((out / "launch" / "accelerate.yaml").read_text())
    assert launched["num_processes"] == 2 and "mixed_precision" not in launched
    assert yaml.safe_load((out / "recipe.yaml").read_text().split("\n", 1)[1])["launch"]["backend"] == backend

    import torch
    from transformers import AutoModelForCausalLM

    from llmtune.builtin import builtin_path

    base = AutoModelForCausalLM.from_pretrained(builtin_path("tiny")).state_dict()
    if adapter:
        from peft import AutoPeftModelForCausalLM

        model = AutoPeftModelForCausalLM.from_pretrained(out)
        lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
        assert lora_b and all(p.abs().sum() > 0 for p in lora_b)  # consolidated, trained adapter weights
    else:
        model = AutoModelForCausalLM.from_pretrained(out)
        trained = model.state_dict()
        assert all(trained[k].shape == v.shape for k, v in base.items())  # whole tensors, not shards
        assert any(not torch.equal(trained[k], v) for k, v in base.items())
    ids = torch.tensor([[1, 2, 3]])
    assert model.generate(input_ids=ids, max_new_tokens=3, do_sample=False).shape[1] > 3


@pytest.mark.distributed
def test_accelerate_launch_of_llmtune_with_a_shipped_config(tmp_path):
    """The user's own `accelerate launch -m llmtune ...`, here with recipes/launch/ddp.yaml as it ships."""
    out = tmp_path / "out"
    accelerate = Path(sys.executable).with_name("accelerate")
    result = subprocess.run([str(accelerate), "launch", "--config_file", str(CONFIGS / "ddp.yaml"), "--num_processes",
                             "2", "-m", "llmtune", "sft", str(recipe(tmp_path)), "--output-dir", str(out)],
                            capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("run directory:") == 1  # rank 0's summary
    assert_ranks_agree(out)


@pytest.mark.distributed
def test_qlora_under_ddp(tmp_path):
    out = tmp_path / "out"
    result = cli("sft", recipe(tmp_path, quantization=FOUR_BIT), "--num-processes", "2", "--output-dir", out,
                 cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_ranks_agree(out)
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"]


@pytest.mark.distributed
@needs_deepspeed
def test_dpo_under_zero2(tmp_path):
    out = tmp_path / "out"
    result = cli("dpo", recipe(tmp_path, method="dpo", data=PREFERENCE), "--num-processes", "2", "--backend",
                 "zero2", "--output-dir", out, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    seen = ranks(out)
    assert len(seen) == 2 and seen[0]["distributed_type"] == "DEEPSPEED"
    assert len({(r["steps"], r["losses_sha256"], r["data_fingerprint"]) for r in seen}) == 1
    assert (out / "adapter_model.safetensors").is_file()


@pytest.mark.distributed
def test_two_nodes_on_localhost(tmp_path):
    """Two launches of one process each, as two machines would start them, train one model together."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path, out = recipe(tmp_path), tmp_path / "out"
    nodes = [subprocess.Popen([sys.executable, "-m", "llmtune", "sft", str(path), "--num-processes", "1",
                               "--nodes", "2", "--node-rank", str(r), "--main-addr", "127.0.0.1", "--main-port",
                               str(port), "--output-dir", str(out)], cwd=tmp_path, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    results = [(n.communicate(timeout=300), n.returncode) for n in nodes]
    for (stdout, stderr), code in results:
        assert code == 0, stderr[-3000:]
    assert "run directory:" in results[0][0][0] and "run directory:" not in results[1][0][0]
    assert_ranks_agree(out)


FAIL_RANK_1 = """\
import os
if os.environ.get("RANK") == "1" and os.environ.get("LOCAL_RANK") is not None:
    import transformers

    def boom(self, *args, **kwargs):
        raise RuntimeError("rank 1 boom")

    transformers.Trainer.training_step = boom
"""


@pytest.mark.distributed
def test_a_failing_rank_stops_the_launch_quickly_and_shows_its_error_once(tmp_path):
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(FAIL_RANK_1)  # only the worker with RANK=1 breaks
    started = time.monotonic()
    result = cli("sft", recipe(tmp_path), "--num-processes", "2", "--output-dir", tmp_path / "out", cwd=tmp_path,
                 env={"PYTHONPATH": f"{hook}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"})
    elapsed = time.monotonic() - started
    assert result.returncode == 1, result.stderr[-3000:]
    assert elapsed < 120, elapsed
    # Once: the error line, and its traceback (whose last line repeats it); rank 0 was stopped, not reported.
    assert "error: rank 1 (" in result.stderr and "error: training failed: RuntimeError: rank 1 boom" in result.stderr
    assert result.stderr.count("RuntimeError: rank 1 boom") == 2 and result.stderr.count("Traceback") == 1
    assert "ChildFailedError" not in result.stderr


@pytest.mark.distributed
def test_a_bad_row_reached_while_streaming_stops_a_two_process_run_with_its_line_once(tmp_path):
    """The head (the first 1,000 rows) passes the checks; a row after it stops the launch once it is read: its
    FILE:LINE and what to do, once, no traceback on the terminal, the manifest says failed, no rank left hanging."""
    from llmtune.data.stream import CHECK_ROWS

    good = [json.loads(line) for line in CHAT.read_text().splitlines()]
    rows = [good[n % len(good)] for n in range(CHECK_ROWS + 50)]
    rows[CHECK_ROWS + 20] = {"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "x"}]}
    data = tmp_path / "big.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    path = make_recipe(tmp_path, "sft", {"train": [{"path": data}], "max_length": 128, "streaming": True},
                       adapter=LORA, train=TRAIN)
    out = tmp_path / "out"
    assert cli("validate", path).returncode == 0  # what it reads, the head, is good
    result = cli("sft", path, "--num-processes", "2", "--output-dir", out, cwd=tmp_path)
    assert result.returncode == 1, result.stderr[-3000:]
    problem = f"{data}:{CHECK_ROWS + 21}: unknown role 'robot' in messages[1]"
    assert f"error: training failed: {problem}" in result.stderr and result.stderr.count(problem) == 1
    assert "(found while streaming)" in result.stderr and "Traceback" not in result.stderr
    assert "Fix the row, or leave it out, and run again with `--overwrite` (no checkpoint had been completed)." \
        in result.stderr
    assert json.loads((out / "manifest.json").read_text())["status"] == "failed"


def test_launch_print_writes_the_config_it_names(tmp_path):
    result = cli("launch", recipe(tmp_path), "--backend", "zero3", "--num-processes", "2", "--print", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    command = shlex.split(result.stdout.strip().splitlines()[-1])
    assert command[:3] == ["accelerate", "launch", "--config_file"]
    config = yaml.safe_load(Path(command[3]).read_text())
    assert config["distributed_type"] == "DEEPSPEED" and config["num_processes"] == 2
    assert "mixed_precision" not in config  # accelerate refuses it next to a DeepSpeed file
    deepspeed = json.loads(Path(config["deepspeed_config"]["deepspeed_config_file"]).read_text())
    assert deepspeed["zero_optimization"]["stage"] == 3 and deepspeed["train_micro_batch_size_per_gpu"] == "auto"
    assert command[4:7] == ["-m", "llmtune", "train"] and "launch.backend=zero3" in command


def test_launch_command_and_effective_batch_as_functions(tmp_path):
    resolved = resolve(recipe(tmp_path), ["train.gradient_accumulation_steps=4"])
    assert effective_batch(resolved.config, 8) == 4 * 4 * 8
    launch = settle(resolved.config, gpus=8)
    assert launch.processes == 8 and launch.needed  # `auto` = every visible GPU
    assert settle(resolved.config, gpus=0).processes == 1  # a machine without GPUs: one process
    args = child_args("sft", "r.yaml", ["train.max_steps=2", "launch.backend=zero2"], launch)
    assert args[:4] == ["sft", "r.yaml", "--set", "train.max_steps=2"] and "launch.backend=zero2" not in args
    assert "launch.num_processes=8" in args and "launch.backend=ddp" in args  # what was settled, recorded
    command = launch_command(resolved, launch, args)
    assert command[:3] == ["accelerate", "launch", "--config_file"] and command[4:] == ["-m", "llmtune", *args]


def test_shipped_launch_configs_are_complete_and_hard_code_no_process_count():
    for backend in rules.DEEPSPEED + ("ddp", "fsdp"):
        shipped = yaml.safe_load((CONFIGS / f"{backend}.yaml").read_text())
        assert "num_processes" not in shipped and "mixed_precision" not in shipped
        if backend in rules.DEEPSPEED:
            file = shipped["deepspeed_config"]["deepspeed_config_file"]
            assert (ROOT / file).is_file()  # usable from the repository root as the header says
            settings = json.loads((ROOT / file).read_text())
            assert settings["train_micro_batch_size_per_gpu"] == settings["gradient_accumulation_steps"] == "auto"
        launch = settle({"launch": {"num_processes": 4, "backend": backend, "nodes": 2,
                                              "main_addr": "10.0.0.1", "main_port": None,
                                              "deepspeed_config": None}}, node_rank=1)
        config, _ = accelerate_config(launch)
        assert (config["num_processes"], config["num_machines"], config["machine_rank"]) == (8, 2, 1)
        assert (config["main_process_ip"], config["main_process_port"]) == ("10.0.0.1", 29500)
    offload = json.loads((CONFIGS / "zero3-offload.json").read_text())["zero_optimization"]
    assert offload["offload_optimizer"]["device"] == offload["offload_param"]["device"] == "cpu"


# ---- compatibility rules: each fires on a recipe that breaks it ----

def problems(path, *sets):
    with pytest.raises(UserError) as err:
        resolve(path, list(sets))
    return "\n".join(err.value.problems)


def test_rule_8bit_with_sharding(tmp_path):
    path = recipe(tmp_path, quantization={"bits": 8}, launch={"backend": "zero3"})
    assert re.search(r"r\.yaml:\d+:\d+: 8-bit bitsandbytes weights cannot be sharded by `launch.backend: zero3`",
                     problems(path))
    assert "cannot be sharded by `launch.backend: fsdp`" in problems(path, "launch.backend=fsdp")
    resolve(path, ["launch.backend=zero2"])  # a whole copy per process is fine


def test_rule_4bit_storage_is_set_or_refused(tmp_path):
    path = recipe(tmp_path, quantization={"bits": 4, "compute_dtype": "bfloat16"}, launch={"backend": "fsdp"})
    assert resolve(path).config["quantization"]["quant_storage"] == "bfloat16"
    assert "set `quantization.quant_storage: bfloat16`" in problems(path, "quantization.quant_storage=uint8")
    assert resolve(path, ["launch.backend=ddp"]).config["quantization"]["quant_storage"] is None


def test_rule_device_map_cannot_be_set(tmp_path, monkeypatch):
    path = recipe(tmp_path)
    assert "`train.model_init_kwargs` is managed by llmtune" in problems(path, "train.model_init_kwargs={device_map: auto}")
    # What llmtune places a quantized model with instead, per kind of launch: never `auto`.
    import torch
    import transformers

    from llmtune.model import load_model

    seen = []
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda *args, **kwargs: seen.append(kwargs.get("device_map", "unplaced")))
    qlora = resolve(recipe(tmp_path, quantization=FOUR_BIT),
                    ["model.attn_implementation=sdpa"]).config

    def placement(**env):
        for name in ("LOCAL_RANK", "RANK", "ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED",
                     "ACCELERATE_DEEPSPEED_CONFIG_FILE", "ACCELERATE_DEEPSPEED_ZERO_STAGE"):
            monkeypatch.delenv(name, raising=False)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        load_model(qlora)
        return seen[-1]

    assert placement() == {"": "cpu"}  # one process on a machine without GPUs
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert placement() == {"": "cuda:0"}
    assert placement(LOCAL_RANK="1", RANK="3") == {"": "cuda:1"}  # ddp: a whole copy on the process's own GPU
    zero = dict(LOCAL_RANK="1", ACCELERATE_USE_DEEPSPEED="true")
    assert placement(**zero, ACCELERATE_DEEPSPEED_ZERO_STAGE="2") == {"": "cuda:1"}
    assert placement(**zero, ACCELERATE_DEEPSPEED_ZERO_STAGE="3") == "unplaced"  # zero3 shards it: not placed
    assert placement(LOCAL_RANK="1", ACCELERATE_USE_FSDP="true") == "unplaced"  # nor does fsdp
    load_model(resolve(recipe(tmp_path), ["model.attn_implementation=sdpa"]).config)
    assert seen[-1] == "unplaced"  # an unquantized model is placed by the trainer, not at load time


def test_rule_deepspeed_file_against_train(tmp_path):
    own = tmp_path / "ds.json"
    own.write_text(json.dumps({"train_micro_batch_size_per_gpu": 16, "bf16": {"enabled": True},
                               "fp16": {"enabled": True}, "zero_optimization": {"stage": 2}}))
    path = recipe(tmp_path, launch={"backend": "zero2", "deepspeed_config": "ds.json"})
    found = problems(path)
    assert "sets `train_micro_batch_size_per_gpu: 16` but `train.per_device_train_batch_size` is 4" in found
    assert "enables both bf16 and fp16" in found
    assert "does not use DeepSpeed" in problems(path, "launch.backend=ddp")


@pytest.mark.slow
def test_rule_mixed_precision_with_deepspeed(tmp_path):
    result = cli("launch", recipe(tmp_path), "--backend", "zero2", "--print", "--", "--mixed_precision", "bf16",
                 cwd=tmp_path)
    assert result.returncode == 2 and "remove it and set `train.bf16: true`" in result.stderr
    result = cli("launch", recipe(tmp_path), "--print", "--", "--num_processes", "4", cwd=tmp_path)
    assert result.returncode == 2 and "use --num-processes instead" in result.stderr


def test_rule_packing_strategy(tmp_path):
    resolved = resolve(recipe(tmp_path), ["data.packing=true", "train.packing_strategy=wrapped"])
    lines = preflight(resolved, settle(resolved.config, gpus=0), gpus=0)
    assert any(line.startswith("warning: `packing_strategy: wrapped`") for line in lines)


@pytest.mark.slow
def test_rule_processes_against_gpus_and_machines(tmp_path):
    resolved = resolve(recipe(tmp_path), ["launch.num_processes=4"])
    with pytest.raises(UserError, match=r"4 processes asked for, but this machine has 2 GPU\(s\)"):
        preflight(resolved, settle(resolved.config, gpus=2), gpus=2)
    with pytest.raises(UserError, match=r"`launch.num_processes` must be >= 1"):
        preflight(resolved, settle(resolve(recipe(tmp_path), ["launch.num_processes=0"]).config), gpus=0)
    assert "no GPU on this machine: 4 processes run on the CPU (gloo)" in preflight(
        resolved, settle(resolved.config, gpus=0), gpus=0)
    result = cli("sft", recipe(tmp_path), "--nodes", "2", "--output-dir", tmp_path / "out", cwd=tmp_path)
    assert result.returncode == 2 and "pass `--main-addr HOST`" in result.stderr
    assert not (tmp_path / "out").exists()


def test_rule_deepspeed_installed(tmp_path, monkeypatch):
    resolved = resolve(recipe(tmp_path), ["launch.backend=zero2"])
    monkeypatch.setattr(rules, "find_spec", lambda name: None)
    with pytest.raises(UserError, match=r"pip install 'llmtune-recipes\[deepspeed\]'"):
        preflight(resolved, settle(resolved.config, gpus=0), gpus=0)


def test_docs_render_the_rules_and_docker_installs_its_extras():
    page = (ROOT / "docs" / "distributed.md").read_text()
    assert rules.markdown() in page
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    extras = re.search(r'pip install[^\n]*"\.\[([\w,]+)\]"', dockerfile).group(1).split(",")
    assert "deepspeed" in extras
    assert f'.[{",".join(extras)}]' in page  # the Docker section names what the image installs
