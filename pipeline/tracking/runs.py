"""Writing runs to MLflow (DESIGN.md §7), through `MlflowClient` only: no fluent "active run",
no global tracking URI, nothing set at import time.

Hierarchy: one experiment per config name (or `tracking.experiment`); one PARENT run per
pipeline run; one CHILD run per (model, group) job, created with the `mlflow.parentRunId` tag,
so Ray tasks and workers log into a run by id.

Failure policy: `Tracker.safe(fn, ...)` runs one logging call; an MLflow (or I/O) error is
warned about and recorded in `Tracker.failures` instead of raised, so forecasts are never lost
because logging failed. Once the server stops answering, later calls are skipped and counted.
"""
from __future__ import annotations

import math
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import mlflow
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.exceptions import MlflowException

from pipeline.errors import sigterm_held
from pipeline.secrets import redact
from pipeline.tracking.connect import client, give_up, given_up, unreachable
from pipeline.tracking.models import log_model

PARAMS_PER_CALL = 100       # MLflow's log_batch limit for params (and tags)
METRICS_PER_CALL = 1000     # and for metrics
MAX_PARAM_CHARS = 6000
ROLE = "pipeline.role"      # tag: "parent" | "job"
GROUP_TABLE = "metrics/per_group.parquet"   # per-group rows of a "global" or "all" job run
GROUP_TABLE_TAG = "pipeline.group_table"
CONFIG_ARTIFACT = "config.yaml"             # the resolved config, on the parent run
CALIBRATION_ARTIFACT = "conformal.json"     # evaluate.intervals conformal widths, parent run
SUPERSEDED_TAG = "pipeline.superseded"      # a finished batch redone with --force
# a history row's key -> its per-epoch metric (step = epoch); samples_per_s alone is the job's
EPOCH_METRICS = {"train_loss": "train_loss", "val_loss": "val_loss", "lr": "lr",
                 "samples_per_s": "epoch_samples_per_s"}
ERRORS = (MlflowException, OSError, ValueError, RuntimeError)


def finite(v: Any) -> bool:
    try:
        return math.isfinite(float(v))
    except (TypeError, ValueError):
        return False


def param_value(v: Any) -> str:
    """Lists as `[a,b]`, URIs redacted, at most 6000 characters (MLflow's limit)."""
    s = f"[{','.join(map(str, v))}]" if isinstance(v, list | tuple) else str(v)
    return (redact(s) if "://" in s else s)[:MAX_PARAM_CHARS]


def chunks(items: list, n: int) -> Iterator[list]:
    """`items` in consecutive lists of at most `n` (MLflow's per-call limits)."""
    for i in range(0, len(items), n):
        yield items[i:i + n]


def epoch_metrics(row: dict, prefix: str, ts: int, step: int) -> list[Metric]:
    """One history row as metrics `<prefix><name>` at `step` (finite values only)."""
    return [Metric(prefix + name, float(row[k]), ts, step)
            for k, name in EPOCH_METRICS.items() if finite(row.get(k))]


def metric_prefix(name: str, model: str) -> str:
    """`backtest` for the run's own model, the baseline's name otherwise."""
    return "backtest" if name == model else name


