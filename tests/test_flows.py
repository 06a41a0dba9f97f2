"""Scheduled flows: exit codes, the batch lock, rerun idempotence (MLflow runs and outputs),
recovery after a crash, and a warm start that is promoted only when it beats the champion."""
from __future__ import annotations

import glob
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
from timeouts import QUICK, scaled

from flows import backtest as backtest_flow
from flows import forecast_only, nightly
from flows._common import main, parser, run_flow
from pipeline import tracking
from pipeline.errors import EXIT_FAILED, EXIT_INVALID, EXIT_LOCKED, EXIT_OK, EXIT_PARTIAL
from pipeline.tracking import read as registry

mlflow = pytest.importorskip("mlflow")

FAST = ["--set", "train.epochs=2", "--set", "train.steps_per_epoch=3", "--set",
        "windows.lookback=72", "--set", "evaluate.plots=0", "--set", "ray.enabled=false",
        "--set", "model.encoder.hidden_size=8", "--set", "evaluate.comparators=[]"]
BATCH = "20240630T230000"
ROOT = pathlib.Path(__file__).resolve().parents[1]


def flow(module, data, out, *extra):
    name = module.__name__.rsplit(".", 1)[-1]
    return main(getattr(module, name),
                ["--config", "configs/demo.yaml", "--set", f"data.path={data}", "--set",
                 f"output.path={out}", *FAST, *extra], registry=getattr(module, "REGISTRY", False))


def batch(module, data, out, *extra):
    """The flow run as `flow()` runs it; the finished Batch, with each stage's result."""
    name = module.__name__.rsplit(".", 1)[-1]
    fn = getattr(module, name)
    args = parser(name, fn.__doc__).parse_args(
        ["--config", "configs/demo.yaml", "--set", f"data.path={data}", "--set",
         f"output.path={out}", *FAST, *extra])
    return run_flow(fn, args, registry=getattr(module, "REGISTRY", False))


def parents(out, status=None):
    c = mlflow.MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    exp = c.get_experiment_by_name("demo")
    runs = c.search_runs([exp.experiment_id], "tags.`pipeline.role` = 'parent'")
    return [r for r in runs if status is None or r.info.status == status]


def forecasts(out):
    files = glob.glob(os.path.join(out, "forecasts", "job=demo", "data_end=*", "*.parquet"))
    assert len(files) == 1, files
    return pl.read_parquet(files[0]).sort("unique_id", "step")


