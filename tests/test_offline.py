"""llmtune stays offline unless a recipe names a Hub model or dataset."""

import subprocess
import sys

import pytest


def _kernels_enabled_after_main(env_value: str | None) -> str:
    code = ("import os, sys\n"
            "from llmtune.cli import main\n"
            "sys.argv = ['llmtune', '--help']\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            "from transformers.integrations.hub_kernels import _kernels_enabled\n"
            "print(os.environ['USE_HUB_KERNELS'], _kernels_enabled())")
    env = {k: v for k, v in __import__("os").environ.items() if k != "USE_HUB_KERNELS"}
    if env_value is not None:
        env["USE_HUB_KERNELS"] = env_value
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    return done.stdout.split("\n")[-2]


@pytest.mark.slow  # two subprocesses importing transformers
def test_hub_kernels_are_off_unless_the_environment_asks():
    # transformers 5.25 would otherwise fetch kernel code from the Hub for every model loaded on a GPU (and fail
    # offline): found on an H200 by benchmarks/gpu.py.
    assert _kernels_enabled_after_main(None) == "NO False"
    assert _kernels_enabled_after_main("YES") == "YES True"


def _hosts_looked_up(args: list, env_value: str | None) -> list[str]:
    """The host names `llmtune ARGS` resolves (each a would-be network connection), run as a user runs it: not
    offline and not under CI (conftest makes the tests offline, and TRL sends no telemetry under CI); this machine
    has no network anyway."""
    code = ("import socket, sys\n"
            "looked_up = []\n"
            "real = socket.getaddrinfo\n"
            "socket.getaddrinfo = lambda host, *a, **k: looked_up.append(host) or real(host, *a, **k)\n"
            "from llmtune.cli import main\n"
            f"sys.argv = ['llmtune', *{[str(a) for a in args]!r}]\n"
            "try:\n    main()\nexcept SystemExit as done:\n    assert done.code in (0, None), done.code\n"
            "print('looked up:', *looked_up)")
    env = {k: v for k, v in __import__("os").environ.items()
           if k not in ("USE_HUB_KERNELS", "HF_HUB_OFFLINE", "HF_HUB_DISABLE_TELEMETRY", "CI")}
    if env_value is not None:
        env["USE_HUB_KERNELS"] = env_value
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    return done.stdout.split("looked up:")[-1].split()


@pytest.mark.slow  # a short run, and a validate, in subprocesses
def test_a_run_of_a_local_recipe_looks_up_no_host(tmp_path):
    """No telemetry (TRL's trainers report each run to the Hub unless told not to), and no kernel asked of the Hub
    by bitsandbytes (imported by PEFT), which does so on a CPU with AVX512-BF16 unless USE_HUB_KERNELS=YES."""
    from bitsandbytes.functional import has_avx512bf16

    from .conftest import make_recipe

    recipe = make_recipe(tmp_path, adapter={"type": "lora", "r": 8, "alpha": 16},
                         train={"max_steps": 2, "save_strategy": "no", "learning_rate": 1e-3})
    assert _hosts_looked_up(["sft", recipe, "--output-dir", tmp_path / "run"], None) == []
    assert (tmp_path / "run" / "manifest.json").exists()  # it trained
    if has_avx512bf16():  # where bitsandbytes asks at all: the opt-in still reaches it
        assert "huggingface.co" in _hosts_looked_up(["validate", recipe], "YES")
