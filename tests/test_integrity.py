"""Output integrity: outputs complete or absent, one lock per output partition, failures that
are failures, faults with the right exit code. Each test names the finding it pins (the security
findings are in test_security.py)."""
from __future__ import annotations

import contextlib
import glob
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import polars as pl
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from conftest import SMALL, sines
from timeouts import COMMAND, EVENT, QUICK, scaled, wait_until

from pipeline import config as C
from pipeline import paths
from pipeline.cli import execute, main
from pipeline.data.io import filesystem_for
from pipeline.errors import (
    EXIT_FAILED,
    EXIT_INVALID,
    EXIT_LOCKED,
    EXIT_OK,
    EXIT_PARTIAL,
)
from pipeline.outputs import partitions as output
from pipeline.training.jobs import run_job
from pipeline.training.plan import plan_jobs

mlflow = pytest.importorskip("mlflow")
ROOT = pathlib.Path(__file__).resolve().parents[1]
FAST = ["--set", "train.epochs=1", "--set", "train.steps_per_epoch=2", "--set",
        "windows.lookback=72", "--set", "model.encoder.hidden_size=8", "--set",
        "evaluate.plots=0", "--set", "evaluate.comparators=[]", "--set", "ray.enabled=false"]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}  # 2 cores: no spinning


def run_args(cmd, data, out, *extra, config="configs/demo.yaml"):
    return [cmd, "--config", config, "--set", f"data.path={data}", "--set",
            f"output.path={out}", *FAST, *extra]


# ------------------------------------------------------------------ 5. outputs complete or absent

WRITER = """
import os, sys
import numpy as np, pyarrow as pa
from pipeline import config as C
from pipeline.outputs import partitions as output
cfg = C.load(None, [f"output.path={sys.argv[1]}", "name=demo", f"output.format={sys.argv[3]}"])
n, version = 100_000, int(sys.argv[2])
table = pa.table({"unique_id": pa.array(np.arange(n).astype(str)),
                  "version": pa.array(np.full(n, version, np.int64)),
                  "y_hat": pa.array(np.random.default_rng(version).random(n))})
print(output.write(cfg, "forecasts", "19700101T000000", table), flush=True)
"""


def write_version(root: str, version: int, fmt: str = "parquet", fault: str | None = None,
                  env: dict | None = None, preexec=None) -> subprocess.CompletedProcess:
    e = {**ENV, **(env or {})}
    if fault:
        e["PIPELINE_FAULT_AT"] = fault
    return subprocess.run([sys.executable, "-c", WRITER, root, str(version), fmt],
                          capture_output=True, text=True, cwd=ROOT, env=e, timeout=scaled(QUICK),
                          preexec_fn=preexec)


def versions_seen(root: str, fmt: str = "parquet") -> tuple[set, int]:
    """What a reader sees: the versions in the forecasts output and the row count."""
    if fmt == "delta":
        base, options = output.delta_location(paths.join(root, "forecasts"))
        df = pl.read_delta(base, storage_options=options or None)
    else:
        fs, path = filesystem_for(paths.join(root, "forecasts"))
        df = pl.from_arrow(pads.dataset(path, filesystem=fs, format="parquet",
                                        partitioning="hive").to_table())
    return set(df["version"].to_list()), len(df)


@pytest.mark.parametrize("fault", ["tmp-written", "replaced"])
def test_a_writer_killed_at_each_step_of_the_commit_leaves_one_whole_partition(tmp_path,
                                                                              fault):
    """Finding 5: the local swap was two renames (a kill between them left no partition) and
    leftovers were never swept. Now: old or new, whole, and the next write sweeps."""
    root = str(tmp_path)
    assert write_version(root, 1).returncode == 0
    for version in range(2, 5):
        r = write_version(root, version, fault=fault)
        assert r.returncode == -signal.SIGKILL
        seen, rows = versions_seen(root)
        want = {version} if fault == "replaced" else {1}        # renamed, or not yet
        assert seen == want and rows == 100_000, (fault, version, seen, rows)
        if fault == "tmp-written":
            assert glob.glob(f"{root}/forecasts/job=demo/*/.tmp-*")   # the crash's leftover
    assert write_version(root, 9).returncode == 0
    assert versions_seen(root) == ({9}, 100_000)
    assert not glob.glob(f"{root}/forecasts/**/.*", recursive=True)   # swept


