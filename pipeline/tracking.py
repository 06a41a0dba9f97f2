"""MLflow tracking (DESIGN.md §7): the only module that imports mlflow.

Hierarchy: one experiment per config name; one PARENT run per pipeline run; one CHILD run per
(model, group) job, created with the client API and the `mlflow.parentRunId` tag, so Ray tasks
and workers can log into a run by id without any fluent "active run" state.

Where: `tracking_uri(cfg)`; the embedded default is `sqlite:///<output.path>/mlflow.db` with
artifacts next to it (`<output.path>/mlartifacts`, see `artifact_root`). Remote servers take
credentials from the environment (MLFLOW_TRACKING_USERNAME / _PASSWORD / _TOKEN); URIs are
passed through `redact` before they appear in any message, tag or param.

Models are logged with the PyTorch flavor in the "pickle" format: mlflow 3 defaults to "pt2"
(torch.export), whose reloaded GraphModule is specialised to the example's shapes and loses the
optional-input forward. Pickle reloads the real `EncoderDecoder`, so `load_model(uri)(x, xf,
static, idx)` works on any batch size. The signature and input example describe the tensors of
`example_batch`: a lone tensor `x` for models with no other inputs (then the pyfunc flavor also
works), else a dict of named tensors {x, xf, static, idx} (call the reloaded module with
`**batch`).

Reading runs back (leaderboards, champions, the registry, batches) is `pipeline.registry`.

Failure policy: `Tracker.safe(fn, ...)` runs one logging call; an MLflow (or I/O) error is
warned about and recorded in `Tracker.failures` instead of raised, so forecasts are never lost
because logging failed. Only `check_server` (before training) raises.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import re
import subprocess
import tempfile
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException

from pipeline.errors import InfraError

# creating or migrating a store logs INFO lines on stderr; a CLI wants its one-line messages
for _name in ("mlflow.store.db.utils", "alembic.runtime.migration"):
    logging.getLogger(_name).setLevel(logging.WARNING)

PARAMS_PER_CALL = 100       # MLflow's log_batch limit for params (and tags)
METRICS_PER_CALL = 1000     # and for metrics
MAX_PARAM_CHARS = 6000
ROLE = "pipeline.role"      # tag: "parent" | "job"
MODEL_URI_TAG = "pipeline.model_uri"
MODEL_NAME = "model"        # logged model name inside a run
GROUP_TABLE = "metrics/per_group.parquet"   # per-group rows of a "global" or "all" job run
GROUP_TABLE_TAG = "pipeline.group_table"
CONFIG_ARTIFACT = "config.yaml"             # the resolved config, on the parent run
SUPERSEDED_TAG = "pipeline.superseded"      # a finished batch redone with --force
# a history row's key -> its per-epoch metric (step = epoch); samples_per_s alone is the job's
EPOCH_METRICS = {"train_loss": "train_loss", "val_loss": "val_loss", "lr": "lr",
                 "samples_per_s": "epoch_samples_per_s"}
_TRACKING_ERRORS = (MlflowException, OSError, ValueError, RuntimeError)


# ------------------------------------------------------------------------------ where

def redact(uri: str | None) -> str:
    """`uri` without `user:password@` (safe to print or log)."""
    return re.sub(r"(?<=://)[^/@]*@", "", uri or "")


def tracking_uri(cfg) -> str:
    """cfg.tracking.uri, else $MLFLOW_TRACKING_URI, else `sqlite:///<abs output.path>/mlflow.db`
    (a non-local output path, e.g. s3://, falls back to ./outputs)."""
    if cfg.tracking.uri:
        return cfg.tracking.uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    out = cfg.output.path if "://" not in cfg.output.path else "outputs"
    return f"sqlite:///{Path(out).resolve() / 'mlflow.db'}"   # made on first use (Tracker)


def artifact_root(uri: str) -> str | None:
    """Where a new experiment keeps its artifacts: beside the SQLite file for the embedded
    store (`<dir>/mlartifacts`; MLflow's own default is ./mlruns in the current directory),
    the server's choice otherwise (None)."""
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri[len("sqlite:///"):]).resolve().parent / "mlartifacts").as_uri()


