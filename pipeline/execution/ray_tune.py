"""Ray Tune: the search of `python -m pipeline tune` (the execution layer, with
`pipeline.execution.ray_train`).

`search(...)` runs one search: a trial per sampled point (`pipeline.tuning.space.trial_config`),
trained and scored by `pipeline.tuning.trial.run_trial` in a Ray Tune trial with
`tune.cpus_per_trial` CPUs and `tune.gpus_per_trial` GPUs (fractions share a GPU); Optuna's TPE (or
random / grid) samples, ASHA stops trials whose validation score lags at each rung (epochs grace,
3×, …). The series go to the object store once. Each trial is a child run of the tune run, logged
from this process as its results arrive (`pipeline.tracking.TrialRuns`).

The search's state lives under `<output.path>/tune/<name>`; a search that did not finish (a
crash, a kill) is resumed from there by the next `tune` of the same batch: finished trials are
kept, unfinished ones run again (Ray Tune's restore). Ray Tune rewrites its state file in place,
so a kill can leave it empty: the search also appends each finished trial to its own journal
(`trials.jsonl`, a line written whole per trial), and where Ray's state cannot be read the next
`tune` keeps the journal's trials and runs only the rest (Optuna is told their scores; random
search draws the rest from another seed; a grid runs its points not yet done). A finished search
leaves `search.done`; the next `tune` of that batch starts afresh. `search_groups` runs one
search per group, each driven by its own Ray task, all at once.
"""
from __future__ import annotations

import itertools
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass

import ray
import torch
from ray import tune

from pipeline.config import Config, Domain
from pipeline.errors import InfraError
from pipeline.execution.ray_train import connect
from pipeline.execution.tune_state import (
    TrialRecord,
    journal_append,
    journal_read,
    unreadable_state,
)
from pipeline.tuning.space import plain, trial_config
from pipeline.tuning.trial import run_trial

DONE = "search.done"
_LIVE: dict[str, _Live] = {}          # experiment path -> what its callback reports to


@dataclass
class SearchResult:
    records: list[TrialRecord]
    path: str
    resumed: bool
    group: str | None = None

    def best(self) -> TrialRecord | None:
        """The finished trial of the lowest score (else the best stopped one)."""
        for status in ("finished", "stopped"):
            ok = [r for r in self.records if r.status == status and math.isfinite(r.score)]
            if ok:
                return min(ok, key=lambda r: r.score)
        return None


def _domain(d: Domain, grid: bool):
    if d.kind == "choice":
        return tune.grid_search(list(d.values)) if grid else tune.choice(list(d.values))
    return {"uniform": lambda: tune.uniform(d.low, d.high),
            "loguniform": lambda: tune.loguniform(d.low, d.high),
            "int": lambda: tune.randint(d.low, d.high + 1),
            "logint": lambda: tune.lograndint(d.low, d.high + 1)}[d.kind]()


def _trainable(point: dict, arrays=None, raw=None, metric="mase", group=None, threads=1):
    """One trial: each epoch of the first job reported (`score` = its validation score), then
    the trial's score with `final`."""
    torch.set_num_threads(threads)
    cfg = trial_config(raw, {k: plain(v) for k, v in point.items()}, metric, arrays)

    def report(row: dict) -> None:
        if math.isfinite(row.get("val_loss", math.nan)):
            tune.report({"score": row["val_loss"], "epoch": row["epoch"],
                         "train_loss": row["train_loss"]})
    out = run_trial(arrays, cfg, group, report)
    tune.report({"score": out.score, "final": True, "epochs": out.epochs})


def _named(name: str):
    """`_trainable` under a name of its own: Ray Tune registers trainables and their
    parameters by name in the cluster's key-value store, so searches running at once (one per
    group) must not share one."""
    def trial(point: dict, arrays=None, raw=None, metric="mase", group=None, threads=1):
        return _trainable(point, arrays, raw, metric, group, threads)
    trial.__name__ = trial.__qualname__ = "trial_" + "".join(
        c if c.isalnum() else "_" for c in name)
    return trial


