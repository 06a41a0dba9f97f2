"""pipeline.hierarchy: the spec and its checks on the long table, the aggregated series and the
sparse summing matrix, and reconciliation (coherent at every step and quantile, equal to
hierarchicalforecast's own pipeline, the singular-covariance fallback)."""
import subprocess
import sys

import numpy as np
import polars as pl
import pytest
from scipy import sparse

from pipeline.config import ConfigError
from pipeline.errors import DataError
from pipeline.hierarchy import aggregate, check, parse, summing
from pipeline.hierarchy import reconcile as rec
from pipeline.hierarchy.aggregate import escape

H = parse([[], ["region"], ["region", "store"]])


# ---------------------------------------------------------------- spec
def test_parse_keeps_levels_top_down():
    assert H.levels == ((), ("region",), ("region", "store"))
    assert parse([["region"], ["region", "store"]]).columns == ("region", "store")
    assert [H.name(lv) for lv in H.levels] == ["total", "region", "region/store"]


@pytest.mark.parametrize("raw, says", [
    ([], "non-empty list"),
    ([["region"], "store"], "level 2 'store' must be a list"),
    ([["region"], ["store"]], "level 2 ['store'] must start with the columns of level 1"),
    ([["region"], ["region"]], "level 2 ['region'] must start"),
    ([[], ["region", "region"]], "level 2 ['region', 'region'] names a column twice"),
    ([["region"], []], "level 2 [] must start"),
])
def test_parse_names_the_bad_level(raw, says):
    with pytest.raises(ConfigError, match="data.hierarchy") as e:
        parse(raw)
    assert says in str(e.value)


def _panel(**change) -> pl.DataFrame:
    """Two regions × two stores, five series over ds 1..3: store N/s1 has two series (a, b);
    b's y is null at ds 3 and e has no row at ds 2 (gaps)."""
    rows = {"a": ("N", "s1", [1, 2, 3]), "b": ("N", "s1", [10, 20, None]),
            "c": ("N", "s2", [100, 200, 300]), "d": ("S", "s3", [1000, 2000, 3000]),
            "e": ("S", "s4", [10000, None, 30000])}
    out = [{"unique_id": k, "ds": t + 1, "y": None if y is None else float(y), "region": r,
            "store": s} for k, (r, s, ys) in rows.items() for t, y in enumerate(ys)
           if not (k == "e" and t == 1)]
    df = pl.DataFrame(out)
    for (uid, ds, col), value in change.get("set", {}).items():
        df = df.with_columns(pl.when((pl.col("unique_id") == uid) & (pl.col("ds") == ds))
                             .then(pl.lit(value)).otherwise(pl.col(col)).alias(col))
    return df


def test_check_accepts_the_panel():
    check(_panel(), H)


def test_check_missing_column_names_it():
    with pytest.raises(DataError, match="names column 'shelf', which the input does not have"):
        check(_panel(), parse([["region"], ["region", "shelf"]]))


def test_check_id_column_as_level_is_refused():
    with pytest.raises(DataError, match="names the id column 'unique_id'"):
        check(_panel(), parse([["region"], ["region", "unique_id"]]))


def test_check_non_constant_column_names_series_and_column():
    df = _panel(set={("c", 2, "region"): "S"})
    with pytest.raises(DataError, match=r"column 'region' of data.hierarchy changes over time "
                                        r"within series 'c' \('N', then 'S'\)"):
        check(df, H)


def test_check_child_under_two_parents_names_series_and_both_parents():
    df = _panel().with_columns(pl.when(pl.col("unique_id") == "d").then(pl.lit("s1"))
                               .otherwise(pl.col("store")).alias("store"))
    with pytest.raises(DataError) as e:
        check(df, H)
    msg = str(e.value)
    assert "store='s1' is under two parents" in msg
    assert "region='N' (series 'a')" in msg and "region='S' (series 'd')" in msg


def test_check_null_level_value_names_series_and_column():
    df = _panel(set={("c", 1, "region"): None})
    with pytest.raises(DataError, match="column 'region' of data.hierarchy is null for "
                                        "series 'c'"):
        check(df, H)


