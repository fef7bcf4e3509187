"""User-facing errors.

A ``ConfigError`` means the user can fix it by changing a config field or a file; the CLI prints
its message alone (no traceback) and exits with code 2, before any expensive work has started.
"""


class ConfigError(ValueError):
    """Bad input that the user can fix. The message names the field or file and what to do."""

    def __init__(self, where: str, problem: str, fix: str | None = None):
        self.where, self.problem, self.fix = where, problem, fix
        text = f"{where}: {problem}"
        if fix:
            text += f" -> {fix}"
        super().__init__(text)

    def __reduce__(self):
        # Picklable with its three fields: a sweep job's error travels back to the launcher
        # (submitit pickles the job's result) and would otherwise fail to unpickle.
        return type(self), (self.where, self.problem, self.fix)


class StageFailed(RuntimeError):
    """A stage ran and failed (training crashed, verification mismatch, ...)."""
