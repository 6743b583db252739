"""Errors that reach the user.

`UserError` is bad input (a config key, a file, a data row): the CLI prints one `error:` line and
exits 2. Anything else is a failure of ours or of the environment: exit 1.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input or configuration. The message names the file, key or row at fault."""


class Failure(Exception):
    """A failure whose message already says what went wrong (exit 1, printed as is)."""


class EvaluationFailed(Failure):
    """Evaluation gave no value for the metric that matters: any metric for `ganpipe evaluate` and
    the evaluation flow, the promotion metric in the pipeline (which then registers nothing)."""


class Diverged(Failure):
    """Non-finite losses or weights: training stops, naming the step and the last good checkpoint."""


class StageError(Exception):
    """A pipeline stage failed; carries the stage name so flows can report it."""

    def __init__(self, stage: str, cause: BaseException | str):
        self.stage = stage
        self.cause = cause
        super().__init__(f"{stage} failed: {cause}")
