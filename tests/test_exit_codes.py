"""Faults and exit codes a scheduler can act on (finding 8 of the output-integrity review): a
storage error is worth retrying (1), and so is a full disk, bad input is not (2), a hung Ray
task times out, SIGTERM marks the run's tracking runs KILLED and releases the lock (1), also
when it comes while a run is created. Each test names the finding it pins where it has one
(failed jobs, exit 4: test_failures.py; the MLflow server stopping mid-run, exit 4:
test_probe_tracking.py)."""
from __future__ import annotations

import contextlib
import glob
import os
import pathlib
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest
from conftest import ENV, ROOT, run_args, start_run, wait_for
from timeouts import COMMAND, EVENT, scaled, wait_until

from pipeline import config as C
from pipeline import paths
from pipeline.cli import main
from pipeline.errors import EXIT_FAILED, EXIT_INVALID, EXIT_OK

mlflow = pytest.importorskip("mlflow")


def test_a_storage_error_is_worth_retrying(demo_dir, tmp_path, monkeypatch, capsys):
    """Finding 8: a transient object-store OSError exited 2 (do not retry)."""
    def flaky(*a, **k):
        raise OSError("When reading information for key 'x': AWS Error NETWORK_CONNECTION")
    monkeypatch.setattr(pq, "read_table", flaky)
    assert main(run_args("prepare", demo_dir, tmp_path / "out")) == EXIT_FAILED
    assert capsys.readouterr().err.startswith("error: storage error reading ")


def test_a_batch_id_is_validated(demo_dir, tmp_path, capsys):
    assert main([*run_args("prepare", demo_dir, tmp_path / "out"), "--batch-id",
                 "x' or tags.flow = 'y"]) == EXIT_INVALID
    assert "--batch-id" in capsys.readouterr().err


def test_horizons_beyond_the_step_column_are_refused():
    with pytest.raises(C.ConfigError, match="windows.horizon = 40000"):
        C.load(None, ["windows.horizon=40000"])


def hang(seconds: float) -> None:
    time.sleep(seconds)


@pytest.mark.ray
def test_a_hung_ray_task_times_out(ray_session):
    import ray.cloudpickle

    from pipeline.errors import InfraError
    from pipeline.execution.ray_train import RayRunner
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])   # workers lack tests/
    cfg = C.load(None, ["ray.task_timeout_minutes=0.02"]).ray      # 1.2 s
    t0 = time.perf_counter()
    with pytest.raises(InfraError, match="still running after ray.task_timeout_minutes"):
        RayRunner(cfg)(hang, [(600,)])
    assert time.perf_counter() - t0 < 60


def epochs_logged(db: pathlib.Path) -> int:
    """The training epochs logged (metric train_loss) in a tracking store's SQLite file, read
    as it is written (0 before it exists): the job's run exists and is training."""
    import sqlite3
    if not db.exists():
        return 0
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as con:
            return con.execute("SELECT count(*) FROM metrics WHERE key = 'train_loss'"
                               ).fetchone()[0]
    except sqlite3.Error:       # its tables not made yet, or busy: not yet
        return 0


@pytest.mark.slow
def test_sigterm_marks_the_run_and_its_job_runs_killed_and_releases_the_lock(demo_dir,
                                                                             tmp_path):
    out = tmp_path / "out"
    proc = start_run(demo_dir, out)
    wait_for(proc, "training     gru_direct")
    wait_until(lambda: epochs_logged(out / "mlflow.db"), EVENT, "an epoch logged in MLflow")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=scaled(COMMAND)) == EXIT_FAILED
    assert "stopped by SIGTERM" in proc.stderr.read()
    c = mlflow.MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    runs = c.search_runs([c.get_experiment_by_name("demo").experiment_id])
    assert runs and {r.info.status for r in runs} == {"KILLED"}
    assert {r.data.tags["pipeline.role"] for r in runs} == {"parent", "job"}
    cfg = C.load("configs/demo.yaml", [f"output.path={out}"])
    from pipeline.stages.batch import lock
    with lock(paths.partition_lock(cfg, "20240630T230000")):    # released
        pass


def test_a_full_disk_is_one_storage_error_and_the_last_outputs_stay(demo_dir, tmp_path, capsys):
    """A file-size limit on the job (RLIMIT_FSIZE: writes fail with EFBIG as on a full disk
    with ENOSPC): one error line naming the file it could not write and why, exit 1 (worth
    retrying), the previous run's forecasts byte for byte, its lock released, no temporary
    file left."""
    import resource
    out = tmp_path / "out"
    args = run_args("run", demo_dir, out, "--set", "tracking.enabled=false")
    assert main(args) == EXIT_OK
    capsys.readouterr()
    files = sorted(glob.glob(str(out / "forecasts" / "**" / "*.parquet"), recursive=True))
    before = [pathlib.Path(f).read_bytes() for f in files]

    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)           # EFBIG instead of a kill
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))
    r = subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=scaled(COMMAND),
                       preexec_fn=small_files)
    err = r.stderr.strip().splitlines()
    assert r.returncode == EXIT_FAILED, err
    assert sum(line.startswith("error: ") for line in err) == 1, err
    assert err[-1].startswith(f"error: storage error writing {out}/"), err
    assert err[-1].endswith(": File too large (EFBIG); nothing was replaced"), err
    assert [pathlib.Path(f).read_bytes() for f in files] == before
    cfg = C.load("configs/demo.yaml", [f"output.path={out}"])
    from pipeline.stages.batch import lock
    with lock(paths.partition_lock(cfg, "20240630T230000")):      # released
        pass
    assert not glob.glob(str(out / "**" / ".tmp-*"), recursive=True)


@pytest.mark.parametrize("role", ["parent", "job"])
def test_sigterm_while_a_run_is_created_leaves_no_run_running(demo_dir, tmp_path, monkeypatch,
                                                             capsys, role):
    """SIGTERM (this process signals itself) while MLflow creates the parent run or a job's
    run, between the server's answer and the id being kept: the run is ended KILLED with the
    others, not left RUNNING with nobody to end it; exit 1, one error line."""
    real = mlflow.MlflowClient.create_run

    def create_run(self, *args, **kwargs):
        run = real(self, *args, **kwargs)
        if kwargs.get("tags", {}).get("pipeline.role") == role:
            os.kill(os.getpid(), signal.SIGTERM)        # this test's own process
        return run
    monkeypatch.setattr(mlflow.MlflowClient, "create_run", create_run)
    out = tmp_path / "out"
    assert main(run_args("run", demo_dir, out)) == EXIT_FAILED
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "error: run stopped by SIGTERM; its run is marked KILLED", err
    c = mlflow.MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    runs = c.search_runs([c.get_experiment_by_name("demo").experiment_id])
    assert role in {r.data.tags["pipeline.role"] for r in runs}
    assert {r.info.status for r in runs} == {"KILLED"}, [(r.data.tags, r.info.status)
                                                         for r in runs]


def test_a_sigterm_held_over_a_step_that_fails_still_stops_the_job():
    """A SIGTERM (this process signals itself) held over a step that then raises is not lost
    with the step's exception: Terminated, the step's error chained."""
    from pipeline.errors import Terminated, on_sigterm, sigterm_held
    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        with pytest.raises(Terminated) as stopped, sigterm_held():
            os.kill(os.getpid(), signal.SIGTERM)
            raise ValueError("create_run failed")
        assert isinstance(stopped.value.__context__, ValueError)
        with sigterm_held():                # nothing pending afterwards
            pass
    finally:
        signal.signal(signal.SIGTERM, previous)
