"""Conformal prediction intervals from the backtest (`evaluate.intervals: conformal`).

Split conformal, per horizon step. `fit` turns residuals r = actual − point forecast on backtest
windows [N, H] into symmetric half-widths w[level, step]: the conformal quantile of |r| over the
windows observed at that step, i.e. the k-th smallest of the n scores with k = ceil((n + 1)·level)
(the quantile at level k / n, corrected for the finite calibration set). When k > n the
conformal width is infinite; the largest score is used instead and `capped` says so (a step with
no residual at all gets NaN, capped too). With groups, a group gets its own widths at each step
where it has at least `min_series` residuals, the pooled ones elsewhere (and for groups never
seen). `Conformal.apply` puts the widths around new point forecasts as the pipeline's quantile
columns: level 0.8 -> q_0.1 = ŷ − w and q_0.9 = ŷ + w. Exchangeable residuals give coverage
>= level on new windows (on average over calibration sets).

The pipeline's use: `calibrate` fits per model of a backtest (the run's, each comparator, the
baselines), twice: on the older cutoffs (k >= 1) to measure each level's coverage on the latest
backtest window (k = 0), which none of those residuals saw; and on every cutoff for the final
forecast. `with_intervals` puts the latter around the final forecast's point forecasts (a
fallback row uses the residuals of the model it falls back to). `Calibration` is logged with a
run as JSON so its registered champions forecast with the widths it was calibrated with.
NumPy only; imports neither Ray nor MLflow.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pipeline.evaluation import metrics as E
from pipeline.forecasting.backtest import Backtest
from pipeline.forecasting.predict import quantile_column

_SLACK = 1e-6   # (n + 1)·level is rounded down by this before ceil: 10 × 0.7 = 7.000000000000001


@dataclass(frozen=True)
class Conformal:
    levels: tuple[float, ...]    # [K] coverage levels, e.g. (0.8, 0.95)
    width: np.ndarray            # [K, H] pooled half-widths
    capped: np.ndarray           # [K, H] bool: too few residuals for the level (largest used)
    count: np.ndarray            # [H] pooled residuals per step
    groups: np.ndarray           # [G] group values seen by `fit` (sorted; empty without groups)
    group_width: np.ndarray      # [G, K, H] each group's widths, pooled where not own
    group_capped: np.ndarray     # [G, K, H] bool: `capped` of the widths in group_width
    group_own: np.ndarray        # [G, H] bool: the group had >= min_series residuals there

    def to_dict(self) -> dict:
        """Plain lists (JSON); `from_dict` restores it exactly (NaN widths included)."""
        return {"levels": list(self.levels), "width": self.width.tolist(),
                "capped": self.capped.tolist(), "count": self.count.tolist(),
                "groups": [str(g) for g in self.groups], "group_width": self.group_width.tolist(),
                "group_capped": self.group_capped.tolist(), "group_own": self.group_own.tolist()}

    @classmethod
    def from_dict(cls, d: dict, horizon: int | None = None) -> Conformal:
        """The widths `to_dict` wrote, checked (they may come from a registry): levels in
        (0, 1), every array of its shape ([K, H], H = `horizon` when given; [G, K, H] for G
        sorted groups), widths >= 0 and finite, NaN only where capped. ValueError otherwise."""
        try:
            levels = tuple(float(v) for v in d["levels"])
            width = np.asarray(d["width"], np.float64)
            K, H = width.shape
            groups = np.asarray([str(g) for g in d["groups"]], object)
            G = len(groups)
            conf = cls(levels, width, np.asarray(d["capped"], bool).reshape(K, H),
                       np.asarray(d["count"], np.int64).reshape(H), groups,
                       np.asarray(d["group_width"], np.float64).reshape(G, K, H),
                       np.asarray(d["group_capped"], bool).reshape(G, K, H),
                       np.asarray(d["group_own"], bool).reshape(G, H))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"conformal widths of the wrong form ({type(e).__name__}: "
                             f"{str(e)[:120]})") from None
        conf._check(horizon)
        return conf

    def _check(self, horizon: int | None) -> None:
        K, H = self.width.shape
        if len(self.levels) != K or not all(0 < v < 1 for v in self.levels):
            raise ValueError(f"conformal levels {list(self.levels)[:5]} are not {K} fractions "
                             "in (0, 1)")
        if horizon is not None and horizon != H:
            raise ValueError(f"conformal widths for {H} steps, the horizon is {horizon}")
        if (self.count < 0).any() or list(self.groups) != sorted(self.groups):
            raise ValueError("conformal counts are negative or its groups are not sorted")
        for width, capped in ((self.width, self.capped), (self.group_width, self.group_capped)):
            bad = (width < 0) | np.isinf(width) | (np.isnan(width) & ~capped)
            if bad.any():
                raise ValueError(f"conformal widths negative or not finite ({int(bad.sum())} "
                                 "value(s)): the intervals would cross")

    def widths(self, n: int, groups: np.ndarray | None = None) -> np.ndarray:
        """[n, K, H] half-widths for n forecasts: their group's, pooled for unknown groups."""
        out = np.broadcast_to(self.width, (n, *self.width.shape)).copy()    # [K, H] -> [n, K, H]
        if groups is None or not len(self.groups):
            return out
        groups = _vector("groups", groups, n)
        pos = np.searchsorted(self.groups, groups).clip(max=len(self.groups) - 1)
        known = self.groups[pos] == groups
        out[known] = self.group_width[pos[known]]
        return out

    def apply(self, y_hat: np.ndarray, groups: np.ndarray | None = None
              ) -> dict[str, np.ndarray]:
        """{"q_0.025": ŷ − w_0.95, "q_0.1": ŷ − w_0.8, "q_0.9": …, "q_0.975": …} [N, H] each,
        in ascending quantile order."""
        y_hat = np.asarray(y_hat, np.float64)
        if y_hat.ndim != 2 or y_hat.shape[1] != self.width.shape[1]:
            raise ValueError(f"y_hat must be [N, H] with H = {self.width.shape[1]} (the "
                             f"residuals' horizon); got {y_hat.shape}")
        w = self.widths(len(y_hat), groups)                                  # [N, K, H]
        order = np.argsort(self.levels)
        names = interval_columns([self.levels[k] for k in order])
        sides = [(k, -1) for k in order[::-1]] + [(k, 1) for k in order]    # widest first
        return {name: y_hat + sign * w[:, k] for name, (k, sign) in zip(names, sides,
                                                                        strict=True)}


