"""Run a recipe under `accelerate launch`, through accelerate's Python API.

The recipe's `launch:` section (or --num-processes/--backend/--nodes/...) chooses a shipped
accelerate config under recipes/launch/; llmtune fills in the process count, machines and
ports, writes it under the llmtune cache (the same file for the same settings, so
`llmtune launch --print` shows what a run uses), and starts `python -m llmtune VERB ...` in
every process. Those see LOCAL_RANK and train instead of launching again.
"""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from ..files import write_atomic
from ..paths import LAUNCH_CONFIGS as CONFIGS
from ..paths import cache_dir
from ..recipe import rules
from .rank import LAUNCH_DIR_ENV


@dataclass(frozen=True)
class Launch:
    backend: str
    processes: int  # per machine
    nodes: int = 1
    node_rank: int = 0
    main_addr: str | None = None
    main_port: int | None = None
    deepspeed_config: str | None = None  # the recipe's own DeepSpeed file

    @property
    def world(self) -> int:
        return self.processes * self.nodes

    @property
    def needed(self) -> bool:
        """One process with DDP is a plain run; anything else goes through accelerate."""
        return self.world > 1 or self.backend != "ddp"


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count()


def settle(config: dict, node_rank: int = 0, gpus: int | None = None) -> Launch:
    """The recipe's `launch:` section with `auto` turned into a number for this machine."""
    launch = config["launch"]
    processes = launch["num_processes"]
    if processes == "auto":
        processes = max(gpu_count() if gpus is None else gpus, 1)
    return Launch(backend=launch["backend"], processes=processes, nodes=launch["nodes"], node_rank=node_rank,
                  main_addr=launch["main_addr"], main_port=launch["main_port"],
                  deepspeed_config=launch["deepspeed_config"])


def effective_batch(config: dict, num_processes: int) -> int:
    """Rows (or packed sequences) per optimizer step: per device x accumulation x processes."""
    per_device, accumulation = rules.batch_settings(config)
    return per_device * accumulation * num_processes


def preflight(resolved, launch: Launch, gpus: int, extra_args=()) -> list[str]:
    """The launch-time rules: raises UserError with every problem, else returns the lines to print."""
    ctx = rules.Context(resolved.config, processes=launch.processes, gpus=gpus, node_rank=launch.node_rank,
                        extra_args=tuple(extra_args))
    found = rules.findings(ctx, "launch")
    errors = [f"{resolved.locate(f.key)}: {f.message}" if f.key else f.message for f in found if f.level == "error"]
    if errors:
        raise UserError(errors)
    return [f"{f.level}: {f.message}" if f.level == "warning" else f.message for f in found]


def accelerate_config(launch: Launch) -> tuple[dict, Path | None]:
    """The accelerate config for `launch` (a shipped one, filled in) and the DeepSpeed file it names."""
    import yaml

    config = yaml.safe_load((CONFIGS / f"{launch.backend}.yaml").read_text(encoding="utf-8"))
    deepspeed = None
    if launch.backend in rules.DEEPSPEED:
        deepspeed = Path(launch.deepspeed_config or CONFIGS / f"{launch.backend}.json")
    config.update(num_processes=launch.world, num_machines=launch.nodes, machine_rank=launch.node_rank)
    if launch.nodes > 1:
        config.update(main_process_ip=launch.main_addr, main_process_port=launch.main_port or 29500)
    else:
        config["main_process_port"] = launch.main_port or 0  # 0: accelerate picks a free port
    return config, deepspeed


def config_dir(resolved, launch: Launch) -> Path:
    """Where the configs for this recipe and launch go: named by their content, so the same settings
    always give the same file."""
    key = repr((launch, (CONFIGS / f"{launch.backend}.yaml").read_text(encoding="utf-8"),
                Path(launch.deepspeed_config).read_text(encoding="utf-8") if launch.deepspeed_config else ""))
    return cache_dir() / "launch" / f"{resolved.config['name']}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"