def kill_loop(root: str, fmt: str, env: dict | None = None, rounds: int = 5) -> None:
    """Writers of versions 2, 3, … each SIGKILLed at a random moment of its run: after each,
    a reader sees one whole version, the last or the new one, never none, half or both."""
    assert write_version(root, 1, fmt, env=env).returncode == 0
    rng = np.random.default_rng(0)
    last = 1
    for version in range(2, 2 + rounds):
        p = subprocess.Popen([sys.executable, "-c", WRITER, root, str(version), fmt],
                             cwd=ROOT, env={**ENV, **(env or {})}, stdout=subprocess.PIPE,
                             text=True)
        time.sleep(rng.uniform(0.3, 2.0))       # the writer's start to its end
        p.kill()
        done = p.wait() == 0
        seen, rows = versions_seen(root, fmt)
        assert rows == 100_000 and len(seen) == 1 and seen <= {last, version}, (seen, rows)
        (now,) = seen
        assert now == version or not done                    # a finished write is visible
        last = now


@pytest.mark.slow
def test_a_writer_killed_at_random_moments_never_shows_half_or_two(tmp_path):
    kill_loop(str(tmp_path), "parquet")


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["parquet", "delta"])
def test_on_s3_a_killed_writer_never_shows_half_or_two(s3_bucket, fmt):
    """The same on a real S3 API: a partition is one object (one PUT) in the plain layout,
    one commit in Delta Lake."""
    pytest.importorskip("deltalake") if fmt == "delta" else None
    uri, env = s3_bucket
    kill_loop(uri, fmt, env, rounds=4)


@pytest.mark.slow
def test_delta_detects_two_writers_of_one_partition(s3_bucket):
    """Two writers of one partition at once: each either commits or fails cleanly with one
    line (exit 1, retry later); a reader sees one whole version, never both."""
    pytest.importorskip("deltalake")
    uri, env = s3_bucket
    assert write_version(uri, 1, "delta", env=env).returncode == 0
    conflicts = 0
    for round_ in range(3):
        procs = [subprocess.Popen([sys.executable, "-c", WRITER, uri, str(v), "delta"],
                                  cwd=ROOT, env={**ENV, **env}, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
                 for v in (10 * round_ + 2, 10 * round_ + 3)]
        for p in procs:
            out, err = p.communicate(timeout=scaled(QUICK))
            if p.returncode != 0:
                assert "another writer committed" in err, err[-2000:]
                conflicts += 1
        seen, rows = versions_seen(uri, "delta")
        assert len(seen) == 1 and rows == 100_000
    print(f"conflicts detected: {conflicts} of 6 writers")


def test_a_full_disk_during_the_commit_leaves_the_previous_partition(tmp_path):
    """RLIMIT_FSIZE on the writer: the new file cannot be written whole; the old one stays."""
    import resource
    root = str(tmp_path)
    assert write_version(root, 1).returncode == 0

    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)           # EFBIG instead of a kill
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
    r = write_version(root, 2, preexec=small_files)
    assert r.returncode != 0 and ("File too large" in r.stderr or "EFBIG" in r.stderr
                                  or "errno 27" in r.stderr.lower())
    assert versions_seen(root) == ({1}, 100_000)


# ------------------------------------------------------------------ 6. one lock per partition

HOLD = """
import sys
from pipeline.stages.batch import lock
with lock(sys.argv[1]):
    print("held", flush=True)
    sys.stdin.read()        # held until the test kills this process (no clock)
"""


@pytest.mark.slow
def test_every_writer_of_a_partition_takes_its_one_lock_before_writing(demo_dir, tmp_path,
                                                                       capsys):
    """Finding 6: locks were per flow, so `run`, `flows.nightly` and `flows.forecast_only`
    on one config and data end wrote the same partition at once; a run that found the lock
    still overwrote the validation report first."""
    out = tmp_path / "out"
    cfg = C.load("configs/demo.yaml", [f"output.path={out}"])
    path = paths.partition_lock(cfg, "20240630T230000")
    holder = subprocess.Popen([sys.executable, "-c", HOLD, path], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE,
                              text=True, cwd=ROOT, env=ENV)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert main(run_args("run", demo_dir, out, "--set", "tracking.enabled=false")) == \
            EXIT_LOCKED
        from flows import _common, forecast_only, nightly
        for flow in (nightly.nightly, forecast_only.forecast_only):
            args = _common.parser(flow.__name__, "").parse_args(
                ["--config", "configs/demo.yaml", "--set", f"data.path={demo_dir}", "--set",
                 f"output.path={out}", *FAST])
            assert _common.run_flow(flow, args, registry=False).exit_code == EXIT_LOCKED
    finally:
        holder.kill()
        holder.wait()
    err = capsys.readouterr().err
    assert err.count(f"another run holds {path}") == 3
    assert sorted(os.listdir(out)) == ["_locks"]                # not even the report


