"""llmtune/compat.py holds every use of a library's private API; this fails, naming the shims to re-check,
when an installed library is outside the versions they were checked against."""

import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version

import pytest

from llmtune import compat

DISTRIBUTIONS = {"lm_eval": "lm-eval"}  # import name -> distribution name, where they differ


def _release(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split("+")[0].split("."):
        digits = "".join(ch for ch in piece if ch.isdigit()) if piece[:1].isdigit() else ""
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def outside_checked(installed: dict[str, str]) -> list[str]:
    """One line per shim whose library is installed at a version outside CHECKED."""
    lines = []
    for shim in compat.SHIMS:
        have = installed.get(shim.library)
        oldest, newest = compat.CHECKED[shim.library]
        if have is not None and not _release(oldest) <= _release(have) <= _release(newest):
            lines.append(f"{shim.name}: {shim.library} {have} is outside {oldest}..{newest}; uses {shim.uses}; "
                         f"can go when {shim.remove_when}")
    return lines


def _installed() -> dict[str, str]:
    out = {}
    for library in compat.CHECKED:
        try:
            out[library] = version(DISTRIBUTIONS.get(library, library))
        except PackageNotFoundError:
            pass
    return out


def test_installed_libraries_are_within_the_checked_versions():
    stale = outside_checked(_installed())
    assert not stale, "re-check these shims in llmtune/compat.py, then widen CHECKED:\n" + "\n".join(stale)


def test_a_newer_trl_lists_its_shims_to_recheck():
    lines = outside_checked({"trl": "1.17.0", "transformers": compat.CHECKED["transformers"][1]})
    assert lines and all(line.split(":")[0] in {s.name for s in compat.SHIMS if s.library == "trl"} for line in lines)
    assert {line.split(":")[0] for line in lines} == {"sft_dataset_preparer", "RefLogpsHook"}
    assert "trl 1.17.0 is outside 1.16.0..1.16.0" in lines[0]


@pytest.mark.parametrize("shim", compat.SHIMS, ids=lambda s: s.name)
def test_every_shim_says_what_it_uses_and_when_it_can_go(shim):
    assert shim.library in compat.CHECKED
    assert shim.uses and shim.remove_when


@pytest.mark.slow  # a subprocess importing torch and bitsandbytes, and compiling one op
def test_bitsandbytes_imports_without_torchinductor_and_compiles_its_ops_when_called():
    """bitsandbytes wraps ops in torch.compile as it is imported, which imports TorchInductor (~1 s, ~40 MB) in every
    process that imports PEFT; under llmtune's import hook that waits for an op's first call, with the same result."""
    code = ("import sys, torch\n"
            "from llmtune.compat import bitsandbytes_import_hook\n"
            "bitsandbytes_import_hook(offline=True)\n"
            "import bitsandbytes\n"
            "from bitsandbytes.backends.default import ops\n"
            "assert 'torch._inductor.compile_fx' not in sys.modules\n"
            "assert torch.compile.__module__.startswith('torch'), 'torch.compile is put back'\n"
            "code, absmax = torch.linspace(-1, 1, 256), torch.tensor([2.0])\n"
            "A = torch.arange(8, dtype=torch.uint8) * 32\n"
            "out = ops._dequantize_blockwise_compute(A, absmax, code, 8, torch.float32)\n"
            "assert torch.allclose(out, code[A.long()] * 2), out\n"
            "print('compiled on call:', 'torch._inductor.compile_fx' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "compiled on call: True" in done.stdout
