"""One trial of a search: train a config's jobs as the `train` stage would before the oldest
backtest cutoff, and score it on their validation windows. Imports neither Ray nor MLflow (the
search, `pipeline.execution.ray_tune`, calls it inside Ray Tune's trials).

The windows come from `plan_windows`: training and validation end before the oldest backtest
cutoff and the scaling is fitted on the same prefix, so a trial never reads the backtest's
windows, with `evaluate.refit` too (its later cutoffs only add trainings after the search).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from pipeline.config import Config
from pipeline.data.series import SeriesArrays
from pipeline.errors import PipelineError
from pipeline.training.jobs import run_pack
from pipeline.training.plan import plan_jobs, plan_packs
from pipeline.training.results import JobResult


@dataclass
class TrialScore:
    score: float                     # the series-weighted mean of the jobs' best validation
    jobs: dict[str, float] = field(default_factory=dict)   # job name -> its score
    epochs: int = 0                  # epochs the longest job trained
    errors: list[str] = field(default_factory=list)


def job_score(result: JobResult) -> float:
    """A job's best validation score (an ensemble's: the mean over its members)."""
    if result.members:
        vals = [m["best_val"] for m in result.members if math.isfinite(m.get("best_val", math.nan))]
        return float(np.mean(vals)) if vals else math.nan
    return result.best_val


def run_trial(arrays: SeriesArrays, cfg: Config, group: str | None = None,
              report: Callable[[dict], None] | None = None) -> TrialScore:
    """Train every job of `cfg` (or only `group`'s) and score it. `report(row)` gets each
    epoch's row of the first job (an ensemble's member 0): the curve a scheduler stops
    trials on."""
    jobs = plan_jobs(arrays, cfg)
    if group is not None:
        jobs = [j for j in jobs if j.name == group]
        if not jobs:
            raise PipelineError(f"tune: no group {group!r} in the data")
    logs = {jobs[0].name: report} if report is not None else {}
    results: list[JobResult] = []
    for pack in plan_packs(jobs, cfg):
        results += run_pack(arrays, pack, cfg, logs=logs)
    scores = {r.name: job_score(r) for r in results if r.ok}
    errors = [f"{r.name}: {r.error}" for r in results if not r.ok]
    weights = {r.name: r.n_series for r in results if r.ok}
    finite = [k for k, v in scores.items() if math.isfinite(v)]
    if not finite:
        raise PipelineError("the trial has no finite validation score"
                            + (f" ({errors[0]})" if errors else ""))
    total = sum(weights[k] for k in finite) or len(finite)
    score = sum(scores[k] * (weights[k] or 1) for k in finite) / total
    epochs = max((len(r.history) for r in results), default=0)
    return TrialScore(float(score), scores, epochs, errors)