class Tracker:
    """One pipeline run's tracking. Every logging method is failure-tolerant (see `safe`)."""

    def __init__(self, uri: str, artifact_location: str | None = None,
                 timeout: float | None = None):
        self.uri = uri
        self.timeout = timeout    # seconds per request to a server (tracking.timeout_seconds)
        self.artifact_location = artifact_location   # of experiments it creates
        self._client: mlflow.MlflowClient | None = None
        self.experiment_id: str | None = None
        self.parent_id: str | None = None
        self.children: dict[tuple[str, str], str] = {}   # (model, group) -> run id
        self.failures: list[str] = []
        self.unreachable = False   # set by the first connection failure (see `safe`)
        self.run_tags: dict[str, str] = {}   # batch_id, cutoff: copied onto every child

    @property
    def client(self) -> mlflow.MlflowClient:
        """Made on first use: a job that fails before its run starts (a bad data path) leaves
        no empty database behind. The embedded SQLite file's folder is created here."""
        if self._client is None:
            if self.uri.startswith("sqlite:///"):
                Path(self.uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
            self._client = client(self.uri, self.timeout)
        return self._client

    def safe(self, fn: Callable, *args, **kwargs) -> Any:
        """fn(*args, **kwargs); a tracking error is warned about, recorded in `failures`, and
        None returned. Once the server has failed to answer (connection refused, timed out),
        later calls are skipped and only counted: a server that died mid-run must not make
        every remaining call wait out MLflow's HTTP retries before the forecasts are written."""
        name = getattr(fn, "__name__", fn)
        if self.unreachable or given_up(self.uri, self.parent_id):
            self.failures.append(f"{name}: skipped, the tracking server stopped answering")
            return None
        try:
            return fn(*args, **kwargs)
        except ERRORS as e:
            what = f"{name}: {type(e).__name__}: {redact(str(e))[:500]}"
            self.failures.append(what)
            self.unreachable = unreachable(e)
            if self.unreachable:    # the epoch loggers of this process stop asking too
                give_up(self.uri, self.parent_id)
            warnings.warn(f"MLflow logging failed ({what}); outputs are kept"
                          + ("; skipping further logging" if self.unreachable else ""),
                          stacklevel=2)
            return None

    # -------------------------------------------------------------- runs

    def start(self, experiment: str, run_name: str, tags: dict[str, str],
              params: dict[str, Any]) -> str:
        """Create (or reuse) the experiment and the parent run with `tags` and `params`.
        Returns the parent run id."""
        exp = self.client.get_experiment_by_name(experiment)
        self.experiment_id = exp.experiment_id if exp else self.client.create_experiment(
            experiment, artifact_location=self.artifact_location)
        self.run_tags = {k: tags[k] for k in ("batch_id", "cutoff") if k in tags}
        with sigterm_held():            # created on the server and its id kept, or neither
            run = self.client.create_run(self.experiment_id, run_name=run_name,
                                         tags={ROLE: "parent", **tags})
            self.parent_id = run.info.run_id
        self.log_params(self.parent_id, params)
        return self.parent_id

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        items = [Param(k, param_value(v)) for k, v in params.items()]
        for part in chunks(items, PARAMS_PER_CALL):
            self.safe(self.client.log_batch, run_id, params=part)

    def child(self, name: str, group: str | None = None) -> str | None:
        """The nested child run of job (model `name`, `group`); created once, then reused.
        `group` is a group value, "global" (one model over every series) or "all" (every
        per-group model of `name` in one run: `tracking.child_runs: per_model`)."""
        key = (name, group or "global")
        if key not in self.children:
            with sigterm_held():        # created and kept (and so ended), or neither
                run = self.safe(self.client.create_run, self.experiment_id,
                                run_name=f"{name}/{key[1]}",
                                tags={"mlflow.parentRunId": self.parent_id, ROLE: "job",
                                      "model": name, "group": key[1], **self.run_tags})
                if run is None:
                    return None
                self.children[key] = run.info.run_id
        return self.children[key]

    def set_tag(self, run_id: str, key: str, value: str) -> None:
        self.safe(self.client.set_tag, run_id, key, redact(str(value)))

    def terminate(self, run_id: str, status: str) -> None:
        self.safe(self.client.set_terminated, run_id, status)

    def finish(self, status: str = "FINISHED") -> None:
        """Terminate every child run, then the parent (status FINISHED | FAILED | KILLED)."""
        for run_id in self.children.values():
            self.terminate(run_id, status)
        if self.parent_id:
            self.terminate(self.parent_id, status)

    # -------------------------------------------------------------- metrics

    def log_metrics(self, run_id: str, values: dict[str, float], step: int = 0) -> None:
        """Finite values only, in log_batch chunks."""
        ts = int(time.time() * 1000)
        items = [Metric(k, float(v), ts, step) for k, v in values.items() if finite(v)]
        for part in chunks(items, METRICS_PER_CALL):
            self.safe(self.client.log_batch, run_id, metrics=part)

    def log_job(self, run_id: str, result, prefix: str = "", history: bool = True) -> None:
        """A JobResult: per-epoch train_loss / val_loss (step = epoch; skipped with
        history=False, when the worker already logged them live), best_val, best_epoch,
        samples_per_s, seconds, sizes, attempts, resumed_epoch, all named `<prefix><name>`; an
        ensemble's members as `<prefix>member_<i>_best_val` / `_best_epoch` / `_epochs`; a
        failed job gets its error as a tag."""
        ts = int(time.time() * 1000)
        items = [m for i, row in enumerate(result.history if history else [])
                 for m in epoch_metrics(row, prefix, ts, int(row.get("epoch", i)))]
        for k in ("best_val", "best_epoch", "samples_per_s", "seconds", "n_series",
                  "n_windows", "attempts", "resumed_epoch"):
            if finite(getattr(result, k, None)):
                items.append(Metric(prefix + k, float(getattr(result, k)), ts, 0))
        for m in getattr(result, "members", None) or []:
            for k in ("best_val", "best_epoch", "epochs"):
                if finite(m.get(k)):
                    items.append(Metric(f"{prefix}member_{m['index']}_{k}", float(m[k]), ts, 0))
        tags = [RunTag(f"{prefix}job_ok", str(result.ok))]
        if result.error:
            tags.append(RunTag(f"{prefix}job_error", result.error[:5000]))
        self.safe(self.client.log_batch, run_id, tags=tags)
        for part in chunks(items, METRICS_PER_CALL):
            self.safe(self.client.log_batch, run_id, metrics=part)

    def log_backtest(self, run_id: str, summary: dict[str, dict[str, float]],
                     model: str) -> None:
        """Backtest.summary(): the run's own model as `backtest_<metric>`, each baseline as
        `<baseline>_<metric>` (`seasonal_naive_mase`), so every run, whatever its model, has the
        same metric names and runs compare column by column."""
        self.log_metrics(run_id, {f"{metric_prefix(m, model)}_{k}": v
                                  for m, row in summary.items() for k, v in row.items()})

    def log_group_table(self, run_id: str | None, model: str, table, runs: bool) -> None:
        """Per-group rows (a polars DataFrame with a `group` column and metric columns named as
        in `log_backtest`, plus training figures and `model_file`). runs=True: each group's
        numbers go to its own child run (model, group). Otherwise the table is a Parquet
        artifact of `run_id` (`metrics/per_group.parquet`, tagged once the upload succeeded)
        with summary metrics `groups_<column>_{mean,median,max}`: 10,000 groups stay one run."""
        cols = [c for c in table.columns if c != "group" and table[c].dtype.is_numeric()]
        if runs:
            for row in table.iter_rows(named=True):
                child = self.child(model, str(row["group"]))
                if child:
                    self.log_metrics(child, {c: row[c] for c in cols})
            return
        if run_id is None:
            return
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / Path(GROUP_TABLE).name
            table.write_parquet(path)
            failures = len(self.failures)
            self.safe(self.client.log_artifact, run_id, str(path), str(Path(GROUP_TABLE).parent))
        if len(self.failures) == failures:   # a tag without its table would break compare
            self.set_tag(run_id, GROUP_TABLE_TAG, GROUP_TABLE)
        stats = {}
        for c in cols:
            s = table[c].drop_nulls()
            s = s.drop_nans() if s.dtype.is_float() else s
            if len(s):
                stats.update({f"groups_{c}_mean": s.mean(), f"groups_{c}_median": s.median(),
                              f"groups_{c}_max": s.max()})
        self.log_metrics(run_id, stats)

    # -------------------------------------------------------------- artifacts, inputs

    def log_artifacts(self, run_id: str, paths: Iterable[str | Path],
                      artifact_path: str | None = None) -> None:
        """Files or folders (a folder's content goes under its own name)."""
        for p in map(Path, paths):
            if p.is_dir():
                self.safe(self.client.log_artifacts, run_id, str(p),
                          "/".join(filter(None, [artifact_path, p.name])))
            else:
                self.safe(self.client.log_artifact, run_id, str(p), artifact_path)

    def log_input(self, run_id: str, path: str, digest: str, name: str = "input",
                  context: str = "training") -> None:
        """The input data as a dataset input: source = the path, digest = its content hash
        (client-side equivalent of `mlflow.log_input`, which needs an active fluent run)."""
        self.safe(self._log_input, run_id, path, digest, name, context)

    def _log_input(self, run_id, path, digest, name, context) -> None:
        with warnings.catch_warnings():  # "can be interpreted in multiple ways": same class
            warnings.simplefilter("ignore", UserWarning)
            source = resolve_dataset_source(str(path) if "://" in str(path)
                                            else str(Path(path).resolve()))
        entity = Dataset(**MetaDataset(source=source, name=name, digest=digest[:36]).to_dict())
        self.client.log_inputs(run_id, datasets=[DatasetInput(
            entity, tags=[InputTag("mlflow.data.context", context)])])
        self.client.set_tag(run_id, "data_hash", digest)

    def log_model(self, run_id: str, model) -> str | None:
        """Log a torch model into run `run_id` (`pipeline.tracking.models.log_model`); returns
        its URI (also the run's tag `pipeline.model_uri`)."""
        return self.safe(log_model, self.client, run_id, model)


class EpochLogger:
    """The `log` callback a training job gets in its worker (a Ray task, rank 0 of Ray Train,
    or this process): each epoch's row goes into the job's child run (`<prefix>train_loss`, …,
    step = epoch) while it trains. Picklable, the client made in the worker. A failure goes to
    `errors` (the driver logs the history instead) and never stops training; a retried job
    does not log its earlier attempt's epochs again. `timeout`: `tracking.timeout_seconds`;
    a server that does not answer is given up for the run `parent` in this process."""

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
