"""Ray's own failures speak (issue 29, item 4): a worker killed beyond its retries, a lost object,
a dead node, an out-of-memory kill each end in one `error:` line naming what died and where, exit
1 (retryable), the lock released, the run FAILED, nothing half-written. Victims are only the
pids this test's own tasks report (tests/victims.py)."""
from __future__ import annotations

import glob
import os
import pathlib
import signal
import sys
import threading
import time

import pytest
from timeouts import STOP, scaled, wait_until
from victims import reported, reporting_pid

from pipeline import config as C
from pipeline import paths
from pipeline.errors import EXIT_FAILED, InfraError

ray = pytest.importorskip("ray")
from pipeline.execution.failures import ray_failure, where  # noqa: E402 - needs ray

pytestmark = pytest.mark.ray
NODE = "0123456789abcdef0123456789abcdef"


def test_rays_failures_are_one_infra_line_naming_what_and_where():
    rx = ray.exceptions
    oom = rx.OutOfMemoryError(f"Task was killed due to the node running low on memory.\n"
                              f"Memory on the node (IP: 10.0.0.5, ID: {NODE}) where the task "
                              "(task ID: ff, name=f, pid=4242) was running was 1.9GB")
    cases = {
        oom: "killed by Ray's memory monitor (out of memory) (node 0123456789ab, 10.0.0.5, "
             "pid 4242)",
        rx.NodeDiedError(f"The node with node id: {NODE} has been marked dead"): "died with "
                                                                               "its node",
        rx.WorkerCrashedError(): "its worker process crashed or was killed",
        rx.ObjectLostError("ab" * 14, None, ""): "lost its data: an object was lost",
        rx.ActorDiedError(): "an actor it used is gone",
        rx.LocalRayletDiedError(): "died with this machine's Ray node",
    }
    for exc, said in cases.items():
        err = ray_failure(exc, "the training task of store_A", attempts=3)
        assert isinstance(err, InfraError), exc
        text = str(err)
        assert text.startswith("the training task of store_A ") and said in text, text
        assert "\n" not in text and "after 3 attempts (ray.max_retries = 2)" in text, text
    # inside a task's wrapper, Ray's failure is still Ray's; a task's own error is not
    wrapped = rx.RayTaskError("f", "Traceback ...", rx.WorkerCrashedError(), pid=7, ip="1.2.3.4")
    assert "crashed" in str(ray_failure(wrapped, "x"))
    assert where(wrapped) == "1.2.3.4, pid 7"
    assert ray_failure(rx.RayTaskError("f", "tb", ValueError("bad")), "x") is None
    assert ray_failure(ValueError("bad"), "x") is None
    assert ray_failure(rx.GetTimeoutError("t"), "x") is None     # the deadline says that


def owning(pids: str) -> list:
    """A task that reports its pid and returns a ref to an object its worker owns."""
    with open(pids, "a") as f:
        f.write(f"{os.getpid()}\n")
    return [ray.put(bytes(8 << 20))]     # in the object store, not inlined in the reply


def test_an_object_lost_with_its_owner_is_named(ray_session, tmp_path):
    import ray.cloudpickle
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])   # workers lack tests/
    pids = tmp_path / "pids"
    (inner,) = ray.get(ray.remote(owning).remote(str(pids)), timeout=scaled(STOP))
    os.kill(reported(pids)[0], signal.SIGKILL)                      # the worker it reported

    def lost():   # once Ray learns its owner died (a get may be served before that)
        try:
            ray.get(inner, timeout=scaled(STOP))
        except ray.exceptions.ObjectLostError as e:
            return e
        return None
    text = str(ray_failure(wait_until(lost, STOP, "the object lost"), "the data of store_A"))
    assert text.startswith("the data of store_A lost its data: the object's owner died"), text
    assert "\n" not in text


def _kill_every_reported(pids: pathlib.Path, killed: list, stop: threading.Event) -> None:
    """SIGKILL each pid this test's own tasks wrote to `pids` (and nothing else), as each
    appears: every attempt of every task dies."""
    while not stop.is_set():
        for pid in reported(pids):
            if pid not in killed:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
        time.sleep(0.05)


def sleepy(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


@pytest.fixture
def killer(tmp_path):
    """A thread killing every pid the test's tasks report in `tmp_path/pids`; yields (that
    file, the pids it killed)."""
    pids, killed, stop = tmp_path / "pids", [], threading.Event()
    thread = threading.Thread(target=_kill_every_reported, args=(pids, killed, stop),
                              daemon=True)
    thread.start()
    try:
        yield pids, killed
    finally:
        stop.set()
        thread.join()


def test_a_data_task_killed_beyond_its_retries_is_one_infra_error(ray_session, killer):
    import ray.cloudpickle

    from pipeline.execution.ray_train import RayRunner
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])   # workers lack tests/
    pids, killed = killer
    cfg = C.load(None, ["ray.max_retries=1"]).ray
    with pytest.raises(InfraError) as died:
        RayRunner(cfg)(reporting_pid(sleepy, pids), [(600,)])
    text = str(died.value)
    assert text.startswith("a data task (sleepy) died: its worker process crashed"), text
    assert "after 2 attempts (ray.max_retries = 1)" in text and "\n" not in text
    assert len(killed) == 2                       # the task and its one retry, both ours


@pytest.mark.slow
def test_a_run_whose_training_task_dies_beyond_its_retries_says_so_and_cleans_up(
        demo_dir, tmp_path, ray_session, killer, monkeypatch, capsys):
    from pipeline.cli import main
    from pipeline.execution import ray_train
    from pipeline.stages.batch import lock
    pids, killed = killer
    monkeypatch.setattr(ray_train, "_pack_task", reporting_pid(ray_train._pack_task, pids))
    out = tmp_path / "out"
    code = main(["run", "--config", "configs/demo.yaml", "--set", f"data.path={demo_dir}",
                 "--set", f"output.path={out}", "--set", "ray.max_retries=1", "--set",
                 "train.epochs=1", "--set", "train.steps_per_epoch=2", "--set",
                 "evaluate.plots=0", "--set", "evaluate.comparators=[]"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == EXIT_FAILED, err
    assert len(killed) == 2                       # the task and its retry, both ours
    assert sum(line.startswith("error: ") for line in err) == 1, err
    assert err[-1].startswith("error: every training job failed; first error: the "
                              "training task of global died: its worker process "
                              "crashed or was killed"), err
    assert "after 2 attempts (ray.max_retries = 1)" in err[-1]
    cfg = C.load("configs/demo.yaml", [f"output.path={out}"])
    with lock(paths.partition_lock(cfg, "20240630T230000")):      # released
        pass
    assert not glob.glob(str(out / "forecasts" / "**" / "*"), recursive=True)   # none written
    assert not glob.glob(str(out / "**" / ".tmp-*"), recursive=True)            # nor half
    mlflow = pytest.importorskip("mlflow")
    c = mlflow.MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    runs = c.search_runs([c.get_experiment_by_name("demo").experiment_id],
                         "tags.`pipeline.role` = 'parent'")
    assert [r.info.status for r in runs] == ["FAILED"]