@pytest.fixture
def no_env(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.mark.slow
def test_nightly_rerun_is_skipped_force_redoes_promotes_nothing_and_forecast_only_agrees(
        demo_dir, tmp_path, no_env, capsys):
    """With AutoTheta among the candidates (the demo's comparator: it wins every store here),
    a forced rerun on unchanged data re-scores the champion within about 1e-9 of the
    challenger: `promote.min_improvement` keeps every champion (with no margin, noise
    registered new versions for two of the four stores)."""
    out = tmp_path / "out"
    theta = ("--set", "evaluate.comparators=[auto_theta]")
    assert flow(nightly, demo_dir, out, *theta) == EXIT_OK
    first = forecasts(out)
    (run,) = parents(out)
    assert run.info.status == "FINISHED" and run.data.tags["flow"] == "nightly"
    assert run.data.tags["batch_id"] == BATCH and run.data.metrics["promoted_groups"] == 4
    capsys.readouterr()

    assert flow(nightly, demo_dir, out, *theta) == EXIT_OK     # same batch: reported, skipped
    text = capsys.readouterr().out
    assert f"skipped: batch {BATCH} of flow nightly (demo) already finished " \
           f"({run.info.run_id})" in text and "training" not in text
    assert len(parents(out)) == 1
    assert forecasts(out)["created_at"].to_list() == first["created_at"].to_list()

    assert flow(nightly, demo_dir, out, "--force", *theta) == EXIT_OK   # redone: superseded
    finished = parents(out, "FINISHED")
    assert len(finished) == 2
    old = [r for r in finished if r.info.run_id == run.info.run_id][0]
    assert old.data.tags[tracking.SUPERSEDED_TAG] == "true"
    (rerun,) = [r for r in finished if r.info.run_id != run.info.run_id]
    assert rerun.data.metrics["promoted_groups"] == 0          # unchanged data: no promotion
    assert "better by less than promote.min_improvement 0.02" in capsys.readouterr().out
    c = mlflow.MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    assert [str(c.get_model_version_by_alias(f"demo.store_{g}", "champion").version)
            for g in "ABCD"] == ["1"] * 4
    board = registry.run_board("demo", uri=f"sqlite:///{out / 'mlflow.db'}")
    assert run.info.run_id not in board["run_id"].to_list() and len(board) == 1
    assert len(glob.glob(os.path.join(out, "forecasts", "job=demo", "*"))) == 1
    redone = forecasts(out)

    # forecast_only with the champions: the nightly's forecasts, no training
    only = batch(forecast_only, demo_dir, out, *theta)
    assert only.exit_code == EXIT_OK and "train" not in only.seconds
    assert only.outcome.trained is None and only.outcome.final is None
    assert only.outcome.forecast.note.startswith("champions ")
    np.testing.assert_array_equal(forecasts(out)["y_hat"].to_numpy(),
                                  redone["y_hat"].to_numpy())


@pytest.mark.slow
def test_a_crash_is_recovered_cleanly(demo_dir, tmp_path, no_env, monkeypatch, capsys):
    out = tmp_path / "out"
    import pipeline.stages.forecast as forecasting

    def boom(*a, **k):
        raise RuntimeError("object store timed out")
    monkeypatch.setattr(forecasting, "registry_forecast", boom)
    assert flow(nightly, demo_dir, out) == EXIT_FAILED
    printed = capsys.readouterr()
    err = printed.err.strip().splitlines()
    # a failure after training: one line, no traceback on any stream; the details in a file
    first, details = err[-1].split(" (details: ")
    assert first == "error: nightly failed: RuntimeError: object store timed out"
    assert "Traceback" not in printed.out + printed.err
    assert "Traceback" in pathlib.Path(details.rstrip(")")).read_text()
    assert [r.info.status for r in parents(out)] == ["FAILED"]
    assert not glob.glob(os.path.join(out, "forecasts", "*"))
    monkeypatch.undo()
    # a process killed outright leaves its run RUNNING: the next run (holding the lock) ends it
    c = mlflow.MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    exp = c.get_experiment_by_name("demo")
    stale = c.create_run(exp.experiment_id, tags={"pipeline.role": "parent", "flow": "nightly",
                                                  "config": "demo",
                                                  "batch_id": BATCH}).info.run_id
    stale_job = c.create_run(exp.experiment_id, tags={"pipeline.role": "job",
                                                      "mlflow.parentRunId": stale}).info.run_id
    assert flow(nightly, demo_dir, out, "--set", "tracking.required=true") == EXIT_OK
    status = {r.info.run_id: r.info.status for r in parents(out)}
    assert status[stale] == "KILLED" and sorted(status.values()) == \
        ["FAILED", "FINISHED", "KILLED"]
    assert c.get_run(stale_job).info.status == "KILLED"     # its job runs too (finding 8)
    assert len(forecasts(out)) == 40 * 24


HOLD = """
import sys
from pipeline.stages.batch import lock
with lock(sys.argv[1]):
    print("held", flush=True)
    sys.stdin.read()        # held until the test kills this process (no clock)
"""


@pytest.mark.slow
def test_the_lock_keeps_a_second_run_out(demo_dir, tmp_path, capsys):
    """Another process holds the batch's lock: the flow exits 3 without writing; once that
    process is gone (killed: the kernel drops its flock) the flow runs."""
    out = tmp_path / "out"
    path = os.path.join(out, "_locks", f"demo-{BATCH}.lock")
    holder = subprocess.Popen([sys.executable, "-c", HOLD, path], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE,
                              text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout.readline().strip() == "held"
        code = flow(backtest_flow, demo_dir, out, "--set", "tracking.enabled=false")
    finally:
        holder.kill()
        holder.wait()
    assert code == EXIT_LOCKED
    err = capsys.readouterr().err
    assert err.startswith(f"error: another run holds {path} (pid {holder.pid} on ")
    assert not os.path.exists(out / "metrics")                 # nothing written
    # released by the kill: the same flow runs, then a rerun is skipped by the marker
    assert flow(backtest_flow, demo_dir, out, "--set", "tracking.enabled=false") == EXIT_OK
    assert flow(backtest_flow, demo_dir, out, "--set", "tracking.enabled=false") == EXIT_OK
    assert "skipped: batch" in capsys.readouterr().out


def test_flows_run_as_modules_and_exit_with_a_code_and_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "flows.backtest", "--config", "configs/demo.yaml",
                        "--set", f"data.path={tmp_path}/missing", "--set",
                        f"output.path={tmp_path}/out"], capture_output=True,
                       text=True, cwd=ROOT, timeout=scaled(QUICK))
    assert r.returncode == EXIT_INVALID
    assert r.stderr.strip().count("\n") == 0 and r.stderr.startswith("error: ")
    assert "does not exist" in r.stderr


@pytest.mark.slow
def test_exit_codes_for_bad_input_and_failed_groups(demo_dir, tmp_path, capsys):
    assert flow(backtest_flow, demo_dir, tmp_path, "--set", "windows.lookbak=3") == EXIT_INVALID
    assert "unknown key 'windows.lookbak'" in capsys.readouterr().err
    # a fifth store whose only series is too short: its job fails, the others finish
    data = tmp_path / "data"
    shutil.copytree(demo_dir, data)
    t = pq.read_table(glob.glob(os.path.join(demo_dir, "store=store_A", "*.parquet"))[0])
    one = t.filter(pl.from_arrow(t)["unique_id"].eq(t["unique_id"][0].as_py()).to_arrow())
    short = one.slice(0, 60).set_column(0, "unique_id", [["E0001"] * 60])
    os.makedirs(data / "store=store_E")
    pq.write_table(short, data / "store=store_E" / "part-0.parquet")
    b = batch(backtest_flow, data, tmp_path / "out", "--set", "tracking.enabled=false",
              "--set", "train.mode=per_group")
    assert b.exit_code == EXIT_PARTIAL and b.failed_jobs == ["store_E"]
    (bad,) = [r for r in b.outcome.trained.results if not r.ok]
    assert bad.name == "store_E" and bad.error
    assert "1 training job(s) failed (store_E)" in capsys.readouterr().err   # said once, here