class _Live:
    """The driver side of a running search: trial runs in MLflow and the console lines."""

    def __init__(self, runs, group: str | None, total: int, echo: Callable[[str], None]):
        self.runs, self.group, self.total, self.echo = runs, group, total, echo
        self.done, self.best, self.t0 = 0, math.inf, time.monotonic()
        self.history: dict[str, list[dict]] = {}     # trial id -> its epochs' rows

    def line(self, trial, status: str, score: float, epochs: int) -> None:
        self.done += 1
        if status == "finished" and math.isfinite(score):
            self.best = min(self.best, score)
        point = " ".join(f"{k.rsplit('.', 1)[-1]}={_fmt(v)}" for k, v in trial.config.items())
        where = f"{self.group}: " if self.group else ""
        self.echo(f"  trial {self.done}/{self.total} {where}{point}  score {score:.4f} "
                  f"{status} after {epochs} epoch(s)  best {self.best:.4f}  "
                  f"{time.monotonic() - self.t0:,.0f}s")


def _fmt(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


class _Forward(tune.Callback):
    """Ray Tune's events to the search's `_Live` (looked up by experiment path, so a restored
    search, whose callbacks Ray unpickles, reports to the new run)."""

    def __init__(self, key: str) -> None:
        self.key = key

    def _live(self) -> _Live | None:
        return _LIVE.get(self.key)

    def on_trial_start(self, iteration, trials, trial, **info):
        live = self._live()
        if live and live.runs:
            live.runs.start(trial.trial_id, {k: plain(v) for k, v in trial.config.items()},
                            live.group)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        live = self._live()
        if live is None or result.get("final"):
            return
        row = {"epoch": result.get("epoch", 0), "val_loss": result.get("score"),
               "train_loss": result.get("train_loss")}
        live.history.setdefault(trial.trial_id, []).append(row)
        if live.runs:
            live.runs.epoch(trial.trial_id, row)

    def on_trial_complete(self, iteration, trials, trial, **info):
        live, last = self._live(), trial.last_result or {}
        if live is None:
            return
        stopped = not last.get("final")
        score = last.get("score", math.nan)
        history = live.history.pop(trial.trial_id, [])
        journal_append(self.key, TrialRecord(
            trial.trial_id, {k: plain(v) for k, v in trial.config.items()},
            "stopped" if stopped else "finished", float(score),
            int(last.get("epochs", len(history))), group=live.group, history=history))
        if live.runs:
            live.runs.end(trial.trial_id, "FINISHED", score,
                          {"stopped_early": "true"} if stopped else None)
        live.line(trial, "stopped" if stopped else "finished", score,
                  last.get("epochs", last.get("epoch", -1) + 1))

    def on_trial_error(self, iteration, trials, trial, **info):
        live = self._live()
        if live is None:
            return
        error = _error_text(trial)
        if live.runs:
            live.runs.end(trial.trial_id, "FAILED", None, {"error": error})
        live.done += 1
        live.echo(f"  trial {live.done}/{live.total} failed: {error}")


def _error_text(trial) -> str:
    """A failed trial's error, one line: the trial's own exception, not Ray's wrapper."""
    try:
        err = trial.get_pickled_error() if hasattr(trial, "get_pickled_error") else None
    except Exception:  # noqa: BLE001 - reading the error file is best effort
        err = None
    cause = getattr(err, "cause", None) or err
    if isinstance(cause, BaseException):
        text = str(cause).strip().splitlines()
        return f"{type(cause).__name__}: {text[0] if text else ''}"
    return "the trial failed (see its error file under the search's folder)"


def _scheduler(cfg: Config):
    t = cfg.tune
    if t.scheduler == "none":
        return None
    from ray.tune.schedulers import ASHAScheduler  # only with the asha scheduler
    return ASHAScheduler(time_attr="training_iteration", max_t=cfg.train.epochs + 1,
                         grace_period=min(t.grace_epochs, cfg.train.epochs),
                         reduction_factor=t.reduction_factor)


def _searcher(cfg: Config, space: dict | None = None, kept: list[TrialRecord] = ()):
    """The search's sampler; with trials `kept` from an earlier search, Optuna is told their
    points and scores (over `space`, the param space it then owns) and random search draws
    from another seed."""
    t = cfg.tune
    if t.search == "optuna":
        import optuna  # only for this search
        from ray.tune.search.optuna import OptunaSearch
        optuna.logging.set_verbosity(optuna.logging.WARNING)   # no "study created" line
        if not kept:
            return OptunaSearch(seed=t.seed)
        told = [r for r in kept if math.isfinite(r.score)]
        return OptunaSearch(space=OptunaSearch.convert_search_space(space), metric="score",
                            mode="min", seed=t.seed, points_to_evaluate=[r.point for r in told],
                            evaluated_rewards=[r.score for r in told])
    from ray.tune.search import BasicVariantGenerator
    return BasicVariantGenerator(random_state=t.seed + len(kept))


def trial_resources(cfg: Config) -> dict[str, float]:
    """What one trial holds: {"cpu": tune.cpus_per_trial, "gpu": gpus_per_trial(cfg)}."""
    return {"cpu": cfg.tune.cpus_per_trial, "gpu": gpus_per_trial(cfg)}


def gpus_per_trial(cfg: Config) -> float:
    """`tune.gpus_per_trial`; auto: 0.25 where the cluster has GPUs (and train.device allows),
    else 0."""
    g = cfg.tune.gpus_per_trial
    if g != "auto":
        return float(g)
    has = cfg.train.device != "cpu" and ray.cluster_resources().get("GPU", 0) > 0
    return 0.25 if has else 0.0


def search(arrays, raw: dict, cfg: Config, domains: dict[str, Domain], storage: str,
           name: str, runs=None, group: str | None = None,
           echo: Callable[[str], None] = print) -> SearchResult:
    """One search over `domains` (see the module docstring); its trials' records."""
    connect(cfg.ray)
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")   # verbose=0 then prints no tables
    t, path = cfg.tune, os.path.join(storage, name)
    grid = t.search == "grid"
    total = t.trials * (math.prod(len(d.values) for d in domains.values()) if grid else 1)
    _LIVE[path] = _Live(runs, group, total, echo)
    trainable = tune.with_resources(
        tune.with_parameters(_named(name), arrays=arrays, raw=raw, metric=t.metric, group=group,
                             threads=max(1, int(t.cpus_per_trial))),
        trial_resources(cfg))
    unfinished = os.path.isdir(path) and not os.path.exists(os.path.join(path, DONE))
    unreadable = unreadable_state(path) if unfinished else None
    kept = journal_read(path) if unreadable else []
    resumed = unfinished and (bool(kept) or (tune.Tuner.can_restore(path) and not unreadable))
    if unreadable and not kept:
        echo(f"  the unfinished search in {path} cannot be resumed: Ray Tune's saved state "
             f"cannot be read ({unreadable}) and no trial had finished; starting afresh")
    try:
        if resumed and not kept:
            echo(f"  resuming the unfinished search in {path}")
            tuner = tune.Tuner.restore(path, trainable, resume_unfinished=True,
                                       resume_errored=True)
        else:
            shutil.rmtree(path, ignore_errors=True)
            tuner = _new_tuner(trainable, cfg, domains, kept, storage, name, path,
                               f"cannot be read ({unreadable})", echo)
        grid_result = tuner.fit() if tuner is not None else []
    finally:
        _LIVE.pop(path, None)
    records = kept + [_record(r, group) for r in grid_result]
    if runs is not None:
        _log_restored(runs, records)
    with open(os.path.join(path, DONE), "w") as f:
        json.dump({"trials": len(records)}, f)
    return SearchResult(records, path, resumed, group)


def _new_tuner(trainable, cfg: Config, domains: dict[str, Domain], kept: list[TrialRecord],
               storage: str, name: str, path: str, why: str, echo: Callable[[str], None]):
    """A new search's Tuner, less the trials `kept` from an earlier one (whose Ray state
    `why`); None when those are all of them."""
    t = cfg.tune
    space, searcher, samples = _fresh_search(cfg, domains, t.search == "grid", kept)
    if kept:
        echo(f"  resuming the unfinished search in {path}: Ray Tune's saved state {why}; "
             f"keeping the {len(kept)} trial(s) its journal records as finished, running "
             f"{samples} more")
        for r in kept:                  # a second kill keeps them too
            journal_append(path, r)
        if not samples:
            return None
    return tune.Tuner(
        trainable, param_space=space,
        tune_config=tune.TuneConfig(
            metric="score", mode="min", search_alg=searcher, scheduler=_scheduler(cfg),
            num_samples=samples, max_concurrent_trials=t.max_concurrent,
            time_budget_s=None if t.time_budget_minutes is None
            else 60 * t.time_budget_minutes),
        run_config=tune.RunConfig(
            name=name, storage_path=storage, callbacks=[_Forward(path)], verbose=0,
            failure_config=tune.FailureConfig(max_failures=0)))


def _fresh_search(cfg: Config, domains: dict[str, Domain], grid: bool,
                  kept: list[TrialRecord]) -> tuple[dict, object, int]:
    """The param space, searcher and sample count of a new search, less the trials `kept`
    from an earlier one (see the module docstring)."""
    t = cfg.tune
    space = {k: _domain(d, grid) for k, d in domains.items()}
    if not kept:
        return space, _searcher(cfg), t.trials
    if grid:
        from ray.tune.search import BasicVariantGenerator
        todo = [dict(zip(domains, values, strict=True)) for values in itertools.product(
            *(d.values for d in domains.values()))] * t.trials
        for r in kept:                           # a multiset difference
            if r.point in todo:
                todo.remove(r.point)
        return ({k: _domain(d, False) for k, d in domains.items()},
                BasicVariantGenerator(points_to_evaluate=todo), len(todo))
    searcher = _searcher(cfg, space, kept)
    return {} if t.search == "optuna" else space, searcher, max(0, t.trials - len(kept))


def _record(result, group: str | None) -> TrialRecord:
    """A Ray Tune Result as the search's record of the trial."""
    m = result.metrics or {}
    history = []
    df = result.metrics_dataframe
    if df is not None and "epoch" in df:
        rows = df[df["final"] != True] if "final" in df else df  # noqa: E712 - NaN-safe
        history = [{"epoch": int(e), "val_loss": float(v), "train_loss": float(tl)}
                   for e, v, tl in zip(rows["epoch"], rows["score"], rows["train_loss"],
                                       strict=True) if e == e]
    point = {k: plain(v) for k, v in (result.config or {}).items()}
    if result.error is not None:
        cause = getattr(result.error, "cause", None) or result.error
        text = (str(cause).strip().splitlines() or [""])[0]
        return TrialRecord(m.get("trial_id", ""), point, "failed", error=
                           f"{type(cause).__name__}: {text}", group=group, history=history)
    status = "finished" if m.get("final") else "stopped"
    epochs = int(m["epochs"]) if m.get("final") else len(history)
    return TrialRecord(m.get("trial_id", ""), point, status, float(m.get("score", math.nan)),
                       epochs, group=group, history=history)


def _log_restored(runs, records: list[TrialRecord]) -> None:
    """Trials this process did not see start (finished before a resume) get their child run
    now, from their recorded history."""
    for r in records:
        if not r.trial_id or r.trial_id in runs.runs:
            continue
        runs.start(r.trial_id, r.point, r.group)
        for row in r.history:
            runs.epoch(r.trial_id, row)
        tags = {"restored": "true", **({"error": r.error} if r.error else {}),
                **({"stopped_early": "true"} if r.status == "stopped" else {})}
        runs.end(r.trial_id, "FAILED" if r.status == "failed" else "FINISHED", r.score, tags)


def _search_task(*args, **kwargs) -> SearchResult:
    kwargs["echo"] = lambda line: None      # a task's stdout does not reach the driver
    return search(*args, **kwargs)


def search_groups(arrays, raw: dict, cfg: Config, domains: dict[str, Domain], storage: str,
                  name: str, groups: list[str], runs=None,
                  echo: Callable[[str], None] = print) -> list[SearchResult]:
    """One search per group, each driven by its own Ray task (no CPU of its own: its trials
    hold the resources), all at once; results in `groups` order."""
    connect(cfg.ray)
    remote = ray.remote(_search_task).options(num_cpus=0, max_retries=0)
    ref = ray.put(arrays)
    refs = {g: remote.remote(ref, raw, cfg, domains, storage, f"{name}-group={g}", runs, g)
            for g in groups}
    out = []
    for g, r in refs.items():
        try:
            res = ray.get(r)
        except ray.exceptions.RayTaskError as e:
            raise InfraError(f"the search of group {g!r} failed: "
                             f"{(str(e.cause).splitlines() or [''])[0]}") from None
        best = res.best()
        echo(f"  group {g}: {len(res.records)} trial(s), best score "
             f"{best.score if best else math.nan:.4f}")
        out.append(res)
    return out
