"""What keeps a large job's memory bounded gives the same outputs: the backtest's blocks
converted to Arrow one by one equal the table of all of them at once, the rows kept for the
plots are those series' rows, and make-demo-data written row group by row group is the same
data."""
from __future__ import annotations

import copy
import os

import numpy as np
import pyarrow.dataset as ds
import pytest
from conftest import sines

from pipeline import config as C
from pipeline.data.demo import make_demo_data
from pipeline.forecasting.backtest import backtest, concat_columns, drawn_series
from pipeline.outputs import partitions as output
from pipeline.training.jobs import run_jobs_locally
from pipeline.training.plan import plan_jobs

CFG = ["windows.lookback=48", "windows.horizon=12", "windows.n_windows=2", "train.epochs=1",
       "train.steps_per_epoch=2", "model.encoder.hidden_size=8", "model.season=24",
       "evaluate.comparators=[]", "model.loss=quantile", "model.quantiles=[0.1, 0.5, 0.9]"]


@pytest.fixture(scope="module")
def scored():
    arrays = sines(9, length=200, groups=["a", "b", "c"])
    cfg = C.load(None, CFG)
    jobs = plan_jobs(arrays, cfg)
    models = {r.name: r.model() for r in run_jobs_locally(arrays, jobs, cfg)}
    return arrays, backtest(arrays, jobs, models, cfg)


def test_blocks_converted_one_by_one_equal_the_whole_table(scored):
    arrays, bt = scored
    frames = copy.deepcopy(bt.frames)
    assert {"q_0.1"} <= set(frames[0]) and "q_0.1" not in frames[-1]   # baselines lack them
    whole = output.to_table(concat_columns(frames), "run", arrays.freq)
    chunked = output.frames_table(frames, "run", arrays.freq)
    assert frames == []                                       # consumed as converted
    assert chunked.schema == whole.schema
    for name in whole.column_names[:-1]:                      # created_at: when it ran
        a = chunked[name].to_numpy(zero_copy_only=False)
        b = whole[name].to_numpy(zero_copy_only=False)
        if a.dtype.kind == "f":
            np.testing.assert_array_equal(a, b)               # NaN where a block lacks it
        else:
            assert (a == b).all(), name
    assert chunked.num_rows == sum(len(f["y_hat"]) for f in bt.frames)


def test_the_rows_kept_for_drawing_are_those_series_rows(scored):
    arrays, bt = scored
    keep = drawn_series(arrays, 1)                           # the first 4 series by id
    assert sorted(arrays.ids[keep].astype(str)) == sorted(arrays.ids.astype(str))[:4]
    drawn = bt.drawn(keep)
    every = concat_columns(bt.frames)
    rows = np.isin(every["unique_id"].astype(str), arrays.ids[keep].astype(str))
    assert rows.sum() == len(drawn["y_hat"]) > 0
    for k in every:
        np.testing.assert_array_equal(drawn[k], every[k][rows])
    assert drawn["unique_id"].dtype == object                # one string per series, shared


def test_a_chunked_backtest_makes_its_zero_history_once(monkeypatch):
    """output.clip_at_zero: the prefix counts that find the all-zero histories are made once
    for a chunked backtest, not once per chunk, and its chunks are clipped as the one-call
    backtest clips (the all-zero series forecast 0)."""
    import pipeline.forecasting.backtest as B
    arrays = sines(9, length=200)
    arrays.values[arrays.indptr[4]:arrays.indptr[5]] = 0.0          # an all-zero history
    cfg = C.load(None, [*CFG, "output.clip_at_zero=true", "evaluate.chunk_series=2"])
    made = []

    class Counted(B.ZeroHistory):
        def __init__(self, arrays):
            made.append(arrays)
            super().__init__(arrays)
    monkeypatch.setattr(B, "ZeroHistory", Counted)
    jobs = plan_jobs(arrays, cfg)
    run = B.Chunked(arrays, jobs, {}, cfg, lambda frames: frames, drawn_series(arrays, 1))
    assert len(list(run)) == 5 and len(made) == 1                   # 5 chunks, one made
    whole = B.backtest(arrays, jobs, {}, cfg)                       # one call: its own
    assert len(made) == 2
    assert whole.zero is not None and whole.zero is not made[0]
    for k, model in {(b.k, b.model) for b in whole.blocks}:
        (one,) = [b for b in whole.blocks if (b.k, b.model) == (k, model)]
        parts = [b for b in run.scores.blocks if (b.k, b.model) == (k, model)]
        np.testing.assert_array_equal(np.concatenate([b.series for b in parts]), one.series)
        np.testing.assert_array_equal(np.concatenate([b.y_hat for b in parts]), one.y_hat)
        assert (one.y_hat[one.series == 4] == 0).all() and (one.y_hat >= 0).all()


