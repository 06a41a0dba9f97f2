"""Leak-free per-series scaling: statistics from observed values before each series' cutoff.

`window` is instance scaling instead: every window is standardized by the mean and standard
deviation of its own observed lookback (done per batch by `WindowLoader`), so it follows level
shifts and never sees past its lookback; here it returns the identity.

Covariates are scaled like the target (`covariate_scaling`: per series and column, before the
same cutoff). `fit_scaling` returns (loc, scale) per series; `apply` maps y → (y - loc) / scale
and `invert` maps it back. Series with no observed value before their cutoff get (0, 1); a
scale that is (numerically) zero becomes 1, so constant series pass through shifted, not
divided by 0.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from pipeline.data.series import SeriesArrays

METHODS = ("none", "standard", "robust", "minmax", "window", "window_recent")
WINDOW_METHODS = ("window", "window_recent")   # each batch scales by its own lookback (loader)
CHUNK = 1 << 22  # values reduced per pass: bounds the temporaries to a few MB


def fit_scaling(arrays: SeriesArrays, cutoff: np.ndarray, method: str,
                values: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per series statistics of `values[indptr[s] : indptr[s] + cutoff[s]]` where observed.
    `values`: another column aligned with the target (a covariate; every row counts), else
    the target with its observation mask."""
    col = _Column(arrays.indptr, arrays.values if values is None else values,
                  arrays.mask if values is None else None)
    if method not in METHODS:
        raise ValueError(f"scaling method {method!r} is not one of {METHODS}")
    n = len(arrays)
    loc, scale = np.zeros(n, np.float64), np.ones(n, np.float64)
    if method == "none" or method in WINDOW_METHODS:
        return loc.astype(np.float32), scale.astype(np.float32)
    cut = np.clip(np.asarray(cutoff, np.int64), 0, arrays.lengths)
    fit = _robust if method == "robust" else _moments
    for lo, hi in _chunks(arrays.indptr, cut):
        loc[lo:hi], scale[lo:hi] = fit(col, cut, lo, hi, method)
    small = ~(scale > 1e-8 * np.maximum(np.abs(loc), 1.0))
    scale[small] = 1.0
    return loc.astype(np.float32), scale.astype(np.float32)


class _Column(NamedTuple):
    """One column of the flat arrays: values, and the observation mask (None: all rows)."""
    indptr: np.ndarray
    values: np.ndarray
    mask: np.ndarray | None

    def observed(self, a: int, b: int) -> np.ndarray:
        return np.ones(b - a, bool) if self.mask is None else self.mask[a:b].astype(bool)


