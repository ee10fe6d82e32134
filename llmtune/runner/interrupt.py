"""SIGINT/SIGTERM: finish the current optimizer step, save a checkpoint, exit 130.

A pre-empted job gets SIGTERM and a grace period; Ctrl-C sends SIGINT. The first signal
only sets a flag; at the end of the step every process agrees (one all-reduce) to stop at
the same step, so the checkpoint is saved collectively. A second signal exits at once.
Signals within a second of the first count as the same one: Ctrl-C reaches a process both
from the terminal and forwarded by `accelerate launch`.
"""

from __future__ import annotations

import os
import signal
import sys
import time

from ..ranks import is_main_process, launched

SIGNALS = (signal.SIGINT, signal.SIGTERM)
SAME_SIGNAL_S = 1.0


def _say(message: bytes) -> None:
    """Once per launch (rank 0), and safe inside a signal handler (no buffered I/O)."""
    if is_main_process():
        os.write(sys.stderr.fileno(), message)


def _exit_quietly(signum, frame) -> None:
    os._exit(130)


class Interrupted(KeyboardInterrupt):
    """Training stopped on a signal after saving a checkpoint (exit code 130)."""


class Interruption:
    def __init__(self):
        self.received: float | None = None  # when the first signal came
        self.training = False  # inside the training loop: stop at the step's end, not at once
        self.step: int | None = None  # the step training stopped at
        self._previous: dict = {}

    def install(self) -> "Interruption":
        try:
            self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        except ValueError:  # not the main thread (e.g. called from a notebook's worker): keep the defaults
            self._previous = {}
        return self

    def uninstall(self) -> None:
        """Put back the previous handlers. A launched rank instead exits quietly on a late signal: when another
        rank fails, the launcher stops this one, often while it is already shutting down, and a traceback
        from its exit handlers would bury the failing rank's error."""
        for sig, handler in self._previous.items():
            signal.signal(sig, _exit_quietly if launched() else handler)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        now = time.monotonic()
        if self.received is not None:
            if now - self.received < SAME_SIGNAL_S:
                return
            _say(b"\nsecond signal: exiting now, without saving\n")
            os._exit(130)
        self.received = now
        if not self.training:
            raise KeyboardInterrupt
        _say(b"\nstopping: saving a checkpoint at the end of this step (signal again to exit at once)\n")

    def attach(self, trainer) -> None:
        """Stop `trainer` at the end of the step a signal arrives in, with a checkpoint."""
        from transformers import TrainerCallback

        owner = self

        class StopOnSignal(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                owner.training = True

            def on_step_end(self, args, state, control, **kwargs):
                if owner._agreed(args):
                    owner.step = state.global_step
                    control.should_save = control.should_log = control.should_training_stop = True

            def on_train_end(self, args, state, control, **kwargs):
                owner.training = False

        trainer.add_callback(StopOnSignal())

    def _agreed(self, args) -> bool:
        """Whether any process got a signal (all of them take part, so all stop at this step)."""
        stop = self.received is not None
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            import torch

            flag = torch.tensor([int(stop)], device=args.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            stop = bool(flag.item())
        return stop