def interval_columns(levels) -> list[str]:
    """The quantile columns of central intervals at `levels` (fractions), ascending:
    (0.8, 0.95) -> q_0.025, q_0.1, q_0.9, q_0.975."""
    lv = sorted(levels)
    return [quantile_column(round((1 - v) / 2, 10)) for v in lv[::-1]] + \
        [quantile_column(round((1 + v) / 2, 10)) for v in lv]


def fit(residuals: np.ndarray, levels: Sequence[float], groups: np.ndarray | None = None,
        min_series: int = 30) -> Conformal:
    """Conformal half-widths per level and step from residuals [N, H] (NaN or inf where
    unobserved: ignored); per group with `groups` [N] (see the module docstring)."""
    res, levels = _check(residuals, levels, min_series)
    width, capped, count = _widths(res, levels)
    if groups is None:
        K, H = width.shape
        return Conformal(levels, width, capped, count, np.empty(0), np.empty((0, K, H)),
                         np.empty((0, K, H), bool), np.empty((0, H), bool))
    keys, which = np.unique(_vector("groups", groups, len(res)), return_inverse=True)
    g_width, g_capped, g_own = [], [], []
    for g in range(len(keys)):
        w, c, n = _widths(res[which == g], levels)
        own = n >= min_series                                                # [H]
        g_width.append(np.where(own, w, width))
        g_capped.append(np.where(own, c, capped))
        g_own.append(own)
    return Conformal(levels, width, capped, count, keys, np.stack(g_width),
                     np.stack(g_capped), np.stack(g_own))


