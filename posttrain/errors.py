"""Errors a user can act on. Each message names what is wrong and where (file, key, row, value).

Stage entry points print these without a traceback and exit non-zero; anything else is a bug and
keeps its traceback.
"""


class PipelineError(Exception):
    """Base class: a problem in the user's input or environment, explained in the message."""


class DataError(PipelineError):
    """Bad or missing data: names the file, the row or line, and the field."""


class StageError(PipelineError):
    """A stage could not finish (NaN loss, incompatible inputs, corrupted model, ...)."""
