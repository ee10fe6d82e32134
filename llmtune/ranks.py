"""Which process this is: launched or not, its rank, whether it is the one that writes.

A process runs under a launcher when torchrun (which `accelerate launch` uses) has set LOCAL_RANK,
whether llmtune started the launch or the user ran `accelerate launch -m llmtune`. RANK is set by
the launcher before torch.distributed starts, so this is known without importing torch.
"""

from __future__ import annotations

import os


def launched() -> bool:
    return "LOCAL_RANK" in os.environ


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main_process() -> bool:
    """Rank 0 of a launch, or a single process."""
    return rank() == 0
