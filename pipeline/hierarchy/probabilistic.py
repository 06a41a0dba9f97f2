"""Probabilistic reconciliation of quantiles under normality (`reconcile.intervals:
normality`), as hierarchicalforecast's `Normality` (Panagiotelis et al. 2022): the base
forecasts ~ N(ŷ, W_h) with W_h = D_h R D_h (D_h the base standard deviations at step h, R the
correlation of the method's weight matrix W, the identity for a diagonal W), the reconciled
ones ~ N(S P ŷ, S P W_h Pᵀ Sᵀ); their quantiles are mean + z_p · σ̃, σ̃ the square root of
that covariance's diagonal.

Only the diagonal is computed, never the n×n covariance per step (the library stores one per
step), and for a diagonal W without densifying S or P: with H = S P (the reconciliation map
y ↦ S P y), σ̃²[:, h] = (H ∘ H) σ²[:, h], H built in blocks of columns by applying the map to
identity columns (for the sparse wls above the dense limit: `wls_sparse` on them, exact).
That is O(n²) work in the number of series n: 7 s for 11,011 series (3 levels, 28 steps,
`wls_struct`) against 1.3 s slice by slice, here on 2 shared cores; so about 100× that at
100 k series. With a full W (`mint_shrink`, `mint_cov`, only up to the dense limit) it is
O(n³) per step: 12 s for 2,001 series and 28 steps against 1.6 s slice by slice.

The mean is coherent; the quantiles are the reconciled distribution's marginal quantiles, not
sums of the children's quantiles, and are in order (σ̃ ≥ 0, z_p increasing in p).
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy import sparse
from scipy.stats import norm

BLOCK = 512  # columns of H built at once


def sigma_from_quantiles(q: np.ndarray, probs: np.ndarray) -> np.ndarray | None:
    """`[n, h]` base standard deviations from base quantiles `q` `[n, h, len(probs)]`: per
    symmetric pair (p, 1 − p), p < 0.5, (q_{1−p} − q_p) / (2 z_{1−p}), averaged over the
    pairs; negative (crossed base quantiles) counted as 0. None without a symmetric pair."""
    probs = np.asarray(probs, np.float64)
    pairs = [(i, int(np.flatnonzero(np.isclose(probs, 1 - p))[0]))
             for i, p in enumerate(probs) if p < 0.5 and np.isclose(probs, 1 - p).any()]
    if not pairs:
        return None
    sig = [(q[..., hi] - q[..., lo]) / (2 * norm.ppf(probs[hi])) for lo, hi in pairs]
    return np.maximum(np.mean(sig, axis=0), 0.0)


def correlation(W) -> np.ndarray | None:
    """R = W scaled to unit diagonal, as the library's `Normality` builds it; None (the
    identity) for a diagonal or absent W."""
    if W is None or sparse.issparse(W):
        return None if W is None or W.nnz <= W.shape[0] else correlation(W.toarray())
    W = np.asarray(W, np.float64)
    if np.count_nonzero(W - np.diag(np.diag(W))) == 0:
        return None
    std = np.sqrt(np.diag(W))
    return W / np.outer(std, std)


def reconciled_sigma(apply: Callable[[np.ndarray], np.ndarray], n: int, sigma: np.ndarray,
                     R: np.ndarray | None = None) -> np.ndarray:
    """`[n, h]` σ̃: the square roots of diag(H D_h R D_h Hᵀ), H the linear map `apply`
    (`[n, k]` → `[n, k]`, y ↦ S P y), D_h = diag(sigma[:, h]). R None: the identity, H built
    `BLOCK` columns at a time; else R `[n, n]` dense (the full-covariance methods, only up to
    the dense limit) and H dense."""
    if R is None:
        var = np.zeros_like(sigma, dtype=np.float64)
        s2 = np.asarray(sigma, np.float64) ** 2
        for lo in range(0, n, BLOCK):
            hi = min(n, lo + BLOCK)
            eye = np.zeros((n, hi - lo))
            eye[np.arange(lo, hi), np.arange(hi - lo)] = 1.0
            var += np.asarray(apply(eye)) ** 2 @ s2[lo:hi]
    else:
        H = np.asarray(apply(np.eye(n)), np.float64)
        var = np.empty(sigma.shape)
        for t in range(sigma.shape[1]):
            M = H * sigma[None, :, t]
            var[:, t] = np.einsum("ij,ij->i", M @ R, M)
    return np.sqrt(np.maximum(var, 0.0))


def normal_quantiles(mean: np.ndarray, sigma_rec: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """`[n, h, q]`: mean + z_p σ̃, as `Normality.get_prediction_quantiles`."""
    z = norm.ppf(np.asarray(probs, np.float64))
    return mean[:, :, None] + z[None, None, :] * sigma_rec[:, :, None]
