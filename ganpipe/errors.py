"""Errors that reach the user.

`UserError` is bad input (a config key, a file, a data row): the CLI prints one `error:` line and
exits 2. Anything else is a failure of ours or of the environment: exit 1.
"""

from __future__ import annotations

import reprlib


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


# --- values in messages ---------------------------------------------------------------------------
# A message quotes the value at fault, but never whole: a config value can be megabytes (or, from
# a YAML alias nest, gigabytes once expanded), and an error line is read by a person.

VALUE_CHARS = 200  # the most of one value an error message shows
LINE_CHARS = 1000  # the most of one `error:` line the CLI prints


def shorten(text: str, limit: int = VALUE_CHARS) -> str:
    """`text`, or its first `limit` characters and how long it was."""
    return text if len(text) <= limit else f"{text[:limit]}...({len(text)} chars)"


def show(value: object, limit: int = VALUE_CHARS) -> str:
    """A bounded repr of `value` for a message. Only the first `limit` characters of a string are
    rendered, and containers are abbreviated while they are rendered (reprlib), so a huge value
    costs no more than its first few items."""
    if isinstance(value, str | bytes):
        text = repr(value[:limit])
        return text if len(value) <= limit and len(text) <= limit else f"{text[:limit]}...({len(value)} chars)"
    text = _BOUNDED.repr(value)
    return text if len(text) <= limit else f"{text[:limit]}..."


def _bounded_repr() -> reprlib.Repr:
    bounded = reprlib.Repr()
    bounded.maxlevel, bounded.maxstring, bounded.maxother, bounded.maxlong = 3, VALUE_CHARS, VALUE_CHARS, VALUE_CHARS
    bounded.maxlist = bounded.maxtuple = bounded.maxdict = bounded.maxset = 10
    return bounded


_BOUNDED = _bounded_repr()
