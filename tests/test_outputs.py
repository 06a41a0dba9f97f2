"""The output folders open as one dataset in every common reader, partition keys as columns
(pandas, pyarrow.dataset, Polars, DuckDB), and a challenger's backtest never replaces what
`run` published."""
from __future__ import annotations

import glob
import os

import pandas as pd
import polars as pl
import pyarrow.dataset as pads
import pytest

from flows import _common, backtest
from pipeline.cli import execute

duckdb = pytest.importorskip("duckdb")
FAST = ["--set", "train.epochs=1", "--set", "train.steps_per_epoch=2", "--set",
        "windows.lookback=72", "--set", "model.encoder.hidden_size=8", "--set",
        "evaluate.plots=0", "--set", "ray.enabled=false", "--set", "tracking.enabled=false",
        "--set", "evaluate.comparators=[]"]
KINDS = {"forecasts": ["job", "data_end"], "backtest": ["job", "flow", "data_end"],
         "metrics": ["job", "flow", "data_end"]}


@pytest.fixture(scope="module")
def outputs(demo_dir, tmp_path_factory):
    """`run`, then the backtest flow over the same data: two flows' evaluations side by
    side."""
    out = tmp_path_factory.mktemp("outputs")
    base = ["--config", "configs/demo.yaml", "--set", f"data.path={demo_dir}", "--set",
            f"output.path={out}", *FAST]
    b = execute(["run", *base])
    assert b.exit_code == 0
    published = {f: os.path.getmtime(f) for k in ("backtest", "metrics")
                 for f in glob.glob(f"{out}/{k}/job=demo/flow=run/*/part-0.parquet")}
    args = _common.parser("backtest", "").parse_args(base)
    assert _common.run_flow(backtest.backtest, args, record=False).exit_code == 0
    return out, b, published


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(KINDS))
def test_each_output_folder_opens_in_every_reader_with_its_keys(outputs, kind):
    out, b, _ = outputs
    folder = str(out / kind)
    rows = {"pandas": pd.read_parquet(folder),
            "pyarrow": pads.dataset(folder, format="parquet", partitioning="hive").to_table()
            .to_pandas(),
            "polars": pl.read_parquet(f"{folder}/**/*.parquet", hive_partitioning=True)
            .to_pandas(),
            "duckdb": duckdb.sql(f"select * from read_parquet('{folder}/**/*.parquet', "
                                 "hive_partitioning = true)").df()}
    sizes = {name: len(df) for name, df in rows.items()}
    assert len(set(sizes.values())) == 1 and next(iter(sizes.values())) > 0, sizes
    for name, df in rows.items():
        assert set(KINDS[kind]) <= set(df.columns), (name, df.columns)
        assert set(df["job"].astype(str)) == {"demo"}, name
        # pandas, pyarrow and DuckDB read the key as text; Polars parses it as a Datetime
        assert set(df["data_end"].astype(str)) <= {"20240630T230000", "2024-06-30 23:00:00"}
        assert "cutoff" in df.columns and "unique_id" in df.columns
    if kind == "forecasts":
        assert sizes["pandas"] == len(b.outcome.forecast.rows()["unique_id"])


@pytest.mark.slow
def test_a_challengers_backtest_never_replaces_what_run_published(outputs):
    out, _, published = outputs
    assert published and all(os.path.getmtime(f) == t for f, t in published.items())
    flows = {os.path.basename(os.path.dirname(os.path.dirname(f)))
             for f in glob.glob(f"{out}/metrics/job=demo/*/*/part-0.parquet")}
    assert flows == {"flow=run", "flow=backtest"}
