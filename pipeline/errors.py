"""User-facing errors and the exit codes a scheduler acts on, in one place. Every command and
flow ends with one of these codes and, unless 0, one line on stderr saying why:

    0  done, or the batch had already finished (reported; --force redoes it)
    1  a failure worth retrying: the MLflow server or Ray cluster unreachable, every training
       job failed, or anything unexpected (its traceback goes to stdout)
    2  bad config or bad data (the reason names the key, column or series): do not retry
    3  another run of the same flow and batch holds the lock
    4  finished, but some training jobs failed (their series got the fallback forecast)
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

from pipeline.config import ConfigError
from pipeline.secrets import redact

EXIT_OK, EXIT_FAILED, EXIT_INVALID, EXIT_LOCKED, EXIT_PARTIAL = 0, 1, 2, 3, 4


class PipelineError(Exception):
    """A problem the user can act on; the message names the file, column, series or row."""


class DataError(PipelineError):
    """The input data breaks the data contract (DESIGN.md §3)."""


class InfraError(PipelineError):
    """A service the job needs failed (the MLflow server, the Ray cluster, every training job):
    worth retrying later, unlike a bad config or bad data. Flows and the CLI exit with 1."""


class LockHeld(PipelineError):
    """Another run of the same flow and batch holds the lock."""


class AlreadyDone(PipelineError):
    """The batch already finished (rerun with force to redo it)."""


class Terminated(BaseException):
    """The process got SIGTERM (a scheduler stopping the job): the run is marked KILLED, the
    lock released, exit 1. A BaseException, so no `except Exception` on the way swallows it."""


_HOLD = {"depth": 0, "pending": False}


def on_sigterm(signum, frame) -> None:
    """The job's SIGTERM handler: Terminated at once, or, inside `sigterm_held`, when the held
    step ends."""
    if _HOLD["depth"]:
        _HOLD["pending"] = True
        return
    raise Terminated("SIGTERM")


@contextlib.contextmanager
def sigterm_held(then_raise: bool = True) -> Iterator[dict]:
    """SIGTERM held back over a step that must not be cut in two: a tracking run created on
    the server and its id kept (cut between, it would stay RUNNING with nobody to end it), a
    run being closed. When the outermost hold ends, a SIGTERM that came raises Terminated
    (`then_raise`; also over an exception the step raised, which it chains, so a failing step
    cannot swallow the SIGTERM) or is reported in the yielded dict's "got" for the caller to
    act on."""
    state = {"got": False}
    _HOLD["depth"] += 1
    try:
        yield state
    finally:
        _HOLD["depth"] -= 1
        if not _HOLD["depth"]:
            state["got"], _HOLD["pending"] = _HOLD["pending"], False
        if state["got"] and then_raise:
            raise Terminated("SIGTERM")


def exit_code(exc: BaseException) -> int:
    """The exit code for an exception that ended a command or flow."""
    if isinstance(exc, AlreadyDone):
        return EXIT_OK
    if isinstance(exc, LockHeld):
        return EXIT_LOCKED
    if isinstance(exc, InfraError):
        return EXIT_FAILED
    if isinstance(exc, ConfigError | PipelineError):
        return EXIT_INVALID
    return EXIT_FAILED


def one_line(exc: BaseException, what: str) -> str:
    """The line a user reads for `exc`, which ended `what` (a flow or command name); secrets
    in it redacted."""
    if isinstance(exc, AlreadyDone):
        return f"skipped: {exc}"
    if isinstance(exc, ConfigError | PipelineError):
        text = f"error: {exc}"
    elif type(exc).__module__.startswith("mlflow"):
        text = f"error: MLflow: {type(exc).__name__}: {str(exc).splitlines()[0][:500]}"
    else:
        first = str(exc).splitlines()[0][:500] if str(exc) else ""
        text = f"error: {what} failed: {type(exc).__name__}: {first}"
    return redact(" ".join(text.splitlines()))