# ---------------------------------------------------------------- aggregate
def test_aggregate_tiny_panel_exactly():
    agg = aggregate(_panel(), H)
    ids = ["total", "region=N", "region=S", "region=N/store=s1", "region=N/store=s2",
           "region=S/store=s3", "region=S/store=s4"]
    assert agg.ids.tolist() == ids + ["a", "b", "c", "d", "e"]
    assert {k: v.tolist() for k, v in agg.tags.items()} == {
        "total": ["total"], "region": ids[1:3], "region/store": ids[3:],
        "unique_id": ["a", "b", "c", "d", "e"]}
    f = agg.frame
    assert f.columns == ["unique_id", "ds", "y", "n_bottom", "region", "store"]
    got = {(r["unique_id"], r["ds"]): (r["y"], r["n_bottom"]) for r in f.iter_rows(named=True)}
    assert got == {
        ("total", 1): (11111, 5), ("total", 2): (2222, 4), ("total", 3): (33303, 4),
        ("region=N", 1): (111, 3), ("region=N", 2): (222, 3), ("region=N", 3): (303, 2),
        ("region=S", 1): (11000, 2), ("region=S", 2): (2000, 1), ("region=S", 3): (33000, 2),
        ("region=N/store=s1", 1): (11, 2), ("region=N/store=s1", 2): (22, 2),
        ("region=N/store=s1", 3): (3, 1),
        ("region=N/store=s2", 1): (100, 1), ("region=N/store=s2", 2): (200, 1),
        ("region=N/store=s2", 3): (300, 1),
        ("region=S/store=s3", 1): (1000, 1), ("region=S/store=s3", 2): (2000, 1),
        ("region=S/store=s3", 3): (3000, 1),
        ("region=S/store=s4", 1): (10000, 1), ("region=S/store=s4", 3): (30000, 1)}
    # rows come in S's row order, then by ds; level columns null where a level lacks them
    assert f["unique_id"].unique(maintain_order=True).to_list() == ids
    assert f.filter(pl.col("unique_id") == "region=S")["store"].null_count() == 3
    expected = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [0, 0, 0, 1, 1], [1, 1, 0, 0, 0],
                         [0, 0, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 0, 1], *np.eye(5)])
    assert isinstance(agg.S, sparse.csr_matrix)
    np.testing.assert_array_equal(agg.S.toarray(), expected)


def test_ids_escape_separators():
    assert escape("N/E=1%") == "N%2FE%3D1%25"
    df = _panel().with_columns(pl.col("region").replace({"N": "N/E=1%"}))
    agg = aggregate(df, parse([["region"]]))
    assert agg.tags["region"].tolist() == ["region=N%2FE%3D1%25", "region=S"]


def test_aggregated_id_clashing_with_a_series_is_an_error():
    df = _panel().with_columns(pl.col("unique_id").replace({"a": "total"}))
    with pytest.raises(DataError, match="series 'total' has the id of an aggregated series"):
        aggregate(df, H)


