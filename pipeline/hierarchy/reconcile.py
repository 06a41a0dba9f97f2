"""Reconcile base forecasts (and their quantiles) across a hierarchy with hierarchicalforecast's
method classes, on arrays in `aggregate`'s row order (top level first, the bottom last).

Every method returns forecasts of the form S @ b (bottom-up, MinTrace) or built top-down by
splitting each parent exactly among its children (top-down), so each parent equals the sum of
its children at every step, to float rounding.

Bottom-up and top-down always run the library's sparse classes (`BottomUpSparse`,
`TopDownSparse`: equal to the dense ones to 1e-10, and dense `TopDown` forecast proportions
took 30 s on 3,600 series against 0.1 s). MinTrace runs the exact dense class up to
`DENSE_MAX` series; above it `wls_sparse` here solves the diagonal-weight methods (`ols`,
`wls_struct`, `wls_var`) exactly, and the full-covariance methods (`mint_shrink`,
`mint_cov`), which need a dense n×n covariance, fall back to `wls_struct`, saying so. Not
`MinTraceSparse`: it solves with BiCGSTAB to the default relative tolerance and ignores the
solver's exit code; on 2,000 series its `ols` was off the exact solution by up to 82 % on
small series and its `wls_var` did not converge at all.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import sparse
from scipy.sparse.linalg import splu

from pipeline.config import ConfigError
from pipeline.config.hierarchy import INTERVALS, METHODS, MIN_TRACE  # noqa: F401 - re-exported
from pipeline.config.hierarchy import TOP_DOWN as config_top_down
from pipeline.hierarchy.probabilistic import (
    correlation,
    normal_quantiles,
    reconciled_sigma,
    sigma_from_quantiles,
)

KEY = "reconcile.method"
TOP_DOWN = dict(zip(config_top_down,   # method → the library's TopDown method
                    ("forecast_proportions", "average_proportions", "proportion_averages"),
                    strict=True))
RESIDUALS = {"wls_var", "mint_shrink", "mint_cov"}   # need in-sample actuals and fitted values
FULL_COVARIANCE = {"mint_shrink", "mint_cov"}        # a dense n×n covariance
FALLBACK = "wls_struct"
DENSE_MAX = 4096  # series up to which the dense classes run (MinTrace's W is n×n float64)
# the library's messages when a covariance cannot be used (it raises a bare Exception)
_SINGULAR = ("ill-conditioned", "close to 0", "positive definite")


@dataclass(frozen=True)
class Reconciled:
    """mean `[n_all, h]`, quantiles `[n_all, h, q]` (None without), the method asked for, the
    one used and, when they differ, why."""
    mean: np.ndarray
    quantiles: np.ndarray | None
    method: str
    method_used: str
    note: str | None = None


def reconcile(base: np.ndarray, S: sparse.csr_matrix, tags: dict[str, np.ndarray],
              method: str = "mint_shrink", insample: np.ndarray | None = None,
              fitted: np.ndarray | None = None, quantiles: np.ndarray | None = None,
              intervals: str = "quantiles", probs: np.ndarray | None = None) -> Reconciled:
    """Coherent forecasts from base ones. `base` `[n_all, h]` in S's row order; `tags` level →
    ids, in S's row order (`Aggregation.tags`); `insample`/`fitted` `[n_all, T]` in-sample
    actuals and fitted values (NaN where a series has none), needed by `wls_var`,
    `mint_shrink`, `mint_cov` (residuals) and the average top-down methods (actuals only);
    `quantiles` `[n_all, h, q]` base quantiles.

    `mint_shrink` (and `mint_cov`, `wls_var`) fall back to `wls_struct` when the residuals
    cannot give an invertible covariance (a series with fewer than two residuals or none
    varying, `mint_cov` with fewer complete steps than series, more than `DENSE_MAX` series
    for the full-covariance methods, an estimate that is numerically singular, e.g. the
    shrink estimate from two steps, or the library finding it ill-conditioned); `method_used`
    and `note` say so. Other errors of the library propagate.

    Quantiles: each quantile slice is reconciled like the mean, with the same projection
    (one call, the slices stacked as extra steps). Each reconciled slice is then coherent:
    parent quantile = sum of its children's, for every method. That is a statement about the
    arrays, not about distributions: the sum of children's q-quantiles is the parent's
    q-quantile only if the children move together (comonotone); for bottom-up and the
    average top-down methods P ≥ 0, so quantiles stay in order, while MinTrace's P has
    negative entries and reconciled quantiles may cross (sort them if that matters), and
    top-down forecast proportions split each slice by that slice's own proportions.
    `intervals="normality"` (`probs`: the quantiles' levels): the reconciled Gaussian's
    quantiles instead (`probabilistic`), in order, not sums of the children's (see
    `_normality` for when the slices are reconciled after all)."""
    n_all, h = _check_shapes(base, S, tags, insample, fitted, quantiles)
    if method not in METHODS:
        raise ConfigError(f"{KEY} = {method!r} is not one of {', '.join(METHODS)}")
    _check_inputs(method, tags, S, insample, fitted)
    sigma, qnote = _normality(intervals, method, quantiles, probs)
    y_hat = np.ascontiguousarray(base if quantiles is None or sigma is not None else np.hstack(
        [base, quantiles.transpose(0, 2, 1).reshape(n_all, -1)]), dtype=np.float64)
    used, note = method, _why_not(method, n_all, insample, fitted)
    out, rec, note = (None, None, note) if note else _attempt(method, y_hat, S, tags,
                                                              insample, fitted)
    if note:
        used, note = FALLBACK, f"{KEY} {method} not usable ({note}); reconciled with {FALLBACK}"
        out, rec = _run(FALLBACK, y_hat, S, tags, insample, fitted)
    if sigma is not None:
        q = normal_quantiles(out[:, :h], reconciled_sigma(
            _linear_map(used, rec, S, insample, fitted), n_all, sigma,
            correlation(rec.W) if used in FULL_COVARIANCE else None), probs)
    else:   # the slices, stacked after the mean
        q = None if quantiles is None else out[:, h:].reshape(
            n_all, quantiles.shape[2], h).transpose(0, 2, 1)
    return Reconciled(mean=out[:, :h], quantiles=q, method=method, method_used=used,
                      note="; ".join(filter(None, [note, qnote])) or None)


def _normality(intervals, method, quantiles, probs) -> tuple[np.ndarray | None, str | None]:
    """The base σ `[n, h]` for normality (None: reconcile the slices) and why not: no
    symmetric pair of quantile levels, or `top_down_forecast_proportions` (its split depends
    on the forecasts: not a fixed linear map)."""
    if intervals not in INTERVALS:
        raise ConfigError(f"reconcile.intervals = {intervals!r} is not one of "
                          f"{', '.join(INTERVALS)}")
    if quantiles is None or intervals != "normality":
        return None, None
    if probs is None or len(probs) != quantiles.shape[2]:
        raise ValueError("reconcile.intervals normality needs the quantiles' probabilities")
    why = "no symmetric pair of quantile levels"
    if method == "top_down_forecast_proportions":
        why = f"{method} is not a fixed linear map"
    else:
        sigma = sigma_from_quantiles(quantiles, probs)
        if sigma is not None:
            return sigma, None
    return None, f"reconcile.intervals normality not usable ({why}); quantiles reconciled " \
                 "slice by slice"


def _linear_map(used, rec, S, insample, fitted):
    """y ↦ S P y for the method used: the library's P where it built one, else (the sparse
    wls above the dense limit) `wls_sparse` with that method's diagonal W."""
    Ssp = sparse.csr_matrix(S, dtype=np.float64)
    if rec is None:
        w = _weights(used, S, insample, fitted)
        return lambda y: wls_sparse(Ssp, y, w)
    P = rec.P
    return lambda y: Ssp @ np.asarray(P @ y)


