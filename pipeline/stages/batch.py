"""One run of a flow or command, as a context manager: what it holds open (the config, the Ray
runner, the tracking run, the lock), what it records (wall time per stage, failed jobs) and how
it ends (the exit code, one line on stderr).

    with Batch("nightly", config, overrides, batch_id, force) as b:
        data = stages.prepare(b)        # opens the batch on the data cutoff
        ...
    return b.exit_code

`open()` (called by `stages.prepare`) loads the config and checks the tracking server before
any data is read. `begin(prepared)` runs once the data cutoff is known: the batch id defaults
to it, so a nightly run over the same data is the same batch.

- the lock: an exclusive `fcntl.flock` on the lock of the output partitions this run writes
  (`paths.partition_lock`: config name and data end), whatever the flow or command, taken
  without waiting (another holder -> `LockHeld`, exit 3) before anything is written. The
  kernel drops it when the process dies, so a crash never leaves a stale lock. The lock dir
  (`paths.lock_dir`) is `output.path/_locks` for local outputs, else `$PIPELINE_LOCK_DIR`: it
  serialises runs on one machine (or machines sharing that folder); across schedulers, also
  forbid overlap in the scheduler.
- the record (scheduled flows only, `record=True`): a marker file written on success and, with
  tracking, the finished parent runs tagged with this flow, config and batch; either one means
  done. A finished batch -> `AlreadyDone` (exit 0) unless `force`; with `force` the old runs are
  tagged superseded (`compare` ignores them). Parent runs of the batch still RUNNING under the
  lock can only be left by a crash: they are marked KILLED, by the CLI's commands too (runs
  tagged with the command, config and batch: `RunLog.start_over`).
- the tracking run: started in `begin`, finished FINISHED or FAILED on the way out, inside the
  lock, so a finished batch is never seen RUNNING.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import signal
import sys
import tempfile
import threading
import time
import traceback
import uuid
import warnings
from collections.abc import Iterator
from functools import cached_property

from pipeline import config as C
from pipeline import paths
from pipeline.data.io import write_bytes_atomic, write_parquet_atomic
from pipeline.data.prepare import local_runner
from pipeline.errors import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_PARTIAL,
    AlreadyDone,
    InfraError,
    LockHeld,
    PipelineError,
    Terminated,
    exit_code,
    on_sigterm,
    one_line,
    sigterm_held,
)
from pipeline.names import safe_key
from pipeline.outputs import console as report
from pipeline.secrets import redact
from pipeline.tracking.runlog import RunLog


def format_warning(message, category, filename, lineno, line=None) -> str:
    """A warning as one line, `warning: …`, without its source line (secrets redacted)."""
    return f"warning: {redact(' '.join(str(message).split()))}\n"


NO_PICKLES = "MLFLOW_ALLOW_PICKLE_DESERIALIZATION"
STAGE_LOG = "PIPELINE_STAGE_LOG"
BATCH_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:+\-]{0,99}")


@contextlib.contextmanager
def lock(path: str) -> Iterator[None]:
    """Hold an exclusive, non-waiting flock on `path` for the block."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
            raise LockHeld(f"another run holds {path} ({holder}); not starting") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {os.uname().nodename} since "
                      f"{time.strftime('%Y-%m-%dT%H:%M:%S')}".encode(), 0)
        yield
    finally:
        os.close(fd)      # releases the lock


