"""Forecast accuracy: per-series metrics, their summaries, and the baselines every run is
measured against (DESIGN.md §8). Pure NumPy; imports nothing else of the project.

Conventions. A batch of forecasts is `y` [N, H] actuals, `yhat` [N, H] point forecasts and an
optional `mask` [N, H] (1 = observed; masked entries are ignored, even when NaN). Per-series
functions return [N] arrays; a series with no observed entry, or a zero denominator where the
error is not zero, gets NaN, never inf. Histories of different lengths are a list of 1-D arrays.

Naive2 follows the M4 competition's reference R code (`Benchmarks` / `SeasonalityTest`):
seasonal adjustment only when n >= 3m and the lag-m autocorrelation passes the 90 % test, a
classical multiplicative decomposition (R's `decompose`) for the seasonal indices, the naive
forecast of the adjusted series re-seasonalised. It reproduces the published M4 Hourly row.
"""
from __future__ import annotations

import math

import numpy as np

WAPE_NUM = "abs_error_sum"    # per-series Σ|y − ŷ|, carried so WAPE can be summed over series
WAPE_DEN = "abs_actual_sum"   # per-series Σ|y|
_SEASONALITY_Z = 1.645        # one-sided 90 % (the M4 reference code's tcrit)


# ---------------------------------------------------------------- point metrics, per series

