"""Ray beyond one process: a real two-node cluster, a worker killed mid-run, a node that
dies mid-training."""
from __future__ import annotations

import glob
import json
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import polars as pl
import pytest
from timeouts import COMMAND, STOP, scaled
from victims import reported, reporting_pid

from pipeline.cli import main

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.ray
def test_per_group_tasks_on_two_nodes_equal_the_local_run(demo_dir):
    """tests/multinode.py in a subprocess: head + worker node, joined through ray.address."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, str(ROOT / "tests" / "multinode.py"), demo_dir],
                       capture_output=True, text=True, timeout=scaled(COMMAND), cwd=ROOT,
                       env=env)
    assert r.returncode == 0, r.stderr[-4000:]
    info = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(info["nodes"]) == 2 and all(info["ok"]) and len(info["ok"]) == 4
    assert set(info["trained_on"].values()) == set(info["nodes"])   # both nodes trained
    assert info["finite"] and info["max_weight_diff"] < 1e-5
    for on_ray, local in info["best_val"]:
        assert on_ray == pytest.approx(local, rel=1e-5)


@pytest.mark.slow
@pytest.mark.ray
def test_the_job_on_two_nodes_with_s3_input_and_outputs_writes_the_local_forecasts(
        demo_dir, tmp_path):
    """tests/multinode_s3.py in a subprocess: the main job on a head + worker node, reading
    its input from and writing its outputs to an S3 API (moto in server mode on loopback;
    checkpoints default under the outputs, saved every epoch); the parts are read by tasks on
    both nodes, groups train on both; the forecasts on S3 equal, bit for bit, those of the
    same job run in one process on local files."""
    pytest.importorskip("moto.server")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, str(ROOT / "tests" / "multinode_s3.py"), demo_dir,
                        str(tmp_path / "local")], capture_output=True, text=True,
                       timeout=scaled(COMMAND), cwd=ROOT, env=env)
    assert r.returncode == 0, r.stderr[-4000:]
    info = json.loads(r.stdout.strip().splitlines()[-1])
    assert info["codes"] == [0, 0] and len(info["nodes"]) == 2
    assert info["readers"] == info["nodes"]          # the input was read on both nodes
    assert info["trained_on"] == info["nodes"]
    kinds = {f.split("/")[2] for f in info["files"]}
    assert {"forecasts", "backtest", "metrics", "reports"} <= kinds
    assert info["rows"] == 40 * 24 and info["same_keys"] and info["max_y_hat_diff"] == 0.0


@pytest.mark.slow
@pytest.mark.ray
def test_a_dead_node_that_strands_the_training_is_one_line_and_cleans_up(demo_dir, tmp_path):
    """tests/deadnode.py in a subprocess: the node that runs every task dies mid-training;
    the tasks left pending can never run (Ray would wait for a node forever): the run ends
    with one error line naming the node, exit 1 (retryable), its lock released, its run
    FAILED, no forecasts written, whole or half."""
    out = tmp_path / "out"
    info, err = _one_error_line("deadnode.py", demo_dir, out)
    assert err[-1].startswith(f"error: node {info['node'][:12]} "), err
    assert "died during training, and no live node has the 1 CPU a task needs" in err[-1]
    _nothing_left(out)


@pytest.mark.slow
@pytest.mark.ray
def test_a_task_killed_by_rays_memory_monitor_is_one_line_and_cleans_up(demo_dir, tmp_path):
    """tests/oomnode.py in a subprocess: the script's own one-node cluster kills tasks when the
    machine's used memory passes a threshold just above today's (Ray's memory monitor, not a
    machine-wide out-of-memory); a ballast process it started pushes memory past it while the
    run trains. The run ends with one error line saying Ray's memory monitor killed the
    training task and where, exit 1 (retryable), its lock released, its run FAILED, nothing
    written, whole or half."""
    out = tmp_path / "out"
    _, err = _one_error_line("oomnode.py", demo_dir, out)
    assert err[-1].startswith("error: every training job failed; first error: the training "
                              "task of store_"), err
    assert "was killed by Ray's memory monitor (out of memory) (node " in err[-1], err
    assert err[-1].endswith("OutOfMemoryError from Ray"), err
    _nothing_left(out)


def _one_error_line(script: str, demo_dir, out) -> tuple[dict, list[str]]:
    """tests/<script> (deadnode.py, oomnode.py) in a subprocess on the demo data: its JSON
    line, and the run's stderr lines, checked to end in exactly one `error:` line, no
    traceback, exit 1 (retryable). Skips when the script says so."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, str(ROOT / "tests" / script), demo_dir, str(out)],
                       capture_output=True, text=True, timeout=2 * scaled(COMMAND), cwd=ROOT,
                       env=env)
    assert r.returncode == 0, r.stderr[-4000:]
    info = json.loads(r.stdout.strip().splitlines()[-1])
    if "skip" in info:
        pytest.skip(info["skip"])
    err = info["stderr"].strip().splitlines()
    assert info["code"] == 1, (info, err)
    assert sum(line.startswith("error: ") for line in err) == 1 and "Traceback" not in \
        info["stderr"], err
    return info, err


