"""One batch of a scheduled flow: a lock and a record of what already finished.

A batch is (flow, config name, batch id); the batch id defaults to the data cutoff, so a nightly
run over the same data is the same batch. `guard` is entered once the cutoff is known:

- the lock: an exclusive `fcntl.flock` on `<lock dir>/<flow>-<name>-<batch>.lock`, taken without
  waiting (another holder -> `LockHeld`). The kernel drops it when the process dies, so a crash
  never leaves a stale lock. The lock dir is `output.path/_locks` for local outputs, else
  `$PIPELINE_LOCK_DIR` or `~/.cache/forecast-pipeline/locks`: it serialises runs on one machine
  (or on machines sharing that folder); across schedulers, also forbid overlap in the scheduler
  (a CronJob's `concurrencyPolicy: Forbid`).
- the record: a marker file written on success and, with tracking, the finished parent runs
  tagged with this flow, config and batch; either one means done. A finished batch ->
  `AlreadyDone` unless `force`; with `force` the old runs are tagged superseded (`compare`
  ignores them). Parent runs of the batch still RUNNING under the lock can only be left by a
  crash: they are marked KILLED.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import time
from collections.abc import Iterator

from pipeline.config import Config
from pipeline.errors import PipelineError


class LockHeld(PipelineError):
    """Another run of the same flow and batch holds the lock."""


class AlreadyDone(PipelineError):
    """The batch already finished (rerun with force to redo it)."""


def lock_dir(cfg: Config) -> str:
    if "://" not in cfg.output.path:
        return os.path.join(cfg.output.path, "_locks")
    return os.environ.get("PIPELINE_LOCK_DIR") or os.path.expanduser(
        "~/.cache/forecast-pipeline/locks")


def _slug(*parts: str) -> str:
    return re.sub(r"[^\w.\-]", "_", "-".join(parts))


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


class Batch:
    """The lock and the record of one (flow, config, batch id); see the module docstring."""

    def __init__(self, cfg: Config, flow: str, batch_id: str, log=None, force: bool = False):
        self.cfg, self.flow, self.batch_id, self.log, self.force = cfg, flow, batch_id, log, force
        name = _slug(flow, cfg.name, batch_id)
        self.lock_path = os.path.join(lock_dir(cfg), f"{name}.lock")
        self.marker = os.path.join(lock_dir(cfg), f"{name}.done")

    def finished(self) -> list[str]:
        """Ids of the finished runs of this batch, and the marker: either one means done (a
        batch that finished while MLflow was unreachable has only the marker)."""
        runs = self._runs("FINISHED") if self.log is not None else []
        return runs + ([self.marker] if os.path.exists(self.marker) else [])

    def _runs(self, status: str) -> list[str]:
        from pipeline import registry
        return self.log.tr.safe(registry.batch_runs, self.log.tr.uri, self.log.experiment,
                                self.flow, self.cfg.name, self.batch_id, status) or []

    @contextlib.contextmanager
    def guard(self) -> Iterator[None]:
        with lock(self.lock_path):
            done = self.finished()
            if done and not self.force:
                raise AlreadyDone(f"batch {self.batch_id} of flow {self.flow} ({self.cfg.name}) "
                                  f"already finished ({done[0]}); --force redoes it")
            if self.log is not None:
                from pipeline import registry
                for run_id in self._runs("RUNNING"):       # left by a crash: we hold the lock
                    self.log.tr.safe(self.log.tr.client.set_terminated, run_id, "KILLED")
                for run_id in done:
                    if run_id != self.marker:
                        self.log.tr.safe(registry.supersede, self.log.tr.uri, run_id)
            if os.path.exists(self.marker):
                os.remove(self.marker)
            yield

    def mark_done(self, info: dict) -> None:
        tmp = f"{self.marker}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(info, f)
        os.replace(tmp, self.marker)
