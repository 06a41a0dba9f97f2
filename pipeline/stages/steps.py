"""The stages the flows compose (`flows/*.py`), in the order data flows through them:

    prepare -> plan -> warm_start -> train -> backtest -> final_model -> log_models
            -> forecast (or promote -> registry_forecast) -> write_forecast -> html_report

(the forecast stages are `pipeline.stages.forecast`'s)

Each takes the `Batch` (config, runner, tracking run) and the results it needs as arguments,
does one step and returns its result; `@stage` (`pipeline.stages.record`) times it and records
the result (the tracking run, the console, failed jobs). The flow passes results on and returns
them as an `Outcome`."""
from __future__ import annotations

import dataclasses
import shutil
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pipeline import paths
from pipeline.config import Config
from pipeline.data.loader import loader_at
from pipeline.data.prepare import Prepared
from pipeline.data.prepare import read as read_input
from pipeline.data.prepare import resolve as resolve_for_data
from pipeline.errors import InfraError, PipelineError
from pipeline.evaluation.statistical import Statistical
from pipeline.forecasting.backtest import (
    Backtest,
    Chunked,
    backtest_keys,
    concat_columns,
    config_at,
    drawn_series,
)
from pipeline.forecasting.backtest import backtest as score
from pipeline.forecasting.intervals import Calibration, calibrate
from pipeline.forecasting.select import select
from pipeline.names import model_file
from pipeline.outputs import console as report
from pipeline.outputs import html as htmlreport
from pipeline.outputs import partitions as output
from pipeline.paths import join
from pipeline.stages import record as R
from pipeline.stages.batch import Batch
from pipeline.stages.forecast import champion_jobs, checked_models
from pipeline.stages.levels import with_levels
from pipeline.stages.reconciled import scored_levels
from pipeline.stages.record import stage
from pipeline.tracking import champions as compare
from pipeline.training.device import resolve_device
from pipeline.training.jobs import n_groups, new_model, run_jobs_locally
from pipeline.training.plan import Job, plan_jobs, plan_packs
from pipeline.training.results import JobResult, save_result, state_bytes

if TYPE_CHECKING:
    from pipeline.stages.forecast import Forecast
    from pipeline.stages.tune import Tuned


@dataclass
class Trained:
    """A training stage's jobs and where their model files went. `tracked`: trained into the
    run's job runs (a refit cutoff's training is not); `recorded`: `record.trained` saw it."""
    results: list[JobResult]
    folder: str
    final: bool = False
    tracked: bool = True
    recorded: bool = False

    def models(self) -> dict:
        """{job name: the trained model} of the jobs that trained."""
        return {r.name: r.model() for r in self.results if r.ok}


@dataclass
class Scored:
    """A backtest: per-series metrics and predictions, the summary, the written partitions."""
    backtest: Backtest
    summary: dict[str, dict[str, float]]
    paths: list[str]
    predictions: dict
    metrics: object = None                     # the per-series metrics table written
    calibration: Calibration | None = None     # evaluate.intervals: conformal
    refits: list[Trained] = field(default_factory=list)   # evaluate.refit: the later cutoffs'
    selection: dict = field(default_factory=dict)  # evaluate.select: group -> select.Choice


@dataclass
class Outcome:
    """What a flow returns: the result of each stage it ran, typed, None (or empty) where the
    flow has no such stage. The flow builds it from the values it passed from stage to stage,
    hands it to `html_report`, and returns it; `flows._common.run_flow` leaves it on the
    finished batch (`Batch.outcome`, None when the flow stopped early)."""
    data: Prepared | None = None                  # the input, validated, and the window plan
    jobs: list[Job] = field(default_factory=list)
    inits: Inits = field(default_factory=lambda: Inits())  # warm-start weights, by job
    trained: Trained | None = None                # before the backtest cutoffs
    scored: Scored | None = None                  # the backtest
    final: Trained | None = None                  # the forecast model
    decisions: list[compare.Decision] | None = None   # challenger vs champion, when promoted
    forecast: Forecast | None = None
    levels: object = None        # data.hierarchy without a forecast: `scored_levels`'s scores
    tuned: Tuned | None = None
    report: str | None = None                     # the batch's HTML page


class Inits(dict):
    """{job name: warm-start weights}; `fresh`: the jobs whose champion did not fit this
    config's architecture (they train from scratch)."""

    def __init__(self, weights: dict | None = None, fresh: list[str] | None = None) -> None:
        super().__init__(weights or {})
        self.fresh = list(fresh or [])


def prepare(b: Batch) -> Prepared:
    """Read and validate the input into arrays (the tracking server checked first); nothing
    is written yet."""
    b.open()
    return _read(b)


@stage("data")
def _read(b: Batch) -> Prepared:
    return with_levels(read_input(b.cfg, b.runner))    # data.hierarchy's levels appended