def check_output(cfg: C.Config) -> None:
    """A local `output.path` this process can write: a folder (or none yet, under a folder it
    can write), checked before Ray starts or any data is read; nothing is created here. Else a
    PipelineError naming the setting. Object stores are checked by their first write."""
    root = cfg.output.path
    if paths.is_remote(root):
        return
    path = os.path.abspath(root)
    if os.path.exists(path) and not os.path.isdir(path):
        raise PipelineError(f"output.path {root!r} is a file, not a folder")
    probe = path
    while not os.path.exists(probe):        # the nearest folder that exists holds it
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise PipelineError(f"output.path {root!r}: {probe!r} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        why = "read-only file system" if _read_only(probe) else "permission denied"
        raise PipelineError(f"output.path {root!r}: cannot write in {probe!r} ({why})")


def _read_only(path: str) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


class Batch:
    """See the module docstring. `record`: a scheduled flow (skip-if-done, marker, `flow`
    tag); `tracked`: log to MLflow when the config says so; `registry`: the flow needs the
    Model Registry (champions), so tracking must be on and reachable."""

    def __init__(self, flow: str, config: str | None, overrides=(), batch_id: str | None = None,
                 force: bool = False, *, record: bool = True, tracked: bool = True,
                 registry: bool = False) -> None:
        self.flow, self.config_path, self.overrides = flow, config, list(overrides)
        self.batch_id, self.force = batch_id, force
        self.record, self.tracked, self.registry = record, tracked, registry
        self.log = None                      # the RunLog, once opened (None: untracked)
        self.seconds: dict[str, float] = {}  # wall seconds per stage
        self.failed_jobs: list[str] = []
        self.outcome = None      # what the flow returned (a `stages.Outcome`, `flows._common`)
        self.exit_code = EXIT_OK
        self._stack = contextlib.ExitStack()
        self._runner = None
        self._begun = self._opened = False
        self._t0 = time.perf_counter()

    @cached_property
    def cfg(self) -> C.Config:
        return C.load(self.config_path, self.overrides)

    @property
    def run_id(self) -> str:
        """The parent run's id, or a fresh id for an untracked run (the outputs carry it)."""
        if self.log is not None and self.log.parent_id:
            return self.log.parent_id
        if not hasattr(self, "_run_id"):
            self._run_id = uuid.uuid4().hex
        return self._run_id

    @property
    def runner(self):
        """Ray tasks when enabled (started on first use, stopped on the way out), else this
        process."""
        if self._runner is None:
            if self.cfg.ray.enabled:
                from pipeline.execution.ray_train import RayRunner  # Ray only when enabled
                self._runner = self._stack.enter_context(RayRunner(self.cfg.ray))
            else:
                self._runner = local_runner
        return self._runner

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time a stage (its seconds add up per name; `pipeline.stages.record.stage` wraps
        every stage in it). With $PIPELINE_STAGE_LOG set, each
        stage's wall-clock start and end are appended to that file (benchmarks/scale.py
        attributes its memory samples to stages with them)."""
        t, wall = time.perf_counter(), time.time()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t
            if os.environ.get(STAGE_LOG):
                with open(os.environ[STAGE_LOG], "a") as f:
                    f.write(f"{name} {wall:.3f} {time.time():.3f}\n")

    # -------------------------------------------------------------- opening

    def open(self) -> None:
        """Load the config and open the tracking run's connection (an unreachable server
        required by the config stops here, before any data is read)."""
        if self._opened:
            return
        self._opened = True
        if self.batch_id is not None and not BATCH_ID.fullmatch(self.batch_id):
            raise PipelineError(f"--batch-id {self.batch_id!r}: use 1-100 letters, digits and "
                                "_ . : + - (it names runs, files and search filters)")
        cfg = self.cfg
        check_output(cfg)                # before Ray starts or any data is read
        needs = self.registry or (cfg.train.warm_start and self.tracked)
        if needs and not cfg.tracking.enabled:
            raise PipelineError(f"{'train.warm_start' if cfg.train.warm_start else self.flow}"
                                " needs the Model Registry: set tracking.enabled: true")
        if self.tracked:
            self.log = RunLog.open(cfg)
            if needs and self.log is None:
                raise PipelineError("the Model Registry is unreachable and this job needs it")

    def begin(self, prepared) -> None:
        """The data is read: take the batch's lock, skip it if it is done, open its run,
        write the validation report. A config the recipe resolved for the data replaces the
        loaded one from here on (the run logs it)."""
        if prepared.cfg is not None and prepared.cfg is not self.cfg:
            self.cfg = prepared.cfg
            if self.log is not None:
                self.log.cfg = prepared.cfg
        arrays, cfg = prepared.arrays, self.cfg
        cutoff = arrays.data_end()
        self.batch_id = self.batch_id or cutoff
        self._marker = os.path.join(paths.lock_dir(cfg),
                                    f"{self.flow}-{safe_key(cfg.name)}-{self.batch_id}.done")
        self._stack.enter_context(lock(paths.partition_lock(cfg, cutoff)))
        self._begun = True
        if self.record:
            self._check_done()
        elif self.log is not None:       # a command: its crashed runs of this batch, killed
            self.log.start_over(self.flow, self.batch_id, "command", [])
        if self.log is not None:
            tags = {"flow": self.flow} if self.record else {"command": self.flow}
            self.log.start(self.batch_id, cutoff, prepared.report, tags=tags)
            if self.registry and not self.log.parent_id:
                raise InfraError("could not open the MLflow run this job needs "
                                 f"({'; '.join(self.log.failures[:1]) or 'unknown error'})")
        if cfg.output.report:
            write_parquet_atomic(prepared.report.to_arrow(), paths.validation_report(cfg))

    def _check_done(self) -> None:
        """A finished batch -> AlreadyDone unless `force`; otherwise, under the lock, the
        batch's runs a crash left RUNNING are marked KILLED and its finished ones superseded
        (`RunLog.start_over`)."""
        log, tag = self.log, "flow" if self.record else "command"
        finished = log.batch_runs(self.flow, self.batch_id, "FINISHED", tag) if log else []
        done = finished + ([self._marker] if os.path.exists(self._marker) else [])
        if done and not self.force:
            raise AlreadyDone(f"batch {self.batch_id} of flow {self.flow} ({self.cfg.name}) "
                              f"already finished ({done[0]}); --force redoes it")
        if log is not None:
            log.start_over(self.flow, self.batch_id, tag, finished)
        if os.path.exists(self._marker):
            os.remove(self._marker)

    # -------------------------------------------------------------- ending

    def _untracked(self) -> bool:
        """Tracking was required but logging failed on the way (the server stopped
        answering): the outputs stand, the MLflow record does not."""
        return bool(self.log is not None and self.log.failures and self.cfg.tracking.required)

    def __enter__(self) -> Batch:
        if threading.current_thread() is threading.main_thread():   # signals reach it only
            self._sigterm = signal.signal(signal.SIGTERM, on_sigterm)
        # nothing this job loads is a pickle; MLflow must not unpickle anything either
        self._pickles = os.environ.get(NO_PICKLES)
        os.environ[NO_PICKLES] = "false"
        self._format, warnings.formatwarning = warnings.formatwarning, format_warning
        return self

    def _close(self, ok: bool, exc) -> None:
        """The run's end: its tracking run finished (FAILED unless `ok`, KILLED on SIGTERM),
        the marker written; the lock and Ray released last, whatever fails on the way."""
        with self._stack:              # the lock and Ray are released last
            if self.log is not None and self.log.parent_id:
                if ok:
                    self.log.metrics({f"seconds_{k}": v for k, v in self.seconds.items()})
                self.log.finish(ok, "KILLED" if isinstance(exc, Terminated) else None)
                report.tracking(self.log)
            if ok and self.record and self._begun and not self._untracked():
                write_bytes_atomic(json.dumps({"run_id": self.run_id}).encode(), self._marker)

    def __exit__(self, kind, exc, tb) -> bool:
        ok = exc is None
        warnings.formatwarning = self._format
        if self._pickles is None:
            os.environ.pop(NO_PICKLES, None)
        else:
            os.environ[NO_PICKLES] = self._pickles
        with sigterm_held(then_raise=False) as held:   # the run is closed whole
            try:
                self._close(ok, exc)
            except Exception as e:  # noqa: BLE001 - ending failed (Ray or the server gone)
                if ok:
                    ok, exc = False, e
        if hasattr(self, "_sigterm"):
            signal.signal(signal.SIGTERM, self._sigterm)
        if held["got"]:
            print("warning: SIGTERM came while the run was being closed; it was closed first",
                  file=sys.stderr)
        if ok:
            report.wall_time(time.perf_counter() - self._t0, self.seconds)
            self.exit_code = EXIT_PARTIAL if self.failed_jobs or self._untracked() else EXIT_OK
            if self.failed_jobs:
                print(f"warning: {len(self.failed_jobs)} training job(s) failed "
                      f"({', '.join(self.failed_jobs[:5])}); their series got the fallback "
                      "forecast", file=sys.stderr)
            if self._untracked():
                print(f"warning: MLflow logging failed {len(self.log.failures)} time(s) "
                      f"({self.log.failures[0][:200]}); the outputs are written, the run's "
                      "record is incomplete (a rerun of the batch completes it)",
                      file=sys.stderr)
            return False
        if isinstance(exc, Terminated):
            self.exit_code = EXIT_FAILED
            _error(f"error: {self.flow} stopped by SIGTERM; its run is marked KILLED")
            return True
        if not isinstance(exc, Exception):
            return False               # KeyboardInterrupt, SystemExit: not ours to swallow
        self.exit_code = exit_code(exc)
        if isinstance(exc, AlreadyDone):
            print(one_line(exc, self.flow))
            return True
        line = one_line(exc, self.flow)
        if not isinstance(exc, PipelineError | C.ConfigError) and \
                not type(exc).__module__.startswith("mlflow"):
            where = self._keep_traceback(exc)         # a bug: the details, in a file
            line += f" (details: {where})" if where else ""
        _error(line)
        return True

    def _keep_traceback(self, exc: BaseException) -> str | None:
        """A bug's traceback (secrets redacted) in a file next to the locks (the system's
        temporary folder when even the config did not load): its path, for the error line.
        Nothing of it on the console."""
        text = redact("".join(traceback.format_exception(exc)))
        name = f"error-{self.flow}-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}.txt"
        folders = []
        with contextlib.suppress(Exception):
            folders.append(paths.lock_dir(self.cfg))
        for folder in [*folders, tempfile.gettempdir()]:
            try:
                os.makedirs(folder, exist_ok=True)
                path = os.path.join(folder, name)
                with open(path, "w") as f:
                    f.write(text)
                return path
            except OSError:
                continue
        return None


def _error(line: str) -> None:
    """The one `error:` line, last on stderr: what was printed before it (progress lines,
    warnings) is flushed first, so nothing follows it."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    print(line, file=sys.stderr, flush=True)
