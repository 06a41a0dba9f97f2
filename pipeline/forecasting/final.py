"""The final forecast: H steps past every series' end from each job's model (averaged with
the comparators under `evaluate.combine`), and for the series no model serves (too short, no
finite value, a failed job) the `evaluate.fallback` forecast, marked `model =
"fallback:<name>"`, so every input series has a forecast; and a statistical champion refitted
per series. Imports neither Ray nor MLflow (the runner maps the comparators).
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

from pipeline.config import Config
from pipeline.data.loader import WindowLoader, loader_at
from pipeline.data.series import SeriesArrays
from pipeline.evaluation import metrics as E
from pipeline.forecasting.backtest import (
    COMBINATION,
    combined,
    comparator_forecasts,
    concat_columns,
    fallback_name,
    season_of,
)
from pipeline.forecasting.predict import history, long_frame, observed, predict_job


def final_forecast(arrays: SeriesArrays, jobs: list, models: dict, cfg: Config,
                   extra: dict | None = None, device="cpu",
                   within: np.ndarray | None = None, failed: list | None = None,
                   runner: Callable | None = None, loader: WindowLoader | None = None,
                   alone: list | None = None) -> dict:
    """H steps past every series' end: the job's model ({job name: model}) where there is one,
    else the fallback (`fallback_forecast`). A job whose forecasts are not all finite gets the
    fallback too, and its name is appended to `failed`. `within` ([S] bool) limits the
    forecast to those series (default: every series). `loader`: `loader_at(arrays, cfg,
    arrays.lengths)` when the caller has one (it forecasts in chunks). `alone`: under
    `evaluate.combine`, the network's own predictions of each job it combined are appended
    to it (`Predictions`), for `network_forecast`: the network alone, from the same pass."""
    ok = arrays.status == 0
    covered = np.zeros(len(arrays), bool)
    frames = []
    for job in jobs:
        if job.name not in models or not len(job.series):
            continue
        if loader is None:
            loader = loader_at(arrays, cfg, arrays.lengths, device)
        p = predict_job(models[job.name], arrays, cfg, arrays.lengths,
                        ok & job.member(len(arrays)), quantiles=cfg.model.quantiles,
                        with_target=False, loader=loader)
        if not np.isfinite(p.y_hat).all() or (p.q_hat is not None and
                                             not np.isfinite(p.q_hat).all()):
            if failed is not None:
                failed.append(job.name)
            continue
        y_hat, name = p.y_hat, cfg.model.name
        if cfg.evaluate.combine:      # joined with the comparators fitted on the same history
            y_hat, name = combined(y_hat, _final_comparators(arrays, p.series, cfg, runner),
                                   cfg.evaluate.combine_by), COMBINATION
            if alone is not None:
                alone.append(p)
        frames.append(long_frame(arrays, p.series, p.origin.astype(np.int64), y_hat, name,
                                 quantiles=cfg.model.quantiles, q_hat=p.q_hat, extra=extra))
        covered[p.series] = True
    rest = np.flatnonzero(~covered & (within if within is not None else True))
    if len(rest):
        y_hat = fallback_forecast(arrays, rest, cfg, runner)
        q_hat = np.repeat(y_hat[..., None], len(cfg.model.quantiles), -1) \
            if cfg.model.quantiles else None
        frames.append(long_frame(arrays, rest, arrays.lengths[rest].astype(np.int64), y_hat,
                                 fallback_name(cfg), quantiles=cfg.model.quantiles,
                                 q_hat=q_hat, extra=extra))
    return concat_columns(frames)


def network_forecast(arrays: SeriesArrays, alone: list, cfg: Config, within: np.ndarray,
                     extra: dict | None = None) -> dict:
    """The network's own forecast of the series `within` ([S] bool) where `final_forecast`
    combined it: its rows from the predictions that call appended to `alone`, as
    `final_forecast` without `evaluate.combine` writes them (no second forward pass). Series
    `alone` does not hold get no row."""
    frames = []
    for p in alone:
        rows = within[p.series]
        if rows.any():
            frames.append(long_frame(arrays, p.series[rows], p.origin[rows].astype(np.int64),
                                     p.y_hat[rows], cfg.model.name,
                                     quantiles=cfg.model.quantiles,
                                     q_hat=None if p.q_hat is None else p.q_hat[rows],
                                     extra=extra))
    return concat_columns(frames)


def refit_forecast(arrays: SeriesArrays, series: np.ndarray, name: str, season: int,
                   cap: int, horizon: int, runner: Callable | None = None,
                   extra: dict | None = None) -> tuple[dict, np.ndarray]:
    """A statistical champion's forecast: comparator `name` refitted on the last `cap` steps
    of each of `series` (those with an observed value), H steps past its end. Returns the long
    columns and the series it could not serve (no observed value: the caller's fallback)."""
    hist = history(arrays, series, arrays.lengths[series])
    some = observed(arrays, series)
    fc = comparator_forecasts([h for h, s in zip(hist, some, strict=True) if s], horizon,
                              season, [name], cap, runner)
    served = series[some]
    cols = long_frame(arrays, served, arrays.lengths[served].astype(np.int64),
                      fc.columns[name], name, extra=extra) if len(served) else {}
    return cols, series[~some]


def _final_comparators(arrays: SeriesArrays, series: np.ndarray, cfg: Config, runner
                       ) -> list[np.ndarray]:
    """The `evaluate.combine` comparators' [N, H] forecasts past the end of `series`."""
    m = season_of(cfg, arrays)
    fc = comparator_forecasts(history(arrays, series, arrays.lengths[series]),
                              cfg.windows.horizon, m, cfg.evaluate.combine,
                              cfg.evaluate.history_cap(m), runner)
    return [fc.columns[c] for c in cfg.evaluate.combine]


def fallback_forecast(arrays: SeriesArrays, rest: np.ndarray, cfg: Config,
                      runner: Callable | None = None) -> np.ndarray:
    """[N, H] the `evaluate.fallback` forecast past the end of series `rest`: seasonal naive,
    or AutoETS on the last `evaluate.comparator_history` steps (itself seasonal naive where
    AutoETS cannot fit); NaN for series without an observed value (all NaN/inf in the input:
    no made-up number)."""
    H, m = cfg.windows.horizon, season_of(cfg, arrays)
    hist = history(arrays, rest, arrays.lengths[rest])
    some = observed(arrays, rest)  # else nothing to fit: the zeros of the grid are no data
    y_hat = E.seasonal_naive(hist, H, m)
    if cfg.evaluate.fallback == "auto_ets" and some.any():
        fc = comparator_forecasts([h for h, s in zip(hist, some, strict=True) if s], H, m,
                                  ["auto_ets"], cfg.evaluate.history_cap(m), runner)
        y_hat[some] = fc.columns["auto_ets"]
    y_hat[~some] = np.nan
    return y_hat