# ------------------------------------------------------------------ 7. failures are failures

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


# ------------------------------------------------------------------ 8. faults and exit codes

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


RUN = [sys.executable, "-m", "pipeline", "run", "--config", "configs/demo.yaml"]


def start_run(demo_dir, out, *extra, env=None):
    return subprocess.Popen(
        [*RUN, "--set", f"data.path={demo_dir}", "--set", f"output.path={out}", "--set",
         "ray.enabled=false", "--set", "evaluate.plots=0", "--set", "train.epochs=50", *extra],
        cwd=ROOT, env={**ENV, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)


def wait_for(proc, text: str, seconds: float = EVENT) -> None:
    t0, timeout = time.monotonic(), scaled(seconds)
    for line in proc.stdout:
        if text in line:
            return
        assert time.monotonic() - t0 < timeout, f"no {text!r}"
    raise AssertionError(f"{text!r} never printed; stderr: {proc.stderr.read()[-2000:]}")


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


@pytest.mark.slow
@pytest.mark.parametrize("when", ["training", "commit"])
def test_a_driver_killed_mid_run_leaves_one_copy_after_the_rerun(demo_dir, tmp_path, when):
    out = tmp_path / "out"
    short = ["--set", "train.epochs=1", "--set", "train.steps_per_epoch=2",
             "--set", "tracking.enabled=false"]
    if when == "training":
        proc = start_run(demo_dir, out, "--set", "tracking.enabled=false")
        wait_for(proc, "training     gru_direct")
        proc.kill()
        proc.wait()
    else:                               # killed after the forecast's file was written
        proc = start_run(demo_dir, out, *short,
                         env={"PIPELINE_FAULT_AT": "tmp-written@forecasts"})
        assert proc.wait(timeout=scaled(COMMAND)) == -signal.SIGKILL
    assert main(run_args("run", demo_dir, out, *short[4:])) == EXIT_OK
    for kind in ("forecasts", "backtest", "metrics"):
        (part,) = glob.glob(str(out / kind / "job=demo" / "**" / "data_end=*"), recursive=True)
        assert os.listdir(part) == ["part-0.parquet"], kind
        df = pl.read_parquet(os.path.join(part, "part-0.parquet"))
        key = [c for c in ("unique_id", "cutoff", "model", "step") if c in df.columns]
        assert len(df) and df.select(key).is_duplicated().sum() == 0


@pytest.mark.slow
def test_the_mlflow_server_stopping_mid_run_keeps_the_outputs_and_says_so(demo_dir, tmp_path):
    """The real tracking server dies during training: the forecasts are written, the exit code
    is 4 with one line saying the record is incomplete, and once the server is back the next
    run of the batch redoes it and marks the run that was left RUNNING as KILLED."""
    from services import MlflowServer
    backend = f"sqlite:///{tmp_path / 'server.db'}"
    server = MlflowServer(backend, str(tmp_path))
    url = server.wait()
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "flows.run", "--config", "configs/demo.yaml", "--set",
           f"data.path={demo_dir}", "--set", f"output.path={out}", "--set", "ray.enabled=false",
           "--set", "evaluate.plots=0", "--set", "train.epochs=3", "--set",
           "train.steps_per_epoch=10", "--set", f"tracking.uri={url}"]
    env = {**ENV, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    wait_for(proc, "training     gru_direct")
    server.stop()
    assert proc.wait(timeout=scaled(COMMAND)) == EXIT_PARTIAL
    err = proc.stderr.read()
    assert "warning: MLflow logging failed" in err and "a rerun of the batch completes it" in err
    (part,) = glob.glob(str(out / "forecasts" / "job=demo" / "data_end=*"))
    assert len(pl.read_parquet(os.path.join(part, "part-0.parquet"))) == 40 * 24
    server = MlflowServer(backend, str(tmp_path), port=server.port)
    server.wait()
    try:
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=scaled(COMMAND))
        assert r.returncode == EXIT_OK, r.stderr[-2000:]
        c = mlflow.MlflowClient(tracking_uri=url)
        parents = c.search_runs([c.get_experiment_by_name("demo").experiment_id],
                                "tags.`pipeline.role` = 'parent'")
        assert sorted(p.info.status for p in parents) == ["FINISHED", "KILLED"]
    finally:
        server.stop()