def _weights(y: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """[N, H] bool: entries that count."""
    return np.ones(y.shape, bool) if mask is None else np.asarray(mask).astype(bool)


def _masked_mean(values: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Mean over the last axis of the entries where w is true; NaN for rows with none."""
    total = np.where(w, values, 0.0).sum(axis=-1)
    count = w.sum(axis=-1)
    return np.divide(total, count, out=np.full(total.shape, np.nan), where=count > 0)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den with 0/0 -> 0 and x/0 -> NaN (never inf: a quotient beyond float range, from
    a denominator that is all but 0, is NaN too)."""
    num, den = np.asarray(num, float), np.asarray(den, float)
    out = np.where(num == 0, 0.0, np.nan)
    with np.errstate(over="ignore"):
        out = np.divide(num, den, out=out, where=den != 0)
    return np.where(np.isinf(out), np.nan, out)


def _abs_error(y, yhat) -> np.ndarray:
    return np.abs(np.asarray(y, float) - np.asarray(yhat, float))


def mae(y, yhat, mask=None) -> np.ndarray:
    return _masked_mean(_abs_error(y, yhat), _weights(y, mask))


def rmse(y, yhat, mask=None) -> np.ndarray:
    return np.sqrt(_masked_mean(_abs_error(y, yhat) ** 2, _weights(y, mask)))


def smape(y, yhat, mask=None) -> np.ndarray:
    """M4's sMAPE on the 0–200 scale: mean of 200·|y − ŷ| / (|y| + |ŷ|); a 0/0 term is 0."""
    y, yhat = np.asarray(y, float), np.asarray(yhat, float)
    terms = _ratio(200.0 * np.abs(y - yhat), np.abs(y) + np.abs(yhat))
    return _masked_mean(terms, _weights(y, mask))


def mase(y, yhat, scale, mask=None) -> np.ndarray:
    """MAE over the in-sample scale from `mase_scale`; NaN where the scale is NaN."""
    return mae(y, yhat, mask) / np.asarray(scale, float)


def mase_scale(history_list, m: int) -> np.ndarray:
    """[N] mean |x_t − x_{t−m}| over each history (lag 1 when the history is shorter than m + 1;
    NaN when shorter than 2 or when the scale is zero, so MASE is NaN rather than inf)."""
    out = np.full(len(history_list), np.nan)
    for i, x in enumerate(history_list):
        x = np.asarray(x, float)
        lag = m if x.size > m else 1
        if x.size > lag:
            out[i] = np.mean(np.abs(x[lag:] - x[:-lag]))
    out[out == 0] = np.nan
    return out


def wape(y, yhat, mask=None) -> np.ndarray:
    """Per series Σ|y − ŷ| / Σ|y| (0 for a perfect forecast of zeros, else NaN when Σ|y| = 0)."""
    num, den = _wape_parts(y, yhat, mask)
    return _ratio(num, den)


def wape_overall(y, yhat, mask=None) -> float:
    """Σ|y − ŷ| / Σ|y| over all series together (large series weigh more)."""
    num, den = _wape_parts(y, yhat, mask)
    return float(_ratio(num.sum(), den.sum()))


def _wape_parts(y, yhat, mask) -> tuple[np.ndarray, np.ndarray]:
    w = _weights(y, mask)
    num = np.where(w, _abs_error(y, yhat), 0.0).sum(axis=-1)
    den = np.where(w, np.abs(np.asarray(y, float)), 0.0).sum(axis=-1)
    return num, den


# ------------------------------------------------------------------ quantile metrics, per series

def pinball(y, q_pred, quantiles, mask=None) -> np.ndarray:
    """[N] pinball (quantile) loss max(q·e, (q − 1)·e), e = y − q̂, averaged over H and Q."""
    q = np.asarray(quantiles, float)                                   # [Q]
    err = np.asarray(y, float)[..., None] - np.asarray(q_pred, float)  # [N, H] -> [N, H, Q]
    loss = np.maximum(q * err, (q - 1.0) * err).mean(axis=-1)          # [N, H, Q] -> [N, H]
    return _masked_mean(loss, _weights(y, mask))


def coverage(y, lo, hi, mask=None) -> np.ndarray:
    """[N] fraction of observed actuals inside [lo, hi]."""
    y = np.asarray(y, float)
    inside = ((y >= np.asarray(lo, float)) & (y <= np.asarray(hi, float))).astype(float)
    return _masked_mean(inside, _weights(y, mask))


def _interval_columns(quantiles, intervals) -> dict[str, tuple[int, int]]:
    """{'coverage_80': (index of 0.1, index of 0.9), ...}; every symmetric pair found in
    `quantiles` when `intervals` is None."""
    q = np.asarray(quantiles, float)
    if intervals is None:
        intervals = [(lo, 1.0 - lo) for lo in q if lo < 0.5 and np.isclose(q, 1.0 - lo).any()]
    columns = {}
    for lo, hi in intervals:
        if not (lo < hi and math.isclose(lo + hi, 1.0)):
            raise ValueError(f"interval ({lo}, {hi}) is not a symmetric pair (lo + hi = 1)")
        where = [np.flatnonzero(np.isclose(q, v)) for v in (lo, hi)]
        if not all(len(i) for i in where):
            raise ValueError(f"interval ({lo}, {hi}) needs both quantiles in {q.tolist()}")
        columns[f"coverage_{round(100 * (hi - lo))}"] = (int(where[0][0]), int(where[1][0]))
    return columns


# ------------------------------------------------------------------------- tables and summaries

def metrics_table(y, yhat, scale, mask=None, quantiles=None, q_pred=None,
                  intervals=None) -> dict[str, np.ndarray]:
    """Every per-series metric in one dict of [N] arrays: mae, rmse, smape, mase, wape and the
    WAPE parts (WAPE_NUM, WAPE_DEN); with quantiles, pinball and coverage_<level> for each
    interval, e.g. (0.1, 0.9) -> coverage_80 (default: every symmetric pair in quantiles).
    Tables of several batches can be concatenated key by key before `summarize`."""
    num, den = _wape_parts(y, yhat, mask)
    table = {"mae": mae(y, yhat, mask), "rmse": rmse(y, yhat, mask),
             "smape": smape(y, yhat, mask), "mase": mase(y, yhat, scale, mask),
             "wape": _ratio(num, den), WAPE_NUM: num, WAPE_DEN: den}
    if quantiles is not None:
        if q_pred is None:
            raise ValueError("quantiles given without q_pred [N, H, Q]")
        q_pred = np.asarray(q_pred, float)
        table["pinball"] = pinball(y, q_pred, quantiles, mask)
        for name, (i, j) in _interval_columns(quantiles, intervals).items():
            table[name] = coverage(y, q_pred[..., i], q_pred[..., j], mask)
    return table


def summarize(table: dict[str, np.ndarray]) -> dict[str, float]:
    """One number per metric: the NaN-ignoring mean over series, except wape, which is the
    overall ratio Σ WAPE_NUM / Σ WAPE_DEN (so it equals `wape_overall`). The WAPE parts
    themselves are not reported."""
    out = {}
    for name, values in table.items():
        if name in (WAPE_NUM, WAPE_DEN):
            continue
        if name == "wape" and WAPE_NUM in table:
            out[name] = float(_ratio(np.sum(table[WAPE_NUM]), np.sum(table[WAPE_DEN])))
        else:
            out[name] = _nanmean(values)
    return out


def _nanmean(values) -> float:
    values = np.asarray(values, float)
    finite = ~np.isnan(values)
    return float(values[finite].mean()) if finite.any() else math.nan


def owa(smape, mase, smape_naive2, mase_naive2):
    """M4's Overall Weighted Average: ½ (sMAPE / sMAPE_Naive2 + MASE / MASE_Naive2), from the
    averages over series."""
    return 0.5 * (smape / smape_naive2 + mase / mase_naive2)


def skill(metric_model, metric_baseline):
    """Relative skill 1 − model / baseline (> 0: better than the baseline); NaN for a zero
    baseline. Works on floats and arrays."""
    model, base = np.asarray(metric_model, float), np.asarray(metric_baseline, float)
    ratio = np.divide(model, base, out=np.full(np.broadcast(model, base).shape, np.nan),
                      where=base != 0)
    out = 1.0 - ratio
    return float(out) if out.ndim == 0 else out


# -------------------------------------------------------------------------------- baselines

def _forecast_each(history_list, h: int, one) -> np.ndarray:
    """Stack one(x) -> [h] over the histories; NaN rows for empty histories."""
    out = np.full((len(history_list), h), np.nan)
    for i, x in enumerate(history_list):
        x = np.asarray(x, float)
        if x.size:
            out[i] = one(x)
    return out


def naive(history_list, h: int, m: int = 1) -> np.ndarray:
    """[N, h] the last value repeated (m is accepted for a uniform baseline signature)."""
    return _forecast_each(history_list, h, lambda x: np.full(h, x[-1]))


def seasonal_naive(history_list, h: int, m: int) -> np.ndarray:
    """[N, h] the last season repeated; the naive forecast for histories shorter than m."""
    return _forecast_each(
        history_list, h, lambda x: np.resize(x[-m:], h) if x.size >= m else np.full(h, x[-1]))


def naive2(history_list, h: int, m: int) -> np.ndarray:
    """[N, h] M4's Naive2: the naive forecast of the seasonally adjusted series, re-seasonalised.

    Adjusted only when `seasonality_test` passes (which needs n >= 3m, as the M4 reference
    code) and the history is strictly positive (a multiplicative decomposition needs it; all
    M4 data is). Seasonal indices come from `_seasonal_indices`, phase 0 = first observation.
    """
    def one(x: np.ndarray) -> np.ndarray:
        if m <= 1 or not (x > 0).all() or not seasonality_test(x, m):
            return np.full(h, x[-1])
        figure = _seasonal_indices(x, m)                       # [m]
        level = x[-1] / figure[(x.size - 1) % m]               # last seasonally adjusted value
        return level * figure[(x.size + np.arange(h)) % m]     # re-seasonalised

    return _forecast_each(history_list, h, one)


def seasonality_test(x, m: int) -> bool:
    """M4's 90 % test for seasonality at lag m: |r_m| > 1.645·sqrt((1 + 2 Σ_{k<m} r_k²) / n),
    with r_k R's `acf`. False for m <= 1, for n < 3m and for a constant series."""
    x = np.asarray(x, float)
    n = x.size
    if m <= 1 or n < 3 * m:
        return False
    r = _acf(x, m)                                                     # [m + 1], r[0] = 1
    if np.isnan(r).any():
        return False
    limit = _SEASONALITY_Z * math.sqrt((1.0 + 2.0 * np.sum(r[1:m] ** 2)) / n)
    return bool(abs(r[m]) > limit)


def _acf(x: np.ndarray, max_lag: int) -> np.ndarray:
    """[max_lag + 1] sample autocorrelations as R's acf: Σ (x_t − x̄)(x_{t+k} − x̄) / Σ (x_t − x̄)²;
    NaN for a constant series."""
    xc = x - x.mean()
    denom = float(xc @ xc)
    if denom == 0:
        return np.full(max_lag + 1, np.nan)
    return np.array([xc[: x.size - k] @ xc[k:] for k in range(max_lag + 1)]) / denom


def _seasonal_indices(x: np.ndarray, m: int) -> np.ndarray:
    """[m] multiplicative seasonal indices as R's decompose: x over its centred moving average
    (2×m for even m, m for odd m), averaged per phase, normalized to mean 1."""
    w = np.r_[0.5, np.ones(m - 1), 0.5] / m if m % 2 == 0 else np.ones(m) / m
    trend = np.convolve(x, w, mode="valid")                  # [n − len(w) + 1], centred
    half = len(w) // 2
    t = np.arange(half, half + trend.size)                   # positions with a full window
    ratio = x[t] / trend
    figure = np.bincount(t % m, weights=ratio, minlength=m) / np.bincount(t % m, minlength=m)
    return figure / figure.mean()
