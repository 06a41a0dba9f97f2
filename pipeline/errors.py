"""User-facing errors: the CLI prints their message and exits non-zero, without a traceback."""


class PipelineError(Exception):
    """A problem the user can act on; the message names the file, column, series or row."""


class DataError(PipelineError):
    """The input data breaks the data contract (DESIGN.md §3)."""
