"""Placing a part's rows on the regular grid and filling what is missing: gaps in the stamps
and NaN/inf values are filled forward (backward at a series' start) and masked (`mask` 0);
missing covariate values are filled the same way and reported."""
from __future__ import annotations

import numpy as np

from pipeline.data.io import Part


def report_row(part: Part, series, issue: str, action: str, detail: str) -> dict:
    return {"series": None if series is None else str(series), "file": part.label,
            "issue": issue, "action": action, "detail": detail}


def scatter_target(y, flat, indptr, n_series):
    """Place rows on the grid; fill gaps and NaN/inf by forward then backward fill."""
    values = np.full(indptr[-1], np.nan, np.float32)
    with np.errstate(over="ignore"):  # beyond float32's range → inf, imputed and reported
        values[flat] = y
    finite = np.isfinite(values)
    values, no_finite = fill_segments(values, finite, indptr)
    return values, finite.astype(np.uint8), no_finite


def fill_segments(values: np.ndarray, finite: np.ndarray, indptr: np.ndarray):
    """Forward fill non-finite entries within each segment, then back fill leading ones from
    the segment's first finite value. Segments with no finite value become 0."""
    n = len(values)
    if n == 0 or finite.all():
        return values, np.zeros(len(indptr) - 1, bool)
    starts = indptr[:-1]
    idx = np.where(finite, np.arange(n), 0)
    nonempty = starts < indptr[1:]
    idx[starts[nonempty]] = starts[nonempty]  # never reach into the previous segment
    np.maximum.accumulate(idx, out=idx)
    out = values[idx]
    first = np.minimum.reduceat(np.where(finite, np.arange(n), n), starts[nonempty])
    first_all = np.full(len(starts), n)
    first_all[nonempty] = first
    seg_len = np.diff(indptr)
    seg = np.repeat(np.arange(len(starts)), seg_len)
    lead = ~np.isfinite(out)
    no_finite = first_all >= indptr[1:]
    src = np.minimum(first_all, n - 1)[seg[lead]]
    out[lead] = np.where(no_finite[seg[lead]], 0.0, values[src])
    return out, no_finite & nonempty


def scatter_covariates(df, cols, flat, indptr, part, ids, report):
    """Covariate columns on the grid [N, C], missing values filled; a report row per series
    and column that had some."""
    if not cols:
        return None
    out = np.empty((indptr[-1], len(cols)), np.float32)  # [N, C]
    for j, col in enumerate(cols):
        v = np.full(indptr[-1], np.nan, np.float32)
        v[flat] = df[col].to_numpy()
        finite = np.isfinite(v)
        out[:, j], _ = fill_segments(v, finite, indptr)
        if finite.all():
            continue
        gone = np.r_[0, np.cumsum(~finite)]
        missing = gone[indptr[1:]] - gone[indptr[:-1]]      # per series
        for s in np.flatnonzero(missing):
            report.append(report_row(part, ids[s], "covariate_missing", "filled",
                                     f"covariate {col!r}: {missing[s]} missing value(s) "
                                     "filled forward (backward at the series' start)"))
    return out
