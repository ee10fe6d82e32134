"""The one exception type for bad user input (recipe, data, command line)."""


class UserError(Exception):
    """Bad input from the user: printed without a traceback, exit code 2.

    Holds every problem found, each already formatted as ``FILE:LINE:COL: message``
    (or ``FILE:LINE: message`` for data rows), so one run reports them all.
    """

    def __init__(self, problems):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))
