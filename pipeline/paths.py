"""Every place the pipeline writes, derived from `output.path` (a local folder or a pyarrow
filesystem URI such as s3://bucket/prefix), in one module:

    <output.path>/forecasts/job=<name>/data_end=<data end>/part-0.parquet
    <output.path>/backtest/job=<name>/flow=<flow>/data_end=<data end>/part-0.parquet (metrics/)
    <output.path>/plots/job=<name>/data_end=<data end>/<series>.png
    (`output.format: delta`: <output.path>/forecasts is a Delta table partitioned likewise)
    <output.path>/<name>/validation_report.parquet
    <output.path>/<name>/models/<backtest|final|…>/<model>-<job>.pt
    <output.path>/<name>/checkpoints/<backtest|final>/<model>-<job>-<digest>.ckpt
    <output.path>/_locks/<name>-<data end>.lock, <flow>-<name>-<batch>.done
    <output.path>/mlflow.db, <output.path>/mlartifacts/      (the embedded tracking store)

Outputs on object storage keep models and locks in a local folder instead
($PIPELINE_WORK_DIR, $PIPELINE_LOCK_DIR): MLflow holds the models, and a lock needs a file
system that `flock` works on.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from pipeline.config import Config


def join(root: str, *parts: str) -> str:
    """`root`/parts…, for local paths and URIs alike; a URI's query (`?endpoint_override=…`,
    the options of its filesystem) stays at the end."""
    base, sep, query = root.partition("?")
    return "/".join([base.rstrip("/"), *parts]) + sep + query


def parent(uri: str) -> str:
    """The folder holding `uri` (its query kept)."""
    base, sep, query = uri.partition("?")
    return os.path.dirname(base.rstrip("/")) + sep + query


def is_remote(uri: str) -> bool:
    return "://" in uri


EVALUATIONS = ("backtest", "metrics", "level_metrics", "reports")   # per flow: a challenger
                                                  # never replaces what `run` published


def partition_values(cfg: Config, kind: str, end: str, flow: str,
                     below: dict[str, str] | None = None) -> dict[str, str]:
    """The partition keys of one run's output `kind`, in order: the config's name, for the
    backtest's predictions and metrics the flow that scored them (`run`, `backtest`,
    `nightly`: a nightly challenger's scores never replace what `run` published), the data
    end (a `data_end` label), then `below`'s keys (e.g. a hierarchy level's `level`). None
    of them is a column of the files."""
    keys = {"job": cfg.name}
    if kind in EVALUATIONS:
        keys["flow"] = flow
    return {**keys, "data_end": end, **(below or {})}


def partition(cfg: Config, kind: str, end: str, flow: str = "run",
              below: dict[str, str] | None = None) -> str:
    """The partition folder of one output `kind` (forecasts, backtest, metrics, plots):
    `<output.path>/<kind>/job=<name>[/flow=<flow>]/data_end=<20240630T230000>[/k=v…]`."""
    keys = partition_values(cfg, kind, end, flow, below)
    return join(cfg.output.path, kind, *(f"{k}={v}" for k, v in keys.items()))


def table(cfg: Config, kind: str) -> str:
    """The Delta table of one output `kind` (`output.format: delta`)."""
    return join(cfg.output.path, kind)


def validation_report(cfg: Config) -> str:
    return join(cfg.output.path, cfg.name, "validation_report.parquet")


def models_dir(cfg: Config, label: str) -> str:
    """Where a stage's model files go: next to the outputs when they are local, else a local
    staging folder ($PIPELINE_WORK_DIR or the temp dir): MLflow keeps the models."""
    root = cfg.output.path
    if is_remote(root):
        root = os.environ.get("PIPELINE_WORK_DIR") or os.path.join(tempfile.gettempdir(),
                                                                   "forecast-pipeline")
    return os.path.join(root, cfg.name, "models", label)


def checkpoint_root(cfg: Config) -> str:
    """`train.checkpoint_dir`, default `<output.path>/<name>/checkpoints`; a local path is made
    absolute, so workers that run elsewhere (Ray Train moves their working directory into the
    Ray session) use the same folder."""
    root = cfg.train.checkpoint_dir or join(cfg.output.path, cfg.name, "checkpoints")
    return root if is_remote(root) else os.path.abspath(root)


def partition_lock(cfg: Config, end: str) -> str:
    """The lock of every output partition one run writes (`partition` of each kind for this
    config and data end): whoever writes them, a flow or a command, holds it first."""
    return os.path.join(lock_dir(cfg), f"{cfg.name}-{end}.lock")


def lock_dir(cfg: Config) -> str:
    if not is_remote(cfg.output.path):
        return os.path.join(cfg.output.path, "_locks")
    return os.environ.get("PIPELINE_LOCK_DIR") or os.path.expanduser(
        "~/.cache/forecast-pipeline/locks")


def tracking_db(cfg: Config) -> Path:
    """The embedded tracking store's SQLite file (outputs on object storage: ./outputs)."""
    out = cfg.output.path if not is_remote(cfg.output.path) else "outputs"
    return Path(out).resolve() / "mlflow.db"


def tune_dir(cfg: Config) -> str:
    """Where searches keep their state (`<output.path>/<name>/tune`, absolute; a URI as
    given): Ray Tune resumes an unfinished search from there."""
    root = join(cfg.output.path, cfg.name, "tune")
    return root if is_remote(root) else os.path.abspath(root)