def test_make_demo_data_in_row_groups_writes_the_same_rows(tmp_path):
    a = make_demo_data(str(tmp_path / "a"), n_series=30, seed=4)
    b = make_demo_data(str(tmp_path / "b"), n_series=30, seed=4, flush_rows=3000)
    ta = ds.dataset(a["path"], partitioning="hive").to_table()
    tb = ds.dataset(b["path"], partitioning="hive").to_table()
    assert a["rows"] == b["rows"] == ta.num_rows
    for name in ta.column_names:
        x, y = ta[name].to_numpy(zero_copy_only=False), tb[name].to_numpy(zero_copy_only=False)
        if x.dtype.kind == "f":
            np.testing.assert_array_equal(x, y)              # NaN where the defects are
        else:
            assert (x == y).all(), name
    assert not list((tmp_path / "b").rglob(".tmp-*"))        # nothing half-written left


def test_a_backtest_in_chunks_of_series_writes_what_one_chunk_writes(tmp_path):
    """evaluate.chunk_series = 2 (five chunks of nine series, streamed into one partition file)
    against null (all at once): the same rows in the backtest and metrics outputs, the same
    summary, the same rows kept for drawing."""
    import polars as pl

    out = {}
    for chunk in ("2", "null"):
        b = small_run(tmp_path, "backtest", "configs/demo.yaml", "evaluate.plots=1",
                      f"evaluate.chunk_series={chunk}", "evaluate.comparators=[auto_theta]")
        files = {kind: next((tmp_path / chunk / kind).rglob("*.parquet"))
                 for kind in ("backtest", "metrics")}
        out[chunk] = (b.outcome.scored, {
            k: pl.read_parquet(f).drop("run_id", "created_at", strict=False)
                 .sort("unique_id", "model", "cutoff", *(["step"] if k == "backtest" else []))
            for k, f in files.items()})
    (a, fa), (w, fw) = out["2"], out["null"]
    for kind in ("backtest", "metrics"):
        x, y = fa[kind], fw[kind]
        assert x.schema == y.schema and x.height == y.height, kind
        for name in x.columns:
            if x[name].dtype.is_float():
                # the network's forward on batches of 2 series or of 14 rounds differently
                np.testing.assert_allclose(x[name].to_numpy(), y[name].to_numpy(),
                                           rtol=1e-5, atol=1e-6, err_msg=f"{kind}.{name}")
            else:
                assert x[name].equals(y[name]), f"{kind}.{name}"
        others = pl.col("model") != "gru_direct"      # baselines, comparator: exactly
        assert x.filter(others).equals(y.filter(others), null_equal=True), kind
    assert fa["backtest"]["model"].unique().sort().to_list() == \
        ["auto_theta", "gru_direct", "naive", "seasonal_naive"]
    for model, row in w.summary.items():
        assert a.summary[model] == pytest.approx(row, rel=1e-5, nan_ok=True)
    assert set(a.predictions["unique_id"]) == set(w.predictions["unique_id"])