def _check_shapes(base, S, tags, insample, fitted, quantiles) -> tuple[int, int]:
    if base.ndim != 2 or base.shape[0] != S.shape[0]:
        raise ValueError(f"base forecasts have shape {base.shape}; expected [{S.shape[0]}, h] "
                         "(one row per row of S)")
    if sum(len(v) for v in tags.values()) != S.shape[0]:
        raise ValueError("tags do not cover the rows of S once each")
    if not np.isfinite(base).all():
        raise ValueError("base forecasts hold NaN or inf")
    for name, arr in (("insample", insample), ("fitted", fitted)):
        if arr is not None and (arr.ndim != 2 or arr.shape[0] != S.shape[0]):
            raise ValueError(f"{name} has shape {arr.shape}; expected [{S.shape[0]}, T]")
    if insample is not None and fitted is not None and insample.shape != fitted.shape:
        raise ValueError(f"insample {insample.shape} and fitted {fitted.shape} differ")
    if quantiles is not None and (quantiles.ndim != 3 or quantiles.shape[:2] != base.shape
                                  or not np.isfinite(quantiles).all()):
        raise ValueError(f"quantiles have shape {quantiles.shape} or non-finite values; "
                         f"expected finite [{base.shape[0]}, {base.shape[1]}, q]")
    return base.shape


