"""Workarounds for the launch libraries, each with what it works around and when it can go."""

from __future__ import annotations


def fsdp_on_cpu() -> None:
    """Let accelerate run FSDP on a machine without GPUs (how the tests run FSDP2 for real).

    accelerate 1.15 turns an FSDP launch into FSDP only from a GPU-type distributed state:
    `AcceleratorState.__init__` checks MULTI_GPU/XPU/NPU/..., and MULTI_CPU falls through to
    plain DDP, silently. PyTorch's FSDP2 itself runs on CPU over gloo. So when accelerate's
    launcher asked for FSDP (ACCELERATE_USE_FSDP) and the state came up MULTI_CPU, promote it
    to FSDP. Checked against accelerate 1.15.0; remove once its FSDP branch accepts MULTI_CPU
    (tests/test_launch.py asserts the FSDP run's model really is FSDP-wrapped).
    """
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    if getattr(AcceleratorState.__init__, "llmtune_fsdp_on_cpu", False):
        return
    original = AcceleratorState.__init__

    def init(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    init.llmtune_fsdp_on_cpu = True
    AcceleratorState.__init__ = init
