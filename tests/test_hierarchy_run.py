"""`data.hierarchy` in the run (issue #30): the aggregated series in the arrays, every level
forecast and reconciled, the aggregates written to their own partitions, coherent with the
bottom's forecast, and the backtest scored per level."""
import glob
import os
from pathlib import Path
from types import SimpleNamespace

import mlflow
import numpy as np
import polars as pl
import pytest

from pipeline import config as C
from pipeline.data.series import SeriesArrays
from pipeline.errors import DataError
from pipeline.forecasting.backtest import Block
from pipeline.stages import reconciled as R
from pipeline.stages.levels import LEVEL, extend
from tests.test_run import SCHEMA, run

HIER = ["--set", "data.hierarchy=[[], [store]]", "--set", "ray.enabled=false"]


def _arrays():
    """Three series on an hourly grid, two in store a (one starting later, one with a masked
    step), one in store b."""
    a = SeriesArrays.from_list([[1, 2, 3, 4], [10, 20], [5, 5, 5]], ids=["x", "y", "z"],
                               start=[0, 2 * 3600 * 10**9, 0],
                               mask=[[1, 1, 1, 1], [1, 0], [1, 1, 1]])
    a.groups = np.array(["a", "a", "b"], dtype=object)
    a.static = {"size": np.array([1.0, 3.0, 5.0])}
    return a


def test_extend_appends_each_level_as_the_sum_of_its_children():
    cfg = C.load(None, ["data.group_col=store", "data.hierarchy=[[], [store]]",
                        "windows.lookback=1", "windows.horizon=1"])
    arrays, levels = extend(_arrays(), cfg)
    assert arrays.ids.tolist() == ["x", "y", "z", "total", "store=a", "store=b"]
    assert arrays.series(4).tolist() == [1, 2, 13, 24]        # x + y where y exists
    assert arrays.mask[arrays.indptr[4]:arrays.indptr[5]].tolist() == [1, 1, 1, 0]
    assert arrays.series(3).tolist() == [6, 7, 18, 24]
    assert arrays.groups[3:].tolist() == ["total", "a", "b"]
    assert arrays.static[LEVEL].tolist() == ["unique_id"] * 3 + ["total", "store", "store"]
    assert arrays.static["size"][3:].tolist() == [3.0, 2.0, 5.0]   # the children's mean
    assert levels.S.shape == (6, 3) and list(levels.tags) == ["total", "store", "unique_id"]
    assert levels.rows.tolist() == [3, 4, 5, 0, 1, 2]


def test_extend_refuses_a_child_under_two_parents():
    cfg = C.load(None, ["data.group_col=store", "data.static_cols=[region]",
                        "data.hierarchy=[[region], [region, store]]"])
    arrays = _arrays()
    arrays.static = {"region": np.array(["N", "S", "N"], dtype=object)}
    with pytest.raises(DataError, match="store='a' is under two parents, region='N' "
                                        r"\(series 'x'\) and region='S' \(series 'y'\)"):
        extend(arrays, cfg)


def _read(out, kind):
    files = glob.glob(os.path.join(out, kind, "**", "*.parquet"), recursive=True)
    return pl.read_parquet(files, hive_partitioning=False)


