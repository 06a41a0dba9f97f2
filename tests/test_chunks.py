"""What keeps a large job's memory bounded gives the same outputs: the backtest's blocks
converted to Arrow one by one equal the table of all of them at once, the rows kept for the
plots are those series' rows, and make-demo-data written row group by row group is the same
data."""
from __future__ import annotations

import copy

import numpy as np
import pyarrow.dataset as ds
import pytest
from test_train import sines

from pipeline import config as C
from pipeline import output
from pipeline.backtest import backtest, concat_columns, drawn_series
from pipeline.data.demo import make_demo_data
from pipeline.jobs import plan_jobs, run_jobs_locally

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

    from pipeline.cli import execute
    from pipeline.data.demo import make_demo_data as demo
    data = demo(str(tmp_path / "data"), n_series=14, seed=2)["path"]
    out = {}
    for chunk in ("2", "null"):
        b = execute(["backtest", "--config", "configs/demo.yaml", "--set", f"data.path={data}",
                     "--set", f"output.path={tmp_path / chunk}", "--set", "ray.enabled=false",
                     "--set", "tracking.enabled=false", "--set", "train.epochs=1",
                     "--set", "train.steps_per_epoch=2", "--set", "windows.lookback=72",
                     "--set", "evaluate.plots=1", "--set", f"evaluate.chunk_series={chunk}",
                     "--set", "evaluate.comparators=[auto_theta]"])
        assert b.exit_code == 0
        files = {kind: next((tmp_path / chunk / kind).rglob("*.parquet"))
                 for kind in ("backtest", "metrics")}
        out[chunk] = (b.results["backtest"], {
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
