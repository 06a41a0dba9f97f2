"""Failures are failures (finding 7 of the output-integrity review): a diverging job fails
instead of reporting ok, a huge covariate is scaled and the forecasts stay finite, and a run
whose jobs partly failed exits 4 (the other exit codes: test_exit_codes.py)."""
from __future__ import annotations

import glob
import os
import pathlib

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
from conftest import SMALL, run_args, sines

from pipeline import config as C
from pipeline.cli import execute, main
from pipeline.errors import EXIT_OK, EXIT_PARTIAL
from pipeline.training.jobs import run_job
from pipeline.training.plan import plan_jobs


def test_a_diverging_job_fails_instead_of_reporting_ok():
    """Finding 7: best val inf passed as status ok."""
    cfg = C.load(None, [*SMALL, "train.epochs=2", "train.steps_per_epoch=2", "train.lr=1e30",
                        "train.grad_clip=null"])
    arrays = sines(3)
    res = run_job(arrays, plan_jobs(arrays, cfg)[0], cfg)
    assert not res.ok and "training diverged" in res.error


@pytest.mark.slow
def test_a_huge_covariate_is_scaled_and_the_forecasts_are_finite(demo_dir, tmp_path):
    """Finding 7: a covariate near 3e37 reached the model unscaled: loss inf, forecasts NaN."""
    data = tmp_path / "in.parquet"
    df = pl.read_parquet(demo_dir)
    df.with_columns(pl.col("temperature") * 1e36).write_parquet(data)
    b = execute(run_args("run", data, tmp_path / "out", "--set", "tracking.enabled=false"))
    assert b.exit_code == EXIT_OK
    assert all(np.isfinite(r.best_val) for r in b.outcome.trained.results)
    fc = b.outcome.forecast.rows()
    assert np.isfinite(fc["y_hat"]).all() and set(fc["model"]) >= {"gru_direct"}


@pytest.mark.slow
def test_the_cli_exits_4_when_some_jobs_failed(demo_dir, tmp_path):
    data = tmp_path / "data"
    (data / "store=store_E").mkdir(parents=True)
    for part in glob.glob(os.path.join(demo_dir, "store=*", "*.parquet")):
        dest = data / os.path.relpath(part, demo_dir)
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(pathlib.Path(part).read_bytes())
    t = pq.read_table(glob.glob(os.path.join(demo_dir, "store=store_A", "*.parquet"))[0])
    short = t.slice(0, 60).set_column(0, "unique_id", [["E0001"] * 60])
    pq.write_table(short, data / "store=store_E" / "part-0.parquet")
    assert main(run_args("backtest", data, tmp_path / "out", "--set", "tracking.enabled=false",
                         "--set", "train.mode=per_group")) == EXIT_PARTIAL
