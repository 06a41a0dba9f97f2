"""The stages the flows compose (`flows/*.py`), in the order data flows through them:

    prepare -> plan -> warm_start -> train -> backtest -> final_model -> log_models
            -> forecast (or promote -> registry_forecast) -> write_forecast -> html_report

(the forecast stages are `pipeline.stages.forecast`'s)

Each takes the `Batch` (config, runner, tracking run, timings) and the results it needs as
arguments, does one step, logs it to the tracking run, has `pipeline.outputs.console` print it, and
returns its result; the flow passes results on and returns them as a
`pipeline.outcome.Outcome`."""
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
from pipeline.names import model_file
from pipeline.outputs import console as report
from pipeline.outputs import html as htmlreport
from pipeline.outputs import partitions as output
from pipeline.paths import join
from pipeline.stages.batch import Batch
from pipeline.stages.forecast import champion_jobs, checked_models
from pipeline.tracking import champions as compare
from pipeline.training.device import resolve_device
from pipeline.training.jobs import (
    Job,
    JobResult,
    n_groups,
    new_model,
    plan_jobs,
    plan_packs,
    run_jobs_locally,
    save_result,
    state_bytes,
)

if TYPE_CHECKING:
    from pipeline.stages.forecast import Forecast
    from pipeline.stages.tune import Tuned


@dataclass
class Trained:
    """A training stage's jobs and where their model files went."""
    results: list[JobResult]
    folder: str
    final: bool = False

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
    calibration: Calibration | None = None     # evaluate.intervals: conformal


@dataclass
class Outcome:
    """What a flow returns: the result of each stage it ran, typed, None (or empty) where the
    flow has no such stage. The flow builds it from the values it passed from stage to stage,
    hands it to `html_report`, and returns it; `flows._common.run_flow` leaves it on the
    finished batch (`Batch.outcome`, None when the flow stopped early)."""
    data: Prepared | None = None                  # the input, validated, and the window plan
    jobs: list[Job] = field(default_factory=list)
    inits: dict[str, bytes] = field(default_factory=dict)  # warm-start weights, by job
    trained: Trained | None = None                # before the backtest cutoffs
    scored: Scored | None = None                  # the backtest
    final: Trained | None = None                  # the forecast model
    decisions: list[compare.Decision] | None = None   # challenger vs champion, when promoted
    forecast: Forecast | None = None
    tuned: Tuned | None = None
    report: str | None = None                     # the batch's HTML page


def prepare(b: Batch) -> Prepared:
    """Read and validate the input into arrays (the tracking server checked first); nothing
    is written yet."""
    b.open()
    with b.stage("data"):
        return read_input(b.cfg, b.runner)


def resolve(b: Batch, data: Prepared) -> Prepared:
    """The config for this data (`recipe: auto`, `train.threads: auto`) and the window plan
    under it; the batch opens on the data cutoff with that config, which the stages use from
    here (`b.cfg`; lock, skip-if-done, the tracking run logging it, the validation report)."""
    with b.stage("data"):
        data = resolve_for_data(data)
    b.begin(data)
    report.data(data, b.cfg, paths.validation_report(b.cfg) if b.cfg.output.report else None)
    return data


def plan(b: Batch, data: Prepared) -> list[Job]:
    """One global job over every series, or one job per group. Without `model.season`, the
    CNN's receptive field is checked against the data's season (by frequency)."""
    if b.cfg.model.season is None:
        b.cfg.check_season(data.arrays.freq.default_season(data.arrays.lengths),
                           f"the {data.arrays.freq.name} data's season")
    return plan_jobs(data.arrays, b.cfg)


def warm_start(b: Batch, data: Prepared, jobs: list[Job]) -> dict[str, bytes]:
    """With `train.warm_start`: {job name: the registered champion's weights} for the jobs
    whose champion has this config's architecture. A global job whose data has groups starts
    from their champions when they are all one model (a global model promoted everywhere)."""
    cfg, arrays = b.cfg, data.arrays
    if not cfg.train.warm_start:
        return {}
    with b.stage("warm_start"):
        by = "global" if cfg.train.mode == "global" else "group"
        champs = compare.load_champions(cfg, jobs, by)
        if by == "global" and not champs.found and arrays.groups is not None:
            per_group = compare.load_champions(cfg, champion_jobs(cfg, arrays, "group"),
                                               "group")
            if len({(c.version.run_id, c.version.source) for c in per_group.found}) == 1:
                champs.found = [dataclasses.replace(per_group.found[0], job=jobs[0])]
                champs.missing = []
        want = new_model(loader_at(arrays, cfg, arrays.lengths), cfg, len(arrays),
                         n_groups(arrays)).spec
        inits, fresh = compare.warm_states(champs, want, state_bytes)
    report.warm_start(len(inits), fresh)
    return inits


