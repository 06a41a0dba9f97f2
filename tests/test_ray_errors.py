"""Bad input under Ray gives the same one-line error as in this process: the data contract's
failing cases through Ray tasks (one shared Ray instance), and a few through the CLI, Ray on,
as processes (exactly one line on stderr, no traceback, no colour codes)."""
from __future__ import annotations

import pathlib
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import hourly, write_long
from test_validate import cfg_for, two_series
from timeouts import QUICK, scaled

from pipeline.data.prepare import prepare
from pipeline.errors import DataError

ROOT = pathlib.Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.ray


def duplicates(tmp_path):
    ds = hourly(6)
    return write_long(tmp_path / "d.parquet", ["a"] * 7, np.r_[ds, ds[2:3]], np.arange(7)), ()


def string_target(tmp_path):
    path = two_series(tmp_path)
    t = pq.read_table(path)
    pq.write_table(t.set_column(t.schema.get_field_index("y"), "y", pa.array(["1.0"] * 24)),
                   path)
    return path, ()


def missing_column(tmp_path):
    path = two_series(tmp_path)
    pq.write_table(pq.read_table(path).rename_columns(["unique_id", "ds", "y_x"]), path)
    return path, ()


def off_grid(tmp_path):
    ds = hourly(6).copy()
    ds[3] += np.timedelta64(30, "m")
    return write_long(tmp_path / "o.parquet", ["a"] * 6, ds, np.arange(6)), ()


def nan_fail(tmp_path):
    y = np.arange(12, dtype=float)
    y[[0, 5]] = np.nan
    return two_series(tmp_path, y0=y), ("data.nan_policy=fail",)


def varying_static(tmp_path):
    return two_series(tmp_path, cat=["x"] * 5 + ["y"] * 19), ("data.static_cols=[cat]",)


CASES = [duplicates, string_target, missing_column, off_grid, nan_fail, varying_static]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.__name__)
def test_a_data_error_in_a_ray_task_is_the_pipelines_own_one_line_error(ray_session, tmp_path,
                                                                        case):
    from pipeline.execution.ray_train import RayRunner
    path, extra = case(tmp_path)
    cfg = cfg_for(path, *extra)
    with pytest.raises(DataError) as local:
        prepare(cfg)
    with pytest.raises(DataError) as remote:
        prepare(cfg, RayRunner(cfg.ray))
    assert type(remote.value) is type(local.value)            # not Ray's wrapper class
    assert str(remote.value) == str(local.value) and "\n" not in str(remote.value)


@pytest.mark.slow
@pytest.mark.parametrize("case", [duplicates, string_target, missing_column],
                         ids=lambda c: c.__name__)
def test_the_cli_with_ray_on_prints_one_line_for_bad_data(tmp_path, case):
    path, extra = case(tmp_path)
    r = subprocess.run(
        [sys.executable, "-m", "pipeline", "prepare", "--config", "configs/demo.yaml", "--set",
         f"data.path={path}", "--set", "data.freq=1h", "--set", "data.group_col=null",
         "--set", "data.static_cols=[]", "--set", "data.past_covariates=[]", "--set",
         "data.future_covariates=[]", "--set", f"output.path={tmp_path / 'out'}",
         "--set", "ray.num_cpus=1", *sum((["--set", x] for x in extra), [])],
        capture_output=True, text=True, cwd=ROOT, timeout=scaled(QUICK))
    assert r.returncode == 2, r.stderr[-2000:]
    # progress lines may come first when reading is slow (a busy machine), never after: the
    # one error line is the last line
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith("error: "), r.stderr[-2000:]
    assert sum(line.startswith("error: ") for line in lines) == 1, r.stderr[-2000:]
    assert all(line.startswith("reading ") for line in lines[:-1]), r.stderr[-2000:]
    assert "\x1b[" not in r.stderr and "Traceback" not in r.stderr and "ray::" not in r.stderr


def test_a_training_task_that_raises_under_ray_reports_one_clean_line(ray_session):
    from conftest import SMALL, sines

    from pipeline import config as C
    from pipeline.execution.ray_train import train
    from pipeline.training.plan import Job
    arrays = sines(4)
    cfg = C.load(None, [*SMALL, "train.epochs=1", "train.steps_per_epoch=2",
                        "ray.max_retries=0"])
    # an epoch logger that raises in the task (a builtin: workers cannot import test modules)
    (res,) = train(arrays, [[Job("global", np.arange(4))]], cfg, loggers={"global": int})
    assert not res.ok and "\n" not in res.error and "\x1b[" not in res.error, res.error
    assert res.error.startswith("TypeError: int() argument must be"), res.error
    assert "ray::" not in res.error and "pid=" not in res.error


@pytest.mark.slow
def test_a_ddp_worker_that_raises_reports_its_own_error_in_one_line(ray_session):
    from conftest import SMALL, sines

    from pipeline import config as C
    from pipeline.execution.ray_train import train
    from pipeline.training.plan import Job
    # every worker raises a ValueError as it starts: an ensemble trains packed, never under DDP
    cfg = C.load(None, [*SMALL, "train.epochs=1", "ray.num_workers=2",
                        "model.ensemble.members=2"])
    (res,) = train(sines(4), [[Job("global", np.arange(4))]], cfg)
    assert not res.ok and "\n" not in res.error and "\x1b[" not in res.error, res.error
    assert res.error == ("ValueError: model.ensemble.members = 2 trains packed, not under DDP "
                         "(ray.num_workers > 1); use one worker"), res.error
    assert "ray::" not in res.error and "Training failed" not in res.error


def test_ray_trains_wrappers_give_up_the_workers_own_exception():
    from ray.exceptions import RayTaskError
    from ray.train import ControllerError, WorkerGroupError
    from ray.train.base_trainer import TrainingFailedError as V1Failed

    from pipeline.execution.ray_train import worker_error
    own, other = ValueError("bad input"), RuntimeError("peer closed")
    died = RayTaskError("f", "Traceback ...", OSError("gone"))
    # the lowest rank whose error is not Ray's own; inside a RayTaskError, its cause
    assert worker_error(WorkerGroupError("x", {1: other, 0: own})) is own
    assert worker_error(WorkerGroupError("x", {0: died, 1: other})) is other
    assert isinstance(worker_error(WorkerGroupError("x", {0: died})), OSError)
    assert worker_error(ControllerError(own)) is own
    v1 = V1Failed("The Ray Train run failed.")             # Ray Train v1: its __cause__
    v1.__cause__ = died
    assert isinstance(worker_error(v1), OSError)
    hang = WorkerGroupError("no progress", {})         # nothing inside: itself
    assert worker_error(hang) is hang