def covariate_scaling(arrays: SeriesArrays, cutoff: np.ndarray, method: str
                      ) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Per series and covariate column, (loc, scale) [S, C] of the past and of the
    known-future covariates, fitted before `cutoff` as the target is (`window` scaling: per
    series statistics, `standard`). None where there are no such covariates."""
    method = "standard" if method in WINDOW_METHODS else method
    out = []
    for block in (arrays.past, arrays.future):
        if block is None:
            out.append(None)
            continue
        stats = [fit_scaling(arrays, cutoff, method, block[:, c]) for c in range(block.shape[1])]
        out.append((np.stack([s[0] for s in stats], 1), np.stack([s[1] for s in stats], 1)))
    return out[0], out[1]


def _chunks(indptr: np.ndarray, cut: np.ndarray):
    lo = 0
    while lo < len(cut):
        hi = int(np.searchsorted(indptr, indptr[lo] + CHUNK, side="right"))
        hi = min(max(hi - 1, lo + 1), len(cut))
        yield lo, hi
        lo = hi


def _moments(arrays: _Column, cut, lo, hi, method):
    """Mean/std or min/max of the observed prefix of series lo..hi-1, by np.*.reduceat."""
    base = arrays.indptr[lo]
    v = arrays.values[base:arrays.indptr[hi]].astype(np.float64)
    m = arrays.observed(base, arrays.indptr[hi])
    bounds = np.stack([arrays.indptr[lo:hi] - base, arrays.indptr[lo:hi] - base + cut[lo:hi]], 1)
    idx = bounds.reshape(-1)  # [S, 2] -> [a0, b0, a1, b1, …]: even slots reduce the prefixes
    count = _prefix_reduce(np.add, m.astype(np.float64), idx, cut[lo:hi])
    empty = count == 0
    if method == "standard":
        total = _prefix_reduce(np.add, np.where(m, v, 0.0), idx, cut[lo:hi])
        mean = total / np.maximum(count, 1)
        centered = np.where(m, v - np.repeat(mean, np.diff(arrays.indptr[lo:hi + 1])), 0.0)
        var = _prefix_reduce(np.add, centered ** 2, idx, cut[lo:hi]) / np.maximum(count, 1)
        loc, scale = mean, np.sqrt(var)
    else:
        mn = _prefix_reduce(np.minimum, np.where(m, v, np.inf), idx, cut[lo:hi])
        mx = _prefix_reduce(np.maximum, np.where(m, v, -np.inf), idx, cut[lo:hi])
        loc, scale = mn, mx - mn
    return np.where(empty, 0.0, loc), np.where(empty, 1.0, scale)


def _prefix_reduce(ufunc, v, idx, cut):
    """ufunc over [a_s, a_s + cut_s) for each series; empty prefixes give 0 (and are masked
    later by count == 0). One padding element keeps an index equal to len(v) valid."""
    v = np.append(v, 0.0)
    out = ufunc.reduceat(v, idx)[0::2]
    return np.where(cut > 0, out, 0.0)


def mase_scale(arrays: SeriesArrays, cutoff: np.ndarray, m: int) -> np.ndarray:
    """[S] float64: MASE's scale of each series from its steps before `cutoff`, the mean of
    |x_t − x_{t−m}| over its history (lag 1 when it holds m + 1 steps or fewer; NaN when it
    holds fewer than lag + 1 or the mean is 0): `pipeline.evaluation.metrics.mase_scale` on the same
    histories, reduced over the flat arrays in chunks of series."""
    cut = np.clip(np.asarray(cutoff, np.int64), 0, arrays.lengths)
    lag = np.where(cut > m, m, 1).astype(np.int64)                 # [S]
    out = np.full(len(arrays), np.nan)
    for lo, hi in _chunks(arrays.indptr, cut):
        base, end = arrays.indptr[lo], arrays.indptr[hi]
        v = arrays.values[base:end].astype(np.float64)
        sizes = np.diff(arrays.indptr[lo:hi + 1])
        row = np.arange(end - base)
        pos = row - np.repeat(arrays.indptr[lo:hi] - base, sizes)   # step within its series
        lags = np.repeat(lag[lo:hi], sizes)
        diff = np.abs(v - v[np.maximum(row - lags, 0)])
        diff = np.where((pos >= lags) & (pos < np.repeat(cut[lo:hi], sizes)), diff, 0.0)
        bounds = np.stack([arrays.indptr[lo:hi] - base, arrays.indptr[lo:hi] - base + cut[lo:hi]],
                          1).reshape(-1)   # [S, 2] -> [a0, b0, a1, b1, …]
        total = _prefix_reduce(np.add, diff, bounds, cut[lo:hi])
        n = cut[lo:hi] - lag[lo:hi]
        out[lo:hi] = np.where(n > 0, total / np.maximum(n, 1), np.nan)
    out[out == 0] = np.nan
    return out


def _robust(arrays: _Column, cut, lo, hi, method):
    """Median and inter-quartile range of the observed prefix, series by series."""
    loc, scale = np.zeros(hi - lo), np.ones(hi - lo)
    for i, s in enumerate(range(lo, hi)):
        a = arrays.indptr[s]
        v = arrays.values[a:a + cut[s]][arrays.observed(a, a + cut[s])]
        if len(v):
            q25, q50, q75 = np.quantile(v.astype(np.float64), [0.25, 0.5, 0.75])
            loc[i], scale[i] = q50, q75 - q25
    return loc, scale


def apply(y, loc, scale):
    """Scale values of windows: y [B, T] with loc/scale [B] (numpy or torch)."""
    return (y - loc[:, None]) / scale[:, None]


def invert(y, loc, scale):
    """Back to the original units: y [B, H, ...] with loc/scale [B]."""
    shape = (-1,) + (1,) * (y.ndim - 1)
    return y * scale.reshape(shape) + loc.reshape(shape)
