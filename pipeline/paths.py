"""Every place the pipeline writes, derived from `output.path` (a local folder or a pyarrow
filesystem URI such as s3://bucket/prefix), in one module:

    <output.path>/forecasts/job=<name>/cutoff=<data end>/part-0.parquet   (also backtest/,
    <output.path>/plots/job=<name>/cutoff=<data end>/<series>.png          metrics/)
    <output.path>/<name>/validation_report.parquet
    <output.path>/<name>/models/<backtest|final|…>/<model>-<job>.pt
    <output.path>/<name>/checkpoints/<backtest|final>/<model>-<job>-<digest>.ckpt
    <output.path>/_locks/<flow>-<name>-<batch>.lock (and .done)
    <output.path>/mlflow.db, <output.path>/mlartifacts/      (the embedded tracking store)

Outputs on object storage keep models and locks in a local folder instead
($PIPELINE_WORK_DIR, $PIPELINE_LOCK_DIR): MLflow holds the models, and a lock needs a file
system that `flock` works on.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from pipeline.config import Config


def is_remote(uri: str) -> bool:
    return "://" in uri


def cutoff_label(end_ns: int) -> str:
    """Partition value of a data end: 2024-06-30 23:00 -> '20240630T230000'."""
    return np.datetime64(int(end_ns), "ns").astype("datetime64[s]").item().strftime(
        "%Y%m%dT%H%M%S")


def partition(cfg: Config, kind: str, end_ns: int) -> str:
    """The partition folder of one output `kind` (forecasts, backtest, metrics, plots)."""
    return os.path.join(cfg.output.path, kind, f"job={cfg.name}",
                        f"cutoff={cutoff_label(end_ns)}")


def validation_report(cfg: Config) -> str:
    return os.path.join(cfg.output.path, cfg.name, "validation_report.parquet")


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
    root = cfg.train.checkpoint_dir or f"{cfg.output.path.rstrip('/')}/{cfg.name}/checkpoints"
    return root if is_remote(root) else os.path.abspath(root)


def lock_dir(cfg: Config) -> str:
    if not is_remote(cfg.output.path):
        return os.path.join(cfg.output.path, "_locks")
    return os.environ.get("PIPELINE_LOCK_DIR") or os.path.expanduser(
        "~/.cache/forecast-pipeline/locks")


def tracking_db(cfg: Config) -> Path:
    """The embedded tracking store's SQLite file (outputs on object storage: ./outputs)."""
    out = cfg.output.path if not is_remote(cfg.output.path) else "outputs"
    return Path(out).resolve() / "mlflow.db"
