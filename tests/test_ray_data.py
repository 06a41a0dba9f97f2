"""The Ray fan-out of the data stage against a real local Ray instance."""
import numpy as np
import polars as pl
import pytest
from conftest import hourly, write_long

from pipeline import config as C
from pipeline.data.prepare import local_runner, prepare
from pipeline.errors import DataError
from pipeline.execution.ray_train import RayRunner

pytestmark = pytest.mark.ray

DEMO = ["data.group_col=store", "data.static_cols=[category]",
        "data.past_covariates=[temperature]", "data.future_covariates=[promo]"]


def assert_same_arrays(a, b):
    assert a.ids.tolist() == b.ids.tolist()
    for name in ("indptr", "values", "mask", "start", "status", "past", "future", "groups"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    assert a.static.keys() == b.static.keys()
    for k in a.static:
        np.testing.assert_array_equal(a.static[k], b.static[k])


@pytest.mark.parametrize("rows_per_task", [10**9, 3000])  # a task per file; per chunk of series
def test_ray_path_equals_local_path(ray_session, demo_dir, rows_per_task):
    cfg = C.load(None, [f"data.path={demo_dir}", f"data.rows_per_task={rows_per_task}", *DEMO])
    local = prepare(cfg, local_runner)
    remote = prepare(cfg, RayRunner(cfg.ray))
    assert remote.parts == local.parts and (rows_per_task > 10**6 or local.parts > 4)
    assert_same_arrays(local.arrays, remote.arrays)
    assert local.report.sort(pl.all()).equals(remote.report.sort(pl.all()))
    assert local.skipped() == remote.skipped() == {"too_short": 3}


def test_tasks_landed_on_ray_workers(ray_session, demo_dir):
    import os

    def pid_of_part(*_):
        return os.getpid()

    cfg = C.load(None, [f"data.path={demo_dir}"])
    pids = RayRunner(cfg.ray)(pid_of_part, [(i,) for i in range(4)])
    assert os.getpid() not in pids


def test_data_error_in_a_task_comes_back_clear(ray_session, tmp_path):
    ds = hourly(4)
    path = write_long(tmp_path / "d.parquet", ["a"] * 5, np.r_[ds, ds[:1]], np.arange(5))
    cfg = C.load(None, [f"data.path={path}", "data.freq=1h"])
    with pytest.raises(DataError, match="duplicate"):
        prepare(cfg, RayRunner(cfg.ray))
