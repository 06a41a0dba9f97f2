"""What one pipeline run records in MLflow, stage by stage (DESIGN.md §7).

    log = RunLog.open(cfg)          # before anything runs: an unreachable server is an error
    log.start(batch_id, cutoff, report) # parent run: tags, config params, input, report
    log.loggers(jobs, prefix)       # per-job EpochLoggers the training workers log into
    log.trained(results, prefix)    # training figures (history when the worker could not)
    log.backtest(bt)                # overall and per-group backtest metrics, per-series Parquet
    log.models(results, folder)     # the models the forecasts come from
    log.forecast(path, n, ...)      # where the forecasts went
    log.finish(ok)

Child runs: one per job — (model, "global") for a global model; (model, group) per group with
`tracking.child_runs: per_group`; with `per_model` one (model, "all") run holds every group's
model as a file artifact and a per-group table (`metrics/per_group.parquet`). Every call is
failure-tolerant (`Tracker.safe`): logging problems are listed in `failures`, outputs are kept.
The mlflow import stays in `pipeline.tracking`.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from pipeline import tracking
from pipeline.config import Config
from pipeline.names import model_file


class RunLog:
    def __init__(self, tracker: tracking.Tracker, cfg: Config):
        self.tr = tracker
        self.cfg = cfg
        self.model = cfg.model.name
        self.groups: dict[str, dict] = {}    # per-group rows for the "all" / "global" run

    @classmethod
    def open(cls, cfg: Config) -> RunLog | None:
        """None when tracking is off, or when the server is unreachable and
        `tracking.required` is false (with a warning); raises PipelineError when it is
        unreachable and required — before any data is read or model trained."""
        if not cfg.tracking.enabled:
            return None
        uri = tracking.tracking_uri(cfg)
        if not tracking.check_server(uri, required=cfg.tracking.required):
            return None
        return cls(tracking.Tracker(uri, cfg.tracking.child_runs), cfg)

    @property
    def parent_id(self) -> str | None:
        return self.tr.parent_id

    @property
    def failures(self) -> list[str]:
        return self.tr.failures

    def where(self) -> str:
        return (f"{tracking.redact(self.tr.uri)} experiment {self.experiment!r} "
                f"run {self.parent_id}")

    # -------------------------------------------------------------- parent run

    @property
    def experiment(self) -> str:
        return self.cfg.tracking.experiment or self.cfg.name

    def start(self, batch_id: str, cutoff: str, report=None,
              tags: dict | None = None) -> str | None:
        """The parent run; `report` is the validation report (a polars DataFrame), logged as
        an artifact from memory (the outputs may live on object storage)."""
        import yaml
        cfg = self.cfg
        local = "://" not in cfg.data.path and os.path.exists(cfg.data.path)
        digest = self.tr.safe(tracking.data_hash, [cfg.data.path]) if local else None
        parent = self.tr.safe(self.tr.start, cfg, batch_id, cutoff, digest,
                              tags={"model": self.model, "train_mode": cfg.train.mode,
                                    "config": cfg.name, **(tags or {})})
        if parent is None:
            return None
        if digest:
            self.tr.log_input(parent, cfg.data.path, digest)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / tracking.CONFIG_ARTIFACT
            path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
            files = [path]
            if report is not None:
                files.append(Path(tmp) / "validation_report.parquet")
                report.write_parquet(files[-1])
            self.tr.log_artifacts(parent, files)
        return parent

    # -------------------------------------------------------------- jobs

    def key(self, job) -> str:
        """The child-run group label of a job (a Job or JobResult)."""
        if self.cfg.train.mode == "global":
            return "global"
        return str(job.group) if self.cfg.tracking.child_runs == "per_group" else "all"

    def run_of(self, job) -> str | None:
        return self.tr.child(self.model, self.key(job)) if self.parent_id else None

    def loggers(self, jobs: list, prefix: str = "") -> dict | None:
        """job name -> EpochLogger for the workers (None when a run holds several jobs: the
        "all" run, or packed training, whose histories the driver logs)."""
        if not self.parent_id or self.cfg.train.per_group.packed or \
                any(self.key(j) == "all" for j in jobs):
            return None
        out = {}
        for job in jobs:
            run_id = self.run_of(job)
            if run_id:
                out[job.name] = tracking.EpochLogger(self.tr.uri, run_id, prefix)
        return out

    def trained(self, results: list, prefix: str = "") -> None:
        """Training figures of each job into its child run; the per-epoch history too unless
        the worker logged it live. In an "all" run they become columns of the group table."""
        if not self.parent_id:
            return
        for r in results:
            if self.key(r) == "all":
                row = self.groups.setdefault(str(r.group), {"group": str(r.group)})
                row.update({f"{prefix}best_val": r.best_val, f"{prefix}best_epoch": r.best_epoch,
                            f"{prefix}epochs": len(r.history), f"{prefix}seconds": r.seconds,
                            f"{prefix}ok": r.ok, f"{prefix}error": r.error or ""})
                self.tr.child(self.model, "all")
                continue
            run_id = self.run_of(r)
            if run_id:
                self.tr.log_job(run_id, r, prefix, history=not r.logged)
            for err in r.log_errors[:1]:
                self.tr.failures.append(f"live logging of job {r.name}: {err}")

    # -------------------------------------------------------------- backtest

    def backtest(self, bt, per_series=None) -> None:
        """Overall metrics on the parent (`backtest_<metric>`, `<baseline>_<metric>`), the
        job's own numbers on each child run, per-group numbers for every group."""
        if not self.parent_id:
            return
        summary = bt.summary()
        self.tr.log_backtest(self.parent_id, summary, self.model)
        if per_series is not None:       # an Arrow table: written here, logged, removed
            import pyarrow.parquet as pq
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "per_series_metrics.parquet"
                pq.write_table(per_series, path)
                self.tr.log_artifacts(self.parent_id, [path])
        table = group_summary(bt.metrics, self.model) if self.cfg.data.group_col else {}
        job_run = "global" if self.cfg.train.mode == "global" else \
            "all" if self.cfg.tracking.child_runs == "per_model" else None
        run_id = self.tr.child(self.model, job_run) if job_run else None
        if run_id:
            self.tr.log_backtest(run_id, summary, self.model)
        for g, row in table.items():
            self.groups.setdefault(g, {"group": g}).update(row)
        if self._group_runs():
            self._flush_groups()      # each group's numbers into its own child run

    # -------------------------------------------------------------- models

    def models(self, results: list, folder: str) -> None:
        """The models the forecasts come from: logged with the PyTorch flavor into the job's
        run; in an "all" run as the files in `folder` (see registry.model_source)."""
        if not self.parent_id:
            return
        for r in results:
            if not r.ok:
                continue
            if self.key(r) == "all":
                fname = model_file(self.model, r.name)
                self.groups.setdefault(str(r.group), {"group": str(r.group)})["model_file"] = \
                    f"models/{fname}"
                continue
            run_id = self.run_of(r)
            if run_id:
                model = r.model()
                self.tr.log_model(run_id, model, tracking.example_inputs(model.spec))
        if any(self.key(r) == "all" for r in results) and os.path.isdir(folder):
            run_id = self.tr.child(self.model, "all")
            files = sorted(Path(folder).glob(f"{self.model}-*.pt"))
            if run_id and files:
                self.tr.log_artifacts(run_id, files, "models")

    # -------------------------------------------------------------- forecast, end

    def forecast(self, path: str, n_series: int, n_fallback: int, plots: list | None = None
                 ) -> None:
        if not self.parent_id:
            return
        self.tr.safe(self.tr.client.set_tag, self.parent_id, "forecast_path", path)
        self.tr.log_metrics(self.parent_id, {"forecast_series": n_series,
                                             "forecast_fallback_series": n_fallback})
        if plots:
            self.tr.log_artifacts(self.parent_id, plots, "plots")

    def timings(self, seconds: dict[str, float]) -> None:
        """Wall seconds per stage as parent-run metrics `seconds_<stage>`."""
        if self.parent_id:
            self.tr.log_metrics(self.parent_id, {f"seconds_{k}": v for k, v in seconds.items()})

    def finish(self, ok: bool = True) -> None:
        if not self.parent_id:
            return
        self._flush_groups()
        self.tr.finish("FINISHED" if ok else "FAILED")

    def _flush_groups(self) -> None:
        """The per-group rows: into each (model, group) child run, or as the table of the
        "global" / "all" run."""
        if not self.groups:
            return
        import polars as pl
        rows = list(self.groups.values())
        self.groups = {}
        cols = list(dict.fromkeys(k for r in rows for k in r))
        df = pl.DataFrame({c: [r.get(c) for r in rows] for c in cols}, strict=False)
        if self._group_runs():
            self.tr.log_group_table(None, self.model, df.sort("group"), runs=True)
            return
        run_id = self.tr.child(self.model, "global" if self.cfg.train.mode == "global"
                               else "all")
        self.tr.log_group_table(run_id, self.model, df.sort("group"), runs=False)

    def _group_runs(self) -> bool:
        """One child run per group: per-group training with child_runs per_group (a global
        model stays one run whatever child_runs says; its per-group numbers are a table)."""
        return self.cfg.train.mode == "per_group" and self.cfg.tracking.child_runs == "per_group"


def group_summary(metric_blocks: list[dict], model: str) -> dict[str, dict[str, float]]:
    """Per group: the run's model as `backtest_<metric>` and each baseline as
    `<baseline>_<metric>`, each summarised over the group's series and cutoffs as
    `Backtest.summary` does overall."""
    from pipeline import evaluate as E
    from pipeline.backtest import concat_columns
    cols = concat_columns(metric_blocks)
    if not cols:
        return {}
    names = [k for k in cols if k not in ("unique_id", "cutoff", "model", "group")]
    models, groups = cols["model"].astype(str), cols["group"].astype(str)
    out: dict[str, dict[str, float]] = {}
    for g in np.unique(groups):
        for m in np.unique(models):
            sel = (groups == g) & (models == m)
            if not sel.any():
                continue
            summary = E.summarize({k: cols[k][sel] for k in names})
            prefix = tracking.metric_prefix(m, model)
            out.setdefault(str(g), {}).update({f"{prefix}_{k}": v for k, v in summary.items()})
    return out