def _check_inputs(method, tags, S, insample, fitted) -> None:
    if method in RESIDUALS and (insample is None or fitted is None):
        raise ValueError(f"{KEY} {method} needs in-sample actuals and fitted values")
    if method in TOP_DOWN:
        if method != "top_down_forecast_proportions" and insample is None:
            raise ValueError(f"{KEY} {method} needs in-sample actuals")
        first = S[0]
        if len(next(iter(tags.values()))) != 1 or first.nnz != S.shape[1]:
            raise ConfigError(f"{KEY} {method} needs the grand total level [] at the top "
                              "of data.hierarchy")


def _why_not(method: str, n_all: int, insample, fitted) -> str | None:
    """Why `method`'s covariance cannot be used on these residuals (None: it can)."""
    if method not in RESIDUALS:
        return None
    if method in FULL_COVARIANCE and n_all > DENSE_MAX:
        return f"{n_all} series, above the {DENSE_MAX} a dense covariance is built for"
    res = np.asarray(insample, np.float64) - np.asarray(fitted, np.float64)
    finite = np.isfinite(res)
    few = np.flatnonzero(finite.sum(axis=1) < 2)
    if few.size:
        return f"series row {few[0]} has fewer than two in-sample residuals"
    spread = np.nanmax(np.where(finite, res, np.nan), axis=1) - np.nanmin(
        np.where(finite, res, np.nan), axis=1)
    flat = np.flatnonzero(spread <= 1e-12 * np.maximum(1.0, np.nanmax(np.abs(res), axis=1)))
    if flat.size:
        return f"series row {flat[0]} has constant in-sample residuals (zero variance)"
    steps = int(finite.all(axis=0).sum())
    if method == "mint_cov" and steps <= n_all:
        return f"{steps} complete in-sample steps for {n_all} series: covariance singular"
    return None


def _attempt(method, y_hat, S, tags, insample, fitted):
    """`method`'s reconciled forecasts and fitted reconciler, or None, None and why its
    covariance cannot be used."""
    try:
        out, rec = _run(method, y_hat, S, tags, insample, fitted)
    except Exception as e:  # the library raises a bare Exception for these
        if method not in RESIDUALS or not any(s in str(e) for s in _SINGULAR):
            raise
        return None, None, f"hierarchicalforecast: {e}"
    if method in FULL_COVARIANCE and _singular(rec.W):
        return None, None, "its covariance estimate is singular"
    return out, rec, None