def _nothing_left(out) -> None:
    """The per-group run under `out` that failed: its lock released, its parent run FAILED,
    no forecasts written, whole or half."""
    from pipeline import config as C
    from pipeline import paths
    from pipeline.stages.batch import lock
    cfg = C.load("configs/per_group.yaml", [f"output.path={out}"])
    with lock(paths.partition_lock(cfg, "20240630T230000")):      # released
        pass
    assert not glob.glob(str(out / "forecasts" / "**" / "*"), recursive=True)
    assert not glob.glob(str(out / "**" / ".tmp-*"), recursive=True)
    mlflow = pytest.importorskip("mlflow")
    c = mlflow.MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    runs = c.search_runs([c.get_experiment_by_name("demo_per_group").experiment_id],
                         "tags.`pipeline.role` = 'parent'")
    assert [r.info.status for r in runs] == ["FAILED"]


def _kill_first_job_task(pids: pathlib.Path, killed: list, stop: threading.Event) -> None:
    """SIGKILL the worker that reported itself first in `pids` (a training task of this
    test's own run, see `victims.reporting_pid`), by that pid: never a process found by its name
    or by a look at the machine's processes."""
    while not stop.is_set() and not killed:
        first = reported(pids)
        if first:
            os.kill(int(first[0]), signal.SIGKILL)
            killed.append(int(first[0]))
            return
        time.sleep(0.05)


def forecasts(out) -> pl.DataFrame:
    files = glob.glob(os.path.join(out, "forecasts", "job=*", "data_end=*", "*.parquet"))
    assert len(files) == 1, files
    return pl.read_parquet(files[0]).sort("unique_id", "step")


@pytest.mark.slow
@pytest.mark.ray
def test_a_killed_worker_is_retried_and_nothing_is_lost(demo_dir, tmp_path, ray_session,
                                                       monkeypatch):
    from pipeline.execution import ray_train
    pids = tmp_path / "task_pids"
    monkeypatch.setattr(ray_train, "_pack_task", reporting_pid(ray_train._pack_task, pids))
    base = ["run", "--config", "configs/per_group.yaml", "--set", f"data.path={demo_dir}",
            "--set", "train.per_group.packed=false", "--set", "train.epochs=2", "--set",
            "train.steps_per_epoch=3", "--set", "windows.lookback=72", "--set",
            "tracking.enabled=false", "--set", "evaluate.plots=0", "--set",
            "evaluate.final_model=reuse", "--set", "evaluate.comparators=[]"]
    # A decoy under this very process, named as Ray names a training worker: a killer that
    # chose its victim by name could take it; this one must leave it alive.
    decoy = subprocess.Popen(["bash", "-c", 'exec -a "ray::_pack_task" sleep 600'])
    killed: list[int] = []
    stop = threading.Event()
    killer = threading.Thread(target=_kill_first_job_task, args=(pids, killed, stop),
                              daemon=True)
    killer.start()
    try:
        assert main([*base, "--set", f"output.path={tmp_path / 'ray'}", "--set",
                     "ray.max_retries=2"]) == 0
    finally:
        stop.set()
        killer.join()
        survived = decoy.poll() is None
        decoy.kill()                     # by its own handle
        decoy.wait(timeout=scaled(STOP))
    assert survived, "the decoy named ray::_pack_task was killed"
    assert killed, f"no training task of this run was killed: {killed}"
    assert len(pids.read_text().split()) == 4 + 1       # a task per store, and the retry
    assert main([*base, "--set", f"output.path={tmp_path / 'local'}", "--set",
                 "ray.enabled=false"]) == 0
    got, want = forecasts(tmp_path / "ray"), forecasts(tmp_path / "local")
    assert got.group_by("unique_id", "step").len()["len"].max() == 1       # no duplicates
    assert got["unique_id"].n_unique() == 40 and len(got) == 40 * 24        # nothing lost
    assert got["model"].to_list() == want["model"].to_list()                # no fallback
    np.testing.assert_allclose(got["y_hat"].to_numpy(), want["y_hat"].to_numpy(),
                               rtol=1e-4, atol=1e-3)