def write_config(resolved, launch: Launch) -> Path:
    """Write accelerate.yaml (and deepspeed.json) for `launch`; returns the accelerate config's path."""
    import yaml

    folder = config_dir(resolved, launch)
    folder.mkdir(parents=True, exist_ok=True)
    config, deepspeed = accelerate_config(launch)
    if deepspeed is not None:
        write_atomic(folder / "deepspeed.json", deepspeed.read_text(encoding="utf-8"))
        config["deepspeed_config"]["deepspeed_config_file"] = str(folder / "deepspeed.json")
    header = (f"# Written by llmtune for `{resolved.config['name']}`: recipes/launch/{launch.backend}.yaml with "
              f"{launch.processes} process(es) on each of {launch.nodes} machine(s).\n")
    write_atomic(folder / "accelerate.yaml", header + yaml.safe_dump(config, sort_keys=False))
    return folder / "accelerate.yaml"


def child_args(verb: str, recipe: str, sets, launch: Launch, passthrough=()) -> list[str]:
    """`llmtune VERB ...` as every launched process runs it (`passthrough`: its other options); the
    launch settings are recorded in its resolved recipe."""
    settled = ("launch.num_processes=", "launch.backend=", "launch.nodes=", "launch.main_addr=", "launch.main_port=")
    args = [verb, recipe, *(a for s in sets if not s.startswith(settled) for a in ("--set", s)),
            "--set", f"launch.num_processes={launch.processes}", "--set", f"launch.backend={launch.backend}",
            "--set", f"launch.nodes={launch.nodes}"]
    if launch.main_addr:
        args += ["--set", f"launch.main_addr={launch.main_addr}"]
    if launch.main_port:
        args += ["--set", f"launch.main_port={launch.main_port}"]
    return args + list(passthrough)


def launch_command(resolved, launch: Launch, args: list[str], extra_args=()) -> list[str]:
    """The `accelerate launch` command line that runs `llmtune ARGS` (see child_args) for `launch`.
    Pure: the config it names is written by write_config (same path for the same settings)."""
    config = config_dir(resolved, launch) / "accelerate.yaml"
    return ["accelerate", "launch", "--config_file", str(config), *extra_args, "-m", "llmtune", *args]


def spawn(resolved, launch: Launch, args: list[str], extra_args=()) -> int:
    """Launch, wait, and return the exit code; a failed launch prints its first failing rank's error."""
    from accelerate.commands.launch import launch_command as accelerate_launch
    from accelerate.commands.launch import launch_command_parser
    from torch.distributed import run  # noqa: F401  (imported now, so its loggers exist to be lowered below)
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    config = write_config(resolved, launch)
    command = launch_command(resolved, launch, args, extra_args)
    parsed = launch_command_parser().parse_args(command[2:])
    os.environ[LAUNCH_DIR_ENV] = str(config.parent)
    if not gpu_count():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed would otherwise warn in every process
    # The elastic agent logs every rank's exit and a failure table; the first failure is printed below instead.
    for name in list(logging.root.manager.loggerDict):  # torch sets a level on each of its loggers
        if name.startswith("torch.distributed.elastic"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        accelerate_launch(parsed)
    except ChildFailedError as err:
        return report(err)
    except SignalException:  # Ctrl-C / SIGTERM: the launcher passed it on; each process saved a checkpoint and exited
        return 130
    except SystemExit as err:  # the same where accelerate (1.16) exits with 128 + the signal number instead
        if err.code in (128 + signal.SIGINT, 128 + signal.SIGTERM):
            return 130
        raise
    except ValueError as err:  # accelerate's own checks of the config and arguments
        raise UserError(f"accelerate launch refused the settings: {err}") from None
    return 0


def report(err) -> int:
    """Print the first failing rank's error once; return the exit code for the whole launch.

    A rank that raised wrote its error (rank.record_failure); the others were stopped by the
    launcher once it failed, and show only a signal."""
    failures = sorted(err.failures.items(), key=lambda item: (
        not isinstance(item[1].error_file_data.get("message"), dict), item[1].timestamp, item[0]))
    ranked, failure = failures[0]
    message = failure.error_file_data.get("message")
    if isinstance(message, dict):
        info = message.get("extraInfo", {})
        sys.stderr.write(f"error: rank {ranked} ({info.get('host', 'localhost')}) failed:\n")
        for line in message["message"].splitlines():
            sys.stderr.write(f"error: {line}\n")
        if info.get("py_callstack"):
            sys.stderr.write(info["py_callstack"].rstrip() + "\n")
        return int(info.get("llmtune_exit_code", 1))
    sys.stderr.write(f"error: rank {ranked} exited with {failure.exitcode} ({failure.message}); the output above "
                     "is its own\n")
    return 1