def _widths(res: np.ndarray, levels: tuple[float, ...]
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """([K, H] widths, [K, H] capped, [H] counts) from residuals [n, H] with NaN unobserved."""
    scores = np.sort(np.abs(res), axis=0)                                    # NaN sort last
    n = np.isfinite(res).sum(axis=0)                                         # [H]
    lv = np.asarray(levels)[:, None]                                         # [K] -> [K, 1]
    k = np.ceil((n + 1) * lv - _SLACK).astype(np.int64)                     # [K, H]
    capped = (k > n) | (n == 0)
    rank = np.clip(np.minimum(k, n) - 1, 0, None)                            # 0-based, [K, H]
    if len(scores) == 0:
        return np.full(rank.shape, np.nan), capped, n
    width = np.take_along_axis(scores, rank, axis=0)                         # [n, H] -> [K, H]
    return np.where(n == 0, np.nan, width), capped, n


def _check(residuals, levels, min_series: int) -> tuple[np.ndarray, tuple[float, ...]]:
    res = np.asarray(residuals, np.float64)
    if res.ndim != 2:
        raise ValueError(f"residuals must be [N, H]; got shape {res.shape}")
    levels = tuple(float(v) for v in levels)
    if not levels or not all(0 < v < 1 for v in levels):
        raise ValueError(f"levels must be coverage fractions in (0, 1), e.g. [0.8, 0.95]; "
                         f"got {list(levels)}")
    if len(set(levels)) != len(levels):
        raise ValueError(f"levels repeat: {list(levels)}")
    if min_series < 1:
        raise ValueError(f"min_series must be >= 1; got {min_series}")
    return np.where(np.isfinite(res), res, np.nan), levels


def _vector(name: str, values, n: int) -> np.ndarray:
    values = np.asarray(values)
    if values.shape != (n,):
        raise ValueError(f"{name} must be [N] = [{n}]; got shape {values.shape}")
    return values


# ------------------------------------------------------- the backtest's calibration

@dataclass
class Calibration:
    levels: tuple[float, ...]                  # coverage fractions, e.g. (0.8, 0.95)
    fitted: dict[str, Conformal]     # model -> widths from every cutoff
    coverage: dict[str, dict[str, float]]      # model -> {"coverage_80": …} on the latest
                                               # window, calibrated on the older ones

    def to_json(self) -> str:
        """The widths of every model as JSON (logged with the run, so that its registered
        champions forecast with the intervals it was calibrated with)."""
        return json.dumps({"levels": list(self.levels), "coverage": self.coverage,
                           "fitted": {m: c.to_dict() for m, c in self.fitted.items()}})

    @classmethod
    def from_json(cls, text: str, horizon: int | None = None) -> Calibration:
        """What `to_json` wrote, each model's widths checked (`Conformal.from_dict`);
        ValueError naming the model otherwise."""
        try:
            d = json.loads(text)
            fitted, coverage, levels = dict(d["fitted"]), dict(d["coverage"]), d["levels"]
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"calibration is not the JSON a run logs ({type(e).__name__})") \
                from None
        out = {}
        for m, c in fitted.items():
            try:
                out[m] = Conformal.from_dict(c, horizon)
            except ValueError as e:
                raise ValueError(f"model {str(m)[:80]!r}: {e}") from None
        return cls(tuple(levels), out, coverage)


def calibrate(bt: Backtest, groups: np.ndarray | None, levels: list[int]) -> Calibration:
    """Conformal widths per model from the backtest `bt`; `groups` [S] the series' group
    values (None: pooled only); `levels` in percent (`evaluate.levels`)."""
    lv = tuple(v / 100 for v in levels)
    fitted, coverage = {}, {}
    for model in dict.fromkeys(b.model for b in bt.blocks):
        older = _stack(bt, model, lambda k: k >= 1)
        latest = _stack(bt, model, lambda k: k == 0)
        if older is not None and latest is not None:
            conf = fit(_residuals(older), lv, _groups(groups, older[0]))
            coverage[model] = _coverage(conf, latest, lv, _groups(groups, latest[0]))
        every = _stack(bt, model, lambda k: True)
        fitted[model] = fit(_residuals(every), lv, _groups(groups, every[0]))
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


def _coverage(conf: Conformal, stack, levels, groups) -> dict[str, float]:
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
