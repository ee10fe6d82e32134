"""CLI start-up: `llmtune --help` and `llmtune validate` against `trl --help`.

Goal: llmtune answers no slower than the TRL CLI. Run: python benchmarks/startup.py [--repeats 10]
"""

import argparse
import shutil

from common import ROOT, table, timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=10)
    repeats = parser.parse_args().repeats
    llmtune, trl = shutil.which("llmtune"), shutil.which("trl")
    recipe = ROOT / "recipes" / "quickstart.yaml"
    commands = {
        "trl --help": [trl, "--help"],
        "llmtune --help": [llmtune, "--help"],
        "llmtune validate --no-data": [llmtune, "validate", str(recipe), "--no-data"],
        "llmtune validate (with data)": [llmtune, "validate", str(recipe)],
    }
    for argv in commands.values():  # warm the file cache and the prepared-data cache
        timed(argv)
    rows = [(label, [timed(argv) for _ in range(repeats)]) for label, argv in commands.items()]
    table("CLI start-up", rows, "seconds", "trl --help")


if __name__ == "__main__":
    main()