def test_summing_matrix_for_100k_series_stays_sparse():
    n = 100_000
    i = np.arange(n)
    statics = pl.DataFrame({"unique_id": [f"x{k:06d}" for k in i[::-1]],
                            "region": (i % 1000 // 100).astype(str),
                            "store": (i % 1000).astype(str)})
    check(statics, H)
    S, ids, tags = summing(statics, H)           # about 0.5 s here: benchmarks time it
    assert isinstance(S, sparse.csr_matrix)
    assert S.shape == (1 + 10 + 1000 + n, n) and S.nnz == n * 4
    np.testing.assert_array_equal(np.asarray(S.sum(axis=0)).ravel(), np.full(n, 4.0))
    assert S[0].nnz == n and S[1].nnz == n // 10 and S[11].nnz == n // 1000
    assert ids[-n:].tolist() == sorted(ids[-n:].tolist())
    assert [len(v) for v in tags.values()] == [1, 10, 1000, n]


def test_importing_the_room_does_not_import_hierarchicalforecast():
    code = "import sys, pipeline.hierarchy; print('hierarchicalforecast' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.stdout.strip() == "False", r.stderr


# ---------------------------------------------------------------- reconcile
T, HORIZON, NQ = 24, 3, 3
REGION = {f"s{k}": "NS"[k // 4] for k in range(8)}
STORE = {f"s{k}": "abcd"[k // 2] for k in range(8)}


@pytest.fixture(scope="module")
def case():
    """Eight series (two per store, two stores per region) over T steps, aggregated; base
    forecasts, fitted values and quantiles that are not coherent."""
    rng = np.random.default_rng(7)
    ids = sorted(REGION)
    df = pl.DataFrame({"unique_id": np.repeat(ids, T), "ds": np.tile(np.arange(T), 8),
                       "y": rng.gamma(5.0, 2.0, 8 * T) + np.tile(np.arange(T) * 0.3, 8),
                       "region": np.repeat([REGION[k] for k in ids], T),
                       "store": np.repeat([STORE[k] for k in ids], T)})
    agg = aggregate(df, H)
    long = pl.concat([agg.frame.select("unique_id", "ds", "y"), df.select("unique_id", "ds", "y")])
    wide = long.pivot(on="ds", index="unique_id", values="y", sort_columns=True)
    order = {k: i for i, k in enumerate(agg.ids)}
    insample = wide.sort(pl.col("unique_id").replace_strict(order)).drop("unique_id").to_numpy()
    n = agg.S.shape[0]
    fitted = insample + rng.normal(0.0, 1.0 + np.arange(n)[:, None] % 3, (n, T))
    base = insample[:, -HORIZON:] + rng.normal(0.0, 3.0, (n, HORIZON))
    q = np.sort(base[:, :, None] + rng.normal(0.0, 4.0, (n, HORIZON, NQ)), axis=2)
    return {"df": df, "agg": agg, "insample": insample, "fitted": fitted, "base": base, "q": q}


def _incoherence(S, y) -> float:
    """Largest |parent − sum of its children| over rows and steps."""
    return float(np.abs(S @ y[-S.shape[1]:] - y).max())


@pytest.mark.parametrize("dense", [True, False], ids=["dense", "sparse"])
@pytest.mark.parametrize("method", rec.METHODS)
def test_every_method_is_coherent_at_every_step_and_quantile(case, method, dense, monkeypatch):
    if not dense:  # the sparse classes, as above DENSE_MAX series
        monkeypatch.setattr(rec, "DENSE_MAX", 4)
    agg, base, q = case["agg"], case["base"], case["q"]
    assert _incoherence(agg.S, base) > 1  # the base forecasts are not coherent
    r = rec.reconcile(base, agg.S, agg.tags, method, case["insample"], case["fitted"], q)
    assert r.mean.shape == base.shape and r.quantiles.shape == q.shape
    assert _incoherence(agg.S, r.mean) < 1e-6
    for k in range(NQ):
        assert _incoherence(agg.S, r.quantiles[:, :, k]) < 1e-6
    if dense or method not in rec.FULL_COVARIANCE:
        assert (r.method_used, r.note) == (method, None)
    else:
        assert r.method_used == "wls_struct" and "above the 4 a dense covariance" in r.note
    if method == "bottom_up":
        np.testing.assert_allclose(r.mean[-8:], base[-8:])


def test_quantile_slices_get_the_means_projection(case):
    agg = case["agg"]
    r = rec.reconcile(case["base"], agg.S, agg.tags, "mint_shrink", case["insample"],
                      case["fitted"], case["q"])
    for k in range(NQ):
        alone = rec.reconcile(case["q"][:, :, k], agg.S, agg.tags, "mint_shrink",
                              case["insample"], case["fitted"])
        np.testing.assert_allclose(r.quantiles[:, :, k], alone.mean, atol=1e-9)


@pytest.mark.parametrize("method", ["ols", "wls_struct", "wls_var"])
def test_sparse_wls_equals_the_dense_library(case, method, monkeypatch):
    agg, args = case["agg"], (case["insample"], case["fitted"], case["q"])
    dense = rec.reconcile(case["base"], agg.S, agg.tags, method, *args)
    monkeypatch.setattr(rec, "DENSE_MAX", 4)
    mine = rec.reconcile(case["base"], agg.S, agg.tags, method, *args)
    np.testing.assert_allclose(mine.mean, dense.mean, rtol=1e-8, atol=1e-8)
    np.testing.assert_allclose(mine.quantiles, dense.quantiles, rtol=1e-8, atol=1e-8)


def test_reconcile_100k_series_sparse():
    n = 100_000
    i = np.arange(n)
    statics = pl.DataFrame({"unique_id": [f"x{k:06d}" for k in i],
                            "region": (i % 1000 // 100).astype(str),
                            "store": (i % 1000).astype(str)})
    S, _, tags = summing(statics, H)
    rng = np.random.default_rng(3)
    base = rng.gamma(5.0, 2.0, (S.shape[0], 2))
    insample = rng.gamma(5.0, 2.0, (S.shape[0], 6))
    fitted = insample + rng.normal(0.0, 1.0, insample.shape)
    r = rec.reconcile(base, S, tags, "mint_shrink", insample, fitted)   # about 0.3 s here
    assert r.method_used == "wls_struct" and "101011 series, above the 4096" in r.note
    assert _incoherence(S, r.mean) < 1e-6


def _hf_id(our: str) -> str:
    """hierarchicalforecast's id (`total/N/a/s0`) for ours (`region=N/store=a`, `s0`)."""
    if our in REGION:
        return f"total/{REGION[our]}/{STORE[our]}/{our}"
    return "/".join(["total", *(p.split("=")[1] for p in our.split("/") if "=" in p)])


def test_equal_to_hierarchicalforecasts_own_pipeline(case):
    pd = pytest.importorskip("pandas")
    from hierarchicalforecast.core import HierarchicalReconciliation
    from hierarchicalforecast.methods import BottomUp, MinTrace, TopDown
    from hierarchicalforecast.utils import aggregate as hf_aggregate

    agg, n = case["agg"], case["agg"].S.shape[0]
    raw = case["df"].rename({"unique_id": "series"}).to_pandas().assign(total="total")
    spec = [["total"], ["total", "region"], ["total", "region", "store"],
            ["total", "region", "store", "series"]]
    Y_df, S_df, tags = hf_aggregate(raw, spec)
    row = {_hf_id(k): i for i, k in enumerate(agg.ids)}
    assert set(row) == set(S_df["unique_id"])
    # their aggregation gives our in-sample values
    their_y = Y_df.pivot(index="unique_id", columns="ds", values="y")
    np.testing.assert_allclose(their_y.loc[list(row)].to_numpy(), case["insample"])
    fitted = pd.DataFrame({"unique_id": np.repeat(list(row), T), "ds": np.tile(np.arange(T), n),
                           "model": case["fitted"].ravel()})
    Y_df = Y_df.merge(fitted, on=["unique_id", "ds"])
    Y_hat_df = pd.DataFrame({"unique_id": np.repeat(list(row), HORIZON),
                             "ds": np.tile(np.arange(T, T + HORIZON), n),
                             "model": case["base"].ravel()})
    ours = {"bottom_up": BottomUp(), "ols": MinTrace("ols"),
            "wls_struct": MinTrace("wls_struct"), "wls_var": MinTrace("wls_var"),
            "mint_shrink": MinTrace("mint_shrink"), "mint_cov": MinTrace("mint_cov"),
            "top_down_forecast_proportions": TopDown("forecast_proportions"),
            "top_down_average_proportions": TopDown("average_proportions"),
            "top_down_proportion_averages": TopDown("proportion_averages")}
    out = HierarchicalReconciliation(reconcilers=list(ours.values())).reconcile(
        Y_hat_df=Y_hat_df, Y_df=Y_df, S_df=S_df, tags=tags)
    cols = [c for c in out.columns if c.startswith("model/")]
    assert len(cols) == len(ours)
    for method, col in zip(ours, cols, strict=True):
        theirs = out.pivot(index="unique_id", columns="ds", values=col).loc[list(row)]
        r = rec.reconcile(case["base"], agg.S, agg.tags, method, case["insample"],
                          case["fitted"])
        assert r.method_used == method
        np.testing.assert_allclose(r.mean, theirs.to_numpy(), atol=1e-6, err_msg=method)


def _fallback(case, method, insample, fitted):
    agg = case["agg"]
    r = rec.reconcile(case["base"], agg.S, agg.tags, method, insample, fitted, case["q"])
    assert (r.method, r.method_used) == (method, "wls_struct")
    struct = rec.reconcile(case["base"], agg.S, agg.tags, "wls_struct", quantiles=case["q"])
    np.testing.assert_allclose(r.mean, struct.mean)
    np.testing.assert_allclose(r.quantiles, struct.quantiles)
    assert r.note.startswith(f"reconcile.method {method} not usable (")
    return r.note


def test_fallback_on_zero_residuals(case):
    note = _fallback(case, "mint_shrink", case["insample"], case["insample"])
    assert "constant in-sample residuals (zero variance)" in note


def test_fallback_when_the_library_refuses_the_residuals(case):
    # residuals that sum to 0 in every series: hierarchicalforecast raises "close to 0"
    n = case["agg"].S.shape[0]
    wiggle = np.tile([1.0, -1.0], T // 2)[None, :] * np.arange(1, n + 1)[:, None]
    note = _fallback(case, "mint_shrink", case["insample"], case["insample"] + wiggle)
    assert "hierarchicalforecast: Insample residuals close to 0" in note


def test_fallback_with_fewer_steps_than_series(case):
    ins, fit = case["insample"], case["fitted"]
    # two steps: the shrink estimate is singular; the library either says so or would solve
    # with it anyway (our check of W, tested on its own below), depending on the values
    note = _fallback(case, "mint_shrink", ins[:, :2], fit[:, :2])
    assert "covariance estimate is singular" in note or "ill-conditioned" in note
    assert "5 complete in-sample steps for 15 series" in _fallback(case, "mint_cov",
                                                                   ins[:, :5], fit[:, :5])
    assert "fewer than two in-sample residuals" in _fallback(case, "wls_var", ins[:, :1],
                                                             fit[:, :1])
    # the shrink estimator handles fewer steps than series from three on
    agg = case["agg"]
    r = rec.reconcile(case["base"], agg.S, agg.tags, "mint_shrink", ins[:, :5], fit[:, :5])
    assert (r.method_used, r.note) == ("mint_shrink", None)


def test_singular_covariance_check():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(6, 2))
    assert rec._singular(x @ x.T)  # rank 2 of 6
    assert rec._singular(x @ x.T + 1e-13 * np.eye(6))  # the library's tiny ridge does not help
    assert not rec._singular(np.diag([1e10, 1.0, 1e-4, 1.0, 1.0, 1.0]))  # scales differ
    assert rec._singular(np.diag([1.0, 1.0, 0.0, 1.0, 1.0, 1.0]))
    assert not rec._singular(x @ x.T + 0.1 * np.eye(6))


def test_nan_residuals_are_allowed(case):
    agg, fit = case["agg"], case["fitted"].copy()
    fit[3, :6] = np.nan  # a series without fitted values early on
    r = rec.reconcile(case["base"], agg.S, agg.tags, "mint_shrink", case["insample"], fit)
    assert r.method_used == "mint_shrink" and _incoherence(agg.S, r.mean) < 1e-6


def test_bad_settings_and_inputs(case):
    agg, base = case["agg"], case["base"]
    with pytest.raises(ValueError, match="reconcile.method = 'middle_out' is not one of "
                                         "bottom_up, top_down_forecast_proportions"):
        rec.reconcile(base, agg.S, agg.tags, "middle_out")
    with pytest.raises(ValueError, match="mint_shrink needs in-sample actuals and fitted"):
        rec.reconcile(base, agg.S, agg.tags)
    with pytest.raises(ValueError, match=r"expected \[15, h\]"):
        rec.reconcile(base[1:], agg.S, agg.tags, "bottom_up")
    no_total = aggregate(case["df"], parse([["region"], ["region", "store"]]))
    with pytest.raises(ConfigError, match="needs the grand total level"):
        rec.reconcile(base[1:], no_total.S, no_total.tags, "top_down_forecast_proportions")