@contextlib.contextmanager
def using(uri: str | None, experiment_id: str | None = None) -> Iterator[None]:
    """Point mlflow's fluent API (and registry) at `uri` — and at `experiment_id`, which is
    where mlflow 3 files a logged model (else the Default experiment) — for the block, then
    restore the previous settings (None leaves them alone). mlflow's setters also export
    MLFLOW_TRACKING_URI and MLFLOW_REGISTRY_URI; those are restored too, so one call cannot
    redirect later ones."""
    from mlflow.tracking import fluent
    from mlflow.tracking._model_registry import utils as reg
    from mlflow.tracking._tracking_service import utils as trk
    if not uri:
        yield
        return
    old = trk._tracking_uri, reg._registry_uri, fluent._active_experiment_id
    env = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    if experiment_id is not None:
        fluent._active_experiment_id = experiment_id
    try:
        yield
    finally:
        trk._tracking_uri, reg._registry_uri, fluent._active_experiment_id = old
        for k, v in env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def _quiet(*loggers: str) -> Iterator[None]:
    """Raise these loggers to ERROR for the block."""
    import logging
    olds = [(logging.getLogger(n), logging.getLogger(n).level) for n in loggers]
    for lg, _ in olds:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in olds:
            lg.setLevel(level)


@contextlib.contextmanager
def _env(**values: str) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def check_server(uri: str, timeout: float = 10.0, required: bool = True) -> bool:
    """Before any training: is the tracking server at an http(s) `uri` answering? Other URIs
    (sqlite, file) are local and always True. Unreachable: InfraError when `required`, else a
    warning and False."""
    if not uri.startswith(("http://", "https://")):
        return True
    try:
        with _env(MLFLOW_HTTP_REQUEST_TIMEOUT=str(max(1, int(timeout))),
                  MLFLOW_HTTP_REQUEST_MAX_RETRIES="0",
                  MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR="0"):
            mlflow.MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
        return True
    except Exception as e:  # noqa: BLE001 - any failure means "not usable"
        reason = redact(str(e).splitlines()[0] if str(e) else type(e).__name__)[:300]
        msg = f"MLflow tracking server at {redact(uri)} is unreachable: {reason}"
        if required:
            raise InfraError(msg + " (set tracking.required: false to run without "
                             "tracking)") from None
        warnings.warn(msg + "; continuing without tracking", stacklevel=2)
        return False


def _client(uri: str | None) -> mlflow.MlflowClient:
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri) if uri else \
        mlflow.MlflowClient()


# ------------------------------------------------------------------------------ helpers

def data_hash(paths: Iterable[str | os.PathLike], chunk: int = 1 << 20) -> str:
    """sha256 over each file's relative name, size, first and last MiB (files found under
    folders, sorted). Fast on large inputs; an edit that keeps the size and touches only the
    middle of a file larger than 2 MiB is not seen (a deliberate trade-off)."""
    h = hashlib.sha256()
    for root in paths:
        root = Path(root)
        files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
        for f in files:
            size = f.stat().st_size
            h.update(f"{f.relative_to(root) if root.is_dir() else f.name}\0{size}\0".encode())
            with open(f, "rb") as fh:
                h.update(fh.read(chunk))
                if size > 2 * chunk:
                    fh.seek(size - chunk)
                    h.update(fh.read(chunk))
                elif size > chunk:
                    h.update(fh.read())
    return h.hexdigest()


def git_commit() -> str | None:
    """HEAD of the repository holding this package, or None outside git."""
    try:
        r = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                           timeout=5, cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() or None if r.returncode == 0 else None


def _param_value(v: Any) -> str:
    """Lists as `[a,b]`, URIs redacted, at most 6000 characters (MLflow's limit)."""
    s = f"[{','.join(map(str, v))}]" if isinstance(v, list | tuple) else str(v)
    return (redact(s) if "://" in s else s)[:MAX_PARAM_CHARS]


def _chunks(items: list, n: int) -> Iterator[list]:
    for i in range(0, len(items), n):
        yield items[i:i + n]


def _finite(v: Any) -> bool:
    try:
        return math.isfinite(float(v))
    except (TypeError, ValueError):
        return False


def _unreachable(e: BaseException) -> bool:
    """Did `e` come from a server that does not answer (as opposed to a refused request)?"""
    text = f"{type(e).__name__} {e}".lower()
    return any(k in text for k in ("max retries exceeded", "connection refused",
                                   "failed to establish", "timed out", "connectionerror",
                                   "remotedisconnected", "name or service not known"))


def _epoch_metrics(row: dict, prefix: str, ts: int, step: int) -> list[Metric]:
    """One history row as metrics `<prefix><name>` at `step` (finite values only)."""
    return [Metric(prefix + name, float(row[k]), ts, step)
            for k, name in EPOCH_METRICS.items() if _finite(row.get(k))]


