"""User-facing errors: the CLI prints their message and exits non-zero, without a traceback."""


class PipelineError(Exception):
    """A problem the user can act on; the message names the file, column, series or row."""


class DataError(PipelineError):
    """The input data breaks the data contract (DESIGN.md §3)."""


class InfraError(PipelineError):
    """A service the job needs failed (the MLflow server, the Ray cluster, every training job):
    worth retrying later, unlike a bad config or bad data. Flows and the CLI exit with 1."""
