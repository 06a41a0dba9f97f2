"""Conformal intervals from the backtest (`evaluate.intervals: conformal`, #15 item 5).

`calibrate` fits `pipeline.forecasting.intervals` on the backtest's residuals (actual − point
forecast, observed steps only) per model (the run's, each comparator, the baselines), per horizon
step and per group where a group has enough series (`intervals.fit`'s min_series, pooled elsewhere).
It fits twice: on the older cutoffs (k >= 1) to measure each level's coverage on the latest backtest
window (k = 0), which none of those residuals saw; and on every cutoff for the final forecast.
`with_intervals` puts the latter around the final forecast's point forecasts as the quantile columns
(level 80 -> q_0.1 and q_0.9); a fallback row uses the residuals of the model it falls back to.
Imports neither Ray nor MLflow.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from pipeline.evaluation import metrics as E
from pipeline.forecasting import intervals
from pipeline.forecasting.backtest import Backtest
from pipeline.forecasting.predict import quantile_column


@dataclass
class Calibration:
    levels: tuple[float, ...]                  # coverage fractions, e.g. (0.8, 0.95)
    fitted: dict[str, intervals.Conformal]     # model -> widths from every cutoff
    coverage: dict[str, dict[str, float]]      # model -> {"coverage_80": …} on the latest
                                               # window, calibrated on the older ones

    def to_json(self) -> str:
        """The widths of every model as JSON (logged with the run, so that its registered
        champions forecast with the intervals it was calibrated with)."""
        return json.dumps({"levels": list(self.levels), "coverage": self.coverage,
                           "fitted": {m: c.to_dict() for m, c in self.fitted.items()}})

    @classmethod
    def from_json(cls, text: str) -> Calibration:
        d = json.loads(text)
        return cls(tuple(d["levels"]), {m: intervals.Conformal.from_dict(c)
                                        for m, c in d["fitted"].items()}, d["coverage"])


def calibrate(bt: Backtest, groups: np.ndarray | None, levels: list[int]) -> Calibration:
    """Conformal widths per model from the backtest `bt`; `groups` [S] the series' group
    values (None: pooled only); `levels` in percent (`evaluate.levels`)."""
    lv = tuple(v / 100 for v in levels)
    fitted, coverage = {}, {}
    for model in dict.fromkeys(b.model for b in bt.blocks):
        older = _stack(bt, model, lambda k: k >= 1)
        latest = _stack(bt, model, lambda k: k == 0)
        if older is not None and latest is not None:
            conf = intervals.fit(_residuals(older), lv, _groups(groups, older[0]))
            coverage[model] = _coverage(conf, latest, lv, _groups(groups, latest[0]))
        every = _stack(bt, model, lambda k: True)
        fitted[model] = intervals.fit(_residuals(every), lv, _groups(groups, every[0]))
    return Calibration(lv, fitted, coverage)


def _stack(bt: Backtest, model: str, which):
    """(series [N], y, y_hat, mask [N, H]) of `model`'s blocks at the cutoffs `which` keeps;
    None when there are none."""
    blocks = [b for b in bt.blocks if b.model == model and which(b.k)]
    if not blocks:
        return None
    return tuple(np.concatenate([getattr(b, f) for b in blocks])
                 for f in ("series", "y", "y_hat", "mask"))


def _residuals(stack) -> np.ndarray:
    _, y, y_hat, mask = stack
    return np.where(mask.astype(bool), y.astype(np.float64) - y_hat, np.nan)


def _groups(groups: np.ndarray | None, series: np.ndarray) -> np.ndarray | None:
    return None if groups is None else np.asarray(groups)[series].astype(str)


def _coverage(conf: intervals.Conformal, stack, levels, groups) -> dict[str, float]:
    """{"coverage_80": mean over series of the fraction of observed actuals inside}."""
    _, y, y_hat, mask = stack
    q = conf.apply(y_hat, groups)
    return {f"coverage_{round(100 * lv)}": E.summarize({"c": E.coverage(
        y, q[quantile_column(round((1 - lv) / 2, 10))],
        q[quantile_column(round((1 + lv) / 2, 10))], mask)})["c"] for lv in levels}


def with_intervals(cols: dict, cal: Calibration, horizon: int) -> dict:
    """The final forecast's long columns with the conformal quantile columns added (NaN for
    rows of a model the backtest did not score)."""
    if not cols:
        return cols
    models = np.asarray(cols["model"]).astype(str)
    out = {**cols}
    for model in np.unique(models):
        rows = np.flatnonzero(models == model)
        conf = cal.fitted.get(model.removeprefix("fallback:"))
        if conf is None:
            continue
        q = conf.apply(cols["y_hat"][rows].reshape(-1, horizon),
                       np.asarray(cols["group"])[rows][::horizon].astype(str))
        for name, values in q.items():
            out.setdefault(name, np.full(len(models), np.nan, np.float32))
            out[name][rows] = values.reshape(-1)
    return out
