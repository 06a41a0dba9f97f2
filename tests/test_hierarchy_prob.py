"""Probabilistic reconciliation of the quantiles (`reconcile.intervals: normality`, issue #30):
equal to hierarchicalforecast's `Normality`, quantiles in order, the mean coherent."""
from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from scipy.stats import norm

from pipeline.hierarchy import aggregate, parse
from pipeline.hierarchy import probabilistic as pr
from pipeline.hierarchy import reconcile as rec

H = parse([[], ["region"], ["region", "store"]])
T, HORIZON = 24, 3
PROBS = np.array([0.1, 0.25, 0.5, 0.75, 0.9])
ARGS = ("wls_struct", "wls_var", "ols", "mint_shrink", "mint_cov", "bottom_up",
        "top_down_average_proportions", "top_down_proportion_averages")


@pytest.fixture(scope="module")
def case():
    """Eight series (two per store, two stores per region), aggregated; incoherent base
    forecasts with symmetric Gaussian quantiles of known σ."""
    rng = np.random.default_rng(11)
    ids = [f"s{k}" for k in range(8)]
    df = pl.DataFrame({"unique_id": np.repeat(ids, T), "ds": np.tile(np.arange(T), 8),
                       "y": rng.gamma(5.0, 2.0, 8 * T), "region": np.repeat(list("NNNNSSSS"), T),
                       "store": np.repeat(list("aabbccdd"), T)})
    agg = aggregate(df, H)
    long = pl.concat([agg.frame.select("unique_id", "ds", "y"), df.select("unique_id", "ds", "y")])
    order = {k: i for i, k in enumerate(agg.ids)}
    insample = long.pivot(on="ds", index="unique_id", values="y", sort_columns=True).sort(
        pl.col("unique_id").replace_strict(order)).drop("unique_id").to_numpy()
    n = agg.S.shape[0]
    fitted = insample + rng.normal(0.0, 1.0 + np.arange(n)[:, None] % 3, (n, T))
    base = insample[:, -HORIZON:] + rng.normal(0.0, 3.0, (n, HORIZON))
    sigma = rng.uniform(1.0, 6.0, (n, HORIZON))
    q = base[:, :, None] + norm.ppf(PROBS)[None, None, :] * sigma[:, :, None]
    return {"agg": agg, "insample": insample, "fitted": fitted, "base": base, "sigma": sigma,
            "q": q}


def _ours(case, method, **kw):
    agg = case["agg"]
    return rec.reconcile(case["base"], agg.S, agg.tags, method, case["insample"],
                         case["fitted"], case["q"], intervals="normality", probs=PROBS, **kw)


def test_sigma_from_symmetric_quantile_pairs(case):
    np.testing.assert_allclose(pr.sigma_from_quantiles(case["q"], PROBS), case["sigma"])
    assert pr.sigma_from_quantiles(case["q"][..., :2], PROBS[:2]) is None


def _library(case, method):
    from hierarchicalforecast import methods as hm

    agg = case["agg"]
    S, n = agg.S.toarray(), agg.S.shape[0]
    kw = {"S": S, "y_hat": case["base"], "sigmah": case["sigma"], "level": [50, 80],
          "intervals_method": "normality"}
    if method == "bottom_up":
        r = hm.BottomUp()
    elif method.startswith("top_down"):
        r = hm.TopDown(method.removeprefix("top_down_"))
        kw.update(tags=rec.positions(agg.tags), y_insample=case["insample"])
    else:
        r = hm.MinTrace(method)
        kw.update(y_insample=case["insample"], y_hat_insample=case["fitted"])
    out = r.fit_predict(**kw)
    assert out["mean"].shape == (n, HORIZON)
    return out


@pytest.mark.parametrize("method", ARGS)
def test_equal_to_hierarchicalforecasts_normality(case, method):
    theirs, ours = _library(case, method), _ours(case, method)
    assert (ours.method_used, ours.note) == (method, None)
    np.testing.assert_allclose(ours.mean, theirs["mean"], rtol=1e-6, atol=1e-6)
    # theirs: levels [50, 80] → quantiles 0.1, 0.25, 0.75, 0.9 (their median is the mean)
    np.testing.assert_allclose(ours.quantiles[..., [0, 1, 3, 4]], theirs["quantiles"],
                               rtol=1e-6, atol=1e-6, err_msg=method)
    np.testing.assert_allclose(ours.quantiles[..., 2], theirs["mean"], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("method", ["ols", "wls_struct", "wls_var"])
def test_sparse_wls_normality_equals_the_dense(case, method, monkeypatch):
    dense = _ours(case, method)
    monkeypatch.setattr(rec, "DENSE_MAX", 4)
    monkeypatch.setattr(pr, "BLOCK", 5)          # H built over several blocks of columns
    sparse_ = _ours(case, method)
    np.testing.assert_allclose(sparse_.quantiles, dense.quantiles, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("method", ARGS)
def test_normality_mean_coherent_quantiles_in_order_median_is_mean(case, method):
    agg, r = case["agg"], _ours(case, method)
    S = agg.S
    assert np.abs(S @ r.mean[-S.shape[1]:] - r.mean).max() < 1e-6
    assert (np.diff(r.quantiles, axis=2) >= 0).all()
    np.testing.assert_allclose(r.quantiles[..., 2], r.mean, atol=1e-9)


def test_slices_can_cross_where_normality_cannot(case):
    """Slice by slice, MinTrace's P has negative entries (a series' reconciled value falls as
    a sibling's base rises), so one very wide series makes its sibling's quantiles cross;
    normality keeps them in order on the same inputs."""
    agg = case["agg"]
    q = case["base"][:, :, None] + np.linspace(-1e-3, 1e-3, len(PROBS))   # narrow everywhere
    q[-1] = case["base"][-1, :, None] + norm.ppf(PROBS) * 50.0         # but one bottom series
    kw = {"insample": case["insample"], "fitted": case["fitted"], "quantiles": q}
    sliced = rec.reconcile(case["base"], agg.S, agg.tags, "ols", intervals="quantiles", **kw)
    normal = rec.reconcile(case["base"], agg.S, agg.tags, "ols", intervals="normality",
                           probs=PROBS, **kw)
    assert (np.diff(sliced.quantiles, axis=2) < 0).any()
    assert (np.diff(normal.quantiles, axis=2) >= 0).all()


def test_without_a_symmetric_pair_or_a_linear_map_the_slices_are_reconciled(case):
    agg = case["agg"]
    r = rec.reconcile(case["base"], agg.S, agg.tags, "ols", quantiles=case["q"][..., 3:],
                      intervals="normality", probs=PROBS[3:])
    assert "no symmetric pair" in r.note
    r = _ours(case, "top_down_forecast_proportions")
    assert "not a fixed linear map" in r.note
    for k in range(len(PROBS)):
        y = r.quantiles[..., k]
        assert np.abs(agg.S @ y[-agg.S.shape[1]:] - y).max() < 1e-6
    with pytest.raises(ValueError, match="probabilities"):
        rec.reconcile(case["base"], agg.S, agg.tags, "ols", quantiles=case["q"],
                      intervals="normality")