@pytest.mark.parametrize("intervals", ["normality", "quantiles"])
def test_run_reconciles_every_level_and_scores_them(demo_dir, tmp_path, capsys, intervals):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    b = run("configs/demo.yaml", demo_dir, tmp_path, *HIER, "--set",
            "evaluate.intervals=conformal",            # quantile columns, reconciled too
            "--set", f"reconcile.intervals={intervals}",
            "--set", "evaluate.chunk_series=7",        # written in chunks
            "--set", "tracking.enabled=true", "--set", f"tracking.uri={uri}")
    printed = capsys.readouterr().out
    assert "reconciled   every level with mint_shrink" in printed and "level=total" in printed
    assert b.cfg.output.clip_at_zero is True          # the demo is >= 0: the clipped case
    bottom, levels, values = _coherent(demo_dir, tmp_path, intervals == "quantiles")
    assert [c for c in bottom.columns if not c.startswith("q_")] == SCHEMA   # today's
    assert (bottom["y_hat"] >= 0).all() and len(values) == 5
    if intervals == "normality":
        _normal_quantiles(pl.concat([bottom.select(values), levels.select(values)]), values[1:])
    scores = _read(tmp_path, "level_metrics")
    assert set(zip(scores["level"], scores["forecast"], strict=True)) == {
        (lv, f) for lv in ("total", "store", "unique_id") for f in ("base", "reconciled")}
    assert scores["mase"].is_finite().all() and scores["wape"].is_finite().all()
    info = b.outcome.forecast.coherence
    assert info.method == "mint_shrink" and info.method_used in ("mint_shrink", "wls_struct")
    page = Path(b.outcome.report).read_text(encoding="utf-8")
    assert "Levels: base and reconciled" in page and "<td>total</td>" in page
    logged = mlflow.MlflowClient(tracking_uri=uri).get_run(b.log.parent_id).data
    assert logged.params["reconcile.method"] == "auto"
    assert logged.params["reconcile.intervals"] == intervals
    assert logged.params["data.hierarchy"].replace(" ", "") == "[[],['store']]"
    assert logged.tags["reconcile_method_used"] == info.method_used
    assert {"level_total_base_mase", "level_total_reconciled_mase",
            "level_store_reconciled_wape"} <= set(logged.metrics)


def _coherent(demo_dir, out, quantiles: bool = False):
    """The bottom forecasts and the levels' (`out`'s `forecasts/` and `forecast_levels/`),
    read back: every store and the total the sum of their children at every step (and with
    `quantiles`, at every quantile); also the value columns."""
    bottom = _read(out, "forecasts")
    assert bottom["unique_id"].n_unique() == 40
    levels = pl.read_parquet(str(out / "forecast_levels" / "**" / "*.parquet"),
                             hive_partitioning=True)       # the levels open as one dataset
    assert sorted(levels["level"].unique()) == ["store", "total"]
    assert levels.height == 5 * 24 and levels.columns[:3] == ["unique_id", "store", "ds"]
    stores = pl.read_parquet(glob.glob(f"{demo_dir}/**/*.parquet", recursive=True),
                             hive_partitioning=True).select("unique_id", "store").unique()
    values = ["y_hat", *(c for c in bottom.columns if c.startswith("q_"))]
    sums = [pl.col(c).cast(pl.Float64).sum().alias(f"sum{c}") for c in values]
    by_store = bottom.join(stores, on="unique_id").group_by("store", "ds").agg(sums)
    total = bottom.group_by("ds").agg(sums)
    for level, summed, on in (("store", by_store, ["store", "ds"]), ("total", total, ["ds"])):
        got = levels.filter(pl.col("level") == level).join(summed, on=on, how="inner")
        assert got.height == levels.filter(pl.col("level") == level).height
        # quantiles: every step and every quantile coherent; normality: the mean coherent
        for c in values if quantiles else values[:1]:
            np.testing.assert_allclose(got[c], got[f"sum{c}"], rtol=1e-5, atol=1e-3)
    return bottom, levels, values


