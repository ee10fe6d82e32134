"""The verb table: one entry per training method, pointing at its runner module.

Kept import-light (no torch/TRL): the CLI builds its verbs from it and `validate` reads
each method's TRL config class from source through `config`.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    name: str
    config: str          # the TRL config class the recipe's `train:` section becomes
    runner: str          # module with `run(resolved, run_dir) -> dict of final metrics`
    summary: str
    experimental: bool = False


METHODS = {
    m.name: m
    for m in (
        Method("sft", "trl:SFTConfig", "llmtune.methods.sft",
               "Supervised fine-tuning on chat, instruction, prompt-completion or plain text data."),
    )
}