def resolve(b: Batch, data: Prepared) -> Prepared:
    """The config for this data (`recipe: auto`, `train.threads: auto`; `train.checkpoint_dir`
    made absolute, by default under the outputs) and the window plan under it; the batch opens
    on the data cutoff with that config, which the stages use from here (`b.cfg`; lock,
    skip-if-done, the tracking run logging it, the validation report)."""
    data = _resolve(b, data)
    b.begin(data)
    R.data(b, data)
    return data


@stage("data")
def _resolve(b: Batch, data: Prepared) -> Prepared:
    data = resolve_for_data(data)
    cfg = data.cfg       # one checkpoint folder for every worker, wherever it runs
    return dataclasses.replace(data, cfg=dataclasses.replace(cfg, train=dataclasses.replace(
        cfg.train, checkpoint_dir=paths.checkpoint_root(cfg))))


def plan(b: Batch, data: Prepared) -> list[Job]:
    """One global job over every series, or one job per group. Without `model.season`, the
    CNN's receptive field is checked against the data's season (by frequency)."""
    if b.cfg.model.season is None:
        b.cfg.check_season(data.arrays.freq.default_season(data.arrays.lengths),
                           f"the {data.arrays.freq.name} data's season")
    return plan_jobs(data.arrays, b.cfg)


@stage("warm_start", R.warm_start)
def warm_start(b: Batch, data: Prepared, jobs: list[Job]) -> Inits:
    """With `train.warm_start`: {job name: the registered champion's weights} for the jobs
    whose champion has this config's architecture. A global job whose data has groups starts
    from their champions when they are all one model (a global model promoted everywhere)."""
    cfg, arrays = b.cfg, data.arrays
    if not cfg.train.warm_start:
        return Inits()
    by = "global" if cfg.train.mode == "global" else "group"
    champs = compare.load_champions(cfg, jobs, by)
    if by == "global" and not champs.found and arrays.groups is not None:
        per_group = compare.load_champions(cfg, champion_jobs(cfg, arrays, "group"), "group")
        if len({(c.version.run_id, c.version.source) for c in per_group.found}) == 1:
            champs.found = [dataclasses.replace(per_group.found[0], job=jobs[0])]
            champs.missing = []
    want = new_model(loader_at(arrays, cfg, arrays.lengths), cfg, len(arrays),
                     n_groups(arrays)).spec
    return Inits(*compare.warm_states(champs, want, state_bytes))


@stage("train", R.trained)
def train(b: Batch, data: Prepared, jobs: list[Job], inits: dict | None = None) -> Trained:
    """Train the plan of jobs where the config says (Ray tasks, Ray Train, or this process)
    on the data before the oldest backtest cutoff, into the run's job runs; save each model
    next to the outputs."""
    return _fit(b, data, jobs, inits)


def _fit(b: Batch, data: Prepared, jobs: list[Job], inits: dict | None = None, *,
         final: bool = False, cfg: Config | None = None, label: str | None = None
         ) -> Trained:
    """`train`'s work; final=True trains on all the data (the forecast model). `cfg` (a refit
    cutoff's config) trains untracked, on windows planned for it."""
    tracked, plan_ = cfg is None, data.plan if cfg is None and not final else None
    cfg = cfg or b.cfg
    report.training_start(cfg, plan_packs(jobs, cfg), resolve_device(cfg.train.device), final)
    prefix = "final_" if final else ""
    loggers = b.log.loggers(jobs, prefix) if b.log is not None and tracked else None
    warm = [j for j in jobs if j.name in (inits or {})]  # the fine-tuning budget
    cold = [j for j in jobs if j.name not in (inits or {})]
    done = {}
    for part_cfg, part in [(_warm(cfg), warm), (cfg, cold)]:
        if part:
            done.update({r.name: r for r in _run(data, part, part_cfg, final, loggers,
                                                 inits, plan_)})
    results = [done[j.name] for j in jobs]
    folder = paths.models_dir(cfg, label or ("final" if final else "backtest"))
    shutil.rmtree(folder, ignore_errors=True)   # no file of an earlier run is taken
    for r in results:
        if r.ok:
            save_result(r, f"{folder}/{model_file(cfg.model.name, r.name)}")
    trained = Trained(results, folder, final, tracked)
    if all(not r.ok for r in results):
        R.trained(b, trained)             # the failures are recorded before the run stops
        raise InfraError(f"every training job failed; first error: {results[0].error}")
    return trained


def _run(data: Prepared, jobs: list[Job], cfg: Config, final: bool, loggers, inits, plan_):
    if not cfg.ray.enabled:
        return run_jobs_locally(data.arrays, jobs, cfg, final=final, loggers=loggers,
                                inits=inits, plan=plan_)
    from pipeline.execution.ray_train import train as ray_train  # Ray only when enabled
    return ray_train(data.arrays, plan_packs(jobs, cfg), cfg, final=final, loggers=loggers,
                     inits=inits, plan=plan_)


def _warm(cfg: Config) -> Config:
    """The fine-tuning budget of a warm start: train.warm_start_epochs epochs."""
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train,
                                                              epochs=cfg.train.warm_start_epochs))


