"""Statistical comparators from statsforecast: AutoETS, AutoTheta, AutoARIMA and
DynamicOptimizedTheta forecasts of many histories, with a seasonal-naive fallback where a model
cannot fit a series.

`forecast` is a pure function of its inputs (no global state, no processes of its own), so the
pipeline can map it over chunks of series in Ray tasks. Each series is forecast by each
model's own `forecast(y=..., h=..., level=...)`, one series at a time: StatsForecast over a long
frame runs the same per-series calls (its single-process path), adds the frame building and
stops at the first failing series unless given a fallback model, which it does not report.

Measured on this 2-core VM (shared with other test runs, so ±15 % noise), one process,
series of length 100, season 12, h = 12, levels [80, 95]; seconds for the whole panel:

    model       series  per-series  StatsForecast
    AutoETS        300    33.2          37.6        wall, one run each
    AutoTheta      300     2.3           2.0
    AutoARIMA      300   465           361
    AutoETS        100    10.1-13.1      9.3-10.8   CPU, 4 interleaved runs each
    AutoTheta      300     1.6-2.3       1.5-2.2
    AutoARIMA       30    42.5-58.0     39.6-51.9   (a bare model.forecast loop: 46.9-49.7)
    DynOptTheta    300     0.40            -        wall, one run; AutoTheta 0.88 in the same
                                                    run (statsforecast 2.1.1, 2026-12-04)

No difference beyond the noise (the bare loop of the same calls spreads as widely), so the
per-series path stays: it is what reports a fallback per (series, model). AutoARIMA dominates:
about 1.5 s a series against 0.1 s for AutoETS and 7 ms for AutoTheta.

A model that raises on a series, or returns a non-finite value in any column asked for, is
replaced for that series by the seasonal naive forecast (`evaluate.seasonal_naive`: the last
`season` values repeated, the last value when the history is shorter); its interval columns
are then that forecast too (lo = hi = point, as the pipeline's other fallbacks), and the
(series, model, reason) is reported in `Forecasts.fallbacks`.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
from statsforecast.models import AutoARIMA, AutoETS, AutoTheta, DynamicOptimizedTheta

from pipeline.config import STATISTICAL
from pipeline.evaluation import metrics as E

COMPARATORS: dict[str, Callable[[int], object]] = {
    "auto_ets": lambda season_length: AutoETS(season_length=season_length),
    "auto_theta": lambda season_length: AutoTheta(season_length=season_length),
    "auto_arima": lambda season_length: AutoARIMA(season_length=season_length),
    "dynamic_theta": lambda season_length: DynamicOptimizedTheta(season_length=season_length),
}


assert tuple(COMPARATORS) == STATISTICAL, "pipeline.config.STATISTICAL names the comparators"


class Fallback(NamedTuple):
    series: int        # position in `histories`
    model: str         # comparator name
    reason: str        # the exception, or which column was not finite


class Forecasts(NamedTuple):
    """What `forecast` returns; unpacks as `columns, fallbacks = forecast(...)`."""

    columns: dict[str, np.ndarray]   # name, name-lo-<l>, name-hi-<l> -> [N, h] float64
    fallbacks: list[Fallback]        # one per (series, model) replaced by seasonal naive

    def fell_back(self, model: str) -> np.ndarray:
        """[N] bool: the series whose `model` forecast is the seasonal-naive fallback."""
        n = len(self.columns[model])
        out = np.zeros(n, bool)
        out[[f.series for f in self.fallbacks if f.model == model]] = True
        return out


def forecast(histories: list[np.ndarray], h: int, season: int, names: Sequence[str],
             levels: Sequence[int] = ()) -> Forecasts:
    """Point forecasts [N, h] of each comparator in `names` (keys of COMPARATORS) for each
    history (1-D, finite, any length >= 1), and with `levels` (e.g. [80, 95]) the models' own
    prediction intervals as f"{name}-lo-{l}" / f"{name}-hi-{l}" [N, h]. Returns
    Forecasts(columns, fallbacks): the columns, and a Fallback(series, model, reason) for each
    forecast replaced by seasonal naive (`Forecasts.fell_back(name)` as an [N] mask)."""
    levels = _check(histories, h, season, names, levels)
    columns = {key: np.empty((len(histories), h)) for key in _keys(names, levels)}
    fallbacks = []
    for name in names:
        model = COMPARATORS[name](season)
        for i, y in enumerate(histories):
            out, reason = _one(model, np.asarray(y, np.float64), h, levels)
            if reason is not None:
                point = E.seasonal_naive([y], h, season)[0]                 # [1, h] -> [h]
                out = {k: point for k in _keys([""], levels)}
                fallbacks.append(Fallback(i, name, reason))
            for key, values in out.items():
                columns[name + key][i] = values
    return Forecasts(columns, fallbacks)


def _one(model, y: np.ndarray, h: int, levels: list[int]
         ) -> tuple[dict[str, np.ndarray], str | None]:
    """{"" (point), "-lo-80", ...: [h]} from one model on one series, or the reason it failed."""
    try:
        res = model.forecast(y=y, h=h, level=levels or None)
    except Exception as error:  # statsforecast raises many kinds on tiny or odd data
        return {}, f"{type(error).__name__}: {error}"
    out = {"": np.asarray(res["mean"], np.float64)}
    for l in levels:
        for side in ("lo", "hi"):
            out[f"-{side}-{l}"] = np.asarray(res[f"{side}-{l}"], np.float64)  # AutoARIMA: Series
    bad = [k or "mean" for k, v in out.items() if v.shape != (h,) or not np.isfinite(v).all()]
    return (out, None) if not bad else ({}, f"not finite: {', '.join(bad)}")


def _keys(names: Sequence[str], levels: list[int]) -> list[str]:
    """Column names: each name, then its lo and hi column per level."""
    return [name + suffix for name in names
            for suffix in ["", *(f"-{s}-{l}" for l in levels for s in ("lo", "hi"))]]


def _check(histories, h: int, season: int, names: Sequence[str], levels: Sequence[int]
           ) -> list[int]:
    """Errors naming the bad argument; the levels as ints."""
    unknown = [n for n in names if n not in COMPARATORS]
    if unknown:
        raise ValueError(f"unknown comparator(s) {unknown}; known: {sorted(COMPARATORS)}")
    if len(set(names)) != len(names):
        raise ValueError(f"comparator names repeat: {list(names)}")
    if h < 1 or season < 1:
        raise ValueError(f"h and season must be >= 1; got h={h}, season={season}")
    if any(not (0 < l < 100 and float(l).is_integer()) for l in levels):
        raise ValueError(f"levels must be whole percentages in (0, 100), e.g. [80, 95]; "
                         f"got {list(levels)}")
    for i, y in enumerate(histories):
        y = np.asarray(y)
        if y.ndim != 1 or y.size == 0 or not np.isfinite(y).all():
            raise ValueError(f"history {i} must be a non-empty 1-D array of finite values; "
                             f"got shape {y.shape}")
    return [int(l) for l in levels]
