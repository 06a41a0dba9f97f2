"""The reliability probe's findings (issue 29, item 5): each test fails on the behaviour the probe
found and passes now. Tracking findings are in test_probe_tracking.py."""
from __future__ import annotations

import glob
import os
import shutil

import numpy as np
import polars as pl
import pytest
from test_integrity import run_args

from pipeline.cli import main
from pipeline.errors import EXIT_OK


def read_kind(out, kind: str) -> pl.DataFrame:
    files = glob.glob(str(out / kind / "job=*" / "**" / "*.parquet"), recursive=True)
    return pl.read_parquet(files, hive_partitioning=False)


# ------------------------------------------------------------------ no made-up zeros

@pytest.mark.slow
def test_series_with_no_usable_value_get_no_made_up_number(demo_dir, tmp_path):
    """Finding: an all-NaN and an all-1e308 series were zero-filled on the grid, then got 24
    rows of y_hat = 0.0 labelled fallback. Now their forecast rows are NaN (y_hat and
    quantiles), they have no backtest or metrics rows, and the validation report lists them
    as skipped for having no finite value."""
    data = tmp_path / "data"
    shutil.copytree(demo_dir, data)
    (part,) = glob.glob(str(data / "store=store_A" / "*.parquet"))
    df = pl.read_parquet(part)
    nan_id, huge_id = df["unique_id"].unique().sort()[:2]
    df = df.with_columns(pl.when(pl.col("unique_id") == nan_id).then(float("nan"))
                         .when(pl.col("unique_id") == huge_id).then(1e308)
                         .otherwise(pl.col("y")).alias("y"))
    df.write_parquet(part)
    out = tmp_path / "out"
    assert main(run_args("run", data, out, "--set", "tracking.enabled=false")) == EXIT_OK
    empty = {nan_id, huge_id}
    fc = read_kind(out, "forecasts")
    mine = fc.filter(pl.col("unique_id").is_in(list(empty)))
    assert len(mine) == 2 * 24 and mine["y_hat"].is_nan().all()
    assert set(mine["model"]) == {"fallback:seasonal_naive"}
    rest = fc.filter(~pl.col("unique_id").is_in(list(empty)))
    assert rest["y_hat"].is_finite().all() and rest["unique_id"].n_unique() == 38
    for kind in ("backtest", "metrics"):
        got = read_kind(out, kind)
        if "unique_id" in got.columns:
            assert not set(got["unique_id"]) & empty, kind
    report = pl.read_parquet(out / "demo" / "validation_report.parquet")
    skipped = report.filter(pl.col("issue") == "no_finite_values")
    assert set(skipped["series"]) == empty and set(skipped["action"]) == {"skipped"}
    assert np.isfinite(rest["y_hat"].to_numpy()).all()
    assert os.path.exists(out / "demo" / "validation_report.parquet")
