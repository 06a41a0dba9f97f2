"""What one pipeline run records in MLflow, stage by stage (DESIGN.md §7). It speaks the
pipeline's vocabulary (jobs, backtests, forecasts) and writes through `pipeline.tracking`.

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
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import tempfile
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
import yaml

import pipeline
from pipeline import tracking
from pipeline.config import Config
from pipeline.names import model_file
from pipeline.provenance import data_hash, git_commit
from pipeline.tracking import read


class RunLog:
    def __init__(self, tracker: tracking.Tracker, cfg: Config):
        self.tr = tracker
        self.cfg = cfg
        self.model = cfg.model.name
        self.groups: dict[str, dict] = {}    # per-group rows for the "all" / "global" run

    @classmethod
    def open(cls, cfg: Config) -> RunLog | None:
        """None when tracking is off, or when the server is unreachable and
        `tracking.required` is false (with a warning); raises InfraError when it is
        unreachable and required — before any data is read or model trained."""
        if not cfg.tracking.enabled:
            return None
        tracking.quiet_logs()
        uri = tracking.tracking_uri(cfg)
        wait = cfg.tracking.timeout_seconds
        if not tracking.check_server(uri, timeout=wait, required=cfg.tracking.required):
            return None
        return cls(tracking.Tracker(uri, tracking.artifact_root(uri), wait), cfg)

    @property
    def uri(self) -> str:
        return self.tr.uri

    @property
    def parent_id(self) -> str | None:
        return self.tr.parent_id

    @property
    def failures(self) -> list[str]:
        return self.tr.failures

    @property
    def experiment(self) -> str:
        return self.cfg.tracking.experiment or self.cfg.name

    def where(self) -> str:
        """The store, experiment and run, for the console: a SQLite file under the working
        directory as a relative URI (`sqlite:///outputs/mlflow.db`, which MLflow reads the
        same from there)."""
        uri = self.tr.uri
        if uri.startswith("sqlite:///"):
            path = Path(uri[len("sqlite:///"):])
            with contextlib.suppress(ValueError):
                uri = "sqlite:///" + str(path.resolve().relative_to(Path.cwd().resolve()))
        return f"{tracking.redact(uri)} experiment {self.experiment!r} run {self.parent_id}"

    # -------------------------------------------------------------- the batch's runs

    def batch_runs(self, flow: str, batch_id: str, status: str, tag: str = "flow"
                   ) -> list[str]:
        """Parent runs of this config's batch `batch_id` of `flow` in `status`; tag
        "command": of the CLI's command `flow` instead."""
        return self.tr.safe(read.batch_runs, self.uri, self.experiment, flow, self.cfg.name,
                            batch_id, status, tag) or []

    def kill(self, parent_id: str) -> None:
        """Mark a run left RUNNING by a crash, and its job runs, KILLED."""
        for run_id in [*(self.tr.safe(read.child_runs, self.uri, parent_id) or []), parent_id]:
            self.tr.terminate(run_id, "KILLED")

    def start_over(self, flow: str, batch_id: str, tag: str, finished: list[str]) -> None:
        """A batch run again: its parent runs still RUNNING, which only a crash leaves while
        the batch's lock is held, and their job runs marked KILLED; its `finished` runs
        superseded."""
        for run_id in self.batch_runs(flow, batch_id, "RUNNING", tag):
            self.kill(run_id)
        self.supersede(*finished)

    def supersede(self, *parent_ids: str) -> None:
        """Tag finished runs and their job runs superseded (comparisons leave them out)."""
        for parent_id in parent_ids:
            for run_id in [parent_id,
                           *(self.tr.safe(read.child_runs, self.uri, parent_id) or [])]:
                self.tr.set_tag(run_id, tracking.SUPERSEDED_TAG, "true")

    # -------------------------------------------------------------- parent run

    def start(self, batch_id: str, cutoff: str, report=None,
              tags: dict | None = None) -> str | None:
        """The parent run; `report` is the validation report (a polars DataFrame), logged as
        an artifact from memory (the outputs may live on object storage)."""
        cfg = self.cfg
        local = "://" not in cfg.data.path and os.path.exists(cfg.data.path)
        digest = self.tr.safe(data_hash, [cfg.data.path]) if local else None
        all_tags = {"batch_id": str(batch_id), "cutoff": str(cutoff),
                    "pipeline_version": pipeline.__version__,
                    "tracking_uri": tracking.redact(self.uri), "model": self.model,
                    "train_mode": cfg.train.mode, "config": cfg.name, **(tags or {})}
        if digest:
            all_tags["data_hash"] = digest
        if commit := git_commit():
            all_tags["git_commit"] = all_tags["mlflow.source.git.commit"] = commit
        parent = self.tr.safe(self.tr.start, self.experiment, f"{self.experiment}-{batch_id}",
                              {k: str(v) for k, v in all_tags.items()}, cfg.flat())
        if parent is None:
            return None
        if digest:
            self.tr.log_input(parent, cfg.data.path, digest)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / tracking.CONFIG_ARTIFACT
            path.write_text(tracking.redact(yaml.safe_dump(cfg.to_dict(), sort_keys=False)))
            files = [path]
            if report is not None:
                files.append(Path(tmp) / "validation_report.parquet")
                report.write_parquet(files[-1])
            self.tr.log_artifacts(parent, files)
        return parent

    # -------------------------------------------------------------- jobs

    def key(self, job) -> str:
        """The child-run group label of a job (a Job or JobResult)."""
        return self.key_of(job.group)

    def key_of(self, group: str | None) -> str:
        if self.cfg.train.mode == "global":
            return "global"
        return str(group) if self.cfg.tracking.child_runs == "per_group" else "all"

    def run_of(self, job) -> str | None:
        return self.job_run(self.key(job))

    def job_run(self, key: str) -> str | None:
        """The child run of this run's model for `key` ("global", "all" or a group)."""
        return self.tr.child(self.model, key) if self.parent_id else None

    @property
    def batch_tags(self) -> dict[str, str]:
        """batch_id and cutoff of this run (every job run carries them too)."""
        return dict(self.tr.run_tags)

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
                out[job.name] = tracking.EpochLogger(self.uri, run_id, prefix, self.tr.timeout,
                                                     self.parent_id)
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
        for key, value in (("season", bt.season), ("history", bt.history),
                           ("horizon", self.cfg.windows.horizon)):  # a comparator champion's
            self.tr.set_tag(self.parent_id, f"comparator_{key}", str(value))  # settings
        if per_series is not None:       # an Arrow table: written here, logged, removed
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "per_series_metrics.parquet"
                pq.write_table(per_series, path)
                self.tr.log_artifacts(self.parent_id, [path])
        job_run = "global" if self.cfg.train.mode == "global" else \
            "all" if self.cfg.tracking.child_runs == "per_model" else None
        run_id = self.tr.child(self.model, job_run) if job_run else None
        if run_id:
            self.tr.log_backtest(run_id, summary, self.model)
        if self.cfg.data.group_col:
            for g, models in bt.group_summaries().items():
                self.groups.setdefault(g, {"group": g}).update({
                    f"{tracking.metric_prefix(m, self.model)}_{k}": v
                    for m, row in models.items() for k, v in row.items()})
        if self._group_runs():
            self._flush_groups()      # each group's numbers into its own child run

    def calibration(self, cal) -> None:
        """A `calibration.Calibration` on the parent run: each model's conformal coverage on
        the latest backtest window (`coverage_80` for the run's model, `<model>_coverage_80`
        for the comparators and baselines) and every model's widths (`conformal.json`, which
        `forecast --from-registry` puts around the run's champions' forecasts)."""
        if self.parent_id:
            self.tr.log_metrics(self.parent_id, {
                k if m == self.model else f"{m}_{k}": v
                for m, row in cal.coverage.items() for k, v in row.items()})
            self.tr.safe(self.tr.client.log_text, self.parent_id, cal.to_json(),
                         tracking.CALIBRATION_ARTIFACT)

    # -------------------------------------------------------------- models

    def models(self, results: list, folder: str) -> None:
        """The models the forecasts come from: logged into the job's run; in an "all" run as
        the files in `folder` (logged as models when one is promoted)."""
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
                self.tr.log_model(run_id, r.model())
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
        self.tr.set_tag(self.parent_id, "forecast_path", path)
        self.tr.log_metrics(self.parent_id, {"forecast_series": n_series,
                                             "forecast_fallback_series": n_fallback})
        if plots:
            self.tr.log_artifacts(self.parent_id, plots, "plots")

    def report(self, path: str) -> None:
        """The batch's HTML page as an artifact of the parent run (from a local file)."""
        if self.parent_id and "://" not in path:
            self.tr.log_artifacts(self.parent_id, [path])

    def selection(self, selection: dict) -> None:
        """The candidate each group publishes and every candidate's backtest score, as
        `selection.json` on the parent run."""
        if self.parent_id:
            rows = {g or "all": dataclasses.asdict(c) for g, c in selection.items()}
            self.tr.safe(self.tr.client.log_text, self.parent_id,
                         json.dumps(rows, indent=1, default=str), "selection.json")

    def promotion(self, decisions: list) -> None:
        """Each group's challenger-against-champion decision, both scores and the note, as
        `promotion.json` on the parent run."""
        if self.parent_id:
            rows = [dataclasses.asdict(d) for d in decisions]
            self.tr.safe(self.tr.client.log_text, self.parent_id,
                         json.dumps(rows, indent=1, default=str), "promotion.json")

    def metrics(self, values: dict[str, float]) -> None:
        """Run-level figures on the parent run (wall seconds per stage, promotions, …)."""
        if self.parent_id:
            self.tr.log_metrics(self.parent_id, values)

    def tag(self, key: str, value: str) -> None:
        """A tag on the parent run (also once it has finished)."""
        if self.parent_id:
            self.tr.set_tag(self.parent_id, key, value)

    def trial_runs(self) -> tracking.TrialRuns | None:
        """Where a search's trials go: child runs of this (the `tune` command's) run."""
        if not self.parent_id or self.tr.experiment_id is None:
            return None
        return tracking.TrialRuns(self.uri, self.parent_id, self.tr.experiment_id,
                                  self.batch_tags, self.tr.timeout)

    def tuned(self, files: dict[str, str], best: dict, score: float, tags: dict) -> None:
        """A search's outcome on its parent run: the best point as `best.<key>` params, its
        score as `best_score`, `tags`, and text `files` (the space, the tuned config) under
        `tune/`."""
        if not self.parent_id:
            return
        self.tr.log_params(self.parent_id, {f"best.{k}": v for k, v in best.items()})
        self.tr.log_metrics(self.parent_id, {"best_score": score})
        for k, v in tags.items():
            self.tr.set_tag(self.parent_id, k, str(v))
        with tempfile.TemporaryDirectory() as tmp:
            paths = []
            for name, text in files.items():
                paths.append(Path(tmp) / name)
                paths[-1].write_text(tracking.redact(text))
            self.tr.log_artifacts(self.parent_id, paths, "tune")

    def finish(self, ok: bool = True, status: str | None = None) -> None:
        """End the run and its job runs: FINISHED, FAILED, or `status` (KILLED)."""
        if not self.parent_id:
            return
        self._flush_groups()
        self.tr.finish(status or ("FINISHED" if ok else "FAILED"))

    def _flush_groups(self) -> None:
        """The per-group rows: into each (model, group) child run, or as the table of the
        "global" / "all" run."""
        if not self.groups:
            return
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
