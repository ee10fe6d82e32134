"""Many processes, many machines: accelerate and DeepSpeed configs, the launch command, the rules.

- `launcher`: a recipe's `launch:` section -> a shipped accelerate config (recipes/launch/)
  filled in for this machine -> `accelerate launch -m llmtune ...` through accelerate's API.
- `rules`: compatibility rules checked before launch, one table (docs/distributed.md renders it).
- `rank`: what a launched process does differently (rank-0-only writes, devices, failures).
- `compat`: workarounds for the libraries, each with its expiry.

Import-light: torch, accelerate and yaml are imported inside the functions that need them.
"""

from .launcher import Launch, effective_batch, launch_command, settle

__all__ = ["Launch", "effective_batch", "launch_command", "settle"]
