"""A search's trials as child runs of the `tune` run (the tracking side of
`pipeline.execution.ray_tune`)."""
from __future__ import annotations

import time
from typing import Any

from mlflow.entities import Metric, Param, RunTag

from pipeline.errors import sigterm_held
from pipeline.secrets import redact
from pipeline.tracking.connect import client, give_up, given_up, unreachable
from pipeline.tracking.runs import ERRORS, PARAMS_PER_CALL, ROLE, chunks, finite, param_value

TRIAL = "trial"


class TrialRuns:
    """A search's trials as child runs of the `tune` run: tag `pipeline.role` = trial (so
    `compare`, which ranks job runs, never sees them), the point as params, each epoch's
    validation score and training loss (step = epoch) and the final score. Picklable (the
    client is made where it is used): a per-group search logs from the Ray task that drives it.
    Failures are recorded in `errors`, never raised: a search goes on when the server
    hiccups, and the driver reports them. `timeout` as EpochLogger's: a server that does not
    answer is asked nothing more for the run `parent_id` in this process."""

    def __init__(self, uri: str, parent_id: str, experiment_id: str,
                 tags: dict[str, str] | None = None, timeout: float | None = None) -> None:
        self.uri, self.parent_id, self.experiment_id = uri, parent_id, experiment_id
        self.timeout = timeout
        self.tags = dict(tags or {})
        self.runs: dict[str, str] = {}      # trial id -> run id
        self.errors: list[str] = []
        self._client = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_client": None}

    @property
    def client(self):
        if self._client is None:
            self._client = client(self.uri, self.timeout)
        return self._client

    def _safe(self, fn, *args, **kwargs) -> Any:
        if given_up(self.uri, self.parent_id):
            return None
        try:
            return fn(*args, **kwargs)
        except ERRORS as e:
            self.errors.append(f"{getattr(fn, '__name__', fn)}: {type(e).__name__}: "
                               f"{redact(str(e))[:300]}")
            if unreachable(e):
                give_up(self.uri, self.parent_id)
            return None

    def start(self, trial_id: str, point: dict[str, Any], group: str | None = None) -> None:
        """The trial's child run, its point as params (`<key>` = value)."""
        if trial_id in self.runs:
            return
        tags = {"mlflow.parentRunId": self.parent_id, ROLE: TRIAL, "trial_id": trial_id,
                "group": group or "global", **self.tags}
        with sigterm_held():            # created and kept (and so ended), or neither
            run = self._safe(self.client.create_run, self.experiment_id,
                             run_name=f"trial-{trial_id}", tags=tags)
            if run is None:
                return
            self.runs[trial_id] = run.info.run_id
        params = [Param(k, param_value(v)) for k, v in point.items()]
        for part in chunks(params, PARAMS_PER_CALL):
            self._safe(self.client.log_batch, run.info.run_id, params=part)

    def epoch(self, trial_id: str, row: dict) -> None:
        """One epoch: `val_loss` (the search's metric) and `train_loss`, step = epoch."""
        run = self.runs.get(trial_id)
        if run is None:
            return
        ts, step = int(time.time() * 1000), int(row.get("epoch", 0))
        items = [Metric(k, float(row[k]), ts, step) for k in ("val_loss", "train_loss")
                 if finite(row.get(k))]
        if items:
            self._safe(self.client.log_batch, run, metrics=items)

    def end(self, trial_id: str, status: str, score: float | None = None,
            tags: dict[str, str] | None = None) -> None:
        """The trial's score (`score`) and status: FINISHED, or FAILED with tags["error"];
        tags["stopped_early"] = "true" when the scheduler stopped it."""
        run = self.runs.get(trial_id)
        if run is None:
            return
        ts = int(time.time() * 1000)
        metrics = [Metric("score", float(score), ts, 0)] if finite(score) else []
        tag_list = [RunTag(k, redact(str(v))[:5000]) for k, v in (tags or {}).items()]
        self._safe(self.client.log_batch, run, metrics=metrics, tags=tag_list)
        self._safe(self.client.set_terminated, run, status)
