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