def _numpy(t: Any) -> np.ndarray:
    return t.detach().cpu().numpy() if hasattr(t, "detach") else np.asarray(t)


# ------------------------------------------------------------------------------ tracker

class Tracker:
    """One pipeline run's tracking. Every logging method is failure-tolerant (see `safe`)."""

    def __init__(self, uri: str, child_runs: str = "per_model"):
        self.uri = uri
        self.child_runs = child_runs
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
            self._client = mlflow.MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
        return self._client

    @classmethod
    def from_config(cls, cfg) -> Tracker:
        return cls(tracking_uri(cfg), cfg.tracking.child_runs)

    def safe(self, fn: Callable, *args, **kwargs) -> Any:
        """fn(*args, **kwargs); a tracking error is warned about, recorded in `failures`, and
        None returned. Once the server has failed to answer (connection refused, timed out),
        later calls are skipped and only counted: a server that died mid-run must not make
        every remaining call wait out MLflow's HTTP retries before the forecasts are written."""
        name = getattr(fn, "__name__", fn)
        if self.unreachable:
            self.failures.append(f"{name}: skipped, the tracking server stopped answering")
            return None
        try:
            return fn(*args, **kwargs)
        except _TRACKING_ERRORS as e:
            what = f"{name}: {type(e).__name__}: {redact(str(e))[:500]}"
            self.failures.append(what)
            self.unreachable = _unreachable(e)
            warnings.warn(f"MLflow logging failed ({what}); outputs are kept"
                          + ("; skipping further logging" if self.unreachable else ""),
                          stacklevel=2)
            return None

    # -------------------------------------------------------------- runs

    def start(self, cfg, batch_id: str, cutoff: Any = None, data_hash: str | None = None,
              tags: dict | None = None) -> str:
        """Create (or reuse) the experiment and the parent run; log tags and the flattened
        config as params. Returns the parent run id."""
        import pipeline
        name = cfg.tracking.experiment or cfg.name
        exp = self.client.get_experiment_by_name(name)
        self.experiment_id = exp.experiment_id if exp else self.client.create_experiment(
            name, artifact_location=artifact_root(self.uri))
        all_tags = {ROLE: "parent", "batch_id": str(batch_id), "cutoff": str(cutoff),
                    "pipeline_version": pipeline.__version__, "tracking_uri": redact(self.uri)}
        if data_hash:
            all_tags["data_hash"] = data_hash
        if commit := git_commit():
            all_tags["git_commit"] = all_tags["mlflow.source.git.commit"] = commit
        all_tags.update({k: str(v) for k, v in (tags or {}).items()})
        self.run_tags = {"batch_id": str(batch_id), "cutoff": str(cutoff)}
        run = self.client.create_run(self.experiment_id, run_name=f"{name}-{batch_id}",
                                     tags=all_tags)
        self.parent_id = run.info.run_id
        self.log_params(self.parent_id, cfg.flat())
        return self.parent_id

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        items = [Param(k, _param_value(v)) for k, v in params.items()]
        for part in _chunks(items, PARAMS_PER_CALL):
            self.safe(self.client.log_batch, run_id, params=part)

    def child(self, name: str, group: str | None = None) -> str | None:
        """The nested child run of job (model `name`, `group`); created once, then reused.
        `group` is a group value, "global" (one model over every series) or "all" (every
        per-group model of `name` in one run: `tracking.child_runs: per_model`)."""
        key = (name, group or "global")
        if key not in self.children:
            run = self.safe(self.client.create_run, self.experiment_id,
                            run_name=f"{name}/{key[1]}",
                            tags={"mlflow.parentRunId": self.parent_id, ROLE: "job",
                                  "model": name, "group": key[1], **self.run_tags})
            if run is None:
                return None
            self.children[key] = run.info.run_id
        return self.children[key]

    def finish(self, status: str = "FINISHED") -> None:
        """Terminate every child run, then the parent (status FINISHED | FAILED | KILLED)."""
        for run_id in self.children.values():
            self.safe(self.client.set_terminated, run_id, status)
        if self.parent_id:
            self.safe(self.client.set_terminated, self.parent_id, status)

    # -------------------------------------------------------------- metrics

    def log_metrics(self, run_id: str, values: dict[str, float], step: int = 0) -> None:
        """Finite values only, in log_batch chunks."""
        import time
        ts = int(time.time() * 1000)
        items = [Metric(k, float(v), ts, step) for k, v in values.items() if _finite(v)]
        for part in _chunks(items, METRICS_PER_CALL):
            self.safe(self.client.log_batch, run_id, metrics=part)

    def log_job(self, run_id: str, result, prefix: str = "", history: bool = True) -> None:
        """A JobResult: per-epoch train_loss / val_loss (step = epoch; skipped with
        history=False, when the worker already logged them live), best_val, best_epoch,
        samples_per_s, seconds, sizes, attempts, resumed_epoch, all named `<prefix><name>`; a
        failed job gets its error as a tag."""
        import time
        ts = int(time.time() * 1000)
        items = [m for i, row in enumerate(result.history if history else [])
                 for m in _epoch_metrics(row, prefix, ts, int(row.get("epoch", i)))]
        for k in ("best_val", "best_epoch", "samples_per_s", "seconds", "n_series",
                  "n_windows", "attempts", "resumed_epoch"):
            if _finite(getattr(result, k, None)):
                items.append(Metric(prefix + k, float(getattr(result, k)), ts, 0))
        tags = [RunTag(f"{prefix}job_ok", str(result.ok))]
        if result.error:
            tags.append(RunTag(f"{prefix}job_error", result.error[:5000]))
        self.safe(self.client.log_batch, run_id, tags=tags)
        for part in _chunks(items, METRICS_PER_CALL):
            self.safe(self.client.log_batch, run_id, metrics=part)

    def log_backtest(self, run_id: str, summary: dict[str, dict[str, float]],
                     model: str) -> None:
        """Backtest.summary(): the run's own model as `backtest_<metric>`, each baseline as
        `<baseline>_<metric>` (`seasonal_naive_mase`), so every run, whatever its model, has the
        same metric names and runs compare column by column."""
        self.log_metrics(run_id, {f"{metric_prefix(m, model)}_{k}": v
                                  for m, row in summary.items() for k, v in row.items()})

    def log_group_table(self, run_id: str | None, model: str, table,
                        runs: bool | None = None) -> None:
        """Per-group rows (a polars DataFrame with a `group` column and metric columns named as
        in `log_backtest`, plus training figures and `model_file`). runs=True (default: child_runs
        per_group): each group's numbers go to its own child run (model, group). Otherwise the
        table is a Parquet artifact of `run_id` (`metrics/per_group.parquet`, tagged once the
        upload succeeded) with summary metrics `groups_<column>_{mean,median,max}`: 10,000
        groups stay one run."""
        import polars as pl
        df = table if isinstance(table, pl.DataFrame) else pl.DataFrame(table)
        cols = [c for c in df.columns if c != "group" and df[c].dtype.is_numeric()]
        if runs if runs is not None else self.child_runs == "per_group":
            for row in df.iter_rows(named=True):
                child = self.child(model, str(row["group"]))
                if child:
                    self.log_metrics(child, {c: row[c] for c in cols})
            return
        if run_id is None:
            return
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / Path(GROUP_TABLE).name
            df.write_parquet(path)
            failures = len(self.failures)
            self.safe(self.client.log_artifact, run_id, str(path), str(Path(GROUP_TABLE).parent))
        if len(self.failures) == failures:   # a tag without its table would break compare
            self.safe(self.client.set_tag, run_id, GROUP_TABLE_TAG, GROUP_TABLE)
        stats = {}
        for c in cols:
            s = df[c].drop_nans().drop_nulls() if df[c].dtype.is_float() else df[c].drop_nulls()
            if len(s):
                stats.update({f"groups_{c}_mean": s.mean(), f"groups_{c}_median": s.median(),
                              f"groups_{c}_max": s.max()})
        self.log_metrics(run_id, stats)

    # -------------------------------------------------------------- artifacts, inputs, models

    def log_artifacts(self, run_id: str, paths: Iterable[str | os.PathLike],
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
        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.entities import DatasetInput, InputTag
        with warnings.catch_warnings():  # "can be interpreted in multiple ways": same class
            warnings.simplefilter("ignore", UserWarning)
            source = resolve_dataset_source(str(path) if "://" in str(path)
                                            else str(Path(path).resolve()))
        ds = MetaDataset(source=source, name=name, digest=digest[:36])
        self.client.log_inputs(run_id, datasets=[DatasetInput(
            ds._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", context)])])
        self.client.set_tag(run_id, "data_hash", digest)

    def log_model(self, run_id: str, model, example_batch) -> str | None:
        """Log a torch model into run `run_id` (see the module docstring for the format);
        returns the model URI (also stored as the run's tag `pipeline.model_uri`)."""
        return self.safe(log_torch_model, run_id, model, example_batch, self.uri)


def metric_prefix(name: str, model: str) -> str:
    """`backtest` for the run's own model, the baseline's name otherwise."""
    return "backtest" if name == model else name


def example_inputs(spec: dict, rows: int = 2, seed: int = 0) -> dict:
    """A seeded random input batch {x, xf, static, idx} for a model built from `spec`."""
    import torch
    g = torch.Generator().manual_seed(seed)
    L, H = spec["lookback"], spec["horizon"]
    out = {"x": torch.randn(rows, L, 1 + spec["past_size"], generator=g)}
    if spec.get("future_size"):
        out["xf"] = torch.randn(rows, H, spec["future_size"], generator=g)
    if spec.get("static_size"):
        out["static"] = torch.randn(rows, spec["static_size"], generator=g)
    if spec.get("num_embeddings") and spec["model"].get("embedding", "none") != "none":
        out["idx"] = torch.randint(0, spec["num_embeddings"], (rows,), generator=g)
    return out


def _example(example_batch, rows: int = 2):
    """The input example: x alone, or a dict of the non-None named tensors; first `rows`."""
    if isinstance(example_batch, dict):
        ex = {k: _numpy(v)[:rows] for k, v in example_batch.items()
              if k in ("x", "xf", "static", "idx") and v is not None}
        return ex["x"] if list(ex) == ["x"] else ex
    return _numpy(example_batch)[:rows]


def log_torch_model(run_id: str, model, example_batch, uri: str | None = None,
                    set_tag: bool = True) -> str:
    """Log `model` (pickle format, signature and input example from `example_batch`) into
    `run_id`; tag the run with the model URI (set_tag) and return it."""
    import mlflow.pytorch
    import torch
    from mlflow.models import infer_signature
    model = model.cpu().eval()
    ex = _example(example_batch)
    with torch.no_grad():
        inputs = ({k: torch.as_tensor(v) for k, v in ex.items()} if isinstance(ex, dict)
                  else {"x": torch.as_tensor(ex)})
        out = model(**inputs).numpy()
    experiment_id = mlflow.MlflowClient(tracking_uri=uri).get_run(run_id).info.experiment_id
    with using(uri, experiment_id), _quiet("mlflow.pytorch", "mlflow.models.model"):
        # quiet: the pickle-format caution (a deliberate choice), and for dict examples the
        # "failed to validate serving input" warning (pyfunc serves one tensor only)
        info = mlflow.pytorch.log_model(
            model, name=MODEL_NAME, run_id=run_id, serialization_format="pickle",
            signature=infer_signature(ex, out), input_example=ex,
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}",
                              f"numpy=={np.__version__}"])
    if set_tag:
        mlflow.MlflowClient(tracking_uri=uri).set_tag(run_id, MODEL_URI_TAG, info.model_uri)
    return info.model_uri


# ------------------------------------------------------------------------------ workers

class EpochLogger:
    """The `log` callback a training job gets in its worker (a Ray task, rank 0 of Ray Train,
    or this process): each epoch's row goes straight into the job's existing child run
    (`<prefix>train_loss`, ... with step = epoch), so a long run is visible while it trains and
    never opens a new experiment. Picklable; the client is made lazily in the worker. A failed
    call is recorded in `errors` (the job carries them back and the driver logs the history
    itself) and never stops training. A retried job that starts again from scratch does not log
    the epochs its earlier attempt logged again (seeded training repeats them)."""

    def __init__(self, uri: str, run_id: str, prefix: str = ""):
        self.uri, self.run_id, self.prefix = uri, run_id, prefix
        self.errors: list[str] = []
        self._client = None
        self._logged: int | None = None     # last epoch in the run before this attempt

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_client": None, "_logged": None}

    def __call__(self, row: dict) -> None:
        import time
        if self.errors:     # one failure is enough: the driver logs the history instead
            return
        try:
            if self._client is None:
                self._client = mlflow.MlflowClient(tracking_uri=self.uri)
            if self._logged is None:
                seen = self._client.get_metric_history(self.run_id, f"{self.prefix}train_loss")
                self._logged = max((m.step for m in seen), default=-1)
            epoch = int(row.get("epoch", 0))
            if epoch <= self._logged:
                return
            items = _epoch_metrics(row, self.prefix, int(time.time() * 1000), epoch)
            self._client.log_batch(self.run_id, metrics=items)
        except _TRACKING_ERRORS as e:
            self.errors.append(f"{type(e).__name__}: {redact(str(e))[:300]}")