def train(b: Batch, data: Prepared, jobs: list[Job], inits: dict | None = None, *,
          final: bool = False, cfg: Config | None = None, label: str | None = None
          ) -> Trained:
    """Train the plan of jobs where the config says (Ray tasks, Ray Train, or this process),
    save each model next to the outputs. final=True trains on all the data (the forecast
    model); otherwise training stops before the oldest backtest cutoff. `cfg` (a refit
    cutoff's config) trains untracked, on windows planned for it."""
    tracked, plan_ = cfg is None, data.plan if cfg is None and not final else None
    cfg = cfg or b.cfg
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(   # for every worker
        cfg.train, checkpoint_dir=paths.checkpoint_root(cfg)))
    report.training_start(cfg, plan_packs(jobs, cfg), resolve_device(cfg.train.device), final)
    with b.stage("final" if final else "train"):
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
        if b.log is not None and tracked:
            b.log.trained(results, prefix)
        folder = paths.models_dir(cfg, label or ("final" if final else "backtest"))
        shutil.rmtree(folder, ignore_errors=True)   # no file of an earlier run is taken
        for r in results:
            if r.ok:
                save_result(r, f"{folder}/{model_file(cfg.model.name, r.name)}")
    trained = Trained(results, folder, final)
    report.training(trained)
    b.failed_jobs = sorted(set(b.failed_jobs) | {r.name for r in results if not r.ok})
    if all(not r.ok for r in results):
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


def backtest(b: Batch, data: Prepared, jobs: list[Job], trained: Trained,
             inits: dict | None = None) -> Scored:
    """Score the models and the baselines at every backtest cutoff (with `evaluate.refit`,
    models trained again before each later cutoff), write predictions and per-series metrics,
    log the comparison."""
    cfg, arrays = b.cfg, data.arrays
    models = trained.models()
    if cfg.evaluate.refit:       # one more training per later cutoff
        models = {cfg.windows.n_windows - 1: models}
        for k in range(cfg.windows.n_windows - 1):
            models[k] = train(b, data, jobs, inits, cfg=config_at(cfg, k),
                              label=f"backtest-cutoff{k}").models()
    with b.stage("backtest"):    # chunk by chunk of series, streamed into the partition
        end, keys = arrays.data_end(), backtest_keys(cfg)
        run = Chunked(arrays, jobs, models, cfg,
                      lambda f: output.frames_table(f, b.run_id, arrays.freq, keys),
                      drawn_series(arrays, cfg.evaluate.plots), cfg.evaluate.refit, b.runner)
        written = [output.write_stream(cfg, "backtest", end, iter(run), b.flow)]
        bt, preds = run.scores, concat_columns(run.drawn)      # preds: the drawn series'
        metrics = output.metrics_table(concat_columns(bt.metrics), b.run_id, arrays.freq)
        written.append(output.write(cfg, "metrics", end, metrics, b.flow))
        if b.log is not None:
            b.log.backtest(bt, metrics)
    scored = Scored(bt, bt.summary(), written, preds)
    report.backtest(scored, cfg)
    report.comparator_fallbacks(bt.fallbacks, bt.forecasts)
    if cfg.evaluate.intervals == "conformal":
        scored.calibration = _calibrate(b, bt, arrays)
    return scored


def _calibrate(b: Batch, bt: Backtest, arrays) -> Calibration:
    """Conformal widths from the backtest; each level's coverage on the latest window
    printed and logged (`coverage_80` for the run's model, `<model>_coverage_80` else)."""
    cal = calibrate(bt, arrays.groups, b.cfg.evaluate.levels)
    if b.log is not None:
        b.log.calibration(cal)
    report.coverage(cal, b.cfg.model.name)
    return cal


def final_model(b: Batch, data: Prepared, jobs: list[Job], trained: Trained | None = None,
                inits: dict | None = None) -> Trained:
    """The forecast model: trained again on all the data, or (`evaluate.final_model: reuse`)
    the backtest's own."""
    if trained is not None and b.cfg.evaluate.final_model == "reuse":
        return trained
    return train(b, data, jobs, inits, final=True)


def log_models(b: Batch, trained: Trained) -> None:
    """The models the forecasts come from, into their MLflow runs."""
    if b.log is not None:
        with b.stage("log_models"):
            b.log.models(trained.results, trained.folder)


def promote(b: Batch, data: Prepared, scored: Scored, final: Trained | None = None
            ) -> list[compare.Decision]:
    """Challenger (this run) against the registered champions, both scored now on the same
    backtest windows; the better is registered per group (`compare.promote`)."""
    cfg, arrays = b.cfg, data.arrays
    if b.log is None or not b.log.parent_id:
        raise PipelineError("promoting a champion needs MLflow tracking (tracking.enabled)")
    with b.stage("promote"):
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
    report.promotion(cfg.model.name, decisions)
    return decisions


def html_report(b: Batch, outcome: Outcome) -> Outcome:
    """One self-contained HTML page for the batch (leaderboard against the baselines, groups,
    per-series errors, validation, series drawn) from the flow's `outcome`: next to the
    outputs and in the run. Returns the outcome with the page's path (`report`)."""
    path = paths.partition(b.cfg, "reports", outcome.data.arrays.data_end(), b.flow)
    with b.stage("report"):
        where = htmlreport.write(b, outcome, join(path, "report.html"))
        if b.log is not None:
            b.log.report(where)
    report.html(where)
    outcome.report = where
    return outcome
