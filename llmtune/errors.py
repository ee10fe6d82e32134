"""The exception type for bad user input (recipe, data, command line), and its one kind found mid-run."""


class UserError(Exception):
    """Bad input from the user: printed without a traceback, exit code 2.

    Holds every problem found, each already formatted as ``FILE:LINE:COL: message``
    (or ``FILE:LINE: message`` for data rows), so one run reports them all.
    """

    def __init__(self, problems):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


class StreamedRowError(UserError):
    """A bad row reached while streaming (data/stream.py): found after the run started, so the run fails (exit 1)
    and says how to go on (runner/diagnose.py)."""

    def __init__(self, problems):
        super().__init__([f"{problem} (found while streaming)" for problem in UserError(problems).problems])
