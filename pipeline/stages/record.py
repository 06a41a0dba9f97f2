"""What a batch records of each stage, in one place: the stage's wall time (`Batch.stage`), then,
from the result it returned, the tracking run's entries (`RunLog`), the console's lines
(`pipeline.outputs.console`) and the jobs that failed (`Batch.failed_jobs`). A stage computes
and returns; `@stage(name, recorder)` does the rest:

    @stage("backtest", R.scored)
    def backtest(b, data, jobs, trained, inits=None) -> Scored: ...

Each recorder takes the batch and the stage's result. Progress while a stage runs (epochs,
chunks) is the stage's own display (`pipeline.progress`), not a record."""
from __future__ import annotations

import functools
import math
import os
import sys
from collections.abc import Callable

import yaml

from pipeline import paths
from pipeline.names import safe_key
from pipeline.outputs import console


def stage(name: str, recorder: Callable | None = None) -> Callable:
    """A stage function `fn(b, ...)`: timed under `name` (seconds add up per name), then its
    result recorded by `recorder(b, result)`."""
    def wrap(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def run(b, *args, **kwargs):
            with b.stage(name):
                result = fn(b, *args, **kwargs)
            if recorder is not None:
                recorder(b, result)
            return result
        return run
    return wrap


def failed(b, jobs, why: str | None = None) -> None:
    """Jobs that failed (their series get the fallback): kept for the exit code; with `why`
    (a failure after training) named on stderr."""
    jobs = list(jobs)
    if jobs and why:
        print(f"warning: job(s) {', '.join(jobs[:5])} failed: {why}; their series get the "
              "fallback forecast", file=sys.stderr)
    b.failed_jobs = sorted(set(b.failed_jobs) | set(jobs))


def data(b, prepared) -> None:
    """The input as validated and the config resolved for it."""
    console.data(prepared, b.cfg,
                 paths.validation_report(b.cfg) if b.cfg.output.report else None)


def warm_start(b, inits) -> None:
    if b.cfg.train.warm_start:
        console.warm_start(len(inits), inits.fresh)


def trained(b, t) -> None:
    """A training's figures into its jobs' runs (when tracked), its line, its failed jobs. A
    result already recorded (the backtest's model reused as the final one) is not again."""
    if t is None or t.recorded:
        return
    t.recorded = True
    if b.log is not None and t.tracked:
        b.log.trained(t.results, "final_" if t.final else "")
    console.training(t)
    failed(b, [r.name for r in t.results if not r.ok])


def scored(b, s) -> None:
    """The backtest (and the trainings of its refits): metrics into the run, the
    leaderboard's lines, the conformal calibration's coverage."""
    for refit in s.refits:
        trained(b, refit)
    if b.log is not None:
        b.log.backtest(s.backtest, s.metrics)
    console.backtest(s, b.cfg)
    console.comparator_fallbacks(s.backtest.fallbacks, s.backtest.forecasts)
    if s.selection:
        if b.log is not None:
            b.log.selection(s.selection)
        console.selection(s.selection)
    if s.calibration is not None:
        if b.log is not None:
            b.log.calibration(s.calibration)
        console.coverage(s.calibration, b.cfg.model.name)


def models(b, t) -> None:
    """The models the forecasts come from, into their MLflow runs."""
    if b.log is not None:
        b.log.models(t.results, t.folder)


def promotion(b, decisions) -> None:
    b.log.promotion(decisions)       # promote runs only with a tracking run
    console.promotion(b.cfg.model.name, decisions)


def forecast_made(b, fc) -> None:
    if fc.missing:
        console.missing_champions(fc.missing)


def forecast_written(b, fc) -> None:
    if b.log is not None:
        b.log.forecast(fc.path, fc.n_series, fc.n_fallback, fc.plots)
        if fc.coherence is not None:                        # data.hierarchy
            _log_levels(b, fc.coherence)
    failed(b, fc.failed, "its forecasts are not finite")
    console.forecast(fc, b.cfg.windows.horizon)


def levels(b, c) -> None:
    """A flow without a forecast: its per-level backtest scores (`reconciled.Coherence` or
    None), into the run and printed."""
    if c is None:
        return
    if b.log is not None:
        _log_levels(b, c)
    console.level_scores(c, c.paths)


def _log_levels(b, c) -> None:
    """The reconciliation's method used (a tag) and its per-level scores, into the run."""
    b.log.tag("reconcile_method_used", c.method_used)
    b.log.metrics(levels_scored(c))


def levels_scored(c) -> dict[str, float]:
    """`level_<level>_<base|reconciled>_<mase|smape|wape>` of a Coherence's backtest (the
    finite ones), for the run."""
    if c.level_metrics is None:
        return {}
    return {f"level_{r['level']}_{r['forecast']}_{k}": float(r[k])
            for r in c.level_metrics.iter_rows(named=True) for k in ("mase", "smape", "wape")
            if math.isfinite(r[k])}


def page(b, outcome) -> None:
    """The batch's HTML page, into the run."""
    if b.log is not None:
        b.log.report(outcome.report)
    console.html(outcome.report)


def tuned(b, t) -> None:
    """A search: the tuned configs, the space and the best points into the tune run; the
    trials' counts and the best of each search printed."""
    _log_tuned(b, t)
    cfg = b.cfg
    print(f"tune: {len(t.records)} trial(s) in {t.seconds:,.0f}s: "
          + ", ".join(f"{v} {k}" for k, v in t.counts().items() if v))
    for group, rec in t.best.items():
        point = ", ".join(f"{k}={v}" for k, v in rec.point.items())
        print(f"  best{f' of {group}' if group is not None else ''}: {point} (validation "
              f"{cfg.tune.metric} {rec.score:.4f}, trial {rec.trial_id})")
        print(f"  tuned config: {t.files[group]}")


def _log_tuned(b, t) -> None:
    if b.log is None:
        return
    files = {"space.yaml": yaml.safe_dump(t.raw.get("tune", {}), sort_keys=False)}
    for group, path in t.files.items():
        name = os.path.basename(path) if group is None else f"tuned.{safe_key(group)}.yaml"
        files[name] = t.texts[group]
    best = {}
    for group, rec in t.best.items():
        best.update({(f"{group}." if group is not None else "") + k: v
                     for k, v in rec.point.items()})
    scores = [r.score for r in t.best.values() if math.isfinite(r.score)]
    counts = t.counts()
    b.log.tuned(files, best, sum(scores) / len(scores) if scores else math.nan,
                {"tune.trials": len(t.records), **{f"tune.{k}": v for k, v in counts.items()},
                 "tune.best_trial": ",".join(r.trial_id for r in t.best.values()),
                 "tune.config": ",".join(t.files.values())})
    if any(res.resumed for res in t.results):
        b.log.tag("tune.resumed", "true")