@pytest.mark.slow
def test_warm_start_is_promoted_only_when_it_beats_the_champion(demo_dir, tmp_path, no_env,
                                                                capsys):
    out = tmp_path / "out"
    # a weak champion: almost no training. warm_start is on but there is no champion yet, so
    # the job trains from scratch with the full budget (2 epochs, not warm_start_epochs=1)
    first = batch(nightly, demo_dir, out, "--set", "train.lr=1e-5", "--set",
                  "train.warm_start=true", "--set", "train.warm_start_epochs=1")
    assert first.exit_code == EXIT_OK and dict(first.outcome.inits) == {}
    assert "warm start   0 job(s) from the champion; from scratch" in capsys.readouterr().out
    c = mlflow.MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    (job,) = [r for r in c.search_runs([c.get_experiment_by_name("demo").experiment_id])
              if r.data.tags.get("group") == "global"]
    assert len(c.get_metric_history(job.info.run_id, "val_loss")) == 2
    # a warm start that wrecks the weights (lr 1.0) is worse on every store: kept
    b = batch(nightly, demo_dir, out, "--force", "--set", "train.warm_start=true",
              "--set", "train.lr=1.0")
    assert b.exit_code == EXIT_OK and set(b.outcome.inits) == {"global"}
    assert b.outcome.inits.fresh == []
    kept = b.outcome.decisions
    assert [d.group for d in kept] == [f"store_{g}" for g in "ABCD"]
    assert not any(d.promoted for d in kept) and all(d.champion <= d.challenger for d in kept)
    assert all(d.note == "(every window is in the champion's training data)"  # same data
               for d in kept)
    v1 = c.get_model_version_by_alias("demo.store_A", "champion")
    assert str(v1.version) == "1"
    # a warm start that fine-tunes properly beats the weak champion: promoted
    b = batch(nightly, demo_dir, out, "--force", "--set", "train.warm_start=true",
              "--set", "train.lr=3e-3", "--set", "train.steps_per_epoch=20", "--set",
              "train.warm_start_epochs=3")
    assert b.exit_code == EXIT_OK
    promoted = b.outcome.decisions
    assert all(d.promoted and d.challenger < d.champion and d.version == "2"
               for d in promoted) and len(promoted) == 4
    mv = c.get_model_version_by_alias("demo.store_A", "champion")
    assert str(mv.version) == "2" and float(mv.tags["value"]) < float(v1.tags["value"])


@pytest.mark.slow
def test_a_newer_cutoff_scores_both_on_windows_the_champion_never_saw(demo_dir, tmp_path,
                                                                     no_env, capsys):
    """Night 1 sees the data up to 48 h before the end; night 2 the whole data. The champion
    (night 1's final model) and the challenger are compared on the windows after night 1's
    cutoff, which neither trained on."""
    early = tmp_path / "early"
    for part in glob.glob(os.path.join(demo_dir, "store=*", "*.parquet")):
        df = pl.read_parquet(part, hive_partitioning=False)
        dest = early / os.path.relpath(part, demo_dir)
        os.makedirs(dest.parent, exist_ok=True)
        end = df["ds"].max()
        df.filter(pl.col("ds") <= end - pl.duration(hours=48)).write_parquet(dest)
    out = tmp_path / "out"
    assert flow(nightly, early, out) == EXIT_OK
    capsys.readouterr()
    b = batch(nightly, demo_dir, out)
    assert b.exit_code == EXIT_OK
    decisions = b.outcome.decisions
    assert len(decisions) == 4 and all(d.champion is not None and d.note == ""
                                       for d in decisions)
    finished = parents(out, "FINISHED")
    assert sorted(r.data.tags["batch_id"] for r in finished) == ["20240628T230000", BATCH]


@pytest.mark.slow
def test_configs_sharing_an_experiment_are_separate_batches(demo_dir, tmp_path, no_env,
                                                            capsys):
    out = tmp_path / "out"
    shared = ["--set", "tracking.experiment=shared", "--set", "evaluate.final_model=reuse"]
    assert flow(backtest_flow, demo_dir, out, *shared) == EXIT_OK
    assert flow(backtest_flow, demo_dir, out, *shared, "--set", "name=demo_b") == EXIT_OK
    text = capsys.readouterr().out
    assert "skipped:" not in text and text.count("training     gru_direct") == 2
    assert flow(backtest_flow, demo_dir, out, *shared, "--set", "name=demo_b") == EXIT_OK
    assert "skipped: batch 20240630T230000 of flow backtest (demo_b)" in capsys.readouterr().out
