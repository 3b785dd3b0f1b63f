"""The exception types users see. The CLI turns each into one line and exit code 1."""


class StepDistillError(Exception):
    """A problem the user can fix: the message names the problem and the fix."""


class ConfigError(StepDistillError):
    """A config (YAML or flags) that does not validate; the message lists every mistake."""


class DataError(StepDistillError):
    """Task data that cannot be read: a missing file, a line without a required field."""


class RunExistsError(StepDistillError):
    """A run directory that already holds a run and would be overwritten."""
