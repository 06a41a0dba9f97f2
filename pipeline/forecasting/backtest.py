"""Rolling-origin backtest against baselines and the statistical comparators (the final
forecast is `pipeline.forecasting.final`'s).

`backtest` scores every trained job's model on the job's series at each cutoff (latest first):
the model's forecasts, naive and seasonal naive on the same cutoffs, per-series metrics and the
frames the pipeline writes. A job is anything with a `name` and `member(n_series)` (the series
it covers, `pipeline.training.plan.Job`); models come as {job name: model}. Scaling statistics are
refitted at each cutoff from data before it.
The statistical comparators (`evaluate.comparators`, `pipeline.evaluation.comparators`) forecast the
same series at the same cutoffs, fitted on at most `evaluate.comparator_history` steps before the
cutoff, mapped over chunks of series through the runner (Ray tasks when Ray is on), and are scored
as the baselines are. With `evaluate.combine` the mean (`evaluate.combine_by`: or median) of
the model's forecast and those comparators' is scored too, as the model `combination`.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from pipeline.config import Config
from pipeline.data.loader import loader_at
from pipeline.data.series import SeriesArrays, season_of
from pipeline.data.windows import backtest_windows, cutoff_positions
from pipeline.evaluation import metrics as E
from pipeline.forecasting.predict import history, long_frame, predict_job, quantile_column

COMBINATION = "combination"   # the model of `evaluate.combine`'s forecasts
BASELINES = {"naive": E.naive, "seasonal_naive": E.seasonal_naive}
FALLBACK = "fallback:seasonal_naive"
CHUNK = 32          # series per comparator task


def fallback_name(cfg: Config) -> str:
    """The `model` value of fallback forecasts: "fallback:seasonal_naive" or
    "fallback:auto_ets" (`evaluate.fallback`)."""
    return f"fallback:{cfg.evaluate.fallback}"


class Block(NamedTuple):
    """One scored block of forecasts, kept for the conformal intervals (not written)."""
    k: int                  # cutoff number (0 = latest)
    model: str
    series: np.ndarray      # [N]
    y: np.ndarray           # [N, H] actuals
    y_hat: np.ndarray       # [N, H]
    mask: np.ndarray        # [N, H] 1 = observed


@dataclass
class Backtest:
    frames: list[dict] = field(default_factory=list)    # long prediction columns per block
    frame_series: list[np.ndarray] = field(default_factory=list)  # each frame's series [N]
    metrics: list[dict] = field(default_factory=list)   # per-series metric columns per block
    tables: dict[str, list[dict]] = field(default_factory=dict)  # model -> metric tables
    blocks: list[Block] = field(default_factory=list)
    fallbacks: dict[str, int] = field(default_factory=dict)  # comparator -> forecasts that
                                                         # fell back to seasonal naive
    forecasts: dict[str, int] = field(default_factory=dict)  # comparator -> forecasts made
    season: int = 1                                      # m of MASE, baselines, comparators
    history: int = 0                                     # the comparators' history cap
    zero: ZeroHistory | None = None                      # output.clip_at_zero: every forecast
                                                         # clipped as the published one is

    def drawn(self, series: np.ndarray) -> dict:
        """The long rows of `series` only (the ones plots and the report draw)."""
        parts = []
        for frame, ss in zip(self.frames, self.frame_series, strict=True):
            keep = np.repeat(np.isin(ss, series), len(frame["y_hat"]) // max(len(ss), 1))
            parts.append({k: v[keep] for k, v in frame.items()})
        return concat_columns(parts)

    def merge(self, other: Backtest) -> None:
        """Take in the scores of another chunk of series (its frames are not kept)."""
        for model, tables in other.tables.items():
            self.tables.setdefault(model, []).extend(tables)
        self.metrics += other.metrics
        self.blocks += other.blocks
        for mine, theirs in ((self.fallbacks, other.fallbacks),
                             (self.forecasts, other.forecasts)):
            for k, v in theirs.items():
                mine[k] = mine.get(k, 0) + v
        self.season, self.history = other.season, other.history

    def add(self, model: str, table: dict) -> None:
        self.tables.setdefault(model, []).append(table)

    def summary(self) -> dict[str, dict[str, float]]:
        """model -> overall metrics over every series and cutoff, plus skill vs seasonal naive
        (1 - MASE / MASE of seasonal naive)."""
        out = {m: E.summarize({k: np.concatenate([t[k] for t in ts]) for k in ts[0]})
               for m, ts in self.tables.items()}
        ref = out.get("seasonal_naive", {}).get("mase")
        for row in out.values():
            row["skill_mase"] = float(E.skill(row["mase"], ref)) if ref else float("nan")
        return out

    def group_summaries(self, by: dict[str, str] | None = None
                        ) -> dict[str, dict[str, dict[str, float]]]:
        """group -> model -> metrics summarised over the group's series and cutoffs as
        `summary` does overall; with `by` ({series id: key}) per key instead of group."""
        cols = concat_columns(self.metrics)
        if not cols:
            return {}
        names = [k for k in cols if k not in ("unique_id", "cutoff", "model", "group")]
        models, groups = cols["model"].astype(str), cols["group"].astype(str)
        if by is not None:                       # one lookup per distinct series
            ids, at = np.unique(cols["unique_id"].astype(str), return_inverse=True)
            groups = np.array([by[i] for i in ids], dtype=object)[at].astype(str)
        out: dict[str, dict[str, dict[str, float]]] = {}
        for g in np.unique(groups):
            for m in np.unique(models):
                sel = (groups == g) & (models == m)
                if sel.any():
                    out.setdefault(str(g), {})[str(m)] = E.summarize(
                        {k: cols[k][sel] for k in names})
        return out


class Chunked:
    """`backtest` over chunks of `evaluate.chunk_series` series, for a streaming writer:
    iterating it scores one chunk at a time and yields its frames converted by `convert` (the
    frames are then dropped); `scores` merges every chunk's scores, `drawn` keeps the rows of
    the series `keep` (for plots and the report). Chunks without rows yield nothing; an empty
    backtest yields `convert([])` once."""

    def __init__(self, arrays: SeriesArrays, jobs: list, models: dict, cfg: Config,
                 convert: Callable[[list[dict]], object], keep: np.ndarray,
                 refit: bool = False, runner: Callable | None = None) -> None:
        self.arrays, self.jobs, self.models, self.cfg = arrays, jobs, models, cfg
        self.convert, self.keep, self.refit, self.runner = convert, keep, refit, runner
        self.scores, self.drawn = Backtest(), []
        self.loaders: dict = {}       # cutoff number -> loader, fitted once for every chunk
        self.zero = ZeroHistory(arrays) if cfg.output.clip_at_zero is True else None  # once

    def __iter__(self):
        n, made = len(self.arrays), 0
        size = self.cfg.evaluate.chunk_series or max(n, 1)
        for lo in range(0, max(n, 1), size):
            bt = backtest(self.arrays, chunk_jobs(self.jobs, lo, lo + size), self.models,
                          self.cfg, refit=self.refit, runner=self.runner, loaders=self.loaders,
                          zero=self.zero)
            self.drawn.append(bt.drawn(self.keep))
            frames, bt.frames, bt.frame_series = bt.frames, [], []
            self.scores.merge(bt)
            if frames:
                made += 1
                yield self.convert(frames)
        if not made:
            yield self.convert([])


def backtest_keys(cfg: Config) -> list[str]:
    """The columns of every backtest row (the model's quantiles NaN for the baselines)."""
    return ["unique_id", "ds", "cutoff", "step", "y_hat",
            *[quantile_column(q) for q in cfg.model.quantiles], "y", "model", "group"]


def chunk_jobs(jobs: list, lo: int, hi: int) -> list:
    """The jobs restricted to series lo <= s < hi (a chunk of the backtest)."""
    return [dataclasses.replace(j, series=j.series[(j.series >= lo) & (j.series < hi)])
            for j in jobs]


def drawn_series(arrays: SeriesArrays, n: int) -> np.ndarray:
    """The series whose backtest rows a run keeps for its plots and report: the first 4n
    usable ones by id (they draw the first n by id with a model forecast)."""
    ok = np.flatnonzero(arrays.status == 0)
    return ok[np.argsort(arrays.ids[ok].astype(str), kind="stable")[:4 * max(n, 1)]]


def config_at(cfg: Config, k: int) -> Config:
    """The config whose training stops before backtest cutoff k (0 = latest): the cutoffs are
    counted back from each series' end, so it is the same job with k + 1 backtest windows."""
    return dataclasses.replace(cfg, windows=dataclasses.replace(cfg.windows, n_windows=k + 1))


def backtest(arrays: SeriesArrays, jobs: list, models: dict, cfg: Config, extra=None,
             device="cpu", refit: bool = False, runner: Callable | None = None,
             loaders: dict | None = None, zero: ZeroHistory | None = None) -> Backtest:
    """`models`: {job name: model} trained once before the oldest cutoff, or with `refit`
    {cutoff number: {job name: model trained before that cutoff}}. Jobs without a model get
    the baselines (and comparators) only. `runner` maps the comparators over chunks of series
    (`pipeline.execution.ray_train.RayRunner`; default: in this process). `loaders` ({cutoff
    number: loader}) and `zero` (`ZeroHistory`, for `output.clip_at_zero`): the chunks of one
    backtest share them; made here when not given."""
    m, clip = season_of(cfg, arrays), cfg.output.clip_at_zero is True
    zero = (zero if zero is not None else ZeroHistory(arrays)) if clip else None
    out = Backtest(season=m, history=cfg.evaluate.history_cap(m), zero=zero)
    ok, quantiles = arrays.status == 0, cfg.model.quantiles
    cutoffs = cutoff_positions(arrays.lengths, cfg.windows.horizon, cfg.windows.n_windows,
                               cfg.windows.step)
    # the comparators' blocks, forecast together after the loop; the loaders, filled as fitted
    pending, loaders = [], ({} if loaders is None else loaders)
    for k, cut in enumerate(cutoffs):
        models_k = models[k] if refit else models
        if k not in loaders:
            loaders[k] = loader_at(arrays, cfg, cut, device)
        loader = loaders[k]
        for job in jobs:
            idx = backtest_windows(cut, arrays.lengths, cfg.windows,
                                   ok & job.member(len(arrays)))
            if len(idx) == 0:
                continue
            hist = history(arrays, idx.series, cut[idx.series])
            scale = E.mase_scale(hist, m)
            p, net = None, None
            if job.name in models_k:
                within = np.zeros(len(arrays), bool)
                within[idx.series] = True         # the baselines' series, no other
                p = predict_job(models_k[job.name], arrays, cfg, cut, within,
                                quantiles=quantiles, loader=loader)
                _score(out, cfg.model.name, arrays, p.series, p.y, p.y_hat, p.mask,
                       scale[np.searchsorted(idx.series, p.series)], extra, cut,
                       quantiles, p.q_hat, k=k)
                if cfg.evaluate.combine:      # for the combination, NaN where none
                    net = np.full((len(idx.series), cfg.windows.horizon), np.nan, np.float32)
                    net[np.searchsorted(idx.series, p.series)] = p.y_hat
            y, mask = (p.y, p.mask) if p is not None and np.array_equal(p.series, idx.series) \
                else _actuals(arrays, idx, cfg)
            for name, fn in BASELINES.items():
                _score(out, name, arrays, idx.series, y, fn(hist, cfg.windows.horizon, m), mask,
                       scale, extra, cut, k=k)
            pending.append((k, idx.series, y, mask, scale, cut, hist, net))
    if cfg.evaluate.comparators and pending:
        _score_comparators(out, arrays, cfg, pending, m, extra, runner)
    return out


def _score_comparators(out: Backtest, arrays, cfg: Config, pending: list, m: int, extra,
                       runner) -> None:
    """Every pending block's comparator forecasts, made in one fan-out, scored per block."""
    names = cfg.evaluate.comparators
    fc = comparator_forecasts([h for b in pending for h in b[6]], cfg.windows.horizon, m,
                              names, cfg.evaluate.history_cap(m), runner)
    start = 0
    for k, series, y, mask, scale, cut, _, net in pending:
        end = start + len(series)
        for name in names:
            _score(out, name, arrays, series, y, fc.columns[name][start:end], mask, scale,
                   extra, cut, k=k)
        if cfg.evaluate.combine and net is not None:    # where the network forecast
            rows = np.isfinite(net).all(axis=1)
            comb = combined(net, [fc.columns[c][start:end] for c in cfg.evaluate.combine],
                            cfg.evaluate.combine_by)
            _score(out, COMBINATION, arrays, series[rows], y[rows], comb[rows], mask[rows],
                   scale[rows], extra, cut, k=k)
        start = end
    for name in names:
        out.forecasts[name] = out.forecasts.get(name, 0) + start
        out.fallbacks[name] = out.fallbacks.get(name, 0) + int(fc.fell_back(name).sum())


def comparator_forecasts(histories: list[np.ndarray], h: int, season: int, names,
                         cap: int, runner: Callable | None = None, levels=()):
    """`pipeline.evaluation.comparators.forecast` of the histories (each cut to its last `cap`
    finite values) mapped over chunks of CHUNK series by `runner` (None: in this process); one
    `Forecasts` in the histories' order, its fallbacks numbered over all of them."""
    from pipeline.evaluation.comparators import (  # statsforecast: seconds to import
        Fallback,
        Forecasts,
    )
    cut = [_fit_window(y, cap) for y in histories]
    args = [(cut[i:i + CHUNK], h, season, list(names), list(levels))
            for i in range(0, len(cut), CHUNK)]
    parts = runner(_forecast_chunk, args, verb="comparators", unit="chunks") if runner \
        else [_forecast_chunk(*a) for a in args]
    columns = {key: np.concatenate([p.columns[key] for p in parts])
               for key in parts[0].columns} if parts else {}
    fallbacks = [Fallback(i * CHUNK + f.series, f.model, f.reason)
                 for i, p in enumerate(parts) for f in p.fallbacks]
    return Forecasts(columns, fallbacks)


def _forecast_chunk(histories, h, season, names, levels):
    from pipeline.evaluation.comparators import forecast  # statsforecast: seconds to import
    return forecast(histories, h, season, names, levels)


def _fit_window(y: np.ndarray, cap: int) -> np.ndarray:
    """The last `cap` finite values of a history, as float64."""
    y = np.asarray(y, np.float64)
    return y[np.isfinite(y)][-cap:]


def _actuals(arrays, idx, cfg):
    rows = (arrays.indptr[idx.series] + idx.start + cfg.windows.lookback)[:, None] + \
        np.arange(cfg.windows.horizon)                                   # [N, H]
    return arrays.values[rows], arrays.mask[rows].astype(np.float32)


def _score(out: Backtest, model, arrays, series, y, y_hat, mask, scale, extra, cut,
           quantiles=(), q_hat=None, k: int = 0) -> None:
    """Metrics and long rows of one block of backtest forecasts (the windows of `series`,
    their target starting at the cutoff `cut[series]`, cutoff number `k`)."""
    origin = cut[series].astype(np.int64)
    if out.zero is not None:
        y_hat, q_hat = out.zero.clip(series, cut, y_hat, q_hat)
    out.blocks.append(Block(k, model, series, y, y_hat, mask))
    table = E.metrics_table(y, y_hat, scale, mask=mask, quantiles=list(quantiles) or None,
                            q_pred=q_hat)
    out.add(model, table)
    frame = long_frame(arrays, series, origin, y_hat, model, quantiles=quantiles,
                       q_hat=q_hat, y=y, extra=extra)
    out.frames.append(frame)
    out.frame_series.append(series)
    h = y_hat.shape[1]
    out.metrics.append({"unique_id": frame["unique_id"][::h], "cutoff": frame["cutoff"][::h],
                        "model": np.full(len(series), model, dtype=object),
                        "group": frame["group"][::h],
                        **{k: v.astype(np.float64) for k, v in table.items()}})


class ZeroHistory:
    """`output.clip_at_zero`: forecasts (and quantiles) at least 0, and exactly 0 for a series
    whose observed history before the forecast origin is all 0. Prefix counts of the observed
    and the non-zero values, made once, answer any origin."""

    def __init__(self, arrays: SeriesArrays) -> None:
        obs = arrays.mask.astype(bool)
        self.indptr = arrays.indptr
        self.observed = np.concatenate([[0], np.cumsum(obs)])
        self.nonzero = np.concatenate([[0], np.cumsum(obs & (arrays.values != 0))])

    def all_zero(self, series: np.ndarray, end: np.ndarray) -> np.ndarray:
        """[N] bool: `series` have observed values before `end[series]`, all of them 0."""
        lo = self.indptr[series]
        hi = lo + np.asarray(end)[series]
        return (self.observed[hi] > self.observed[lo]) & (self.nonzero[hi] == self.nonzero[lo])

    def clip(self, series: np.ndarray, end: np.ndarray, y_hat: np.ndarray, q_hat=None):
        """(y_hat, q_hat) of `series` (rows) forecast from `end[series]`, clipped (copies)."""
        zero = self.all_zero(series, end)
        y_hat = np.maximum(y_hat, 0)
        y_hat[zero] = 0
        if q_hat is not None:
            q_hat = np.maximum(q_hat, 0)
            q_hat[zero] = 0
        return y_hat, q_hat


def combined(net: np.ndarray, others: list[np.ndarray], how: str = "mean") -> np.ndarray:
    """[N, H] the mean (or with `how` "median", the median) of the network's point forecasts
    and the comparators', step by step (the `evaluate.combine` forecast)."""
    stack = np.stack([np.asarray(f, np.float32) for f in (net, *others)])
    return np.median(stack, 0) if how == "median" else np.mean(stack, 0)


def concat_columns(frames: list[dict]) -> dict:
    """Join column blocks; a column some blocks lack (a model's quantiles, pinball) is NaN
    there."""
    if not frames:
        return {}
    keys = list(dict.fromkeys(k for f in frames for k in f))

    def col(f: dict, k: str) -> np.ndarray:
        n = len(next(iter(f.values())))
        return f[k] if k in f else np.full(n, np.nan, np.float32)
    return {k: np.concatenate([col(f, k) for f in frames]) for k in keys}
