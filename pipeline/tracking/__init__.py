"""The MLflow layer (DESIGN.md §7): the only package that imports mlflow, through its public API.

    connect.py    where clients are made: credentials out of URIs, request timeouts, a
                  server given up once per run
    runs.py       the one writer of runs: parent and child runs (the child-run layout),
                  params, metrics, artifacts, live epochs from the workers, a search's trials
    read.py       the one reader: leaderboards, champions, batch records, run configs
    models.py     models in MLflow: logged (weights file + PyTorch flavor), registered, loaded
    runlog.py     what a pipeline run records, stage by stage, in its vocabulary (through runs.py)
    champions.py  comparison, champions and promotion (through read.py and models.py)

This module says where runs go. `tracking_uri(cfg)`: `tracking.uri`, else $MLFLOW_TRACKING_URI,
else the embedded default `sqlite:///<output.path>/mlflow.db` with artifacts beside it
(`<output.path>/mlartifacts`). Remote servers take credentials from the environment
(MLFLOW_TRACKING_USERNAME / _PASSWORD / _TOKEN); a URI's `user:password@` is moved there by
`connect.connect` and never handed to MLflow; URIs pass through `redact` before they appear in
any message, tag or param.
"""
from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

from pipeline import paths
from pipeline.errors import InfraError
from pipeline.secrets import redact
from pipeline.tracking.connect import client
from pipeline.tracking.models import MODEL_URI_TAG
from pipeline.tracking.runs import (
    CALIBRATION_ARTIFACT,
    CONFIG_ARTIFACT,
    GROUP_TABLE,
    GROUP_TABLE_TAG,
    ROLE,
    SUPERSEDED_TAG,
    EpochLogger,
    Tracker,
    metric_prefix,
)
from pipeline.tracking.trials import TrialRuns

__all__ = ["CALIBRATION_ARTIFACT", "CONFIG_ARTIFACT", "GROUP_TABLE", "GROUP_TABLE_TAG",
           "MODEL_URI_TAG", "ROLE", "SUPERSEDED_TAG", "EpochLogger", "Tracker", "TrialRuns",
           "artifact_root", "check_server", "client", "metric_prefix", "quiet_logs",
           "redact", "tracking_uri"]


def tracking_uri(cfg) -> str:
    """cfg.tracking.uri, else $MLFLOW_TRACKING_URI, else the embedded SQLite file."""
    if cfg.tracking.uri:
        return cfg.tracking.uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{paths.tracking_db(cfg)}"   # made on first use (Tracker)


def artifact_root(uri: str) -> str | None:
    """Where a new experiment keeps its artifacts: beside the SQLite file for the embedded
    store (`<dir>/mlartifacts`; MLflow's own default is ./mlruns in the current directory),
    the server's choice otherwise (None)."""
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri[len("sqlite:///"):]).resolve().parent / "mlartifacts").as_uri()


def quiet_logs() -> None:
    """Creating or migrating a store logs INFO lines on stderr; a CLI wants its one-line
    messages, and no "Downloading artifacts" bars (a user's own setting of
    MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR wins). Called when a run's tracking opens, never at
    import."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    for name in ("mlflow.store.db.utils", "alembic.runtime.migration"):
        logging.getLogger(name).setLevel(logging.WARNING)


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
            client(uri).search_experiments(max_results=1)
        return True
    except Exception as e:  # noqa: BLE001 - any failure means "not usable"
        reason = redact(str(e).splitlines()[0] if str(e) else type(e).__name__)[:300]
        msg = f"MLflow tracking server at {redact(uri)} is unreachable: {reason}"
        if required:
            raise InfraError(msg + " (set tracking.required: false to run without "
                             "tracking)") from None
        warnings.warn(msg + "; continuing without tracking", stacklevel=2)
        return False