def test_a_stream_that_fails_midway_leaves_the_old_partition_whole(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.data.io import replace_partition, replace_partition_stream
    uri = str(tmp_path / "kind" / "job=x")
    replace_partition(pa.table({"a": [1, 2, 3]}), uri)

    def tables():
        yield pa.table({"a": [10]})
        raise RuntimeError("chunk 2 failed")
    with pytest.raises(RuntimeError, match="chunk 2"):
        replace_partition_stream(tables(), uri)
    assert pq.read_table(uri).column("a").to_pylist() == [1, 2, 3]
    assert [p.name for p in (tmp_path / "kind" / "job=x").iterdir()] == ["part-0.parquet"]
    replace_partition_stream(iter([pa.table({"a": [4]}), pa.table({"a": [5, 6]})]), uri)
    assert pq.read_table(uri).column("a").to_pylist() == [4, 5, 6]
    assert pq.ParquetFile(f"{uri}/part-0.parquet").num_row_groups == 2


def test_a_forecast_in_chunks_of_series_writes_what_one_chunk_writes(tmp_path):
    """evaluate.chunk_series = 3 against null on the `run` command with one model per group,
    conformal intervals and fallback series: the forecast partition holds the same
    rows and columns (streamed chunk by chunk into one file), the same counts, the same
    series drawn; the fallback rows exactly, the networks' to float32
    rounding (their forward on batches of 3 or of 14 series rounds differently)."""
    import polars as pl

    out = {}
    for chunk in ("3", "null"):
        b = small_run(tmp_path, "run", "configs/per_group.yaml", "evaluate.intervals=conformal",
                      "evaluate.plots=2", f"evaluate.chunk_series={chunk}",
                      "evaluate.comparators=[]")
        (part,) = (tmp_path / chunk / "forecasts").rglob("*.parquet")
        if chunk == "3":
            assert pq_row_groups(part) == 5                  # 14 series in chunks of 3
        out[chunk] = (b.outcome.forecast, pl.read_parquet(part).drop("run_id", "created_at")
                      .sort("unique_id", "step"))
    (a, x), (w, y) = out["3"], out["null"]
    assert x.columns == y.columns == ["unique_id", "ds", "cutoff", "step", "y_hat", "q_0.025",
                                      "q_0.1", "q_0.9", "q_0.975", "model", "group"]
    assert x.schema == y.schema and x.height == y.height == 14 * 24
    for name in x.columns:
        if x[name].dtype.is_float():
            np.testing.assert_allclose(x[name].to_numpy(), y[name].to_numpy(), rtol=1e-5,
                                       atol=1e-5, err_msg=name)
        else:
            assert x[name].equals(y[name]), name
    fallback = pl.col("model").str.starts_with("fallback:")
    assert x.filter(fallback).height > 0 and x.filter(fallback).equals(y.filter(fallback))
    assert (a.n_series, a.n_fallback) == (w.n_series, w.n_fallback) == \
        (14, x.filter(fallback)["unique_id"].n_unique())
    assert [os.path.basename(p) for p in a.plots] == [os.path.basename(p) for p in w.plots]
    assert sorted(set(a.cols["unique_id"])) == sorted(set(w.cols["unique_id"]))


def pq_row_groups(path) -> int:
    import pyarrow.parquet as pq
    return pq.ParquetFile(path).num_row_groups


def small_run(tmp_path, command: str, config: str, *sets: str):
    """`command` on 14 demo series (made once per test), one short epoch, no Ray or tracking,
    outputs under tmp_path/<evaluate.chunk_series>; the finished batch (exit code 0)."""
    from pipeline.cli import execute
    from pipeline.data.demo import make_demo_data
    data = tmp_path / "data"
    if not data.exists():
        make_demo_data(str(data), n_series=14, seed=2)
    chunk = next(s for s in sets if s.startswith("evaluate.chunk_series=")).split("=")[1]
    fixed = [f"data.path={data}", f"output.path={tmp_path / chunk}", "ray.enabled=false",
             "tracking.enabled=false", "train.epochs=1", "train.steps_per_epoch=2",
             "windows.lookback=72"]
    b = execute([command, "--config", config, *sum((["--set", x] for x in [*fixed, *sets]),
                                                    [])])
    assert b.exit_code == 0
    return b
