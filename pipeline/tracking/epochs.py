"""Live epochs: the callback a training worker logs each epoch's row through (DESIGN.md §7)."""
from __future__ import annotations

import time

from pipeline.secrets import redact
from pipeline.tracking.connect import client, give_up, given_up, unreachable
from pipeline.tracking.runs import ERRORS, epoch_metrics


class EpochLogger:
    """The `log` callback a training job gets in its worker (a Ray task, rank 0 of Ray Train,
    or this process): each epoch's row goes straight into the job's existing child run
    (`<prefix>train_loss`, ... with step = epoch), so a long run is visible while it trains and
    never opens a new experiment. Picklable; the client is made lazily in the worker. A failed
    call is recorded in `errors` (the job carries them back and the driver logs the history
    itself) and never stops training. A retried job that starts again from scratch does not log
    the epochs its earlier attempt logged again (seeded training repeats them).

    `timeout` (`tracking.timeout_seconds`) bounds each request; `parent`, the pipeline run: a
    server that does not answer is given up for that run in this process (`connect.give_up`),
    so the next jobs a worker trains, and the driver, never wait on it again."""

    def __init__(self, uri: str, run_id: str, prefix: str = "", timeout: float | None = None,
                 parent: str | None = None):
        self.uri, self.run_id, self.prefix = uri, run_id, prefix
        self.timeout, self.parent = timeout, parent or run_id
        self.errors: list[str] = []
        self._client = None
        self._logged: int | None = None     # last epoch in the run before this attempt

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_client": None, "_logged": None}

    def __call__(self, row: dict) -> None:
        if self.errors:     # one failure is enough: the driver logs the history instead
            return
        if given_up(self.uri, self.parent):
            self.errors.append("skipped: the tracking server stopped answering")
            return
        try:
            if self._client is None:
                self._client = client(self.uri, self.timeout)
            if self._logged is None:
                seen = self._client.get_metric_history(self.run_id, f"{self.prefix}train_loss")
                self._logged = max((m.step for m in seen), default=-1)
            epoch = int(row.get("epoch", 0))
            if epoch <= self._logged:
                return
            items = epoch_metrics(row, self.prefix, int(time.time() * 1000), epoch)
            self._client.log_batch(self.run_id, metrics=items)
        except ERRORS as e:
            self.errors.append(f"{type(e).__name__}: {redact(str(e))[:300]}")
            if unreachable(e):
                give_up(self.uri, self.parent)