def _singular(W: np.ndarray) -> bool:
    """W is not numerically positive definite, whatever the series' scales (a total's
    variance can be 1e10 times a bottom series'): its correlation matrix fails Cholesky or
    has a pivot below 1e-10. The library solves with such a W anyway and returns noise."""
    d = np.diag(W)
    if not (d > 0).all():
        return True
    scale = 1.0 / np.sqrt(d)
    try:
        L = np.linalg.cholesky(W * scale[:, None] * scale[None, :])
    except np.linalg.LinAlgError:
        return True
    return bool(np.diag(L).min() ** 2 < 1e-10)


def _run(method, y_hat, S, tags, insample, fitted) -> tuple[np.ndarray, object]:
    """One fit_predict of the library's class for `method` → (reconciled `[n_all, cols]`,
    the fitted reconciler)."""
    from hierarchicalforecast import methods as hm

    n_all = S.shape[0]
    dense = n_all <= DENSE_MAX
    kwargs = {"y_hat": y_hat}
    if method == "bottom_up":
        rec, dense = hm.BottomUpSparse(), False
    elif method in TOP_DOWN:
        rec, dense = hm.TopDownSparse(TOP_DOWN[method]), False
        kwargs["tags"] = positions(tags)
    elif method in FULL_COVARIANCE or dense:  # the full-covariance ones only get here dense
        rec = hm.MinTrace(method)
    else:
        return wls_sparse(sparse.csr_matrix(S, dtype=np.float64), y_hat,
                          _weights(method, S, insample, fitted)), None
    if insample is not None and (method in RESIDUALS or method in TOP_DOWN):
        kwargs["y_insample"] = np.ascontiguousarray(insample, dtype=np.float64)
    if fitted is not None and method in RESIDUALS:
        kwargs["y_hat_insample"] = np.ascontiguousarray(fitted, dtype=np.float64)
    s = S.toarray() if dense else sparse.csr_matrix(S, dtype=np.float64)
    return np.asarray(rec.fit_predict(S=s, **kwargs)["mean"], dtype=np.float64), rec


def _weights(method, S, insample, fitted) -> np.ndarray:
    """The diagonal of W as hierarchicalforecast's dense MinTrace builds it."""
    if method == "ols":
        return np.ones(S.shape[0])
    if method == "wls_struct":
        return np.asarray(S.sum(axis=1), dtype=np.float64).ravel()
    res = np.asarray(insample, np.float64) - np.asarray(fitted, np.float64)
    return np.nansum(res ** 2, axis=1) / res.shape[1] + 2e-8


def wls_sparse(S: sparse.csr_matrix, y_hat: np.ndarray, w: np.ndarray) -> np.ndarray:
    """MinTrace with a diagonal W (`w`), exactly and sparse: S x with x minimising
    (y − Sx)' W⁻¹ (y − Sx). With S = [A; I] (aggregates over the bottom) and W = diag(Wa, Wb),
    Woodbury gives x = Wb r − Wb A' K⁻¹ A Wb r, r = S' W⁻¹ y, K = Wa + A Wb A': a sparse
    n_aggregates × n_aggregates system (nonzero only between a node and its ancestors),
    factorised once by sparse LU for every column of `y_hat`."""
    n_b = S.shape[1]
    A, wa, wb = S[:-n_b], w[:-n_b], w[-n_b:]
    r = S.T @ (y_hat / w[:, None])
    wr = wb[:, None] * r
    if A.shape[0] == 0:
        return S @ wr
    K = (sparse.diags(wa) + A @ sparse.diags(wb) @ A.T).tocsc()
    x = wr - wb[:, None] * (A.T @ splu(K).solve(np.asarray(A @ wr)))
    return S @ x


def positions(tags: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Level → row positions in S (the method classes' `tags`), from id tags in row order."""
    out, start = {}, 0
    for name, ids in tags.items():
        out[name] = np.arange(start, start + len(ids))
        start += len(ids)
    return out