def _normal_quantiles(rows: pl.DataFrame, qcols: list[str]) -> None:
    """Quantiles of the reconciled Gaussian: in order at every row, and where a symmetric pair
    was not clipped (its low quantile > 0) centred on the mean (the median is the mean)."""
    qcols = sorted(qcols, key=lambda c: float(c[2:]))
    q = rows.select(qcols).to_numpy().astype(np.float64)
    assert (np.diff(q, axis=1) >= -1e-4).all()
    y_hat = rows["y_hat"].to_numpy().astype(np.float64)
    for lo in range(len(qcols) // 2):
        hi = len(qcols) - 1 - lo
        assert float(qcols[lo][2:]) == pytest.approx(1 - float(qcols[hi][2:]))
        free = q[:, lo] > 1e-3      # the demo's intervals are wide: few such rows
        np.testing.assert_allclose((q[free, lo] + q[free, hi]) / 2, y_hat[free], rtol=1e-4,
                                   atol=1e-2)


def test_run_names_the_series_of_a_bad_hierarchy(demo_dir, tmp_path, capsys):
    with pytest.raises(AssertionError):   # the run fails: `run` asserts exit code 0
        run("configs/demo.yaml", demo_dir, tmp_path, "--set", "ray.enabled=false", "--set",
            "data.hierarchy=[[category], [category, store]]")
    err = capsys.readouterr().err
    assert "is under two parents" in err and "Traceback" not in err, err


def _extended(*sets):
    cfg = C.load(None, ["data.group_col=store", "data.hierarchy=[[], [store]]",
                        "windows.lookback=1", "windows.horizon=1", "windows.n_windows=3",
                        "evaluate.season=1", *sets])
    arrays, levels = extend(_arrays(), cfg)
    return cfg, SimpleNamespace(arrays=arrays, levels=levels)


def test_backtest_slots_take_the_published_blocks_else_in_sample_seasonal_naive():
    cfg, data = _extended()
    blocks = [Block(0, "net", np.array([0]), np.array([[4.0]]), np.array([[3.5]]),
                    np.array([[1.0]])),
              Block(0, "naive", np.array([0]), np.array([[4.0]]), np.array([[9.0]]),
                    np.array([[1.0]]))]
    slots = R.backtest_slots(data.arrays, cfg, blocks, {"x": "net"})
    assert slots["y_hat"][0, 0, 0] == 3.5                  # x's published block at cutoff 0
    assert slots["y_hat"][0, 1:, 0].tolist() == [2, 1]     # elsewhere y[t - 1] (t = 2, 1)
    y = 1                                                  # y: two steps, the second masked
    assert slots["y"][y, :, 0].tolist() == [20, 10, 0]     # before its first step: 0 ...
    assert slots["mask"][y, :, 0].tolist() == [0, 1, 0]    # ... and masked out


@pytest.mark.parametrize("clip", [True, False])
def test_reconciled_forecast_is_coherent_and_clipped_bottom_up(clip):
    cfg, data = _extended(f"output.clip_at_zero={str(clip).lower()}",
                          "reconcile.method=ols", "reconcile.intervals=quantiles")
    ids = data.arrays.ids.astype(str)
    base = np.array([-5.0, 20, 5, 40, 10, 5])             # x, y, z, total, store=a, store=b
    cols = {"unique_id": ids, "y_hat": base.astype(np.float32),
            "q_0.9": (base + 1).astype(np.float32), "model": np.full(6, "net", object)}
    out, info = R.reconcile_forecast(data, cols, cfg, None)
    rec = dict(zip(ids, out["y_hat"].tolist(), strict=True))
    assert info.method_used == "ols" and (rec["x"] >= 0) == clip and info.note is None
    for key in ("y_hat", "q_0.9"):
        v = dict(zip(ids, out[key].astype(np.float64).tolist(), strict=True))
        assert v["store=a"] == pytest.approx(v["x"] + v["y"], rel=1e-6)
        assert v["total"] == pytest.approx(v["store=a"] + v["store=b"], rel=1e-6)


@pytest.mark.parametrize("clip", [True, False])
def test_normality_quantiles_in_order_centred_on_the_mean_clipped_after(clip):
    cfg, data = _extended(f"output.clip_at_zero={str(clip).lower()}", "reconcile.method=ols")
    assert cfg.reconcile.intervals == "normality"          # the default
    ids = data.arrays.ids.astype(str)
    base = np.array([-5.0, 20, 5, 40, 10, 5])             # x, y, z, total, store=a, store=b
    cols = {"unique_id": ids, "y_hat": base.astype(np.float32),
            "q_0.1": (base - 3).astype(np.float32), "q_0.5": base.astype(np.float32),
            "q_0.9": (base + 3).astype(np.float32), "model": np.full(6, "net", object)}
    out, info = R.reconcile_forecast(data, cols, cfg, None)
    assert info.method_used == "ols" and info.note is None
    v = {k: dict(zip(ids, out[k].astype(np.float64).tolist(), strict=True))
         for k in ("y_hat", "q_0.1", "q_0.5", "q_0.9")}
    assert v["y_hat"]["store=a"] == pytest.approx(v["y_hat"]["x"] + v["y_hat"]["y"], rel=1e-6)
    assert v["y_hat"]["total"] == pytest.approx(v["y_hat"]["store=a"] + v["y_hat"]["store=b"],
                                                rel=1e-6)
    for i in ids:
        assert v["q_0.1"][i] <= v["q_0.5"][i] <= v["q_0.9"][i]
        assert (v["q_0.1"][i] >= 0) or not clip
        if v["q_0.1"][i] > 0 and i in ("y", "z"):       # not clipped: median = mean
            assert v["q_0.5"][i] == pytest.approx(v["y_hat"][i], rel=1e-5)
    assert v["q_0.9"]["total"] < v["q_0.9"]["store=a"] + v["q_0.9"]["store=b"]   # not summed
    if not clip:
        for i in ids:
            assert v["q_0.5"][i] == pytest.approx(v["y_hat"][i], rel=1e-5, abs=1e-4)


def test_a_series_without_a_forecast_keeps_nan_and_adds_nothing_to_its_parents():
    cfg, data = _extended("output.clip_at_zero=false", "reconcile.method=bottom_up")
    ids = data.arrays.ids.astype(str)
    base = np.array([np.nan, 20, 5, 40, 10, 5], np.float32)
    cols = {"unique_id": ids, "y_hat": base, "model": np.full(6, "net", object)}
    out, info = R.reconcile_forecast(data, cols, cfg, None)
    assert np.isnan(out["y_hat"][0]) and out["y_hat"][1:].tolist() == [20, 5, 25, 20, 5]
    assert "1 series without a finite forecast counted as 0" in info.note


def test_three_levels_append_in_order_and_reconcile_coherently():
    a = SeriesArrays.from_list([[1, 2], [3, 4], [5, 6], [7, 8]], ids=["w", "x", "y", "z"])
    a.groups = np.array(["b", "a", "c", "a"], dtype=object)
    a.static = {"region": np.array(["N", "N", "S", "N"], dtype=object)}
    cfg = C.load(None, ["data.group_col=store", "data.static_cols=[region]",
                        "data.hierarchy=[[], [region], [region, store]]", "windows.lookback=1",
                        "windows.horizon=1", "output.clip_at_zero=false",
                        "reconcile.method=wls_struct"])
    arrays, levels = extend(a, cfg)
    assert arrays.ids[4:].tolist() == ["total", "region=N", "region=S", "region=N/store=a",
                                       "region=N/store=b", "region=S/store=c"]
    assert [arrays.series(s).tolist() for s in (4, 5, 7, 8)] == [[16, 20], [11, 14], [10, 12],
                                                                 [1, 2]]
    assert arrays.static[LEVEL][4:].tolist() == ["total", "region", "region", "region/store",
                                                 "region/store", "region/store"]
    rng = np.random.default_rng(0)
    cols = {"unique_id": arrays.ids.astype(str), "y_hat": rng.random(10).astype(np.float32),
            "model": np.full(10, "net", object)}
    out, _ = R.reconcile_forecast(SimpleNamespace(arrays=arrays, levels=levels), cols, cfg,
                                  None)
    v = dict(zip(arrays.ids.astype(str), out["y_hat"].astype(np.float64), strict=True))
    assert v["region=N/store=a"] == pytest.approx(v["x"] + v["z"], rel=1e-6)
    assert v["region=N"] == pytest.approx(v["region=N/store=a"] + v["region=N/store=b"],
                                          rel=1e-6)
    assert v["total"] == pytest.approx(v["region=N"] + v["region=S"], rel=1e-6)


def _windows(cfg, data, K, h=1):
    """Backtest slots of every series in the arrays: actuals and base forecasts, `[n, K, h]`."""
    rng = np.random.default_rng(1)
    n = len(data.arrays)
    return {"y": rng.random((n, K, h)) * 10, "y_hat": rng.random((n, K, h)) * 10,
            "mask": np.ones((n, K, h))}


def test_a_cutoff_is_reconciled_without_its_own_window_residuals():
    cfg, data = _extended("reconcile.method=wls_var")               # three cutoffs, step 1
    slots = _windows(cfg, data, 3)
    before = R.reconciled_windows(data, cfg, slots, "wls_var")[0]
    poisoned = {k: v.copy() for k, v in slots.items()}
    poisoned["y"][:, 1] += np.arange(len(data.arrays))[:, None] * 100    # cutoff 1's errors
    after = R.reconciled_windows(data, cfg, poisoned, "wls_var")[0]
    np.testing.assert_array_equal(after[:, 1], before[:, 1])     # its own: not used
    for k in (0, 2):                                              # the others': used
        assert not np.allclose(after[:, k], before[:, k])
    scores = [R.level_metrics(data, cfg, s, "wls_var").filter(pl.col("forecast") ==
                                                                "reconciled")
              for s in (slots, poisoned)]
    assert scores[0]["mase"].to_list() != scores[1]["mase"].to_list()
    fell_back = R.level_metrics(data, cfg, slots, "mint_cov")   # 2 residuals, 6 series
    assert fell_back["method"].unique().to_list() == ["wls_struct"]          # said so


def test_overlapping_cutoffs_leave_out_every_step_of_the_scored_window():
    cfg = C.load(None, ["windows.horizon=3", "windows.n_windows=3", "windows.step=1"])
    keep = R.held_out(cfg, 1).reshape(3, 3)           # cutoff, step; cutoff 1: steps 1..3 back
    assert keep.tolist() == [[False, False, True], [False, False, False],
                             [True, False, False]]


def test_one_window_is_reconciled_with_seasonal_naive_residuals_before_it():
    rng = np.random.default_rng(2)
    a = SeriesArrays.from_list([rng.random(12) * 10 for _ in range(3)], ids=["x", "y", "z"])
    a.groups = np.array(["a", "a", "b"], dtype=object)
    cfg = C.load(None, ["data.group_col=store", "data.hierarchy=[[], [store]]",
                        "windows.lookback=1", "windows.horizon=3", "windows.n_windows=1",
                        "evaluate.season=1"])
    arrays, levels = extend(a, cfg)
    data = SimpleNamespace(arrays=arrays, levels=levels)
    slots = _windows(cfg, data, 1, 3)
    before = R.reconciled_windows(data, cfg, slots, "wls_var")[0]
    poisoned = {k: v.copy() for k, v in slots.items()}
    poisoned["y"] *= 100                                   # the window's own errors: unused
    np.testing.assert_array_equal(R.reconciled_windows(data, cfg, poisoned, "wls_var")[0], before)
    arrays.values[arrays.indptr[0] + 7] += 50       # x's step 7, before its window (9..11)
    assert not np.allclose(R.reconciled_windows(data, cfg, slots, "wls_var")[0], before)


def test_demo_data_nests_stores_in_regions(tmp_path):
    from pipeline.data.demo import make_demo_data
    make_demo_data(str(tmp_path), n_series=60, n_groups=30, n_regions=4)
    df = pl.read_parquet(str(tmp_path / "**" / "*.parquet"), hive_partitioning=True)
    pairs = df.select("store", "region").unique()
    assert pairs.height == 30 and pairs["store"].n_unique() == 30      # one region a store
    assert sorted(pairs["region"].unique()) == [f"region_{r}" for r in range(4)]
    assert "store_000" in pairs["store"].to_list()


def test_backtest_flow_scores_every_level_without_a_forecast(demo_dir, tmp_path, capsys):
    from pipeline.cli import execute
    from tests.test_run import FAST
    b = execute(["backtest", "--config", "configs/demo.yaml", "--set", f"data.path={demo_dir}",
                 "--set", f"output.path={tmp_path}", *FAST, *HIER])
    assert b.exit_code == 0 and b.outcome.forecast is None
    assert "levels       backtest per level, reconciled with" in capsys.readouterr().out
    files = glob.glob(str(tmp_path / "level_metrics" / "**" / "*.parquet"), recursive=True)
    assert len(files) == 1 and "flow=backtest" in files[0]
    scores = pl.read_parquet(files, hive_partitioning=False)
    assert set(zip(scores["level"], scores["forecast"], strict=True)) == {
        (lv, f) for lv in ("total", "store", "unique_id") for f in ("base", "reconciled")}
    assert scores["mase"].is_finite().all()
    assert b.outcome.levels.level_metrics.equals(scores.select(b.outcome.levels.level_metrics
                                                               .columns))
    assert "Levels: base and reconciled" in Path(b.outcome.report).read_text(encoding="utf-8")
    assert not (tmp_path / "forecasts").exists() and not (tmp_path / "forecast_levels").exists()


@pytest.mark.slow
def test_the_backtest_selection_picks_per_level(demo_dir, tmp_path):
    """evaluate.select: auto under a hierarchy: each level (here with the group: the total
    and each store are their own groups) publishes the candidate with its lowest backtest
    MASE, read back from the metrics output; the aggregates' base forecasts come from it
    (their `model` column), and the level scores say which it was."""
    b = run("configs/demo.yaml", demo_dir, tmp_path, *HIER, "--set",
            "evaluate.comparators=[auto_theta]")
    chosen = {k: c.model for k, c in b.outcome.scored.selection.items()}
    level_of = dict(zip(b.outcome.data.arrays.ids.astype(str),
                        b.outcome.data.arrays.static[LEVEL], strict=True))
    metrics = _read(tmp_path, "metrics").with_columns(
        level=pl.col("unique_id").replace_strict(level_of))
    best = (metrics.filter(pl.col("model").is_in(["gru_direct", "auto_theta"]))
            .group_by("level", "group", "model").agg(pl.col("mase").mean())
            .sort("mase", "model").group_by("level", "group", maintain_order=True).first())
    want = {(lv if g == "" else f"{lv}:{g}"): m for lv, g, m in
            best.select("level", "group", "model").iter_rows()}
    assert chosen == want and {"total:total", "store:store_A", "unique_id:store_A"} <= set(want)
    levels = pl.read_parquet(str(tmp_path / "forecast_levels" / "**" / "*.parquet"),
                             hive_partitioning=True)
    total = levels.filter(pl.col("level") == "total")
    assert total["model"].unique().to_list() == [want["total:total"]]
    scores = _read(tmp_path, "level_metrics").filter(pl.col("forecast") == "base")
    published = dict(scores.select("level", "published").iter_rows())
    assert published["total"] == want["total:total"]
    by_store = {want[f"store:store_{s}"] for s in "ABCD"}
    assert all(m in published["store"] for m in by_store)
    assert (published["store"] in by_store) == (len(by_store) == 1)   # else "m (k), …"
    assert _coherent(demo_dir, tmp_path)[1].height == 5 * 24


@pytest.mark.slow
def test_nightly_and_forecast_flows_reconcile_with_a_hierarchy(demo_dir, tmp_path, monkeypatch):
    """The nightly flow promotes per group (the total is one) and forecasts and reconciles
    with the champions; the forecast flow (no backtest: in-sample residuals) reconciles too;
    the reconciliation's settings are in the logged config."""
    from flows import forecast as forecast_flow
    from flows import nightly
    from tests.test_flows import batch
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    hier = ("--set", "data.hierarchy=[[], [store]]", "--set", "reconcile.method=ols")
    night = batch(nightly, demo_dir, tmp_path / "n", *hier)
    assert night.exit_code == 0
    assert sorted(d.group for d in night.outcome.decisions) == [
        "store_A", "store_B", "store_C", "store_D", "total"]
    assert night.outcome.forecast.note.startswith("champions ")
    assert night.outcome.forecast.coherence.method_used == "ols"
    scores = _read(tmp_path / "n", "level_metrics")
    assert scores["level"].unique().sort().to_list() == ["store", "total", "unique_id"]
    _coherent(demo_dir, tmp_path / "n")
    logged = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'n' / 'mlflow.db'}"
                                 ).get_run(night.log.parent_id).data
    assert logged.params["reconcile.method"] == "ols"
    made = batch(forecast_flow, demo_dir, tmp_path / "f", *hier)
    assert made.exit_code == 0 and made.outcome.forecast.coherence.method_used == "ols"
    _coherent(demo_dir, tmp_path / "f")