@stage("backtest", R.scored)
def backtest(b: Batch, data: Prepared, jobs: list[Job], trained: Trained,
             inits: dict | None = None) -> Scored:
    """Score the models and the baselines at every backtest cutoff (with `evaluate.refit`,
    models trained again before each later cutoff), write predictions and per-series metrics;
    with `evaluate.intervals: conformal`, calibrate the intervals on the backtest."""
    cfg, arrays = b.cfg, data.arrays
    models, refits = trained.models(), []
    if cfg.evaluate.refit:       # one more training per later cutoff
        models = {cfg.windows.n_windows - 1: models}
        for k in range(cfg.windows.n_windows - 1):
            refits.append(_fit(b, data, jobs, inits, cfg=config_at(cfg, k),
                               label=f"backtest-cutoff{k}"))
            models[k] = refits[-1].models()
    end, keys = arrays.data_end(), backtest_keys(cfg)    # chunk by chunk, streamed
    run = Chunked(arrays, jobs, models, cfg,
                  lambda f: output.frames_table(f, b.run_id, arrays.freq, keys),
                  drawn_series(arrays, cfg.evaluate.plots), cfg.evaluate.refit, b.runner)
    written = [output.write_stream(cfg, "backtest", end, iter(run), b.flow)]
    bt, preds = run.scores, concat_columns(run.drawn)      # preds: the drawn series'
    metrics = output.metrics_table(concat_columns(bt.metrics), b.run_id, arrays.freq)
    written.append(output.write(cfg, "metrics", end, metrics, b.flow))
    cal = calibrate(bt, arrays.groups, cfg.evaluate.levels) \
        if cfg.evaluate.intervals == "conformal" else None
    return Scored(bt, bt.summary(), written, preds, metrics, cal, refits,
                  select(bt, cfg, arrays))


@stage("levels", R.levels)
def levels(b: Batch, data: Prepared, scored: Scored):
    """data.hierarchy in a flow without a forecast: the backtest scored per level, base and
    reconciled (`stages.reconciled.scored_levels`); None without a hierarchy."""
    return scored_levels(b, data, scored) if data.levels is not None else None


@stage("final", R.trained)
def final_model(b: Batch, data: Prepared, jobs: list[Job], trained: Trained | None = None,
                inits: dict | None = None) -> Trained:
    """The forecast model: trained again on all the data, or (`evaluate.final_model: reuse`)
    the backtest's own."""
    if trained is not None and b.cfg.evaluate.final_model == "reuse":
        return trained
    return _fit(b, data, jobs, inits, final=True)


@stage("log_models", R.models)
def log_models(b: Batch, trained: Trained) -> Trained:
    """The models the forecasts come from, into their MLflow runs (the record is the stage)."""
    return trained


@stage("promote", R.promotion)
def promote(b: Batch, data: Prepared, scored: Scored, final: Trained | None = None
            ) -> list[compare.Decision]:
    """Challenger (this run) against the registered champions, both scored now on the same
    backtest windows; the better is registered per group (`compare.promote`)."""
    cfg, arrays = b.cfg, data.arrays
    if b.log is None or not b.log.parent_id:
        raise PipelineError("promoting a champion needs MLflow tracking (tracking.enabled)")
    by = compare.resolve(cfg, None)[2]
    champs = compare.load_champions(cfg, champion_jobs(cfg, arrays, by), by)
    theirs = {}
    for entries in champs.by_run().values():
        ccfg = compare.scoring_config(cfg, entries[0])
        if ccfg.windows.horizon != cfg.windows.horizon:
            raise PipelineError(f"the champion of {entries[0].job.name!r} forecasts "
                                f"{ccfg.windows.horizon} steps, this config "
                                f"{cfg.windows.horizon}: they cannot be compared")
        models = {} if entries[0].statistical else checked_models(arrays, entries)
        cols = concat_columns(score(arrays, [c.job for c in entries], models, ccfg,
                                    runner=b.runner).metrics)
        theirs.update({c.job.name: cols for c in entries})
    bt = scored.backtest
    mine = {name: Statistical(name, bt.season, bt.history, cfg.windows.horizon)
            for name in cfg.evaluate.comparators}
    decisions = compare.promote(cfg, b.log, champs, concat_columns(bt.metrics),
                                theirs, arrays.freq, final.results if final else None,
                                statistical=mine)
    return decisions


@stage("report", R.page)
def html_report(b: Batch, outcome: Outcome) -> Outcome:
    """One self-contained HTML page for the batch (leaderboard against the baselines, groups,
    per-series errors, validation, series drawn) from the flow's `outcome`: next to the
    outputs and in the run. Returns the outcome with the page's path (`report`)."""
    path = paths.partition(b.cfg, "reports", outcome.data.arrays.data_end(), b.flow)
    outcome.report = htmlreport.write(b, outcome, join(path, "report.html"))
    return outcome
